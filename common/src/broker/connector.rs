//! The pool's connection manager: deadpool-lapin's own `Manager` connects without a TLS
//! configuration, so a private CA (`BATCHQ_TLS_CA_FILE`) could not reach rustls through it.

use deadpool::managed::{self, Metrics, RecycleError, RecycleResult};
use deadpool_lapin::lapin::tcp::OwnedTLSConfig;
use deadpool_lapin::lapin::{Connection, ConnectionProperties, DefaultConnectionBuilder, Error};

use crate::config::redact_url;

/// Opens connections to one broker URL, with the CA certificates the settings name.
pub struct ConnectionManager {
    url: String,
    tls: OwnedTLSConfig,
    connection_name: String,
}

impl ConnectionManager {
    /// `ca_pem` holds PEM certificates trusted besides the system's roots (for `amqps://`).
    pub fn new(url: String, ca_pem: Option<String>, connection_name: String) -> Self {
        Self {
            url,
            tls: OwnedTLSConfig {
                identity: None,
                cert_chain: ca_pem,
            },
            connection_name,
        }
    }
}

// By hand: the derived form would print the URL with its password.
impl std::fmt::Debug for ConnectionManager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConnectionManager")
            .field("url", &redact_url(&self.url))
            .field("private_ca", &self.tls.cert_chain.is_some())
            .finish()
    }
}

impl managed::Manager for ConnectionManager {
    type Type = Connection;
    type Error = Error;

    async fn create(&self) -> Result<Connection, Error> {
        let properties = ConnectionProperties::default()
            .with_connection_name(self.connection_name.clone().into());
        DefaultConnectionBuilder::new()?
            .with_uri_str(self.url.clone())
            .with_properties(properties)
            .with_tls_config(self.tls.clone())
            .connect()
            .await
    }

    async fn recycle(&self, connection: &mut Connection, _: &Metrics) -> RecycleResult<Error> {
        // A broken connection is dropped and replaced rather than handed out again, and so
        // is one the broker has blocked: nothing can be written on it until the broker
        // unblocks it, which a new connection does not wait for when the block was one
        // connection's (a resource alarm blocks the new one too, at its first publish).
        if connection.status().connected() && !connection.status().blocked() {
            Ok(())
        } else {
            Err(RecycleError::message(format!(
                "connection is not open: {:?}",
                connection.status()
            )))
        }
    }
}

/// The pool of connections to one URL.
pub type ConnectionPool = managed::Pool<ConnectionManager>;
/// A connection taken from a [`ConnectionPool`]; dropping it hands it back.
pub type PooledConnection = managed::Object<ConnectionManager>;
