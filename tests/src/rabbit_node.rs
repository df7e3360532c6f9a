//! A private RabbitMQ node for one test, for faults that must not touch the shared broker:
//! killing the broker itself. The node has a name, AMQP port, distribution port, data and log
//! folders of its own (in a temporary folder), no plugins and its own configuration file; only
//! epmd (port 4369) is shared, as every Erlang node on the host shares it.
//!
//! [`RabbitNode::start`] boots it and waits until it accepts AMQP connections;
//! [`RabbitNode::start_with_tls`] adds a TLS listener with a certificate of [`TestCerts`];
//! [`RabbitNode::kill`] SIGKILLs the Erlang VM (`beam.smp`), as a crash or an OOM kill would;
//! [`RabbitNode::restart`] boots it again on the same data. Dropping the node kills it and
//! removes its folder, whatever the test's outcome; a failing test first prints the node's log.

use std::fs::File;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use common::broker::Broker;
use common::config::BrokerArgs;

/// Longest a boot may take before the test gives up (a first boot here takes about 10 s, a
/// restart on existing data about 6 s).
pub const BOOT_TIMEOUT: Duration = Duration::from_secs(60);

/// The folder of RabbitMQ's own scripts. Debian's `/usr/sbin/rabbitmq-server` is a wrapper
/// that switches to the `rabbitmq` user, who could not write to the test's folder; the script
/// it wraps runs as whoever calls it. `BATCHQ_RABBITMQ_SBIN` overrides the search.
fn server_script() -> Result<PathBuf> {
    if let Some(dir) = std::env::var_os("BATCHQ_RABBITMQ_SBIN") {
        return Ok(PathBuf::from(dir).join("rabbitmq-server"));
    }
    let debian = Path::new("/usr/lib/rabbitmq/bin/rabbitmq-server");
    if debian.is_file() {
        return Ok(debian.to_path_buf());
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|dir| dir.join("rabbitmq-server"))
        .find(|candidate| candidate.is_file())
        .context(
            "rabbitmq-server not found (looked in /usr/lib/rabbitmq/bin and PATH; set \
             BATCHQ_RABBITMQ_SBIN to the folder that holds it): the broker-restart tests start \
             a private RabbitMQ node",
        )
}

use crate::ports::free_port;

/// One private RabbitMQ node.
pub struct RabbitNode {
    /// `batchq-test-{hex}@localhost`.
    pub node_name: String,
    pub port: u16,
    pub dist_port: u16,
    /// Port of the TLS (`amqps://`) listener, for a node started with one.
    pub tls_port: Option<u16>,
    script: PathBuf,
    dir: Option<tempfile::TempDir>,
    /// The `rabbitmq-server` script of the current incarnation (it waits for the VM).
    server: Option<Child>,
    /// Pid of the Erlang VM of the current incarnation, from its pid file.
    beam_pid: Option<u32>,
    /// Incarnations started so far (each writes its own console log).
    boots: u32,
    /// Set by [`RabbitNode::stop`]: the test passed, nothing to show or keep.
    stopped: bool,
    /// `HOME` of the node and of `rabbitmqctl` for it: where the Erlang cookie is. The
    /// node's own folder, unless it is a cluster member, whose members share one cookie.
    home: Option<PathBuf>,
    /// The user the node and `rabbitmqctl` run as, owner of the node's folder; the test's
    /// own user when `None`.
    run_as: Option<RunAs>,
}

/// A user and group to run a node as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RunAs {
    pub uid: u32,
    pub gid: u32,
}

