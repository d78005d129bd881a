//! Workload attestation from kernel facts.
//!
//! The caller's uid, gid and pid come from SO_PEERCRED on the Unix socket (the kernel fills them in; the caller
//! cannot choose them). From the pid the agent reads `/proc/<pid>/exe` (the binary's path) and hashes that binary
//! (cached by device, inode, size and mtime). User and group names come from `/etc/passwd` and `/etc/group`.
//! To guard against pid reuse, the process start time is read before and after, and the uid is re-checked: if the
//! process changed in between, attestation fails.

use std::collections::HashMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use trustline_identity::Selector;

/// Why a caller could not be attested.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AttestError {
    /// The connection carried no peer credentials.
    #[error("no peer credentials on the connection")]
    NoCredentials,
    /// The process went away or was replaced while being attested.
    #[error("process {pid} exited or was replaced during attestation")]
    ProcessChanged {
        /// The pid.
        pid: i32,
    },
    /// /proc could not be read.
    #[error("reading /proc/{pid}: {source}")]
    Proc {
        /// The pid.
        pid: i32,
        /// The I/O error.
        source: std::io::Error,
    },
}

/// Kernel-reported credentials of a caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerCred {
    /// User id.
    pub uid: u32,
    /// Group id.
    pub gid: u32,
    /// Process id (None when the kernel did not report one).
    pub pid: Option<i32>,
}

#[derive(Clone, Copy, PartialEq, Eq, Hash)]
struct FileKey {
    dev: u64,
    ino: u64,
    size: u64,
    mtime: i64,
    mtime_nsec: i64,
}

/// A parsed `/etc/passwd` or `/etc/group`, reloaded when the file's mtime or size changes.
#[derive(Default)]
struct NameFile {
    stamp: Option<(i64, i64, u64)>,
    names: HashMap<u32, String>,
}

impl NameFile {
    fn lookup(&mut self, file: &str, id: u32) -> Option<String> {
        let meta = std::fs::metadata(file).ok()?;
        let stamp = (meta.mtime(), meta.mtime_nsec(), meta.size());
        if self.stamp != Some(stamp) {
            let text = std::fs::read_to_string(file).ok()?;
            self.names = text
                .lines()
                .filter_map(|l| {
                    let mut parts = l.split(':');
                    let name = parts.next()?;
                    let _pw = parts.next()?;
                    let num: u32 = parts.next()?.parse().ok()?;
                    Some((num, name.to_owned()))
                })
                .rev() // the first line for an id wins, as getpwuid does
                .collect();
            self.stamp = Some(stamp);
        }
        self.names.get(&id).cloned()
    }
}

/// What identifies a running program for the attestation cache: the kernel credentials, the process start time
/// (pid reuse changes it) and the executable's device and inode (`exec` changes them).
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
struct ProcKey {
    uid: u32,
    gid: u32,
    pid: i32,
    start: u64,
    dev: u64,
    ino: u64,
}

/// How long cached selectors are trusted before a full attestation (so /etc/passwd changes show within it).
const ATTEST_CACHE_TTL: std::time::Duration = std::time::Duration::from_secs(5);

/// The attestor, with its attestation, binary-hash and name caches.
#[derive(Default)]
pub struct Attestor {
    hashes: Mutex<HashMap<FileKey, String>>,
    users: Mutex<NameFile>,
    groups: Mutex<NameFile>,
    recent: Mutex<HashMap<ProcKey, (std::time::Instant, Vec<Selector>)>>,
}

impl std::fmt::Debug for Attestor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Attestor")
    }
}

const HASH_CACHE_MAX: usize = 4096;

fn start_time(pid: i32) -> Result<u64, AttestError> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map_err(|source| AttestError::Proc { pid, source })?;
    // Field 22 (starttime); the command name (field 2) may contain spaces, so count after the last ')'.
    let after = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    after
        .split_whitespace()
        .nth(19)
        .and_then(|v| v.parse().ok())
        .ok_or(AttestError::ProcessChanged { pid })
}

fn proc_uid(pid: i32) -> Result<u32, AttestError> {
    let meta =
        std::fs::metadata(format!("/proc/{pid}")).map_err(|source| AttestError::Proc { pid, source })?;
    Ok(meta.uid())
}

