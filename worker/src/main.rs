use worker::Registry;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    worker::main_with(Registry::with_builtins()).await?;
    Ok(())
}
