//! The README's first command: `trustline up` (the multi-call binary `cargo run --release -- up` runs) brings up a
//! CA, an agent and three services behind sidecars, makes an allowed, a denied and a chained request, and points
//! at the accountability logs with a `trace` command that works; `trustline-ca quickstart` does the same with the
//! separate binaries. State is reused on the next run, and a component that cannot start is named with its reason.
//! (The tests take turns: the tour's web sidecar listens on the fixed port 15001, its CA on 8081.)

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::{Command, Output, Stdio};

use trustline_tests::{bin, now, verify_svid};

fn run(cmd: &mut Command) -> (Output, String) {
    let out = cmd.stdin(Stdio::null()).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    (out, stdout)
}

fn chain_from_pem(pem: &str) -> Vec<Vec<u8>> {
    trustline_identity::bundle::certs_from_pem(pem).unwrap()
}

/// Checks one run of the tour and returns its printed `trace` command line.
fn check_tour(out: &Output, stdout: &str) -> String {
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for line in [
        "[ok] CA started for trust domain example.org",
        "[ok] minted X.509-SVID spiffe://example.org/demo/web",
        "[ok] identity agent attested as spiffe://example.org/trustline/agent/quickstart",
        "[ok] payments sidecar is spiffe://example.org/payments",
        "[ok] api sidecar is spiffe://example.org/api",
        "[ok] web sidecar is spiffe://example.org/web",
        "[ok] GET /api/hello (allowed by policy web-reads-api): HTTP/1.1 200 OK",
        "\"x-forwarded-client-cert\":\"By=spiffe://example.org/api;URI=spiffe://example.org/web\"",
        "[ok] GET /api/admin/users (denied by policy no-admin): HTTP/1.1 403 Forbidden",
        "\"policy\":\"no-admin\"",
        "[ok] POST /api/checkout (api calls payments: the caller chain): HTTP/1.1 200 OK",
        "payments saw the verified caller chain [\"spiffe://example.org/web\",\"spiffe://example.org/api\"]",
        "Accountability logs (one per sidecar):",
    ] {
        assert!(stdout.contains(line), "missing {line:?} in:\n{stdout}");
    }
    stdout
        .lines()
        .find(|l| l.contains(" trace "))
        .unwrap_or_else(|| panic!("no trace command in:\n{stdout}"))
        .trim()
        .to_owned()
}

