//! TPM DevID node attestation, end to end: a DevID key created in swtpm by `trustline-agent devid create`, its CSR
//! signed by an operator DevID CA made with the `openssl` CLI (an independent tool), a CA that trusts that DevID
//! CA, and an agent that attests with no join token, serves a workload, and re-attests on its own. A certificate
//! copied to another machine (another TPM), a certificate from a foreign DevID CA, and a CA that does not accept
//! DevIDs are all refused with errors that say why.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use trustline_hsm::swtpm::Swtpm;
use trustline_tests::{bin, default_config, eventually, Agent, Ca, PATIENCE};

fn openssl(args: &[&str], dir: &Path) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A DevID CA (self-signed, P-256) in `dir/<name>.pem` and `dir/<name>.key`.
fn devid_ca(dir: &Path, name: &str) {
    openssl(
        &[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            &format!("{name}.key"),
            "-out",
            &format!("{name}.pem"),
            "-days",
            "2",
            "-subj",
            &format!("/CN={name}"),
        ],
        dir,
    );
}

/// The DevID CA `ca` signs `dir/devid.csr` into `dir/<out>`, with an IEEE 802.1AR-style end-entity profile.
fn sign_devid(dir: &Path, ca: &str, out: &str) {
    std::fs::write(
        dir.join("devid.ext"),
        "basicConstraints = critical, CA:FALSE\nkeyUsage = critical, digitalSignature\n",
    )
    .unwrap();
    let args = format!(
        "x509 -req -in devid.csr -CA {ca}.pem -CAkey {ca}.key -CAcreateserial -days 1 -extfile devid.ext -out {out}"
    );
    openssl(&args.split(' ').collect::<Vec<_>>(), dir);
}

/// `trustline-agent devid create`: a key in the TPM and its CSR.
fn devid_create(dir: &Path, tcti: &str, key: &str) -> std::process::Output {
    Command::new(bin("trustline-agent"))
        .args([
            "devid",
            "create",
            "--tcti",
            tcti,
            "--key-out",
            key,
            "--csr-out",
            "devid.csr",
        ])
        .args(["--common-name", "node-1.example.org"])
        .current_dir(dir)
        .output()
        .unwrap()
}

fn devid_section(tcti: &str, dir: &Path, cert: &str) -> String {
    format!(
        "\n[tpm_devid]\ntcti = \"{tcti}\"\nkey = \"{}\"\ncertificate = \"{}\"\n",
        dir.join("devid.key").display(),
        dir.join(cert).display()
    )
}

