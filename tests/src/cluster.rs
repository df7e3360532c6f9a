//! A three-node RabbitMQ cluster on this one machine, for the tests of losing a broker node.
//!
//! Each member is a [`RabbitNode`]: its own node name, AMQP and distribution ports (free ones,
//! so private nodes of tests running in parallel do not collide), data and log folders and
//! configuration, all run as and owned by the `rabbitmq` user when the tests run as root. What makes them one cluster: a shared `HOME` holding one Erlang cookie, and
//! members 2 and 3 joined to member 1 (`stop_app`, `reset`, `join_cluster`, `start_app`).
//! Quorum queues declared afterwards get a member on each node.
//!
//! [`RabbitCluster::kill`] SIGKILLs one member's VM (found by its node name in
//! `/proc/PID/environ`, never by a pattern); [`RabbitCluster::restart`] boots it again on its
//! data, and it rejoins. Dropping the cluster kills every member and removes every folder,
//! whatever the test's outcome (a failed test first prints each member's log).

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};

use crate::rabbit_node::{RabbitNode, RunAs};

/// Longest wait for the joined members to report a three-node cluster.
const FORM_TIMEOUT: Duration = Duration::from_secs(60);

/// Three clustered RabbitMQ nodes. Field order matters: the members drop (and are killed)
/// before the shared home they read their cookie from is removed.
pub struct RabbitCluster {
    nodes: Vec<RabbitNode>,
    home: tempfile::TempDir,
}

impl RabbitCluster {
    /// Boots three nodes at once, joins the second and third to the first and waits until
    /// all three run as one cluster. Returns the cluster and how long that took.
    pub async fn start() -> Result<(Self, Duration)> {
        let began = Instant::now();
        let home = tempfile::Builder::new()
            .prefix("batchq-cluster-home-")
            .tempdir()
            .context("creating the cluster's home folder")?;
        write_cookie(home.path())?;
        // As RabbitMQ runs in production: nodes, their data and their cookie belong to the
        // `rabbitmq` user (when the tests run as root and that user exists).
        let run_as = RunAs::rabbitmq_user();
        if let Some(user) = run_as {
            user.own(home.path())?;
        }
        let (a, b, c) = tokio::join!(
            RabbitNode::start_member(home.path(), run_as),
            RabbitNode::start_member(home.path(), run_as),
            RabbitNode::start_member(home.path(), run_as),
        );
        // Whatever booted is dropped (killed, removed) if another member failed.
        let nodes = vec![a?, b?, c?];
        let cluster = Self { nodes, home };
        let seed = cluster.nodes[0].node_name.clone();
        for node in &cluster.nodes[1..] {
            node.ctl(&["stop_app"])?;
            node.ctl(&["reset"])?;
            node.ctl(&["join_cluster", &seed])?;
            node.ctl(&["start_app"])?;
        }
        cluster.await_running(3, FORM_TIMEOUT).await?;
        Ok((cluster, began.elapsed()))
    }

    /// `AMQP_URL` for a client of the whole cluster: every member's URL, comma-separated.
    pub fn urls(&self) -> String {
        self.nodes
            .iter()
            .map(RabbitNode::url)
            .collect::<Vec<_>>()
            .join(",")
    }

    pub fn node(&self, i: usize) -> &RabbitNode {
        &self.nodes[i]
    }

    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// SIGKILLs member `i`'s Erlang VM, as a crash or a lost host would end it.
    pub fn kill(&mut self, i: usize) -> Result<()> {
        self.nodes[i].kill()
    }

    /// Boots member `i` again on its data and waits until the cluster runs all three again.
    /// Returns how long that took.
    pub async fn restart(&mut self, i: usize) -> Result<Duration> {
        let began = Instant::now();
        self.nodes[i].restart().await?;
        self.await_running(3, FORM_TIMEOUT).await?;
        Ok(began.elapsed())
    }

