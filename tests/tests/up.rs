//! The README's first command: `trustline up` (the multi-call binary `cargo run --release -- up` runs) brings up a
//! CA, an agent and three services behind sidecars, makes an allowed, a denied and a chained request, and points
//! at the accountability logs with a `trace` command that works; `trustline-ca quickstart` does the same with the
//! separate binaries. State is reused on the next run, and a component that cannot start is named with its reason.
//! (One test function: the tour's web sidecar listens on the fixed port 15001.)

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
        "[ok] identity agent attested as spiffe://example.org/node/quickstart",
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

#[test]
fn up_brings_up_a_local_mesh_and_shows_policy_chain_and_log() {
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
    let mut child = Command::new(bin("trustline"))
        .args(["up", "--dir"])
        .arg(&serve_dir)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut out = std::io::BufReader::new(child.stdout.take().unwrap());
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    let mut line = String::new();
    loop {
        line.clear();
        assert!(std::time::Instant::now() < deadline, "no 'Serving until Ctrl-C'");
        if std::io::BufRead::read_line(&mut out, &mut line).unwrap() == 0 {
            panic!("up exited before serving");
        }
        if line.contains("Serving until Ctrl-C") {
            break;
        }
    }
    let started = processes_under(&serve_dir);
    assert!(started >= 4, "agent and three sidecars running: {started}");
    let pid = child.id().to_string();
    assert!(Command::new("kill")
        .args(["-INT", &pid])
        .status()
        .unwrap()
        .success());
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut out, &mut rest).unwrap();
    let status = child.wait().unwrap();
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

/// How many processes have `dir` in their command line (the agent and sidecars of one `up`).
fn processes_under(dir: &std::path::Path) -> usize {
    let needle = dir.display().to_string();
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .chars()
                .all(|c| c.is_ascii_digit())
        })
        .filter_map(|e| std::fs::read(e.path().join("cmdline")).ok())
        .filter(|c| String::from_utf8_lossy(c).contains(&needle))
        .count()
}
