//! The ways users deploy batchq, checked without a container engine: the Dockerfile, compose.yaml
//! and the Kubernetes manifests parse and refer only to names that exist (volumes, secrets, the
//! work queues of the namespace, the settings the binaries read). Where `docker-compose` (or
//! `docker compose`) and `kubectl` are installed, their own validators run too.
//!
//! And the scaling those deployments rely on, live: workers added in the middle of a job raise
//! its throughput, and workers stopped with SIGTERM leave nothing behind.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail, ensure};
use batchq_tests::{Signal, TestEnv, WorkerOpts, assert_counts, assert_one_per_index};
use common::contract::{JobState, JobStatus, ResultLine};
use common::topology::{BUILTIN_OPERATIONS, Names};
use serde::Deserialize;
use serde_json::json;
use serde_norway::Value;

// ---------------------------------------------------------------------------------------------
// Reading the repository

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the tests crate sits in the workspace")
        .to_path_buf()
}

fn read(path: &Path) -> Result<String> {
    std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))
}

/// Every YAML document of a file (`---`-separated), with `<<` merge keys applied, empty
/// documents left out.
fn yaml_documents(path: &Path) -> Result<Vec<Value>> {
    let text = read(path)?;
    let mut documents = Vec::new();
    for (n, document) in serde_norway::Deserializer::from_str(&text).enumerate() {
        let mut value = Value::deserialize(document)
            .with_context(|| format!("{}: document {} is not YAML", path.display(), n + 1))?;
        value
            .apply_merge()
            .with_context(|| format!("{}: merge keys of document {}", path.display(), n + 1))?;
        if !value.is_null() {
            documents.push(value);
        }
    }
    Ok(documents)
}

fn yaml_document(path: &Path) -> Result<Value> {
    let mut documents = yaml_documents(path)?;
    ensure!(
        documents.len() == 1,
        "{} holds {} documents, expected one",
        path.display(),
        documents.len()
    );
    Ok(documents.remove(0))
}

fn str_of<'a>(value: &'a Value, what: &str) -> Result<&'a str> {
    value
        .as_str()
        .ok_or_else(|| anyhow!("{what}: expected a string, found {value:?}"))
}

fn seq_of<'a>(value: &'a Value, what: &str) -> Result<&'a [Value]> {
    match value {
        Value::Sequence(items) => Ok(items),
        Value::Null => Ok(&[]),
        other => bail!("{what}: expected a list, found {other:?}"),
    }
}

fn strings_of(value: &Value, what: &str) -> Result<Vec<String>> {
    seq_of(value, what)?
        .iter()
        .map(|v| str_of(v, what).map(str::to_owned))
        .collect()
}

/// The keys of a mapping (an absent one is empty).
fn keys_of(value: &Value, what: &str) -> Result<Vec<String>> {
    match value {
        Value::Mapping(map) => map
            .keys()
            .map(|k| str_of(k, what).map(str::to_owned))
            .collect(),
        Value::Null => Ok(Vec::new()),
        other => bail!("{what}: expected a mapping, found {other:?}"),
    }
}

