//! The sidecar's identity source against a real agent: first SVID, rotation swapped in place, fail closed.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::os::unix::fs::MetadataExt;
use std::time::Duration;

use trustline_sidecar::svid_source::SvidSource;
use trustline_tests::{eventually, now, verify_svid, Agent, Ca, PATIENCE};

const NODE: &str = "spiffe://example.org/trustline/agent/s1";

#[tokio::test(flavor = "multi_thread")]
async fn the_sidecar_takes_its_svid_from_the_workload_api_and_follows_rotations() {
    // Fail closed: no agent, no certificate.
    let nowhere = SvidSource::start("/nonexistent/workload.sock".into());
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(nowhere.cert.get().is_none());
    assert!(nowhere.bundle().is_none());

    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("ca");
    let mut cfg = trustline_tests::default_config(&dir);
    cfg.push_str("\n[svid]\nx509_ttl = \"6s\"\n");
    let ca = Ca::start_with(&dir, &cfg);
    let token: serde_json::Value =
        serde_json::from_str(&ca.cli_ok(&["token", "generate", "--spiffe-id", NODE, "--output", "json"]))
            .unwrap();
    let uid = std::fs::metadata("/proc/self").unwrap().uid();
    ca.cli_ok(&[
        "entry",
        "create",
        "--spiffe-id",
        "spiffe://example.org/sidecar",
        "--parent-id",
        NODE,
        "--selector",
        &format!("unix:uid:{uid}"),
    ]);
    let agent = Agent::start(&tmp.path().join("agent"), &ca, token["token"].as_str(), "");

    let src = SvidSource::start(agent.socket.clone());
    let mut rx = src.subscribe();
    let first = eventually(PATIENCE, "the first SVID", || {
        let c = rx.borrow().clone();
        async move { c }
    })
    .await;
    assert_eq!(first.spiffe_id, "spiffe://example.org/sidecar");
    let ck = src.cert.get().expect("handshakes can now use a certificate");
    assert_eq!(ck.cert[0].as_ref(), first.leaf.as_slice());
    assert_eq!(
        verify_svid(std::slice::from_ref(&first.leaf), &ca.bundle_roots(), now()).unwrap(),
        "spiffe://example.org/sidecar"
    );
    assert!(src.bundle().is_some());

    // A rotation arrives on the same stream and is swapped in place.
    let rotated = tokio::time::timeout(PATIENCE, async {
        loop {
            rx.changed().await.unwrap();
            let c = rx.borrow().clone().unwrap();
            if c.leaf != first.leaf {
                return c;
            }
        }
    })
    .await
    .expect("a rotated SVID");
    assert_eq!(src.cert.get().unwrap().cert[0].as_ref(), rotated.leaf.as_slice());
    verify_svid(&[rotated.leaf], &ca.bundle_roots(), now()).unwrap();
}
