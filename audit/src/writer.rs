//! The writer: appends records from any thread through a bounded queue to a dedicated thread that writes them
//! in batches (group commit), fsyncs per the configured policy, rolls segments, and signs checkpoints.
//!
//! Nothing in the request path waits on the disk unless it asks to ([`Log::append_durable`]); a full queue or a
//! failed disk is reported at once ([`AppendError`]) so the caller can fail closed or open.

use std::fs::{File, OpenOptions};
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine as _;
use trustline_identity::tls::SvidSignature;

use crate::format::{
    checkpoint_message, decode_frame, encode_frame, header, hex, parse_header, segment_name, Checkpoint,
    Hash, Record, HEADER_LEN, KIND_CHECKPOINT, KIND_RECORD, KIND_SEALED_RECORD,
};

/// How long the writer waits for more records after the first of a batch nobody waits on (group commit). It
/// bounds how much later such a record reaches the disk; requests that do not ask to wait never wait on it. A
/// batch that starts with a record appended by [`Log::append_durable`] is committed at once (one that arrives
/// during a linger waits for its end).
///
/// Each batch costs a wake-up of the writer thread, a `write` and, with fsync per batch, an fsync: about 70 µs
/// of CPU on a virtual disk, which at 1 ms batches was a quarter of a quiet sidecar pair's CPU per request
/// (docs/benchmarks.md). 5 ms keeps what a crash can lose of records nobody waited on to a few milliseconds,
/// far under the 200 ms of PostgreSQL's asynchronous commit (`wal_writer_delay`).
pub const GROUP_LINGER: Duration = Duration::from_millis(5);

/// When the writer calls fsync.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fsync {
    /// After every batch (group commit: one fsync for everything queued meanwhile).
    Batch,
    /// At most once per interval (records written in between may be lost by a power cut, not by a crash).
    Interval(Duration),
    /// Never (the OS decides).
    Never,
}

/// Writer settings.
#[derive(Debug, Clone)]
pub struct LogConfig {
    /// Folder of segment files.
    pub dir: PathBuf,
    /// A new segment starts once the current one is this large.
    pub segment_bytes: u64,
    /// fsync policy.
    pub fsync: Fsync,
    /// Sign a checkpoint at least this often (when records were added).
    pub checkpoint_interval: Duration,
    /// ... or after this many records.
    pub checkpoint_records: u64,
    /// Bounded queue length.
    pub queue: usize,
    /// Encrypt request records at rest with this key (SM4-GCM); `None`: records are plain JSON.
    pub encryption: Option<crate::format::LogKey>,
}

impl LogConfig {
    /// Defaults for `dir`: 64 MiB segments, fsync per batch, checkpoints every 10 s or 10,000 records.
    pub fn new(dir: PathBuf) -> Self {
        Self {
            dir,
            segment_bytes: 64 << 20,
            fsync: Fsync::Batch,
            checkpoint_interval: Duration::from_secs(10),
            checkpoint_records: 10_000,
            queue: 65_536,
            encryption: None,
        }
    }
}

/// Signs checkpoints (the sidecar's SVID key).
pub trait CheckpointSigner: Send + Sync + 'static {
    /// Signs `message`; `None` while no key is available (the checkpoint is retried later).
    fn sign(&self, message: &[u8]) -> Option<Result<SvidSignature, String>>;
}

impl CheckpointSigner for trustline_identity::tls::RotatingCert {
    fn sign(&self, message: &[u8]) -> Option<Result<SvidSignature, String>> {
        trustline_identity::tls::RotatingCert::sign(self, message).map(|r| r.map_err(|e| e.to_string()))
    }
}

/// The log could not be opened.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LogError {
    /// File system error.
    #[error("accountability log {path}: {source}")]
    Io {
        /// File or folder.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
    /// A segment is not a Trustline log segment.
    #[error("accountability log {path}: not a Trustline log segment (bad header)")]
    BadSegment {
        /// File.
        path: PathBuf,
    },
}

/// A record could not be queued or made durable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum AppendError {
    /// The queue is full: the disk does not keep up.
    #[error("accountability log queue is full")]
    Full,
    /// The disk failed; the message says how.
    #[error("accountability log write failed: {0}")]
    Failed(String),
}

