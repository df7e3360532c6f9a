//! The harness itself: the store each TestEnv gives its splitters and reducers, replicas with
//! logs and data folders of their own, and the per-test PostgreSQL database, created empty
//! and dropped at the end.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use batchq_tests::postgres::test_postgres_url;
use batchq_tests::{ProcId, StoreMode, TestDatabase, TestEnv, amqp_url};

/// `BATCHQ_TEST_KEEP` keeps the databases too.
fn keep() -> bool {
    std::env::var_os("BATCHQ_TEST_KEEP").is_some()
}

/// The environment a running process was started with, from /proc.
fn environ_of(env: &TestEnv, id: ProcId) -> Result<Vec<(String, String)>> {
    let pid = env.pid(id).context("the process runs")?;
    let raw = std::fs::read(format!("/proc/{pid}/environ"))
        .with_context(|| format!("reading the environment of {pid}"))?;
    Ok(raw
        .split(|b| *b == 0)
        .filter_map(|entry| {
            let entry = String::from_utf8_lossy(entry);
            entry
                .split_once('=')
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
        })
        .collect())
}

fn var(environ: &[(String, String)], name: &str) -> Option<String> {
    environ
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.clone())
}

async fn database_exists(name: &str) -> Result<bool> {
    let (client, connection) = tokio_postgres::connect(&test_postgres_url(), tokio_postgres::NoTls)
        .await
        .context("connecting to the tests' PostgreSQL")?;
    let task = tokio::spawn(connection);
    let row = client
        .query_one(
            "SELECT count(*) FROM pg_database WHERE datname = $1",
            &[&name],
        )
        .await?;
    drop(client);
    let _ = task.await;
    Ok(row.get::<_, i64>(0) == 1)
}

/// Two replicas of each role: distinct labels, logs and data folders, the first of each in
/// `data_dir()`.
fn check_replicas(env: &TestEnv, first: ProcId, second: ProcId, role: &str) -> Result<()> {
    assert_eq!(env.label(first), format!("{role}-1"));
    assert_eq!(env.label(second), format!("{role}-2"));
    let logs: Vec<&PathBuf> = env
        .log_paths(first)
        .iter()
        .chain(env.log_paths(second))
        .collect();
    ensure!(
        logs.len() == 2 && logs[0] != logs[1],
        "{role}: one log each: {logs:?}"
    );
    assert_eq!(env.data_dir_of(first), Some(env.data_dir()));
    let second_dir = env.data_dir_of(second).context("a data dir")?;
    ensure!(
        second_dir != env.data_dir(),
        "{role}-2 shares the data dir of {role}-1"
    );
    for id in [first, second] {
        let environ = environ_of(env, id)?;
        assert_eq!(
            var(&environ, "BATCHQ_DATA_DIR").map(PathBuf::from),
            env.data_dir_of(id),
            "{}: BATCHQ_DATA_DIR",
            env.label(id)
        );
        assert_eq!(
            var(&environ, "BATCHQ_DATABASE_URL").as_deref(),
            env.database_url(),
            "{}: BATCHQ_DATABASE_URL",
            env.label(id)
        );
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_replicas_get_data_dirs_of_their_own_and_no_database() -> Result<()> {
    let mut env =
        TestEnv::with_store("harness-sqlite", &amqp_url(), None, StoreMode::Sqlite).await?;
    assert_eq!(env.store_mode(), StoreMode::Sqlite);
    assert_eq!(env.database_url(), None);
    let splitter = env.start_splitter()?;
    let reducer = env.start_reducer()?;
    let reducer_2 = env.start_reducer_with(&["--retention", "0"])?;
    let splitter_2 = env.start_replica(splitter)?;
    // Let them get past reading their settings.
    tokio::time::sleep(Duration::from_millis(300)).await;
    check_replicas(&env, splitter, splitter_2, "splitter")?;
    check_replicas(&env, reducer, reducer_2, "reducer")?;
    env.finish().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_replicas_share_a_database_of_the_test_dropped_at_the_end() -> Result<()> {
    let Some(mut env) = TestEnv::postgres("harness-pg").await? else {
        return Ok(());
    };
    assert_eq!(env.store_mode(), StoreMode::Postgres);
    let url = env.database_url().context("a database URL")?.to_owned();
    let name = env.database().context("a database")?.name().to_owned();
    ensure!(
        name.starts_with("bq_") && url.ends_with(&format!("/{name}")),
        "{name} at {url}"
    );
    ensure!(
        database_exists(&name).await?,
        "{name} exists during the test"
    );
    let client = env.database().context("a database")?.connect().await?;
    let current: String = client
        .query_one("SELECT current_database()", &[])
        .await?
        .get(0);
    assert_eq!(current, name);

    let splitter = env.start_splitter()?;
    let reducer = env.start_reducer()?;
    let splitter_2 = env.start_replica(splitter)?;
    let reducer_2 = env.start_replica(reducer)?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    check_replicas(&env, splitter, splitter_2, "splitter")?;
    check_replicas(&env, reducer, reducer_2, "reducer")?;

    // The processes keep their state there (finish() checks it too): their schemas appear.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let schemas = env.database_schemas().await?;
        if ["_splitter", "_reducer"]
            .iter()
            .all(|suffix| schemas.iter().any(|s| s.ends_with(suffix)))
        {
            break;
        }
        ensure!(
            Instant::now() < deadline,
            "no schemas of the splitter and reducer in {name} within 30 s (do they read \
             BATCHQ_DATABASE_URL?): {schemas:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // finish() drops the database, whoever is still connected to it.
    env.finish().await?;
    ensure!(
        keep() || !database_exists(&name).await?,
        "{name} still exists after finish()"
    );
    drop(client);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_is_dropped_on_drop_too() -> Result<()> {
    let database = TestDatabase::create().await?;
    let name = database.name().to_owned();
    let client = database.connect().await?;
    client
        .batch_execute("CREATE TABLE t (x int); INSERT INTO t VALUES (1)")
        .await?;
    ensure!(database_exists(&name).await?, "{name} exists");
    drop(database);
    ensure!(
        keep() || !database_exists(&name).await?,
        "{name} still exists after drop"
    );
    Ok(())
}
