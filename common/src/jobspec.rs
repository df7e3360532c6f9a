//! The JobSpec of the public contract: parsing and validation.
//!
//! Every way a message can be wrong ends in a [`Rejection`] whose `error` names the field and the
//! problem, so the user can fix the job without reading batchq's logs.

use serde::Deserialize;
use serde_json::{Map, Value};

pub const DEFAULT_MAX_CONCURRENT_FRAGMENTS: u32 = 16;
pub const DEFAULT_LIFESPAN_MS: u64 = 60_000;
pub const DEFAULT_MAX_ATTEMPTS: u32 = 3;
pub const MIN_LIFESPAN_MS: u64 = 100;
/// Upper bounds that the contract leaves open; they keep one fragment message and one job's
/// bookkeeping within sane sizes.
pub const MAX_FRAGMENT_SIZE: u64 = 1_000_000;
pub const MAX_CONCURRENT_FRAGMENTS: u64 = 100_000;
pub const MAX_LIFESPAN_MS: u64 = 24 * 3600 * 1000;
pub const MAX_ATTEMPTS: u64 = 100;
pub const MAX_ID_LEN: usize = 128;
/// RabbitMQ's default `consumer_timeout` (30 minutes).
pub const DEFAULT_CONSUMER_TIMEOUT_MS: u64 = 1_800_000;
/// Most levels of arrays and objects inside one item or one `params` value. Items and params
/// travel again inside fragment messages, a few levels deeper than in the JobSpec; this bound
/// keeps every such message far inside serde_json's recursion limit (127 levels), so a job the
/// splitter accepts can never become a fragment that a worker cannot read.
pub const MAX_VALUE_DEPTH: usize = 64;
/// serde_json's recursion limit: deeper bodies fail to parse (with an error, not a crash).
const JSON_MAX_DEPTH: usize = 127;
/// Most operations in one job: 2^53 − 1, the largest integer an IEEE double holds exactly.
/// JavaScript and many other JSON clients read every number as a double, so a larger
/// `ops_total` (or any count that may reach it) would arrive rounded.
pub const MAX_OPS_TOTAL: u64 = (1 << 53) - 1;

/// What a job runs over: explicit items, or the integers of a range.
#[derive(Debug, Clone, PartialEq)]
pub enum JobInput {
    Items(Vec<Value>),
    Range { start: i64, end: i64 },
}

/// A validated job, with every default filled in. Only [`parse_job_spec`] makes one, so its
/// operation count is always within [`MAX_OPS_TOTAL`].
#[derive(Debug, Clone, PartialEq)]
pub struct JobSpec {
    pub job_id: String,
    pub operation: String,
    pub params: Map<String, Value>,
    pub input: JobInput,
    /// Operations in the job, counted once at validation: every count batchq keeps and
    /// publishes for the job derives from this one figure.
    ops_total: u64,
    /// `None`: batchq chooses the size.
    pub fragment_size: Option<u32>,
    /// Most fragments of this job that may be out at once. Holding only this window in the
    /// work queue is what lets a small job overtake a huge one submitted before it.
    pub max_concurrent_fragments: u32,
    pub lifespan_ms: u64,
    pub max_attempts: u32,
    pub tolerated_failure_percent: f64,
    pub collect_results: bool,
}

/// Largest `params`, as JSON, that [`JobSpec::summary`] keeps whole.
pub const SUMMARY_MAX_PARAMS_BYTES: usize = 16 * 1024;

impl JobSpec {
    /// Number of operations in the job, at most [`MAX_OPS_TOTAL`].
    pub fn ops_total(&self) -> u64 {
        self.ops_total
    }

    /// The job as validated, every default filled in, for people to read (the console's job
    /// page): `items` become their count, and `params` larger than
    /// [`SUMMARY_MAX_PARAMS_BYTES`] become a note of their size, so the summary stays small
    /// whatever the job holds.
    pub fn summary(&self) -> Value {
        let params = Value::Object(self.params.clone());
        let params_bytes = serde_json::to_vec(&params).map_or(0, |b| b.len());
        let params = if params_bytes > SUMMARY_MAX_PARAMS_BYTES {
            Value::String(format!("({params_bytes} bytes of JSON, not kept)"))
        } else {
            params
        };
        let mut summary = serde_json::json!({
            "operation": self.operation,
            "params": params,
            "fragment_size": self.fragment_size,
            "max_concurrent_fragments": self.max_concurrent_fragments,
            "lifespan_ms": self.lifespan_ms,
            "max_attempts": self.max_attempts,
            "tolerated_failure_percent": self.tolerated_failure_percent,
            "collect_results": self.collect_results,
        });
        let input = match &self.input {
            JobInput::Items(items) => ("items", serde_json::json!({ "count": items.len() })),
            JobInput::Range { start, end } => {
                ("range", serde_json::json!({ "start": start, "end": end }))
            }
        };
        if let Some(object) = summary.as_object_mut() {
            object.insert(input.0.to_owned(), input.1);
        }
        summary
    }
}