    /// A running member to ask about the cluster.
    fn running_member(&self) -> Result<&RabbitNode> {
        self.nodes
            .iter()
            .find(|n| n.is_running())
            .context("no member of the cluster is running")
    }

    /// How many members the cluster reports running, asked of a running member.
    pub fn running_count(&self) -> Result<usize> {
        let out = self
            .running_member()?
            .ctl(&["eval", "length(rabbit_nodes:all_running())."])?;
        out.trim()
            .parse()
            .with_context(|| format!("unexpected answer to all_running: {out:?}"))
    }

    async fn await_running(&self, n: usize, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let running = self.running_count();
            if matches!(running, Ok(count) if count == n) {
                return Ok(());
            }
            if Instant::now() >= deadline {
                bail!("the cluster did not run {n} members within {timeout:?}: {running:?}");
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// The node leading each quorum queue whose name starts with `prefix`, by queue name.
    pub fn quorum_leaders(&self, prefix: &str) -> Result<Vec<(String, String)>> {
        let out = self.running_member()?.ctl(&[
            "list_queues",
            "--quiet",
            "--no-table-headers",
            "name",
            "type",
            "leader",
        ])?;
        let mut leaders = Vec::new();
        for line in out.lines() {
            let fields: Vec<&str> = line.split('\t').collect();
            if let [name, "quorum", leader] = fields.as_slice()
                && name.starts_with(prefix)
            {
                leaders.push(((*name).to_owned(), (*leader).to_owned()));
            }
        }
        ensure!(
            !leaders.is_empty(),
            "no quorum queue starting with {prefix:?} in:\n{out}"
        );
        Ok(leaders)
    }

    /// The members that connections named `client` (their `connection_name`) are open to,
    /// told apart by the AMQP port each connection reached.
    pub fn nodes_serving(&self, client: &str) -> Result<Vec<usize>> {
        // rabbitmqctl 3.10 has no `user_provided_name` column; the name is in the client's
        // properties, printed as an Erlang term: `{"connection_name","batchq-reducer"}`.
        let out = self.running_member()?.ctl(&[
            "list_connections",
            "--quiet",
            "--no-table-headers",
            "client_properties",
            "port",
        ])?;
        let wanted = format!("{{\"connection_name\",\"{client}\"}}");
        let mut nodes = Vec::new();
        for line in out.lines() {
            let Some((properties, port)) = line.rsplit_once('\t') else {
                continue;
            };
            if !properties.contains(&wanted) {
                continue;
            }
            let port: u16 = port
                .trim()
                .parse()
                .with_context(|| format!("a port in {line:?}"))?;
            if let Some(i) = self.nodes.iter().position(|n| n.port == port)
                && !nodes.contains(&i)
            {
                nodes.push(i);
            }
        }
        ensure!(!nodes.is_empty(), "no connection named {client} in:\n{out}");
        Ok(nodes)
    }

    /// Kills every member and removes every folder: the end of a test that passed. A cluster
    /// dropped without it (a failed test) prints each member's logs first.
    pub fn stop(self) {
        let Self { nodes, home } = self;
        for node in nodes {
            node.stop();
        }
        if let Err(e) = home.close() {
            eprintln!("could not remove the cluster's home folder: {e}");
        }
    }
}

/// The Erlang cookie every member and `rabbitmqctl` read from `home`: readable by its owner
/// only, or Erlang refuses it.
fn write_cookie(home: &std::path::Path) -> Result<()> {
    let cookie = home.join(".erlang.cookie");
    let value = uuid::Uuid::new_v4().simple().to_string().to_uppercase();
    std::fs::write(&cookie, value).context("writing the cluster's Erlang cookie")?;
    let mut permissions = std::fs::metadata(&cookie)?.permissions();
    std::os::unix::fs::PermissionsExt::set_mode(&mut permissions, 0o400);
    std::fs::set_permissions(&cookie, permissions)?;
    Ok(())
}
