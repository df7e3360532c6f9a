//! The compute ceiling: the `sha256` operation's hashes computed in a tight loop in the bench
//! process, on as many threads as the machine has cores, with no pipeline around them.

use std::io::Write;
use std::time::Instant;

use sha2::{Digest, Sha256};

/// Hashes of items `0..items` (a range job's items: `text(item)` is the integer's decimal
/// text), `rounds` rounds each, split evenly over `threads` threads. Returns operations per
/// second.
pub fn ceiling(items: u64, rounds: u32, threads: usize) -> f64 {
    let threads = threads.max(1) as u64;
    let started = Instant::now();
    let checksum: u64 = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let from = items * t / threads;
                let to = items * (t + 1) / threads;
                scope.spawn(move || hash_span(from, to, rounds))
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_default())
            .fold(0, u64::wrapping_add)
    });
    let seconds = started.elapsed().as_secs_f64();
    // Keeps the hashing from being optimised away.
    std::hint::black_box(checksum);
    items as f64 / seconds.max(1e-9)
}

fn hash_span(from: u64, to: u64, rounds: u32) -> u64 {
    let mut checksum = 0u64;
    let mut text = [0u8; 24];
    for item in from..to {
        let mut cursor = std::io::Cursor::new(&mut text[..]);
        // 24 bytes hold any u64 in decimal: the write cannot fail.
        let _ = write!(cursor, "{item}");
        let len = cursor.position() as usize;
        let mut digest = Sha256::digest(&text[..len]);
        for _ in 1..rounds {
            digest = Sha256::digest(digest);
        }
        checksum = checksum.wrapping_add(u64::from(digest[0]));
    }
    checksum
}

/// The worker's own cost per operation, without the broker: the `sha256` operation run by
/// the worker's fragment runner (the code a worker runs for each delivered fragment: item,
/// operation, timing, cancellation checks) in the bench process, on `threads` threads, one
/// fragment of `items / threads` operations each. Returns operations per second.
pub fn runner(items: u64, rounds: u32, threads: usize) -> Result<f64, String> {
    let threads = threads.max(1) as u64;
    let registry = batchq_worker::Registry::with_builtins();
    let operation = registry
        .get("sha256")
        .ok_or("the worker has no sha256 operation")?;
    let mut params = serde_json::Map::new();
    params.insert("rounds".into(), rounds.into());
    let started = Instant::now();
    let done: Result<Vec<u64>, String> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let fragment = common::wire::Fragment {
                    job_id: "bench".into(),
                    fragment: t,
                    operation: "sha256".into(),
                    params: params.clone(),
                    attempt: 1,
                    indices: common::wire::Indices::Span(
                        items * t / threads,
                        items * (t + 1) / threads,
                    ),
                    payload: common::wire::Payload::Range { base: 0 },
                    lifespan_ms: 3_600_000,
                    collect_results: false,
                    round: 0,
                };
                let operation = operation.clone();
                scope.spawn(move || -> Result<u64, String> {
                    let runtime = tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                        .map_err(|e| e.to_string())?;
                    let report = runtime.block_on(batchq_worker::runner::run_fragment(
                        &fragment,
                        operation.as_ref(),
                        "bench",
                        &batchq_worker::runner::CancelledJobs::default(),
                        &tokio_util::sync::CancellationToken::new(),
                    ));
                    Ok(u64::from(report.done))
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .map_err(|_| "a runner thread panicked".to_owned())?
            })
            .collect()
    });
    let seconds = started.elapsed().as_secs_f64();
    let done: u64 = done?.into_iter().sum();
    if done != items {
        return Err(format!("the runner ran {done} of {items} operations"));
    }
    Ok(items as f64 / seconds.max(1e-9))
}

/// Lowercase hex of the `sha256` operation's result for `item` (for checking a job's results).
pub fn expected_hex(item: u64, rounds: u32) -> String {
    let mut digest = Sha256::digest(item.to_string().as_bytes());
    for _ in 1..rounds {
        digest = Sha256::digest(digest);
    }
    hex::encode(digest)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_loop_hashes_what_the_operation_hashes() {
        // h_1 of "0" is SHA-256("0"), as the contract's text(item) of the integer 0.
        assert_eq!(
            expected_hex(0, 1),
            "5feceb66ffc86f38d952786c6d696c79c2dbc239dd4e91b46729d73a27fb57e9"
        );
        assert_eq!(
            expected_hex(7, 3),
            batchq_tests::sha256_hex("7", 3),
            "the harness's reference agrees"
        );
        let mut text = [0u8; 24];
        let mut cursor = std::io::Cursor::new(&mut text[..]);
        let _ = write!(cursor, "{}", u64::MAX);
        assert_eq!(cursor.position(), 20);
        assert!(ceiling(100, 2, 2) > 0.0);
        assert!(runner(100, 2, 2).expect("the runner runs every operation") > 0.0);
    }
}
