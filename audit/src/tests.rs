#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::sync::Arc;

use rcgen::{
    BasicConstraints, CertificateParams, ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose, SanType,
};
use trustline_identity::spiffe_id::TrustDomain;
use trustline_identity::tls::{RotatingCert, TrustBundle};

use crate::format::{decode_frame, HEADER_LEN};
use crate::writer::segments;
use crate::*;

/// A CA, its bundle, and a sidecar SVID key to sign checkpoints with.
fn identity() -> (TrustBundle, Arc<RotatingCert>) {
    let ca_key = KeyPair::generate().unwrap();
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    let issuer = rcgen::Issuer::new(ca, ca_key);
    let key = KeyPair::generate().unwrap();
    let mut leaf = CertificateParams::new(Vec::<String>::new()).unwrap();
    leaf.subject_alt_names
        .push(SanType::URI("spiffe://example.org/api".try_into().unwrap()));
    leaf.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    leaf.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ClientAuth,
        ExtendedKeyUsagePurpose::ServerAuth,
    ];
    leaf.is_ca = IsCa::ExplicitNoCa;
    let cert = leaf.signed_by(&key, &issuer).unwrap();
    let rc = Arc::new(RotatingCert::default());
    rc.set(vec![cert.der().to_vec()], &key.serialize_der()).unwrap();
    let bundle = TrustBundle::new(
        TrustDomain::new("example.org").unwrap(),
        &[ca_cert.der().to_vec()],
    )
    .unwrap();
    (bundle, rc)
}

fn rec(i: u64) -> Record {
    Record {
        time_us: 1_700_000_000_000_000 + i as i64,
        trace_id: format!("{i:032x}"),
        span_id: format!("{i:016x}"),
        direction: "inbound".into(),
        local: "spiffe://example.org/api".into(),
        peer: "spiffe://example.org/web".into(),
        method: "GET".into(),
        authority: "api".into(),
        path: format!("/items/{i}"),
        status: 200,
        decision: "allow".into(),
        ..Default::default()
    }
}

fn write_log(dir: &Path, n: u64, segment_bytes: u64, signer: Arc<RotatingCert>) {
    let mut cfg = LogConfig::new(dir.to_owned());
    cfg.segment_bytes = segment_bytes;
    cfg.checkpoint_records = 100;
    let (log, rec0) = Log::open(cfg, Some(signer)).unwrap();
    assert_eq!(rec0.next_seq, 0);
    for i in 0..n {
        log.try_append(&rec(i)).unwrap();
    }
    log.close();
}

/// (segment, frame offset, frame length) of the frame with sequence `seq`.
fn locate(dir: &Path, seq: u64) -> (std::path::PathBuf, usize, usize) {
    for p in segments(dir).unwrap() {
        let b = std::fs::read(&p).unwrap();
        let mut off = HEADER_LEN;
        while let Some(f) = decode_frame(&b, off) {
            if f.seq == seq {
                return (p, off, f.len());
            }
            off += f.len();
        }
    }
    panic!("no frame {seq}");
}

#[test]
fn an_intact_log_verifies_with_signed_checkpoints() {
    let d = tempfile::tempdir().unwrap();
    let (bundle, signer) = identity();
    write_log(d.path(), 1000, 64 << 10, signer);
    let r = verify(d.path(), Some(&bundle)).unwrap();
    assert!(r.ok(), "{:?}", r.findings);
    assert_eq!(r.records, 1000);
    assert!(r.segments > 2, "rolled segments: {}", r.segments);
    assert!(r.checkpoints >= 10, "{}", r.checkpoints);
    assert_eq!(r.uncovered, 0, "the last checkpoint is signed on close");
    assert_eq!(r.signers, vec!["spiffe://example.org/api".to_owned()]);
    // Another trust domain's bundle does not vouch for the signer.
    let (other, _) = identity();
    let r = verify(d.path(), Some(&other)).unwrap();
    assert!(
        matches!(r.findings[0], Finding::BadCheckpoint { .. }),
        "{:?}",
        r.findings
    );
    // Reading back.
    let all = verify::records(d.path(), None).unwrap();
    assert_eq!(all.len(), 1000);
    assert_eq!(all[42].1, rec(42));
}