/// Why a message is not a job, and the id its `rejected` status is published under.
#[derive(Debug, Clone, PartialEq)]
pub struct Rejection {
    pub job_id: String,
    pub error: String,
}

/// Limits that come from the deployment rather than from the contract.
#[derive(Debug, Clone, Copy)]
pub struct ParseLimits {
    /// Largest message body accepted, checked before the body is parsed.
    pub max_message_bytes: usize,
    /// The broker's `consumer_timeout` in milliseconds, 0 when it is disabled on the broker.
    /// It bounds `lifespan_ms`: see [`ParseLimits::max_lifespan_ms`].
    pub consumer_timeout_ms: u64,
}

impl Default for ParseLimits {
    fn default() -> Self {
        Self {
            max_message_bytes: 16 * 1024 * 1024,
            consumer_timeout_ms: DEFAULT_CONSUMER_TIMEOUT_MS,
        }
    }
}

impl ParseLimits {
    /// Longest `lifespan_ms` a job may ask for: a third of the broker's `consumer_timeout`
    /// (at most [`MAX_LIFESPAN_MS`]; only that when the timeout is disabled).
    ///
    /// RabbitMQ closes a worker's channel, and requeues everything it held, when a delivery
    /// stays unacknowledged longer than `consumer_timeout`. A fragment's clock starts when the
    /// broker delivers it, not when the worker starts it, and stops at the ack, which follows
    /// the fragment's confirmed report. In between, in the worst case:
    ///
    /// 1. it waits in the worker's prefetch buffer until a fragment ahead of it finishes, which
    ///    takes up to one lifespan plus that fragment's last operation;
    /// 2. it runs for one lifespan, and then to the end of the operation in hand, because a
    ///    fragment stops only at an operation boundary;
    /// 3. the worker publishes its report, awaits the confirm and acks.
    ///
    /// That is two lifespans plus two operations' overrun plus a round trip. Half the timeout
    /// would leave no room at all for the overruns; a third leaves a third of the timeout
    /// (10 minutes at RabbitMQ's default of 30) for them. So a job is safe as long as a
    /// single operation takes less than about a sixth of `consumer_timeout`, and a fragment
    /// waits behind at most one round of fragments in a worker's buffer (true when a worker
    /// holds no more than twice as many fragments as it runs at once).
    pub fn max_lifespan_ms(&self) -> u64 {
        match self.consumer_timeout_ms {
            0 => MAX_LIFESPAN_MS,
            timeout => (timeout / 3).min(MAX_LIFESPAN_MS),
        }
    }

    /// The lifespan of a job that gives none: the contract's default, lowered to what the
    /// broker's `consumer_timeout` allows (never below [`MIN_LIFESPAN_MS`]).
    pub fn default_lifespan_ms(&self) -> u64 {
        DEFAULT_LIFESPAN_MS
            .min(self.max_lifespan_ms())
            .max(MIN_LIFESPAN_MS)
    }
}

/// The JobSpec as written, before defaults and bounds.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawJobSpec {
    // Checked before this struct is built; listed so `deny_unknown_fields` accepts it.
    #[serde(rename = "job_id")]
    _job_id: Option<serde::de::IgnoredAny>,
    operation: Option<String>,
    params: Option<Map<String, Value>>,
    items: Option<Vec<Value>>,
    range: Option<RawRange>,
    fragment_size: Option<i64>,
    max_concurrent_fragments: Option<i64>,
    lifespan_ms: Option<i64>,
    max_attempts: Option<i64>,
    tolerated_failure_percent: Option<f64>,
    collect_results: Option<bool>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRange {
    start: i64,
    end: i64,
}

/// `job_id` and `operation` become parts of queue names and routing keys.
pub fn valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= MAX_ID_LEN
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

fn check_id(field: &str, id: &str) -> Result<(), String> {
    if id.is_empty() {
        return Err(format!("{field}: must not be empty"));
    }
    if id.len() > MAX_ID_LEN {
        return Err(format!(
            "{field}: is {} characters long, at most {MAX_ID_LEN} are allowed",
            id.len()
        ));
    }
    if let Some(bad) = id
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        return Err(format!(
            "{field}: contains {bad:?}; only letters, digits, '.', '_' and '-' are allowed"
        ));
    }
    Ok(())
}

fn bounded(field: &str, value: Option<i64>, min: u64, max: u64) -> Result<Option<u64>, String> {
    match value {
        None => Ok(None),
        Some(v) if v < 0 || (v as u64) < min => {
            Err(format!("{field}: must be at least {min}, got {v}"))
        }
        Some(v) if v as u64 > max => Err(format!("{field}: must be at most {max}, got {v}")),
        Some(v) => Ok(Some(v as u64)),
    }
}

