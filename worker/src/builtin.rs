//! The built-in operations of the contract: `noop`, `sleep`, `sha256`, `exec`.

use std::process::Stdio;
use std::time::Duration;

use async_trait::async_trait;
use common::jobspec::{item_text, with_item_text};
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};
use tokio::io::AsyncReadExt;

use crate::operation::{OpError, OpInput, Operation, Registry};

/// Most bytes of an `exec` program's stdout kept as its result.
pub const EXEC_MAX_OUTPUT: usize = 64 * 1024;
/// `exec` timeout when the job's params give none.
pub const EXEC_DEFAULT_TIMEOUT_MS: u64 = 60_000;

pub fn register(registry: &mut Registry) {
    registry
        .register(Noop)
        .register(Sleep)
        .register(Sha256Op)
        .register(Exec);
}

/// A non-negative integer parameter, or its default when absent.
fn int_param(
    params: &Map<String, Value>,
    name: &str,
    default: Option<u64>,
) -> Result<u64, OpError> {
    match params.get(name) {
        None => default.ok_or_else(|| OpError::new(format!("params.{name}: missing"))),
        Some(v) => v.as_u64().ok_or_else(|| {
            OpError::new(format!(
                "params.{name}: must be a non-negative integer, got {v}"
            ))
        }),
    }
}

/// Does nothing; the result is `null`.
pub struct Noop;

#[async_trait]
impl Operation for Noop {
    fn name(&self) -> &str {
        "noop"
    }
    async fn run(&self, _input: OpInput<'_>) -> Result<Value, OpError> {
        Ok(Value::Null)
    }
    fn run_now(&self, _input: OpInput<'_>) -> Option<Result<Value, OpError>> {
        Some(Ok(Value::Null))
    }
}

/// Sleeps `params.ms` milliseconds; the result is `null`.
pub struct Sleep;

#[async_trait]
impl Operation for Sleep {
    fn name(&self) -> &str {
        "sleep"
    }
    async fn run(&self, input: OpInput<'_>) -> Result<Value, OpError> {
        let ms = int_param(input.params, "ms", None)?;
        tokio::time::sleep(Duration::from_millis(ms)).await;
        Ok(Value::Null)
    }
}

/// `h_1 = SHA-256(utf8(text(item)))`, `h_k = SHA-256(h_{k-1})`; the result is the lowercase
/// hex of `h_rounds`.
pub struct Sha256Op;

/// Rounds above which the hashing moves off the async threads.
const SHA256_INLINE_ROUNDS: u64 = 10_000;

pub fn sha256_rounds(text: &str, rounds: u64) -> String {
    let mut digest = Sha256::digest(text.as_bytes());
    for _ in 1..rounds {
        digest = Sha256::digest(digest);
    }
    lower_hex(&digest)
}

/// Lowercase hex of `bytes`, written straight into the string (no iterator of chars).
fn lower_hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for byte in bytes {
        out.push(char::from(DIGITS[usize::from(byte >> 4)]));
        out.push(char::from(DIGITS[usize::from(byte & 0x0f)]));
    }
    out
}

#[async_trait]
impl Operation for Sha256Op {
    fn name(&self) -> &str {
        "sha256"
    }
    async fn run(&self, input: OpInput<'_>) -> Result<Value, OpError> {
        if let Some(outcome) = self.run_now(input) {
            return outcome;
        }
        let rounds = sha256_param(input.params)?;
        let text = item_text(input.item).into_owned();
        let hex = tokio::task::spawn_blocking(move || sha256_rounds(&text, rounds))
            .await
            .map_err(|e| OpError::new(format!("hashing task failed: {e}")))?;
        Ok(Value::String(hex))
    }
    /// Up to `SHA256_INLINE_ROUNDS` rounds hash at once; more move off the async threads.
    fn run_now(&self, input: OpInput<'_>) -> Option<Result<Value, OpError>> {
        match sha256_param(input.params) {
            Err(e) => Some(Err(e)),
            Ok(rounds) if rounds <= SHA256_INLINE_ROUNDS => {
                Some(Ok(Value::String(with_item_text(input.item, |text| {
                    sha256_rounds(text, rounds)
                }))))
            }
            Ok(_) => None,
        }
    }
}