/// What opening found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recovery {
    /// Segment files present.
    pub segments: usize,
    /// Sequence number the next record gets (= frames already in the log).
    pub next_seq: u64,
    /// Bytes cut from a torn tail (a frame half-written when the process died).
    pub truncated_bytes: u64,
}

/// Live counters.
#[derive(Debug, Default)]
pub struct Stats {
    /// Records queued.
    pub queued: AtomicU64,
    /// Records written and (per the fsync policy) synced: their sequence count.
    pub durable: AtomicU64,
    /// Records refused (queue full or disk failed).
    pub refused: AtomicU64,
    /// Checkpoints signed.
    pub checkpoints: AtomicU64,
    /// Set while the disk is failing.
    pub failing: AtomicBool,
    last_error: Mutex<Option<String>>,
    /// Records in the queue now (bounded by [`LogConfig::queue`]).
    in_queue: AtomicUsize,
}

impl Stats {
    /// The last write error, if the disk is failing.
    pub fn last_error(&self) -> Option<String> {
        self.last_error.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

type Waiter = tokio::sync::oneshot::Sender<Result<(), AppendError>>;

enum Msg {
    Record(Vec<u8>, Option<Waiter>),
}

/// A handle to the log; cheap to clone. Dropping every handle flushes, signs a last checkpoint and stops the
/// writer thread.
#[derive(Clone)]
pub struct Log {
    /// An unbounded channel bounded by `Stats::in_queue` against `limit`: its memory follows what is queued
    /// (a bounded channel of 65,536 slots would hold 2.5 MiB from the start).
    tx: Sender<Msg>,
    limit: usize,
    stats: Arc<Stats>,
    done: Arc<Mutex<Option<std::thread::JoinHandle<()>>>>,
}

impl std::fmt::Debug for Log {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Log")
            .field("durable", &self.stats.durable)
            .finish()
    }
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> LogError + '_ {
    move |source| LogError::Io {
        path: path.to_owned(),
        source,
    }
}

/// Segment files of `dir`, sorted by first sequence number.
pub fn segments(dir: &Path) -> Result<Vec<PathBuf>, LogError> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(io(dir))?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("seg-") && n.ends_with(".tlog"))
        })
        .collect();
    v.sort();
    Ok(v)
}

struct Tail {
    file: File,
    path: PathBuf,
    len: u64,
    next_seq: u64,
    prev: Hash,
}

/// Opens the last segment (creating the first), cutting a torn tail.
fn recover(dir: &Path) -> Result<(Tail, Recovery), LogError> {
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let segs = segments(dir)?;
    let Some(last) = segs.last().cloned() else {
        let path = dir.join(segment_name(0));
        let mut file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(io(&path))?;
        file.write_all(&header(0, &[0u8; 32])).map_err(io(&path))?;
        file.sync_all().map_err(io(&path))?;
        sync_dir(dir);
        return Ok((
            Tail {
                file,
                path,
                len: HEADER_LEN as u64,
                next_seq: 0,
                prev: [0u8; 32],
            },
            Recovery {
                segments: 1,
                next_seq: 0,
                truncated_bytes: 0,
            },
        ));
    };
    let bytes = std::fs::read(&last).map_err(io(&last))?;
    let (first_seq, mut prev) =
        parse_header(&bytes).ok_or_else(|| LogError::BadSegment { path: last.clone() })?;
    let mut next_seq = first_seq;
    let mut off = HEADER_LEN;
    // Keep every complete frame whose hash chains; the first that does not is where the tail tore.
    while let Some(f) = decode_frame(&bytes, off) {
        // The last sequence number is never written (see `take`): a frame claiming it is torn or crafted.
        if f.seq != next_seq || f.seq == u64::MAX || crate::format::chain_hash(&prev, f.body) != f.hash {
            break;
        }
        prev = f.hash;
        next_seq += 1;
        off += f.len();
    }
    let truncated = (bytes.len() - off) as u64;
    let file = OpenOptions::new().append(true).open(&last).map_err(io(&last))?;
    if truncated > 0 {
        file.set_len(off as u64).map_err(io(&last))?;
        file.sync_all().map_err(io(&last))?;
        tracing::warn!(segment = %last.display(), bytes = truncated, "accountability log: cut a torn tail");
    }
    Ok((
        Tail {
            file,
            path: last,
            len: off as u64,
            next_seq,
            prev,
        },
        Recovery {
            segments: segs.len(),
            next_seq,
            truncated_bytes: truncated,
        },
    ))
}

