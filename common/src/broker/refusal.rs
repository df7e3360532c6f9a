//! Why the broker turns a process away, read from the reply codes lapin hands back: causes
//! that no quick reconnect mends (a wrong password, a missing vhost or permission, a
//! topology declared otherwise, an untrusted certificate). They are logged once and retried
//! slowly, since an operator (or a Kubernetes secret arriving late) fixes them; `batchctl`
//! gives up on them at once.

use std::io;

use deadpool_lapin::lapin::protocol::{AMQPErrorKind, AMQPHardError, AMQPSoftError};
use deadpool_lapin::lapin::{Error as LapinError, ErrorKind};

/// A cause the broker gave for refusing this process.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// 403 ACCESS_REFUSED in answer to the login. RabbitMQ does not say which of the two.
    #[error("login refused (ACCESS_REFUSED 403): unknown user or wrong password")]
    LoginRefused,
    /// 530 NOT_ALLOWED in answer to `connection.open`; RabbitMQ gives the same code to a
    /// vhost that does not exist and to one the user has no permission on.
    #[error(
        "vhost refused (NOT_ALLOWED 530): the vhost does not exist or the user has no permission on it"
    )]
    VhostNotAllowed,
    /// 403 ACCESS_REFUSED on a channel: configure, write or read permission missing.
    #[error(
        "access refused (ACCESS_REFUSED 403): the user lacks a permission on an exchange or queue"
    )]
    AccessRefused,
    /// 406 PRECONDITION_FAILED in answer to a declaration.
    #[error(
        "topology mismatch (PRECONDITION_FAILED 406): an exchange or queue exists with other settings"
    )]
    TopologyMismatch,
    /// The TLS handshake of an `amqps://` URL failed.
    #[error(
        "TLS handshake failed: the broker's certificate is not trusted (BATCHQ_TLS_CA_FILE) or does not match the host"
    )]
    TlsRejected,
}

/// What a failed request was doing, which decides what a reply code means: a 403 in answer
/// to the login is a wrong password, on a channel a missing permission.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Stage {
    /// Opening a connection: TCP, TLS, login, `connection.open` of the vhost.
    Connect,
    /// Declaring exchanges, queues and bindings.
    Declare,
    /// Anything else on an open connection.
    Channel,
}

/// The refusal behind `error`, if it is one, at `stage` of a connection to a URL that is
/// (`tls`) or is not an `amqps://` one.
pub(crate) fn classify(error: &LapinError, stage: Stage, tls: bool) -> Option<Refusal> {
    match error.kind() {
        ErrorKind::ProtocolError(amqp) => match (amqp.kind(), stage) {
            (AMQPErrorKind::Soft(AMQPSoftError::ACCESSREFUSED), Stage::Connect) => {
                Some(Refusal::LoginRefused)
            }
            (AMQPErrorKind::Soft(AMQPSoftError::ACCESSREFUSED), _) => Some(Refusal::AccessRefused),
            (AMQPErrorKind::Hard(AMQPHardError::NOTALLOWED), _) => Some(Refusal::VhostNotAllowed),
            (AMQPErrorKind::Soft(AMQPSoftError::PRECONDITIONFAILED), Stage::Declare) => {
                Some(Refusal::TopologyMismatch)
            }
            _ => None,
        },
        // rustls reports every handshake failure (unknown issuer, name mismatch, a peer that
        // does not speak TLS) as InvalidData; a plain connection never fails so at connect.
        ErrorKind::IOError(io) if tls && stage == Stage::Connect => {
            (io.kind() == io::ErrorKind::InvalidData).then_some(Refusal::TlsRejected)
        }
        _ => None,
    }
}

/// Whether another session may succeed after `error`: not after the broker said the client
/// broke the protocol (501 FRAME_ERROR, 502 SYNTAX_ERROR, 503 COMMAND_INVALID,
/// 505 UNEXPECTED_FRAME, 540 NOT_IMPLEMENTED), since a new session would send the same
/// frames; nor after a frame that could not be encoded. Everything else (a closed socket,
/// 320 CONNECTION_FORCED, 404 NOT_FOUND of a queue the next session declares again, the
/// refusals above) may heal.
pub(crate) fn may_heal(error: &LapinError) -> bool {
    match error.kind() {
        ErrorKind::ProtocolError(amqp) => !matches!(
            amqp.kind(),
            AMQPErrorKind::Hard(
                AMQPHardError::FRAMEERROR
                    | AMQPHardError::SYNTAXERROR
                    | AMQPHardError::COMMANDINVALID
                    | AMQPHardError::UNEXPECTEDFRAME
                    | AMQPHardError::NOTIMPLEMENTED
            )
        ),
        ErrorKind::SerialisationError(_) => false,
        _ => true,
    }
}

#[cfg(test)]
mod tests {
    use deadpool_lapin::lapin::protocol::AMQPError;

    use super::*;

    fn broker_said(kind: AMQPErrorKind) -> LapinError {
        ErrorKind::ProtocolError(AMQPError::new(kind, "text".into())).into()
    }

    #[test]
    fn a_403_is_a_wrong_login_at_connect_and_a_missing_permission_later() {
        let refused = broker_said(AMQPErrorKind::Soft(AMQPSoftError::ACCESSREFUSED));
        assert_eq!(
            classify(&refused, Stage::Connect, false),
            Some(Refusal::LoginRefused)
        );
        assert_eq!(
            classify(&refused, Stage::Declare, false),
            Some(Refusal::AccessRefused)
        );
        assert_eq!(
            classify(&refused, Stage::Channel, false),
            Some(Refusal::AccessRefused)
        );
    }

    #[test]
    fn a_530_is_a_refused_vhost_and_a_406_only_counts_on_a_declaration() {
        let vhost = broker_said(AMQPErrorKind::Hard(AMQPHardError::NOTALLOWED));
        assert_eq!(
            classify(&vhost, Stage::Connect, false),
            Some(Refusal::VhostNotAllowed)
        );
        let precondition = broker_said(AMQPErrorKind::Soft(AMQPSoftError::PRECONDITIONFAILED));
        assert_eq!(
            classify(&precondition, Stage::Declare, false),
            Some(Refusal::TopologyMismatch)
        );
        // An ack of an unknown delivery tag, a consumer timeout: the next session mends it.
        assert_eq!(classify(&precondition, Stage::Channel, false), None);
        let not_found = broker_said(AMQPErrorKind::Soft(AMQPSoftError::NOTFOUND));
        assert_eq!(classify(&not_found, Stage::Channel, false), None);
        assert!(may_heal(&not_found));
    }

    #[test]
    fn invalid_data_at_connect_is_a_tls_refusal_only_over_tls() {
        let garbled: LapinError = io::Error::new(io::ErrorKind::InvalidData, "bad cert").into();
        assert_eq!(
            classify(&garbled, Stage::Connect, true),
            Some(Refusal::TlsRejected)
        );
        assert_eq!(classify(&garbled, Stage::Connect, false), None);
        let refused: LapinError = io::Error::from(io::ErrorKind::ConnectionRefused).into();
        assert_eq!(classify(&refused, Stage::Connect, true), None);
        assert!(may_heal(&refused));
    }

    #[test]
    fn protocol_violations_are_not_worth_another_session() {
        let violation = broker_said(AMQPErrorKind::Hard(AMQPHardError::COMMANDINVALID));
        assert!(!may_heal(&violation));
        let forced = broker_said(AMQPErrorKind::Hard(AMQPHardError::CONNECTIONFORCED));
        assert!(may_heal(&forced));
    }
}