/// The `rounds` parameter of `sha256`: at least 1, 1 when absent.
fn sha256_param(params: &Map<String, Value>) -> Result<u64, OpError> {
    match int_param(params, "rounds", Some(1))? {
        0 => Err(OpError::new("params.rounds: must be at least 1, got 0")),
        rounds => Ok(rounds),
    }
}

/// Runs a program (no shell) with every `{}` in its arguments replaced by `text(item)`.
pub struct Exec;

fn exec_argv(params: &Map<String, Value>, text: &str) -> Result<Vec<String>, OpError> {
    let Some(command) = params.get("command") else {
        return Err(OpError::new(
            "params.command: missing; give [program, args...]",
        ));
    };
    let Some(parts) = command.as_array().filter(|a| !a.is_empty()) else {
        return Err(OpError::new(
            "params.command: must be a non-empty array of strings",
        ));
    };
    parts
        .iter()
        .map(|part| {
            part.as_str()
                .map(|s| s.replace("{}", text))
                .ok_or_else(|| OpError::new(format!("params.command: {part} is not a string")))
        })
        .collect()
}

/// Which part of a long output to keep.
#[derive(Clone, Copy)]
enum Keep {
    /// The first bytes (stdout: the result is its beginning).
    Head,
    /// The last bytes (stderr: the error ends with its last line).
    Tail,
}

/// Reads a pipe to its end, keeping at most `cap` bytes: a chatty program must neither fill
/// our memory nor block on a full pipe because we stopped reading.
async fn read_capped(
    pipe: &mut (impl tokio::io::AsyncRead + Unpin),
    kept: &mut Vec<u8>,
    cap: usize,
    keep: Keep,
) {
    let mut chunk = [0u8; 8192];
    loop {
        let n = match pipe.read(&mut chunk).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        match keep {
            Keep::Head => {
                let room = cap.saturating_sub(kept.len());
                kept.extend_from_slice(&chunk[..n.min(room)]);
            }
            Keep::Tail => {
                kept.extend_from_slice(&chunk[..n]);
                if kept.len() > cap {
                    let excess = kept.len() - cap;
                    kept.drain(..excess);
                }
            }
        }
    }
}

fn last_line(stderr: &[u8]) -> String {
    String::from_utf8_lossy(stderr)
        .lines()
        .rev()
        .map(str::trim)
        .find(|l| !l.is_empty())
        .unwrap_or("")
        .to_owned()
}

fn truncate_utf8(mut s: String, max: usize) -> String {
    if s.len() > max {
        let mut end = max;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
    }
    s
}

#[async_trait]
impl Operation for Exec {
    fn name(&self) -> &str {
        "exec"
    }

