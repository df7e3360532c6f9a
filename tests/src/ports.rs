//! Ports for the servers a test starts (private broker nodes, reducers' metrics endpoints,
//! Prometheus, chromedriver, proxies).
//!
//! Never from the ephemeral range (`bind(":0")` hands those out): that is where every client
//! connection takes its local port, so a port picked there and released can be taken by a
//! client reconnecting after a broker node's kill before the server binds it, and the server
//! then fails with `eaddrinuse`. A port here comes from below that range, at random (tests
//! run side by side), and is checked to be free on every address.

use std::net::TcpListener;

use anyhow::{Result, bail};

/// Where the ports come from: below Linux's default ephemeral range (32768–60999) and above
/// the ports system services commonly take.
const RANGE: std::ops::Range<u16> = 20_000..32_000;

/// A port in [`RANGE`] that nothing listens on right now. A server started on it may still
/// lose a race with another test's server picking the same one: callers that bind it
/// themselves use [`listen`], which retries.
pub fn free_port() -> Result<u16> {
    for _ in 0..200 {
        let port = rand::random_range(RANGE);
        if TcpListener::bind(("0.0.0.0", port)).is_ok() {
            return Ok(port);
        }
    }
    bail!("no free port in {RANGE:?} after 200 tries")
}

/// A listener on 127.0.0.1 at a port of [`RANGE`], trying other ports while one is taken.
pub async fn listen() -> Result<tokio::net::TcpListener> {
    let mut last = None;
    for _ in 0..200 {
        let port = rand::random_range(RANGE);
        match tokio::net::TcpListener::bind(("127.0.0.1", port)).await {
            Ok(listener) => return Ok(listener),
            Err(e) => last = Some(e),
        }
    }
    bail!("no port in {RANGE:?} could be bound: {last:?}")
}