#[test]
fn each_kind_of_tampering_is_found_and_named() {
    let (bundle, signer) = identity();
    let fresh = || {
        let d = tempfile::tempdir().unwrap();
        write_log(d.path(), 600, 32 << 10, signer.clone());
        d
    };

    // Flip a byte inside record 250's payload.
    let d = fresh();
    let (p, off, _) = locate(d.path(), 250);
    let mut b = std::fs::read(&p).unwrap();
    b[off + 4 + 9 + 20] ^= 0x01;
    std::fs::write(&p, b).unwrap();
    let r = verify(d.path(), Some(&bundle)).unwrap();
    assert!(
        r.findings.contains(&Finding::Altered {
            segment: p.clone(),
            seq: 250
        }),
        "{:?}",
        r.findings
    );
    assert_eq!(r.findings.len(), 1, "{:?}", r.findings);

    // Delete record 300.
    let d = fresh();
    let (p, off, len) = locate(d.path(), 300);
    let mut b = std::fs::read(&p).unwrap();
    b.drain(off..off + len);
    std::fs::write(&p, b).unwrap();
    let r = verify(d.path(), Some(&bundle)).unwrap();
    assert!(
        r.findings.contains(&Finding::Removed {
            segment: p.clone(),
            from: 300,
            to: 300
        }),
        "{:?}",
        r.findings
    );

    // Swap records 310 and 311.
    let d = fresh();
    let (p, a_off, a_len) = locate(d.path(), 310);
    let (_, b_off, b_len) = locate(d.path(), 311);
    assert_eq!(a_off + a_len, b_off);
    let mut b = std::fs::read(&p).unwrap();
    let first = b[a_off..a_off + a_len].to_vec();
    let second = b[b_off..b_off + b_len].to_vec();
    b.splice(a_off..b_off + b_len, second.into_iter().chain(first));
    std::fs::write(&p, b).unwrap();
    let r = verify(d.path(), Some(&bundle)).unwrap();
    assert!(
        r.findings.contains(&Finding::Reordered {
            segment: p.clone(),
            found: 311,
            expected: 310
        }),
        "{:?}",
        r.findings
    );

    // Drop a whole segment from the middle.
    let d = fresh();
    let segs = segments(d.path()).unwrap();
    assert!(segs.len() >= 3);
    std::fs::remove_file(&segs[1]).unwrap();
    let r = verify(d.path(), Some(&bundle)).unwrap();
    assert!(
        r.findings
            .iter()
            .any(|f| matches!(f, Finding::SegmentMissing { .. })),
        "{:?}",
        r.findings
    );
    assert!(r
        .findings
        .iter()
        .any(|f| f.to_string().contains("a segment is missing")));
}

#[test]
fn a_torn_tail_is_cut_on_open_and_appending_continues() {
    let d = tempfile::tempdir().unwrap();
    let (bundle, signer) = identity();
    write_log(d.path(), 100, 64 << 20, signer.clone());
    let last = segments(d.path()).unwrap().pop().unwrap();
    let mut f = std::fs::OpenOptions::new().append(true).open(&last).unwrap();
    std::io::Write::write_all(&mut f, &[200, 0, 0, 0, 1, 2, 3]).unwrap(); // half a frame
    drop(f);
    let (log, recovery) = Log::open(LogConfig::new(d.path().to_owned()), Some(signer)).unwrap();
    assert_eq!(recovery.truncated_bytes, 7);
    assert_eq!(
        recovery.next_seq, 101,
        "100 records and the checkpoint after them survive"
    );
    log.try_append(&rec(100)).unwrap();
    log.close();
    let r = verify(d.path(), Some(&bundle)).unwrap();
    assert!(r.ok(), "{:?}", r.findings);
    assert_eq!(r.records, 101);
}

/// A new log in a new directory, with a checkpoint signer.
fn fresh_log() -> (tempfile::TempDir, Log) {
    let d = tempfile::tempdir().unwrap();
    let (_, signer) = identity();
    let (log, _) = Log::open(LogConfig::new(d.path().to_owned()), Some(signer)).unwrap();
    (d, log)
}