    async fn run(&self, input: OpInput<'_>) -> Result<Value, OpError> {
        let text = item_text(input.item);
        let argv = exec_argv(input.params, &text)?;
        let timeout_ms = int_param(input.params, "timeout_ms", Some(EXEC_DEFAULT_TIMEOUT_MS))?;
        let mut child = tokio::process::Command::new(&argv[0])
            .args(&argv[1..])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| OpError::new(format!("cannot run {:?}: {e}", argv[0])))?;
        let mut stdout = child.stdout.take();
        let mut stderr = child.stderr.take();
        let mut out = Vec::new();
        let mut err = Vec::new();
        let finished = tokio::time::timeout(Duration::from_millis(timeout_ms), async {
            let read_out = async {
                if let Some(s) = stdout.as_mut() {
                    read_capped(s, &mut out, EXEC_MAX_OUTPUT * 2, Keep::Head).await;
                }
            };
            let read_err = async {
                if let Some(s) = stderr.as_mut() {
                    read_capped(s, &mut err, EXEC_MAX_OUTPUT, Keep::Tail).await;
                }
            };
            let ((), (), status) = tokio::join!(read_out, read_err, child.wait());
            status
        })
        .await;
        let status = match finished {
            Err(_) => {
                let _ = child.kill().await;
                return Err(OpError::new(format!(
                    "timed out after {timeout_ms} ms: {}",
                    last_line(&err)
                )));
            }
            Ok(Err(e)) => return Err(OpError::new(format!("waiting for {:?}: {e}", argv[0]))),
            Ok(Ok(status)) => status,
        };
        if status.success() {
            let stdout = String::from_utf8_lossy(&out).trim().to_owned();
            return Ok(Value::String(truncate_utf8(stdout, EXEC_MAX_OUTPUT)));
        }
        let how = match status.code() {
            Some(code) => format!("exited with status {code}"),
            None => {
                #[cfg(unix)]
                {
                    use std::os::unix::process::ExitStatusExt;
                    format!("killed by signal {}", status.signal().unwrap_or(0))
                }
                #[cfg(not(unix))]
                {
                    "killed".to_owned()
                }
            }
        };
        Err(OpError::new(format!("{how}: {}", last_line(&err))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn input<'a>(item: &'a Value, params: &'a Map<String, Value>) -> OpInput<'a> {
        OpInput {
            job_id: "j",
            index: 0,
            item,
            params,
            attempt: 1,
            metrics: Box::leak(Box::default()),
        }
    }

    fn params(v: Value) -> Map<String, Value> {
        v.as_object().cloned().unwrap_or_default()
    }

    #[test]
    fn sha256_known_vectors() {
        // SHA-256("abc")
        assert_eq!(
            sha256_rounds("abc", 1),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        // The second round hashes the 32 raw bytes, not the hex text.
        let once = Sha256::digest(b"abc");
        assert_eq!(sha256_rounds("abc", 2), hex::encode(Sha256::digest(once)));
    }

    #[tokio::test]
    async fn sha256_hashes_text_of_item() {
        let p = params(json!({"rounds": 1}));
        let item = json!(42);
        let out = Sha256Op.run(input(&item, &p)).await.expect("hash");
        assert_eq!(out, Value::String(sha256_rounds("42", 1)));
        let bad = params(json!({"rounds": "x"}));
        assert!(Sha256Op.run(input(&item, &bad)).await.is_err());
    }

    #[tokio::test]
    async fn run_now_agrees_with_run() {
        let item = json!(7);
        for rounds in [json!(1), json!(10), json!(0), json!("x")] {
            let p = params(json!({ "rounds": rounds }));
            let now = Sha256Op
                .run_now(input(&item, &p))
                .expect("inline rounds run at once");
            assert_eq!(now, Sha256Op.run(input(&item, &p)).await, "rounds {rounds}");
        }
        // Beyond the inline rounds the hashing must be awaited (it leaves the async threads).
        let many = params(json!({ "rounds": SHA256_INLINE_ROUNDS + 1 }));
        assert_eq!(Sha256Op.run_now(input(&item, &many)), None);
        assert_eq!(
            Sha256Op.run(input(&item, &many)).await,
            Ok(Value::String(sha256_rounds("7", SHA256_INLINE_ROUNDS + 1)))
        );
        let none = Map::new();
        assert_eq!(Noop.run_now(input(&item, &none)), Some(Ok(Value::Null)));
        let ms = params(json!({"ms": 1}));
        assert_eq!(Sleep.run_now(input(&item, &ms)), None, "sleep must wait");
    }

    #[tokio::test]
    async fn exec_substitutes_and_reports_stderr() {
        let p = params(
            json!({"command": ["sh", "-c", "echo got-{}; echo oops >&2; exit $1", "sh", "{}"], "timeout_ms": 5000}),
        );
        let ok = Exec.run(input(&json!("0"), &p)).await.expect("exit 0");
        assert_eq!(ok, json!("got-0"));
        let failed = Exec.run(input(&json!(3), &p)).await.expect_err("exit 3");
        assert_eq!(failed.0, "exited with status 3: oops");
    }

    #[tokio::test]
    async fn exec_times_out() {
        let p = params(json!({"command": ["sleep", "5"], "timeout_ms": 100}));
        let err = Exec.run(input(&json!(1), &p)).await.expect_err("timeout");
        assert!(err.0.starts_with("timed out after 100 ms"), "{err}");
    }

    #[tokio::test]
    async fn exec_missing_program() {
        let p = params(json!({"command": ["/nonexistent/prog"]}));
        let err = Exec.run(input(&json!(1), &p)).await.expect_err("spawn");
        assert!(err.0.contains("cannot run"), "{err}");
    }
}
