//! The PostgreSQL plumbing and the lease against the PostgreSQL on 127.0.0.1:5432 (or
//! `BATCHQ_TEST_POSTGRES_URL`), each test in a database of its own, dropped after.

use std::time::Duration;

use common::lease::{Elector, TermEnd};
use common::pg::PgDatabase;
use common::store::StoreError;
use tokio_util::sync::CancellationToken;

fn server_url() -> String {
    std::env::var("BATCHQ_TEST_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_owned())
}

/// A database of its own, dropped when the test ends.
struct Scratch {
    name: String,
}

impl Scratch {
    async fn new() -> Self {
        let name = format!("bq_common_{}", uuid::Uuid::new_v4().simple());
        admin(&format!("CREATE DATABASE {name}")).await;
        Self { name }
    }

    fn url(&self) -> String {
        let base = server_url();
        let (server, _) = base.rsplit_once('/').expect("a database in the URL");
        format!("{server}/{}", self.name)
    }

    async fn drop_now(self) {
        admin(&format!(
            "DROP DATABASE IF EXISTS {} WITH (FORCE)",
            self.name
        ))
        .await;
    }
}

async fn admin(sql: &str) {
    let (client, connection) = tokio_postgres::connect(&server_url(), tokio_postgres::NoTls)
        .await
        .expect("PostgreSQL answers on 127.0.0.1:5432");
    let task = tokio::spawn(connection);
    client.batch_execute(sql).await.expect(sql);
    drop(client);
    let _ = task.await;
}

fn database(scratch: &Scratch) -> PgDatabase {
    PgDatabase::new(&scratch.url(), "t.ns", "reducer", Duration::from_secs(3), 4).expect("pool")
}

const V1: &str = "CREATE TABLE counts (k TEXT PRIMARY KEY, n BIGINT NOT NULL)";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fenced_transaction_commits_only_while_its_lease_is_current() {
    let scratch = Scratch::new().await;
    let db = database(&scratch);
    assert_eq!(db.migrate(&[V1]).await.expect("migrated"), 0);
    assert_eq!(db.migrate(&[V1]).await.expect("again: nothing to do"), 1);

    let a = Elector::new(db.clone(), "reducer", "host-a", Duration::from_millis(600));
    let b = Elector::new(db.clone(), "reducer", "host-b", Duration::from_millis(600));
    let fence_a = a.try_acquire().await.expect("lease").expect("free");
    assert!(b.try_acquire().await.expect("lease").is_none(), "held by a");

    let write = |fence: common::lease::Fence, n: i64| {
        let db = db.clone();
        tokio::task::spawn_blocking(move || {
            db.transaction(Some(&fence), |tx| {
                tx.execute(
                    "INSERT INTO counts (k, n) VALUES ('x', $1)
                     ON CONFLICT (k) DO UPDATE SET n = excluded.n",
                    &[&n],
                )
            })
        })
    };
    write(fence_a.clone(), 1)
        .await
        .expect("join")
        .expect("a commits");

    // a stops renewing; after the ttl, b takes over with a new token.
    tokio::time::sleep(Duration::from_millis(700)).await;
    let fence_b = b.try_acquire().await.expect("lease").expect("expired");
    assert_eq!(fence_b.token, fence_a.token + 1);

    let stale = write(fence_a.clone(), 2).await.expect("join");
    assert!(
        matches!(stale, Err(StoreError::Fenced { token, .. }) if token == fence_a.token),
        "{stale:?}"
    );
    write(fence_b.clone(), 3)
        .await
        .expect("join")
        .expect("b commits");
    assert!(!a.renew(&fence_a).await.expect("renew"), "a learns it lost");

    let n: i64 = {
        let db = db.clone();
        tokio::task::spawn_blocking(move || {
            db.read(|tx| {
                Ok(tx
                    .query_one("SELECT n FROM counts WHERE k = 'x'", &[])?
                    .get(0))
            })
        })
        .await
        .expect("join")
        .expect("read")
    };
    assert_eq!(n, 3, "the fenced write left nothing");

    // b hands over on shutdown: a takes the lease at once, with the next token.
    b.release(&fence_b).await.expect("released");
    let again = a.try_acquire().await.expect("lease").expect("handed over");
    assert_eq!(again.token, fence_b.token + 1);

    let stop = CancellationToken::new();
    let holding = {
        let (a, again, stop) = (a.clone(), again.clone(), stop.clone());
        tokio::spawn(async move { a.hold(&again, &stop).await })
    };
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(
        b.try_acquire().await.expect("lease").is_none(),
        "renewed past two ttls"
    );
    stop.cancel();
    assert_eq!(holding.await.expect("join"), TermEnd::Stopped);
    drop((a, b, db));
    scratch.drop_now().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_holder_paused_inside_a_transaction_does_not_hold_up_the_takeover() {
    let scratch = Scratch::new().await;
    let db = database(&scratch);
    db.migrate(&[V1]).await.expect("migrated");
    let ttl = Duration::from_millis(600);
    // Each replica's sessions carry its name; idle transactions last a minute.
    let replica = |name: &str| {
        PgDatabase::for_replica(
            &scratch.url(),
            "t.ns",
            "reducer",
            name,
            Duration::from_secs(60),
            2,
        )
        .expect("pool")
    };
    let (db_a, db_b) = (replica("host-a"), replica("host-b"));
    let a = Elector::new(db_a.clone(), "reducer", "host-a", ttl);
    let b = Elector::new(db_b.clone(), "reducer", "host-b", ttl);
    let fence_a = a.try_acquire().await.expect("lease").expect("free");

    // a checks its fence (holding the share lock) and then stalls, mid-transaction, far past
    // its lease: a SIGSTOP, a partition.
    let stalled = {
        let (db_a, fence_a) = (db_a.clone(), fence_a.clone());
        tokio::task::spawn_blocking(move || {
            db_a.transaction(Some(&fence_a), |tx| {
                tx.execute("INSERT INTO counts (k, n) VALUES ('a', 1)", &[])?;
                std::thread::sleep(Duration::from_secs(4));
                tx.execute("INSERT INTO counts (k, n) VALUES ('a2', 1)", &[])
            })
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    let began = std::time::Instant::now();
    let fence_b = loop {
        if let Some(fence) = b.try_acquire().await.expect("lease") {
            break fence;
        }
        assert!(
            began.elapsed() < Duration::from_secs(3),
            "b waited for a's stalled transaction"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(fence_b.token, fence_a.token + 1);
    assert!(
        began.elapsed() < Duration::from_secs(3),
        "took {:?}: the stalled session was not ended",
        began.elapsed()
    );
    let outcome = stalled.await.expect("join");
    assert!(
        outcome.is_err(),
        "a's transaction ended with its session: {outcome:?}"
    );
    let rows: i64 = {
        let db = db.clone();
        tokio::task::spawn_blocking(move || {
            db.read(|tx| Ok(tx.query_one("SELECT COUNT(*) FROM counts", &[])?.get(0)))
        })
        .await
        .expect("join")
        .expect("read")
    };
    assert_eq!(rows, 0, "nothing of a's stalled transaction was committed");
    drop((a, b, db, db_a, db_b));
    scratch.drop_now().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_schema_from_a_newer_batchq_is_refused() {
    let scratch = Scratch::new().await;
    let db = database(&scratch);
    db.migrate(&[V1, "ALTER TABLE counts ADD COLUMN m BIGINT"])
        .await
        .expect("version 2");
    let error = db.migrate(&[V1]).await.expect_err("refused");
    assert!(
        matches!(
            error,
            StoreError::NewerSchema {
                found: 2,
                supported: 1
            }
        ),
        "{error}"
    );
    drop(db);
    scratch.drop_now().await;
}
