//! What the CA keeps at rest is not a credential, and agent IDs cannot be a workload's or the CA's (issue 19,
//! items 2 and 3), end to end: the real `trustline-ca` on loopback, its SQLite file read and written directly, as
//! a local attacker (or an older version) would.
//!
//! - A join token is stored as `sha256:<hex>`; that value presented as a token is refused and spends nothing.
//! - Rows an older version stored in clear are hashed when the CA starts, and still work, once, by their value.
//! - The database, its `-wal` and `-shm` files and the data folder are 0600 / 0700 whatever the umask; a
//!   database file that group or others can read stops the CA, naming the file and its mode.
//! - Agent IDs live under `spiffe://<td>/trustline/agent/`; the CA's ID, an entry's ID and an ID outside that path
//!   are refused for a join token, and an agent's ID (even an old-style one) for an entry.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Instant;

use trustline_proto::agent as pb;
use trustline_tests::{agent_client, bin, csr, now, spawn_ready, terminate, Ca, PATIENCE};

const TD: &str = "spiffe://example.org";
const WEB: &str = "spiffe://example.org/web";
/// An agent ID named the way the docs did before the reserved agent path.
const LEGACY_NODE: &str = "spiffe://example.org/node/legacy";

async fn attest(ca: &Ca, token: &str) -> Result<(rcgen::KeyPair, pb::AttestAgentResponse), tonic::Status> {
    let mut client = agent_client(ca.agent_addr, &ca.bundle_roots(), None)
        .await
        .unwrap();
    let (key, der) = csr(&[], &[]);
    let resp = client
        .attest_agent(pb::AttestAgentRequest {
            join_token: token.to_owned(),
            csr: der,
            devid: None,
        })
        .await?;
    Ok((key, resp.into_inner()))
}

/// `token generate --output json [extra]`: the token and the agent ID.
fn token(ca: &Ca, extra: &[&str]) -> (String, String) {
    let mut args = vec!["token", "generate", "--output", "json"];
    args.extend_from_slice(extra);
    let v: serde_json::Value = serde_json::from_str(&ca.cli_ok(&args)).unwrap();
    (
        v["token"].as_str().unwrap().to_owned(),
        v["agent_spiffe_id"].as_str().unwrap().to_owned(),
    )
}

fn db(ca: &Ca) -> PathBuf {
    ca.dir.join("ca.db")
}

/// The join token rows as stored: (token column, agent ID column).
fn stored_tokens(db: &Path) -> Vec<(String, String)> {
    let c = rusqlite::Connection::open(db).unwrap();
    let mut st = c
        .prepare("SELECT token, agent_spiffe_id FROM join_tokens ORDER BY created_at")
        .unwrap();
    let rows = st
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
        .unwrap()
        .collect::<Result<Vec<_>, _>>()
        .unwrap();
    rows
}

/// Writes a join token row the way versions before digests did: the token in clear, and the agent ID in full
/// (derived ones contain the token).
fn insert_old_token(db: &Path, token: &str, agent_id: &str) {
    let c = rusqlite::Connection::open(db).unwrap();
    c.execute(
        "INSERT INTO join_tokens (token, agent_spiffe_id, expires_at, created_at) VALUES (?1, ?2, ?3, ?4)",
        rusqlite::params![token, agent_id, now() as i64 + 3600, now() as i64],
    )
    .unwrap();
}

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p)
        .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
        .permissions()
        .mode()
        & 0o777
}

fn chmod(p: &Path, mode: u32) {
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap();
}