/// Runs a printed command line (paths without spaces) and returns its stdout.
fn run_printed(line: &str) -> String {
    let parts: Vec<&str> = line.split_whitespace().collect();
    let (out, stdout) = run(Command::new(parts[0]).args(&parts[1..]));
    assert!(
        out.status.success(),
        "{line}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// Held by each test: one `up` at a time (fixed ports).
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn one_at_a_time() -> std::sync::MutexGuard<'static, ()> {
    ONE_AT_A_TIME
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

#[test]
fn up_brings_up_a_local_mesh_and_shows_policy_chain_and_log() {
    let _turn = one_at_a_time();
    let tmp = tempfile::tempdir().unwrap();
    let state = tmp.path().join("state");

    // 1. The multi-call binary.
    let (out, stdout) = run(Command::new(bin("trustline"))
        .args(["up", "--exit", "--dir"])
        .arg(&state));
    let trace_cmd = check_tour(&out, &stdout);
    assert!(trace_cmd.contains("trustline audit trace "), "{trace_cmd}");
    let tree = run_printed(&trace_cmd);
    assert!(
        tree.contains("POST /api/checkout -> spiffe://example.org/api  200 allow by web-reads-api")
            && tree.contains(
                "POST /payments/charge -> spiffe://example.org/payments  200 allow by payments-start-at-web"
            ),
        "{tree}"
    );
    let verify_cmd = stdout.lines().find(|l| l.contains(" verify --bundle ")).unwrap();
    let report = run_printed(verify_cmd);
    assert_eq!(report.matches(": OK").count(), 3, "{report}");
    let ca_dir = state.join("ca");
    let chain = chain_from_pem(&std::fs::read_to_string(ca_dir.join("demo-svid.pem")).unwrap());
    let roots = chain_from_pem(&std::fs::read_to_string(ca_dir.join("bundle.pem")).unwrap());
    assert_eq!(
        verify_svid(&chain, &roots, now()).unwrap(),
        "spiffe://example.org/demo/web"
    );

    // 2. Again: the same state (same CA keys, the agent's sealed SVID, no new join token).
    let (out, stdout) = run(Command::new(bin("trustline"))
        .args(["up", "--exit", "--dir"])
        .arg(&state));
    check_tour(&out, &stdout);
    assert_eq!(
        chain_from_pem(&std::fs::read_to_string(ca_dir.join("bundle.pem")).unwrap()),
        roots
    );

    // 3. The separate binaries: trustline-ca quickstart (and its alias `up`) run the same tour.
    let (out, stdout) = run(Command::new(bin("trustline-ca"))
        .args(["up", "--exit", "--dir"])
        .arg(tmp.path().join("separate")));
    let trace_cmd = check_tour(&out, &stdout);
    assert!(trace_cmd.contains("trustline-audit trace "), "{trace_cmd}");

    // 4. Serving until Ctrl-C: SIGINT stops every process it started, and it says so.
    let serve_dir = tmp.path().join("serve");
    let mut up = Up::start(&serve_dir);
    up.wait_for(|l| l.contains("Serving until Ctrl-C"));
    let started = processes_under(&serve_dir);
    assert!(started >= 4, "agent and three sidecars running: {started}");
    let (status, rest) = up.signal_and_wait("-INT");
    assert!(status.success(), "{status:?}: {rest}");
    assert!(rest.contains("stopped"), "{rest}");
    assert_eq!(processes_under(&serve_dir), 0, "every process it started is gone");

    // 5. A component that cannot start is named, with its reason: the tour's port is taken.
    let _busy = std::net::TcpListener::bind("127.0.0.1:15001").unwrap();
    let (out, stdout) = run(Command::new(bin("trustline"))
        .args(["up", "--exit", "--dir"])
        .arg(tmp.path().join("busy")));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stdout}");
    assert!(
        err.contains("web sidecar: did not start") && err.contains("outbound[0].listen"),
        "{err}"
    );
}

/// The tour's CA state is private: its folder 0700 and its database 0600 from the first run; a state folder an
/// older version left readable by every local user (0755, 0644) is made private by the next `up`, which says so and
/// runs (the CA itself refuses such a database). (Fails before the change: the folder and the database took the
/// umask's modes, 0755 and 0644 under the usual 022, and kept them.)
#[test]
fn up_keeps_its_ca_state_private_and_tightens_what_an_older_version_left_readable() {
    use std::os::unix::fs::PermissionsExt;
    let _turn = one_at_a_time();
    let tmp = tempfile::tempdir().unwrap();
    let state = tmp.path().join("state");
    let ca_dir = state.join("ca");
    let db = ca_dir.join("ca.db");
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    let up_ca_only = || {
        let (out, stdout) = run(Command::new(bin("trustline"))
            .args(["up", "--exit", "--ca-only", "--dir"])
            .arg(&state));
        assert!(
            out.status.success(),
            "{stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        stdout
    };

    let stdout = up_ca_only();
    assert!(!stdout.contains("now private"), "{stdout}");
    assert_eq!(mode(&state), 0o700);
    assert_eq!(mode(&ca_dir), 0o700);
    assert_eq!(mode(&db), 0o600);

    for (path, loose) in [(&ca_dir, 0o755), (&db, 0o644)] {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(loose)).unwrap();
    }
    let stdout = up_ca_only();
    for want in [
        format!("[ok] {} had mode 755", ca_dir.display()),
        format!("[ok] {} had mode 644", db.display()),
        "[ok] CA started for trust domain example.org".to_owned(),
    ] {
        assert!(stdout.contains(&want), "missing {want:?} in:\n{stdout}");
    }
    assert_eq!(mode(&ca_dir), 0o700);
    assert_eq!(mode(&db), 0o600);
}

/// Ctrl-C at any moment of the start-up (right after the first child is forked, after each ready line) stops
/// everything that had started, and `up` exits on its own with a clear message instead of dying of the signal; a
/// `kill -9` of `up` takes its children with it. (Fails without the eager signal handlers and the children's
/// parent-death signal: the SIGINT right after a ready line killed `up` and left its agent and sidecars running.)
#[test]
fn ctrl_c_or_kill_9_at_any_moment_leaves_no_process_behind() {
    let _turn = one_at_a_time();
    let tmp = tempfile::tempdir().unwrap();
    type Moment = (&'static str, fn(&mut Up, &std::path::Path));
    let moments: [Moment; 4] = [
        ("as soon as the agent is forked", |_, dir| {
            // `up` itself, and the agent.
            wait_until("the agent process", || processes_under(dir) >= 2)
        }),
        ("after the agent's ready line", |up, _| {
            up.wait_for(|l| l.starts_with("[ok] identity agent attested"))
        }),
        ("after the first sidecar's ready line", |up, _| {
            up.wait_for(|l| l.starts_with("[ok] payments sidecar"))
        }),
        ("after the tour's requests", |up, _| {
            up.wait_for(|l| l.starts_with("Accountability logs"))
        }),
    ];
    for (i, (when, wait)) in moments.into_iter().enumerate() {
        let dir = tmp.path().join(format!("int-{i}"));
        let mut up = Up::start(&dir);
        wait(&mut up, &dir);
        let (status, rest) = up.signal_and_wait("-INT");
        assert!(
            status.code().is_some(),
            "SIGINT {when}: up died of the signal ({status:?}) instead of stopping: {rest}"
        );
        assert!(rest.contains("stopped"), "SIGINT {when}: {rest}");
        assert_eq!(processes_under(&dir), 0, "SIGINT {when}: processes left");
    }

    // kill -9 of `up` while it serves: the kernel tells the children, and they stop (they drain first).
    let dir = tmp.path().join("kill-9");
    let mut up = Up::start(&dir);
    up.wait_for(|l| l.contains("Serving until Ctrl-C"));
    assert!(processes_under(&dir) >= 4);
    let (status, _) = up.signal_and_wait("-KILL");
    assert!(status.code().is_none(), "{status:?}");
    let gone = poll_until(|| processes_under(&dir) == 0);
    let left = kill_under(&dir);
    assert!(gone, "kill -9 of up left {left} processes running");
}

/// A `trustline up` serving until Ctrl-C, with its stdout read line by line.
struct Up {
    child: std::process::Child,
    lines: std::sync::mpsc::Receiver<String>,
    seen: String,
}

impl Up {
    fn start(dir: &std::path::Path) -> Up {
        let mut child = Command::new(bin("trustline"))
            .args(["up", "--dir"])
            .arg(dir)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let out = child.stdout.take().unwrap();
        let (tx, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for l in std::io::BufRead::lines(std::io::BufReader::new(out)).map_while(Result::ok) {
                if tx.send(l).is_err() {
                    break;
                }
            }
        });
        Up {
            child,
            lines,
            seen: String::new(),
        }
    }

    /// Reads lines until one matches (bounded generously: a busy machine is slow, a stuck one is not waited on
    /// forever).
    fn wait_for(&mut self, matches: impl Fn(&str) -> bool) {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(300);
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(l) => {
                    self.seen.push_str(&l);
                    self.seen.push('\n');
                    if matches(&l) {
                        return;
                    }
                }
                Err(e) => {
                    let _ = self.child.kill();
                    panic!("up: no such line ({e}); it printed:\n{}", self.seen);
                }
            }
        }
    }

    /// Sends `signal` (a `kill` flag) and waits for `up` to exit; returns its status and what it printed after.
    fn signal_and_wait(mut self, signal: &str) -> (std::process::ExitStatus, String) {
        let pid = self.child.id().to_string();
        assert!(Command::new("kill")
            .args([signal, &pid])
            .status()
            .unwrap()
            .success());
        let status = self.child.wait().unwrap();
        let rest: Vec<String> = self.lines.iter().collect();
        (status, rest.join("\n"))
    }
}

/// Polls `cond` every 10 ms, for at most 5 minutes; whether it came true.
fn poll_until(cond: impl Fn() -> bool) -> bool {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(300);
    while !cond() {
        if std::time::Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    true
}

fn wait_until(what: &str, cond: impl Fn() -> bool) {
    assert!(poll_until(cond), "timed out waiting for {what}");
}

/// Kills (SIGKILL) every process with `dir` in its command line, so a failing test leaves none behind; how many.
fn kill_under(dir: &std::path::Path) -> usize {
    let pids = pids_under(dir);
    for pid in &pids {
        let _ = Command::new("kill").args(["-KILL", pid]).status();
    }
    pids.len()
}

/// How many processes have `dir` in their command line (the agent and sidecars of one `up`, and `up`).
fn processes_under(dir: &std::path::Path) -> usize {
    pids_under(dir).len()
}

/// The pids of the processes with `dir` in their command line.
fn pids_under(dir: &std::path::Path) -> Vec<String> {
    let needle = dir.display().to_string();
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|pid| pid.chars().all(|c| c.is_ascii_digit()))
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .is_ok_and(|c| String::from_utf8_lossy(&c).contains(&needle))
        })
        .collect()
}
