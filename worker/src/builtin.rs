//! The built-in operations of the contract that need no setting: `noop`, `sleep`, `sha256`
//! (`exec`, which runs only the programs a worker allows, is in `exec.rs`).

use std::time::Duration;

use async_trait::async_trait;
use common::jobspec::{item_text, with_item_text};
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

use crate::operation::{OpError, OpInput, Operation, Registry};

/// Registers `noop`, `sleep` and `sha256`. The built-in `exec` is not among them: it needs
/// the worker's allow-list, and [`crate::run`] adds it once it has one
/// ([`Registry::with_builtins`]).
pub fn register(registry: &mut Registry) {
    registry.register(Noop).register(Sleep).register(Sha256Op);
}

/// A non-negative integer parameter, or its default when absent.
pub(crate) fn int_param(
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
}
