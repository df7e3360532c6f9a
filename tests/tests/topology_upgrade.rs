//! Upgrading a deployment whose queues an earlier batchq declared: quorum queues without the
//! leader locator, and the durable classic `{ns}.heartbeats` and `{ns}.rpc` queues. Declaring
//! today's topology over them must work (RabbitMQ refuses a re-declaration with other
//! arguments with 406, which would leave every process looping on reconnect), the old queues
//! must be left alone, and the reducer's RPC must answer through the new `{ns}.rpc` exchange.

use std::time::Duration;

use anyhow::{Context, Result, ensure};
use batchq_tests::TestEnv;
use common::broker::Broker;
use common::config::BrokerArgs;
use common::lapin::options::QueueDeclareOptions;
use common::lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use common::topology::{self, Names};
use common::wire::{Request, Response};

fn table(entries: &[(&str, &str)]) -> FieldTable {
    let mut table = FieldTable::default();
    for (key, value) in entries {
        table.insert(
            ShortString::from(*key),
            AMQPValue::LongString(LongString::from(*value)),
        );
    }
    table
}

/// Declares the queues as batchq releases before the cluster work did: quorum queues without
/// `x-queue-leader-locator`, heartbeats and RPC as durable classic queues with a TTL.
async fn declare_as_an_earlier_release(broker: &Broker, names: &Names) -> Result<()> {
    let channel = broker.channel().await?;
    let internal = [("x-queue-type", "quorum"), ("x-overflow", "reject-publish")];
    for queue in [names.jobs(), names.reducer_queue(), names.splitter_queue()] {
        channel
            .queue_declare(
                queue.as_str().into(),
                QueueDeclareOptions::durable(),
                table(&internal),
            )
            .await
            .with_context(|| format!("declaring {queue} the old way"))?;
    }
    let work = names.work_queue("noop");
    let dead = names.dead();
    let events = names.events();
    let work_args = [
        ("x-queue-type", "quorum"),
        ("x-dead-letter-exchange", events.as_str()),
        ("x-dead-letter-strategy", "at-least-once"),
        ("x-overflow", "reject-publish"),
        ("x-dead-letter-routing-key", topology::KEY_POISON),
    ];
    let mut work_table = table(&work_args);
    work_table.insert(
        ShortString::from("x-delivery-limit"),
        AMQPValue::LongLongInt(topology::DELIVERY_LIMIT),
    );
    channel
        .queue_declare(
            work.as_str().into(),
            QueueDeclareOptions::durable(),
            work_table,
        )
        .await
        .context("declaring the noop work queue the old way")?;
    channel
        .queue_declare(
            dead.as_str().into(),
            QueueDeclareOptions::durable(),
            table(&[("x-queue-type", "quorum")]),
        )
        .await
        .context("declaring the dead queue the old way")?;
    for queue in names.legacy_queues() {
        let mut ttl = FieldTable::default();
        ttl.insert(
            ShortString::from("x-message-ttl"),
            AMQPValue::LongLongInt(15_000),
        );
        channel
            .queue_declare(queue.as_str().into(), QueueDeclareOptions::durable(), ttl)
            .await
            .with_context(|| format!("declaring the classic {queue}"))?;
    }
    let _ = channel.close(200, "old topology declared".into()).await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn todays_topology_declares_over_an_earlier_releases_queues() -> Result<()> {
    let mut env = TestEnv::new("topology-upgrade").await?;
    // TestEnv declared today's topology in its namespace; the old one gets a namespace of its
    // own, deleted whatever the outcome.
    let names = Names::new(format!("{}-old", env.ns));
    let broker = Broker::new(
        &BrokerArgs::new(env.broker_url(), names.namespace()),
        "batchq-tests",
    )?;
    let outcome = upgrade(&broker, &names).await;
    let cleaned = async {
        let channel = broker.channel().await?;
        topology::delete(&channel, &names, &["noop"]).await?;
        anyhow::Ok(())
    }
    .await;
    outcome?;
    cleaned?;

    // The reducer answers RPC through `{ns}.rpc`, even a request sent before it started: the
    // client sends a returned (unrouted) request again until the reducer's queue is bound.
    let rpc = common::rpc::RpcClient::connect(env.broker(), Duration::from_secs(20));
    let mut rpc = rpc.await?;
    env.start_reducer()?;
    let answer = rpc.call(&Request::Workers).await?;
    ensure!(
        matches!(&answer, Response::Workers { workers } if workers.is_empty()),
        "no worker runs: {answer:?}"
    );
    rpc.close().await;
    env.finish().await
}

async fn upgrade(broker: &Broker, names: &Names) -> Result<()> {
    declare_as_an_earlier_release(broker, names).await?;
    tokio::time::timeout(Duration::from_secs(15), broker.declare_topology())
        .await
        .context("declaring over the old queues timed out")?
        .context("declaring today's topology over an earlier release's queues")?;
    let connection = broker.connection().await?;
    tokio::time::timeout(
        Duration::from_secs(15),
        topology::declare_work_queue(&connection, names, "noop"),
    )
    .await
    .context("declaring the noop work queue timed out")?
    .context("declaring the noop work queue over the old one")?;
    // The classic queues are left where they were, for the operator to delete.
    let peeks = common::broker::peek_queues(&names.legacy_queues(), || broker.channel()).await?;
    ensure!(
        peeks.iter().all(Option::is_some),
        "the old heartbeat and RPC queues are not batchq's to delete on start: {peeks:?}"
    );
    Ok(())
}