/// Runs `cmd` to its exit (bounded by [`PATIENCE`]: a CA that does not refuse would serve forever).
fn run_to_exit(mut cmd: Command) -> Output {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let start = Instant::now();
    while child.try_wait().unwrap().is_none() {
        if start.elapsed() > PATIENCE {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            panic!(
                "{cmd:?} kept running; stdout: {}",
                String::from_utf8_lossy(&out.stdout)
            );
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    child.wait_with_output().unwrap()
}

/// `trustline-ca run --config <cfg>` expected to refuse to start; its stderr.
fn refused_start(cfg: &Path) -> String {
    let mut cmd = Command::new(bin("trustline-ca"));
    cmd.arg("run").arg("--config").arg(cfg);
    let out = run_to_exit(cmd);
    assert!(!out.status.success(), "the CA started");
    String::from_utf8(out.stderr).unwrap()
}

/// A CA started by hand, stopped (SIGTERM) when dropped, also when an assertion fails first.
struct Started(std::process::Child);

impl Started {
    fn new(cmd: Command) -> Started {
        Started(spawn_ready(cmd, "trustline-ca ready:").0)
    }
}

impl Drop for Started {
    fn drop(&mut self) {
        terminate(&mut self.0);
    }
}

fn contains(bytes: &[u8], needle: &str) -> bool {
    bytes.windows(needle.len()).any(|w| w == needle.as_bytes())
}

/// (a) The value the database keeps for a join token, read out of `ca.db` and presented as the token, is refused
/// and spends nothing: the real token still attests afterwards, for a named and for a derived agent ID. Before
/// the change the CA fell back to looking the presented value up as a clear-text token, found the stored row,
/// spent the real token and handed over the named node's identity.
#[tokio::test(flavor = "multi_thread")]
async fn a_stored_token_presented_as_a_token_is_refused_and_the_real_token_still_works() {
    let tmp = tempfile::tempdir().unwrap();
    let ca = Ca::start(tmp.path());
    let node = format!("{TD}/trustline/agent/victim");
    let (named, _) = token(&ca, &["--spiffe-id", &node]);
    let (derived, derived_id) = token(&ca, &[]);

    // What a local reader of the database sees.
    let rows = stored_tokens(&db(&ca));
    assert_eq!(rows.len(), 2, "{rows:?}");
    for (stored, _) in &rows {
        assert!(stored.starts_with("sha256:"), "{stored}");
        for presented in [stored.clone(), stored.to_uppercase()] {
            let err = attest(&ca, &presented).await.unwrap_err();
            assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err:?}");
            assert!(err.message().contains("stored token digest"), "{err:?}");
            assert!(!err.message().contains(&stored[7..]), "{err:?}");
        }
    }
    assert_eq!(stored_tokens(&db(&ca)).len(), 2, "nothing was spent");

    // The real tokens still work, once each.
    let (_, resp) = attest(&ca, &named).await.unwrap();
    assert_eq!(resp.svid.unwrap().spiffe_id, node);
    let (_, resp) = attest(&ca, &derived).await.unwrap();
    assert_eq!(resp.svid.unwrap().spiffe_id, derived_id);
    for t in [&named, &derived] {
        let err = attest(&ca, t).await.unwrap_err();
        assert!(err.message().contains("not found or already used"), "{err:?}");
    }
}

/// (b) The data folder (and a missing parent) is created 0700 and the database, `-wal` and `-shm` 0600 even under
/// umask 000; a database or `-wal` file that others can read stops the CA with one line naming the file, its mode
/// and the fix, and is left as it was. Before the change the database took the umask's mode (0666 here, 0644
/// under the usual 022), and the CA started on any mode.
#[test]
fn the_database_is_private_whatever_the_umask_and_a_readable_one_stops_the_ca() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("ca");
    std::fs::create_dir_all(&dir).unwrap();
    trustline_hsm::SoftwareKeyStore::create_key_file(&dir.join("seal.key")).unwrap();
    let data = dir.join("state/data");
    let cfg = dir.join("ca.toml");
    std::fs::write(
        &cfg,
        format!(
            "trust_domain = \"example.org\"\ndata_dir = \"{}\"\n\n[server]\nagent_listen = \"127.0.0.1:0\"\n\n[keys]\nkey_file = \"{}\"\n",
            data.display(),
            dir.join("seal.key").display()
        ),
    )
    .unwrap();

    let mut cmd = Command::new("sh");
    cmd.arg("-c")
        .arg("umask 000 && exec \"$0\" run --config \"$1\"")
        .arg(bin("trustline-ca"))
        .arg(&cfg);
    let ca = Started::new(cmd);
    let db = data.join("ca.db");
    let [wal, shm] = ["ca.db-wal", "ca.db-shm"].map(|f| data.join(f));
    assert_eq!(mode(&dir.join("state")), 0o700);
    assert_eq!(mode(&data), 0o700);
    for f in [&db, &wal, &shm] {
        assert_eq!(mode(f), 0o600, "{}", f.display());
    }
    drop(ca);

    for (file, loose) in [(&db, 0o644), (&db, 0o640), (&wal, 0o604)] {
        if !file.exists() {
            // A cleanly closed database has no -wal; an empty one is what SQLite leaves after a checkpoint.
            std::fs::write(file, b"").unwrap();
        }
        chmod(file, loose);
        let err = refused_start(&cfg);
        assert_eq!(err.trim().lines().count(), 1, "{err}");
        let path = file.display().to_string();
        for want in [
            "Error: ",
            path.as_str(),
            &format!("has mode {loose:o}"),
            &format!("chmod 600 {path}"),
        ] {
            assert!(err.contains(want), "{want:?} in {err}");
        }
        assert_eq!(mode(file), loose, "left as it was");
        chmod(file, 0o600);
    }

    // Private again: it starts.
    let mut cmd = Command::new(bin("trustline-ca"));
    cmd.arg("run").arg("--config").arg(&cfg);
    drop(Started::new(cmd));
}

