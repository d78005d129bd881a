//! The policy set in force, hot-reloaded from its folder.
//!
//! The folder is fingerprinted (file names and contents) every `policy_reload_interval` and on SIGHUP. A change
//! is parsed whole; only a fully valid folder replaces the set in force, atomically (requests in flight keep the
//! set they started with). An invalid change is logged with file:line:column and the field at fault, counted
//! in `trustline_sidecar_policy_reloads_total{result="rejected"}`, and the last good set stays in force.

use std::hash::{Hash as _, Hasher as _};
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use crate::metrics::Metrics;
use crate::policy::{PolicyError, PolicySet};

/// The current policy set.
#[derive(Debug)]
pub struct PolicyStore {
    dir: Option<PathBuf>,
    current: RwLock<Arc<PolicySet>>,
    fingerprint: RwLock<u64>,
}

/// Hashes the names and contents of the policy files of `dir` (what [`PolicySet::load_dir`] reads).
fn fingerprint(dir: &Path) -> std::io::Result<u64> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "yaml" || x == "yml"))
        .collect();
    files.sort();
    let mut h = std::collections::hash_map::DefaultHasher::new();
    for f in files {
        f.hash(&mut h);
        std::fs::read(&f)?.hash(&mut h);
    }
    Ok(h.finish())
}

impl PolicyStore {
    /// Loads `dir` (must be valid at start) or, without a folder, an empty set (every authenticated peer allowed).
    pub fn load(dir: Option<PathBuf>) -> Result<Self, PolicyError> {
        let (set, fp) = match &dir {
            Some(d) => {
                let fp = fingerprint(d).map_err(|source| PolicyError::Io {
                    path: d.clone(),
                    source,
                })?;
                (PolicySet::load_dir(d)?, fp)
            }
            None => (PolicySet::default(), 0),
        };
        Ok(Self {
            dir,
            current: RwLock::new(Arc::new(set)),
            fingerprint: RwLock::new(fp),
        })
    }

    /// The set in force.
    pub fn get(&self) -> Arc<PolicySet> {
        self.current.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Re-reads the folder if it changed. `Ok(true)`: a new set is in force; `Ok(false)`: nothing changed;
    /// `Err`: the change was refused and the previous set stays.
    pub fn reload(&self) -> Result<bool, PolicyError> {
        let Some(dir) = &self.dir else { return Ok(false) };
        let fp = fingerprint(dir).map_err(|source| PolicyError::Io {
            path: dir.clone(),
            source,
        })?;
        if fp == *self.fingerprint.read().unwrap_or_else(|p| p.into_inner()) {
            return Ok(false);
        }
        // Remember the fingerprint either way, so a bad file is reported once, not every interval.
        *self.fingerprint.write().unwrap_or_else(|p| p.into_inner()) = fp;
        let set = PolicySet::load_dir(dir)?;
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(set);
        Ok(true)
    }

    /// Checks the folder every `interval` and on SIGHUP, until the store is dropped.
    pub fn watch(self: &Arc<Self>, interval: Duration, metrics: Arc<Metrics>) {
        if self.dir.is_none() {
            return;
        }
        metrics.reload(true, self.get().policies.len());
        let weak = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
            let mut tick = tokio::time::interval(interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                match hup.as_mut() {
                    Some(h) => {
                        tokio::select! {
                            _ = tick.tick() => {}
                            _ = h.recv() => {}
                        }
                    }
                    None => {
                        tick.tick().await;
                    }
                }
                let Some(store) = weak.upgrade() else { return };
                match store.reload() {
                    Ok(false) => {}
                    Ok(true) => {
                        let n = store.get().policies.len();
                        metrics.reload(true, n);
                        tracing::info!(policies = n, "policy reloaded");
                    }
                    Err(e) => {
                        metrics.reload(false, 0);
                        tracing::error!(error = %e, "policy change refused; the previous policy stays in force");
                    }
                }
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALLOW_A: &str = "name: allow-a\naction: ALLOW\nrules:\n  - from:\n      - source:\n          principals: [\"spiffe://t/a\"]\n";

    #[test]
    fn a_bad_change_keeps_the_last_good_set() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("a.yaml"), ALLOW_A).unwrap();
        let s = PolicyStore::load(Some(d.path().to_owned())).unwrap();
        assert_eq!(s.get().policies.len(), 1);
        assert!(!s.reload().unwrap(), "unchanged folder");
        std::fs::write(d.path().join("b.yaml"), "name: b\naction: MAYBE\n").unwrap();
        let e = s.reload().unwrap_err().to_string();
        assert!(e.contains("b.yaml:2:"), "{e}");
        assert_eq!(s.get().policies.len(), 1, "old set stays");
        assert!(!s.reload().unwrap(), "the same bad change is reported once");
        std::fs::write(d.path().join("b.yaml"), "name: b\naction: DENY\nrules: [{}]\n").unwrap();
        assert!(s.reload().unwrap());
        assert_eq!(s.get().policies.len(), 2);
    }
}