/// The id to reject a message under when it has no usable `job_id` of its own.
fn fallback_id(message_id: Option<&str>) -> String {
    match message_id {
        Some(id) if valid_id(id) => id.to_owned(),
        _ => uuid::Uuid::new_v4().to_string(),
    }
}

/// True for a missing content type and for `application/json` (parameters allowed).
pub fn is_json_content_type(content_type: Option<&str>) -> bool {
    match content_type {
        None => true,
        Some(ct) => {
            let essence = ct.split(';').next().unwrap_or("").trim();
            essence.is_empty() || essence.eq_ignore_ascii_case("application/json")
        }
    }
}

/// Parses and validates a JobSpec message body.
///
/// `message_id` is the AMQP property, used as the rejection's id when the body has no usable
/// `job_id`.
pub fn parse_job_spec(
    body: &[u8],
    content_type: Option<&str>,
    message_id: Option<&str>,
    limits: ParseLimits,
) -> Result<JobSpec, Rejection> {
    let reject = |error: String| Rejection {
        job_id: fallback_id(message_id),
        error,
    };
    if body.len() > limits.max_message_bytes {
        return Err(reject(format!(
            "message: body is {} bytes, the limit is {} bytes",
            body.len(),
            limits.max_message_bytes
        )));
    }
    if !is_json_content_type(content_type) {
        return Err(reject(format!(
            "message: content_type is {:?}, expected \"application/json\"",
            content_type.unwrap_or_default()
        )));
    }
    let text = std::str::from_utf8(body).map_err(|e| {
        reject(format!(
            "message: body is not valid UTF-8 (invalid byte at offset {})",
            e.valid_up_to()
        ))
    })?;
    let value: Value = serde_json::from_str(text).map_err(|e| reject(describe_json_error(&e)))?;
    let Value::Object(object) = value else {
        return Err(reject(format!(
            "message: body must be a JSON object, got {}",
            json_kind(&value)
        )));
    };

    // Find the id first, so that every later rejection is reported under the user's own id.
    let job_id = match object.get("job_id") {
        None => None,
        Some(Value::String(id)) => {
            if let Err(error) = check_id("job_id", id) {
                return Err(reject(error));
            }
            Some(id.clone())
        }
        Some(other) => {
            return Err(reject(format!(
                "job_id: must be a string, got {}",
                json_kind(other)
            )));
        }
    };
    // Without a `job_id` of its own, a rejected message goes under its `message_id` (contract),
    // an accepted one under a generated id.
    let rejected_as = job_id.clone().unwrap_or_else(|| fallback_id(message_id));
    let reject = |error: String| Rejection {
        job_id: rejected_as.clone(),
        error,
    };

    let raw: RawJobSpec = serde_path_to_error::deserialize(Value::Object(object))
        .map_err(|e| reject(describe_serde_error(&e)))?;
    let job_id = job_id.unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
    validate(job_id, raw, limits).map_err(reject)
}

/// serde_json's parse error; a body nested past its recursion limit gets a reason of its own,
/// since "recursion limit exceeded" alone does not tell a user what to change.
fn describe_json_error(e: &serde_json::Error) -> String {
    let message = e.to_string();
    if message.starts_with("recursion limit exceeded") {
        format!(
            "message: body nests arrays and objects more than {JSON_MAX_DEPTH} levels deep \
             (at line {}, column {}); items and params may nest at most {MAX_VALUE_DEPTH} levels",
            e.line(),
            e.column()
        )
    } else {
        format!("message: body is not valid JSON: {message}")
    }
}

/// Levels of arrays and objects in `value`; a scalar is 0, `[1]` is 1. The recursion is
/// safe: the value came from serde_json, which caps nesting at 127 levels.
fn nesting(value: &Value) -> usize {
    match value {
        Value::Array(items) => 1 + items.iter().map(nesting).max().unwrap_or(0),
        Value::Object(fields) => 1 + fields.values().map(nesting).max().unwrap_or(0),
        _ => 0,
    }
}

fn check_nesting(field: &str, value: &Value) -> Result<(), String> {
    let depth = nesting(value);
    if depth > MAX_VALUE_DEPTH {
        return Err(format!(
            "{field}: nests arrays and objects {depth} levels deep; at most {MAX_VALUE_DEPTH} \
             are allowed"
        ));
    }
    Ok(())
}

