//! nginx and HAProxy as a sidecar pair, configured like the Trustline pair: the client side takes plaintext
//! HTTP/1.1 and opens pooled mutual-TLS 1.3 connections (presenting an X.509-SVID, verifying the server's against
//! the trust bundle and a DNS name); the server side requires and verifies a client certificate against the
//! bundle, refuses `/admin*` with 403, logs every request, and forwards plaintext to the backend over pooled
//! keep-alive connections. One worker thread each (`worker_processes 1`, `nbthread 1`), pinned with `taskset`.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::procstat::{children, Procs};

/// PEM files of one X.509-SVID.
#[derive(Debug, Clone)]
pub struct Certs {
    /// Certificate chain, leaf first.
    pub cert: PathBuf,
    /// PKCS#8 private key.
    pub key: PathBuf,
    /// Chain then key in one file (HAProxy's `crt`).
    pub combined: PathBuf,
    /// The trust bundle (CA certificates).
    pub bundle: PathBuf,
}

/// A running proxy process (killed on drop).
#[derive(Debug)]
pub struct Proxy {
    child: Option<Child>,
    /// Where it listens.
    pub listen: SocketAddr,
    /// The process ids to measure (nginx: master and worker).
    pub procs: Procs,
}

impl Drop for Proxy {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        // nginx's worker exits on its own once the master is gone; make sure of it.
        for &p in self.procs.pids.iter().skip(1) {
            let _ = Command::new("kill").arg("-KILL").arg(p.to_string()).status();
        }
    }
}

