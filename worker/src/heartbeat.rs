//! Heartbeats: who this worker is, what it offers and what it holds, published every interval
//! for the reducer (`batchctl workers`, the dashboard's worker panels).

use std::sync::Arc;

use common::broker::{BrokerError, Publisher, transient_json_properties};
use common::topology::{KEY_HEARTBEAT, Names};
use common::wire::Heartbeat;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::WorkerState;

/// Publishes a heartbeat every interval. A publish the channel refuses (it closed) ends the
/// session through `failed`: a worker the reducer cannot hear must reconnect.
pub(crate) async fn publish(
    publisher: Publisher,
    names: Names,
    state: Arc<WorkerState>,
    stop: CancellationToken,
    failed: mpsc::Sender<BrokerError>,
) {
    let mut tick = tokio::time::interval(state.heartbeat);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let held = state.held();
        let beat = Heartbeat {
            worker: state.id.clone(),
            host: state.host.clone(),
            pid: std::process::id(),
            operations: state.registry.names(),
            prefetch: state.budget_now(),
            fragments_in_flight: held.values().sum(),
            held_by_operation: held,
            started_at_ms: state.started_at_ms,
            at_ms: common::timefmt::now_ms(),
            interval_ms: state.heartbeat.as_millis() as u64,
        };
        let Ok(body) = serde_json::to_vec(&beat) else {
            continue;
        };
        // A lost heartbeat is harmless; do not hold anything up waiting for its confirm.
        match publisher
            .start(
                &names.events(),
                KEY_HEARTBEAT,
                &body,
                transient_json_properties(),
            )
            .await
        {
            Ok(pending) => {
                tokio::spawn(async move {
                    let _ = pending.wait().await;
                });
            }
            Err(error) => {
                let _ = failed.try_send(error);
                return;
            }
        }
    }
}
