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
///
/// `?` turns any error into one: everything that converts into an `anyhow::Error` (every
/// `std::error::Error + Send + Sync + 'static`, such as `std::io::Error`, and
/// `anyhow::Error` itself), its message followed by its causes (`reading x.png: No such
/// file`). Such an error, like [`OpError::new`], is retried: the operation runs again
/// until the job's `max_attempts`. One made [`OpError::permanent`] fails the operation at
/// once, whatever attempt it was, for a failure no retry can mend (a malformed item).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpError {
    message: String,
    permanent: bool,
}

impl OpError {
    /// A failure worth retrying (a timeout, a service away).
    pub fn new(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            permanent: false,
        }
    }

    /// A failure no retry can mend: the operation fails now, on any attempt.
    pub fn permanent(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            permanent: true,
        }
    }

    /// The same error, made permanent (`OpError::from(e).into_permanent()`).
    pub fn into_permanent(mut self) -> Self {
        self.permanent = true;
        self
    }

    /// Whether the failure is final at once (see [`OpError::permanent`]).
    pub fn is_permanent(&self) -> bool {
        self.permanent
    }

    /// The error as `batchctl results` shows it.
    pub fn message(&self) -> &str {
        &self.message
    }
}

impl std::fmt::Display for OpError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

// `OpError` is deliberately not a `std::error::Error`: that is what lets this conversion
// take every error (as `anyhow::Error` does), instead of conflicting with `From<T> for T`.
impl<E: Into<anyhow::Error>> From<E> for OpError {
    fn from(error: E) -> Self {
        Self::new(format!("{:#}", error.into()))
    }
}

/// [`OpError::permanent`] for a `Result`: `std::fs::read(path).permanent()?` fails the
/// operation at once when the read fails.
pub trait PermanentExt<T> {
    /// The result, its error (converted as `?` would) made permanent.
    fn permanent(self) -> Result<T, OpError>;
}

impl<T, E: Into<OpError>> PermanentExt<T> for Result<T, E> {
    fn permanent(self) -> Result<T, OpError> {
        self.map_err(|e| e.into().into_permanent())
    }
}

/// Where one operation of a typed function runs (see [`Registry::register_fn_with_context`]):
/// its job, its item's index, and which attempt at it this is.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct OpContext {
    /// The job's id.
    pub job_id: String,
    /// The item's index in its job.
    pub index: u64,
    /// 1 for the first attempt at this operation; at most the job's `max_attempts`.
    pub attempt: u32,
}

impl OpContext {
    /// The context of `input`.
    pub fn of(input: &OpInput<'_>) -> Self {
        Self {
            job_id: input.job_id.to_owned(),
            index: input.index,
            attempt: input.attempt,
        }
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
    /// An item or params that do not fit the type fail that operation only, at once (no
    /// retry mends them), with an error naming the field (`item.size: invalid type: string
    /// "x", expected u32`). Inside `f`, `?` works on any error (see [`OpError`]). For the
    /// job id, index and attempt, use [`Registry::register_fn_with_context`]; for an
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
    ///         return Err(OpError::permanent("width 0"));
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
            f: Plain(f),
            types: std::marker::PhantomData,
        })
    }

    /// [`Registry::register_fn`] of a function that also takes the operation's
    /// [`OpContext`]: its job id, index and attempt.
    ///
    /// ```
    /// # use batchq_worker::{OpContext, OpError, PermanentExt, Registry, Value};
    /// let mut registry = Registry::new();
    /// registry.register_fn_with_context(
    ///     "line",
    ///     |path: String, _params: Value, ctx: OpContext| async move {
    ///         let text = std::fs::read_to_string(&path).permanent()?;
    ///         let line = text.lines().nth(ctx.index as usize);
    ///         let line = line.ok_or_else(|| OpError::permanent(format!("{path} is short")))?;
    ///         Ok(format!("{}#{} (attempt {}): {line}", ctx.job_id, ctx.index, ctx.attempt))
    ///     },
    /// );
    /// ```
    pub fn register_fn_with_context<I, P, R, F, Fut>(&mut self, name: &str, f: F) -> &mut Self
    where
        I: serde::de::DeserializeOwned + Send + 'static,
        P: serde::de::DeserializeOwned + Send + 'static,
        R: serde::Serialize + 'static,
        F: Fn(I, P, OpContext) -> Fut + Send + Sync + 'static,
        Fut: std::future::Future<Output = Result<R, OpError>> + Send + 'static,
    {
        self.register(TypedOperation {
            name: name.to_owned(),
            f: WithContext(f),
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

/// An async function registered with [`Registry::register_fn`] or
/// [`Registry::register_fn_with_context`].
struct TypedOperation<F, I, P> {
    name: String,
    f: F,
    types: std::marker::PhantomData<fn(I, P)>,
}

/// A function of the item and the params.
struct Plain<F>(F);

/// A function of the item, the params and the [`OpContext`].
struct WithContext<F>(F);

/// How a [`TypedOperation`] calls its function.
trait TypedFn<I, P>: Send + Sync + 'static {
    type Output: serde::Serialize;
    type Future: std::future::Future<Output = Result<Self::Output, OpError>> + Send + 'static;
    fn call(&self, item: I, params: P, input: &OpInput<'_>) -> Self::Future;
}

impl<I, P, R, F, Fut> TypedFn<I, P> for Plain<F>
where
    R: serde::Serialize,
    F: Fn(I, P) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = Result<R, OpError>> + Send + 'static,
{
    type Output = R;
    type Future = Fut;
    fn call(&self, item: I, params: P, _input: &OpInput<'_>) -> Fut {
        (self.0)(item, params)
    }
}

impl<I, P, R, F, Fut> TypedFn<I, P> for WithContext<F>
where
    R: serde::Serialize,
    F: Fn(I, P, OpContext) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = Result<R, OpError>> + Send + 'static,
{
    type Output = R;
    type Future = Fut;
    fn call(&self, item: I, params: P, input: &OpInput<'_>) -> Fut {
        (self.0)(item, params, OpContext::of(input))
    }
}

/// `value` (a `&Value`, or the params' `&Map`, read in place) as a `T`, or a permanent error
/// naming where it does not fit (`what.field: …`): the same value never fits better.
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
        OpError::permanent(format!("{at}: {}", e.into_inner()))
    })
}

