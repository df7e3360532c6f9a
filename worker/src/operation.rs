//! The `Operation` trait: what a worker runs for each item, and the registry of operations
//! one worker offers. A user adds operations by implementing the trait in a small binary of
//! their own that registers them and calls [`crate::run`] (see `examples/`).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use common::measure::{Histogram, UserMetrics};
use serde_json::{Map, Value};

use crate::exec::{Exec, ExecAllowList};

/// One operation's input.
#[derive(Debug, Clone, Copy)]
pub struct OpInput<'a> {
    pub job_id: &'a str,
    /// The item's index in its job.
    pub index: u64,
    pub item: &'a Value,
    /// The job's `params`, unchanged.
    pub params: &'a Map<String, Value>,
    /// 1 for the first attempt at this operation.
    pub attempt: u32,
    /// Where the operation records metrics of its own; they reach the reducer's MetricBatch
    /// records and its Prometheus endpoint.
    pub metrics: &'a OpMetrics,
}

/// Counters and histograms an operation records, named by the operation's author. Names
/// should follow Prometheus conventions (`snake_case`, a unit suffix such as `_bytes` or
/// `_seconds`); the reducer exports them as `batchq_user_{name}` (counters with `_total`).
#[derive(Debug, Default)]
pub struct OpMetrics {
    recorded: Mutex<UserMetrics>,
}

impl OpMetrics {
    /// Adds `n` to the counter `name`.
    pub fn counter(&self, name: &str, n: u64) {
        let mut recorded = self.recorded.lock().unwrap_or_else(|p| p.into_inner());
        match recorded.counters.get_mut(name) {
            Some(count) => *count += n,
            None => {
                recorded.counters.insert(name.to_owned(), n);
            }
        }
    }

    /// Records `value` in the histogram `name`.
    pub fn histogram(&self, name: &str, value: f64) {
        let mut recorded = self.recorded.lock().unwrap_or_else(|p| p.into_inner());
        match recorded.histograms.get_mut(name) {
            Some(histogram) => histogram.record(value),
            None => {
                let mut histogram = Histogram::new();
                histogram.record(value);
                recorded.histograms.insert(name.to_owned(), histogram);
            }
        }
    }

    /// What was recorded.
    pub fn into_inner(self) -> UserMetrics {
        self.recorded
            .into_inner()
            .unwrap_or_else(|p| p.into_inner())
    }
}

/// Why an operation failed; the message reaches `batchctl results` as the operation's error.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct OpError(pub String);

impl OpError {
    pub fn new(message: impl Into<String>) -> Self {
        Self(message.into())
    }
}

/// An operation that workers offer under [`Operation::name`].
#[async_trait]
pub trait Operation: Send + Sync + 'static {
    /// The name JobSpecs use in `operation`.
    fn name(&self) -> &str;

    /// Runs the operation on one item. The result is kept when the job collects results.
    async fn run(&self, input: OpInput<'_>) -> Result<Value, OpError>;

    /// Runs the operation on one item at once, when it can without waiting for anything
    /// (CPU-bound work); `None` means it must be awaited through [`Operation::run`], which
    /// the runner then calls. Worth implementing for operations of a microsecond or so: it
    /// spares them the boxed future of every `run` call. It must agree with `run`.
    fn run_now(&self, _input: OpInput<'_>) -> Option<Result<Value, OpError>> {
        None
    }
}

/// The operations one worker offers, by name.
#[derive(Clone, Default)]
pub struct Registry {
    operations: BTreeMap<String, Arc<dyn Operation>>,
    /// Whether the built-in `exec` joins the operations once [`crate::run`] knows which
    /// programs it may run (`BATCHQ_EXEC_ALLOW`); without that setting it is not offered.
    builtin_exec: bool,
}

impl Registry {
    pub fn new() -> Self {
        Self::default()
    }

    /// The built-in operations `noop`, `sleep` and `sha256`, and `exec` when the worker is
    /// given an allow-list.
    pub fn with_builtins() -> Self {
        let mut registry = Self::new();
        crate::builtin::register(&mut registry);
        registry.builtin_exec = true;
        registry
    }

    /// Adds (or replaces) an operation under its name. An operation of one's own named
    /// `exec` replaces the built-in one, allow-list and all.
    pub fn register(&mut self, operation: impl Operation) -> &mut Self {
        if operation.name() == EXEC {
            self.builtin_exec = false;
        }
        self.operations
            .insert(operation.name().to_owned(), Arc::new(operation));
        self
    }

    pub fn get(&self, name: &str) -> Option<Arc<dyn Operation>> {
        self.operations.get(name).cloned()
    }

    pub fn names(&self) -> Vec<String> {
        self.operations.keys().cloned().collect()
    }

    /// Adds the built-in `exec`, allowed to run `allowed`, when this registry asked for the
    /// built-ins. `None` leaves `exec` out. Returns whether `exec` is now offered as a
    /// built-in.
    pub fn allow_exec(&mut self, allowed: Option<ExecAllowList>) -> bool {
        match allowed {
            Some(allowed) if self.builtin_exec => {
                self.operations
                    .insert(EXEC.to_owned(), Arc::new(Exec::new(allowed)));
                true
            }
            _ => false,
        }
    }

    /// Whether the built-in `exec` would be offered, given an allow-list.
    pub fn wants_builtin_exec(&self) -> bool {
        self.builtin_exec
    }

    /// Keeps only `names`, failing on a name this registry does not have.
    pub fn restrict(&self, names: &[String]) -> Result<Self, String> {
        let mut restricted = Self::new();
        for name in names {
            let op = self.get(name).ok_or_else(|| {
                format!(
                    "operation {name:?} is not available; this worker has: {}",
                    self.names().join(", ")
                )
            })?;
            restricted.operations.insert(name.clone(), op);
        }
        Ok(restricted)
    }
}

/// The name of the built-in operation that runs programs.
pub const EXEC: &str = "exec";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exec_is_offered_only_with_an_allow_list() {
        let mut registry = Registry::with_builtins();
        assert_eq!(registry.names(), ["noop", "sha256", "sleep"]);
        assert!(!registry.allow_exec(None));
        assert_eq!(registry.names(), ["noop", "sha256", "sleep"]);
        let allowed = ExecAllowList::resolve(&["sh".to_owned()]).expect("sh on PATH");
        assert!(registry.allow_exec(Some(allowed.clone())));
        assert_eq!(registry.names(), ["exec", "noop", "sha256", "sleep"]);

        // A registry that did not ask for the built-ins gets no `exec` from the setting.
        let mut own = Registry::new();
        assert!(!own.allow_exec(Some(allowed)));
        assert!(own.names().is_empty());
    }
}