impl Attestor {
    /// Derives the selectors of the caller with credentials `cred`. A caller attested in the last
    /// [`ATTEST_CACHE_TTL`] is re-validated with three reads (start time, executable inode, owner uid) instead of
    /// a full attestation; any difference (pid reuse, `exec`, uid change) forces the full one.
    pub fn attest(&self, cred: PeerCred) -> Result<Vec<Selector>, AttestError> {
        let Some(pid) = cred.pid.filter(|p| *p > 0) else {
            return self.attest_full(cred);
        };
        let start = start_time(pid)?;
        let exe = std::fs::metadata(format!("/proc/{pid}/exe"))
            .map_err(|source| AttestError::Proc { pid, source })?;
        let key = ProcKey {
            uid: cred.uid,
            gid: cred.gid,
            pid,
            start,
            dev: exe.dev(),
            ino: exe.ino(),
        };
        if let Some((at, sel)) = self.recent.lock().unwrap_or_else(|p| p.into_inner()).get(&key) {
            if at.elapsed() < ATTEST_CACHE_TTL && proc_uid(pid)? == cred.uid {
                return Ok(sel.clone());
            }
        }
        let sel = self.attest_full(cred)?;
        let mut recent = self.recent.lock().unwrap_or_else(|p| p.into_inner());
        if recent.len() >= HASH_CACHE_MAX {
            recent.retain(|_, (at, _)| at.elapsed() < ATTEST_CACHE_TTL);
            if recent.len() >= HASH_CACHE_MAX {
                recent.clear();
            }
        }
        recent.insert(key, (std::time::Instant::now(), sel.clone()));
        Ok(sel)
    }

    fn attest_full(&self, cred: PeerCred) -> Result<Vec<Selector>, AttestError> {
        let mut out = Vec::with_capacity(6);
        let push = |out: &mut Vec<Selector>, key: &str, v: &str| {
            if let Ok(s) = Selector::new("unix", &format!("{key}:{v}")) {
                out.push(s);
            }
        };
        push(&mut out, "uid", &cred.uid.to_string());
        push(&mut out, "gid", &cred.gid.to_string());
        let user = self
            .users
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .lookup("/etc/passwd", cred.uid);
        if let Some(u) = user {
            push(&mut out, "user", &u);
        }
        let group = self
            .groups
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .lookup("/etc/group", cred.gid);
        if let Some(g) = group {
            push(&mut out, "group", &g);
        }
        if let Some(pid) = cred.pid.filter(|p| *p > 0) {
            let before = start_time(pid)?;
            let exe = std::fs::read_link(format!("/proc/{pid}/exe"))
                .map_err(|source| AttestError::Proc { pid, source })?;
            let hash = self.hash_binary(pid, &exe)?;
            // The same process must still be there, owned by the same uid.
            if start_time(pid)? != before || proc_uid(pid)? != cred.uid {
                return Err(AttestError::ProcessChanged { pid });
            }
            push(&mut out, "path", &exe.to_string_lossy());
            if let Some(h) = hash {
                push(&mut out, "sha256", &h);
            }
        }
        out.sort();
        Ok(out)
    }

    fn hash_binary(&self, pid: i32, exe: &Path) -> Result<Option<String>, AttestError> {
        // Open through /proc so we hash the very file the process runs, even if its path was replaced.
        let proc_exe = PathBuf::from(format!("/proc/{pid}/exe"));
        let meta = match std::fs::metadata(&proc_exe) {
            Ok(m) => m,
            Err(_) => return Ok(None),
        };
        let key = FileKey {
            dev: meta.dev(),
            ino: meta.ino(),
            size: meta.size(),
            mtime: meta.mtime(),
            mtime_nsec: meta.mtime_nsec(),
        };
        if let Some(h) = self.hashes.lock().unwrap_or_else(|p| p.into_inner()).get(&key) {
            return Ok(Some(h.clone()));
        }
        let bytes = match std::fs::read(&proc_exe) {
            Ok(b) => b,
            Err(e) => {
                tracing::debug!(exe = %exe.display(), error = %e, "cannot read binary for sha256 selector");
                return Ok(None);
            }
        };
        let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, &bytes);
        let hex: String = digest.as_ref().iter().map(|b| format!("{b:02x}")).collect();
        let mut cache = self.hashes.lock().unwrap_or_else(|p| p.into_inner());
        if cache.len() >= HASH_CACHE_MAX {
            cache.clear();
        }
        cache.insert(key, hex.clone());
        Ok(Some(hex))
    }
}

