//! End-to-end test of the agent's bounded executable hashing (issue 19, item 7): `[attestation]
//! max_executable_bytes` caps the size of a caller binary the agent hashes for the `unix:sha256` selector.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use trustline_tests::{bin, eventually, Agent, Ca, PATIENCE};

const NODE: &str = "spiffe://example.org/trustline/agent/n1";
const SMALL_ID: &str = "spiffe://example.org/small-by-hash";
const PADDED_ID: &str = "spiffe://example.org/padded-by-hash";
const PADDED_PATH_ID: &str = "spiffe://example.org/padded-by-path";
/// What the padded copy gets beyond the bound (appended after the ELF's last section: it still runs).
const PADDING: usize = 64 * 1024;
const TOO_BIG: &str =
    "binary larger than attestation.max_executable_bytes: not hashed, no unix:sha256 selector";

fn node_token(ca: &Ca, node: &str) -> String {
    let v: serde_json::Value =
        serde_json::from_str(&ca.cli_ok(&["token", "generate", "--spiffe-id", node, "--output", "json"]))
            .unwrap();
    v["token"].as_str().unwrap().to_owned()
}

fn entry(ca: &Ca, id: &str, selector: &str) {
    ca.cli_ok(&[
        "entry",
        "create",
        "--spiffe-id",
        id,
        "--parent-id",
        NODE,
        "--selector",
        selector,
    ]);
}

/// SHA-256 (hex) of `path`, by `sha256sum`.
fn sha256(path: &Path) -> String {
    let out = Command::new("sha256sum").arg(path).output().unwrap();
    assert!(out.status.success(), "sha256sum {}: {out:?}", path.display());
    let hex = String::from_utf8(out.stdout)
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap()
        .to_owned();
    assert_eq!(hex.len(), 64, "{hex}");
    hex
}

fn jwt_sub(token: &str) -> String {
    use base64::Engine as _;
    let payload = token.split('.').nth(1).unwrap();
    let v: serde_json::Value = serde_json::from_slice(
        &base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(payload)
            .unwrap(),
    )
    .unwrap();
    v["sub"].as_str().unwrap().to_owned()
}

/// `<exe> api fetch jwt --audience db` against the agent, run from the copy `exe` (the caller the agent attests).
fn fetch_jwt(exe: &Path, agent: &Agent) -> Output {
    let mut cmd = Command::new(exe);
    cmd.args(["api", "fetch", "jwt", "--audience", "db", "--socket"])
        .arg(&agent.socket)
        .env_remove("SPIFFE_ENDPOINT_SOCKET");
    // A freshly written copy can briefly be "text file busy" (another thread's fork still holding it): retry.
    let started = Instant::now();
    loop {
        match cmd.output() {
            Ok(o) => return o,
            Err(e) if e.raw_os_error() == Some(26) && started.elapsed() < PATIENCE => {
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => panic!("run {}: {e}", exe.display()),
        }
    }
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Two copies of the agent CLI as workloads, each registered by `unix:sha256` only; the bound is the exact size
/// of the first copy, and the second is that copy with [`PADDING`] bytes appended. The copy at the bound gets its
/// JWT-SVID; the padded one is refused (`no identity issued`), the agent says why (naming that binary), its
/// selectors carry no `unix:sha256` while its `unix:path` is still there, and an entry by that path then gives it
/// an identity: the bound withholds only the hash. Fails on the code before item 7 (commit 9b9215f): the agent
/// has no `[attestation]` section (`deny_unknown_fields`), refuses the config and never prints its ready line.
#[tokio::test(flavor = "multi_thread")]
async fn a_binary_over_max_executable_bytes_gets_no_sha256_identity() {
    let tmp = tempfile::tempdir().unwrap();
    let work = tmp.path().join("work");
    std::fs::create_dir(&work).unwrap();
    let work = work.canonicalize().unwrap();
    let small: PathBuf = work.join("small-workload");
    let padded: PathBuf = work.join("padded-workload");
    std::fs::copy(bin("trustline-agent"), &small).unwrap();
    std::fs::copy(bin("trustline-agent"), &padded).unwrap();
    {
        let mut f = std::fs::OpenOptions::new().append(true).open(&padded).unwrap();
        f.write_all(&vec![0u8; PADDING]).unwrap();
        f.sync_all().unwrap();
    }
    let bound = std::fs::metadata(&small).unwrap().len();
    assert_eq!(std::fs::metadata(&padded).unwrap().len(), bound + PADDING as u64);
    let (small_hash, padded_hash) = (sha256(&small), sha256(&padded));
    assert_ne!(small_hash, padded_hash);

    let ca = Ca::start(&tmp.path().join("ca"));
    // The padded binary's entry first: once the later one has reached the agent, so has this one.
    entry(&ca, PADDED_ID, &format!("unix:sha256:{padded_hash}"));
    entry(&ca, SMALL_ID, &format!("unix:sha256:{small_hash}"));
    let agent = Agent::start(
        &tmp.path().join("agent"),
        &ca,
        Some(&node_token(&ca, NODE)),
        &format!("[attestation]\nmax_executable_bytes = {bound}\n"),
    );
    assert_eq!(agent.id, NODE);

    // At the bound: hashed, matched by its sha256.
    let out = eventually(PATIENCE, "a JWT-SVID for the binary at the bound", || {
        let out = fetch_jwt(&small, &agent);
        async move { out.status.success().then_some(out) }
    })
    .await;
    assert_eq!(jwt_sub(String::from_utf8_lossy(&out.stdout).trim()), SMALL_ID);

    // Over the bound: not hashed, so its sha256 entry does not apply.
    let out = fetch_jwt(&padded, &agent);
    assert!(
        !out.status.success(),
        "the padded binary got {}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(stderr(&out).contains("no identity issued"), "{}", stderr(&out));
    assert!(agent.logged(TOO_BIG), "the agent did not log {TOO_BIG:?}");
    let shown = padded.display().to_string();
    let path_selector = format!("unix:path:{shown}");
    // The refusal line lists the caller's selectors; it follows the size line, and stderr is read by a thread.
    let refused: Vec<String> = eventually(PATIENCE, "the refusal with the padded binary's selectors", || {
        let found: Vec<String> = agent
            .logs
            .lock()
            .unwrap()
            .iter()
            .filter(|l| l.contains("no identity issued") && l.contains(&path_selector))
            .cloned()
            .collect();
        async move { (!found.is_empty()).then_some(found) }
    })
    .await;
    for l in &refused {
        assert!(!l.contains("unix:sha256"), "{l}");
    }
    {
        let logs = agent.logs.lock().unwrap();
        assert!(
            logs.iter().any(|l| l.contains(TOO_BIG) && l.contains(&shown)),
            "no {TOO_BIG:?} line names {shown}:\n{}",
            logs.join("\n")
        );
        let at_bound = small.display().to_string();
        assert!(
            !logs.iter().any(|l| l.contains(TOO_BIG) && l.contains(&at_bound)),
            "the binary at the bound was called too large:\n{}",
            logs.join("\n")
        );
    }

    // Only the hash is withheld: its other selectors still work.
    entry(&ca, PADDED_PATH_ID, &format!("unix:path:{shown}"));
    let out = eventually(PATIENCE, "a JWT-SVID for the padded binary by path", || {
        let out = fetch_jwt(&padded, &agent);
        async move { out.status.success().then_some(out) }
    })
    .await;
    assert_eq!(
        jwt_sub(String::from_utf8_lossy(&out.stdout).trim()),
        PADDED_PATH_ID
    );
}