fn check_lifespan(lifespan_ms: Option<u64>, limits: ParseLimits) -> Result<u64, String> {
    let Some(lifespan_ms) = lifespan_ms else {
        return Ok(limits.default_lifespan_ms());
    };
    let max = limits.max_lifespan_ms();
    if lifespan_ms > max && limits.consumer_timeout_ms > 0 {
        return Err(format!(
            "lifespan_ms: must be at most {max} (a third of the broker's consumer_timeout of \
             {} ms), got {lifespan_ms}: a fragment may wait one lifespan in a worker's buffer \
             and then run one lifespan plus its last operation before it is acknowledged, and \
             the broker closes the worker's channel when that takes longer than consumer_timeout",
            limits.consumer_timeout_ms
        ));
    }
    Ok(lifespan_ms)
}

/// Operations of a range job: `end - start`, computed in i128 so that no pair of i64 bounds
/// overflows, and refused above [`MAX_OPS_TOTAL`].
fn range_ops_total(start: i64, end: i64) -> Result<u64, String> {
    let span = i128::from(end) - i128::from(start);
    if span < 0 {
        return Err(format!(
            "range: end ({end}) is less than start ({start}); end is exclusive and must be at least start"
        ));
    }
    u64::try_from(span)
        .ok()
        .filter(|n| *n <= MAX_OPS_TOTAL)
        .ok_or_else(|| {
            format!(
                "range: holds {span} operations (end {end} minus start {start}); at most \
                 {MAX_OPS_TOTAL} (2^53 - 1) are allowed, so that every count is exact in every \
                 JSON client"
            )
        })
}

/// Operations of an items job. A body within any sane message size limit holds far fewer
/// items than [`MAX_OPS_TOTAL`]; the bound is checked anyway, since the count is the same
/// figure as a range job's.
fn items_ops_total(items: usize) -> Result<u64, String> {
    u64::try_from(items)
        .ok()
        .filter(|n| *n <= MAX_OPS_TOTAL)
        .ok_or_else(|| {
            format!(
                "items: holds {items} items; at most {MAX_OPS_TOTAL} (2^53 - 1) are allowed, so \
                 that every count is exact in every JSON client"
            )
        })
}

fn validate(job_id: String, raw: RawJobSpec, limits: ParseLimits) -> Result<JobSpec, String> {
    let operation = raw
        .operation
        .ok_or_else(|| "operation: missing; name the operation to run".to_owned())?;
    check_id("operation", &operation)?;
    let (input, ops_total) = match (raw.items, raw.range) {
        (Some(_), Some(_)) => {
            return Err("items, range: both given; give exactly one of them".to_owned());
        }
        (None, None) => {
            return Err("items, range: neither given; give exactly one of them".to_owned());
        }
        (Some(items), None) => {
            let ops_total = items_ops_total(items.len())?;
            for (n, item) in items.iter().enumerate() {
                check_nesting(&format!("items[{n}]"), item)?;
            }
            (JobInput::Items(items), ops_total)
        }
        (None, Some(RawRange { start, end })) => {
            let ops_total = range_ops_total(start, end)?;
            (JobInput::Range { start, end }, ops_total)
        }
    };
    let fragment_size = bounded("fragment_size", raw.fragment_size, 1, MAX_FRAGMENT_SIZE)?;
    let max_concurrent_fragments = bounded(
        "max_concurrent_fragments",
        raw.max_concurrent_fragments,
        1,
        MAX_CONCURRENT_FRAGMENTS,
    )?;
    let lifespan_ms = bounded(
        "lifespan_ms",
        raw.lifespan_ms,
        MIN_LIFESPAN_MS,
        MAX_LIFESPAN_MS,
    )?;
    let lifespan_ms = check_lifespan(lifespan_ms, limits)?;
    let max_attempts = bounded("max_attempts", raw.max_attempts, 1, MAX_ATTEMPTS)?;
    let tolerated_failure_percent = raw.tolerated_failure_percent.unwrap_or(0.0);
    if !(0.0..=100.0).contains(&tolerated_failure_percent) {
        return Err(format!(
            "tolerated_failure_percent: must be between 0 and 100, got {tolerated_failure_percent}"
        ));
    }
    let params = raw.params.unwrap_or_default();
    for (key, value) in &params {
        check_nesting(&format!("params.{key}"), value)?;
    }
    Ok(JobSpec {
        job_id,
        operation,
        params,
        input,
        ops_total,
        fragment_size: fragment_size.map(|v| v as u32),
        max_concurrent_fragments: max_concurrent_fragments
            .map_or(DEFAULT_MAX_CONCURRENT_FRAGMENTS, |v| v as u32),
        lifespan_ms,
        max_attempts: max_attempts.map_or(DEFAULT_MAX_ATTEMPTS, |v| v as u32),
        tolerated_failure_percent,
        collect_results: raw.collect_results.unwrap_or(true),
    })
}

/// serde's message, prefixed by the path of the field it is about.
fn describe_serde_error(e: &serde_path_to_error::Error<serde_json::Error>) -> String {
    let path = e.path().to_string();
    let inner = e.inner().to_string();
    if path == "." || path.is_empty() {
        // Unknown fields are reported at the top level; serde names them in its message.
        inner
    } else {
        format!("{path}: {inner}")
    }
}