fn sync_dir(dir: &Path) {
    if let Ok(d) = File::open(dir) {
        let _ = d.sync_all();
    }
}

impl Log {
    /// Opens (recovering) the log in `cfg.dir` and starts the writer thread.
    pub fn open(
        cfg: LogConfig,
        signer: Option<Arc<dyn CheckpointSigner>>,
    ) -> Result<(Self, Recovery), LogError> {
        let (tail, recovery) = recover(&cfg.dir)?;
        let (tx, rx) = std::sync::mpsc::channel();
        let limit = cfg.queue.max(1);
        let stats = Arc::new(Stats::default());
        stats.durable.store(recovery.next_seq, Ordering::Relaxed);
        let st = stats.clone();
        let handle = std::thread::Builder::new()
            .name("trustline-log".into())
            .spawn(move || Writer::new(cfg, tail, signer, st).run(rx))
            .map_err(io(Path::new("writer thread")))?;
        Ok((
            Self {
                tx,
                limit,
                stats,
                done: Arc::new(Mutex::new(Some(handle))),
            },
            recovery,
        ))
    }

    /// Queues a record without waiting.
    pub fn try_append(&self, rec: &Record) -> Result<(), AppendError> {
        self.send(rec, None)
    }

    /// Queues a record and waits until it is written and synced (per the fsync policy).
    pub async fn append_durable(&self, rec: &Record) -> Result<(), AppendError> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.send(rec, Some(tx))?;
        rx.await
            .unwrap_or_else(|_| Err(AppendError::Failed("writer stopped".into())))
    }

    fn send(&self, rec: &Record, waiter: Option<Waiter>) -> Result<(), AppendError> {
        if self.stats.failing.load(Ordering::Relaxed) {
            self.stats.refused.fetch_add(1, Ordering::Relaxed);
            return Err(AppendError::Failed(self.stats.last_error().unwrap_or_default()));
        }
        let payload = serde_json::to_vec(rec).map_err(|e| AppendError::Failed(e.to_string()))?;
        if self.stats.in_queue.fetch_add(1, Ordering::AcqRel) >= self.limit {
            self.stats.in_queue.fetch_sub(1, Ordering::AcqRel);
            self.stats.refused.fetch_add(1, Ordering::Relaxed);
            return Err(AppendError::Full);
        }
        match self.tx.send(Msg::Record(payload, waiter)) {
            Ok(()) => {
                self.stats.queued.fetch_add(1, Ordering::Relaxed);
                Ok(())
            }
            Err(_) => {
                self.stats.in_queue.fetch_sub(1, Ordering::AcqRel);
                Err(AppendError::Failed("writer stopped".into()))
            }
        }
    }

    /// Counters.
    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    /// Stops accepting, writes what is queued, signs a final checkpoint and waits for the writer (only when
    /// this is the last handle; otherwise returns at once).
    pub fn close(self) {
        let done = self.done.clone();
        drop(self);
        if Arc::strong_count(&done) == 1 {
            if let Some(h) = done.lock().unwrap_or_else(|p| p.into_inner()).take() {
                let _ = h.join();
            }
        }
    }
}

struct Writer {
    cfg: LogConfig,
    tail: Tail,
    signer: Option<Arc<dyn CheckpointSigner>>,
    stats: Arc<Stats>,
    buf: Vec<u8>,
    waiters: Vec<Waiter>,
    since_checkpoint: u64,
    last_checkpoint: Instant,
    last_sync: Instant,
    unsynced: bool,
    /// (next_seq, prev) as of the last successful write: a failed write rolls back to it.
    written: (u64, Hash),
}

