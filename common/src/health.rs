//! How the splitter and the reducer tell whoever asks (`batchctl health`) that they are alive
//! and whether their store is failing: the splitter sends a [`ServiceBeat`] every few seconds
//! beside the workers' heartbeats; the reducer, which gathers them, adds its own state.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use crate::broker::{Publisher, transient_json_properties};
use crate::store::{StoreFault, StoreHealth};
use crate::topology::{KEY_HEARTBEAT, Names};

/// How often a service says it is alive; three missed beats and it counts as gone.
pub const SERVICE_BEAT_INTERVAL: Duration = Duration::from_secs(2);

/// Sent by the splitter on `{ns}.events`, routing key `heartbeat` (the workers' queue).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ServiceBeat {
    /// `splitter` or `reducer`.
    pub role: String,
    /// This process: `{host}-{pid}`.
    pub instance: String,
    pub host: String,
    pub pid: u32,
    pub started_at_ms: i64,
    pub at_ms: i64,
    pub interval_ms: u64,
    /// The store fault this process is waiting out, if any.
    pub store_fault: Option<StoreFault>,
    /// Whether this replica is its role's active one (always, on the embedded store); a
    /// standby waits for the lease (`BATCHQ_DATABASE_URL`). Absent from older beats: active.
    #[serde(default = "active_by_default")]
    pub active: bool,
}

fn active_by_default() -> bool {
    true
}

/// One heartbeat on the heartbeat queue: a worker's or a service's.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum AnyBeat {
    Worker(crate::wire::Heartbeat),
    Service(ServiceBeat),
}

/// `batchctl health`'s view of one service.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ServiceHealth {
    pub role: String,
    /// `None` when no process of this role has been heard from lately.
    pub instance: Option<String>,
    pub host: Option<String>,
    /// `ok`, `store fault`, or `not heard from`.
    pub state: String,
    pub store_fault: Option<StoreFault>,
    pub last_heartbeat: Option<String>,
    /// Whether this replica is its role's active one.
    #[serde(default = "active_by_default")]
    pub active: bool,
}

impl ServiceHealth {
    pub fn from_beat(beat: &ServiceBeat) -> Self {
        Self {
            role: beat.role.clone(),
            instance: Some(beat.instance.clone()),
            host: Some(beat.host.clone()),
            state: state_of(beat.store_fault.as_ref()).to_owned(),
            store_fault: beat.store_fault.clone(),
            last_heartbeat: Some(crate::timefmt::format_ms(beat.at_ms)),
            active: beat.active,
        }
    }

    pub fn missing(role: &str) -> Self {
        Self {
            role: role.to_owned(),
            instance: None,
            host: None,
            state: "not heard from".to_owned(),
            store_fault: None,
            last_heartbeat: None,
            active: false,
        }
    }

    pub fn is_ok(&self) -> bool {
        self.state == "ok"
    }
}

/// The health of a deployment as the reducer sees it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HealthReport {
    pub services: Vec<ServiceHealth>,
    pub workers_live: u64,
}

fn state_of(fault: Option<&StoreFault>) -> &'static str {
    match fault {
        Some(_) => "store fault",
        None => "ok",
    }
}

/// This process's name among the replicas: `{host}-{pid}`.
pub fn instance() -> String {
    format!("{}-{}", hostname(), std::process::id())
}

/// This process's beat as `role`, active or standby.
pub fn beat(role: &str, started_at_ms: i64, health: &StoreHealth, active: bool) -> ServiceBeat {
    let host = hostname();
    let pid = std::process::id();
    ServiceBeat {
        role: role.to_owned(),
        instance: format!("{host}-{pid}"),
        host,
        pid,
        started_at_ms,
        at_ms: crate::timefmt::now_ms(),
        interval_ms: SERVICE_BEAT_INTERVAL.as_millis() as u64,
        store_fault: health.fault(),
        active,
    }
}

/// Publishes this process's beat every [`SERVICE_BEAT_INTERVAL`] until `stop`. Beats are
/// transient and unconfirmed: a lost one is harmless. A publish the channel refuses ends the
/// loop with the error, so the session starts again.
pub async fn send_beats(
    publisher: &Publisher,
    names: &Names,
    role: &str,
    health: &StoreHealth,
    active: bool,
    stop: &CancellationToken,
) -> Result<(), crate::broker::BrokerError> {
    let started_at_ms = crate::timefmt::now_ms();
    let mut tick = tokio::time::interval(SERVICE_BEAT_INTERVAL);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return Ok(()),
            _ = tick.tick() => {}
        }
        let body = serde_json::to_vec(&beat(role, started_at_ms, health, active))?;
        let pending = publisher
            .start(
                &names.events(),
                KEY_HEARTBEAT,
                &body,
                transient_json_properties(),
            )
            .await?;
        tokio::spawn(async move {
            let _ = pending.wait().await;
        });
    }
}

/// The host's name: `HOSTNAME`, else `/etc/hostname`.
pub fn hostname() -> String {
    std::env::var("HOSTNAME")
        .ok()
        .filter(|h| !h.is_empty())
        .or_else(|| {
            std::fs::read_to_string("/etc/hostname")
                .ok()
                .map(|h| h.trim().to_owned())
        })
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "unknown-host".to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_worker_heartbeat_and_a_service_beat_are_told_apart() {
        let service = beat("splitter", 1, &StoreHealth::default(), false);
        let text = serde_json::to_string(&service).expect("encodes");
        assert_eq!(
            serde_json::from_str::<AnyBeat>(&text).expect("decodes"),
            AnyBeat::Service(service.clone())
        );
        // A beat from before standbys existed came from the only, active, replica.
        let mut old: serde_json::Value = serde_json::from_str(&text).expect("json");
        old.as_object_mut().expect("an object").remove("active");
        match serde_json::from_value::<AnyBeat>(old).expect("decodes") {
            AnyBeat::Service(beat) => assert!(beat.active, "{beat:?}"),
            other => panic!("a service beat, not {other:?}"),
        }
        let worker = crate::wire::Heartbeat {
            worker: "w".into(),
            host: "h".into(),
            pid: 1,
            operations: vec!["noop".into()],
            prefetch: 4,
            fragments_in_flight: 0,
            held_by_operation: Default::default(),
            started_at_ms: 1,
            at_ms: 2,
            interval_ms: 2000,
        };
        let text = serde_json::to_string(&worker).expect("encodes");
        assert_eq!(
            serde_json::from_str::<AnyBeat>(&text).expect("decodes"),
            AnyBeat::Worker(worker)
        );
    }
}