fn json_kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// `text(item)` of the contract: a JSON string as itself, anything else as its compact JSON
/// text with object keys in the order the JobSpec gives them.
pub fn item_text(item: &Value) -> std::borrow::Cow<'_, str> {
    match item {
        Value::String(s) => std::borrow::Cow::Borrowed(s),
        other => std::borrow::Cow::Owned(other.to_string()),
    }
}

/// Calls `f` with `text(item)`; an integer (every item of a range job) is written on the
/// stack, so an operation run millions of times allocates nothing for it.
pub fn with_item_text<R>(item: &Value, f: impl FnOnce(&str) -> R) -> R {
    if let Value::Number(n) = item {
        let mut buffer = itoa::Buffer::new();
        if let Some(i) = n.as_i64() {
            return f(buffer.format(i));
        }
        if let Some(u) = n.as_u64() {
            return f(buffer.format(u));
        }
    }
    f(&item_text(item))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(body: &str) -> Result<JobSpec, Rejection> {
        parse_job_spec(body.as_bytes(), None, None, ParseLimits::default())
    }

    fn error_of(body: &str) -> String {
        parse(body).expect_err("must be rejected").error
    }

    #[test]
    fn accepts_full_spec() {
        let spec = parse(
            r#"{"job_id":"j-1","operation":"sha256","params":{"rounds":10},
                "range":{"start":5,"end":15},"fragment_size":3,"max_concurrent_fragments":2,
                "lifespan_ms":1000,"max_attempts":4,"tolerated_failure_percent":2.5,
                "collect_results":false}"#,
        )
        .expect("valid");
        assert_eq!(spec.job_id, "j-1");
        assert_eq!(spec.input, JobInput::Range { start: 5, end: 15 });
        assert_eq!(spec.ops_total(), 10);
        assert_eq!(spec.fragment_size, Some(3));
        assert_eq!(spec.max_concurrent_fragments, 2);
        assert_eq!(spec.lifespan_ms, 1000);
        assert_eq!(spec.max_attempts, 4);
        assert!(!spec.collect_results);
    }

    #[test]
    fn summary_counts_items_and_leaves_out_huge_params() {
        let spec =
            parse(r#"{"operation":"noop","items":[1,2,3],"params":{"n":1}}"#).expect("valid");
        let summary = spec.summary();
        assert_eq!(summary["items"], serde_json::json!({"count": 3}));
        assert_eq!(summary["params"], serde_json::json!({"n": 1}));
        assert_eq!(summary["max_concurrent_fragments"], 16);
        assert_eq!(summary["lifespan_ms"], 60_000);
        assert_eq!(summary["max_attempts"], 3);
        assert_eq!(summary["fragment_size"], Value::Null);

        let big = "x".repeat(SUMMARY_MAX_PARAMS_BYTES);
        let body = format!(
            r#"{{"operation":"noop","range":{{"start":0,"end":2}},"params":{{"blob":"{big}"}}}}"#
        );
        let summary = parse(&body).expect("valid").summary();
        assert_eq!(summary["range"], serde_json::json!({"start": 0, "end": 2}));
        let note = summary["params"].as_str().expect("a note, not the params");
        assert!(
            note.contains(&format!("{} bytes", SUMMARY_MAX_PARAMS_BYTES + 11)),
            "{note}"
        );
    }

    #[test]
    fn fills_defaults() {
        let spec = parse(r#"{"operation":"noop","items":[1,2]}"#).expect("valid");
        assert_eq!(spec.job_id.len(), 36, "a UUID is generated");
        assert_eq!(spec.max_concurrent_fragments, 16);
        assert_eq!(spec.lifespan_ms, 60_000);
        assert_eq!(spec.max_attempts, 3);
        assert_eq!(spec.tolerated_failure_percent, 0.0);
        assert!(spec.collect_results);
        assert_eq!(spec.fragment_size, None);
    }

    #[test]
    fn names_the_field_of_each_problem() {
        let cases = [
            (r#"{"operation":"noop","items":[],"colour":1}"#, "colour"),
            (
                r#"{"operation":"noop","items":[],"fragment_size":"x"}"#,
                "fragment_size",
            ),
            (r#"{"items":[]}"#, "operation"),
            (
                r#"{"operation":"noop","items":[],"range":{"start":0,"end":1}}"#,
                "both",
            ),
            (r#"{"operation":"noop"}"#, "neither"),
            (
                r#"{"operation":"noop","range":{"start":5,"end":1}}"#,
                "range: end",
            ),
            (
                r#"{"operation":"noop","items":[],"fragment_size":0}"#,
                "fragment_size: must be at least 1",
            ),
            (
                r#"{"operation":"noop","items":[],"max_concurrent_fragments":-3}"#,
                "max_concurrent_fragments",
            ),
            (
                r#"{"operation":"noop","items":[],"lifespan_ms":99}"#,
                "lifespan_ms",
            ),
            (
                r#"{"operation":"noop","items":[],"max_attempts":0}"#,
                "max_attempts",
            ),
            (
                r#"{"operation":"noop","items":[],"tolerated_failure_percent":101}"#,
                "tolerated_failure_percent",
            ),
            (
                r#"{"operation":"noop","items":[],"job_id":"a b"}"#,
                "job_id",
            ),
            (r#"{"operation":"noop","items":{}}"#, "items"),
            (r#"{"operation":"noop","range":{"start":0}}"#, "range"),
            (
                r#"{"operation":"noop","items":[],"collect_results":"yes"}"#,
                "collect_results",
            ),
        ];
        for (body, expected) in cases {
            let error = error_of(body);
            assert!(
                error.contains(expected),
                "{body}: {error:?} should mention {expected:?}"
            );
        }
        let long_id = format!(
            r#"{{"operation":"noop","items":[],"job_id":"{}"}}"#,
            "a".repeat(129)
        );
        assert!(error_of(&long_id).contains("at most 128"));
    }

    #[test]
    fn rejects_bad_messages_under_a_usable_id() {
        let bad_utf8 = parse_job_spec(
            b"{\"a\":\"\xff\"}",
            None,
            Some("msg-7"),
            ParseLimits::default(),
        )
        .expect_err("not UTF-8");
        assert_eq!(bad_utf8.job_id, "msg-7");
        assert!(bad_utf8.error.contains("UTF-8"));
        assert!(error_of("not json").contains("not valid JSON"));
        assert!(error_of("[1,2]").contains("JSON object, got an array"));
        let known = parse(r#"{"job_id":"mine","operation":"noop"}"#).expect_err("no input");
        assert_eq!(known.job_id, "mine");
        // An object without a job_id is rejected under the message_id too.
        let no_id = parse_job_spec(
            br#"{"operation":"noop"}"#,
            None,
            Some("msg-8"),
            ParseLimits::default(),
        )
        .expect_err("no input");
        assert_eq!(no_id.job_id, "msg-8");
        let spec = parse_job_spec(
            br#"{"operation":"noop","items":[]}"#,
            None,
            Some("msg-9"),
            ParseLimits::default(),
        )
        .expect("valid");
        assert_eq!(
            spec.job_id.len(),
            36,
            "an accepted job without job_id gets a UUID"
        );
        let typed = parse_job_spec(b"{}", Some("text/plain"), None, ParseLimits::default())
            .expect_err("content type");
        assert!(typed.error.contains("content_type"));
        let big = parse_job_spec(
            b"{}",
            None,
            None,
            ParseLimits {
                max_message_bytes: 1,
                ..ParseLimits::default()
            },
        )
        .expect_err("too big");
        assert!(big.error.contains("limit"));
    }

    fn range_job(start: i64, end: i64) -> String {
        format!(r#"{{"operation":"noop","range":{{"start":{start},"end":{end}}}}}"#)
    }

    #[test]
    fn a_job_holds_at_most_2_pow_53_minus_1_operations() {
        assert_eq!(MAX_OPS_TOTAL, 9_007_199_254_740_991);
        let max = MAX_OPS_TOTAL as i64;
        // Exactly at the limit, wherever the range lies, including at both ends of i64.
        for (start, end) in [
            (0, max),
            (-(1 << 52), (1 << 52) - 1),
            (i64::MIN, i64::MIN + max),
            (i64::MAX - max, i64::MAX),
        ] {
            let spec = parse(&range_job(start, end)).expect("at the limit");
            assert_eq!(spec.ops_total(), MAX_OPS_TOTAL, "{start}..{end}");
            assert_eq!(spec.input, JobInput::Range { start, end });
        }
        // One more operation is refused, with the count, the limit and the reason.
        let error = error_of(&range_job(0, max + 1));
        assert_eq!(
            error,
            "range: holds 9007199254740992 operations (end 9007199254740992 minus start 0); \
             at most 9007199254740991 (2^53 - 1) are allowed, so that every count is exact in \
             every JSON client"
        );
        assert!(error_of(&range_job(-1, max)).starts_with("range: holds 9007199254740992 "));
    }

    #[test]
    fn i64_extremes_are_refused_without_overflow() {
        let cases = [
            (i64::MIN, i64::MAX, "18446744073709551615"),
            (i64::MIN, 0, "9223372036854775808"),
            (0, i64::MAX, "9223372036854775807"),
            (i64::MIN, -1, "9223372036854775807"),
            (-1, i64::MAX, "9223372036854775808"),
        ];
        for (start, end, count) in cases {
            let error = error_of(&range_job(start, end));
            assert!(
                error.starts_with(&format!("range: holds {count} operations")),
                "{start}..{end}: {error}"
            );
            assert!(error.contains("at most 9007199254740991"), "{error}");
        }
        // Backwards across the whole of i64: the order is wrong, not the size.
        let error = error_of(&range_job(i64::MAX, i64::MIN));
        assert!(error.starts_with("range: end (-9223372036854775808) is less than start"));
        // Empty at either end of i64.
        for bound in [i64::MIN, i64::MAX] {
            assert_eq!(
                parse(&range_job(bound, bound)).expect("empty").ops_total(),
                0
            );
        }
        // Bounds outside i64 are not integers serde can read: refused naming the field.
        let error =
            error_of(r#"{"operation":"noop","range":{"start":0,"end":9223372036854775808}}"#);
        assert!(error.starts_with("range.end: "), "{error}");
    }

    #[test]
    fn items_count_has_the_same_bound() {
        assert_eq!(items_ops_total(3), Ok(3));
        assert_eq!(items_ops_total(MAX_OPS_TOTAL as usize), Ok(MAX_OPS_TOTAL));
        let error = items_ops_total(MAX_OPS_TOTAL as usize + 1).expect_err("over the limit");
        assert!(
            error.starts_with("items: holds 9007199254740992 items; at most 9007199254740991"),
            "{error}"
        );
        let spec = parse(r#"{"operation":"noop","items":["a",{"b":1},3]}"#).expect("valid");
        assert_eq!(spec.ops_total(), 3);
    }

    fn with_timeout(consumer_timeout_ms: u64) -> ParseLimits {
        ParseLimits {
            consumer_timeout_ms,
            ..ParseLimits::default()
        }
    }

    fn parse_with(body: &str, limits: ParseLimits) -> Result<JobSpec, Rejection> {
        parse_job_spec(body.as_bytes(), None, None, limits)
    }

    fn lifespan_job(lifespan_ms: u64) -> String {
        format!(r#"{{"operation":"noop","items":[1],"lifespan_ms":{lifespan_ms}}}"#)
    }

    #[test]
    fn lifespan_limit_is_a_third_of_consumer_timeout() {
        assert_eq!(ParseLimits::default().consumer_timeout_ms, 1_800_000);
        assert_eq!(ParseLimits::default().max_lifespan_ms(), 600_000);
        assert_eq!(with_timeout(90_000).max_lifespan_ms(), 30_000);
        assert_eq!(with_timeout(100_000).max_lifespan_ms(), 33_333);
        // Disabled on the broker: only the contract's own ceiling.
        assert_eq!(with_timeout(0).max_lifespan_ms(), MAX_LIFESPAN_MS);
        // A huge timeout never lifts the contract's ceiling.
        assert_eq!(with_timeout(u64::MAX).max_lifespan_ms(), MAX_LIFESPAN_MS);
    }

    #[test]
    fn lifespan_at_the_limit_is_accepted_and_one_more_is_rejected() {
        let limits = with_timeout(90_000);
        let spec = parse_with(&lifespan_job(30_000), limits).expect("at the limit");
        assert_eq!(spec.lifespan_ms, 30_000);
        let error = parse_with(&lifespan_job(30_001), limits)
            .expect_err("over the limit")
            .error;
        assert!(
            error.starts_with("lifespan_ms: must be at most 30000"),
            "{error}"
        );
        assert!(error.contains("consumer_timeout of 90000 ms"), "{error}");
        assert!(error.contains("got 30001"), "{error}");
        assert!(error.contains("buffer"), "the error says why: {error}");

        // RabbitMQ's default timeout: 10 minutes pass, 10 minutes and 1 ms do not.
        let default = ParseLimits::default();
        assert!(parse_with(&lifespan_job(600_000), default).is_ok());
        assert!(parse_with(&lifespan_job(600_001), default).is_err());

        // Timeout disabled: up to the contract's ceiling.
        let disabled = with_timeout(0);
        assert!(parse_with(&lifespan_job(MAX_LIFESPAN_MS), disabled).is_ok());
        let error = parse_with(&lifespan_job(MAX_LIFESPAN_MS + 1), disabled)
            .expect_err("over the ceiling")
            .error;
        assert!(error.starts_with("lifespan_ms: must be at most"), "{error}");
        // The lower bound does not move.
        assert!(parse_with(&lifespan_job(99), disabled).is_err());
    }

    #[test]
    fn default_lifespan_fits_a_short_consumer_timeout() {
        let body = r#"{"operation":"noop","items":[1]}"#;
        let spec = parse_with(body, ParseLimits::default()).expect("valid");
        assert_eq!(spec.lifespan_ms, DEFAULT_LIFESPAN_MS);
        let spec = parse_with(body, with_timeout(60_000)).expect("valid");
        assert_eq!(
            spec.lifespan_ms, 20_000,
            "lowered to a third of the timeout"
        );
        let spec = parse_with(body, with_timeout(0)).expect("valid");
        assert_eq!(spec.lifespan_ms, DEFAULT_LIFESPAN_MS);
    }

    fn nested_array(depth: usize) -> String {
        format!("{}{}", "[".repeat(depth), "]".repeat(depth))
    }

    #[test]
    fn deeply_nested_body_is_rejected_without_overflowing_the_stack() {
        for depth in [128, 10_000, 1_000_000] {
            let body = format!(
                r#"{{"job_id":"deep","operation":"noop","items":[{}]}}"#,
                nested_array(depth)
            );
            let rejection = parse(&body).expect_err("too deep");
            // The id is found only once the body parses, so it is not the body's.
            assert_ne!(rejection.job_id, "deep");
            assert!(
                rejection
                    .error
                    .starts_with("message: body nests arrays and objects more than 127"),
                "{}",
                rejection.error
            );
        }
        // A bare nested array, no object at all.
        assert!(error_of(&nested_array(10_000)).contains("levels deep"));
    }

    #[test]
    fn items_and_params_nest_at_most_max_value_depth() {
        let item_job = |depth: usize| {
            format!(
                r#"{{"operation":"noop","items":[1,{}]}}"#,
                nested_array(depth)
            )
        };
        assert!(parse(&item_job(MAX_VALUE_DEPTH)).is_ok());
        let error = error_of(&item_job(MAX_VALUE_DEPTH + 1));
        assert_eq!(
            error,
            "items[1]: nests arrays and objects 65 levels deep; at most 64 are allowed"
        );
        // Under serde_json's limit but over ours: a fragment message would nest it deeper.
        assert!(error_of(&item_job(124)).starts_with("items[1]: nests"));

        let params_job = |depth: usize| {
            format!(
                r#"{{"operation":"noop","items":[1],"params":{{"a":1,"deep":{}}}}}"#,
                nested_array(depth)
            )
        };
        assert!(parse(&params_job(MAX_VALUE_DEPTH)).is_ok());
        assert!(error_of(&params_job(MAX_VALUE_DEPTH + 1)).starts_with("params.deep: nests"));
        // Objects count as levels too.
        let objects = format!(
            r#"{{"operation":"noop","items":[{}1{}]}}"#,
            r#"{"a":"#.repeat(MAX_VALUE_DEPTH + 1),
            "}".repeat(MAX_VALUE_DEPTH + 1)
        );
        assert!(error_of(&objects).starts_with("items[0]: nests"));
    }

    #[test]
    fn size_limit_is_inclusive() {
        let body = r#"{"operation":"noop","items":[1]}"#;
        let limits = |max_message_bytes| ParseLimits {
            max_message_bytes,
            ..ParseLimits::default()
        };
        assert!(parse_job_spec(body.as_bytes(), None, None, limits(body.len())).is_ok());
        let error = parse_job_spec(body.as_bytes(), None, None, limits(body.len() - 1))
            .expect_err("one byte over")
            .error;
        assert_eq!(
            error,
            format!(
                "message: body is {} bytes, the limit is {} bytes",
                body.len(),
                body.len() - 1
            )
        );
        assert_eq!(ParseLimits::default().max_message_bytes, 16 * 1024 * 1024);
    }

    #[test]
    fn content_types() {
        assert!(is_json_content_type(None));
        assert!(is_json_content_type(Some("application/json")));
        assert!(is_json_content_type(Some(
            "Application/JSON; charset=utf-8"
        )));
        for other in ["text/plain", "application/xml", "application/octet-stream"] {
            assert!(!is_json_content_type(Some(other)), "{other}");
            let error = parse_job_spec(
                br#"{"operation":"noop","items":[1]}"#,
                Some(other),
                None,
                ParseLimits::default(),
            )
            .expect_err("not JSON")
            .error;
            assert!(
                error.contains("content_type") && error.contains(other),
                "{error}"
            );
        }
    }

    #[test]
    fn item_text_keeps_key_order() {
        let item: Value = serde_json::from_str(r#"{"b": 2, "a": 1}"#).expect("json");
        assert_eq!(item_text(&item), r#"{"b":2,"a":1}"#);
        assert_eq!(item_text(&Value::from(42)), "42");
        assert_eq!(item_text(&Value::from("hi")), "hi");
        for item in [
            Value::from(42),
            Value::from(-7),
            Value::from(u64::MAX),
            Value::from(i64::MIN),
            Value::from(1.5),
            Value::from("hi"),
            serde_json::json!({"b": [1, 2]}),
        ] {
            assert_eq!(
                with_item_text(&item, str::to_owned),
                item_text(&item),
                "{item}"
            );
        }
    }
}