/// Records written and synced so far.
fn durable(log: &Log) -> u64 {
    log.stats().durable.load(std::sync::atomic::Ordering::Relaxed)
}

#[tokio::test]
async fn durable_appends_resolve_after_the_write() {
    let (d, log) = fresh_log();
    for i in 0..10 {
        log.append_durable(&rec(i)).await.unwrap();
    }
    assert_eq!(durable(&log), 10);
    assert_eq!(
        verify::records(d.path(), None).unwrap().len(),
        10,
        "on disk before close"
    );
    log.close();
}

/// Waits (bounded) until `n` records are durable.
async fn durable_reaches(log: &Log, n: u64) {
    let t = std::time::Instant::now();
    while durable(log) < n {
        assert!(
            t.elapsed() < std::time::Duration::from_secs(5),
            "{n} records not durable"
        );
        tokio::time::sleep(std::time::Duration::from_millis(1)).await;
    }
}

/// Records nobody waits on, arriving at a steady pace, go out in lingering batches while the log stays open; a
/// durable record in between still resolves at once, and one after a pause wakes the writer.
#[tokio::test]
async fn queued_records_reach_the_disk_in_batches_and_after_pauses() {
    let (d, log) = fresh_log();
    for i in 0..20 {
        log.try_append(&rec(i)).unwrap();
        tokio::time::sleep(std::time::Duration::from_millis(1)).await;
    }
    durable_reaches(&log, 20).await;
    log.append_durable(&rec(20)).await.unwrap();
    assert_eq!(durable(&log), 21);
    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    log.try_append(&rec(21)).unwrap();
    durable_reaches(&log, 22).await;
    let records = verify::records(d.path(), None).unwrap();
    assert_eq!(records.len(), 22, "on disk before close");
    log.close();
}

/// Records encrypted at rest (SM4-GCM, `[log] encryption_key_file`): anyone can verify the chain and checkpoints
/// without the key; reading needs the key; a wrong key, or a record moved or altered, is refused.
#[test]
fn encrypted_records_verify_without_the_key_and_read_only_with_it() {
    if !trustline_hsm::SM_SUPPORTED {
        println!("skipped: SM4-GCM needs --features trustline-hsm/sm (scripts/test.sh builds with it)");
        return;
    }
    use std::os::unix::fs::PermissionsExt;
    let keys = tempfile::tempdir().unwrap();
    let key_file = |name: &str, bytes: &[u8]| {
        let p = keys.path().join(name);
        std::fs::write(&p, bytes).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
        p
    };
    let key = crate::format::LogKey::from_file(&key_file("log.key", &[7u8; 16])).unwrap();
    let other =
        crate::format::LogKey::from_file(&key_file("other.key", b"000102030405060708090a0b0c0d0e0f\n"))
            .unwrap();
    let loose = key_file("loose.key", &[1u8; 16]);
    std::fs::set_permissions(&loose, std::fs::Permissions::from_mode(0o644)).unwrap();
    let e = crate::format::LogKey::from_file(&loose).unwrap_err().to_string();
    assert!(e.contains("chmod 600"), "{e}");
    assert!(crate::format::LogKey::from_file(&key_file("short.key", b"abc")).is_err());

    let d = tempfile::tempdir().unwrap();
    let (bundle, signer) = identity();
    let mut cfg = LogConfig::new(d.path().to_owned());
    cfg.checkpoint_records = 50;
    cfg.encryption = Some(key.clone());
    let (log, _) = Log::open(cfg, Some(signer)).unwrap();
    for i in 0..200 {
        log.try_append(&rec(i)).unwrap();
    }
    log.close();

    // No plaintext on disk.
    for p in segments(d.path()).unwrap() {
        let b = std::fs::read(&p).unwrap();
        assert!(!b.windows(9).any(|w| w == b"/items/42"), "a record is in clear");
    }
    let r = verify(d.path(), Some(&bundle)).unwrap();
    assert!(r.ok(), "{:?}", r.findings);
    assert_eq!(r.records, 200);
    assert!(r.checkpoints >= 4);

    let e = verify::records(d.path(), None).unwrap_err().to_string();
    assert!(
        e.contains("record 0 is encrypted") && e.contains("--log-key"),
        "{e}"
    );
    let all = verify::records(d.path(), Some(&key)).unwrap();
    assert_eq!(all.len(), 200);
    assert_eq!(all[42].1, rec(42));
    let e = verify::records(d.path(), Some(&other)).unwrap_err().to_string();
    assert!(e.contains("does not open with this key"), "{e}");

    // A ciphertext byte flipped: the chain names the record, and the key refuses it too.
    let (p, off, _) = locate(d.path(), 120);
    let mut b = std::fs::read(&p).unwrap();
    b[off + 4 + 9 + 20] ^= 0x01;
    std::fs::write(&p, b).unwrap();
    let r = verify(d.path(), Some(&bundle)).unwrap();
    assert!(!r.ok());
    let e = verify::records(d.path(), Some(&key)).unwrap_err().to_string();
    assert!(e.contains("record 120"), "{e}");
}

