//! A worker for the dashboard test: beside the built-ins it offers `tally`, which counts the
//! characters and the words of `text(item)` as two metrics of its own (`batchq_user_chars_total`
//! and `batchq_user_words_total` on the reducer's endpoint), as a real operation may count
//! several things. An empty text has nothing to count, and fails.

use async_trait::async_trait;
use batchq_worker::{OpError, OpInput, Operation, Registry, item_text};
use serde_json::Value;

struct Tally;

#[async_trait]
impl Operation for Tally {
    fn name(&self) -> &str {
        "tally"
    }

    async fn run(&self, input: OpInput<'_>) -> Result<Value, OpError> {
        let text = item_text(input.item);
        if text.is_empty() {
            return Err(OpError::new("empty item: nothing to tally"));
        }
        let chars = text.chars().count() as u64;
        let words = text.split_whitespace().count() as u64;
        input.metrics.counter("chars", chars);
        input.metrics.counter("words", words);
        Ok(serde_json::json!({"chars": chars, "words": words}))
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut registry = Registry::with_builtins();
    registry.register(Tally);
    batchq_worker::main_with(registry).await?;
    Ok(())
}
