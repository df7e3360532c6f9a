//! The built-in `exec` operation: runs a program the worker allows (`BATCHQ_EXEC_ALLOW`), never
//! through a shell, with a clean environment.
//!
//! The allow-list is resolved once, at start: a program name is looked up on the worker's
//! `PATH`, an absolute path is taken as written. An operation's `argv[0]` must then be one of
//! the entries exactly, or the path a name resolved to; anything else (another path to the
//! same file, `./x`, `../`) fails the operation before anything starts.

use std::collections::BTreeMap;
use std::ffi::{OsStr, OsString};
use std::path::{Component, Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use async_trait::async_trait;
use common::jobspec::item_text;
use serde_json::{Map, Value};
use tokio::io::AsyncReadExt;

use crate::builtin::int_param;
use crate::operation::{OpError, OpInput, Operation};

/// Most bytes of an `exec` program's stdout kept as its result.
pub const EXEC_MAX_OUTPUT: usize = 64 * 1024;
/// `exec` timeout when the job's params give none.
pub const EXEC_DEFAULT_TIMEOUT_MS: u64 = 60_000;

/// The only variables of the worker's environment an `exec` program sees (those that are
/// set): enough to find programs, a home, the locale and the time zone, and nothing of the
/// worker's own settings (`AMQP_URL` carries the broker's password).
pub const EXEC_PASSED_ENV: [&str; 6] = ["PATH", "HOME", "LANG", "LC_ALL", "TZ", "TMPDIR"];

/// The programs `exec` may run, resolved at start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecAllowList {
    /// Each accepted `argv[0]` and the program it runs: an entry's name and the path it
    /// resolved to both run that path; an absolute entry runs itself.
    programs: BTreeMap<String, PathBuf>,
    /// Each entry as written and what it resolved to, for the start-up log.
    resolved: Vec<(String, PathBuf)>,
}

impl ExecAllowList {
    /// Resolves `entries` (program names looked up on the worker's `PATH`, or absolute paths).
    pub fn resolve(entries: &[String]) -> Result<Self, String> {
        Self::resolve_on(entries, std::env::var_os("PATH").as_deref())
    }

    /// Resolves `entries` against `path` (a `PATH` value). An entry that names no executable
    /// file is an error rather than a warning: it is a typo or a program missing from the
    /// image, and saying so at start beats failing every operation that needs it.
    pub fn resolve_on(entries: &[String], path: Option<&OsStr>) -> Result<Self, String> {
        let mut list = Self {
            programs: BTreeMap::new(),
            resolved: Vec::new(),
        };
        for entry in entries.iter().map(|e| e.trim()).filter(|e| !e.is_empty()) {
            let program = resolve_entry(entry, path)?;
            list.programs.insert(entry.to_owned(), program.clone());
            if let Some(text) = program.to_str() {
                list.programs.insert(text.to_owned(), program.clone());
            }
            list.resolved.push((entry.to_owned(), program));
        }
        if list.resolved.is_empty() {
            return Err(
                "BATCHQ_EXEC_ALLOW (--exec-allow) names no program; name the programs exec may \
                 run, or unset it so that this worker does not offer exec"
                    .into(),
            );
        }
        Ok(list)
    }

    /// The program to run for `argv0`, or why it may not run.
    pub fn program(&self, argv0: &str) -> Result<&Path, OpError> {
        self.programs
            .get(argv0)
            .map(PathBuf::as_path)
            .ok_or_else(|| {
                OpError::new(format!(
                    "program {argv0:?} is not allowed on this worker (BATCHQ_EXEC_ALLOW: {})",
                    self.entries().join(",")
                ))
            })
    }

    /// The entries as written.
    pub fn entries(&self) -> Vec<&str> {
        self.resolved
            .iter()
            .map(|(entry, _)| entry.as_str())
            .collect()
    }