/// Runs the agent with `config` and expects it to fail; returns its stderr.
fn agent_fails(config: &Path) -> String {
    let mut child = Command::new(bin("trustline-agent"))
        .args(["run", "--config"])
        .arg(config)
        .env_remove("TRUSTLINE_JOIN_TOKEN")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let started = std::time::Instant::now();
    while started.elapsed() < PATIENCE {
        if child.try_wait().unwrap().is_some() {
            let out = child.wait_with_output().unwrap();
            assert!(!out.status.success());
            return String::from_utf8_lossy(&out.stderr).into_owned();
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let _ = child.wait();
    panic!("the agent did not fail within {PATIENCE:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_node_attests_with_its_tpm_devid_and_copies_are_worthless() {
    if std::env::var_os("TRUSTLINE_TEST_SWTPM").is_none() {
        println!("skipped: TRUSTLINE_TEST_SWTPM is not set (scripts/test.sh installs swtpm and sets it)");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let pki = tmp.path().join("pki");
    std::fs::create_dir_all(&pki).unwrap();
    let tpm = Swtpm::start(&tmp.path().join("tpm")).unwrap();

    // Provisioning, as an operator does it: key in the TPM, CSR signed by the DevID CA.
    devid_ca(&pki, "devid-ca");
    let out = devid_create(&pki, &tpm.tcti(), "devid.key");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let key_ref = std::fs::read_to_string(pki.join("devid.key")).unwrap();
    assert!(key_ref.starts_with("tpm:v1:"), "{key_ref}");
    sign_devid(&pki, "devid-ca", "devid.pem");
    // The key file is never overwritten.
    let again = devid_create(&pki, &tpm.tcti(), "devid.key");
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("already exists"));
    assert_eq!(std::fs::read_to_string(pki.join("devid.key")).unwrap(), key_ref);

    let ca_dir = tmp.path().join("ca");
    let ca_cfg = format!(
        "{}\n[node_attestation.tpm_devid]\ndevid_ca = \"{}\"\n",
        default_config(&ca_dir),
        pki.join("devid-ca.pem").display()
    );
    let ca = Ca::start_with(&ca_dir, &ca_cfg);

    // The agent attests with no join token; its ID is derived from the DevID certificate.
    let agent_dir = tmp.path().join("agent");
    let mut agent = Agent::start(
        &agent_dir,
        &ca,
        None,
        &devid_section(&tpm.tcti(), &pki, "devid.pem"),
    );
    let pem = std::fs::read_to_string(pki.join("devid.pem")).unwrap();
    let der = &trustline_identity::bundle::certs_from_pem(&pem).unwrap()[0];
    let fp = trustline_identity::devid::fingerprint(der);
    assert_eq!(
        agent.id,
        format!("spiffe://example.org/trustline/agent/tpm_devid/{fp}")
    );
    let issued = ca.cli_ok(&["issued", "list", "--spiffe-id", &agent.id, "--output", "json"]);
    assert!(issued.contains("tpm_devid"), "{issued}");

    // It serves workloads registered under it.
    let uid = std::fs::metadata("/proc/self").unwrap().uid();
    ca.cli_ok(&[
        "entry",
        "create",
        "--spiffe-id",
        "spiffe://example.org/web",
        "--parent-id",
        &agent.id,
        "--selector",
        &format!("unix:uid:{uid}"),
    ]);
    let c = spiffe::WorkloadApiClient::connect_to(agent.endpoint())
        .await
        .unwrap();
    let svid = eventually(PATIENCE, "an X.509-SVID", || {
        let c = c.clone();
        async move { c.fetch_x509_svid().await.ok() }
    })
    .await;
    assert_eq!(svid.spiffe_id().to_string(), "spiffe://example.org/web");

    // With its stored SVID gone (expired, disk wiped), it re-attests on its own, as the same node.
    let id = agent.id.clone();
    agent.stop();
    std::fs::remove_file(agent_dir.join("state/agent-svid.json")).unwrap();
    agent.restart();
    assert_eq!(agent.id, id);
    agent.stop();
    std::fs::remove_file(agent_dir.join("state/agent-svid.json")).unwrap();

    // A copy of the key file and certificate on another machine (another TPM): the blob does not load there.
    let other_tpm = Swtpm::start(&tmp.path().join("tpm2")).unwrap();
    let copy_dir = tmp.path().join("copy");
    std::fs::create_dir_all(&copy_dir).unwrap();
    let cfg = std::fs::read_to_string(&agent.config)
        .unwrap()
        .replace(&tpm.tcti(), &other_tpm.tcti());
    std::fs::write(copy_dir.join("agent.toml"), cfg).unwrap();
    let err = agent_fails(&copy_dir.join("agent.toml"));
    assert!(err.contains("TPM2_Load"), "{err}");

    // A DevID certificate from a CA the Trustline CA does not trust.
    devid_ca(&pki, "rogue-ca");
    sign_devid(&pki, "rogue-ca", "rogue.pem");
    let cfg = std::fs::read_to_string(&agent.config)
        .unwrap()
        .replace("devid.pem", "rogue.pem");
    std::fs::write(copy_dir.join("agent.toml"), cfg).unwrap();
    let err = agent_fails(&copy_dir.join("agent.toml"));
    assert!(
        err.contains("attestation refused") && err.contains("not issued by a trusted DevID CA"),
        "{err}"
    );

    // A certificate for another key than the one in the key file.
    let other_key_dir = tmp.path().join("other-key");
    std::fs::create_dir_all(&other_key_dir).unwrap();
    assert!(devid_create(&other_key_dir, &tpm.tcti(), "devid.key")
        .status
        .success());
    let cfg = std::fs::read_to_string(&agent.config).unwrap().replace(
        &pki.join("devid.key").display().to_string(),
        &other_key_dir.join("devid.key").display().to_string(),
    );
    std::fs::write(copy_dir.join("agent.toml"), cfg).unwrap();
    let err = agent_fails(&copy_dir.join("agent.toml"));
    assert!(
        err.contains("tpm_devid") && err.contains("is not for the key"),
        "{err}"
    );
    let ca_addr = ca.agent_addr.to_string();
    drop(ca);

    // A CA without [node_attestation.tpm_devid] refuses DevID attestation and says so.
    let plain = Ca::start(&tmp.path().join("ca2"));
    let plain_agent_dir = tmp.path().join("agent2");
    std::fs::create_dir_all(&plain_agent_dir).unwrap();
    let cfg = std::fs::read_to_string(&agent.config)
        .unwrap()
        .replace(&ca_addr, &plain.agent_addr.to_string())
        .replace(
            &agent_dir.join("bundle.pem").display().to_string(),
            &plain_agent_dir.join("bundle.pem").display().to_string(),
        );
    std::fs::write(
        plain_agent_dir.join("bundle.pem"),
        plain.cli_ok(&["bundle", "show", "--format", "pem"]),
    )
    .unwrap();
    std::fs::write(plain_agent_dir.join("agent.toml"), cfg).unwrap();
    let err = agent_fails(&plain_agent_dir.join("agent.toml"));
    assert!(err.contains("does not accept tpm_devid"), "{err}");
}
