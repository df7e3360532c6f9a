//! A worker that offers operations of its own beside the built-ins: `scale`, an async
//! function over types of its own (the short way), and `reverse`, an [`Operation`] (the way
//! that also records metrics of its own).
//!
//! The worker is a library: a program of your own builds a [`Registry`], registers its
//! operations in it and hands it to [`batchq_worker::run`]. Everything else (flags, environment,
//! graceful shutdown) is the same as for the stock `worker` binary:
//!
//! ```text
//! cargo run -p batchq-worker --example custom_operation
//! cargo run -p batchq-worker --example custom_operation -- --prefetch 8 --operations reverse,sha256
//! AMQP_URL=amqp://guest:guest@rabbit:5672/%2f BATCHQ_NAMESPACE=dev \
//!     cargo run -p batchq-worker --example custom_operation
//! ```
//!
//! Then submit a job that names the operation, e.g. with `batchctl submit -`:
//!
//! ```json
//! {"operation": "reverse", "items": ["abc", "héllo", 42, {"a": 1}]}
//! ```
//!
//! `batchctl results JOB` then prints `"cba"`, `"olléh"`, `"24"` and `"}1:\"a\"{"`. And
//!
//! ```json
//! {"operation": "scale", "params": {"factor": 1.5},
//!  "items": [{"width": 640, "height": 480}, {"width": "wide", "height": 1}]}
//! ```
//!
//! gives `{"width":960,"height":720}` and, for the second item, the error
//! `item.width: invalid type: string "wide", expected u32`.

use batchq_worker::{OpError, OpInput, Operation, Registry, Value, async_trait, item_text};
use serde::{Deserialize, Serialize};

/// A `scale` item: a size in pixels.
#[derive(Deserialize, Serialize)]
struct Size {
    width: u32,
    height: u32,
}

/// `scale`'s params.
#[derive(Deserialize)]
struct Scale {
    factor: f64,
}

/// `size` scaled by `params.factor`, rounded to whole pixels; a size that would not fit fails.
async fn scale(size: Size, params: Scale) -> Result<Size, OpError> {
    let scaled = |pixels: u32| {
        let scaled = (f64::from(pixels) * params.factor).round();
        if (0.0..=f64::from(u32::MAX)).contains(&scaled) {
            Ok(scaled as u32)
        } else {
            Err(OpError::new(format!(
                "{pixels} × {} is no size",
                params.factor
            )))
        }
    };
    Ok(Size {
        width: scaled(size.width)?,
        height: scaled(size.height)?,
    })
}

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
    registry.register_fn("scale", scale);
    registry.register(Reverse);
    batchq_worker::main_with(registry).await?;
    Ok(())
}
