use batchq_worker::Registry;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    batchq_worker::main_with(Registry::with_builtins()).await?;
    Ok(())
}