impl RunAs {
    /// The `rabbitmq` user, when this process runs as root (only root may switch users) and
    /// the user exists; `None` otherwise, and nodes then run as the test's own user.
    pub fn rabbitmq_user() -> Option<Self> {
        use std::os::unix::fs::MetadataExt;
        let is_root = std::fs::metadata("/proc/self").ok()?.uid() == 0;
        if !is_root {
            return None;
        }
        let passwd = std::fs::read_to_string("/etc/passwd").ok()?;
        passwd.lines().find_map(|line| {
            let fields: Vec<&str> = line.split(':').collect();
            match fields.as_slice() {
                ["rabbitmq", _, uid, gid, ..] => Some(Self {
                    uid: uid.parse().ok()?,
                    gid: gid.parse().ok()?,
                }),
                _ => None,
            }
        })
    }

    /// Gives `path` and everything under it to this user.
    pub fn own(&self, path: &Path) -> Result<()> {
        std::os::unix::fs::chown(path, Some(self.uid), Some(self.gid))
            .with_context(|| format!("giving {} to uid {}", path.display(), self.uid))?;
        if path.is_dir() {
            for entry in std::fs::read_dir(path)? {
                self.own(&entry?.path())?;
            }
        }
        Ok(())
    }

    fn apply(&self, command: &mut Command) {
        command.uid(self.uid).gid(self.gid);
    }
}

impl RabbitNode {
    /// Boots a fresh node and waits until it accepts AMQP connections.
    pub async fn start() -> Result<Self> {
        Self::start_node(None, None, None).await
    }

    /// [`RabbitNode::start`] for a cluster member: `HOME` is `home`, which holds the cookie
    /// every member shares (see [`crate::cluster::RabbitCluster`]); the node, its folder and
    /// `rabbitmqctl` for it belong to `run_as` when given.
    pub async fn start_member(home: &Path, run_as: Option<RunAs>) -> Result<Self> {
        Self::start_node(None, Some(home.to_path_buf()), run_as).await
    }

    /// [`RabbitNode::start`] with a TLS listener as well, on [`RabbitNode::tls_url`], serving
    /// the server certificate of `certs` (clients are not asked for one).
    pub async fn start_with_tls(certs: &TestCerts) -> Result<Self> {
        Self::start_node(Some(certs), None, None).await
    }

    async fn start_node(
        tls: Option<&TestCerts>,
        home: Option<PathBuf>,
        run_as: Option<RunAs>,
    ) -> Result<Self> {
        let script = server_script()?;
        let suffix = &uuid::Uuid::new_v4().simple().to_string()[..8];
        let dir = tempfile::Builder::new()
            .prefix("batchq-rabbit-")
            .tempdir()
            .context("creating the node's folder")?;
        let port = free_port()?;
        let mut dist_port = free_port()?;
        while dist_port == port {
            dist_port = free_port()?;
        }
        let tls_port = match tls {
            Some(_) => {
                let mut tls_port = free_port()?;
                while tls_port == port || tls_port == dist_port {
                    tls_port = free_port()?;
                }
                Some(tls_port)
            }
            None => None,
        };
        let root = dir.path();
        std::fs::create_dir_all(root.join("mnesia"))?;
        std::fs::create_dir_all(root.join("log"))?;
        // No plugins: the shared node's management listener port must not be claimed twice.
        std::fs::write(root.join("enabled_plugins"), "[].\n")?;
        // The host's rabbitmq-env.conf names the shared node; this one reads an empty file.
        std::fs::write(root.join("rabbitmq-env.conf"), "")?;
        // The host's rabbitmq.conf binds the shared port; this node binds its own. A low disk
        // limit keeps a nearly full CI disk from blocking publishers with an alarm.
        let mut conf = format!(
            "listeners.tcp.1 = 127.0.0.1:{port}\n\
             disk_free_limit.absolute = 10MB\n\
             log.file.level = info\n"
        );
        if let (Some(certs), Some(tls_port)) = (tls, tls_port) {
            conf.push_str(&format!(
                "listeners.ssl.1 = 127.0.0.1:{tls_port}\n\
                 ssl_options.cacertfile = {}\n\
                 ssl_options.certfile = {}\n\
                 ssl_options.keyfile = {}\n\
                 ssl_options.verify = verify_none\n\
                 ssl_options.fail_if_no_peer_cert = false\n",
                certs.ca_file().display(),
                certs.server_cert_file().display(),
                certs.server_key_file().display(),
            ));
        }
        std::fs::write(root.join("rabbitmq.conf"), conf)?;
        let mut node = Self {
            node_name: format!("batchq-test-{suffix}@localhost"),
            port,
            dist_port,
            tls_port,
            script,
            dir: Some(dir),
            server: None,
            beam_pid: None,
            boots: 0,
            stopped: false,
            home,
            run_as,
        };
        if let Some(user) = run_as {
            user.own(node.root())?;
        }
        node.boot().await?;
        Ok(node)
    }

