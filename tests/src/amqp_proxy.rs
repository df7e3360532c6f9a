//! A TCP proxy in front of the test broker that can do to a publishing connection what a
//! broker does to one it will not read: send `connection.blocked` and never `unblocked`,
//! while keeping the connection open.
//!
//! Both directions are relayed frame by frame (AMQP 0-9-1 frames: type, channel, size,
//! payload, `0xCE`; the client's side after its 8-byte protocol header), so that a frame of
//! the proxy's own can go between two whole ones. A client told it is blocked must not write
//! anything more (lapin then holds every frame, its heartbeats included); the proxy then
//! sends heartbeats to the broker in its stead, as RabbitMQ does not time out a connection
//! it holds itself. That is the state RabbitMQ leaves a publisher in while a resource alarm
//! or its flow control holds the connection, for as long as that lasts: only the client can
//! notice that its frames are not leaving. A connection is a publisher's once the client
//! sent `confirm.select` on it.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

/// `connection.blocked` (class 10, method 60) with `reason`, as a method frame on channel 0.
fn connection_blocked(reason: &str) -> Vec<u8> {
    let mut payload = vec![0, 10, 0, 60, reason.len() as u8];
    payload.extend_from_slice(reason.as_bytes());
    let mut frame = vec![1, 0, 0];
    frame.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    frame.extend_from_slice(&payload);
    frame.push(0xCE);
    frame
}

/// What the proxy knows of one relayed connection.
struct Relayed {
    /// Frames to slip in towards the client.
    to_client: mpsc::UnboundedSender<Vec<u8>>,
    /// The client asked for publisher confirms on some channel.
    publisher: AtomicBool,
    /// The client was told it is blocked: the proxy keeps the connection alive upstream.
    blocked: AtomicBool,
}

/// The proxy: listening until dropped, relaying every connection it accepted.
pub struct AmqpProxy {
    port: u16,
    relayed: Arc<Mutex<Vec<Arc<Relayed>>>>,
    accept: JoinHandle<()>,
}

impl AmqpProxy {
    /// Listens on a port of its own and relays each connection to `upstream` (host:port).
    pub async fn start(upstream: &str) -> Result<Self> {
        let listener = crate::ports::listen().await?;
        let port = listener.local_addr()?.port();
        let relayed: Arc<Mutex<Vec<Arc<Relayed>>>> = Arc::default();
        let registry = Arc::clone(&relayed);
        let upstream = upstream.to_owned();
        let accept = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let Ok(broker) = TcpStream::connect(&upstream).await else {
                    continue;
                };
                let (to_client, injected) = mpsc::unbounded_channel();
                let connection = Arc::new(Relayed {
                    to_client,
                    publisher: AtomicBool::new(false),
                    blocked: AtomicBool::new(false),
                });
                registry
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push(Arc::clone(&connection));
                relay(client, broker, injected, connection);
            }
        });
        Ok(Self {
            port,
            relayed,
            accept,
        })
    }

    /// `AMQP_URL` of the test broker through this proxy (guest, the default vhost).
    pub fn url(&self) -> String {
        format!("amqp://guest:guest@127.0.0.1:{}/%2f", self.port)
    }

    /// Tells the client of every publishing connection made through the proxy so far that
    /// the broker blocked it. Connections made afterwards are relayed as before. Returns
    /// how many were blocked.
    pub fn block_publishing_connections(&self) -> usize {
        let relayed = self.relayed.lock().unwrap_or_else(|p| p.into_inner());
        relayed
            .iter()
            .filter(|c| c.publisher.load(Ordering::SeqCst))
            .filter(|c| {
                c.blocked.store(true, Ordering::SeqCst);
                c.to_client
                    .send(connection_blocked("test: the broker stopped reading"))
                    .is_ok()
            })
            .count()
    }
}

