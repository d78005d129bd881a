//! How every long-running Trustline program starts and stops: signal handlers that are in place before the
//! program says it is ready, and children that never outlive the supervisor that started them.
//!
//! - [`Shutdown::install`] registers SIGINT and SIGTERM at once, not when a future is first polled: a signal that
//!   arrives right after a readiness line (or while a supervisor is still starting its children) is caught and
//!   leads to an orderly stop instead of the default action, which kills the process and orphans its children.
//! - [`exit_with_parent`] is for programs that a supervisor (`trustline up`) starts: it asks the kernel to send
//!   SIGTERM when the parent dies, so even a `kill -9` of the supervisor leaves no agent or sidecar behind.

use tokio::signal::unix::{signal, Signal, SignalKind};

/// The environment variable through which a supervisor names itself to the programs it starts (its pid).
pub const PARENT_PID_ENV: &str = "TRUSTLINE_PARENT_PID";

/// SIGINT and SIGTERM, caught from the moment [`install`](Self::install) returns.
#[derive(Debug)]
pub struct Shutdown {
    interrupt: Signal,
    terminate: Signal,
}

impl Shutdown {
    /// Registers the handlers now. Must be called inside a tokio runtime (it registers with its driver).
    pub fn install() -> std::io::Result<Self> {
        Ok(Self {
            interrupt: signal(SignalKind::interrupt())?,
            terminate: signal(SignalKind::terminate())?,
        })
    }

    /// Waits for the next SIGINT or SIGTERM (one delivered since [`install`](Self::install) counts) and names it.
    pub async fn recv(&mut self) -> &'static str {
        tokio::select! {
            _ = self.interrupt.recv() => "SIGINT",
            _ = self.terminate.recv() => "SIGTERM",
        }
    }

    /// [`recv`](Self::recv) as an owned future, for servers that take a shutdown future.
    pub async fn wait(mut self) {
        self.recv().await;
    }
}

/// Why a supervised program refuses to run.
#[derive(Debug, thiserror::Error)]
pub enum ParentError {
    /// The variable does not hold a pid.
    #[error("{PARENT_PID_ENV}={value:?}: not a process id")]
    NotAPid {
        /// The variable's value.
        value: String,
    },
    /// The kernel refused the request.
    #[error("{PARENT_PID_ENV}: cannot ask the kernel to stop this process with its parent: {0}")]
    Prctl(nix::Error),
    /// The supervisor died before this process could tie itself to it.
    #[error(
        "{PARENT_PID_ENV}={expected}: the parent that started this process is gone (parent is now {actual})"
    )]
    ParentGone {
        /// The pid the supervisor gave.
        expected: i32,
        /// The parent this process has now (the one it was re-parented to).
        actual: i32,
    },
}

/// If a supervisor started this process (`TRUSTLINE_PARENT_PID` is set), asks the kernel to send SIGTERM when the
/// parent dies (`PR_SET_PDEATHSIG`), then checks that the parent is still the one named: a supervisor that died
/// between starting this process and this call would otherwise leave it running forever. Without the variable it
/// does nothing. Call it first thing in `main`.
pub fn exit_with_parent() -> Result<(), ParentError> {
    let Some(value) = std::env::var_os(PARENT_PID_ENV) else {
        return Ok(());
    };
    let value = value.to_string_lossy().into_owned();
    let expected: i32 = value
        .parse()
        .ok()
        .filter(|p| *p > 0)
        .ok_or(ParentError::NotAPid { value })?;
    nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGTERM).map_err(ParentError::Prctl)?;
    let actual = nix::unistd::getppid().as_raw();
    if actual != expected {
        return Err(ParentError::ParentGone { expected, actual });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[tokio::test]
    async fn a_signal_sent_after_install_and_before_the_first_poll_is_caught() {
        let mut s = Shutdown::install().unwrap();
        // Delivered before anything awaits: with a lazily registered handler this would kill the test process.
        nix::sys::signal::raise(nix::sys::signal::Signal::SIGTERM).unwrap();
        assert_eq!(s.recv().await, "SIGTERM");
    }
}
