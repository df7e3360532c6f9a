//! Settings that every binary reads: the broker, its TLS trust and the namespace.

use std::path::PathBuf;

use clap::Args;

/// Default broker when neither `--amqp-url` nor `AMQP_URL` is given.
pub const DEFAULT_AMQP_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";
/// Default namespace, the prefix of every exchange and queue.
pub const DEFAULT_NAMESPACE: &str = "batchq";

/// Broker and namespace, flattened into each binary's own flags.
#[derive(Clone, Args)]
pub struct BrokerArgs {
    /// Broker URL; a comma-separated list for a cluster (tried in turn).
    #[arg(long = "amqp-url", env = "AMQP_URL", default_value = DEFAULT_AMQP_URL)]
    pub amqp_url: String,

    /// Prefix of every exchange and queue, so deployments can share a broker.
    #[arg(long = "namespace", env = "BATCHQ_NAMESPACE", default_value = DEFAULT_NAMESPACE)]
    pub namespace: String,

    /// PEM file of CA certificates trusted for `amqps://` URLs besides the system's roots
    /// (a private CA).
    #[arg(long = "tls-ca-file", env = "BATCHQ_TLS_CA_FILE")]
    pub tls_ca_file: Option<PathBuf>,

    /// AMQP heartbeat in seconds: a broker or connection that goes silent is noticed within
    /// about two of them (0: the broker's own, 60 s on RabbitMQ; the lower of the two wins).
    /// A `heartbeat=` in the URL wins over this setting.
    #[arg(long = "heartbeat-secs", env = "BATCHQ_HEARTBEAT_SECS", default_value_t = DEFAULT_HEARTBEAT_SECS)]
    pub heartbeat_secs: u16,
}

/// The AMQP heartbeat batchq asks for unless told otherwise. RabbitMQ's own default (60 s)
/// leaves a partitioned process's unacknowledged messages waiting two minutes.
pub const DEFAULT_HEARTBEAT_SECS: u16 = 10;

// By hand: the derived form would print the URL's password.
impl std::fmt::Debug for BrokerArgs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BrokerArgs")
            .field("amqp_url", &redact_urls(&self.amqp_url))
            .field("namespace", &self.namespace)
            .field("tls_ca_file", &self.tls_ca_file)
            .field("heartbeat_secs", &self.heartbeat_secs)
            .finish()
    }
}

impl BrokerArgs {
    pub fn new(amqp_url: impl Into<String>, namespace: impl Into<String>) -> Self {
        Self {
            amqp_url: amqp_url.into(),
            namespace: namespace.into(),
            tls_ca_file: None,
            heartbeat_secs: DEFAULT_HEARTBEAT_SECS,
        }
    }

    /// The PEM text of [`BrokerArgs::tls_ca_file`], checked to hold a certificate: rustls
    /// skips what it cannot parse, so a wrong file would otherwise show up only later, as an
    /// untrusted broker.
    pub fn tls_ca_pem(&self) -> Result<Option<String>, String> {
        let Some(path) = &self.tls_ca_file else {
            return Ok(None);
        };
        let pem = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read BATCHQ_TLS_CA_FILE {}: {e}", path.display()))?;
        if !pem.contains("-----BEGIN CERTIFICATE-----") {
            return Err(format!(
                "BATCHQ_TLS_CA_FILE {} holds no PEM certificate (no -----BEGIN CERTIFICATE----- line)",
                path.display()
            ));
        }
        Ok(Some(pem))
    }

    /// The URLs of `amqp_url`, in the order they are tried.
    pub fn urls(&self) -> Vec<String> {
        self.amqp_url
            .split(',')
            .map(str::trim)
            .filter(|u| !u.is_empty())
            .map(str::to_owned)
            .collect()
    }
}

impl Default for BrokerArgs {
    fn default() -> Self {
        Self::new(DEFAULT_AMQP_URL, DEFAULT_NAMESPACE)
    }
}

/// A URL with its password replaced, fit for a log line.
pub fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let Some((userinfo, host)) = rest.rsplit_once('@') else {
        return url.to_owned();
    };
    match userinfo.split_once(':') {
        Some((user, _)) => format!("{scheme}://{user}:***@{host}"),
        None => url.to_owned(),
    }
}

/// A comma-separated list of URLs with each password replaced, fit for a log line.
pub fn redact_urls(urls: &str) -> String {
    urls.split(',')
        .map(|url| redact_url(url.trim()))
        .collect::<Vec<_>>()
        .join(",")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redacts_password_only() {
        assert_eq!(
            redact_url("amqp://guest:secret@host:5672/%2f"),
            "amqp://guest:***@host:5672/%2f"
        );
        assert_eq!(redact_url("amqp://host:5672"), "amqp://host:5672");
        assert_eq!(
            redact_url("amqps://u:p@ss@host/%2f"),
            "amqps://u:***@host/%2f"
        );
    }

    #[test]
    fn debug_output_hides_every_password_of_a_cluster() {
        let args = BrokerArgs::new("amqp://a:pw1@h1/%2f, amqp://b:pw2@h2/%2f", "ns");
        let shown = format!("{args:?}");
        assert!(!shown.contains("pw1") && !shown.contains("pw2"), "{shown}");
        assert!(
            shown.contains("amqp://a:***@h1/%2f,amqp://b:***@h2/%2f"),
            "{shown}"
        );
    }

    #[test]
    fn a_ca_file_without_a_certificate_is_named_in_the_error() -> std::io::Result<()> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("not-a-ca.pem");
        std::fs::write(&path, "hello")?;
        let args = BrokerArgs {
            tls_ca_file: Some(path),
            ..BrokerArgs::default()
        };
        let error = args.tls_ca_pem().err().unwrap_or_default();
        assert!(
            error.contains("not-a-ca.pem") && error.contains("no PEM certificate"),
            "{error}"
        );
        let missing = BrokerArgs {
            tls_ca_file: Some(dir.path().join("missing.pem")),
            ..BrokerArgs::default()
        };
        let error = missing.tls_ca_pem().err().unwrap_or_default();
        assert!(error.contains("cannot read BATCHQ_TLS_CA_FILE"), "{error}");
        assert_eq!(BrokerArgs::default().tls_ca_pem(), Ok(None));
        Ok(())
    }

    #[test]
    fn splits_cluster_urls() {
        let args = BrokerArgs::new("amqp://a, amqp://b,", "ns");
        assert_eq!(args.urls(), vec!["amqp://a", "amqp://b"]);
    }
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum LogFormat {
    /// For people: one line an event, coloured only when stderr is a terminal.
    #[default]
    Text,
    /// For log shippers: one JSON object a line (timestamp, level, target, fields).
    Json,
}

/// The logging setting every binary reads.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct LogArgs {
    /// Log lines as `text` (for people) or `json` (one object a line, for log shippers).
    #[arg(long = "log-format", env = "BATCHQ_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text, global = true)]
    pub log_format: LogFormat,
}
