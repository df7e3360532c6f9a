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

    /// Registers the async function `f` as operation `name`: each operation's item is
    /// deserialized into `I` and the job's `params` into `P` (serde; use `serde_json::Value`
    /// for either to take it as it is), and what `f` returns becomes the operation's result.
    /// An item or params that do not fit the type fail that operation only, with an error
    /// naming the field (`item.size: invalid type: string "x", expected u32`). For an
    /// operation that records metrics of its own or never waits, implement [`Operation`].
    ///
    /// ```
    /// # use serde::Deserialize;
    /// # use batchq_worker::{OpError, Registry};
    /// #[derive(Deserialize)]
    /// struct Resize { url: String, width: u32 }
    /// #[derive(Deserialize)]
    /// struct Quality { jpeg_quality: u8 }
    ///
    /// let mut registry = Registry::with_builtins();
    /// registry.register_fn("resize", |item: Resize, params: Quality| async move {
    ///     if item.width == 0 {
    ///         return Err(OpError::new("width 0"));
    ///     }
    ///     Ok(format!("{}@{}w q{}", item.url, item.width, params.jpeg_quality))
    /// });
    /// ```
    pub fn register_fn<I, P, R, F, Fut>(&mut self, name: &str, f: F) -> &mut Self
    where
        I: serde::de::DeserializeOwned + Send + 'static,
        P: serde::de::DeserializeOwned + Send + 'static,
        R: serde::Serialize + 'static,
        F: Fn(I, P) -> Fut + Send + Sync + 'static,
        Fut: std::future::Future<Output = Result<R, OpError>> + Send + 'static,
    {
        self.register(TypedOperation {
            name: name.to_owned(),
            f,
            types: std::marker::PhantomData,
        })
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

/// An async function registered with [`Registry::register_fn`].
struct TypedOperation<F, I, P> {
    name: String,
    f: F,
    types: std::marker::PhantomData<fn(I, P)>,
}

/// `value` (a `&Value`, or the params' `&Map`, read in place) as a `T`, or an error naming
/// where it does not fit (`what.field: …`).
fn typed<'de, T, D>(what: &str, value: D) -> Result<T, OpError>
where
    T: serde::Deserialize<'de>,
    D: serde::Deserializer<'de, Error = serde_json::Error>,
{
    serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        let at = if path == "." {
            what.to_owned()
        } else {
            format!("{what}.{path}")
        };
        OpError(format!("{at}: {}", e.into_inner()))
    })
}

#[async_trait]
impl<F, I, P, R, Fut> Operation for TypedOperation<F, I, P>
where
    I: serde::de::DeserializeOwned + Send + 'static,
    P: serde::de::DeserializeOwned + Send + 'static,
    R: serde::Serialize + 'static,
    F: Fn(I, P) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = Result<R, OpError>> + Send + 'static,
{
    fn name(&self) -> &str {
        &self.name
    }

    async fn run(&self, input: OpInput<'_>) -> Result<Value, OpError> {
        let item: I = typed("item", input.item)?;
        let params: P = typed("params", input.params)?;
        let result = (self.f)(item, params).await?;
        serde_json::to_value(result)
            .map_err(|e| OpError(format!("the result cannot be written as JSON: {e}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, serde::Deserialize)]
    struct Item {
        name: String,
        times: u32,
    }

    #[derive(Debug, serde::Deserialize)]
    struct Params {
        greeting: String,
    }

    #[tokio::test]
    async fn a_typed_function_gets_its_own_types_and_a_misfit_names_the_field() {
        let mut registry = Registry::new();
        registry.register_fn("greet", |item: Item, params: Params| async move {
            if item.times == 0 {
                return Err(OpError::new("nobody to greet zero times"));
            }
            Ok(vec![
                format!("{} {}", params.greeting, item.name);
                item.times as usize
            ])
        });
        let greet = registry.get("greet").expect("registered");
        let metrics = OpMetrics::default();
        let params = serde_json::json!({"greeting": "hello"});
        let params = params.as_object().expect("an object");
        let run = |item: Value, params: Map<String, Value>| {
            let greet = Arc::clone(&greet);
            let metrics = &metrics;
            async move {
                greet
                    .run(OpInput {
                        job_id: "j",
                        index: 0,
                        item: &item,
                        params: &params,
                        attempt: 1,
                        metrics,
                    })
                    .await
            }
        };
        assert_eq!(
            run(
                serde_json::json!({"name": "ann", "times": 2}),
                params.clone()
            )
            .await,
            Ok(serde_json::json!(["hello ann", "hello ann"]))
        );
        assert_eq!(
            run(
                serde_json::json!({"name": "ann", "times": 0}),
                params.clone()
            )
            .await,
            Err(OpError::new("nobody to greet zero times"))
        );
        assert_eq!(
            run(
                serde_json::json!({"name": "ann", "times": "2"}),
                params.clone()
            )
            .await,
            Err(OpError::new(
                "item.times: invalid type: string \"2\", expected u32"
            ))
        );
        assert_eq!(
            run(serde_json::json!("ann"), params.clone()).await,
            Err(OpError::new(
                "item: invalid type: string \"ann\", expected struct Item"
            ))
        );
        assert_eq!(
            run(serde_json::json!({"name": "ann", "times": 1}), Map::new()).await,
            Err(OpError::new("params: missing field `greeting`"))
        );
    }

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