    /// `entry=path` for each entry, as the worker logs it at start.
    pub fn describe(&self) -> String {
        self.resolved
            .iter()
            .map(|(entry, path)| format!("{entry}={}", path.display()))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// One allow-list entry: a bare name is looked up on `path`; an absolute path must be
/// normal (no `.` or `..`) and name an executable file; anything else is refused.
fn resolve_entry(entry: &str, path: Option<&OsStr>) -> Result<PathBuf, String> {
    let as_path = Path::new(entry);
    if as_path.is_absolute() {
        let normal = as_path
            .components()
            .all(|c| matches!(c, Component::RootDir | Component::Normal(_)));
        // `components()` quietly drops a `.` and a doubled `/`, so compare the text too.
        if !normal || entry.contains("/./") || entry.contains("//") || entry.ends_with("/.") {
            return Err(format!(
                "BATCHQ_EXEC_ALLOW entry {entry:?}: write the path without `.` or `..`"
            ));
        }
        if !is_executable_file(as_path) {
            return Err(format!(
                "BATCHQ_EXEC_ALLOW entry {entry:?} is not an executable file"
            ));
        }
        return Ok(as_path.to_path_buf());
    }
    if entry.contains('/') {
        return Err(format!(
            "BATCHQ_EXEC_ALLOW entry {entry:?} is a relative path: give a program name (looked \
             up on PATH) or an absolute path"
        ));
    }
    if entry == "." || entry == ".." {
        return Err(format!(
            "BATCHQ_EXEC_ALLOW entry {entry:?} is not a program name"
        ));
    }
    path.into_iter()
        .flat_map(std::env::split_paths)
        // An empty or relative `PATH` element means "the current folder": never trusted.
        .filter(|dir| dir.is_absolute())
        .map(|dir| dir.join(entry))
        .find(|candidate| is_executable_file(candidate))
        .ok_or_else(|| {
            format!(
                "BATCHQ_EXEC_ALLOW entry {entry:?}: no such program on PATH ({})",
                path.map(|p| p.to_string_lossy().into_owned())
                    .unwrap_or_default()
            )
        })
}

fn is_executable_file(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// The variables of [`EXEC_PASSED_ENV`] that `lookup` has.
fn passed_env(lookup: impl Fn(&str) -> Option<OsString>) -> Vec<(&'static str, OsString)> {
    EXEC_PASSED_ENV
        .iter()
        .filter_map(|&name| lookup(name).map(|value| (name, value)))
        .collect()
}

/// Runs an allowed program (no shell) with every `{}` in its arguments replaced by
/// `text(item)`, in a clean environment.
pub struct Exec {
    allowed: ExecAllowList,
    /// The environment every program gets, taken from the worker's at start.
    env: Vec<(&'static str, OsString)>,
}

impl Exec {
    pub fn new(allowed: ExecAllowList) -> Self {
        Self {
            allowed,
            env: passed_env(|name| std::env::var_os(name)),
        }
    }
}

fn exec_argv(params: &Map<String, Value>, text: &str) -> Result<Vec<String>, OpError> {
    let Some(command) = params.get("command") else {
        return Err(OpError::new(
            "params.command: missing; give [program, args...]",
        ));
    };
    let Some(parts) = command.as_array().filter(|a| !a.is_empty()) else {
        return Err(OpError::new(
            "params.command: must be a non-empty array of strings",
        ));
    };
    parts
        .iter()
        .map(|part| {
            part.as_str()
                .map(|s| s.replace("{}", text))
                .ok_or_else(|| OpError::new(format!("params.command: {part} is not a string")))
        })
        .collect()
}

/// Which part of a long output to keep.
#[derive(Clone, Copy)]
enum Keep {
    /// The first bytes (stdout: the result is its beginning).
    Head,
    /// The last bytes (stderr: the error ends with its last line).
    Tail,
}

/// Reads a pipe to its end, keeping at most `cap` bytes: a chatty program must neither fill
/// our memory nor block on a full pipe because we stopped reading.
async fn read_capped(
    pipe: &mut (impl tokio::io::AsyncRead + Unpin),
    kept: &mut Vec<u8>,
    cap: usize,
    keep: Keep,
) {
    let mut chunk = [0u8; 8192];
    loop {
        let n = match pipe.read(&mut chunk).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        match keep {
            Keep::Head => {
                let room = cap.saturating_sub(kept.len());
                kept.extend_from_slice(&chunk[..n.min(room)]);
            }
            Keep::Tail => {
                kept.extend_from_slice(&chunk[..n]);
                if kept.len() > cap {
                    let excess = kept.len() - cap;
                    kept.drain(..excess);
                }
            }
        }
    }
}

fn last_line(stderr: &[u8]) -> String {
    String::from_utf8_lossy(stderr)
        .lines()
        .rev()
        .map(str::trim)
        .find(|l| !l.is_empty())
        .unwrap_or("")
        .to_owned()
}

fn truncate_utf8(mut s: String, max: usize) -> String {
    if s.len() > max {
        let mut end = max;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
    }
    s
}

/// How a program that did not exit 0 ended.
fn how_it_ended(status: std::process::ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exited with status {code}"),
        (None, Some(signal)) => format!("killed by signal {signal}"),
        (None, None) => "ended without a status".to_owned(),
    }
}

/// Waits for `child` to end within `timeout_ms` while reading its stdout (its beginning) and
/// stderr (its end); on the timeout it is killed and the error ends with stderr's last line.
async fn wait_reading(
    child: &mut tokio::process::Child,
    timeout_ms: u64,
    argv0: &str,
) -> Result<(std::process::ExitStatus, Vec<u8>, Vec<u8>), OpError> {
    let mut stdout = child.stdout.take();
    let mut stderr = child.stderr.take();
    let mut out = Vec::new();
    let mut err = Vec::new();
    let finished = tokio::time::timeout(Duration::from_millis(timeout_ms), async {
        let read_out = async {
            if let Some(s) = stdout.as_mut() {
                read_capped(s, &mut out, EXEC_MAX_OUTPUT * 2, Keep::Head).await;
            }
        };
        let read_err = async {
            if let Some(s) = stderr.as_mut() {
                read_capped(s, &mut err, EXEC_MAX_OUTPUT, Keep::Tail).await;
            }
        };
        let ((), (), status) = tokio::join!(read_out, read_err, child.wait());
        status
    })
    .await;
    match finished {
        Err(_) => {
            let _ = child.kill().await;
            Err(OpError::new(format!(
                "timed out after {timeout_ms} ms: {}",
                last_line(&err)
            )))
        }
        Ok(Err(e)) => Err(OpError::new(format!("waiting for {argv0:?}: {e}"))),
        Ok(Ok(status)) => Ok((status, out, err)),
    }
}

#[async_trait]
impl Operation for Exec {
    fn name(&self) -> &str {
        "exec"
    }

    async fn run(&self, input: OpInput<'_>) -> Result<Value, OpError> {
        let text = item_text(input.item);
        let argv = exec_argv(input.params, &text)?;
        let timeout_ms = int_param(input.params, "timeout_ms", Some(EXEC_DEFAULT_TIMEOUT_MS))?;
        // Checked before anything starts: a refused program never runs.
        let program = self.allowed.program(&argv[0])?;
        // The resolved path runs (what the start-up log named, whatever the child's PATH),
        // under the `argv[0]` the job gave.
        let mut child = tokio::process::Command::new(program)
            .arg0(&argv[0])
            .args(&argv[1..])
            .env_clear()
            .envs(self.env.iter().map(|(name, value)| (name, value)))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| OpError::new(format!("cannot run {:?}: {e}", argv[0])))?;
        let (status, out, err) = wait_reading(&mut child, timeout_ms, &argv[0]).await?;
        if status.success() {
            let stdout = String::from_utf8_lossy(&out).trim().to_owned();
            return Ok(Value::String(truncate_utf8(stdout, EXEC_MAX_OUTPUT)));
        }
        Err(OpError::new(format!(
            "{}: {}",
            how_it_ended(status),
            last_line(&err)
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn input<'a>(item: &'a Value, params: &'a Map<String, Value>) -> OpInput<'a> {
        OpInput {
            job_id: "j",
            index: 0,
            item,
            params,
            attempt: 1,
            metrics: Box::leak(Box::default()),
        }
    }

    fn params(v: Value) -> Map<String, Value> {
        v.as_object().cloned().unwrap_or_default()
    }

    fn entries(list: &[&str]) -> Vec<String> {
        list.iter().map(|e| (*e).to_owned()).collect()
    }

    fn allowing(list: &[&str]) -> Exec {
        Exec::new(ExecAllowList::resolve(&entries(list)).expect("programs on PATH"))
    }

    /// A folder holding an executable `tool` and a plain file `data`, used as a PATH.
    fn bin_dir() -> tempfile::TempDir {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("a temporary folder");
        for (name, mode) in [("tool", 0o755), ("data", 0o644)] {
            let file = dir.path().join(name);
            std::fs::write(&file, "#!/bin/sh\necho tool\n").expect("writing a file");
            std::fs::set_permissions(&file, std::fs::Permissions::from_mode(mode))
                .expect("setting its mode");
        }
        dir
    }

    #[test]
    fn a_name_allows_itself_and_the_path_it_resolves_to() {
        let dir = bin_dir();
        let path = std::env::join_paths(["/nonexistent-dir", &dir.path().display().to_string()])
            .expect("a PATH");
        let list = ExecAllowList::resolve_on(&entries(&["tool"]), Some(&path)).expect("resolves");
        let tool = dir.path().join("tool");
        assert_eq!(list.program("tool").ok(), Some(tool.as_path()));
        let absolute = tool.display().to_string();
        assert_eq!(list.program(&absolute).ok(), Some(tool.as_path()));
        assert_eq!(list.describe(), format!("tool={absolute}"));
        // Other spellings of the same file are refused: the match is exact.
        for other in [
            "./tool".to_owned(),
            format!("{}/../{}/tool", dir.path().display(), dir.path().display()),
            format!("{}//tool", dir.path().display()),
            "tool ".to_owned(),
            "Tool".to_owned(),
            "sh".to_owned(),
        ] {
            let error = list.program(&other).expect_err(&other);
            assert!(
                error.message().contains("is not allowed"),
                "{other:?}: {}",
                error.message()
            );
        }
    }

    #[test]
    fn an_absolute_entry_allows_exactly_that_path() {
        let dir = bin_dir();
        let tool = dir.path().join("tool").display().to_string();
        let list = ExecAllowList::resolve_on(std::slice::from_ref(&tool), None).expect("exists");
        assert!(list.program(&tool).is_ok());
        assert!(
            list.program("tool").is_err(),
            "an absolute entry does not allow the bare name"
        );
    }

    #[test]
    fn entries_that_are_not_clean_programs_are_refused_at_start() {
        let dir = bin_dir();
        let path = dir.path().as_os_str().to_owned();
        let root = dir.path().display();
        let cases = [
            ("./tool".to_owned(), "relative path"),
            ("bin/tool".to_owned(), "relative path"),
            ("../tool".to_owned(), "relative path"),
            (format!("{root}/../{root}/tool"), "without `.` or `..`"),
            (format!("{root}/./tool"), "without `.` or `..`"),
            (format!("{root}/data"), "not an executable file"),
            (format!("{root}/missing"), "not an executable file"),
            ("data".to_owned(), "no such program on PATH"),
            ("missing".to_owned(), "no such program on PATH"),
            ("..".to_owned(), "not a program name"),
            (".".to_owned(), "not a program name"),
        ];
        for (entry, problem) in cases {
            let error = ExecAllowList::resolve_on(std::slice::from_ref(&entry), Some(&path))
                .expect_err(&entry);
            assert!(error.contains(problem), "{entry:?}: {error}");
            assert!(error.contains(&format!("{entry:?}")), "{entry:?}: {error}");
        }
        let error = ExecAllowList::resolve_on(&entries(&["", " "]), Some(&path))
            .expect_err("an empty list");
        assert!(error.contains("names no program"), "{error}");
    }

    #[test]
    fn a_relative_path_element_is_not_searched() {
        let dir = bin_dir();
        // The same folder reached through a relative PATH element (`../../tmp/…` from here):
        // what it means depends on where the worker runs, so it is skipped.
        let here = std::env::current_dir().expect("a current folder");
        let up = "../".repeat(here.components().count().saturating_sub(1));
        let relative = format!(
            "{up}{}",
            dir.path().display().to_string().trim_start_matches('/')
        );
        assert!(
            Path::new(&relative).join("tool").exists(),
            "{relative} reaches the folder"
        );
        let error = ExecAllowList::resolve_on(&entries(&["tool"]), Some(OsStr::new(&relative)))
            .expect_err("a relative element");
        assert!(error.contains("no such program on PATH"), "{error}");
        assert!(
            ExecAllowList::resolve_on(&entries(&["tool"]), Some(dir.path().as_os_str())).is_ok()
        );
    }

    #[test]
    fn only_the_named_variables_pass() {
        let worker_env = |name: &str| match name {
            "PATH" => Some(OsString::from("/usr/bin")),
            "TZ" => Some(OsString::from("UTC")),
            "AMQP_URL" => Some(OsString::from("amqp://guest:secret@host")),
            _ => None,
        };
        assert_eq!(
            passed_env(worker_env),
            vec![("PATH", "/usr/bin".into()), ("TZ", "UTC".into())]
        );
    }

    #[tokio::test]
    async fn exec_substitutes_and_reports_stderr() {
        let p = params(
            json!({"command": ["sh", "-c", "echo got-{}; echo oops >&2; exit $1", "sh", "{}"], "timeout_ms": 5000}),
        );
        let exec = allowing(&["sh"]);
        let ok = exec.run(input(&json!("0"), &p)).await.expect("exit 0");
        assert_eq!(ok, json!("got-0"));
        let failed = exec.run(input(&json!(3), &p)).await.expect_err("exit 3");
        assert_eq!(failed.message(), "exited with status 3: oops");
    }

    #[tokio::test]
    async fn a_refused_program_never_starts() {
        let marker = tempfile::tempdir().expect("a temporary folder");
        let file = marker.path().join("ran");
        let p = params(json!({"command": ["touch", file.display().to_string()]}));
        let exec = allowing(&["sh"]);
        let error = exec.run(input(&json!(1), &p)).await.expect_err("refused");
        assert_eq!(
            error.message(),
            "program \"touch\" is not allowed on this worker (BATCHQ_EXEC_ALLOW: sh)"
        );
        assert!(!file.exists(), "the refused program ran");
    }

    #[tokio::test]
    async fn the_program_sees_a_clean_environment() {
        let p = params(json!({"command": ["env"]}));
        let exec = allowing(&["env"]);
        let out = exec.run(input(&json!(1), &p)).await.expect("env runs");
        let names: Vec<&str> = out
            .as_str()
            .unwrap_or_default()
            .lines()
            .filter_map(|line| line.split_once('=').map(|(name, _)| name))
            .collect();
        assert!(!names.is_empty(), "env printed nothing: {out}");
        for name in &names {
            assert!(EXEC_PASSED_ENV.contains(name), "{name} leaked: {out}");
        }
    }

    #[tokio::test]
    async fn exec_times_out() {
        let p = params(json!({"command": ["sleep", "5"], "timeout_ms": 100}));
        let err = allowing(&["sleep"])
            .run(input(&json!(1), &p))
            .await
            .expect_err("timeout");
        assert!(err.message().starts_with("timed out after 100 ms"), "{err}");
    }
}