impl Drop for AmqpProxy {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

fn relay(
    client: TcpStream,
    broker: TcpStream,
    injected: mpsc::UnboundedReceiver<Vec<u8>>,
    connection: Arc<Relayed>,
) {
    let (client_read, client_write) = client.into_split();
    let (broker_read, broker_write) = broker.into_split();
    tokio::spawn(async move {
        let _ = copy_up(client_read, broker_write, connection).await;
    });
    tokio::spawn(async move {
        let _ = copy_down(broker_read, client_write, injected).await;
    });
}

/// A heartbeat frame.
const HEARTBEAT: [u8; 8] = [8, 0, 0, 0, 0, 0, 0, 0xCE];
/// How often the proxy beats for a blocked client (the broker's timeout is tens of seconds).
const BEAT_EVERY: Duration = Duration::from_secs(2);

/// The client's bytes to the broker, whole frames only, noting `confirm.select` and beating
/// in the client's stead once it is blocked.
async fn copy_up(
    mut from: OwnedReadHalf,
    mut to: OwnedWriteHalf,
    connection: Arc<Relayed>,
) -> Result<()> {
    let mut protocol_header = [0u8; 8];
    from.read_exact(&mut protocol_header).await?;
    to.write_all(&protocol_header).await?;
    let mut pending: Vec<u8> = Vec::new();
    let mut chunk = vec![0u8; 64 * 1024];
    let mut beat = tokio::time::interval(BEAT_EVERY);
    loop {
        tokio::select! {
            _ = beat.tick() => {
                if connection.blocked.load(Ordering::SeqCst) {
                    to.write_all(&HEARTBEAT).await?;
                }
            }
            read = from.read(&mut chunk) => {
                let n = read.context("reading from the client")?;
                if n == 0 {
                    to.shutdown().await?;
                    return Ok(());
                }
                pending.extend_from_slice(&chunk[..n]);
                let whole = whole_frames(&pending);
                if is_confirm_select_among(&pending[..whole]) {
                    connection.publisher.store(true, Ordering::SeqCst);
                }
                to.write_all(&pending[..whole]).await?;
                pending.drain(..whole);
            }
        }
    }
}

/// Whether `frames` (whole frames) hold a `confirm.select` (class 85, method 10).
fn is_confirm_select_among(frames: &[u8]) -> bool {
    let mut at = 0;
    while let Some(header) = frames.get(at..at + 7) {
        let size = u32::from_be_bytes([header[3], header[4], header[5], header[6]]) as usize;
        if header[0] == 1 && frames.get(at + 7..at + 11) == Some(&[0, 85, 0, 10]) {
            return true;
        }
        at += 7 + size + 1;
    }
    false
}

/// The broker's frames to the client, whole frames only, with the injected ones between
/// them. (`read` into a buffer is cancel-safe where `read_exact` is not: a frame half read
/// when an injection comes is kept.)
async fn copy_down(
    mut from: OwnedReadHalf,
    mut to: OwnedWriteHalf,
    mut injected: mpsc::UnboundedReceiver<Vec<u8>>,
) -> Result<()> {
    let mut pending: Vec<u8> = Vec::new();
    let mut chunk = vec![0u8; 64 * 1024];
    loop {
        tokio::select! {
            frame = injected.recv() => match frame {
                Some(frame) => to.write_all(&frame).await?,
                None => return Ok(()),
            },
            read = from.read(&mut chunk) => {
                let n = read.context("reading from the broker")?;
                if n == 0 {
                    to.shutdown().await?;
                    return Ok(());
                }
                pending.extend_from_slice(&chunk[..n]);
                let whole = whole_frames(&pending);
                to.write_all(&pending[..whole]).await?;
                pending.drain(..whole);
            }
        }
    }
}

/// How many leading bytes of `bytes` are whole frames (header of 7, payload, frame end).
fn whole_frames(bytes: &[u8]) -> usize {
    let mut at = 0;
    while let Some(header) = bytes.get(at..at + 7) {
        let size = u32::from_be_bytes([header[3], header[4], header[5], header[6]]) as usize;
        let end = at + 7 + size + 1;
        if end > bytes.len() {
            break;
        }
        at = end;
    }
    at
}
