//! A worker that offers an operation of its own, `reverse`, beside the built-ins.
//!
//! The worker is a library: a program of your own builds a [`Registry`], registers its
//! operations in it and hands it to [`worker::run`]. Everything else (flags, environment,
//! graceful shutdown) is the same as for the stock `worker` binary:
//!
//! ```text
//! cargo run -p worker --example custom_operation
//! cargo run -p worker --example custom_operation -- --prefetch 8 --operations reverse,sha256
//! AMQP_URL=amqp://guest:guest@rabbit:5672/%2f BATCHQ_NAMESPACE=dev \
//!     cargo run -p worker --example custom_operation
//! ```
//!
//! Then submit a job that names the operation, e.g. with `batchctl submit -`:
//!
//! ```json
//! {"operation": "reverse", "items": ["abc", "héllo", 42, {"a": 1}]}
//! ```
//!
//! `batchctl results JOB` then prints `"cba"`, `"olléh"`, `"24"` and `"}1:\"a\"{"`.

use async_trait::async_trait;
use common::jobspec::item_text;
use serde_json::Value;
use worker::{OpError, OpInput, Operation, Registry};

/// Reverses `text(item)` (a string item as itself, anything else as its compact JSON) by
/// Unicode scalar values. An empty text has nothing to reverse, and fails.
struct Reverse;

#[async_trait]
impl Operation for Reverse {
    fn name(&self) -> &str {
        "reverse"
    }

    async fn run(&self, input: OpInput<'_>) -> Result<Value, OpError> {
        let text = item_text(input.item);
        if text.is_empty() {
            return Err(OpError::new("empty item: nothing to reverse"));
        }
        let reversed: String = text.chars().rev().collect();
        // Metrics of the operation's own: they reach the reducer's MetricBatch records and
        // its Prometheus endpoint (`batchq_user_reversed_chars_total`,
        // `batchq_user_text_bytes`).
        input
            .metrics
            .counter("reversed_chars", reversed.chars().count() as u64);
        input.metrics.histogram("text_bytes", text.len() as f64);
        Ok(Value::String(reversed))
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut registry = Registry::with_builtins();
    registry.register(Reverse);
    worker::main_with(registry).await?;
    Ok(())
}