impl Writer {
    fn new(cfg: LogConfig, tail: Tail, signer: Option<Arc<dyn CheckpointSigner>>, stats: Arc<Stats>) -> Self {
        Self {
            cfg,
            written: (tail.next_seq, tail.prev),
            tail,
            signer,
            stats,
            buf: Vec::with_capacity(1 << 20),
            waiters: Vec::new(),
            since_checkpoint: 0,
            last_checkpoint: Instant::now(),
            last_sync: Instant::now(),
            unsynced: false,
        }
    }

    fn run(mut self, rx: Receiver<Msg>) {
        let tick = match self.cfg.fsync {
            Fsync::Interval(d) => d.min(self.cfg.checkpoint_interval),
            _ => self.cfg.checkpoint_interval,
        }
        .max(Duration::from_millis(1));
        loop {
            match rx.recv_timeout(tick) {
                Ok(m) => {
                    let lingers = matches!(m, Msg::Record(_, None));
                    self.take(m);
                    // Group commit: everything queued meanwhile goes into the same write (and fsync, per the
                    // policy). When nobody waits on this batch, first give the request threads GROUP_LINGER to
                    // queue more: a busy sidecar then pays one write, one fsync and one wake-up of this thread
                    // per linger instead of per record (records sent while this thread sleeps do not wake it).
                    if lingers {
                        std::thread::sleep(GROUP_LINGER);
                    }
                    self.drain(&rx);
                    self.commit(false);
                }
                Err(RecvTimeoutError::Timeout) => {
                    self.commit(false);
                    if self.stats.failing.load(Ordering::Relaxed) {
                        // Probe the disk with a checkpoint: if it is written, the log works again.
                        self.checkpoint(true);
                    }
                }
                Err(RecvTimeoutError::Disconnected) => {
                    self.commit(true);
                    self.checkpoint(true);
                    return;
                }
            }
            self.checkpoint(false);
        }
    }

    /// Takes what is queued, up to a batch's bounds.
    fn drain(&mut self, rx: &Receiver<Msg>) {
        while self.waiters.len() < 65_536 && self.buf.len() < (8 << 20) {
            match rx.try_recv() {
                Ok(m) => self.take(m),
                Err(_) => break,
            }
        }
    }

    fn take(&mut self, m: Msg) {
        self.stats.in_queue.fetch_sub(1, Ordering::AcqRel);
        let Msg::Record(payload, waiter) = m;
        let seq = self.tail.next_seq;
        // A log that reached the last sequence number (only a crafted segment can get there) takes nothing more:
        // a wrapped number would chain a record to the wrong place.
        if seq == u64::MAX {
            let msg = format!("sequence numbers exhausted at {seq}: start a new log");
            tracing::error!(error = %msg, "accountability log record refused");
            *self.stats.last_error.lock().unwrap_or_else(|p| p.into_inner()) = Some(msg.clone());
            if let Some(w) = waiter {
                let _ = w.send(Err(AppendError::Failed(msg)));
            }
            return;
        }
        let (kind, payload) = match &self.cfg.encryption {
            None => (KIND_RECORD, payload),
            Some(key) => match key.seal(seq, &payload) {
                Ok(sealed) => (KIND_SEALED_RECORD, sealed),
                Err(e) => {
                    // Never write a record in clear that the operator asked to encrypt.
                    let msg = e.to_string();
                    tracing::error!(error = %msg, "accountability log record could not be encrypted");
                    *self.stats.last_error.lock().unwrap_or_else(|p| p.into_inner()) = Some(msg.clone());
                    if let Some(w) = waiter {
                        let _ = w.send(Err(AppendError::Failed(msg)));
                    }
                    return;
                }
            },
        };
        self.tail.prev = encode_frame(&mut self.buf, &self.tail.prev, kind, seq, &payload);
        self.tail.next_seq += 1;
        self.since_checkpoint += 1;
        if let Some(w) = waiter {
            self.waiters.push(w);
        }
        if self.tail.len + self.buf.len() as u64 >= self.cfg.segment_bytes {
            self.commit(true);
            self.roll();
        }
        if self.since_checkpoint >= self.cfg.checkpoint_records {
            self.checkpoint(true);
        }
    }

