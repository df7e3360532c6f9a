//! PostgreSQL for the tests: a fresh database per test, and the choice of store a test
//! executable runs its splitters and reducers with.
//!
//! The server is `BATCHQ_TEST_POSTGRES_URL`, default `postgres://postgres@127.0.0.1:5432`
//! (trust authentication, as `.ci/run` sets it up). A [`TestDatabase`] is a database
//! `bq_{16 hex}` on it, created empty and dropped (`DROP DATABASE … WITH (FORCE)`, which
//! disconnects whatever still uses it) when the test ends; `BATCHQ_TEST_KEEP=1` keeps it.
//!
//! Which store a [`crate::TestEnv`] gives its processes ([`StoreMode`]): `BATCHQ_TEST_STORE`
//! (`postgres` or `sqlite`) when set, otherwise the name of the test executable: the binary of
//! `tests/tests/spine_pg.rs`, `spine_pg-{hash}`, runs on PostgreSQL, every other on SQLite.

use std::time::Duration;

use anyhow::{Context, Result, bail};

/// The server of the tests' databases when `BATCHQ_TEST_POSTGRES_URL` is unset.
pub const DEFAULT_TEST_POSTGRES_URL: &str = "postgres://postgres@127.0.0.1:5432";

/// How long connecting to the server may take before the test fails.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// The PostgreSQL server of the tests: `BATCHQ_TEST_POSTGRES_URL`, or
/// [`DEFAULT_TEST_POSTGRES_URL`].
pub fn test_postgres_url() -> String {
    std::env::var("BATCHQ_TEST_POSTGRES_URL")
        .ok()
        .filter(|u| !u.trim().is_empty())
        .unwrap_or_else(|| DEFAULT_TEST_POSTGRES_URL.to_owned())
}

// ---------------------------------------------------------------------------------------------
// Store mode

/// Where the splitters and reducers of a [`crate::TestEnv`] keep their state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreMode {
    /// The embedded SQLite stores in `BATCHQ_DATA_DIR` (the binaries' default).
    Sqlite,
    /// A [`TestDatabase`] of the test, given as `BATCHQ_DATABASE_URL`.
    Postgres,
}

impl StoreMode {
    /// The mode of this test executable: `BATCHQ_TEST_STORE`, else its file name
    /// ([`StoreMode::from_parts`]).
    pub fn detect() -> Result<Self> {
        let exe = std::env::current_exe().ok();
        let stem = exe
            .as_deref()
            .and_then(|p| p.file_stem())
            .and_then(|s| s.to_str());
        let setting = std::env::var("BATCHQ_TEST_STORE").ok();
        Self::from_parts(setting.as_deref(), stem)
    }

    /// The mode given the value of `BATCHQ_TEST_STORE` (if set) and the file stem of the test
    /// executable (if known). The setting wins; an empty one counts as unset.
    pub fn from_parts(setting: Option<&str>, exe_stem: Option<&str>) -> Result<Self> {
        match setting.map(str::trim).filter(|s| !s.is_empty()) {
            Some(s)
                if s.eq_ignore_ascii_case("postgres") || s.eq_ignore_ascii_case("postgresql") =>
            {
                Ok(Self::Postgres)
            }
            Some(s) if s.eq_ignore_ascii_case("sqlite") => Ok(Self::Sqlite),
            Some(other) => bail!("BATCHQ_TEST_STORE={other:?}: expected `postgres` or `sqlite`"),
            None if exe_stem.is_some_and(exe_stem_says_postgres) => Ok(Self::Postgres),
            None => Ok(Self::Sqlite),
        }
    }
}

/// Whether a test executable's file stem names a PostgreSQL suite: cargo names the binary of
/// `tests/tests/spine_pg.rs` `spine_pg-{hash}`, so the part before the last `-` ends in `_pg`.
/// A stem without a `-` (an executable not built by cargo's test harness) is taken whole.
pub fn exe_stem_says_postgres(stem: &str) -> bool {
    let name = stem.rsplit_once('-').map_or(stem, |(name, _hash)| name);
    name.ends_with("_pg")
}