    fn root(&self) -> &Path {
        self.dir
            .as_ref()
            .map(tempfile::TempDir::path)
            .unwrap_or_else(|| Path::new("/nonexistent"))
    }

    /// `amqp://guest:guest@127.0.0.1:{port}/%2f` (guest may log in from localhost).
    pub fn url(&self) -> String {
        format!("amqp://guest:guest@127.0.0.1:{}/%2f", self.port)
    }

    /// `amqps://guest:guest@127.0.0.1:{tls_port}/%2f`, for a node with a TLS listener.
    pub fn tls_url(&self) -> Result<String> {
        let port = self
            .tls_port
            .context("the node was started without a TLS listener")?;
        Ok(format!("amqps://guest:guest@127.0.0.1:{port}/%2f"))
    }

    fn pid_file(&self) -> PathBuf {
        self.root().join("rabbit.pid")
    }

    /// Starts an incarnation on the node's data and waits until it accepts AMQP connections.
    /// Returns how long the boot took.
    async fn boot(&mut self) -> Result<Duration> {
        let started = Instant::now();
        let root = self.root().to_path_buf();
        let _ = std::fs::remove_file(self.pid_file());
        self.boots += 1;
        let console = root.join(format!("console.{}.log", self.boots));
        let out = File::create(&console)?;
        let err = out.try_clone()?;
        let mut command = Command::new(&self.script);
        command
            .current_dir(&root)
            .stdin(Stdio::null())
            .stdout(Stdio::from(out))
            .stderr(Stdio::from(err))
            // Its own process group: the cleanup reaches the script and the VM together.
            .process_group(0)
            // The Erlang cookie is created in, and read from, $HOME.
            .env("HOME", self.home.as_deref().unwrap_or(&root))
            .env("RABBITMQ_NODENAME", &self.node_name)
            .env("RABBITMQ_NODE_IP_ADDRESS", "127.0.0.1")
            .env("RABBITMQ_NODE_PORT", self.port.to_string())
            .env("RABBITMQ_DIST_PORT", self.dist_port.to_string())
            .env("RABBITMQ_MNESIA_BASE", root.join("mnesia"))
            .env("RABBITMQ_LOG_BASE", root.join("log"))
            .env(
                "RABBITMQ_ENABLED_PLUGINS_FILE",
                root.join("enabled_plugins"),
            )
            .env("RABBITMQ_CONF_ENV_FILE", root.join("rabbitmq-env.conf"))
            .env("RABBITMQ_CONFIG_FILE", root.join("rabbitmq.conf"))
            .env(
                "RABBITMQ_ADVANCED_CONFIG_FILE",
                root.join("advanced.config"),
            )
            .env("RABBITMQ_PID_FILE", self.pid_file())
            .env("ERL_EPMD_ADDRESS", "127.0.0.1");
        for inherited in ["RABBITMQ_CONFIG_FILES", "RABBITMQ_LOGS", "ERL_FLAGS"] {
            command.env_remove(inherited);
        }
        if let Some(user) = self.run_as {
            user.apply(&mut command);
        }
        let child = command
            .spawn()
            .with_context(|| format!("starting {}", self.script.display()))?;
        self.server = Some(child);
        let deadline = started + BOOT_TIMEOUT;
        loop {
            if let Some(server) = self.server.as_mut()
                && let Some(status) = server.try_wait()?
            {
                self.server = None;
                bail!(
                    "RabbitMQ node {} exited during boot ({status}); its logs:\n{}",
                    self.node_name,
                    self.logs_tail(40)
                );
            }
            if self.beam_pid.is_none() {
                self.beam_pid = std::fs::read_to_string(self.pid_file())
                    .ok()
                    .and_then(|text| text.trim().parse().ok());
            }
            if self.beam_pid.is_some() && self.accepts_amqp().await {
                return Ok(started.elapsed());
            }
            if Instant::now() >= deadline {
                bail!(
                    "RabbitMQ node {} did not accept AMQP connections within {BOOT_TIMEOUT:?}; \
                     its logs:\n{}",
                    self.node_name,
                    self.logs_tail(40)
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Whether an AMQP connection opens and a channel works.
    async fn accepts_amqp(&self) -> bool {
        let Ok(broker) = Broker::new(
            &BrokerArgs::new(self.url(), "batchq-node-probe"),
            "batchq-tests-probe",
        ) else {
            return false;
        };
        let probe = async {
            let connection = broker.connection().await.ok()?;
            let channel = connection.create_channel().await.ok()?;
            let _ = channel.close(200, "probe".into()).await;
            let _ = connection.close(200, "probe".into()).await;
            Some(())
        };
        matches!(
            tokio::time::timeout(Duration::from_secs(5), probe).await,
            Ok(Some(()))
        )
    }

    /// SIGKILLs the node's Erlang VM: no clean shutdown, no goodbye to its clients.
    pub fn kill(&mut self) -> Result<()> {
        let recorded = self
            .beam_pid
            .take()
            .context("the RabbitMQ node is not running")?;
        // The pid file names the VM; the VM's environment proves it is this node's (a pid
        // could have been reused), since its node name is in no process's arguments.
        let pid = match beam_pid_of(&self.node_name) {
            Some(found) => found,
            None => bail!(
                "no process has RABBITMQ_NODENAME={} in its environment (pid file said \
                 {recorded})",
                self.node_name
            ),
        };
        signal("KILL", &pid.to_string())?;
        // The script was waiting for the VM; it exits now.
        if let Some(mut server) = self.server.take() {
            let deadline = Instant::now() + Duration::from_secs(10);
            while server.try_wait()?.is_none() {
                if Instant::now() >= deadline {
                    let _ = signal("KILL", &format!("-{}", server.id()));
                    let _ = server.wait();
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        Ok(())
    }

    /// Boots the node again on the data it had; returns how long the boot took.
    pub async fn restart(&mut self) -> Result<Duration> {
        if self.beam_pid.is_some() {
            self.kill()?;
        }
        self.boot().await
    }

    /// Stops the node the orderly way (SIGTERM: it closes its clients' connections and its
    /// files) and boots it again; returns how long the stop and the boot took.
    ///
    /// Besides being a fault of its own, this settles a fresh node: RabbitMQ 3.10 registers
    /// a new quorum queue's Raft member in a table it syncs lazily, and a node SIGKILLed in the
    /// seconds after a queue was declared can come back with that queue leaderless for good
    /// (every consume and publish on it then waits for ever). After a clean stop every queue
    /// declared so far survives a later SIGKILL.
    pub async fn restart_gracefully(&mut self) -> Result<(Duration, Duration)> {
        let pid = self
            .beam_pid
            .take()
            .context("the RabbitMQ node is not running")?;
        let asked = Instant::now();
        signal("TERM", &pid.to_string())?;
        if let Some(mut server) = self.server.take() {
            let deadline = asked + Duration::from_secs(60);
            while server.try_wait()?.is_none() {
                if Instant::now() >= deadline {
                    let _ = signal("KILL", &format!("-{}", server.id()));
                    let _ = server.wait();
                    bail!(
                        "RabbitMQ node {} did not stop within 60 s of SIGTERM",
                        self.node_name
                    );
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        let stopped = asked.elapsed();
        let boot = self.boot().await?;
        Ok((stopped, boot))
    }

    /// Whether the node's VM is running (it was booted and not killed since).
    pub fn is_running(&self) -> bool {
        self.beam_pid.is_some()
    }

    /// Runs `rabbitmqctl -n {node} ARGS` with the node's cookie and returns its stdout.
    pub fn ctl(&self, args: &[&str]) -> Result<String> {
        let ctl = self.script.with_file_name("rabbitmqctl");
        let mut command = Command::new(&ctl);
        if let Some(user) = self.run_as {
            user.apply(&mut command);
        }
        let output = command
            .arg("-n")
            .arg(&self.node_name)
            .args(args)
            .current_dir(self.root())
            .env("HOME", self.home.as_deref().unwrap_or(self.root()))
            .env(
                "RABBITMQ_CONF_ENV_FILE",
                self.root().join("rabbitmq-env.conf"),
            )
            .env("ERL_EPMD_ADDRESS", "127.0.0.1")
            .stdin(Stdio::null())
            .output()
            .with_context(|| format!("running {}", ctl.display()))?;
        if !output.status.success() {
            bail!(
                "rabbitmqctl -n {} {} failed ({}): {}{}",
                self.node_name,
                args.join(" "),
                output.status,
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    }

    /// Kills the node and removes its folder: the end of a test that passed. A node dropped
    /// without it (a failed test) prints its logs and keeps its folder first.
    pub fn stop(mut self) {
        self.stopped = true;
    }

    /// The last lines of the node's own log and of its console output.
    pub fn logs_tail(&self, lines: usize) -> String {
        let root = self.root();
        let mut out = String::new();
        let mut logs = vec![root.join("log").join(format!("{}.log", self.node_name))];
        logs.extend((1..=self.boots).map(|n| root.join(format!("console.{n}.log"))));
        for log in logs {
            out.push_str(&format!(
                "----- {} -----\n{}\n",
                log.display(),
                crate::tail(&log, lines)
            ));
        }
        out
    }
}

/// A CA and a server certificate it signed (for `localhost` and `127.0.0.1`), and a second
/// CA that signed nothing here, made with the `openssl` command in a temporary folder that
/// is removed on drop. EC P-256 keys: generated in milliseconds.
pub struct TestCerts {
    dir: tempfile::TempDir,
}

impl TestCerts {
    pub fn generate() -> Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix("batchq-certs-")
            .tempdir()
            .context("creating the certificates' folder")?;
        let certs = Self { dir };
        certs.self_signed_ca("ca", "batchq test CA")?;
        certs.self_signed_ca("other-ca", "batchq unrelated CA")?;
        let ext = certs.path("server.ext");
        std::fs::write(
            &ext,
            "basicConstraints = CA:FALSE\n\
             keyUsage = digitalSignature, keyEncipherment\n\
             extendedKeyUsage = serverAuth\n\
             subjectAltName = DNS:localhost, IP:127.0.0.1\n",
        )?;
        certs.openssl(&[
            "req",
            "-new",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            &certs.arg("server.key"),
            "-out",
            &certs.arg("server.csr"),
            "-subj",
            "/CN=localhost",
        ])?;
        certs.openssl(&[
            "x509",
            "-req",
            "-in",
            &certs.arg("server.csr"),
            "-CA",
            &certs.arg("ca.pem"),
            "-CAkey",
            &certs.arg("ca.key"),
            "-CAcreateserial",
            "-days",
            "2",
            "-extfile",
            &ext.display().to_string(),
            "-out",
            &certs.arg("server.pem"),
        ])?;
        // The broker reads the key as another user may: RabbitMQ runs as whoever starts it
        // here, but keep the files readable for it either way.
        for file in ["server.key", "server.pem", "ca.pem"] {
            let path = certs.path(file);
            let mut permissions = std::fs::metadata(&path)?.permissions();
            std::os::unix::fs::PermissionsExt::set_mode(&mut permissions, 0o644);
            std::fs::set_permissions(&path, permissions)?;
        }
        Ok(certs)
    }

    fn self_signed_ca(&self, name: &str, subject: &str) -> Result<()> {
        self.openssl(&[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            &self.arg(&format!("{name}.key")),
            "-out",
            &self.arg(&format!("{name}.pem")),
            "-days",
            "2",
            "-subj",
            &format!("/CN={subject}"),
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
        ])
    }

    fn openssl(&self, args: &[&str]) -> Result<()> {
        let output = Command::new("openssl")
            .args(args)
            .stdin(Stdio::null())
            .output()
            .context("running openssl (the TLS tests make their certificates with it)")?;
        if !output.status.success() {
            bail!(
                "openssl {} failed ({}): {}",
                args.first().copied().unwrap_or_default(),
                output.status,
                String::from_utf8_lossy(&output.stderr)
            );
        }
        Ok(())
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn arg(&self, name: &str) -> String {
        self.path(name).display().to_string()
    }

    /// The CA that signed the server certificate (PEM): what `BATCHQ_TLS_CA_FILE` names.
    pub fn ca_file(&self) -> PathBuf {
        self.path("ca.pem")
    }

    /// A CA that did not sign the server certificate (PEM).
    pub fn other_ca_file(&self) -> PathBuf {
        self.path("other-ca.pem")
    }

    pub fn server_cert_file(&self) -> PathBuf {
        self.path("server.pem")
    }

    pub fn server_key_file(&self) -> PathBuf {
        self.path("server.key")
    }
}

/// The pid of the Erlang VM (`beam.smp`) whose environment has `RABBITMQ_NODENAME=node_name`.
pub fn beam_pid_of(node_name: &str) -> Option<u32> {
    let wanted = format!("RABBITMQ_NODENAME={node_name}");
    let entries = std::fs::read_dir("/proc").ok()?;
    for entry in entries.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        let comm = std::fs::read_to_string(entry.path().join("comm")).unwrap_or_default();
        if !comm.trim().starts_with("beam") {
            continue;
        }
        // A process that ended meanwhile, or of another user, is just not a match.
        let Ok(environ) = std::fs::read(entry.path().join("environ")) else {
            continue;
        };
        if environ
            .split(|b| *b == 0)
            .any(|var| var == wanted.as_bytes())
        {
            return Some(pid);
        }
    }
    None
}

fn signal(name: &str, target: &str) -> Result<()> {
    // `unsafe_code` is forbidden in the workspace, so no `libc::kill`: the `kill` utility does it.
    let status = Command::new("kill")
        .args(["-s", name, "--", target])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .context("running kill")?;
    if !status.success() {
        bail!("kill -s {name} {target} failed: {status}");
    }
    Ok(())
}

impl Drop for RabbitNode {
    fn drop(&mut self) {
        let keep = !self.stopped || std::env::var_os("BATCHQ_TEST_KEEP").is_some();
        if !self.stopped {
            eprintln!(
                "private RabbitMQ node {} (port {}) of a failed test; logs:\n{}",
                self.node_name,
                self.port,
                self.logs_tail(40)
            );
        }
        if let Some(pid) = self.beam_pid.take() {
            let _ = signal("KILL", &pid.to_string());
        }
        if let Some(mut server) = self.server.take() {
            // The whole group: the script, and the VM if its pid file was never read.
            let _ = signal("KILL", &format!("-{}", server.id()));
            let _ = server.wait();
        }
        let Some(dir) = self.dir.take() else { return };
        if keep {
            eprintln!("keeping the node's folder {}", dir.keep().display());
        } else if let Err(e) = dir.close() {
            eprintln!("could not remove the node's folder: {e}");
        }
    }
}
