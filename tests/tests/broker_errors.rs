//! A broker that refuses batchq (a wrong password, a missing vhost) is reported clearly:
//! `batchctl` exits 2 at once with one line naming the cause and the URL without its
//! password; a long-lived process logs exactly one ERROR naming the cause while it keeps
//! retrying, and gets to work once the user or vhost exists (credentials arriving late, as a
//! Kubernetes secret may). No password reaches any log line.
//!
//! The users and vhosts are made with `rabbitmqctl` on the shared broker under unique names
//! and deleted when the test ends, whatever its outcome.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use batchq_tests::{Bin, TestEnv, WorkerOpts, amqp_url, assert_counts, bin_path};
use common::broker::Broker;
use common::config::BrokerArgs;
use common::contract::JobState;
use serde_json::json;

/// Longest wait for a process to log what the test expects.
const LOG_TIMEOUT: Duration = Duration::from_secs(15);
/// Long enough for at least one more attempt at the 5 s pause after the first refusal.
const RETRYING_FOR: Duration = Duration::from_secs(6);

fn unique(prefix: &str) -> String {
    format!(
        "{prefix}-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..10]
    )
}

/// The tests' broker URL with other credentials and vhost (`%2f` for `/`).
fn url_with(user: &str, password: &str, vhost: &str) -> Result<String> {
    let base = amqp_url();
    let (scheme, rest) = base.split_once("://").context("AMQP_URL has no scheme")?;
    let host_and_path = rest.rsplit_once('@').map_or(rest, |(_, h)| h);
    let host = host_and_path.split('/').next().unwrap_or(host_and_path);
    Ok(format!("{scheme}://{user}:{password}@{host}/{vhost}"))
}

