//! A JobSpec checked before it is published, the way the splitter will check it
//! ([`common::jobspec::parse_job_spec`]), so a mistake is reported where it was made.

use common::jobspec::{ParseLimits, parse_job_spec};
use serde_json::Value;

use crate::ClientError;

/// A JobSpec ready to publish: its job id (given one if it had none) and its body.
#[derive(Debug, Clone, PartialEq)]
pub struct CheckedSpec {
    /// The job's id: the spec's own `job_id`, or a generated UUID.
    pub job_id: String,
    /// The JSON body to publish, `job_id` included.
    pub body: Vec<u8>,
}

/// `body` as a JobSpec to publish: given a job id if it has none, and checked for what the
/// splitter would reject ([`ClientError::SpecRejected`] names the field).
pub fn checked_spec(body: &[u8]) -> Result<CheckedSpec, ClientError> {
    let value: Value =
        serde_json::from_slice(body).map_err(|e| ClientError::SpecNotJson(e.to_string()))?;
    checked_value(value)
}

/// [`checked_spec`] of a JobSpec already parsed (a `serde_json::json!` literal).
pub fn checked_value(mut value: Value) -> Result<CheckedSpec, ClientError> {
    let Some(object) = value.as_object_mut() else {
        return Err(ClientError::SpecNotObject);
    };
    if !object.contains_key("job_id") {
        object.insert(
            "job_id".into(),
            Value::String(uuid::Uuid::new_v4().to_string()),
        );
    }
    let body = serde_json::to_vec(&value).map_err(|e| ClientError::SpecNotJson(e.to_string()))?;
    let spec = parse_job_spec(&body, None, None, ParseLimits::default())
        .map_err(|rejection| rejected(&rejection.error))?;
    Ok(CheckedSpec {
        job_id: spec.job_id,
        body,
    })
}

/// The splitter's words (`field: problem`, or serde's own for an unknown field) as a
/// [`ClientError::SpecRejected`].
fn rejected(error: &str) -> ClientError {
    let field = match error.split_once(": ") {
        Some((field, _)) if !field.contains(' ') => field,
        // serde names an unknown field in its message: "unknown field `x`, expected one of …".
        _ => match error.split('`').nth(1) {
            Some(field) if error.starts_with("unknown field") => field,
            _ => "message",
        },
    };
    ClientError::SpecRejected {
        field: field.to_owned(),
        reason: error.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn rejection(spec: Value) -> (String, String) {
        match checked_value(spec) {
            Err(ClientError::SpecRejected { field, reason }) => (field, reason),
            other => panic!("expected a rejection, got {other:?}"),
        }
    }

    #[test]
    fn a_spec_without_an_id_gets_one_and_keeps_its_fields() {
        let checked = checked_value(json!({"operation": "noop", "range": {"start": 0, "end": 3}}))
            .expect("valid");
        assert!(
            uuid::Uuid::parse_str(&checked.job_id).is_ok(),
            "{}",
            checked.job_id
        );
        let body: Value = serde_json::from_slice(&checked.body).expect("json");
        assert_eq!(body["job_id"], json!(checked.job_id));
        assert_eq!(body["range"], json!({"start": 0, "end": 3}));
        let own = checked_value(json!({"job_id": "mine", "operation": "noop", "items": []}))
            .expect("valid");
        assert_eq!(own.job_id, "mine");
    }

    #[test]
    fn a_rejection_names_the_field() {
        let (field, reason) =
            rejection(json!({"operation": "noop", "items": [], "fragment_size": 0}));
        assert_eq!(field, "fragment_size");
        assert!(reason.starts_with("fragment_size: "), "{reason}");
        let (field, _) = rejection(json!({"operation": "noop", "range": {"start": 5, "end": 1}}));
        assert_eq!(field, "range");
        let (field, reason) = rejection(json!({"operation": "noop", "items": [], "colour": 1}));
        assert_eq!(field, "colour", "{reason}");
        let (field, _) = rejection(json!({"items": []}));
        assert_eq!(field, "operation");
        assert!(matches!(
            checked_spec(b"[1]"),
            Err(ClientError::SpecNotObject)
        ));
        assert!(matches!(
            checked_spec(b"{"),
            Err(ClientError::SpecNotJson(_))
        ));
    }
}
