//! Test support: a throwaway swtpm (TPM 2.0 simulator) on loopback. Used by this crate's tests, the CA and agent
//! end-to-end tests and the signature benchmark; compiled in every build so tests need no feature to name it.

use crate::HsmError;

/// A swtpm on free loopback ports with its state in a folder, killed on drop.
pub struct Swtpm {
    child: std::process::Child,
    dir: std::path::PathBuf,
    /// The server port (the control port is the next one).
    pub port: u16,
}

impl Swtpm {
    /// Starts swtpm (`swtpm socket --tpm2 … --flags startup-clear`) with its state in `dir`; waits until it
    /// answers.
    pub fn start(dir: &std::path::Path) -> Result<Self, HsmError> {
        std::fs::create_dir_all(dir).map_err(|source| HsmError::Io {
            path: dir.to_owned(),
            source,
        })?;
        for _ in 0..20 {
            let port = free_port_pair()?;
            if let Some(child) = spawn_swtpm(dir, port)? {
                return Ok(Self {
                    child,
                    dir: dir.to_owned(),
                    port,
                });
            }
        }
        Err(HsmError::Tpm("swtpm did not start".into()))
    }

    /// The TCTI string for this swtpm.
    pub fn tcti(&self) -> String {
        format!("swtpm:host=127.0.0.1,port={}", self.port)
    }

    /// Kills swtpm (the TPM "disappears"); its state stays in the directory.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Starts swtpm again on the same ports and state (the TPM "returns").
    pub fn restart(&mut self) -> Result<(), HsmError> {
        self.kill();
        for _ in 0..100 {
            if let Some(child) = spawn_swtpm(&self.dir, self.port)? {
                self.child = child;
                return Ok(());
            }
            // The port may still be held by the killed process's sockets for a moment.
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        Err(HsmError::Tpm(format!(
            "swtpm did not restart on port {}",
            self.port
        )))
    }
}

/// Spawns swtpm on `port` (and `port + 1` for control) and waits until it answers; `None` when it exited (a port
/// taken or still in TIME_WAIT) or did not answer within a minute (generous: a busy machine starts it slowly, and
/// one that exits says so at once).
fn spawn_swtpm(dir: &std::path::Path, port: u16) -> Result<Option<std::process::Child>, HsmError> {
    let mut child = std::process::Command::new("swtpm")
        .args(["socket", "--tpm2", "--flags", "startup-clear"])
        .arg("--server")
        .arg(format!("type=tcp,port={port},bindaddr=127.0.0.1"))
        .arg("--ctrl")
        .arg(format!("type=tcp,port={},bindaddr=127.0.0.1", port + 1))
        .arg("--tpmstate")
        .arg(format!("dir={}", dir.display()))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .map_err(|source| HsmError::Io {
            path: "swtpm".into(),
            source,
        })?;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while std::time::Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return Ok(None);
        }
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return Ok(Some(child));
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
    Ok(None)
}

impl Drop for Swtpm {
    fn drop(&mut self) {
        self.kill();
    }
}

fn free_port_pair() -> Result<u16, HsmError> {
    for _ in 0..50 {
        let l = std::net::TcpListener::bind("127.0.0.1:0").map_err(|source| HsmError::Io {
            path: "127.0.0.1:0".into(),
            source,
        })?;
        let port = l.local_addr().map(|a| a.port()).unwrap_or(0);
        if port != 0 && port < u16::MAX && std::net::TcpListener::bind(("127.0.0.1", port + 1)).is_ok() {
            return Ok(port);
        }
    }
    Err(HsmError::Tpm("no free pair of loopback ports for swtpm".into()))
}
