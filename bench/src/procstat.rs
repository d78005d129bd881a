//! CPU time (utime + stime of every thread, `/proc/<pid>/stat`) and resident memory (`VmRSS`, `VmHWM` of
//! `/proc/<pid>/status`) of processes, and pinning them to a CPU with `taskset`.

use std::process::Command;
use std::sync::OnceLock;

/// Clock ticks per second (`getconf CLK_TCK`; 100 on Linux).
pub fn clock_ticks() -> f64 {
    static TCK: OnceLock<f64> = OnceLock::new();
    *TCK.get_or_init(|| {
        Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
            .unwrap_or(100.0)
    })
}

/// CPU seconds (user + system, all threads) a process has used so far.
pub fn cpu_secs(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may hold spaces) in parentheses: state is field 3, utime 14, stime 15.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    (ticks(11) + ticks(12)) / clock_ticks()
}

fn status_kib(pid: u32, key: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// Resident memory now, KiB.
pub fn rss_kib(pid: u32) -> u64 {
    status_kib(pid, "VmRSS:")
}

/// Peak resident memory, KiB.
pub fn hwm_kib(pid: u32) -> u64 {
    status_kib(pid, "VmHWM:")
}

/// Open file descriptors of a process.
pub fn fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, Iterator::count)
}

/// Direct children of a process (e.g. nginx's worker under its master).
pub fn children(pid: u32) -> Vec<u32> {
    std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect()
}

/// Pins every thread of `pid` to `cpu` (`taskset -a -p -c`); threads it starts later inherit the mask.
pub fn pin(pid: u32, cpu: usize) {
    let ok = Command::new("taskset")
        .args(["-a", "-p", "-c", &cpu.to_string(), &pid.to_string()])
        .stdout(std::process::Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    assert!(ok, "taskset -a -p -c {cpu} {pid} failed");
}

/// Pins the calling thread (and so the threads and processes it starts later) to `cpu`.
pub fn pin_self(cpu: usize) {
    // `taskset -p` without `-a` sets the mask of the thread whose id is the pid: the main thread.
    let ok = Command::new("taskset")
        .args(["-p", "-c", &cpu.to_string(), &std::process::id().to_string()])
        .stdout(std::process::Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    assert!(ok, "taskset -p -c {cpu} (self) failed");
}

/// A set of processes measured together (a proxy pair, or one side of it).
#[derive(Debug, Clone, Default)]
pub struct Procs {
    /// The process ids.
    pub pids: Vec<u32>,
}

impl Procs {
    /// CPU seconds used so far by all of them.
    pub fn cpu_secs(&self) -> f64 {
        self.pids.iter().map(|&p| cpu_secs(p)).sum()
    }

    /// Sum of their resident memory, KiB.
    pub fn rss_kib(&self) -> u64 {
        self.pids.iter().map(|&p| rss_kib(p)).sum()
    }

    /// Sum of their peak resident memory, KiB.
    pub fn hwm_kib(&self) -> u64 {
        self.pids.iter().map(|&p| hwm_kib(p)).sum()
    }
}