/// (c) Join token rows an older version stored in clear (the token, and a derived agent ID containing it) are
/// replaced by their digests when the CA starts: the files no longer hold the tokens, and each still attests, once,
/// by its clear value; a node named the old way (outside the agent path) keeps working, renewal included. Before
/// the change the rows stayed in clear (and were honoured by a fallback lookup, the hole of test (a)).
#[tokio::test(flavor = "multi_thread")]
async fn tokens_an_older_version_stored_in_clear_are_hashed_at_start_and_still_work_once() {
    let tmp = tempfile::tempdir().unwrap();
    let mut ca = Ca::start(tmp.path());
    ca.stop();
    let named = "00112233445566778899aabbccddeeff";
    let derived = "ffeeddccbbaa99887766554433221100";
    let derived_id = format!("{TD}/trustline/agent/join_token/{derived}");
    insert_old_token(&db(&ca), named, LEGACY_NODE);
    insert_old_token(&db(&ca), derived, &derived_id);
    ca.restart();
    assert!(ca.logged("replaced by their digests"));

    for f in ["ca.db", "ca.db-wal", "ca.db-shm"] {
        if let Ok(bytes) = std::fs::read(ca.dir.join(f)) {
            for t in [named, derived] {
                assert!(!contains(&bytes, t), "{f} still holds {t} in clear");
            }
        }
    }
    let rows = stored_tokens(&db(&ca));
    assert_eq!(rows.len(), 2, "{rows:?}");
    assert!(rows.iter().all(|(t, _)| t.starts_with("sha256:")), "{rows:?}");
    assert!(
        rows.iter().any(|(_, a)| a == LEGACY_NODE) && rows.iter().any(|(_, a)| a.is_empty()),
        "a named ID is kept, a derived one dropped: {rows:?}"
    );

    // Each works once, by its clear value, with the ID the older version promised.
    let (key, resp) = attest(&ca, named).await.unwrap();
    let svid = resp.svid.unwrap();
    assert_eq!(svid.spiffe_id, LEGACY_NODE);
    let (_, resp) = attest(&ca, derived).await.unwrap();
    assert_eq!(resp.svid.unwrap().spiffe_id, derived_id);
    for t in [named, derived] {
        let err = attest(&ca, t).await.unwrap_err();
        assert!(err.message().contains("not found or already used"), "{err:?}");
    }

    // An agent with an old-style ID keeps renewing.
    let mut agent = agent_client(
        ca.agent_addr,
        &ca.bundle_roots(),
        Some((svid.cert_chain, key.serialize_der())),
    )
    .await
    .unwrap();
    let (_, ncsr) = csr(&[LEGACY_NODE], &[]);
    let renewed = agent
        .renew_agent(pb::RenewAgentRequest { csr: ncsr })
        .await
        .unwrap()
        .into_inner()
        .svid
        .unwrap();
    assert_eq!(renewed.spiffe_id, LEGACY_NODE);
}

