//! Who owns a loopback TCP connection: the kernel's socket tables, not anything the caller sends.
//!
//! For a connection accepted on our loopback listener, the client's end is a socket in `/proc/net/tcp` (or
//! `tcp6`) whose local address is the connection's peer address and whose remote address is our listening
//! address. That line gives the socket's owner uid and inode; the process holding the inode is found by scanning
//! `/proc/<pid>/fd` for `socket:[inode]`.
//!
//! Trade-off (documented for operators): any local process can connect, and it is identified only as well as these
//! tables allow. Reading other users' `/proc/<pid>/fd` needs the agent to run as root (or with
//! CAP_DAC_READ_SEARCH); without it the uid is still known but path/sha256 selectors are not. A process in another
//! network namespace does not appear in our tables and is refused. Prefer the Unix socket.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use crate::attest::PeerCred;

/// Parses a `/proc/net/tcp{,6}` address (`0100007F:1F90`, or 32 hex digits for IPv6).
pub fn parse_proc_addr(s: &str) -> Option<SocketAddr> {
    let (ip, port) = s.split_once(':')?;
    let port = u16::from_str_radix(port, 16).ok()?;
    let ip = match ip.len() {
        8 => IpAddr::V4(Ipv4Addr::from(u32::from_str_radix(ip, 16).ok()?.swap_bytes())),
        32 => {
            // Four 32-bit words, each in host (little-endian) byte order.
            let mut bytes = [0u8; 16];
            for (w, chunk) in ip.as_bytes().chunks(8).enumerate() {
                let word = u32::from_str_radix(std::str::from_utf8(chunk).ok()?, 16).ok()?;
                bytes[w * 4..w * 4 + 4].copy_from_slice(&word.swap_bytes().to_be_bytes());
            }
            IpAddr::V6(Ipv6Addr::from(bytes))
        }
        _ => return None,
    };
    Some(SocketAddr::new(ip, port))
}

fn same(a: SocketAddr, b: SocketAddr) -> bool {
    let canon = |s: SocketAddr| match s.ip() {
        IpAddr::V6(v6) => v6
            .to_ipv4_mapped()
            .map_or(s, |v4| SocketAddr::new(IpAddr::V4(v4), s.port())),
        IpAddr::V4(_) => s,
    };
    canon(a) == canon(b)
}

/// Finds (uid, inode) of the socket whose local end is `client` and remote end is `server`.
pub fn find_socket(client: SocketAddr, server: SocketAddr) -> Option<(u32, u64)> {
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(text) = std::fs::read_to_string(table) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() < 10 {
                continue;
            }
            let (Some(local), Some(remote)) = (parse_proc_addr(f[1]), parse_proc_addr(f[2])) else {
                continue;
            };
            if same(local, client) && same(remote, server) {
                return Some((f[7].parse().ok()?, f[9].parse().ok()?));
            }
        }
    }
    None
}

/// Finds the process holding socket `inode`.
pub fn find_pid(inode: u64) -> Option<i32> {
    let want = format!("socket:[{inode}]");
    for proc_entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let Some(pid) = proc_entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<i32>().ok())
        else {
            continue;
        };
        let Ok(fds) = std::fs::read_dir(proc_entry.path().join("fd")) else {
            continue;
        };
        for fd in fds.flatten() {
            if std::fs::read_link(fd.path()).is_ok_and(|t| t.as_os_str() == want.as_str()) {
                return Some(pid);
            }
        }
    }
    None
}

fn gid_of(pid: i32) -> Option<u32> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find(|l| l.starts_with("Gid:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// The kernel credentials of the client at `client` connected to our `server` address.
pub fn owner(client: SocketAddr, server: SocketAddr) -> Option<PeerCred> {
    let (uid, inode) = find_socket(client, server)?;
    let pid = find_pid(inode);
    let gid = pid.and_then(gid_of).unwrap_or(u32::MAX);
    Some(PeerCred { uid, gid, pid })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn parses_proc_addresses() {
        assert_eq!(
            parse_proc_addr("0100007F:1F90"),
            Some("127.0.0.1:8080".parse().unwrap())
        );
        assert_eq!(
            parse_proc_addr("00000000000000000000000001000000:0050"),
            Some("[::1]:80".parse().unwrap())
        );
        assert_eq!(parse_proc_addr("zz"), None);
    }

    #[test]
    fn finds_the_owner_of_a_real_loopback_connection() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let server = listener.local_addr().unwrap();
        let client = std::net::TcpStream::connect(server).unwrap();
        let (_accepted, peer) = listener.accept().unwrap();
        assert_eq!(peer, client.local_addr().unwrap());
        let cred = owner(peer, server).expect("owner found");
        assert_eq!(cred.uid, std::fs::metadata("/proc/self").unwrap().uid());
        assert_eq!(cred.pid, Some(std::process::id() as i32));
    }
}
