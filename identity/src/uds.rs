//! Binding the Unix sockets Trustline serves on (CA admin socket, agent Workload API and HTTP API).

use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixListener;
use std::path::Path;

/// Binds `path`: creates its folder with `dir_mode` if missing, replaces a stale socket file left by a crash
/// (refusing one a live process still answers on), sets the socket's mode to `socket_mode`, and returns a
/// non-blocking listener ready for `tokio::net::UnixListener::from_std`.
pub fn bind(path: &Path, dir_mode: u32, socket_mode: u32) -> std::io::Result<UnixListener> {
    if let Some(dir) = path.parent() {
        if !dir.as_os_str().is_empty() && !dir.exists() {
            std::fs::create_dir_all(dir)?;
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(dir_mode))?;
        }
    }
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::AddrInUse,
                format!("{} is in use by a running process", path.display()),
            ));
        }
        std::fs::remove_file(path)?;
    }
    let listener = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(socket_mode))?;
    listener.set_nonblocking(true)?;
    Ok(listener)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_a_live_socket_replaces_a_stale_one_and_sets_modes() {
        let dir = std::env::temp_dir().join(format!("tl-uds-{}", std::process::id()));
        let path = dir.join("sub/x.sock");
        let l = bind(&path, 0o700, 0o600).unwrap();
        assert_eq!(
            std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert_eq!(
            std::fs::metadata(dir.join("sub")).unwrap().permissions().mode() & 0o777,
            0o700
        );
        let err = bind(&path, 0o700, 0o600).unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::AddrInUse);
        drop(l);
        bind(&path, 0o700, 0o666).unwrap();
        assert_eq!(
            std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o666
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
