//! What the kernel knows about the processes of a run: peak resident memory (`VmHWM`) and CPU
//! time, read from `/proc`, and the broker's own process (the one listening on the AMQP port),
//! so the CPU table can say who was busy while a job ran.

use std::path::Path;
use std::time::Instant;

/// Peak resident set size of a process in KiB (`VmHWM` of `/proc/{pid}/status`).
pub fn peak_rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmHWM:"))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
}

/// CPU time a process used so far (user + system), in clock ticks.
fn process_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name is in parentheses and may hold spaces: fields count from after it.
    let after_name = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    // After the name: state is field 3 of stat(5), utime 14 and stime 15.
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(utime + stime)
}

/// Busy and total ticks of the whole machine, all cores together (first line of `/proc/stat`).
fn machine_ticks() -> Option<(u64, u64)> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let line = stat.lines().next()?.strip_prefix("cpu ")?;
    let values: Vec<u64> = line
        .split_whitespace()
        .filter_map(|v| v.parse().ok())
        .collect();
    let total: u64 = values.iter().sum();
    // idle and iowait are the 4th and 5th values.
    let idle = values.get(3).copied().unwrap_or(0) + values.get(4).copied().unwrap_or(0);
    Some((total - idle, total))
}

/// Clock ticks per second of `/proc` CPU times (`getconf CLK_TCK`; 100 on Linux in practice).
pub fn clock_ticks_per_second() -> f64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|out| String::from_utf8(out.stdout).ok())
        .and_then(|s| s.trim().parse::<f64>().ok())
        .filter(|t| *t > 0.0)
        .unwrap_or(100.0)
}

/// CPU counters of a set of labelled processes and of the machine at one instant.
#[derive(Debug, Clone)]
pub struct CpuSample {
    at: Instant,
    machine: Option<(u64, u64)>,
    processes: Vec<(String, Option<u64>)>,
}

impl CpuSample {
    pub fn take(processes: &[(String, u32)]) -> Self {
        Self {
            at: Instant::now(),
            machine: machine_ticks(),
            processes: processes
                .iter()
                .map(|(label, pid)| (label.clone(), process_ticks(*pid)))
                .collect(),
        }
    }
}

/// CPU used between two samples, in cores (1.0 = one core busy the whole time).
#[derive(Debug, Clone, serde::Serialize)]
pub struct CpuUsage {
    pub seconds: f64,
    /// Every process of the machine, this run's and others' (other engineers' tests).
    pub machine_cores: Option<f64>,
    pub processes: Vec<(String, f64)>,
}

impl CpuUsage {
    pub fn between(before: &CpuSample, after: &CpuSample, ticks_per_second: f64) -> Self {
        let seconds = after.at.duration_since(before.at).as_secs_f64().max(1e-9);
        let cores = available_cores() as f64;
        let machine_cores = match (before.machine, after.machine) {
            (Some((b0, t0)), Some((b1, t1))) if t1 > t0 => {
                Some((b1 - b0) as f64 / (t1 - t0) as f64 * cores)
            }
            _ => None,
        };
        let processes = after
            .processes
            .iter()
            .filter_map(|(label, ticks)| {
                let end = (*ticks)?;
                let start = before
                    .processes
                    .iter()
                    .find(|(l, _)| l == label)
                    .and_then(|(_, t)| *t)?;
                let used = end.saturating_sub(start) as f64 / ticks_per_second;
                Some((label.clone(), used / seconds))
            })
            .collect();
        Self {
            seconds,
            machine_cores,
            processes,
        }
    }

    /// Cores used by the processes whose label starts with `prefix` (all workers together).
    pub fn cores_of(&self, prefix: &str) -> Option<f64> {
        let matching: Vec<f64> = self
            .processes
            .iter()
            .filter(|(label, _)| label.starts_with(prefix))
            .map(|(_, cores)| *cores)
            .collect();
        (!matching.is_empty()).then(|| matching.iter().sum())
    }
}

pub fn available_cores() -> usize {
    std::thread::available_parallelism()
        .map(usize::from)
        .unwrap_or(1)
}

/// The process listening on the broker's TCP port, when the broker runs on this machine and
/// `/proc` lets us see its sockets; `None` otherwise (the CPU table then omits the broker).
pub fn broker_pid(amqp_url: &str) -> Option<u32> {
    let port = amqp_port(amqp_url)?;
    let inodes = listening_inodes(port);
    if inodes.is_empty() {
        return None;
    }
    for entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(fds) = std::fs::read_dir(entry.path().join("fd")) else {
            continue;
        };
        for fd in fds.flatten() {
            if let Ok(target) = std::fs::read_link(fd.path()) {
                let target = target.to_string_lossy();
                if inodes.iter().any(|i| target == format!("socket:[{i}]")) {
                    return Some(pid);
                }
            }
        }
    }
    None
}

/// The port of the first URL of `AMQP_URL` (5672 when none is given).
fn amqp_port(amqp_url: &str) -> Option<u16> {
    let first = amqp_url.split(',').next()?.trim();
    let rest = first.split_once("://").map_or(first, |(_, r)| r);
    let host_port = rest.rsplit_once('@').map_or(rest, |(_, h)| h);
    let host_port = host_port.split('/').next()?;
    match host_port.rsplit_once(':') {
        Some((_, port)) => port.parse().ok(),
        None => Some(5672),
    }
}

/// Inodes of sockets listening on `port` (IPv4 and IPv6).
fn listening_inodes(port: u16) -> Vec<String> {
    let mut inodes = Vec::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(text) = std::fs::read_to_string(Path::new(table)) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let (Some(local), Some(state), Some(inode)) =
                (fields.get(1), fields.get(3), fields.get(9))
            else {
                continue;
            };
            let listening = *state == "0A";
            let on_port = local
                .rsplit_once(':')
                .and_then(|(_, p)| u16::from_str_radix(p, 16).ok())
                == Some(port);
            if listening && on_port {
                inodes.push((*inode).to_owned());
            }
        }
    }
    inodes
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_port_of_an_amqp_url() {
        assert_eq!(
            amqp_port("amqp://guest:guest@127.0.0.1:5672/%2f"),
            Some(5672)
        );
        assert_eq!(amqp_port("amqp://h:5673,amqp://g:5674"), Some(5673));
        assert_eq!(amqp_port("amqp://localhost"), Some(5672));
    }

    #[test]
    fn reads_this_process() {
        assert!(peak_rss_kib(std::process::id()).is_some_and(|k| k > 0));
        assert!(process_ticks(std::process::id()).is_some());
    }
}