/// Waits until `addr` accepts TCP connections.
pub fn wait_listening(addr: SocketAddr, what: &str) {
    let t = Instant::now();
    while std::net::TcpStream::connect(addr).is_err() {
        assert!(
            t.elapsed() < Duration::from_secs(15),
            "{what} is not listening on {addr}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn spawn(cmd: &mut Command, out: &Path, listen: SocketAddr, what: &str) -> Proxy {
    let log = std::fs::File::create(out).unwrap();
    let child = cmd
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {what}: {e}"));
    let pid = child.id();
    let mut proxy = Proxy {
        child: Some(child),
        listen,
        procs: Procs { pids: vec![pid] },
    };
    if let Err(e) = std::panic::catch_unwind(|| wait_listening(listen, what)) {
        eprintln!(
            "{what} output:\n{}",
            std::fs::read_to_string(out).unwrap_or_default()
        );
        std::panic::resume_unwind(e);
    }
    proxy.procs.pids.extend(children(pid));
    proxy
}

const NGINX_COMMON: &str = "user root;\nworker_processes 1;\ndaemon off;\nmaster_process on;\nworker_rlimit_nofile 20000;\nevents {\n    worker_connections 16384;\n}\n";

fn nginx_http_common(dir: &Path) -> String {
    let d = dir.display();
    format!(
        "    client_body_temp_path {d}/body;\n    proxy_temp_path {d}/proxy;\n    fastcgi_temp_path {d}/fastcgi;\n    uwsgi_temp_path {d}/uwsgi;\n    scgi_temp_path {d}/scgi;\n    keepalive_requests 100000000;\n    keepalive_timeout 600s;\n    access_log {d}/access.log;\n"
    )
}

/// nginx as the client-side proxy: plaintext on `listen`, mutual TLS 1.3 to `upstream` (which must present a
/// certificate for `server_name`), a pool of keep-alive upstream connections.
pub fn nginx_client(
    dir: &Path,
    listen: SocketAddr,
    upstream: SocketAddr,
    certs: &Certs,
    server_name: &str,
) -> String {
    let mut c = String::from(NGINX_COMMON);
    c.push_str("http {\n");
    c.push_str(&nginx_http_common(dir));
    let _ = write!(
        c,
        "    upstream api {{\n        server {upstream};\n        keepalive 64;\n        keepalive_requests 100000000;\n        keepalive_timeout 600s;\n    }}\n    server {{\n        listen {listen};\n        location / {{\n            proxy_pass https://api;\n            proxy_http_version 1.1;\n            proxy_set_header Connection \"\";\n            proxy_ssl_protocols TLSv1.3;\n            proxy_ssl_certificate {cert};\n            proxy_ssl_certificate_key {key};\n            proxy_ssl_trusted_certificate {bundle};\n            proxy_ssl_verify on;\n            proxy_ssl_verify_depth 3;\n            proxy_ssl_name {server_name};\n            proxy_ssl_server_name on;\n        }}\n    }}\n}}\n",
        cert = certs.cert.display(),
        key = certs.key.display(),
        bundle = certs.bundle.display(),
    );
    c
}

/// nginx as the server-side proxy: mutual TLS 1.3 on `listen` (client certificate required and verified against
/// the bundle), 403 on `/admin*`, plaintext to `backend` over pooled keep-alive connections.
pub fn nginx_server(dir: &Path, listen: SocketAddr, backend: SocketAddr, certs: &Certs) -> String {
    let mut c = String::from(NGINX_COMMON);
    c.push_str("http {\n");
    c.push_str(&nginx_http_common(dir));
    let _ = write!(
        c,
        "    upstream app {{\n        server {backend};\n        keepalive 64;\n        keepalive_requests 100000000;\n        keepalive_timeout 600s;\n    }}\n    server {{\n        listen {listen} ssl;\n        ssl_protocols TLSv1.3;\n        ssl_certificate {cert};\n        ssl_certificate_key {key};\n        ssl_client_certificate {bundle};\n        ssl_verify_client on;\n        ssl_verify_depth 3;\n        location /admin {{\n            return 403;\n        }}\n        location / {{\n            proxy_pass http://app;\n            proxy_http_version 1.1;\n            proxy_set_header Connection \"\";\n            proxy_set_header X-Client-Verify $ssl_client_verify;\n        }}\n    }}\n}}\n",
        cert = certs.cert.display(),
        key = certs.key.display(),
        bundle = certs.bundle.display(),
    );
    c
}

/// Starts `nginx` with `conf` (written to `dir/nginx.conf`) pinned to `cpu`.
pub fn spawn_nginx(dir: &Path, conf: &str, listen: SocketAddr, cpu: usize) -> Proxy {
    std::fs::create_dir_all(dir).unwrap();
    let path = dir.join("nginx.conf");
    std::fs::write(&path, conf).unwrap();
    let mut cmd = Command::new("taskset");
    cmd.args(["-c", &cpu.to_string(), "nginx", "-p"])
        .arg(dir)
        .arg("-e")
        .arg(dir.join("error.log"))
        .arg("-c")
        .arg(&path);
    spawn(&mut cmd, &dir.join("stdout.log"), listen, "nginx")
}

const HAPROXY_COMMON: &str = "global\n    nbthread 1\n    maxconn 9000\n    log stdout format raw local0\n    ssl-default-bind-options ssl-min-ver TLSv1.3\n    ssl-default-server-options ssl-min-ver TLSv1.3\ndefaults\n    mode http\n    log global\n    option httplog\n    option http-keep-alive\n    http-reuse always\n    timeout connect 5s\n    timeout client 600s\n    timeout server 600s\n    timeout http-request 30s\n    timeout http-keep-alive 600s\n";

/// HAProxy as the client-side proxy (see [`nginx_client`]).
pub fn haproxy_client(listen: SocketAddr, upstream: SocketAddr, certs: &Certs, server_name: &str) -> String {
    let mut c = String::from(HAPROXY_COMMON);
    let _ = write!(
        c,
        "frontend out\n    bind {listen}\n    default_backend api\nbackend api\n    server api {upstream} ssl ssl-min-ver TLSv1.3 crt {crt} ca-file {bundle} verify required verifyhost {server_name}\n",
        crt = certs.combined.display(),
        bundle = certs.bundle.display(),
    );
    c
}

/// HAProxy as the server-side proxy (see [`nginx_server`]).
pub fn haproxy_server(listen: SocketAddr, backend: SocketAddr, certs: &Certs) -> String {
    let mut c = String::from(HAPROXY_COMMON);
    let _ = write!(
        c,
        "frontend in\n    bind {listen} ssl ssl-min-ver TLSv1.3 crt {crt} ca-file {bundle} verify required\n    http-request deny deny_status 403 if {{ path_beg /admin }}\n    http-request set-header X-Client-Verify %[ssl_c_verify]\n    default_backend app\nbackend app\n    server app {backend}\n",
        crt = certs.combined.display(),
        bundle = certs.bundle.display(),
    );
    c
}

/// The floor: HAProxy as a plain TCP relay on both sides (`mode tcp`, no TLS, no HTTP parsing, no log), chained
/// `listen` → `next`. Each client connection gets its own upstream connection, so a keep-alive request crosses the
/// same loopback sockets, with the same reads and writes, as through the proxy pairs. What it reaches bounds what
/// any proxy pair can reach on this machine: all it does per request is the kernel's work plus a copy.
pub fn haproxy_tcp_relay(listen: SocketAddr, next: SocketAddr) -> String {
    format!(
        "global\n    nbthread 1\n    maxconn 9000\ndefaults\n    mode tcp\n    timeout connect 5s\n    timeout client 600s\n    timeout server 600s\nfrontend relay\n    bind {listen}\n    default_backend next\nbackend next\n    server next {next}\n"
    )
}

/// Starts `haproxy` in the foreground with `conf` (written to `dir/haproxy.cfg`) pinned to `cpu`; its request log
/// (stdout) goes to `dir/access.log`.
pub fn spawn_haproxy(dir: &Path, conf: &str, listen: SocketAddr, cpu: usize) -> Proxy {
    std::fs::create_dir_all(dir).unwrap();
    let path = dir.join("haproxy.cfg");
    std::fs::write(&path, conf).unwrap();
    let mut cmd = Command::new("taskset");
    cmd.args(["-c", &cpu.to_string(), "haproxy", "-db", "-f"])
        .arg(&path);
    spawn(&mut cmd, &dir.join("access.log"), listen, "haproxy")
}
