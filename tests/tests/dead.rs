//! `batchctl dead`: what lands on `{ns}.dead` for real (a JobSpec the splitter rejects, an input
//! the reducer cannot decode, a message a worker cannot read, a message the broker itself
//! dead-letters after its delivery limit) is listed with its reason, job, size and origin;
//! listing loses and reorders nothing however often it runs; `requeue --job` puts back only
//! that job's messages, where they came from; `purge` drops them.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use batchq_tests::{Signal, TestEnv, WorkerOpts};
use common::broker::json_properties;
use common::dead::{BATCHQ_HEADERS, DeadLetter, X_DEATH_HEADER};
use common::lapin::BasicProperties;
use common::lapin::message::Delivery;
use common::lapin::options::{BasicGetOptions, BasicRejectOptions};
use common::lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use common::topology::{KEY_REDUCER, KEY_SETTLED, KEY_SUBMIT, MAX_DELIVERIES};
use serde_json::{Value, json};

const WAIT: Duration = Duration::from_secs(30);

/// Polls the ready count of `queue` until it is `n`.
async fn wait_for_depth(env: &TestEnv, queue: &str, n: u32) -> Result<()> {
    let deadline = Instant::now() + WAIT;
    loop {
        let depth = env.queue_depth(queue).await?;
        if depth == n {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!("{queue} holds {depth} messages, not {n}, after {WAIT:?}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Runs `batchctl` and returns its stdout, failing on any exit but 0.
async fn batchctl_ok(env: &TestEnv, args: &[&str]) -> Result<String> {
    let (status, stdout, stderr) = env.batchctl(args).await?;
    ensure!(
        status.success(),
        "batchctl {args:?} exited {status}: {stderr}"
    );
    Ok(stdout)
}

/// `batchctl dead --json`, parsed.
async fn listed(env: &TestEnv) -> Result<Vec<Value>> {
    let stdout = batchctl_ok(env, &["dead", "--json"]).await?;
    let rows: Value = serde_json::from_str(&stdout).context("batchctl dead --json")?;
    rows.as_array()
        .cloned()
        .with_context(|| format!("not a JSON array: {stdout}"))
}

fn row_of<'a>(rows: &'a [Value], job_id: &str) -> Result<&'a Value> {
    let matching: Vec<&Value> = rows.iter().filter(|r| r["job_id"] == job_id).collect();
    ensure!(
        matching.len() == 1,
        "{} rows of job {job_id} in {rows:#?}",
        matching.len()
    );
    Ok(matching[0])
}

/// Publishes `body` to `exchange` with `key`, confirmed and mandatory.
async fn publish(
    env: &TestEnv,
    exchange: &str,
    key: &str,
    body: &[u8],
    properties: BasicProperties,
) -> Result<()> {
    let publisher = env.broker().publisher().await?;
    tokio::time::timeout(WAIT, async {
        publisher
            .start_with(exchange, key, body, properties, true)
            .await?
            .wait()
            .await
    })
    .await
    .context("publish timed out")??;
    Ok(())
}

/// Takes the one message on `queue` (acked) and checks it is the only one.
async fn take_one(env: &TestEnv, queue: &str) -> Result<Delivery> {
    let channel = env.broker().channel().await?;
    let get = |channel: &common::lapin::Channel| {
        let queue = queue.to_owned();
        let channel = channel.clone();
        async move {
            tokio::time::timeout(
                WAIT,
                channel.basic_get(queue.as_str().into(), BasicGetOptions { no_ack: true }),
            )
            .await
            .context("basic_get timed out")?
            .context("basic_get")
        }
    };
    let first = get(&channel)
        .await?
        .with_context(|| format!("{queue} is empty"))?;
    ensure!(
        get(&channel).await?.is_none(),
        "{queue} holds more than one message"
    );
    let _ = channel.close(200, "taken".into()).await;
    Ok(first.delivery)
}

fn header_names(delivery: &Delivery) -> Vec<String> {
    delivery
        .properties
        .headers()
        .as_ref()
        .map(|h| h.inner().keys().map(|k| k.as_str().to_owned()).collect())
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_each_component_keeps_is_listed_with_reason_job_size_and_origin() -> Result<()> {
    let mut env = TestEnv::new("dead-list").await?;
    env.start_splitter()?;
    env.start_reducer()?;
    env.start_worker(WorkerOpts {
        operations: Some(vec!["noop".into()]),
        ..WorkerOpts::default()
    })?;
    // The worker declares and binds its work queue when it starts: wait for its heartbeat.
    env.wait_for_workers(1, WAIT).await?;
    let ns = env.ns.clone();

    // The splitter rejects a JobSpec with an unknown field.
    let rejected = env.job_id("rejected");
    let spec = json!({"job_id": rejected, "operation": "noop", "items": [1], "colour": "red"});
    let spec_size = serde_json::to_vec(&spec)?.len();
    env.submit(&spec).await?;
    // The reducer cannot decode an input of an unknown type.
    let unreadable = env.job_id("unreadable");
    let input = serde_json::to_vec(&json!({"type": "nonsense", "job_id": unreadable}))?;
    publish(
        &env,
        &env.names.events(),
        KEY_REDUCER,
        &input,
        json_properties(),
    )
    .await?;
    // A worker cannot read a "fragment" without its fields.
    let broken = env.job_id("broken");
    let fragment = serde_json::to_vec(&json!({"job_id": broken, "not": "a fragment"}))?;
    publish(
        &env,
        &env.names.work(),
        "noop",
        &fragment,
        json_properties(),
    )
    .await?;

    wait_for_depth(&env, &env.names.dead(), 3).await?;
    let rows = listed(&env).await?;
    assert_eq!(rows.len(), 3, "{rows:#?}");
    let expectations = [
        (
            &rejected,
            "colour",
            spec_size,
            format!("{ns}.jobs"),
            KEY_SUBMIT,
        ),
        (
            &unreadable,
            "not a reducer input",
            input.len(),
            format!("{ns}.events"),
            KEY_REDUCER,
        ),
        (
            &broken,
            "not a fragment",
            fragment.len(),
            format!("{ns}.work"),
            "noop",
        ),
    ];
    for (job, reason, size, exchange, key) in expectations {
        let row = row_of(&rows, job)?;
        let text = row["reason"].as_str().unwrap_or_default();
        assert!(text.contains(reason), "reason of {job}: {text:?}");
        assert_eq!(row["size"], json!(size), "size of {job}");
        assert_eq!(row["origin_exchange"], json!(exchange), "origin of {job}");
        assert_eq!(row["origin_routing_key"], json!(key), "origin key of {job}");
        assert_eq!(row["kept_by"], json!("batchq"), "{job}");
        let age = row["age_secs"]
            .as_u64()
            .with_context(|| format!("age of {job}"))?;
        assert!(age <= 60, "{job} kept {age} s ago");
    }

    let table = batchctl_ok(&env, &["dead"]).await?;
    let lines: Vec<&str> = table.lines().collect();
    assert_eq!(
        lines.len(),
        4,
        "a header and one line per message:\n{table}"
    );
    assert!(lines[0].starts_with("#  JOB"), "{table}");
    for (job, reason, size, exchange, key) in [
        (
            &rejected,
            "colour",
            spec_size,
            format!("{ns}.jobs"),
            KEY_SUBMIT,
        ),
        (
            &broken,
            "not a fragment",
            fragment.len(),
            format!("{ns}.work"),
            "noop",
        ),
    ] {
        let line = lines
            .iter()
            .find(|l| l.contains(job.as_str()))
            .with_context(|| format!("no line of {job}:\n{table}"))?;
        assert!(line.contains(&format!(" {size} ")), "size in {line:?}");
        assert!(
            line.contains(&format!("{exchange}/{key}")),
            "origin in {line:?}"
        );
        assert!(line.contains(reason), "reason in {line:?}");
    }
    env.finish().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listing_again_and_again_loses_and_reorders_nothing() -> Result<()> {
    let env = TestEnv::new("dead-relist").await?;
    let mut bodies = Vec::new();
    for i in 0..5 {
        let job = format!("job-{i}");
        let body = serde_json::to_vec(&json!({"job_id": job, "n": i}))?;
        let kept = DeadLetter::from_parts(
            &env.names.jobs(),
            KEY_SUBMIT,
            body.clone(),
            &json_properties(),
            &format!("reason {i}"),
            None,
        );
        publish(
            &env,
            &env.names.dead(),
            KEY_SUBMIT,
            &kept.body,
            kept.properties,
        )
        .await?;
        bodies.push(body);
    }
    // More listings than the delivery limit batchq gives its other quorum queues: a dead queue
    // with such a limit would drop messages here.
    let listings = MAX_DELIVERIES as usize + 2;
    for listing in 0..listings {
        let rows = listed(&env).await?;
        let jobs: Vec<&str> = rows.iter().filter_map(|r| r["job_id"].as_str()).collect();
        assert_eq!(
            jobs,
            ["job-0", "job-1", "job-2", "job-3", "job-4"],
            "listing {listing}"
        );
        let positions: Vec<u64> = rows.iter().filter_map(|r| r["position"].as_u64()).collect();
        assert_eq!(positions, [1, 2, 3, 4, 5], "listing {listing}");
        assert_eq!(rows[3]["reason"], json!("reason 3"));
        assert_eq!(
            env.queue_depth(&env.names.dead()).await?,
            5,
            "after listing {listing}"
        );
    }
    let limited = batchctl_ok(&env, &["dead", "--limit", "2"]).await?;
    assert_eq!(limited.lines().count(), 4, "{limited}");
    assert!(
        limited.contains("2 of 5 messages listed (--limit 2)"),
        "{limited}"
    );

    let left = env.drain_dead().await?;
    let left_bodies: Vec<Vec<u8>> = left.into_iter().map(|m| m.body).collect();
    assert_eq!(left_bodies, bodies, "the same bodies in the same order");
    env.finish().await
}

/// Re-creates `queue` (bound to `{ns}.events` with `key`) with the arguments batchq 0.1 gave
/// it: quorum, a delivery limit of 5, dead-lettering to `{ns}.dead`.
async fn declare_queue_as_0_1(env: &TestEnv, queue: &str, key: &str) -> Result<()> {
    use common::lapin::options::{QueueBindOptions, QueueDeclareOptions, QueueDeleteOptions};
    let channel = env.broker().channel().await?;
    channel
        .queue_delete(queue.into(), QueueDeleteOptions::default())
        .await?;
    let mut args = FieldTable::default();
    for (name, value) in [
        (
            "x-queue-type",
            AMQPValue::LongString(LongString::from("quorum")),
        ),
        (
            "x-delivery-limit",
            AMQPValue::LongLongInt(MAX_DELIVERIES - 1),
        ),
        (
            "x-dead-letter-exchange",
            AMQPValue::LongString(LongString::from(env.names.dead().as_str())),
        ),
        (
            "x-dead-letter-strategy",
            AMQPValue::LongString(LongString::from("at-least-once")),
        ),
        (
            "x-overflow",
            AMQPValue::LongString(LongString::from("reject-publish")),
        ),
    ] {
        args.insert(ShortString::from(name), value);
    }
    channel
        .queue_declare(queue.into(), QueueDeclareOptions::durable(), args)
        .await?;
    channel
        .queue_bind(
            queue.into(),
            env.names.events().into(),
            key.into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await?;
    let _ = channel.close(200, "declared as 0.1".into()).await;
    Ok(())
}

/// Returns the one message on `queue` to it until the broker dead-letters it (delivery limit)
/// and `{ns}.dead` holds `dead_after` messages. A returned message is applied by the quorum
/// queue a moment later: an empty `basic.get` meanwhile only means "look again".
async fn exhaust_delivery_limit(env: &TestEnv, queue: &str, dead_after: u32) -> Result<()> {
    let channel = env.broker().channel().await?;
    let deadline = Instant::now() + WAIT;
    let mut returns = 0;
    while env.queue_depth(&env.names.dead()).await? < dead_after {
        ensure!(
            Instant::now() < deadline,
            "{queue}: not dead-lettered within {WAIT:?} after {returns} returns"
        );
        let got = tokio::time::timeout(
            WAIT,
            channel.basic_get(queue.into(), BasicGetOptions { no_ack: false }),
        )
        .await
        .context("basic_get timed out")??;
        match got {
            Some(message) => {
                message
                    .delivery
                    .acker
                    .reject(BasicRejectOptions { requeue: true })
                    .await?;
                returns += 1;
            }
            None => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
    let _ = channel.close(200, "dead-lettered".into()).await;
    ensure!(
        returns == MAX_DELIVERIES,
        "{queue}: dead-lettered after {returns} deliveries"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requeue_moves_only_the_jobs_messages_back_and_purge_drops_them() -> Result<()> {
    let mut env = TestEnv::new("dead-requeue").await?;
    let splitter = env.start_splitter()?;
    let dead = env.names.dead();
    let first = env.job_id("first");
    let second = env.job_id("second");
    let mut first_body = Vec::new();
    for job in [&first, &second] {
        let spec = json!({"job_id": job, "operation": "noop", "range": {"start": 5, "end": 1}});
        if job == &first {
            first_body = serde_json::to_vec(&spec)?;
        }
        env.submit(&spec).await?;
    }
    wait_for_depth(&env, &dead, 2).await?;
    // From here on nothing consumes {ns}.jobs or {ns}.splitter: what arrives there stays.
    env.kill(splitter, Signal::Kill)?;

    // The broker's own dead-lettering: a settlement returned until its delivery limit, on
    // {ns}.splitter as batchq 0.1 declared it (current versions declare it without a limit,
    // so only such an upgraded deployment gets broker dead letters on {ns}.dead).
    declare_queue_as_0_1(&env, &env.names.splitter_queue(), KEY_SETTLED).await?;
    let settled = env.job_id("settled");
    let settled_body = serde_json::to_vec(&json!({"job_id": settled, "garbage": true}))?;
    publish(
        &env,
        &env.names.events(),
        KEY_SETTLED,
        &settled_body,
        json_properties(),
    )
    .await?;
    exhaust_delivery_limit(&env, &env.names.splitter_queue(), 3).await?;
    // A message nobody can place: published to {ns}.dead by hand.
    let stray = env.job_id("stray");
    let mut headers = FieldTable::default();
    headers.insert(
        ShortString::from("x-batchq-job-id"),
        AMQPValue::LongString(LongString::from(stray.as_str())),
    );
    publish(
        &env,
        &dead,
        "",
        b"stray",
        json_properties().with_headers(headers),
    )
    .await?;
    // A message whose origin routes nowhere: a status no one subscribes to.
    let unroutable = env.job_id("unroutable");
    let status_key = format!("job.{unroutable}.failed");
    let kept = DeadLetter::from_parts(
        &env.names.status(),
        &status_key,
        b"{}".to_vec(),
        &json_properties(),
        "kept by hand",
        Some(&unroutable),
    );
    publish(&env, &dead, "", &kept.body, kept.properties).await?;
    wait_for_depth(&env, &dead, 5).await?;

    let rows = listed(&env).await?;
    let broker_row = row_of(&rows, &settled)?;
    assert_eq!(broker_row["kept_by"], json!("broker"));
    let reason = broker_row["reason"].as_str().unwrap_or_default();
    assert!(
        reason.contains("delivery_limit") && reason.contains(&env.names.splitter_queue()),
        "{reason:?}"
    );
    assert_eq!(broker_row["origin_exchange"], json!(env.names.events()));
    assert_eq!(broker_row["origin_routing_key"], json!(KEY_SETTLED));
    assert!(
        row_of(&rows, &first)?["reason"]
            .as_str()
            .unwrap_or_default()
            .contains("range"),
        "{rows:#?}"
    );

    // Only the first job's JobSpec moves, back to {ns}.jobs with batchq's headers gone.
    let out = batchctl_ok(&env, &["dead", "requeue", "--job", &first]).await?;
    assert_eq!(
        out,
        format!("requeued 1 message(s) to their origin; 4 left on {dead}\n")
    );
    let back = take_one(&env, &env.names.jobs()).await?;
    assert_eq!(back.data, first_body);
    assert_eq!(back.routing_key.as_str(), KEY_SUBMIT);
    let names = header_names(&back);
    assert!(
        BATCHQ_HEADERS
            .iter()
            .all(|h| !names.contains(&h.to_string())),
        "{names:?}"
    );
    assert_eq!(env.queue_depth(&dead).await?, 4);

    // The broker's dead letter goes back to the queue it was taken from, its history kept.
    let out = batchctl_ok(&env, &["dead", "requeue", "--job", &settled]).await?;
    assert!(out.starts_with("requeued 1 message(s)"), "{out}");
    let back = take_one(&env, &env.names.splitter_queue()).await?;
    assert_eq!(back.data, settled_body);
    assert!(header_names(&back).contains(&X_DEATH_HEADER.to_owned()));

    // No origin: it stays, and the report says why.
    let out = batchctl_ok(&env, &["dead", "requeue", "--job", &stray]).await?;
    assert_eq!(
        out,
        format!(
            "requeued 0 message(s) to their origin; 3 left on {dead}\n\
             not requeued: #2 (job {stray}): where it came from is not known\n"
        )
    );
    // Published mandatory: a message its origin does not route stays, and is named.
    let out = batchctl_ok(&env, &["dead", "requeue", "--job", &unroutable]).await?;
    assert_eq!(
        out,
        format!(
            "requeued 0 message(s) to their origin; 3 left on {dead}\n\
             not requeued: #3 (job {unroutable}): no queue takes routing key {status_key:?} \
             on exchange {:?}\n",
            env.names.status()
        )
    );
    assert_eq!(env.queue_depth(&dead).await?, 3);

    let out = batchctl_ok(&env, &["dead", "purge", "--job", &second, "--yes"]).await?;
    assert_eq!(
        out,
        format!("purged 1 message(s) of job {second} from {dead}; 2 left\n")
    );
    let rows = listed(&env).await?;
    let jobs: Vec<&str> = rows.iter().filter_map(|r| r["job_id"].as_str()).collect();
    assert_eq!(jobs, [stray.as_str(), unroutable.as_str()], "{rows:#?}");

    let out = batchctl_ok(&env, &["dead", "purge", "--yes"]).await?;
    assert_eq!(out, format!("purged 2 message(s) from {dead}\n"));
    assert_eq!(env.queue_depth(&dead).await?, 0);

    let (status, stdout, stderr) = env.batchctl(&["dead", "requeue", "--job", ""]).await?;
    assert_eq!(status.code(), Some(2));
    assert_eq!(stdout, "");
    assert_eq!(
        stderr,
        "batchctl: --job needs a job id, not an empty string\n"
    );
    env.finish().await
}
