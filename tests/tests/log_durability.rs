//! kill -9 during heavy logging: the restarted sidecar recovers its log (a torn tail is cut), `trustline-audit
//! verify` passes, and every request that got an answer is in the log (durable mode: an answer leaves only once
//! its record is synced).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use trustline_tests::mesh::{echo_app, request, Mesh, TD};
use trustline_tests::{bin, eventually, PATIENCE};

#[tokio::test(flavor = "multi_thread")]
async fn kill_9_loses_no_acknowledged_record() {
    let mesh = Mesh::start("");
    let app = echo_app().await;
    let log_dir = mesh.tmp.path().join("api-log");
    let mut api = mesh.sidecar(
        "api",
        &format!(
            "[log]\ndir = \"{}\"\ndurable = true\nsegment_bytes = 65536\ncheckpoint_records = 50\n[[inbound]]\nlisten = \"127.0.0.1:0\"\napp = \"{app}\"\n",
            log_dir.display()
        ),
        &[],
    );
    let web = mesh.sidecar(
        "web",
        &format!(
            "[[outbound]]\nlisten = \"127.0.0.1:0\"\n[[outbound.route]]\nhost = \"api\"\nupstream = \"{}\"\nspiffe_ids = [\"{TD}/api\"]\n",
            api.inbound[0]
        ),
        &[],
    );
    let w = web.outbound[0];
    let acked = Arc::new(Mutex::new(Vec::<String>::new()));
    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::new();
    for t in 0..16u64 {
        let (acked, stop) = (acked.clone(), stop.clone());
        tasks.push(tokio::spawn(async move {
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                i += 1;
                let tid = format!("{:016x}{:016x}", t + 1, i);
                let tp = format!("00-{tid}-00f067aa0ba902b7-01");
                if let Ok(r) = request(w, "GET", "api", "/work", &[("traceparent", &tp)], "").await {
                    if r.status == 200 {
                        acked.lock().unwrap().push(tid);
                    }
                }
            }
        }));
    }
    // Let the load run (at least 2.5 s and until over 200 requests were answered, however slow the machine), then
    // kill -9 in the middle of it.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    eventually(PATIENCE, "over 200 answered requests", || {
        let answered = acked.lock().unwrap().len();
        async move { (answered > 200).then_some(()) }
    })
    .await;
    std::process::Command::new("kill")
        .args(["-9", &api.pid().unwrap().to_string()])
        .status()
        .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await.unwrap();
    }
    let acked = acked.lock().unwrap().clone();
    assert!(
        acked.len() > 200,
        "heavy logging: {} answered requests",
        acked.len()
    );

    // Restart: the log is recovered (a torn tail, if any, cut) and appending continues.
    api.restart();
    assert!(api.logged("accountability log open"));
    api.stop();

    let bundle = mesh.tmp.path().join("bundle.pem");
    std::fs::write(&bundle, mesh.ca.cli_ok(&["bundle", "show", "--format", "pem"])).unwrap();
    let out = std::process::Command::new(bin("trustline-audit"))
        .args(["verify", "--bundle"])
        .arg(&bundle)
        .arg(&log_dir)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");

    let recorded: std::collections::HashSet<String> = trustline_audit::verify::records(&log_dir, None)
        .unwrap()
        .into_iter()
        .map(|(_, r)| r.trace_id)
        .collect();
    let missing: Vec<&String> = acked.iter().filter(|t| !recorded.contains(*t)).collect();
    assert!(
        missing.is_empty(),
        "{} acknowledged requests missing from the log, e.g. {:?}",
        missing.len(),
        &missing[..missing.len().min(3)]
    );
}

/// Unmounts on drop.
struct Mounted(std::path::PathBuf);

impl Drop for Mounted {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_full_disk_fails_closed_or_open_as_configured_and_recovers() {
    let mesh = Mesh::start("");
    let app = echo_app().await;
    // A real full disk: a 256 KiB tmpfs. Mounting needs privileges; without them the test says so and stops.
    let mnt = mesh.tmp.path().join("small-disk");
    std::fs::create_dir_all(&mnt).unwrap();
    let mounted = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=256k", "tmpfs"])
        .arg(&mnt)
        .status()
        .is_ok_and(|s| s.success());
    if !mounted {
        println!("skipped: cannot mount a small tmpfs here (needs root with CAP_SYS_ADMIN)");
        return;
    }
    let _unmount = Mounted(mnt.clone());
    let sidecar = |name: &str, mode: &str| {
        mesh.sidecar(
            name,
            &format!(
                "[log]\ndir = \"{}\"\non_failure = \"{mode}\"\ncheckpoint_interval = \"200ms\"\n[[inbound]]\nlisten = \"127.0.0.1:0\"\napp = \"{app}\"\n",
                mnt.join(name).display()
            ),
            &[],
        )
    };
    let mut open = sidecar("api-open", "open");
    let closed = sidecar("api-closed", "closed");
    let web = mesh.sidecar(
        "web",
        &format!(
            "[[outbound]]\nlisten = \"127.0.0.1:0\"\n[[outbound.route]]\nhost = \"open\"\nupstream = \"{}\"\nspiffe_ids = [\"{TD}/api-open\"]\n[[outbound.route]]\nhost = \"closed\"\nupstream = \"{}\"\nspiffe_ids = [\"{TD}/api-closed\"]\n",
            open.inbound[0], closed.inbound[0]
        ),
        &[],
    );
    let w = web.outbound[0];
    let big = "x".repeat(2000); // long paths make big records: the disk fills in a few hundred requests

    // Fail open: every request is served; the refusals are counted and logged as an alarm.
    let mut served = 0;
    for i in 0..5000 {
        let r = request(w, "GET", "open", &format!("/fill/{i}/{big}"), &[], "")
            .await
            .unwrap();
        assert_eq!(r.status, 200, "fail-open serves: {}", r.body);
        served += 1;
        if i % 50 == 0
            && open
                .metric("trustline_sidecar_log_records_total", &[("result", "refused")])
                .await
                >= 1.0
        {
            break;
        }
    }
    assert!(
        open.metric("trustline_sidecar_log_records_total", &[("result", "refused")])
            .await
            >= 1.0,
        "the disk filled after {served} requests"
    );
    assert!(open.logged("ALARM: request not recorded"));
    assert!(open.logged("accountability log write failed"));

    // Fail closed: with the disk full, requests are refused with 503 and never reach the app.
    let r = eventually(PATIENCE, "a 503 from the fail-closed sidecar", || async {
        let r = request(w, "GET", "closed", &format!("/x/{big}"), &[], "")
            .await
            .unwrap();
        (r.status == 503).then_some(r)
    })
    .await;
    assert!(r.body.contains("log_unavailable"), "{}", r.body);

    // Space comes back: the fail-closed sidecar's writer notices (it probes with a checkpoint) and serves again.
    open.stop();
    let _ = std::fs::remove_dir_all(mnt.join("api-open"));
    eventually(PATIENCE, "recovery after the disk has space", || async {
        let r = request(w, "GET", "closed", "/again", &[], "").await.unwrap();
        (r.status == 200).then_some(())
    })
    .await;
    assert!(closed.logged("accountability log writes recovered"));
    drop(closed);
}