/// Signs nothing until released: says when the writer thread enters its checkpoint, and holds it there.
struct Gate {
    entered: std::sync::Mutex<std::sync::mpsc::Sender<()>>,
    release: std::sync::Mutex<std::sync::mpsc::Receiver<()>>,
}

impl CheckpointSigner for Gate {
    fn sign(&self, _message: &[u8]) -> Option<Result<trustline_identity::tls::SvidSignature, String>> {
        let _ = self.entered.lock().unwrap().send(());
        let _ = self.release.lock().unwrap().recv();
        None
    }
}

#[test]
fn a_full_queue_refuses_records_and_takes_them_again_once_drained() {
    let dir = tempfile::tempdir().unwrap();
    let (release, release_rx) = std::sync::mpsc::channel();
    let (entered_tx, entered) = std::sync::mpsc::channel();
    let gate = Gate {
        entered: std::sync::Mutex::new(entered_tx),
        release: std::sync::Mutex::new(release_rx),
    };
    let mut cfg = LogConfig::new(dir.path().to_owned());
    cfg.queue = 4;
    cfg.checkpoint_records = 1;
    let (log, _) = Log::open(cfg, Some(Arc::new(gate))).unwrap();
    // The first record reaches the writer, which then waits in its checkpoint; four more fill the queue.
    log.try_append(&rec(0)).unwrap();
    entered.recv_timeout(std::time::Duration::from_secs(10)).unwrap();
    for i in 1..=4 {
        log.try_append(&rec(i)).unwrap();
    }
    assert_eq!(log.try_append(&rec(5)), Err(AppendError::Full));
    assert_eq!(log.stats().refused.load(std::sync::atomic::Ordering::Relaxed), 1);
    // Released, the writer drains the queue: records are taken again.
    drop(release);
    let t = std::time::Instant::now();
    while log.try_append(&rec(6)).is_err() {
        assert!(
            t.elapsed() < std::time::Duration::from_secs(10),
            "the queue never drained"
        );
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    log.close();
}

/// Found by the `audit_segment` fuzz target: a segment whose sequence numbers reach `u64::MAX` made verify panic
/// (`attempt to add with overflow`; a silent wrap in release builds). Verify now reports it, and recovery treats
/// the frame that claims the last number as the torn tail.
#[test]
fn sequence_numbers_at_the_end_of_u64_are_findings_not_panics() {
    use crate::format::{encode_frame, header, segment_name, KIND_RECORD};
    let d = tempfile::tempdir().unwrap();
    let first = u64::MAX - 1;
    let mut bytes = header(first, &[0u8; 32]).to_vec();
    let mut prev = [0u8; 32];
    for seq in [first, u64::MAX, u64::MAX, 3] {
        prev = encode_frame(&mut bytes, &prev, KIND_RECORD, seq, b"{}");
    }
    std::fs::write(d.path().join(segment_name(first)), &bytes).unwrap();
    let report = verify(d.path(), None).unwrap();
    assert!(!report.ok(), "{report:?}");
    let _ = verify::records(d.path(), None);
    // Recovery keeps the first record and cuts from the frame that claims u64::MAX.
    let (log, recovery) = Log::open(LogConfig::new(d.path().to_owned()), None).unwrap();
    assert!(recovery.truncated_bytes > 0, "{recovery:?}");
    drop(log);
}
