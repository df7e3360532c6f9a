//! The worker's control subscription: cancellations of jobs, broadcast on `{ns}.control` to
//! every worker, so fragments of a cancelled job stop at their next operation.

use std::sync::Arc;

use common::broker::BrokerError;
use common::topology::Names;
use common::wire::Control;
use futures::StreamExt;
use tokio::sync::mpsc;

use crate::WorkerState;

/// Binds a private queue to `{ns}.control` and applies what arrives (cancellations). The
/// subscription ending (its channel closed) ends the session through `failed`, so the next
/// session subscribes again instead of the worker going deaf to cancels.
pub(crate) async fn listen(
    session: &common::broker::Session,
    names: &Names,
    state: &Arc<WorkerState>,
    failed: mpsc::Sender<BrokerError>,
) -> Result<tokio::task::JoinHandle<()>, BrokerError> {
    let channel = session.consumer_channel(16).await?;
    let mut consumer = common::consume::subscribe(
        &channel,
        &names.control(),
        "",
        &format!("{}:control", state.id),
    )
    .await?;
    let state = Arc::clone(state);
    Ok(tokio::spawn(async move {
        // The channel must live as long as its consumer.
        let _channel = channel;
        loop {
            let delivery = match consumer.next().await {
                Some(Ok(delivery)) => delivery,
                Some(Err(e)) => {
                    let _ = failed.try_send(e.into());
                    return;
                }
                None => {
                    let _ = failed.try_send(BrokerError::ConsumerEnded);
                    return;
                }
            };
            match serde_json::from_slice::<Control>(&delivery.data) {
                Ok(Control::Cancel { job_id, round }) => {
                    tracing::info!(%job_id, round, "job cancelled; its fragments stop at the next operation");
                    state.cancelled.insert(job_id, round);
                }
                Err(e) => tracing::warn!(error = %e, "ignoring a malformed control message"),
            }
        }
    }))
}