    fn fail(&mut self, e: &std::io::Error) {
        let msg = format!("{}: {e}", self.tail.path.display());
        tracing::error!(error = %msg, "accountability log write failed");
        *self.stats.last_error.lock().unwrap_or_else(|p| p.into_inner()) = Some(msg.clone());
        self.stats.failing.store(true, Ordering::Relaxed);
        for w in self.waiters.drain(..) {
            let _ = w.send(Err(AppendError::Failed(msg.clone())));
        }
    }

    /// Writes the buffer, syncs per policy (or when `force_sync`), releases waiters.
    fn commit(&mut self, force_sync: bool) {
        if !self.buf.is_empty() {
            if let Err(e) = self.tail.file.write_all(&self.buf) {
                self.fail(&e);
                // Drop what could not be written and continue the chain from the last written frame (a partial
                // write is cut as a torn tail on the next start).
                self.buf.clear();
                (self.tail.next_seq, self.tail.prev) = self.written;
                let _ = self.tail.file.set_len(self.tail.len);
                return;
            }
            self.written = (self.tail.next_seq, self.tail.prev);
            self.tail.len += self.buf.len() as u64;
            self.buf.clear();
            self.unsynced = true;
        }
        let sync = self.unsynced
            && (force_sync
                || match self.cfg.fsync {
                    Fsync::Batch => true,
                    Fsync::Interval(d) => self.last_sync.elapsed() >= d,
                    Fsync::Never => false,
                });
        if sync {
            if let Err(e) = self.tail.file.sync_data() {
                self.fail(&e);
                return;
            }
            self.last_sync = Instant::now();
            self.unsynced = false;
        }
        if sync || self.cfg.fsync != Fsync::Batch {
            self.stats.durable.store(self.tail.next_seq, Ordering::Relaxed);
            if self.stats.failing.swap(false, Ordering::Relaxed) {
                tracing::info!("accountability log writes recovered");
            }
            for w in self.waiters.drain(..) {
                let _ = w.send(Ok(()));
            }
        }
    }

    fn roll(&mut self) {
        let path = self.cfg.dir.join(segment_name(self.tail.next_seq));
        let opened = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .and_then(|mut f| {
                f.write_all(&header(self.tail.next_seq, &self.tail.prev))?;
                f.sync_all()?;
                Ok(f)
            });
        match opened {
            Ok(f) => {
                sync_dir(&self.cfg.dir);
                self.tail.file = f;
                self.tail.path = path;
                self.tail.len = HEADER_LEN as u64;
            }
            Err(e) => self.fail(&e),
        }
    }

    fn checkpoint(&mut self, force: bool) {
        let probing = self.stats.failing.load(Ordering::Relaxed);
        if (self.since_checkpoint == 0 && !probing) || self.tail.next_seq == 0 {
            return;
        }
        let due = force
            || self.since_checkpoint >= self.cfg.checkpoint_records
            || self.last_checkpoint.elapsed() >= self.cfg.checkpoint_interval;
        let Some(signer) = self.signer.clone() else { return };
        if !due {
            return;
        }
        let covers = self.tail.next_seq - 1;
        let head = self.tail.prev;
        let time = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs() as i64)
            .unwrap_or_default();
        let sig = match signer.sign(&checkpoint_message(covers, &head, time)) {
            None => return,
            Some(Err(e)) => {
                tracing::warn!(error = %e, "accountability log: cannot sign a checkpoint");
                return;
            }
            Some(Ok(s)) => s,
        };
        let b64 = base64::engine::general_purpose::STANDARD;
        let cp = Checkpoint {
            covers_seq: covers,
            head_hash: hex(&head),
            time,
            x5c: sig.chain.iter().map(|c| b64.encode(c)).collect(),
            scheme: sig.scheme,
            sig: b64.encode(&sig.signature),
        };
        let Ok(payload) = serde_json::to_vec(&cp) else {
            return;
        };
        let seq = self.tail.next_seq;
        if seq == u64::MAX {
            return;
        }
        self.tail.prev = encode_frame(&mut self.buf, &self.tail.prev, KIND_CHECKPOINT, seq, &payload);
        self.tail.next_seq += 1;
        self.since_checkpoint = 0;
        self.last_checkpoint = Instant::now();
        self.stats.checkpoints.fetch_add(1, Ordering::Relaxed);
        self.commit(true);
    }
}
