//! A worker for the fault suite: beside the built-ins it offers `abort_on`, which aborts the
//! whole process (SIGABRT, no report, no ack) on the item equal to `params.item`, and returns
//! the item otherwise. A fragment holding that item kills every worker that takes it: a
//! poison fragment.

use async_trait::async_trait;
use batchq_worker::{OpError, OpInput, Operation, Registry};
use serde_json::Value;

struct AbortOn;

#[async_trait]
impl Operation for AbortOn {
    fn name(&self) -> &str {
        "abort_on"
    }

    async fn run(&self, input: OpInput<'_>) -> Result<Value, OpError> {
        if input.params.get("item") == Some(input.item) {
            std::process::abort();
        }
        Ok(input.item.clone())
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut registry = Registry::with_builtins();
    registry.register(AbortOn);
    batchq_worker::main_with(registry).await?;
    Ok(())
}