/// Whether a test that wants PostgreSQL goes without it: `true` (after a line on stderr) when
/// the server does not answer and `BATCHQ_TEST_REQUIRE_POSTGRES` is unset; an error when it
/// does not answer and the run requires it (`.ci/run` does), so CI never skips one.
pub async fn skip_without_postgres(test: &str) -> Result<bool> {
    let server = test_postgres_url();
    let answered = tokio::time::timeout(
        Duration::from_secs(3),
        tokio_postgres::connect(&server, tokio_postgres::NoTls),
    )
    .await;
    let error = match answered {
        Ok(Ok((_client, _connection))) => return Ok(false),
        Ok(Err(e)) => e.to_string(),
        Err(_) => "no answer within 3 s".to_owned(),
    };
    let required = std::env::var("BATCHQ_TEST_REQUIRE_POSTGRES")
        .is_ok_and(|v| !v.trim().is_empty() && v.trim() != "0");
    if required {
        bail!(
            "PostgreSQL ({server}) does not answer ({error}), and BATCHQ_TEST_REQUIRE_POSTGRES is set"
        );
    }
    eprintln!(
        "SKIPPED on PostgreSQL: test {test}: PostgreSQL ({server}) does not answer ({error}); \
         the PostgreSQL suites run on SQLite and the standby tests are skipped. Start PostgreSQL \
         (or set BATCHQ_TEST_POSTGRES_URL) to run them; BATCHQ_TEST_REQUIRE_POSTGRES=1 fails instead."
    );
    Ok(true)
}

// ---------------------------------------------------------------------------------------------
// Databases

/// `base` (a `postgres://` URL with or without a database) naming database `database`
/// instead: the path is replaced, the authority and any `?query` are kept.
pub fn url_with_database(base: &str, database: &str) -> Result<String> {
    let Some((scheme, rest)) = base.split_once("://") else {
        bail!("{base:?} is not a postgres:// URL");
    };
    if scheme != "postgres" && scheme != "postgresql" {
        bail!("{base:?} is not a postgres:// URL");
    }
    let (before_query, query) = match rest.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (rest, None),
    };
    let authority = before_query
        .split_once('/')
        .map_or(before_query, |(authority, _path)| authority);
    if authority.is_empty() {
        bail!("{base:?} names no host");
    }
    let mut url = format!("{scheme}://{authority}/{database}");
    if let Some(query) = query {
        url.push('?');
        url.push_str(query);
    }
    Ok(url)
}

/// A database of its own for one test, dropped when the value is dropped (or by
/// [`TestDatabase::drop_now`]).
#[derive(Debug)]
pub struct TestDatabase {
    /// The server, as given: used for CREATE and DROP.
    server: String,
    name: String,
    url: String,
    dropped: bool,
}

impl TestDatabase {
    /// Creates an empty database `bq_{16 hex}` on [`test_postgres_url`].
    pub async fn create() -> Result<Self> {
        Self::create_on(&test_postgres_url()).await
    }

    /// Creates an empty database `bq_{16 hex}` on the server `server`.
    pub async fn create_on(server: &str) -> Result<Self> {
        let suffix = uuid::Uuid::new_v4().simple().to_string();
        let name = format!("bq_{}", &suffix[..16]);
        let url = url_with_database(server, &name)?;
        let client = connect(server).await?;
        client
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .await
            .with_context(|| format!("creating database {name} on {server}"))?;
        Ok(Self {
            server: server.to_owned(),
            name,
            url,
            dropped: false,
        })
    }

    /// The database's name, `bq_…`.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// `postgres://…/bq_…`: the `BATCHQ_DATABASE_URL` of the test's processes.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// A connection to the database, for a test that looks at what the stores wrote.
    pub async fn connect(&self) -> Result<tokio_postgres::Client> {
        connect(&self.url).await
    }

    /// Drops the database now (disconnecting whatever still uses it); with `BATCHQ_TEST_KEEP`
    /// set, keeps it and says where it is.
    pub async fn drop_now(mut self) -> Result<()> {
        self.dropped = true;
        if keep() {
            eprintln!("BATCHQ_TEST_KEEP: keeping database {}", self.url);
            return Ok(());
        }
        drop_database(&self.server, &self.name).await
    }
}

impl Drop for TestDatabase {
    fn drop(&mut self) {
        if self.dropped {
            return;
        }
        self.dropped = true;
        if keep() {
            eprintln!("BATCHQ_TEST_KEEP: keeping database {}", self.url);
            return;
        }
        // Drop cannot await and may run inside the test's runtime: a thread with a runtime of
        // its own does it.
        let server = self.server.clone();
        let name = self.name.clone();
        let dropping = std::thread::spawn(move || {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .context("building a runtime")?
                .block_on(drop_database(&server, &name))
        });
        match dropping.join() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => eprintln!("could not drop database {}: {e:#}", self.name),
            Err(_) => eprintln!("the thread dropping database {} panicked", self.name),
        }
    }
}

