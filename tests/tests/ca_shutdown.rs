//! SIGTERM stops the CA by itself even while agents hold their update streams open (before, its graceful
//! shutdown waited for those streams, which never end, so the CA ran until it was killed).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use trustline_tests::mesh::Mesh;

#[test]
fn sigterm_stops_the_ca_while_an_agent_is_connected() {
    let mut mesh = Mesh::start("");
    // The agent is attested and holds its update stream to the CA.
    assert!(mesh.ca.logged("agent update stream opened"));
    let status = mesh.ca.stop_status();
    assert!(
        status.is_some_and(|s| s.success()),
        "the CA did not exit by itself after SIGTERM: {status:?}"
    );
}
