//! Settings that every binary reads: the broker and the namespace.

use clap::Args;

/// Default broker when neither `--amqp-url` nor `AMQP_URL` is given.
pub const DEFAULT_AMQP_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";
/// Default namespace, the prefix of every exchange and queue.
pub const DEFAULT_NAMESPACE: &str = "batchq";

/// Broker and namespace, flattened into each binary's own flags.
#[derive(Debug, Clone, Args)]
pub struct BrokerArgs {
    /// Broker URL; a comma-separated list for a cluster (tried in turn).
    #[arg(long = "amqp-url", env = "AMQP_URL", default_value = DEFAULT_AMQP_URL)]
    pub amqp_url: String,

    /// Prefix of every exchange and queue, so deployments can share a broker.
    #[arg(long = "namespace", env = "BATCHQ_NAMESPACE", default_value = DEFAULT_NAMESPACE)]
    pub namespace: String,
}

impl BrokerArgs {
    pub fn new(amqp_url: impl Into<String>, namespace: impl Into<String>) -> Self {
        Self {
            amqp_url: amqp_url.into(),
            namespace: namespace.into(),
        }
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
    }

    #[test]
    fn splits_cluster_urls() {
        let args = BrokerArgs::new("amqp://a, amqp://b,", "ns");
        assert_eq!(args.urls(), vec!["amqp://a", "amqp://b"]);
    }
}