fn rabbitmqctl(args: &[&str]) -> Result<()> {
    let output = Command::new("rabbitmqctl")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .context("running rabbitmqctl (these tests make users and vhosts with it)")?;
    if !output.status.success() {
        bail!(
            "rabbitmqctl {} failed: {}",
            args.first().copied().unwrap_or_default(),
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(())
}

/// A broker user or vhost this test made (or will make); deleted on drop.
enum Made {
    User(String),
    Vhost(String),
}

impl Drop for Made {
    fn drop(&mut self) {
        let (command, name) = match self {
            Made::User(name) => ("delete_user", name),
            Made::Vhost(name) => ("delete_vhost", name),
        };
        // Absent when the test failed before making it: nothing to delete, nothing to say.
        let _ = rabbitmqctl(&[command, name]);
    }
}

/// A splitter started by the test itself, with its own `AMQP_URL` (the harness gives every
/// process the test's good one); killed on drop.
struct Splitter {
    child: Child,
    log: PathBuf,
}

impl Splitter {
    fn start(url: &str, namespace: &str, dir: &Path) -> Result<Self> {
        let log = dir.join("splitter-refused.log");
        let out = std::fs::File::create(&log)?;
        let child = Command::new(bin_path(Bin::Splitter))
            .env("AMQP_URL", url)
            .env("BATCHQ_NAMESPACE", namespace)
            .env("BATCHQ_DATA_DIR", dir.join("refused-data"))
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .env_remove("BATCHQ_TLS_CA_FILE")
            .env_remove("BATCHQ_METRICS_ADDR")
            .stdin(Stdio::null())
            .stdout(Stdio::from(out.try_clone()?))
            .stderr(Stdio::from(out))
            .spawn()
            .context("starting the splitter")?;
        Ok(Self { child, log })
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn error_lines(&self) -> Vec<String> {
        self.log_text()
            .lines()
            .filter(|l| l.contains(" ERROR "))
            .map(str::to_owned)
            .collect()
    }

    /// Waits until the log holds a line with `needle`, failing if the process exits.
    async fn wait_for_line(&mut self, needle: &str) -> Result<String> {
        let deadline = Instant::now() + LOG_TIMEOUT;
        loop {
            if let Some(line) = self.log_text().lines().find(|l| l.contains(needle)) {
                return Ok(line.to_owned());
            }
            if let Some(status) = self.child.try_wait()? {
                bail!("the splitter exited ({status}):\n{}", self.log_text());
            }
            ensure!(
                Instant::now() < deadline,
                "no line with {needle:?} within {LOG_TIMEOUT:?}:\n{}",
                self.log_text()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The one ERROR line a refusal gets, after the process has gone on retrying a while.
    async fn single_refusal(&mut self, cause: &str) -> Result<String> {
        let line = self.wait_for_line(" ERROR ").await?;
        tokio::time::sleep(RETRYING_FOR).await;
        ensure!(
            self.child.try_wait()?.is_none(),
            "the splitter must keep retrying, not exit:\n{}",
            self.log_text()
        );
        let errors = self.error_lines();
        assert_eq!(errors.len(), 1, "one ERROR per cause: {errors:#?}");
        assert!(line.contains(cause), "names the cause: {line}");
        Ok(line)
    }
}

impl Drop for Splitter {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs batchctl against `url` and checks it failed at once with one line naming `cause`.
async fn batchctl_refused(url: &str, cause: &str, shown_url: &str, secret: &str) -> Result<()> {
    let asked = Instant::now();
    let output = tokio::time::timeout(
        Duration::from_secs(10),
        tokio::process::Command::new(bin_path(Bin::Batchctl))
            .args(["--amqp-url", url, "--namespace", "batchq-refused", "jobs"])
            .env_remove("AMQP_URL")
            .env_remove("BATCHQ_TLS_CA_FILE")
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .output(),
    )
    .await
    .context("batchctl did not finish within 10 s")??;
    let took = asked.elapsed();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "stderr: {stderr}");
    assert!(took < Duration::from_secs(2), "refused after {took:?}");
    assert_eq!(stderr.trim().lines().count(), 1, "one line: {stderr}");
    assert!(stderr.contains(cause), "names the cause: {stderr}");
    assert!(stderr.contains(shown_url), "names the URL: {stderr}");
    assert!(!stderr.contains(secret), "shows the password: {stderr}");
    assert!(output.stdout.is_empty());
    Ok(())
}

#[tokio::test]
async fn batchctl_exits_at_once_naming_a_refused_login_or_vhost() -> Result<()> {
    let user = unique("batchq-nobody");
    let password = unique("pw");
    batchctl_refused(
        &url_with(&user, &password, "%2f")?,
        "login refused (ACCESS_REFUSED 403)",
        &format!("amqp://{user}:***@"),
        &password,
    )
    .await?;

    let vhost = unique("batchq-novhost");
    let good = amqp_url();
    let (user, password) = credentials(&good)?;
    batchctl_refused(
        &url_with(&user, &password, &vhost)?,
        "vhost refused (NOT_ALLOWED 530)",
        &format!("amqp://{user}:***@"),
        &format!("{user}:{password}@"),
    )
    .await
}

/// User and password of the tests' broker URL.
fn credentials(url: &str) -> Result<(String, String)> {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let (userinfo, _) = rest.rsplit_once('@').context("AMQP_URL has no user")?;
    let (user, password) = userinfo
        .split_once(':')
        .context("AMQP_URL has no password")?;
    Ok((user.to_owned(), password.to_owned()))
}

/// A splitter logging in as `user` is refused for `cause` while the rest of a deployment
/// works; `fix` mends it (as an operator or a late secret would) and the splitter, still the
/// same process, gets in and a job runs to the end. One ERROR all along, no password.
async fn refused_until_fixed(
    test: &str,
    user: &str,
    password: &str,
    cause: &str,
    fix: impl FnOnce() -> Result<()>,
) -> Result<()> {
    let mut env = TestEnv::new(test).await?;
    let url = url_with(user, password, "%2f")?;
    let mut splitter = Splitter::start(&url, &env.ns, env.dir())?;
    env.start_reducer()?;
    env.start_worker(WorkerOpts::default())?;
    let job_id = env.job_id("late");
    env.submit(&json!({
        "job_id": job_id,
        "operation": "noop",
        "range": {"start": 0, "end": 200},
        "fragment_size": 20,
    }))
    .await?;

    let line = splitter.single_refusal(cause).await?;
    assert!(line.contains(&format!("amqp://{user}:***@")), "{line}");

    fix()?;
    splitter.wait_for_line("lets this process in again").await?;
    let status = env
        .wait_for_terminal(&job_id, Duration::from_secs(30))
        .await?;
    assert_counts(&status, JobState::Succeeded, 200, 0);
    // One ERROR for the cause however many attempts it refused. A fix made of two steps (a
    // user created, then given permissions) may show the splitter one other cause in
    // between, logged once too: one line per change of cause.
    let errors = splitter.error_lines();
    assert_eq!(
        errors.iter().filter(|l| l.contains(cause)).count(),
        1,
        "{}",
        splitter.log_text()
    );
    assert!(errors.len() <= 2, "{}", splitter.log_text());

    drop(splitter);
    let mut logs = String::new();
    for entry in std::fs::read_dir(env.dir())? {
        let path = entry?.path();
        if path.extension().is_some_and(|e| e == "log") {
            logs.push_str(&std::fs::read_to_string(&path)?);
        }
    }
    assert!(!logs.contains(password), "a password reached a log line");
    env.finish().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_splitter_logs_a_refused_login_once_and_works_once_the_user_exists() -> Result<()> {
    let user = unique("batchq-late");
    let password = unique("pw-late");
    let _made = Made::User(user.clone());
    refused_until_fixed(
        "late-login",
        &user,
        &password,
        "login refused (ACCESS_REFUSED 403)",
        || {
            rabbitmqctl(&["add_user", &user, &password])?;
            rabbitmqctl(&["set_permissions", "-p", "/", &user, ".*", ".*", ".*"])
        },
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_splitter_logs_a_missing_permission_once_and_works_once_it_is_granted() -> Result<()> {
    let user = unique("batchq-noconf");
    let password = unique("pw-noconf");
    let _made = Made::User(user.clone());
    rabbitmqctl(&["add_user", &user, &password])?;
    // May publish and consume but not declare: the splitter's topology is refused.
    rabbitmqctl(&["set_permissions", "-p", "/", &user, "^$", ".*", ".*"])?;
    refused_until_fixed(
        "late-permission",
        &user,
        &password,
        "access refused (ACCESS_REFUSED 403)",
        || rabbitmqctl(&["set_permissions", "-p", "/", &user, ".*", ".*", ".*"]),
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_splitter_logs_a_missing_vhost_once_and_declares_its_topology_once_it_exists()
-> Result<()> {
    let dir = tempfile::Builder::new()
        .prefix("batchq-late-vhost-")
        .tempdir()?;
    let vhost = unique("batchq-late-vhost");
    let _made = Made::Vhost(vhost.clone());
    let (user, password) = credentials(&amqp_url())?;
    let url = url_with(&user, &password, &vhost)?;
    let namespace = unique("t-late-vhost");
    let mut splitter = Splitter::start(&url, &namespace, dir.path())?;

    let line = splitter
        .single_refusal("vhost refused (NOT_ALLOWED 530)")
        .await?;
    assert!(line.contains(&format!("amqp://{user}:***@")), "{line}");
    assert!(line.contains(&vhost), "names the vhost's URL: {line}");

    rabbitmqctl(&["add_vhost", &vhost])?;
    rabbitmqctl(&["set_permissions", "-p", &vhost, &user, ".*", ".*", ".*"])?;
    splitter.wait_for_line("lets this process in again").await?;
    // What the splitter declared is there: its job exchange, seen by a passive declare.
    let broker = Broker::new(
        &BrokerArgs::new(url.clone(), namespace.clone()),
        "batchq-tests",
    )?;
    let queues = [broker.names().splitter_queue()];
    let peeks = tokio::time::timeout(
        Duration::from_secs(10),
        common::broker::peek_queues(&queues, || broker.channel()),
    )
    .await
    .context("peeking at the splitter's queue timed out")??;
    assert!(
        peeks.first().is_some_and(Option::is_some),
        "the splitter declared {} in the new vhost",
        queues[0]
    );
    // One ERROR for the cause however many attempts it refused. A fix made of two steps (a
    // user created, then given permissions) may show the splitter one other cause in
    // between, logged once too: one line per change of cause.
    let errors = splitter.error_lines();
    assert_eq!(
        errors
            .iter()
            .filter(|l| l.contains("vhost refused (NOT_ALLOWED 530)"))
            .count(),
        1,
        "{}",
        splitter.log_text()
    );
    assert!(errors.len() <= 2, "{}", splitter.log_text());
    let log = splitter.log_text();
    assert!(
        !log.contains(&format!("{user}:{password}@")),
        "a password reached a log line"
    );
    Ok(())
}
