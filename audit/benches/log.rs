//! Accountability log throughput: records appended per second with fsync group commit (8 producer threads, as
//! a busy sidecar's request tasks would), and verification speed.
//!
//! Run: `cargo bench -p trustline-audit --bench log` (knob: `TRUSTLINE_BENCH_RECORDS`, default 1,000,000).
//! The log is written to a temp folder on the machine's disk (`TMPDIR`).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use trustline_audit::{verify, Fsync, Log, LogConfig, Record};

fn rec(i: u64) -> Record {
    Record {
        time_us: 1_795_000_000_000_000 + i as i64,
        trace_id: format!("{:032x}", i * 7919),
        span_id: format!("{i:016x}"),
        direction: "inbound".into(),
        local: "spiffe://example.org/payments".into(),
        peer: "spiffe://example.org/frontend".into(),
        method: "POST".into(),
        authority: "payments".into(),
        path: format!("/payments/{i}/capture"),
        status: 200,
        decision: "allow".into(),
        policy: Some("payments-from-frontend".into()),
        rule: Some(0),
        chain_digest: "Zm9vYmFyYmF6cXV4Zm9vYmFyYmF6cXV4Zm9vYmFyYmE".into(),
        bytes_in: 512,
        bytes_out: 128,
        duration_us: 140,
        ..Default::default()
    }
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let n: u64 = std::env::var("TRUSTLINE_BENCH_RECORDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000);
    let producers = 8u64;
    for (label, fsync) in [
        ("fsync per batch (group commit)", Fsync::Batch),
        ("fsync every 10 ms", Fsync::Interval(Duration::from_millis(10))),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = LogConfig::new(dir.path().to_owned());
        cfg.fsync = fsync;
        cfg.queue = 1 << 16;
        let (log, _) = Log::open(cfg, None).unwrap();
        let t = Instant::now();
        std::thread::scope(|s| {
            for p in 0..producers {
                let log = log.clone();
                s.spawn(move || {
                    let mut i = p;
                    while i < n {
                        match log.try_append(&rec(i)) {
                            Ok(()) => i += producers,
                            // Queue full: the writer is behind; back off briefly (a sidecar would fail open or closed).
                            Err(_) => std::thread::yield_now(),
                        }
                    }
                });
            }
        });
        while log.stats().durable.load(Ordering::Relaxed) < n {
            std::thread::sleep(Duration::from_millis(1));
        }
        let took = t.elapsed();
        let bytes: u64 = std::fs::read_dir(dir.path())
            .unwrap()
            .filter_map(Result::ok)
            .map(|e| e.metadata().unwrap().len())
            .sum();
        log.close();
        println!(
            "append, {label:<31}: {n} records in {:.2} s = {:>9.0} records/s ({:.0} bytes/record)",
            took.as_secs_f64(),
            n as f64 / took.as_secs_f64(),
            bytes as f64 / n as f64
        );
        if fsync == Fsync::Batch {
            let t = Instant::now();
            let r = verify(dir.path(), None).unwrap();
            let took = t.elapsed();
            assert!(r.ok() && r.records == n, "{:?}", r.findings);
            println!(
                "verify (every hash link)              : {n} records in {:.2} s = {:>9.0} records/s",
                took.as_secs_f64(),
                n as f64 / took.as_secs_f64()
            );
        }
    }
}