fn keep() -> bool {
    std::env::var_os("BATCHQ_TEST_KEEP").is_some()
}

async fn drop_database(server: &str, name: &str) -> Result<()> {
    let client = connect(server).await?;
    tokio::time::timeout(
        Duration::from_secs(30),
        client.batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)")),
    )
    .await
    .with_context(|| format!("dropping database {name} timed out"))?
    .with_context(|| format!("dropping database {name}"))
}

/// A connection to `url`, driven by a task of the current runtime.
async fn connect(url: &str) -> Result<tokio_postgres::Client> {
    let mut config: tokio_postgres::Config = url
        .parse()
        .with_context(|| format!("{url:?} is not a PostgreSQL URL"))?;
    config.connect_timeout(CONNECT_TIMEOUT);
    let (client, connection) = tokio::time::timeout(
        CONNECT_TIMEOUT,
        config.connect(tokio_postgres::NoTls),
    )
    .await
    .with_context(|| format!("connecting to {url} timed out"))?
    .with_context(|| {
        format!(
            "connecting to {url} (the PostgreSQL tests need a server there: `.ci/run` starts \
                 one; or set BATCHQ_TEST_POSTGRES_URL)"
        )
    })?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            eprintln!("PostgreSQL connection ended: {e}");
        }
    });
    Ok(client)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cargo_test_binaries_of_pg_suites_run_on_postgres() {
        for stem in [
            "spine_pg-0123456789abcdef",
            "crash_pg-5f3c1d2e",
            "faults_pg-1",
            "ha_takeover_pg-abcdef",
            "spine_pg",
        ] {
            assert!(exe_stem_says_postgres(stem), "{stem}");
        }
        for stem in [
            "spine-0123456789abcdef",
            "crash-5f3c1d2e",
            // `_pg` not at the end of the name, or only in the hash.
            "spine_pgx-0123",
            "pg_spine-0123",
            "spine-abc_pg",
            "spine",
            "batchq_tests-0123",
            "",
        ] {
            assert!(!exe_stem_says_postgres(stem), "{stem}");
        }
    }

    #[test]
    fn the_setting_wins_over_the_executable_name() -> Result<()> {
        use StoreMode::{Postgres, Sqlite};
        assert_eq!(StoreMode::from_parts(None, Some("spine-0123"))?, Sqlite);
        assert_eq!(
            StoreMode::from_parts(None, Some("spine_pg-0123"))?,
            Postgres
        );
        assert_eq!(StoreMode::from_parts(None, None)?, Sqlite);
        assert_eq!(
            StoreMode::from_parts(Some("postgres"), Some("spine-0123"))?,
            Postgres
        );
        assert_eq!(StoreMode::from_parts(Some("PostgreSQL"), None)?, Postgres);
        assert_eq!(
            StoreMode::from_parts(Some("sqlite"), Some("spine_pg-0123"))?,
            Sqlite
        );
        assert_eq!(
            StoreMode::from_parts(Some(" "), Some("spine_pg-0123"))?,
            Postgres
        );
        assert!(StoreMode::from_parts(Some("mysql"), None).is_err());
        Ok(())
    }

    #[test]
    fn database_urls_keep_the_server_and_its_options() -> Result<()> {
        assert_eq!(
            url_with_database("postgres://postgres@127.0.0.1:5432", "bq_1")?,
            "postgres://postgres@127.0.0.1:5432/bq_1"
        );
        assert_eq!(
            url_with_database("postgres://postgres@127.0.0.1:5432/", "bq_1")?,
            "postgres://postgres@127.0.0.1:5432/bq_1"
        );
        assert_eq!(
            url_with_database("postgresql://u:p@db:6432/postgres?sslmode=disable", "bq_1")?,
            "postgresql://u:p@db:6432/bq_1?sslmode=disable"
        );
        assert!(url_with_database("amqp://guest@127.0.0.1", "bq_1").is_err());
        assert!(url_with_database("postgres:///postgres", "bq_1").is_err());
        Ok(())
    }
}