/// A scalar as text, whatever YAML made of it (`"4"`, `4`, `true`).
fn scalar_text(value: &Value) -> Option<String> {
    match value {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

/// The environment variables the batchq binaries read, taken from their sources: every clap
/// `env = "…"`, every `env::var("…")`, and `RUST_LOG` where logging is set up from the
/// environment. A setting a deployment file names that is not here does nothing.
fn env_vars_read_by_the_binaries() -> Result<BTreeSet<String>> {
    fn scan(dir: &Path, found: &mut BTreeSet<String>) -> Result<()> {
        for entry in std::fs::read_dir(dir).with_context(|| format!("listing {}", dir.display()))? {
            let path = entry?.path();
            if path.is_dir() {
                scan(&path, found)?;
                continue;
            }
            if path.extension().is_none_or(|e| e != "rs") {
                continue;
            }
            let source = read(&path)?;
            for marker in ["env = \"", "env::var(\"", "env::var_os(\""] {
                for (at, _) in source.match_indices(marker) {
                    let rest = &source[at + marker.len()..];
                    if let Some(end) = rest.find('"') {
                        found.insert(rest[..end].to_owned());
                    }
                }
            }
            if source.contains("EnvFilter::try_from_default_env")
                || source.contains("EnvFilter::from_default_env")
            {
                found.insert("RUST_LOG".to_owned());
            }
        }
        Ok(())
    }
    let mut found = BTreeSet::new();
    for krate in ["common", "splitter", "worker", "reducer", "batchctl"] {
        scan(&repo_root().join(krate).join("src"), &mut found)?;
    }
    for expected in [
        "AMQP_URL",
        "BATCHQ_NAMESPACE",
        "BATCHQ_DATA_DIR",
        "RUST_LOG",
    ] {
        ensure!(
            found.contains(expected),
            "the scan of the sources missed {expected}; found {found:?}"
        );
    }
    Ok(found)
}

/// Settings of issue 12 that the deployment files set before every binary reads them: the
/// PostgreSQL store, whose `BATCHQ_DATABASE_URL` is in the contract (v1.1), lands on its own.
/// Once a binary reads one it is checked like any other; until then the checks accept it and
/// say so.
const ANNOUNCED_SETTINGS: &[&str] = &["BATCHQ_DATABASE_URL"];

/// The settings a deployment file may give a batchq process: those the binaries read, and
/// [`ANNOUNCED_SETTINGS`].
fn settings_deployments_may_set() -> Result<BTreeSet<String>> {
    let mut settings = env_vars_read_by_the_binaries()?;
    for announced in ANNOUNCED_SETTINGS {
        if !settings.contains(*announced) {
            eprintln!(
                "note: no binary reads {announced} yet (issue 12's PostgreSQL store); the \
                 deployment files set it ahead of it"
            );
            settings.insert((*announced).to_owned());
        }
    }
    Ok(settings)
}

/// `90s`, `2m`, `1m30s`, `1h` (compose durations) in seconds.
fn duration_secs(text: &str) -> Result<u64> {
    let mut total = 0;
    let mut digits = String::new();
    for c in text.trim().chars() {
        if c.is_ascii_digit() {
            digits.push(c);
            continue;
        }
        let unit = match c {
            's' => 1,
            'm' => 60,
            'h' => 3600,
            _ => bail!("{text:?} is not a duration"),
        };
        let amount: u64 = digits
            .parse()
            .with_context(|| format!("{text:?} is not a duration"))?;
        total += amount * unit;
        digits.clear();
    }
    ensure!(
        digits.is_empty(),
        "{text:?}: a duration needs a unit (s, m, h)"
    );
    Ok(total)
}

fn on_path(program: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|paths| std::env::split_paths(&paths).any(|dir| dir.join(program).is_file()))
}

/// Runs a validator; `Ok(None)` when the program cannot be started.
fn run_tool(program: &str, args: &[&str]) -> Result<Option<std::process::Output>> {
    match Command::new(program)
        .args(args)
        .current_dir(repo_root())
        .output()
    {
        Ok(output) => Ok(Some(output)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("running {program}")),
    }
}

/// The longest lifespan a job gets without asking: the contract's default, 60 s. Grace
/// periods must be longer, so a SIGTERM'd worker drains instead of being killed.
const DEFAULT_LIFESPAN_SECS: u64 = 60;

// ---------------------------------------------------------------------------------------------
// Kubernetes

/// The manifests under deploy/kubernetes, by kind and name.
struct Manifests {
    files: Vec<String>,
    kustomization: Value,
    /// (kind, name) → document.
    objects: BTreeMap<(String, String), Value>,
}

impl Manifests {
    fn load() -> Result<Self> {
        let dir = repo_root().join("deploy").join("kubernetes");
        let mut files = Vec::new();
        let mut kustomization = Value::Null;
        let mut objects = BTreeMap::new();
        for entry in
            std::fs::read_dir(&dir).with_context(|| format!("listing {}", dir.display()))?
        {
            let path = entry?.path();
            let name = path
                .file_name()
                .and_then(|n| n.to_str())
                .unwrap_or_default()
                .to_owned();
            if !(name.ends_with(".yaml") || name.ends_with(".yml")) {
                continue;
            }
            if name.starts_with("kustomization.") {
                kustomization = yaml_document(&path)?;
                continue;
            }
            files.push(name.clone());
            for document in yaml_documents(&path)? {
                let kind = str_of(&document["kind"], &format!("{name}: kind"))?.to_owned();
                let object = str_of(
                    &document["metadata"]["name"],
                    &format!("{name}: a {kind}'s name"),
                )?
                .to_owned();
                ensure!(
                    document["apiVersion"].as_str().is_some(),
                    "{name}: {kind} {object} has no apiVersion"
                );
                // Namespace-agnostic: `kubectl apply -n` or kustomize's `namespace:` decides.
                ensure!(
                    document["metadata"]["namespace"].is_null(),
                    "{name}: {kind} {object} names a namespace"
                );
                let key = (kind.clone(), object.clone());
                ensure!(
                    objects.insert(key, document).is_none(),
                    "{name}: {kind} {object} is defined twice"
                );
            }
        }
        files.sort();
        ensure!(
            !kustomization.is_null(),
            "deploy/kubernetes has no kustomization.yaml"
        );
        Ok(Self {
            files,
            kustomization,
            objects,
        })
    }

    fn of_kind<'a>(&'a self, kind: &'a str) -> impl Iterator<Item = (&'a str, &'a Value)> + 'a {
        self.objects
            .iter()
            .filter(move |((k, _), _)| k == kind)
            .map(|((_, name), doc)| (name.as_str(), doc))
    }

    fn get(&self, kind: &str, name: &str) -> Option<&Value> {
        self.objects.get(&(kind.to_owned(), name.to_owned()))
    }

    fn has(&self, kind: &str, name: &str) -> bool {
        self.get(kind, name).is_some()
    }

    /// The keys a ConfigMap or Secret holds.
    fn keys(&self, kind: &str, name: &str) -> Result<BTreeSet<String>> {
        let doc = self
            .get(kind, name)
            .ok_or_else(|| anyhow!("no {kind} {name}"))?;
        let mut keys = BTreeSet::new();
        for section in ["data", "stringData", "binaryData"] {
            keys.extend(keys_of(&doc[section], &format!("{kind} {name}.{section}"))?);
        }
        Ok(keys)
    }

    fn config_value(&self, key: &str) -> Result<String> {
        let doc = self
            .get("ConfigMap", "batchq-config")
            .ok_or_else(|| anyhow!("no ConfigMap batchq-config"))?;
        scalar_text(&doc["data"][key])
            .ok_or_else(|| anyhow!("ConfigMap batchq-config has no {key}"))
    }

    /// The batchq role of a Deployment: the first argument of its container.
    fn role(&self, deployment: &Value) -> Result<String> {
        let containers = seq_of(
            &deployment["spec"]["template"]["spec"]["containers"],
            "containers",
        )?;
        ensure!(containers.len() == 1, "one container per batchq pod");
        let args = strings_of(&containers[0]["args"], "args")?;
        args.first()
            .cloned()
            .ok_or_else(|| anyhow!("a batchq container's args name its role"))
    }
}

#[test]
fn kubernetes_manifests_parse_and_refer_to_names_that_exist() -> Result<()> {
    let m = Manifests::load()?;
    let env_vars = settings_deployments_may_set()?;

    // The kustomization lists exactly the manifests there are.
    let listed = strings_of(&m.kustomization["resources"], "kustomization resources")?;
    let listed: BTreeSet<String> = listed.into_iter().collect();
    let present: BTreeSet<String> = m.files.iter().cloned().collect();
    assert_eq!(
        listed, present,
        "kustomization.yaml resources against the files"
    );

    // Every ConfigMap key is a setting the binaries read.
    for (name, _) in m.of_kind("ConfigMap") {
        for key in m.keys("ConfigMap", name)? {
            ensure!(
                env_vars.contains(&key),
                "ConfigMap {name} sets {key}, which no batchq binary reads ({env_vars:?})"
            );
        }
    }

    let mut roles = BTreeMap::new();
    let mut claims_used = BTreeMap::new();
    for (name, deployment) in m.of_kind("Deployment") {
        let spec = &deployment["spec"];
        let pod = &spec["template"]["spec"];
        let role = m.role(deployment)?;
        ensure!(
            ["splitter", "reducer", "worker", "ui"].contains(&role.as_str()),
            "Deployment {name} runs {role:?}"
        );
        ensure!(
            roles.insert(role.clone(), name.to_owned()).is_none(),
            "two Deployments run the {role}"
        );

        // The selector selects the pod template.
        let template_labels = &spec["template"]["metadata"]["labels"];
        for key in keys_of(&spec["selector"]["matchLabels"], "matchLabels")? {
            assert_eq!(
                spec["selector"]["matchLabels"][key.as_str()],
                template_labels[key.as_str()],
                "Deployment {name}: selector label {key} against the template"
            );
        }

        let grace = pod["terminationGracePeriodSeconds"]
            .as_u64()
            .ok_or_else(|| anyhow!("Deployment {name} sets no terminationGracePeriodSeconds"))?;
        // The console holds no fragment: it only has to finish the pages it is serving.
        ensure!(
            role == "ui" || grace > DEFAULT_LIFESPAN_SECS,
            "Deployment {name}: terminationGracePeriodSeconds {grace} must exceed the default \
             lifespan of {DEFAULT_LIFESPAN_SECS} s"
        );

        // Non-root.
        let security = &pod["securityContext"];
        assert_eq!(
            security["runAsNonRoot"].as_bool(),
            Some(true),
            "Deployment {name}: runAsNonRoot"
        );
        ensure!(
            security["runAsUser"].as_u64().is_some_and(|uid| uid != 0),
            "Deployment {name}: runAsUser must be a non-zero uid"
        );

        let volumes = seq_of(&pod["volumes"], "volumes")?;
        let mut volume_names = BTreeSet::new();
        let mut claims = BTreeMap::new();
        for volume in volumes {
            let volume_name = str_of(&volume["name"], "volume name")?.to_owned();
            if let Some(claim) = volume["persistentVolumeClaim"]["claimName"].as_str() {
                ensure!(
                    m.has("PersistentVolumeClaim", claim),
                    "Deployment {name} mounts PersistentVolumeClaim {claim}, which no manifest defines"
                );
                claims.insert(volume_name.clone(), claim.to_owned());
                ensure!(
                    claims_used
                        .insert(claim.to_owned(), name.to_owned())
                        .is_none(),
                    "PersistentVolumeClaim {claim} is used by two Deployments"
                );
            }
            volume_names.insert(volume_name);
        }

        let container = &seq_of(&pod["containers"], "containers")?[0];
        let container_security = &container["securityContext"];
        assert_eq!(
            container_security["allowPrivilegeEscalation"].as_bool(),
            Some(false),
            "Deployment {name}: allowPrivilegeEscalation"
        );
        for kind in ["requests", "limits"] {
            ensure!(
                !container["resources"][kind]["memory"].is_null(),
                "Deployment {name}: resources.{kind}.memory"
            );
        }

        let mut env: BTreeMap<String, Option<String>> = BTreeMap::new();
        for source in seq_of(&container["envFrom"], "envFrom")? {
            if let Some(config) = source["configMapRef"]["name"].as_str() {
                ensure!(
                    m.has("ConfigMap", config),
                    "Deployment {name}: no ConfigMap {config}"
                );
                for key in m.keys("ConfigMap", config)? {
                    let value = scalar_text(
                        &m.get("ConfigMap", config).expect("checked")["data"][key.as_str()],
                    );
                    env.insert(key, value);
                }
            }
            if let Some(secret) = source["secretRef"]["name"].as_str() {
                ensure!(
                    m.has("Secret", secret),
                    "Deployment {name}: no Secret {secret}"
                );
                for key in m.keys("Secret", secret)? {
                    env.insert(key, None);
                }
            }
        }
        let mut from_secrets = BTreeMap::new();
        for variable in seq_of(&container["env"], "env")? {
            let var = str_of(&variable["name"], "env name")?.to_owned();
            ensure!(
                env_vars.contains(&var),
                "Deployment {name} sets {var}, which no batchq binary reads"
            );
            let from = &variable["valueFrom"];
            if let Some(secret) = from["secretKeyRef"]["name"].as_str() {
                from_secrets.insert(var.clone(), secret.to_owned());
            }
            for (reference, kind) in [("secretKeyRef", "Secret"), ("configMapKeyRef", "ConfigMap")]
            {
                if from[reference].is_null() {
                    continue;
                }
                let object = str_of(&from[reference]["name"], "reference name")?;
                let key = str_of(&from[reference]["key"], "reference key")?;
                ensure!(
                    m.keys(kind, object)
                        .with_context(|| format!("Deployment {name}: {var}"))?
                        .contains(key),
                    "Deployment {name}: {var} refers to key {key} that {kind} {object} lacks"
                );
            }
            env.insert(var, scalar_text(&variable["value"]));
        }
        ensure!(
            env.contains_key("AMQP_URL"),
            "Deployment {name} gets no AMQP_URL"
        );
        ensure!(
            env.contains_key("BATCHQ_NAMESPACE"),
            "Deployment {name} gets no BATCHQ_NAMESPACE"
        );

        let mut mounts = BTreeMap::new();
        for mount in seq_of(&container["volumeMounts"], "volumeMounts")? {
            let volume = str_of(&mount["name"], "volumeMount name")?;
            ensure!(
                volume_names.contains(volume),
                "Deployment {name} mounts volume {volume}, which its pod does not define"
            );
            mounts.insert(
                str_of(&mount["mountPath"], "mountPath")?.to_owned(),
                volume.to_owned(),
            );
        }

        if role == "splitter" || role == "reducer" {
            check_standby_replicas(&m, name, deployment, &env, &from_secrets, &mounts)?;
            ensure!(
                claims.is_empty(),
                "Deployment {name}: its replicas keep their state in PostgreSQL; a \
                 PersistentVolumeClaim would tie them to one volume"
            );
        }
        if role == "ui" {
            check_console(name, container, &env, &from_secrets)?;
        }
        if role == "reducer" {
            let addr = env
                .get("BATCHQ_METRICS_ADDR")
                .cloned()
                .flatten()
                .unwrap_or_else(|| "0.0.0.0:9464".to_owned());
            ensure!(
                addr.ends_with(":9464"),
                "reducer metrics on {addr}, expected port 9464"
            );
            ensure!(
                seq_of(&container["ports"], "ports")?
                    .iter()
                    .any(|p| p["containerPort"].as_u64() == Some(9464)),
                "Deployment {name} declares no containerPort 9464"
            );
        }
    }
    assert_eq!(
        roles.keys().map(String::as_str).collect::<Vec<_>>(),
        ["reducer", "splitter", "ui", "worker"],
        "one Deployment per role"
    );
    for (claim, _) in m.of_kind("PersistentVolumeClaim") {
        ensure!(
            claims_used.contains_key(claim),
            "PersistentVolumeClaim {claim} is used by no Deployment"
        );
    }

    // Two Services: the reducer's pods on the metrics port, the console's on its HTTP port.
    let services: Vec<_> = m.of_kind("Service").collect();
    ensure!(
        services.len() == 2,
        "a Service for the reducer's metrics and one for the console"
    );
    for (role, port) in [("reducer", 9464), ("ui", 8080)] {
        let deployment = m
            .get("Deployment", &roles[role])
            .expect("the Deployment exists");
        let labels = &deployment["spec"]["template"]["metadata"]["labels"];
        let selects = |service: &Value| -> Result<bool> {
            let selector = &service["spec"]["selector"];
            Ok(keys_of(selector, "Service selector")?
                .iter()
                .all(|key| selector[key.as_str()] == labels[key.as_str()]))
        };
        let mut serving = Vec::new();
        for (name, service) in &services {
            if selects(service)? {
                serving.push(*name);
                ensure!(
                    seq_of(&service["spec"]["ports"], "Service ports")?
                        .iter()
                        .any(|p| p["port"].as_u64() == Some(port)),
                    "Service {name} does not serve port {port}"
                );
            }
        }
        ensure!(
            serving.len() == 1,
            "exactly one Service selects the {role}'s pods: {serving:?}"
        );
    }
    Ok(())
}

/// The console's Deployment: `batchctl ui` on the pod's address, so with its token from a
/// Secret (it refuses to start without one), probed on /healthz.
fn check_console(
    name: &str,
    container: &Value,
    env: &BTreeMap<String, Option<String>>,
    from_secrets: &BTreeMap<String, String>,
) -> Result<()> {
    let command = strings_of(&container["command"], "console command")?;
    ensure!(
        command.last().map(String::as_str) == Some("batchctl"),
        "Deployment {name}: the console is `batchctl ui`, its command ends with batchctl: {command:?}"
    );
    let args = strings_of(&container["args"], "console args")?;
    ensure!(
        args.windows(2)
            .any(|w| w[0] == "--listen" && w[1].starts_with("0.0.0.0:")),
        "Deployment {name}: the console listens on the pod's address: {args:?}"
    );
    ensure!(
        env.contains_key("BATCHQ_UI_TOKEN") && from_secrets.contains_key("BATCHQ_UI_TOKEN"),
        "Deployment {name}: BATCHQ_UI_TOKEN must come from a Secret"
    );
    assert_eq!(
        container["readinessProbe"]["httpGet"]["path"].as_str(),
        Some("/healthz"),
        "Deployment {name}: readiness on /healthz"
    );
    Ok(())
}

/// A splitter's or reducer's Deployment in the high-availability shape: at least two replicas
/// sharing a PostgreSQL database whose URL (credentials) comes from a Secret, rollouts that
/// never take a replica away before its successor runs, replicas spread over nodes and
/// protected by a PodDisruptionBudget, and a writable data dir that is not the state.
fn check_standby_replicas(
    m: &Manifests,
    name: &str,
    deployment: &Value,
    env: &BTreeMap<String, Option<String>>,
    from_secrets: &BTreeMap<String, String>,
    mounts: &BTreeMap<String, String>,
) -> Result<()> {
    let spec = &deployment["spec"];
    let replicas = spec["replicas"].as_u64().unwrap_or(1);
    ensure!(
        replicas >= 2,
        "Deployment {name}: {replicas} replica(s); a standby needs two or more"
    );
    assert_eq!(
        spec["strategy"]["type"].as_str(),
        Some("RollingUpdate"),
        "Deployment {name}: strategy"
    );
    assert_eq!(
        scalar_text(&spec["strategy"]["rollingUpdate"]["maxUnavailable"]).as_deref(),
        Some("0"),
        "Deployment {name}: a rollout starts the new replica before it stops an old one"
    );

    // The database: from a Secret (it carries credentials), a postgres:// URL there.
    let secret = from_secrets.get("BATCHQ_DATABASE_URL").ok_or_else(|| {
        anyhow!("Deployment {name}: BATCHQ_DATABASE_URL must come from a Secret (secretKeyRef)")
    })?;
    ensure!(
        env.contains_key("BATCHQ_DATABASE_URL"),
        "Deployment {name}: no BATCHQ_DATABASE_URL"
    );
    let doc = m
        .get("Secret", secret)
        .ok_or_else(|| anyhow!("Deployment {name}: no Secret {secret}"))?;
    let url = scalar_text(&doc["stringData"]["BATCHQ_DATABASE_URL"])
        .ok_or_else(|| anyhow!("Secret {secret}: an example BATCHQ_DATABASE_URL in stringData"))?;
    ensure!(
        url.starts_with("postgres://") || url.starts_with("postgresql://"),
        "Secret {secret}: BATCHQ_DATABASE_URL {url} is no postgres:// URL"
    );

    // A data dir the process can write, on a volume of the pod.
    if let Some(Some(data_dir)) = env.get("BATCHQ_DATA_DIR") {
        ensure!(
            mounts.contains_key(data_dir),
            "Deployment {name}: nothing is mounted at its data dir {data_dir} (the root \
             filesystem is read-only)"
        );
    }

    // Spread over nodes, and a budget that lets a drain take one replica at a time.
    let labels = &spec["template"]["metadata"]["labels"];
    let terms = seq_of(
        &spec["template"]["spec"]["affinity"]["podAntiAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"],
        "podAntiAffinity",
    )?;
    ensure!(
        terms.iter().any(|t| {
            let term = &t["podAffinityTerm"];
            term["topologyKey"].as_str() == Some("kubernetes.io/hostname")
                && keys_of(&term["labelSelector"]["matchLabels"], "labelSelector").is_ok_and(
                    |keys| {
                        !keys.is_empty()
                            && keys.iter().all(|k| {
                                term["labelSelector"]["matchLabels"][k.as_str()]
                                    == labels[k.as_str()]
                            })
                    },
                )
        }),
        "Deployment {name}: no podAntiAffinity spreading its replicas over nodes"
    );
    let budgets: Vec<&str> = m
        .of_kind("PodDisruptionBudget")
        .filter(|(_, pdb)| {
            let selector = &pdb["spec"]["selector"]["matchLabels"];
            keys_of(selector, "PodDisruptionBudget selector").is_ok_and(|keys| {
                !keys.is_empty()
                    && keys
                        .iter()
                        .all(|k| selector[k.as_str()] == labels[k.as_str()])
            })
        })
        .map(|(pdb_name, _)| pdb_name)
        .collect();
    ensure!(
        budgets.len() == 1,
        "Deployment {name}: one PodDisruptionBudget should select its pods, found {budgets:?}"
    );
    let pdb = &m
        .get("PodDisruptionBudget", budgets[0])
        .expect("listed above")["spec"];
    let keeps_one = match (
        scalar_text(&pdb["maxUnavailable"]),
        scalar_text(&pdb["minAvailable"]),
    ) {
        (Some(max), None) => max
            .parse::<u64>()
            .is_ok_and(|max| max >= 1 && max < replicas),
        (None, Some(min)) => min
            .parse::<u64>()
            .is_ok_and(|min| min >= 1 && min < replicas),
        _ => false,
    };
    ensure!(
        keeps_one,
        "PodDisruptionBudget {}: should keep at least one of {replicas} replicas and let a \
         drain take one (maxUnavailable 1)",
        budgets[0]
    );
    Ok(())
}

#[test]
fn scaled_object_scales_the_workers_on_the_work_queues_of_the_namespace() -> Result<()> {
    let m = Manifests::load()?;
    let scaled: Vec<_> = m.of_kind("ScaledObject").collect();
    ensure!(
        scaled.len() == 1,
        "one ScaledObject, found {}",
        scaled.len()
    );
    let (name, scaled) = scaled[0];
    let spec = &scaled["spec"];

    // It scales the worker Deployment.
    let target = str_of(&spec["scaleTargetRef"]["name"], "scaleTargetRef.name")?;
    if let Some(kind) = spec["scaleTargetRef"]["kind"].as_str() {
        assert_eq!(
            kind, "Deployment",
            "ScaledObject {name}: scaleTargetRef.kind"
        );
    }
    let deployment = m
        .get("Deployment", target)
        .ok_or_else(|| anyhow!("ScaledObject {name} scales {target}, which is no Deployment"))?;
    assert_eq!(
        m.role(deployment)?,
        "worker",
        "ScaledObject {name} scales the workers"
    );
    ensure!(
        spec["minReplicaCount"].as_u64().unwrap_or(0)
            <= spec["maxReplicaCount"].as_u64().unwrap_or(100),
        "ScaledObject {name}: minReplicaCount above maxReplicaCount"
    );

    check_work_queue_triggers(&m, &format!("ScaledObject {name}"), spec)
}

/// Fragments a worker without `BATCHQ_PREFETCH` runs at once (the adaptive default holds more,
/// but runs these 4; with `--max-fragments` it is a fixed prefetch of 4): what one worker
/// takes off a queue's depth, so the KEDA triggers' `value`.
const DEFAULT_RUN_SLOTS: &str = "4";

/// A KEDA scaler's triggers (`owner`, its `spec`): one per built-in operation's work queue,
/// named after the namespace of the ConfigMap, counting ready plus unacknowledged messages,
/// one worker per fragments it runs at once, the broker's credentials from a Secret.
fn check_work_queue_triggers(m: &Manifests, owner: &str, spec: &Value) -> Result<()> {
    let names = Names::new(m.config_value("BATCHQ_NAMESPACE")?);
    // The manifests keep the workers' adaptive default, which a prefetch would turn off.
    ensure!(
        m.config_value("BATCHQ_PREFETCH").is_err(),
        "ConfigMap batchq-config sets BATCHQ_PREFETCH, which turns the workers' adaptive \
         prefetch off"
    );
    let prefetch = DEFAULT_RUN_SLOTS.to_owned();
    let mut queues = BTreeSet::new();
    for trigger in seq_of(&spec["triggers"], "triggers")? {
        assert_eq!(trigger["type"].as_str(), Some("rabbitmq"), "trigger type");
        let meta = &trigger["metadata"];
        let queue = str_of(&meta["queueName"], "queueName")?;
        // Only the management API counts unacknowledged messages.
        assert_eq!(meta["protocol"].as_str(), Some("http"), "{queue}: protocol");
        assert_eq!(meta["mode"].as_str(), Some("QueueLength"), "{queue}: mode");
        ensure!(
            scalar_text(&meta["excludeUnacknowledged"]).is_none_or(|v| v == "false"),
            "{queue}: unacknowledged fragments must count"
        );
        assert_eq!(
            scalar_text(&meta["value"]),
            Some(prefetch.clone()),
            "{queue}: value against the fragments a worker runs at once"
        );
        ensure!(
            meta["host"].is_null(),
            "{queue}: the broker's credentials belong in a Secret"
        );
        let auth = str_of(
            &trigger["authenticationRef"]["name"],
            "authenticationRef.name",
        )?;
        let auth = m
            .get("TriggerAuthentication", auth)
            .ok_or_else(|| anyhow!("{queue}: no TriggerAuthentication {auth}"))?;
        let refs = seq_of(&auth["spec"]["secretTargetRef"], "secretTargetRef")?;
        ensure!(
            refs.iter().any(|r| r["parameter"].as_str() == Some("host")),
            "{queue}: the TriggerAuthentication gives no host"
        );
        for r in refs {
            let secret = str_of(&r["name"], "secretTargetRef name")?;
            let key = str_of(&r["key"], "secretTargetRef key")?;
            ensure!(
                m.keys("Secret", secret)?.contains(key),
                "TriggerAuthentication refers to key {key} that Secret {secret} lacks"
            );
        }
        ensure!(queues.insert(queue.to_owned()), "two triggers on {queue}");
    }
    let expected: BTreeSet<String> = BUILTIN_OPERATIONS
        .iter()
        .map(|op| names.work_queue(op))
        .collect();
    assert_eq!(
        queues, expected,
        "the {owner}'s queues against {{ns}}.work.{{op}}"
    );
    Ok(())
}

#[test]
fn scaled_job_runs_ephemeral_workers_on_the_work_queues_of_the_namespace() -> Result<()> {
    let m = Manifests::load()?;
    let env_vars = settings_deployments_may_set()?;
    let jobs: Vec<_> = m.of_kind("ScaledJob").collect();
    ensure!(jobs.len() == 1, "one ScaledJob, found {}", jobs.len());
    let (name, job) = jobs[0];
    let spec = &job["spec"];

    // The ScaledJob and the ScaledObject scale on the same queues: one of the two ships
    // paused, or KEDA would start Jobs and replicas for the same backlog.
    let paused = |doc: &Value| {
        scalar_text(&doc["metadata"]["annotations"]["autoscaling.keda.sh/paused"])
            .is_some_and(|v| v == "true")
            || !doc["metadata"]["annotations"]["autoscaling.keda.sh/paused-replicas"].is_null()
    };
    let objects: Vec<_> = m.of_kind("ScaledObject").collect();
    ensure!(
        paused(job) || objects.iter().all(|(_, object)| paused(object)),
        "ScaledJob {name} and the ScaledObject both scale the workers"
    );

    // Its pods are workers that exit on their own, each Job once.
    let pod = &spec["jobTargetRef"]["template"]["spec"];
    let restart = str_of(&pod["restartPolicy"], "restartPolicy")?;
    ensure!(
        ["Never", "OnFailure"].contains(&restart),
        "ScaledJob {name}: a Job's restartPolicy is Never or OnFailure, not {restart}"
    );
    let grace = pod["terminationGracePeriodSeconds"]
        .as_u64()
        .ok_or_else(|| anyhow!("ScaledJob {name} sets no terminationGracePeriodSeconds"))?;
    ensure!(
        grace > DEFAULT_LIFESPAN_SECS,
        "ScaledJob {name}: terminationGracePeriodSeconds {grace} must exceed the default \
         lifespan of {DEFAULT_LIFESPAN_SECS} s"
    );
    assert_eq!(
        pod["securityContext"]["runAsNonRoot"].as_bool(),
        Some(true),
        "ScaledJob {name}: runAsNonRoot"
    );
    let containers = seq_of(&pod["containers"], "containers")?;
    ensure!(containers.len() == 1, "one container per batchq pod");
    let container = &containers[0];
    let args = strings_of(&container["args"], "args")?;
    assert_eq!(
        args.first().map(String::as_str),
        Some("worker"),
        "ScaledJob {name} runs workers"
    );

    let mut env = BTreeMap::new();
    for source in seq_of(&container["envFrom"], "envFrom")? {
        let config = str_of(&source["configMapRef"]["name"], "configMapRef name")?;
        ensure!(
            m.has("ConfigMap", config),
            "ScaledJob {name}: no ConfigMap {config}"
        );
        for key in m.keys("ConfigMap", config)? {
            env.insert(key, None);
        }
    }
    for variable in seq_of(&container["env"], "env")? {
        let var = str_of(&variable["name"], "env name")?.to_owned();
        ensure!(
            env_vars.contains(&var),
            "ScaledJob {name} sets {var}, which no batchq binary reads"
        );
        let secret = &variable["valueFrom"]["secretKeyRef"];
        if !secret.is_null() {
            let object = str_of(&secret["name"], "secretKeyRef name")?;
            let key = str_of(&secret["key"], "secretKeyRef key")?;
            ensure!(
                m.keys("Secret", object)?.contains(key),
                "ScaledJob {name}: {var} refers to key {key} that Secret {object} lacks"
            );
        }
        env.insert(var, scalar_text(&variable["value"]));
    }
    for var in ["AMQP_URL", "BATCHQ_NAMESPACE"] {
        ensure!(env.contains_key(var), "ScaledJob {name} gets no {var}");
    }
    // What makes the worker ephemeral: a budget the worker accepts (a positive count).
    let max_fragments = env
        .get("BATCHQ_MAX_FRAGMENTS")
        .cloned()
        .flatten()
        .ok_or_else(|| anyhow!("ScaledJob {name} sets no BATCHQ_MAX_FRAGMENTS"))?;
    batchq_worker::parse_max_fragments(&max_fragments)
        .map_err(|e| anyhow!("ScaledJob {name}: BATCHQ_MAX_FRAGMENTS: {e}"))?;
    if let Some(Some(lifetime)) = env.get("BATCHQ_MAX_LIFETIME") {
        batchq_worker::parse_lifetime(lifetime)
            .map_err(|e| anyhow!("ScaledJob {name}: BATCHQ_MAX_LIFETIME: {e}"))?;
    }

    let volumes: BTreeSet<&str> = seq_of(&pod["volumes"], "volumes")?
        .iter()
        .filter_map(|v| v["name"].as_str())
        .collect();
    for mount in seq_of(&container["volumeMounts"], "volumeMounts")? {
        let volume = str_of(&mount["name"], "volumeMount name")?;
        ensure!(
            volumes.contains(volume),
            "ScaledJob {name} mounts volume {volume}, which its pod does not define"
        );
    }

    check_work_queue_triggers(&m, &format!("ScaledJob {name}"), spec)
}

#[test]
fn kustomize_builds_the_manifests() -> Result<()> {
    let attempts: [(&str, &[&str]); 2] = [
        ("kubectl", &["kustomize", "deploy/kubernetes"]),
        ("kustomize", &["build", "deploy/kubernetes"]),
    ];
    for (program, args) in attempts {
        if !on_path(program) {
            continue;
        }
        let Some(output) = run_tool(program, args)? else {
            continue;
        };
        ensure!(
            output.status.success(),
            "{program} {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&output.stderr)
        );
        let text = String::from_utf8_lossy(&output.stdout);
        let kinds: BTreeSet<String> = serde_norway::Deserializer::from_str(&text)
            .map(|d| Value::deserialize(d).map(|v| v["kind"].as_str().unwrap_or("").to_owned()))
            .collect::<Result<_, _>>()?;
        for kind in [
            "ConfigMap",
            "Secret",
            "PodDisruptionBudget",
            "Deployment",
            "Service",
            "ScaledObject",
            "ScaledJob",
            "TriggerAuthentication",
        ] {
            ensure!(kinds.contains(kind), "{program} built no {kind}: {kinds:?}");
        }
        return Ok(());
    }
    eprintln!(
        "kustomize_builds_the_manifests: neither kubectl nor kustomize is on PATH; skipped the kustomize build"
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// compose.yaml

/// `source:target[:mode]` of a short-syntax volume.
fn volume_parts(spec: &str) -> Result<(String, String)> {
    let mut parts = spec.splitn(3, ':');
    let source = parts.next().unwrap_or_default().to_owned();
    let target = parts
        .next()
        .ok_or_else(|| anyhow!("volume {spec:?} has no target"))?
        .to_owned();
    Ok((source, target))
}

/// A service's environment as name → value, from either compose form (mapping or list).
fn compose_env(service: &Value, name: &str) -> Result<BTreeMap<String, String>> {
    let mut env = BTreeMap::new();
    match &service["environment"] {
        Value::Mapping(map) => {
            for (k, v) in map {
                env.insert(
                    str_of(k, &format!("{name}: environment"))?.to_owned(),
                    scalar_text(v).unwrap_or_default(),
                );
            }
        }
        Value::Sequence(items) => {
            for item in items {
                let item = str_of(item, &format!("{name}: environment"))?;
                let (k, v) = item.split_once('=').unwrap_or((item, ""));
                env.insert(k.to_owned(), v.to_owned());
            }
        }
        Value::Null => {}
        other => bail!("{name}: environment is {other:?}"),
    }
    Ok(env)
}

#[test]
fn compose_file_refers_to_names_that_exist() -> Result<()> {
    let root = repo_root();
    let compose = yaml_document(&root.join("compose.yaml"))?;
    let env_vars = settings_deployments_may_set()?;
    let services = &compose["services"];
    let service_names: BTreeSet<String> = keys_of(services, "services")?.into_iter().collect();
    for expected in [
        "rabbitmq",
        "splitter",
        "reducer",
        "worker",
        "batchctl",
        "prometheus",
        "grafana",
    ] {
        ensure!(
            service_names.contains(expected),
            "compose.yaml has no service {expected}"
        );
    }
    let declared_volumes: BTreeSet<String> = keys_of(&compose["volumes"], "volumes")?
        .into_iter()
        .collect();
    let mut used_volumes = BTreeSet::new();

    // Volumes: named ones are declared, bind mounts exist in the repository.
    for name in &service_names {
        let service = &services[name.as_str()];
        for volume in seq_of(&service["volumes"], &format!("{name}: volumes"))? {
            let (source, _) = volume_parts(str_of(volume, &format!("{name}: volume"))?)?;
            if source.starts_with('.') || source.starts_with('/') {
                let path = root.join(&source);
                ensure!(
                    path.exists(),
                    "service {name} mounts {source}, which does not exist in the repository \
                     (docs/grafana is the folder of the batchq dashboard, docs/grafana/batchq.json)"
                );
            } else {
                ensure!(
                    declared_volumes.contains(&source),
                    "service {name} uses volume {source}, which compose.yaml does not declare"
                );
                used_volumes.insert(source);
            }
        }
        for dependency in keys_of(&service["depends_on"], "depends_on")
            .or_else(|_| strings_of(&service["depends_on"], "depends_on"))?
        {
            ensure!(
                service_names.contains(&dependency),
                "service {name} depends on {dependency}, which does not exist"
            );
        }
    }
    assert_eq!(
        used_volumes, declared_volumes,
        "declared volumes that no service uses"
    );

    // The batchq services: one image, the command picks the role, only settings the binaries
    // read, the broker by its service name, started once RabbitMQ is healthy.
    let image = str_of(&services["worker"]["image"], "worker image")?;
    for (name, role) in [
        ("splitter", "splitter"),
        ("reducer", "reducer"),
        ("worker", "worker"),
        ("batchctl", "batchctl"),
        ("console", "batchctl"),
    ] {
        let service = &services[name];
        assert_eq!(
            service["image"].as_str(),
            Some(image),
            "{name}: one image for every role"
        );
        ensure!(
            !service["build"].is_null(),
            "{name}: built from the repository's Dockerfile"
        );
        let command = strings_of(&service["command"], "command")?;
        let entrypoint = strings_of(&service["entrypoint"], "entrypoint")?;
        ensure!(
            command.first().map(String::as_str) == Some(role)
                || entrypoint.last().map(String::as_str) == Some(role),
            "{name}: runs {entrypoint:?} {command:?}, expected the {role}"
        );
        let env = compose_env(service, name)?;
        for var in env.keys() {
            ensure!(
                env_vars.contains(var),
                "service {name} sets {var}, which no batchq binary reads ({env_vars:?})"
            );
        }
        let url = env
            .get("AMQP_URL")
            .ok_or_else(|| anyhow!("service {name} sets no AMQP_URL"))?;
        ensure!(
            url.contains("@rabbitmq:5672/"),
            "service {name}: AMQP_URL {url} is not the rabbitmq service"
        );
        ensure!(
            env.contains_key("BATCHQ_NAMESPACE"),
            "service {name} sets no BATCHQ_NAMESPACE"
        );
        assert_eq!(
            service["depends_on"]["rabbitmq"]["condition"].as_str(),
            Some("service_healthy"),
            "{name} starts once RabbitMQ is healthy"
        );
        // batchctl commands and the console hold no fragment.
        if role != "batchctl" {
            let grace = duration_secs(str_of(
                &service["stop_grace_period"],
                &format!("{name}: stop_grace_period"),
            )?)?;
            ensure!(
                grace > DEFAULT_LIFESPAN_SECS,
                "{name}: stop_grace_period {grace} s must exceed the default lifespan of {DEFAULT_LIFESPAN_SECS} s"
            );
        }
        if name == "splitter" || name == "reducer" {
            let data_dir = env
                .get("BATCHQ_DATA_DIR")
                .ok_or_else(|| anyhow!("{name} sets no BATCHQ_DATA_DIR"))?;
            let on_named_volume = seq_of(&service["volumes"], "volumes")?.iter().any(|v| {
                v.as_str()
                    .and_then(|v| volume_parts(v).ok())
                    .is_some_and(|(source, target)| {
                        &target == data_dir && declared_volumes.contains(&source)
                    })
            });
            ensure!(
                on_named_volume,
                "{name}: its data dir {data_dir} is not on a named volume"
            );
        }
    }
    // Workers scale: a replica count, and nothing that pins one container.
    ensure!(
        services["worker"]["deploy"]["replicas"]
            .as_u64()
            .is_some_and(|n| n >= 1),
        "worker: deploy.replicas"
    );
    ensure!(
        services["worker"]["container_name"].is_null(),
        "worker: a container_name forbids --scale"
    );
    ensure!(
        services["worker"]["ports"].is_null(),
        "worker: published ports forbid --scale"
    );
    // Workers keep the adaptive prefetch, which BATCHQ_PREFETCH would turn off.
    ensure!(
        !compose_env(&services["worker"], "worker")?.contains_key("BATCHQ_PREFETCH"),
        "worker: BATCHQ_PREFETCH turns the adaptive prefetch off"
    );

    // The splitter knows the broker's consumer_timeout.
    // The console: `batchctl ui` on every interface of its container, so with a token from
    // the environment (it refuses to start without), published on the host's loopback only.
    let console = &services["console"];
    assert_eq!(
        strings_of(&console["command"], "console command")?,
        ["ui", "--listen", "0.0.0.0:8080"],
        "console: batchctl ui on the container's address"
    );
    assert_eq!(
        strings_of(&console["profiles"], "console profiles")?,
        ["console"]
    );
    ensure!(
        compose_env(console, "console")?.contains_key("BATCHQ_UI_TOKEN"),
        "console: BATCHQ_UI_TOKEN is passed through"
    );
    for port in seq_of(&console["ports"], "console ports")? {
        let port = str_of(port, "console port")?;
        ensure!(
            port.starts_with("127.0.0.1:"),
            "console: published on the host's loopback only, not {port}"
        );
    }

    let splitter_timeout = compose_env(&services["splitter"], "splitter")?
        .get("BATCHQ_CONSUMER_TIMEOUT_MS")
        .cloned()
        .ok_or_else(|| anyhow!("splitter: BATCHQ_CONSUMER_TIMEOUT_MS"))?;
    let broker_conf = read(&root.join("deploy/rabbitmq/30-batchq.conf"))?;
    let broker_timeout = broker_conf
        .lines()
        .filter_map(|l| l.trim().strip_prefix("consumer_timeout"))
        .filter_map(|rest| rest.trim().strip_prefix('='))
        .map(|v| v.trim().to_owned())
        .next()
        .ok_or_else(|| anyhow!("deploy/rabbitmq/30-batchq.conf sets no consumer_timeout"))?;
    assert_eq!(
        splitter_timeout, broker_timeout,
        "BATCHQ_CONSUMER_TIMEOUT_MS against the broker's consumer_timeout"
    );

    // RabbitMQ: official image with management and Prometheus, and a healthcheck.
    let rabbitmq = &services["rabbitmq"];
    ensure!(
        str_of(&rabbitmq["image"], "rabbitmq image")?.starts_with("rabbitmq:"),
        "rabbitmq: the official image"
    );
    let check = strings_of(&rabbitmq["healthcheck"]["test"], "healthcheck")?.join(" ");
    ensure!(
        check.contains("rabbitmq-diagnostics") && check.contains("ping"),
        "rabbitmq healthcheck: {check}"
    );
    let plugins = read(&root.join("deploy/rabbitmq/enabled_plugins"))?;
    for plugin in ["rabbitmq_management", "rabbitmq_prometheus"] {
        ensure!(
            plugins.contains(plugin),
            "deploy/rabbitmq/enabled_plugins lacks {plugin}"
        );
    }

    // Monitoring: Prometheus scrapes the reducer and RabbitMQ; Grafana gets the dashboard.
    for name in ["prometheus", "grafana"] {
        assert_eq!(
            strings_of(&services[name]["profiles"], "profiles")?,
            ["monitoring"],
            "{name} belongs to the monitoring profile"
        );
    }
    let reducer_addr = compose_env(&services["reducer"], "reducer")?
        .get("BATCHQ_METRICS_ADDR")
        .cloned()
        .unwrap_or_else(|| "0.0.0.0:9464".to_owned());
    let reducer_port = reducer_addr
        .rsplit(':')
        .next()
        .unwrap_or_default()
        .to_owned();
    let prometheus = yaml_document(&root.join("deploy/prometheus/prometheus.yml"))?;
    let mut targets = BTreeSet::new();
    for job in seq_of(&prometheus["scrape_configs"], "scrape_configs")? {
        for config in seq_of(&job["static_configs"], "static_configs")? {
            targets.extend(strings_of(&config["targets"], "targets")?);
        }
    }
    for target in [
        format!("reducer:{reducer_port}"),
        "rabbitmq:15692".to_owned(),
    ] {
        ensure!(
            targets.contains(&target),
            "Prometheus does not scrape {target}: {targets:?}"
        );
    }

    let grafana_mounts: Vec<(String, String)> =
        seq_of(&services["grafana"]["volumes"], "grafana volumes")?
            .iter()
            .filter_map(Value::as_str)
            .map(volume_parts)
            .collect::<Result<_>>()?;
    let provider = yaml_document(&root.join("deploy/grafana/provisioning/dashboards/batchq.yml"))?;
    let provider_path = str_of(
        &seq_of(&provider["providers"], "providers")?[0]["options"]["path"],
        "provider path",
    )?;
    let (dashboards_source, _) = grafana_mounts
        .iter()
        .find(|(_, target)| target == provider_path)
        .ok_or_else(|| {
            anyhow!("nothing is mounted at the dashboard provider's path {provider_path}")
        })?;
    let dashboard = root.join(dashboards_source).join("batchq.json");
    ensure!(
        dashboard.is_file(),
        "the batchq dashboard {} does not exist (compose.yaml provisions it)",
        dashboard.display()
    );
    let _: serde_json::Value = serde_json::from_str(&read(&dashboard)?)
        .with_context(|| format!("{} is not JSON", dashboard.display()))?;
    ensure!(
        grafana_mounts.iter().any(|(source, target)| root
            .join(source)
            .ends_with("deploy/grafana/provisioning")
            && target == "/etc/grafana/provisioning"),
        "grafana: deploy/grafana/provisioning is not mounted at /etc/grafana/provisioning"
    );
    let datasources =
        yaml_document(&root.join("deploy/grafana/provisioning/datasources/prometheus.yml"))?;
    let url = str_of(
        &seq_of(&datasources["datasources"], "datasources")?[0]["url"],
        "datasource url",
    )?;
    ensure!(
        url.contains("prometheus:9090"),
        "grafana's datasource is {url}, not the prometheus service"
    );
    Ok(())
}

/// The RabbitMQ node names (`rabbit@…`) a rabbitmq.conf's classic_config peer discovery lists,
/// or why it does not use it.
fn classic_config_nodes(conf: &str) -> Result<BTreeSet<String>> {
    let mut backend = None;
    let mut nodes = BTreeSet::new();
    for line in conf.lines().map(str::trim) {
        if line.starts_with('#') || line.is_empty() {
            continue;
        }
        let Some((key, value)) = line.split_once('=') else {
            bail!("rabbitmq.conf line {line:?} is no `key = value`");
        };
        let (key, value) = (key.trim(), value.trim());
        if key == "cluster_formation.peer_discovery_backend" {
            backend = Some(value.to_owned());
        } else if key.starts_with("cluster_formation.classic_config.nodes.") {
            ensure!(nodes.insert(value.to_owned()), "{value} is listed twice");
        }
    }
    ensure!(
        backend
            .as_deref()
            .is_some_and(|b| b == "classic_config" || b == "rabbit_peer_discovery_classic_config"),
        "cluster_formation.peer_discovery_backend is {backend:?}, expected classic_config"
    );
    Ok(nodes)
}

#[test]
fn compose_ha_profile_runs_a_cluster_postgres_and_two_of_each() -> Result<()> {
    let root = repo_root();
    let compose = yaml_document(&root.join("compose.yaml"))?;
    let env_vars = settings_deployments_may_set()?;
    let services = &compose["services"];
    let profile_of = |name: &str| -> Result<Vec<String>> {
        strings_of(&services[name]["profiles"], &format!("{name}: profiles"))
    };

    // The default stack is untouched: no profile, nothing of the `ha` profile in it.
    let default_stack = ["rabbitmq", "splitter", "reducer", "worker"];
    for name in default_stack {
        ensure!(
            profile_of(name)?.is_empty(),
            "{name} belongs to the default stack, without a profile"
        );
        let env = compose_env(&services[name], name)?;
        ensure!(
            !env.contains_key("BATCHQ_DATABASE_URL"),
            "{name}: the default stack keeps its state in SQLite"
        );
    }
    let ha: BTreeSet<String> = keys_of(services, "services")?
        .into_iter()
        .filter(|name| profile_of(name).is_ok_and(|p| p.iter().any(|p| p == "ha")))
        .collect();
    let expected: BTreeSet<String> = [
        "rabbitmq-1",
        "rabbitmq-2",
        "rabbitmq-3",
        "postgres",
        "splitter-ha",
        "reducer-ha",
        "worker-ha",
        "batchctl-ha",
    ]
    .into_iter()
    .map(str::to_owned)
    .collect();
    assert_eq!(ha, expected, "the services of the ha profile");
    for name in &ha {
        assert_eq!(profile_of(name)?, ["ha"], "{name}: only in the ha profile");
        for dependency in keys_of(&services[name.as_str()]["depends_on"], "depends_on")? {
            ensure!(
                ha.contains(&dependency),
                "{name} (profile ha) depends on {dependency}, which is not in the profile"
            );
        }
    }

    // Three RabbitMQ nodes of one cluster: one cookie, classic_config listing exactly them,
    // the 2nd and 3rd joining the first once it is healthy, each on a volume of its own.
    let nodes = ["rabbitmq-1", "rabbitmq-2", "rabbitmq-3"];
    let mut cookies = BTreeSet::new();
    let mut node_names = BTreeSet::new();
    let mut data_volumes = BTreeSet::new();
    for (n, name) in nodes.into_iter().enumerate() {
        let node = &services[name];
        assert_eq!(
            node["image"].as_str(),
            Some("rabbitmq:3.10-management"),
            "{name}: image"
        );
        let hostname = str_of(&node["hostname"], &format!("{name}: hostname"))?;
        assert_eq!(hostname, name, "{name}: its host name is its service name");
        node_names.insert(format!("rabbit@{hostname}"));
        let env = compose_env(node, name)?;
        cookies.insert(
            env.get("RABBITMQ_ERLANG_COOKIE")
                .cloned()
                .ok_or_else(|| anyhow!("{name}: no RABBITMQ_ERLANG_COOKIE"))?,
        );
        let check = strings_of(&node["healthcheck"]["test"], "healthcheck")?.join(" ");
        ensure!(
            check.contains("rabbitmq-diagnostics") && check.contains("ping"),
            "{name} healthcheck: {check}"
        );
        let mounts: Vec<(String, String)> = seq_of(&node["volumes"], "volumes")?
            .iter()
            .map(|v| str_of(v, "volume").and_then(volume_parts))
            .collect::<Result<_>>()?;
        let data = mounts
            .iter()
            .find(|(_, target)| target == "/var/lib/rabbitmq")
            .ok_or_else(|| anyhow!("{name}: nothing on /var/lib/rabbitmq"))?;
        ensure!(
            !data.0.starts_with('.') && data_volumes.insert(data.0.clone()),
            "{name}: its data needs a named volume of its own, not {}",
            data.0
        );
        let mut cluster_conf = None;
        for (source, target) in &mounts {
            if target.starts_with("/etc/rabbitmq/conf.d/") && source.starts_with('.') {
                let text = read(&root.join(source))?;
                if text.contains("cluster_formation") {
                    cluster_conf = Some(classic_config_nodes(&text)?);
                }
            }
        }
        ensure!(
            mounts.iter().any(|(s, t)| s.ends_with("30-batchq.conf")
                && t == "/etc/rabbitmq/conf.d/30-batchq.conf"),
            "{name}: the broker settings of deploy/rabbitmq/30-batchq.conf"
        );
        let listed = cluster_conf
            .ok_or_else(|| anyhow!("{name}: no cluster_formation configuration mounted"))?;
        let all: BTreeSet<String> = nodes.iter().map(|n| format!("rabbit@{n}")).collect();
        assert_eq!(listed, all, "{name}: the nodes classic_config lists");
        if n > 0 {
            assert_eq!(
                services[name]["depends_on"]["rabbitmq-1"]["condition"].as_str(),
                Some("service_healthy"),
                "{name} joins rabbitmq-1 once it runs"
            );
        }
    }
    ensure!(
        cookies.len() == 1,
        "the nodes need one Erlang cookie, found {cookies:?}"
    );

    // PostgreSQL 15 on a volume, with a healthcheck.
    let postgres = &services["postgres"];
    ensure!(
        str_of(&postgres["image"], "postgres image")?.starts_with("postgres:15"),
        "postgres: PostgreSQL 15"
    );
    let check = strings_of(&postgres["healthcheck"]["test"], "healthcheck")?.join(" ");
    ensure!(
        check.contains("pg_isready"),
        "postgres healthcheck: {check}"
    );
    ensure!(
        seq_of(&postgres["volumes"], "volumes")?.iter().any(|v| {
            v.as_str()
                .and_then(|v| volume_parts(v).ok())
                .is_some_and(|(source, target)| {
                    target == "/var/lib/postgresql/data" && !source.starts_with('.')
                })
        }),
        "postgres: its data on a named volume at /var/lib/postgresql/data"
    );
    let pg_env = compose_env(postgres, "postgres")?;
    let pg_user = pg_env
        .get("POSTGRES_USER")
        .ok_or_else(|| anyhow!("postgres: POSTGRES_USER"))?;
    let pg_password = pg_env
        .get("POSTGRES_PASSWORD")
        .ok_or_else(|| anyhow!("postgres: POSTGRES_PASSWORD"))?;
    let pg_db = pg_env
        .get("POSTGRES_DB")
        .ok_or_else(|| anyhow!("postgres: POSTGRES_DB"))?;
    let database_url = format!("postgres://{pg_user}:{pg_password}@postgres:5432/{pg_db}");

    // The batchq services: every node in AMQP_URL; two splitters and two reducers on the
    // database, started once the nodes and the database are healthy.
    let image = str_of(&services["worker"]["image"], "worker image")?;
    for (name, role) in [
        ("splitter-ha", "splitter"),
        ("reducer-ha", "reducer"),
        ("worker-ha", "worker"),
        ("batchctl-ha", "batchctl"),
    ] {
        let service = &services[name];
        assert_eq!(
            service["image"].as_str(),
            Some(image),
            "{name}: one image for every role"
        );
        let command = strings_of(&service["command"], "command")?;
        let entrypoint = strings_of(&service["entrypoint"], "entrypoint")?;
        ensure!(
            command.first().map(String::as_str) == Some(role)
                || entrypoint.last().map(String::as_str) == Some(role),
            "{name}: runs {entrypoint:?} {command:?}, expected the {role}"
        );
        let env = compose_env(service, name)?;
        for var in env.keys() {
            ensure!(
                env_vars.contains(var),
                "service {name} sets {var}, which no batchq binary reads ({env_vars:?})"
            );
        }
        ensure!(
            role != "worker" || !env.contains_key("BATCHQ_PREFETCH"),
            "{name}: BATCHQ_PREFETCH turns the adaptive prefetch off"
        );
        let urls = env
            .get("AMQP_URL")
            .ok_or_else(|| anyhow!("{name}: no AMQP_URL"))?;
        let hosts: BTreeSet<String> = urls
            .split(',')
            .map(|url| {
                url.split_once('@')
                    .and_then(|(_, rest)| rest.split_once(':'))
                    .map(|(host, _)| host.to_owned())
                    .ok_or_else(|| anyhow!("{name}: {url} is no amqp://user:pass@host:port URL"))
            })
            .collect::<Result<_>>()?;
        let all: BTreeSet<String> = nodes.iter().map(|n| (*n).to_owned()).collect();
        assert_eq!(hosts, all, "{name}: AMQP_URL lists every node");
        assert_eq!(
            urls.split(',').count(),
            nodes.len(),
            "{name}: each node once in AMQP_URL"
        );
        for node in nodes {
            assert_eq!(
                service["depends_on"][node]["condition"].as_str(),
                Some("service_healthy"),
                "{name} starts once {node} is healthy"
            );
        }
        ensure!(
            service["container_name"].is_null() && service["ports"].is_null(),
            "{name}: replicas need no container_name and no published ports"
        );
        let stateful = role == "splitter" || role == "reducer";
        if stateful {
            assert_eq!(
                env.get("BATCHQ_DATABASE_URL"),
                Some(&database_url),
                "{name}: BATCHQ_DATABASE_URL against the postgres service"
            );
            assert_eq!(
                service["depends_on"]["postgres"]["condition"].as_str(),
                Some("service_healthy"),
                "{name} starts once PostgreSQL is healthy"
            );
            let replicas = service["deploy"]["replicas"].as_u64().unwrap_or(1);
            ensure!(
                replicas >= 2,
                "{name}: {replicas} replica(s), a standby needs two"
            );
        } else {
            ensure!(
                !env.contains_key("BATCHQ_DATABASE_URL"),
                "{name}: only splitters and reducers read BATCHQ_DATABASE_URL"
            );
        }
        if role != "batchctl" {
            let grace = duration_secs(str_of(
                &service["stop_grace_period"],
                &format!("{name}: stop_grace_period"),
            )?)?;
            ensure!(
                grace > DEFAULT_LIFESPAN_SECS,
                "{name}: stop_grace_period {grace} s must exceed the default lifespan"
            );
        }
    }
    assert_eq!(
        compose_env(&services["splitter-ha"], "splitter-ha")?.get("BATCHQ_CONSUMER_TIMEOUT_MS"),
        compose_env(&services["splitter"], "splitter")?.get("BATCHQ_CONSUMER_TIMEOUT_MS"),
        "splitter-ha: the broker's consumer_timeout, as the default splitter"
    );
    Ok(())
}

#[test]
fn compose_file_passes_docker_compose_config() -> Result<()> {
    let attempts: [(&str, &[&str]); 2] = [
        ("docker-compose", &["-f", "compose.yaml", "config", "-q"]),
        ("docker", &["compose", "-f", "compose.yaml", "config", "-q"]),
    ];
    for (program, args) in attempts {
        if !on_path(program) {
            continue;
        }
        if program == "docker" {
            // The client may lack the compose plugin.
            let has_plugin =
                run_tool("docker", &["compose", "version"])?.is_some_and(|o| o.status.success());
            if !has_plugin {
                continue;
            }
        }
        let Some(output) = run_tool(program, args)? else {
            continue;
        };
        ensure!(
            output.status.success(),
            "{program} {} failed: {}{}",
            args.join(" "),
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        // And with every profile on (the services of a profile are only fully checked then):
        // `--profile` goes before the command, after `compose` for the plugin.
        let mut all = args.to_vec();
        let at = all.iter().position(|a| *a == "config").expect("config");
        for profile in ["ha", "monitoring", "tools"] {
            all.insert(at, profile);
            all.insert(at, "--profile");
        }
        let output = run_tool(program, &all)?
            .ok_or_else(|| anyhow!("{program} vanished between two runs"))?;
        ensure!(
            output.status.success(),
            "{program} {} failed: {}{}",
            all.join(" "),
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        return Ok(());
    }
    eprintln!(
        "compose_file_passes_docker_compose_config: neither docker-compose nor the docker compose \
         plugin is on PATH; skipped `config -q` (the structural checks still ran)"
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Dockerfile

/// `rust-version` values compared as numbers: `1.89` < `1.89.1` < `1.90`.
fn version_parts(text: &str) -> [u64; 3] {
    let mut parts = [0; 3];
    for (part, text) in parts.iter_mut().zip(text.trim().split('.')) {
        *part = text.parse().unwrap_or(0);
    }
    parts
}

#[test]
fn dockerfile_builds_every_member_with_a_new_enough_rust() -> Result<()> {
    let root = repo_root();
    let dockerfile = read(&root.join("Dockerfile"))?;

    // The dependency layer needs every workspace member's manifest, or cargo refuses the
    // workspace.
    let manifest = read(&root.join("Cargo.toml"))?;
    let members_line = manifest
        .lines()
        .find(|l| l.trim_start().starts_with("members"))
        .ok_or_else(|| anyhow!("Cargo.toml has no members"))?;
    let members: Vec<&str> = members_line.split('"').skip(1).step_by(2).collect();
    ensure!(!members.is_empty(), "no members in {members_line:?}");
    for member in &members {
        ensure!(
            dockerfile.contains(&format!("COPY {member}/Cargo.toml {member}/Cargo.toml")),
            "the Dockerfile does not copy {member}/Cargo.toml into its dependency layer"
        );
    }
    // Each binary's folder and the package that builds it.
    for (bin, package) in [
        ("splitter", "batchq-splitter"),
        ("worker", "batchq-worker"),
        ("reducer", "batchq-reducer"),
        ("batchctl", "batchctl"),
    ] {
        ensure!(
            dockerfile.contains(&format!("COPY {bin} {bin}\n")),
            "the Dockerfile does not copy {bin}'s sources"
        );
        ensure!(
            dockerfile.contains(&format!("-p {package} ")),
            "the Dockerfile does not build {bin} (package {package})"
        );
    }

    // Non-root, numeric user; tini as PID 1.
    let user = dockerfile
        .lines()
        .filter_map(|l| l.strip_prefix("USER "))
        .next_back()
        .ok_or_else(|| anyhow!("the Dockerfile sets no USER"))?;
    ensure!(
        !user.starts_with("root") && !user.starts_with("0"),
        "the image runs as {user}"
    );
    ensure!(
        dockerfile.contains("ENTRYPOINT [\"/usr/bin/tini\", \"--\"]"),
        "tini is PID 1"
    );

    // The builder's Rust is at least every locked dependency's rust-version.
    let rust = dockerfile
        .lines()
        .find_map(|l| l.strip_prefix("ARG RUST_VERSION="))
        .ok_or_else(|| anyhow!("the Dockerfile has no ARG RUST_VERSION"))?
        .trim()
        .to_owned();
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
    let output = Command::new(&cargo)
        .args(["metadata", "--format-version", "1", "--locked"])
        .current_dir(&root)
        .output()
        .context("running cargo metadata")?;
    ensure!(
        output.status.success(),
        "cargo metadata: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let metadata: serde_json::Value = serde_json::from_slice(&output.stdout)?;
    // Only what the image builds: the four binaries and their normal and build dependencies.
    let output = Command::new(&cargo)
        .args([
            "tree",
            "--locked",
            "-e",
            "normal,build",
            "--prefix",
            "none",
            "--format",
            "{p}",
            "-p",
            "batchq-splitter",
            "-p",
            "batchq-worker",
            "-p",
            "batchq-reducer",
            "-p",
            "batchctl",
        ])
        .current_dir(&root)
        .output()
        .context("running cargo tree")?;
    ensure!(
        output.status.success(),
        "cargo tree: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let built: BTreeSet<(String, String)> = String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter_map(|l| {
            let mut words = l.split_whitespace();
            let name = words.next()?;
            let version = words.next()?.trim_start_matches('v');
            Some((name.to_owned(), version.to_owned()))
        })
        .collect();
    let packages = metadata["packages"]
        .as_array()
        .ok_or_else(|| anyhow!("cargo metadata lists no packages"))?;
    let mut checked = 0;
    for package in packages {
        let name = package["name"].as_str().unwrap_or_default();
        let version = package["version"].as_str().unwrap_or_default();
        if !built.contains(&(name.to_owned(), version.to_owned())) {
            continue;
        }
        checked += 1;
        if let Some(needed) = package["rust_version"].as_str() {
            ensure!(
                version_parts(&rust) >= version_parts(needed),
                "the Dockerfile builds with Rust {rust}, but {name} {version} needs {needed}"
            );
        }
    }
    ensure!(
        checked >= 20,
        "only {checked} packages matched between cargo tree and cargo metadata"
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Scaling, live

/// Operations of the scaling job: enough that it is still running when the workers leave.
const SCALE_OPS: u64 = 2400;
const SLEEP_MS: u64 = 50;
const PREFETCH: u16 = 4;
/// How long each throughput is measured.
const WINDOW: Duration = Duration::from_secs(3);

async fn status_of(env: &TestEnv, job_id: &str) -> Result<JobStatus> {
    env.status(job_id)
        .await?
        .ok_or_else(|| anyhow!("the reducer does not know {job_id}"))
}

/// Operations per second over `WINDOW`, from the job's own counts; the job must still run.
async fn throughput(env: &TestEnv, job_id: &str) -> Result<f64> {
    let before = status_of(env, job_id).await?;
    let started = Instant::now();
    tokio::time::sleep(WINDOW).await;
    let after = status_of(env, job_id).await?;
    let elapsed = started.elapsed().as_secs_f64();
    ensure!(
        !after.state.is_terminal(),
        "the job ended during a measurement; make it longer: {after:?}"
    );
    Ok((after.ops_succeeded - before.ops_succeeded) as f64 / elapsed)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_scale_up_and_down_in_the_middle_of_a_job() -> Result<()> {
    let mut env = TestEnv::new("scaling").await?;
    env.start_splitter()?;
    env.start_reducer()?;
    let first = env.start_worker(WorkerOpts::prefetch(PREFETCH))?;
    env.wait_for_workers(1, Duration::from_secs(20)).await?;

    // Operations that wait rather than compute, one per fragment, with a window wide enough
    // for four workers of prefetch 4: throughput is bounded by the workers in hand.
    let job_id = env
        .submit(&json!({
            "job_id": env.job_id("scaling"),
            "operation": "sleep",
            "params": {"ms": SLEEP_MS},
            "range": {"start": 0, "end": SCALE_OPS},
            "fragment_size": 1,
            "max_concurrent_fragments": 32,
        }))
        .await?;
    env.wait_for_status(&job_id, Duration::from_secs(20), |s| s.ops_succeeded >= 20)
        .await?;
    let one = throughput(&env, &job_id).await?;

    // Scale 1 → 4.
    let added = (0..3)
        .map(|_| env.start_worker(WorkerOpts::prefetch(PREFETCH)))
        .collect::<Result<Vec<_>>>()?;
    env.wait_for_workers(4, Duration::from_secs(20)).await?;
    for &worker in &added {
        env.wait_until_holding(worker, Duration::from_secs(10))
            .await?;
    }
    let four = throughput(&env, &job_id).await?;
    eprintln!("throughput: 1 worker {one:.0} ops/s, 4 workers {four:.0} ops/s");
    ensure!(
        four >= 2.0 * one,
        "four workers ran {four:.0} ops/s, one ran {one:.0} ops/s: expected at least twice as many"
    );

    // Scale 4 → 1 with SIGTERM, while the leaving workers hold fragments.
    for &worker in &added {
        env.wait_until_holding(worker, Duration::from_secs(10))
            .await?;
    }
    let at_scale_down = status_of(&env, &job_id).await?;
    ensure!(
        !at_scale_down.state.is_terminal(),
        "the job ended before the scale-down; make it longer: {at_scale_down:?}"
    );
    for &worker in &added {
        env.kill(worker, Signal::Term)?;
    }
    for &worker in &added {
        let exit = env.wait_exit(worker, Duration::from_secs(15)).await?;
        assert_eq!(
            exit.code(),
            Some(0),
            "a worker stopped by SIGTERM exits 0: {exit:?}"
        );
    }
    eprintln!(
        "scaled down at {} of {SCALE_OPS} operations",
        at_scale_down.ops_succeeded
    );
    let back_to_one = throughput(&env, &job_id).await?;
    eprintln!("throughput after the scale-down: {back_to_one:.0} ops/s");
    ensure!(
        back_to_one < four,
        "one worker left, yet {back_to_one:.0} ops/s against {four:.0} with four"
    );

    // Nothing was lost or counted twice when the workers left.
    let status = env
        .wait_for_terminal(&job_id, Duration::from_secs(60))
        .await?;
    assert_counts(&status, JobState::Succeeded, SCALE_OPS, 0);
    let results = env.results(&job_id).await?;
    assert_one_per_index(&results, SCALE_OPS);
    for line in &results {
        assert!(
            matches!(line, ResultLine::Ok { result, .. } if result.is_null()),
            "a sleep operation's result is null: {line:?}"
        );
    }
    ensure!(env.is_running(first), "the first worker kept running");
    env.finish().await
}
