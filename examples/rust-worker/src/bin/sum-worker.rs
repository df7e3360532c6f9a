//! A worker that offers `sum` besides the built-ins: each item is a line of whole numbers
//! separated by spaces (`"1 2 3"`), its result `{"sum": …, "attempt": …}`, the sum scaled by
//! the job's `params.scale`.
//!
//! ```text
//! AMQP_URL=amqp://guest:guest@127.0.0.1:5672/%2f BATCHQ_NAMESPACE=batchq cargo run --bin sum-worker
//! ```
//!
//! It takes the stock worker's flags and environment (`--prefetch`, `BATCHQ_OPERATIONS`, …).

use anyhow::Context;
use batchq_worker::{OpContext, OpError, PermanentExt, Registry};
use serde::{Deserialize, Serialize};

/// `sum`'s params.
#[derive(Deserialize)]
struct Scale {
    /// Each line's sum is multiplied by this.
    scale: i64,
}

/// `sum`'s result.
#[derive(Serialize)]
struct Sum {
    sum: i64,
    /// The attempt that produced it (1 unless an earlier one failed).
    attempt: u32,
}

/// Every fifth item (index 4, 9, …) fails its first attempt, as a call to a service that is
/// briefly away would: such a failure is worth retrying, and the next attempt succeeds.
fn busy(ctx: &OpContext) -> bool {
    ctx.index % 5 == 4 && ctx.attempt == 1
}

/// The sum of the numbers of `line`, times `params.scale`. A word that is no number fails
/// the operation for good (no retry makes it one); an overflow too.
async fn sum(line: String, params: Scale, ctx: OpContext) -> Result<Sum, OpError> {
    if busy(&ctx) {
        return Err(OpError::new(format!(
            "item {} of {}: busy on attempt {}",
            ctx.index, ctx.job_id, ctx.attempt
        )));
    }
    let mut sum: i64 = 0;
    for word in line.split_whitespace() {
        // `?` takes any error; `.permanent()` says retrying cannot help.
        let n: i64 = word
            .parse()
            .with_context(|| format!("{word:?} is not a number (attempt {})", ctx.attempt))
            .permanent()?;
        sum = sum
            .checked_add(n)
            .context("the sum overflows")
            .permanent()?;
    }
    let sum = sum
        .checked_mul(params.scale)
        .context("the scaled sum overflows")
        .permanent()?;
    Ok(Sum {
        sum,
        attempt: ctx.attempt,
    })
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut registry = Registry::with_builtins();
    registry.register_fn_with_context("sum", sum);
    batchq_worker::main_with(registry).await?;
    Ok(())
}