/// Whether an entry with `entry_selectors` applies to a workload with `workload_selectors`: every selector of the
/// entry must be among the workload's (SPIRE's semantics).
pub fn matches(entry_selectors: &[Selector], workload_selectors: &[Selector]) -> bool {
    !entry_selectors.is_empty() && entry_selectors.iter().all(|s| workload_selectors.contains(s))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attests_this_process_from_proc() {
        let a = Attestor::default();
        let me = std::process::id() as i32;
        let uid = std::fs::metadata("/proc/self").unwrap().uid();
        let gid = std::fs::metadata("/proc/self").unwrap().gid();
        let sel = a
            .attest(PeerCred {
                uid,
                gid,
                pid: Some(me),
            })
            .unwrap();
        let text: Vec<String> = sel.iter().map(ToString::to_string).collect();
        assert!(text.contains(&format!("unix:uid:{uid}")), "{text:?}");
        let exe = std::fs::read_link("/proc/self/exe").unwrap();
        assert!(text.contains(&format!("unix:path:{}", exe.display())), "{text:?}");
        let bytes = std::fs::read(&exe).unwrap();
        let d = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, &bytes);
        let hex: String = d.as_ref().iter().map(|b| format!("{b:02x}")).collect();
        assert!(text.contains(&format!("unix:sha256:{hex}")));
        // Cached the second time, same answer.
        assert_eq!(
            a.attest(PeerCred {
                uid,
                gid,
                pid: Some(me)
            })
            .unwrap(),
            sel
        );
    }

    #[test]
    fn cached_attestation_notices_a_different_program_at_the_same_pid() {
        // Another process (different start time and binary) is a different key: never served from the cache.
        let a = Attestor::default();
        let uid = std::fs::metadata("/proc/self").unwrap().uid();
        let gid = std::fs::metadata("/proc/self").unwrap().gid();
        let mut child = std::process::Command::new("sleep").arg("5").spawn().unwrap();
        let pid = child.id() as i32;
        let first = a
            .attest(PeerCred {
                uid,
                gid,
                pid: Some(pid),
            })
            .unwrap();
        let again = a
            .attest(PeerCred {
                uid,
                gid,
                pid: Some(pid),
            })
            .unwrap();
        assert_eq!(first, again);
        assert!(
            first.iter().any(|s| s.to_string().ends_with("/sleep")),
            "{first:?}"
        );
        let me = a
            .attest(PeerCred {
                uid,
                gid,
                pid: Some(std::process::id() as i32),
            })
            .unwrap();
        assert_ne!(me, first);
        let _ = child.kill();
        let _ = child.wait();
        // Gone: attestation fails rather than answering from the cache.
        assert!(a
            .attest(PeerCred {
                uid,
                gid,
                pid: Some(pid)
            })
            .is_err());
    }

    #[test]
    fn a_wrong_uid_for_the_pid_is_refused() {
        let a = Attestor::default();
        let me = std::process::id() as i32;
        let uid = std::fs::metadata("/proc/self").unwrap().uid();
        let err = a
            .attest(PeerCred {
                uid: uid.wrapping_add(1),
                gid: 0,
                pid: Some(me),
            })
            .unwrap_err();
        assert!(matches!(err, AttestError::ProcessChanged { .. }));
    }

    #[test]
    fn matching_needs_every_entry_selector() {
        let s = |x: &str| x.parse::<Selector>().unwrap();
        let w = vec![
            s("unix:uid:1000"),
            s("unix:gid:1000"),
            s("unix:path:/usr/bin/app"),
        ];
        assert!(matches(&[s("unix:uid:1000")], &w));
        assert!(matches(&[s("unix:uid:1000"), s("unix:path:/usr/bin/app")], &w));
        assert!(!matches(&[s("unix:uid:1000"), s("unix:path:/usr/bin/other")], &w));
        assert!(!matches(&[], &w));
    }
}