/// (d) Join tokens name agent IDs under `spiffe://example.org/trustline/agent/` only: the CA's own ID, an ID
/// outside the path (a workload entry's among them), a path the CA derives IDs in, and an entry's ID even under
/// the path are refused, naming the field and the value; so is an old token row naming an entry's ID, when spent.
/// Entries (create, update) and admin-minted SVIDs are refused an agent's ID: under the agent path, or an
/// old-style node's (attested, or named by an unspent token). Before the change a token could name the CA's ID, an
/// entry's ID or any path, and an entry could take an attested node's (old-style) ID, so its workload could act as
/// the node.
#[tokio::test(flavor = "multi_thread")]
async fn agent_ids_are_reserved_and_never_a_workloads_or_the_cas() {
    let tmp = tempfile::tempdir().unwrap();
    let mut ca = Ca::start(tmp.path());
    let node = format!("{TD}/trustline/agent/web-1");
    ca.cli_ok(&[
        "entry",
        "create",
        "--spiffe-id",
        WEB,
        "--parent-id",
        &node,
        "--selector",
        "unix:uid:1000",
    ]);

    let ca_id = format!("{TD}/trustline/ca");
    let refusals = [
        (ca_id.clone(), "reserved for the CA".to_owned()),
        (
            format!("{TD}/node/web-1"),
            format!("must be under {TD}/trustline/agent/"),
        ),
        (WEB.to_owned(), format!("must be under {TD}/trustline/agent/")),
        (
            format!("{TD}/trustline/agent/join_token/abc"),
            "derives from a join token".to_owned(),
        ),
        (
            format!("{TD}/trustline/agent/tpm_devid/00ff"),
            "derives from a TPM DevID".to_owned(),
        ),
    ];
    for (id, why) in &refusals {
        let err = ca.cli_err(&["token", "generate", "--spiffe-id", id]);
        assert!(
            err.contains(&format!("spiffe_id {id:?}: ")) && err.contains(why.as_str()),
            "{id}: {err}"
        );
        assert_eq!(err.trim().lines().count(), 1, "{err}");
    }
    let (_, agent_id) = token(&ca, &["--spiffe-id", &node]);
    assert_eq!(agent_id, node);

    // Entries under the agent path, or with the CA's ID, are refused, saying which.
    for (id, why) in [
        (node.as_str(), "reserved for agent (node) IDs"),
        (ca_id.as_str(), "reserved for the CA"),
    ] {
        let err = ca.cli_err(&[
            "entry",
            "create",
            "--spiffe-id",
            id,
            "--parent-id",
            &node,
            "--selector",
            "unix:uid:1",
        ]);
        assert!(
            err.contains(&format!("spiffe_id {id:?}: ")) && err.contains(why),
            "{err}"
        );
    }

    // Data from before the reserved path: a node attested as LEGACY_NODE, an unspent token naming another
    // old-style ID, and (as only a direct write can make it) an entry under the agent path with a token naming it.
    ca.stop();
    let shadow = format!("{TD}/trustline/agent/shadow");
    let pending = format!("{TD}/node/pending");
    insert_old_token(&db(&ca), "0123456789abcdef0123456789abcdef", LEGACY_NODE);
    insert_old_token(&db(&ca), "abcdef0123456789abcdef0123456789", &pending);
    insert_old_token(&db(&ca), "fedcba9876543210fedcba9876543210", &shadow);
    rusqlite::Connection::open(db(&ca))
        .unwrap()
        .execute(
            "INSERT INTO entries (id, spiffe_id, parent_id, selectors, selector_key, x509_svid_ttl, jwt_svid_ttl,
             dns_names, admin, revision, created_at)
             VALUES ('shadow', ?1, ?2, '[\"unix:uid:7\"]', 'unix:uid:7', 0, 0, '[]', 0, 0, 0)",
            rusqlite::params![shadow, node],
        )
        .unwrap();
    ca.restart();
    let (_, resp) = attest(&ca, "0123456789abcdef0123456789abcdef").await.unwrap();
    assert_eq!(resp.svid.unwrap().spiffe_id, LEGACY_NODE);

    // A token for an entry's ID is refused when generated, and when an old one naming it is spent.
    let err = ca.cli_err(&["token", "generate", "--spiffe-id", &shadow]);
    assert!(
        err.contains(&format!(
            "spiffe_id {shadow:?}: is the SPIFFE ID of registration entry shadow"
        )),
        "{err}"
    );
    let err = attest(&ca, "fedcba9876543210fedcba9876543210").await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");
    assert!(
        err.message().contains(&format!("agent_spiffe_id {shadow:?}"))
            && err.message().contains("registration entry shadow"),
        "{err:?}"
    );

    // No workload identity may be an agent's, old-style ones included.
    let web_entry: serde_json::Value =
        serde_json::from_str(&ca.cli_ok(&["entry", "list", "--spiffe-id", WEB, "--output", "json"])).unwrap();
    let web_entry_id = web_entry["id"].as_str().unwrap().to_owned();
    let (_, der) = csr(&[LEGACY_NODE], &[]);
    let csr_path = tmp.path().join("legacy.csr");
    std::fs::write(&csr_path, der).unwrap();
    let csr_path = csr_path.display().to_string();
    for id in [LEGACY_NODE, pending.as_str()] {
        let want = format!("spiffe_id {id:?}: is an agent (node) ID");
        let attempts: [Vec<&str>; 3] = [
            vec![
                "entry",
                "create",
                "--spiffe-id",
                id,
                "--parent-id",
                &node,
                "--selector",
                "unix:uid:1",
            ],
            vec!["entry", "update", "--id", &web_entry_id, "--spiffe-id", id],
            vec!["x509", "mint", "--csr", &csr_path, "--spiffe-id", id],
        ];
        for args in attempts {
            let err = ca.cli_err(&args);
            assert!(err.contains(&want), "{args:?}: {err}");
        }
    }
    // The entry kept its ID.
    let again: serde_json::Value =
        serde_json::from_str(&ca.cli_ok(&["entry", "show", "--id", &web_entry_id, "--output", "json"]))
            .unwrap();
    assert_eq!(again["spiffe_id"], WEB);
}