#[async_trait]
impl<F, I, P> Operation for TypedOperation<F, I, P>
where
    I: serde::de::DeserializeOwned + Send + 'static,
    P: serde::de::DeserializeOwned + Send + 'static,
    F: TypedFn<I, P>,
{
    fn name(&self) -> &str {
        &self.name
    }

    async fn run(&self, input: OpInput<'_>) -> Result<Value, OpError> {
        let item: I = typed("item", input.item)?;
        let params: P = typed("params", input.params)?;
        let result = self.f.call(item, params, &input).await?;
        serde_json::to_value(result)
            .map_err(|e| OpError::permanent(format!("the result cannot be written as JSON: {e}")))
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
            Err(OpError::permanent(
                "item.times: invalid type: string \"2\", expected u32"
            ))
        );
        assert_eq!(
            run(serde_json::json!("ann"), params.clone()).await,
            Err(OpError::permanent(
                "item: invalid type: string \"ann\", expected struct Item"
            ))
        );
        assert_eq!(
            run(serde_json::json!({"name": "ann", "times": 1}), Map::new()).await,
            Err(OpError::permanent("params: missing field `greeting`"))
        );
    }

    /// Runs `operation` on `item` (no params) as attempt `attempt` of index `index`.
    async fn run_one(
        operation: &Arc<dyn Operation>,
        item: Value,
        index: u64,
        attempt: u32,
    ) -> Result<Value, OpError> {
        let metrics = OpMetrics::default();
        let params = Map::new();
        operation
            .run(OpInput {
                job_id: "job-7",
                index,
                item: &item,
                params: &params,
                attempt,
                metrics: &metrics,
            })
            .await
    }

    #[tokio::test]
    async fn question_mark_takes_any_error_and_keeps_its_causes() {
        let mut registry = Registry::new();
        registry.register_fn("read", |path: String, _params: Value| async move {
            let text = std::fs::read_to_string(&path)?;
            Ok(text.len())
        });
        registry.register_fn("anyhow", |n: u32, _params: Value| async move {
            use anyhow::Context;
            let parsed: Result<u32, anyhow::Error> = if n == 0 {
                Err(anyhow::anyhow!("zero")).context("checking n")
            } else {
                Ok(n)
            };
            Ok(parsed? * 2)
        });
        let read = registry.get("read").expect("registered");
        let error = run_one(&read, Value::from("/no/such/file"), 0, 1)
            .await
            .expect_err("no such file");
        assert!(error.message().contains("No such file"), "{error}");
        assert!(!error.is_permanent(), "an error from `?` is retried");

        let doubled = registry.get("anyhow").expect("registered");
        assert_eq!(
            run_one(&doubled, Value::from(4), 0, 1).await,
            Ok(Value::from(8))
        );
        let error = run_one(&doubled, Value::from(0), 0, 1)
            .await
            .expect_err("zero");
        assert_eq!(error, OpError::new("checking n: zero"), "the cause follows");
    }

    #[tokio::test]
    async fn a_permanent_error_says_so_and_a_misfit_is_permanent() {
        let mut registry = Registry::new();
        registry.register_fn("check", |n: i64, _params: Value| async move {
            if n < 0 {
                return Err(OpError::permanent(format!("{n} is negative")));
            }
            let small: u8 = u8::try_from(n).permanent()?;
            Ok(small)
        });
        let check = registry.get("check").expect("registered");
        let negative = run_one(&check, Value::from(-1), 0, 1).await;
        assert_eq!(negative, Err(OpError::permanent("-1 is negative")));
        let large = run_one(&check, Value::from(300), 0, 1)
            .await
            .expect_err("too large");
        assert!(large.is_permanent(), "{large}");
        assert!(large.message().contains("out of range"), "{large}");
        let misfit = run_one(&check, Value::from("x"), 0, 1)
            .await
            .expect_err("a string");
        assert!(misfit.is_permanent(), "{misfit}");
        assert!(OpError::new("later").into_permanent().is_permanent());
    }

    #[tokio::test]
    async fn a_function_with_context_reads_its_job_index_and_attempt() {
        let mut registry = Registry::new();
        registry.register_fn_with_context(
            "where",
            |item: String, _params: Value, ctx: OpContext| async move {
                Ok(format!(
                    "{item} of {} at {} try {}",
                    ctx.job_id, ctx.index, ctx.attempt
                ))
            },
        );
        let at = registry.get("where").expect("registered");
        assert_eq!(
            run_one(&at, Value::from("x"), 41, 3).await,
            Ok(Value::from("x of job-7 at 41 try 3"))
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
