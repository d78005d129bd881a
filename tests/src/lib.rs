//! Support for Trustline's end-to-end tests: start real binaries on loopback (port 0, temp dirs), wait for their
//! readiness line, talk to them, and stop them when the handle is dropped.

#![forbid(unsafe_code)]
#![allow(clippy::unwrap_used, clippy::expect_used)]

pub mod mesh;

/// The test-only gRPC service `trustline.test.v1.Echo` (`proto/echo.proto`).
pub mod echo {
    #![allow(missing_docs, clippy::all)]
    tonic::include_proto!("trustline.test.v1");
}

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use trustline_identity::spiffe_id::{SpiffeId, TrustDomain};
use trustline_identity::tls::{client_config, ExpectedPeer, RotatingCert, SpiffeServerVerifier, TrustBundle};
use trustline_proto::agent::agent_client::AgentClient;

/// How long a process gets to print its readiness line.
pub const READY_TIMEOUT: Duration = Duration::from_secs(60);

/// How long a test waits for something that happens on its own (a reload, a rotation, a reconnect, a log line, a
/// process stopping). An upper bound only, generous for a loaded machine: a fast one goes on as soon as it happens.
pub const PATIENCE: Duration = Duration::from_secs(60);

/// Path of a workspace binary (built by `cargo build --workspace --bins`, which `scripts/test.sh` runs first).
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    // target/<profile>/deps/<test> -> target/<profile>/<name>
    let dir = exe.parent().and_then(Path::parent).expect("target dir");
    let p = dir.join(name);
    assert!(
        p.exists(),
        "{} is missing: build it with `cargo build --workspace --bins` (scripts/test.sh does)",
        p.display()
    );
    p
}

/// Polls `f` until it returns `Some`, or panics after `patience` with `what`.
pub async fn eventually<T, F, Fut>(patience: Duration, what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let start = Instant::now();
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(
            start.elapsed() < patience,
            "timed out after {patience:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Spawns `cmd`, collects its stderr into a log buffer, and waits (bounded) for a stdout line starting with
/// `prefix`. Returns the child, that line, and the logs.
pub fn spawn_ready(mut cmd: Command, prefix: &str) -> (Child, String, Arc<std::sync::Mutex<Vec<String>>>) {
    cmd.env("TRUSTLINE_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    // A binary copied by a test can briefly be "text file busy" while another test thread forks with the
    // copy's descriptor still open (until that child execs, which a loaded machine may delay): retry.
    let started = Instant::now();
    let mut child = loop {
        match cmd.spawn() {
            Ok(c) => break c,
            Err(e) if e.raw_os_error() == Some(26) && started.elapsed() < PATIENCE => {
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => panic!("spawn {cmd:?}: {e}"),
        }
    };
    let logs = Arc::new(std::sync::Mutex::new(Vec::new()));
    let stderr = child.stderr.take().unwrap();
    let l2 = logs.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            l2.lock().unwrap().push(line);
        }
    });
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let deadline = Instant::now() + READY_TIMEOUT;
    let ready = loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) if line.starts_with(prefix) => break line,
            Ok(_) => {}
            Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "process did not print {prefix:?}; logs:\n{}",
                    logs.lock().unwrap().join("\n")
                );
            }
        }
    };
    (child, ready, logs)
}

/// Whether a line of `logs` contains `needle`, waiting for it if need be: the lines come from a thread reading
/// the process's stderr, which may lag behind what the test saw elsewhere (its stdout, a response, a metric).
/// Polls every 20 ms; false only after [`PATIENCE`]. Not for asserting that something was *not* logged.
pub fn wait_logged(logs: &std::sync::Mutex<Vec<String>>, needle: &str) -> bool {
    blocking(|| {
        let start = Instant::now();
        loop {
            if logs.lock().unwrap().iter().any(|l| l.contains(needle)) {
                return true;
            }
            if start.elapsed() > PATIENCE {
                return false;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    })
}

/// Runs a blocking wait. Called from an async test on a multi-thread runtime, it lets the other tasks of this
/// worker (an in-process app, a client connection) run meanwhile.
fn blocking<T>(f: impl FnOnce() -> T) -> T {
    match tokio::runtime::Handle::try_current() {
        Ok(h) if h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
            tokio::task::block_in_place(f)
        }
        _ => f(),
    }
}

/// Sends SIGTERM and waits (up to [`PATIENCE`]) for the process to exit, then kills.
pub fn terminate(child: &mut Child) {
    let _ = terminate_status(child);
}

/// [`terminate`], returning the exit status when the process exited by itself (`None` when it had to be killed).
pub fn terminate_status(child: &mut Child) -> Option<std::process::ExitStatus> {
    let _ = Command::new("kill")
        .arg("-TERM")
        .arg(child.id().to_string())
        .status();
    let deadline = Instant::now() + PATIENCE;
    blocking(|| loop {
        if let Ok(Some(s)) = child.try_wait() {
            return Some(s);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    })
}

/// A running `trustline-agent`.
pub struct Agent {
    child: Option<Child>,
    /// Config file.
    pub config: PathBuf,
    /// Workload API socket.
    pub socket: PathBuf,
    /// HTTP API socket.
    pub http_socket: PathBuf,
    /// The agent's SPIFFE ID.
    pub id: String,
    /// Logs (stderr).
    pub logs: Arc<std::sync::Mutex<Vec<String>>>,
}

impl Agent {
    /// Writes an agent config for `ca` into `dir` (sockets in `dir/sock`, world-traversable) and starts it with
    /// `join_token`. `extra` is appended to the config.
    pub fn start(dir: &Path, ca: &Ca, join_token: Option<&str>, extra: &str) -> Agent {
        use std::os::unix::fs::PermissionsExt;
        std::fs::create_dir_all(dir).unwrap();
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        let bundle = dir.join("bundle.pem");
        std::fs::write(&bundle, ca.cli_ok(&["bundle", "show", "--format", "pem"])).unwrap();
        let cfg = dir.join("agent.toml");
        std::fs::write(
            &cfg,
            format!(
                "trust_domain = \"example.org\"\nca_address = \"{}\"\ntrust_bundle = \"{}\"\ndata_dir = \"{}\"\nsocket = \"{}\"\nhttp_socket = \"{}\"\n{extra}",
                ca.agent_addr,
                bundle.display(),
                dir.join("state").display(),
                dir.join("sock/workload.sock").display(),
                dir.join("sock/http.sock").display(),
            ),
        )
        .unwrap();
        Self::spawn(&cfg, join_token)
    }

    fn spawn(cfg: &Path, join_token: Option<&str>) -> Agent {
        let mut cmd = Command::new(bin("trustline-agent"));
        cmd.arg("run")
            .arg("--config")
            .arg(cfg)
            .env_remove("TRUSTLINE_JOIN_TOKEN");
        if let Some(t) = join_token {
            cmd.arg("--join-token").arg(t);
        }
        let (child, ready, logs) = spawn_ready(cmd, "trustline-agent ready:");
        let field = |key: &str| -> String {
            ready
                .split(", ")
                .find_map(|p| p.split_once(key).map(|(_, v)| v.trim().to_owned()))
                .unwrap()
        };
        Agent {
            child: Some(child),
            config: cfg.to_owned(),
            socket: PathBuf::from(field("Workload API socket ")),
            http_socket: PathBuf::from(field("HTTP API socket ")),
            id: field("agent ID "),
            logs,
        }
    }

    /// Stops the agent (SIGTERM).
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            terminate(&mut c);
        }
    }

    /// Starts it again with the same config and no join token.
    pub fn restart(&mut self) {
        self.stop();
        *self = Self::spawn(&self.config.clone(), None);
    }

    /// Whether the agent logged a line containing `needle` (waiting for it: see [`wait_logged`]).
    pub fn logged(&self, needle: &str) -> bool {
        wait_logged(&self.logs, needle)
    }

    /// The agent's process id while it runs (for `/proc/<pid>/status`).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// The address a TCP listener configured with port 0 got: the agent logs `<what> listening on http://ADDR`
    /// (`what` is "HTTP API" for `http_listen`, "health and metrics" for `health_listen`).
    pub fn listening(&self, what: &str) -> SocketAddr {
        let needle = format!("{what} listening on http://");
        assert!(self.logged(&needle), "the agent did not log {needle:?}");
        let logs = self.logs.lock().unwrap();
        let line = logs.iter().find(|l| l.contains(&needle)).unwrap();
        let rest = &line[line.find(&needle).unwrap() + needle.len()..];
        let addr: String = rest
            .chars()
            .take_while(|c| c.is_ascii_hexdigit() || matches!(c, '.' | ':' | '[' | ']'))
            .collect();
        addr.parse()
            .unwrap_or_else(|e| panic!("{addr:?} in {line:?}: {e}"))
    }

    /// `unix:` endpoint of the Workload API for SPIFFE clients.
    pub fn endpoint(&self) -> String {
        format!("unix:{}", self.socket.display())
    }

    /// GET (or POST with `body`) on the HTTP API; returns status and body.
    pub async fn http(&self, method: &str, path: &str, body: Option<&str>) -> (u16, String) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut s = tokio::net::UnixStream::connect(&self.http_socket).await.unwrap();
        let body = body.unwrap_or("");
        let req = format!(
            "{method} {path} HTTP/1.1\r\nHost: agent\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        s.write_all(req.as_bytes()).await.unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        let status = out
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or(0);
        let body = out
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.to_owned())
            .unwrap_or_default();
        // Bodies may be chunked; take the JSON object.
        let json = match (body.find('{'), body.rfind('}')) {
            (Some(a), Some(b)) if b > a => body[a..=b].to_owned(),
            _ => body,
        };
        (status, json)
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A free loopback port (bound and released). Racy (another process may take it before the program under test
/// binds it): prefer port 0 and a program that reports what it bound.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A running `trustline-ca`.
pub struct Ca {
    child: Option<Child>,
    /// Its state folder.
    pub dir: PathBuf,
    /// Its config file.
    pub config: PathBuf,
    /// Bound agent API address.
    pub agent_addr: SocketAddr,
    /// Admin socket.
    pub socket: PathBuf,
    /// Bound health address, if enabled.
    pub health_addr: Option<SocketAddr>,
    /// Lines the process printed on stderr (logs).
    pub logs: Arc<std::sync::Mutex<Vec<String>>>,
}

/// The default config body for tests (trust domain example.org, SQLite, key file, port 0).
pub fn default_config(dir: &Path) -> String {
    format!(
        "trust_domain = \"example.org\"\ndata_dir = \"{d}\"\n\n[server]\nagent_listen = \"127.0.0.1:0\"\nhealth_listen = \"127.0.0.1:0\"\n\n[keys]\nkey_file = \"{d}/seal.key\"\n",
        d = dir.display()
    )
}

impl Ca {
    /// Writes a sealing key file (if missing) and `config` into `dir`, then starts the CA.
    pub fn start_with(dir: &Path, config: &str) -> Ca {
        std::fs::create_dir_all(dir).unwrap();
        let key = dir.join("seal.key");
        if !key.exists() {
            trustline_hsm::SoftwareKeyStore::create_key_file(&key).unwrap();
        }
        let cfg = dir.join("ca.toml");
        std::fs::write(&cfg, config).unwrap();
        Self::spawn(dir, &cfg)
    }

    /// Starts a CA with [`default_config`] in `dir`.
    pub fn start(dir: &Path) -> Ca {
        Self::start_with(dir, &default_config(dir))
    }

    fn spawn(dir: &Path, cfg: &Path) -> Ca {
        let mut cmd = Command::new(bin("trustline-ca"));
        cmd.arg("run").arg("--config").arg(cfg);
        let (child, ready, logs) = spawn_ready(cmd, "trustline-ca ready:");
        let field = |key: &str| -> Option<String> {
            ready
                .split(", ")
                .find_map(|p| p.split_once(key).map(|(_, v)| v.trim().to_owned()))
        };
        let agent_addr = field("agent API listening on ").unwrap().parse().unwrap();
        let socket = PathBuf::from(field("admin socket ").unwrap());
        let health_addr = field("health on http://").map(|a| a.parse().unwrap());
        Ca {
            child: Some(child),
            dir: dir.to_owned(),
            config: cfg.to_owned(),
            agent_addr,
            socket,
            health_addr,
            logs,
        }
    }

    /// Runs `trustline-ca --socket <socket> ARGS…` and returns its output.
    pub fn cli(&self, args: &[&str]) -> Output {
        Command::new(bin("trustline-ca"))
            .arg("--socket")
            .arg(&self.socket)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("run trustline-ca cli")
    }

    /// Runs the CLI and returns stdout, panicking with stderr on failure.
    pub fn cli_ok(&self, args: &[&str]) -> String {
        let out = self.cli(args);
        assert!(
            out.status.success(),
            "trustline-ca {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    /// Runs the CLI expecting failure; returns stderr.
    pub fn cli_err(&self, args: &[&str]) -> String {
        let out = self.cli(args);
        assert!(
            !out.status.success(),
            "trustline-ca {args:?} unexpectedly succeeded: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        String::from_utf8(out.stderr).unwrap()
    }

    /// The bundle's X.509 roots (DER), via the CLI.
    pub fn bundle_roots(&self) -> Vec<Vec<u8>> {
        trustline_identity::bundle::certs_from_pem(&self.cli_ok(&["bundle", "show", "--format", "pem"]))
            .unwrap()
    }

    /// Sends SIGTERM and waits (up to [`PATIENCE`]) for the CA to exit by itself; its exit status, or `None` when
    /// it had to be killed.
    pub fn stop_status(&mut self) -> Option<std::process::ExitStatus> {
        terminate_status(&mut self.child.take()?)
    }

    /// Whether the CA logged a line containing `needle` (waiting for it: see [`wait_logged`]).
    pub fn logged(&self, needle: &str) -> bool {
        wait_logged(&self.logs, needle)
    }

    /// Stops the CA with SIGTERM and waits for it to exit.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            terminate(&mut child);
        }
    }

    /// Restarts the CA with the same config (new ephemeral ports).
    pub fn restart(&mut self) {
        self.stop();
        let fresh = Self::spawn(&self.dir.clone(), &self.config.clone());
        *self = fresh;
    }
}

impl Drop for Ca {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A fresh P-256 key and a CSR for it carrying `uris` as URI SANs and `dns` as DNS SANs.
pub fn csr(uris: &[&str], dns: &[&str]) -> (rcgen::KeyPair, Vec<u8>) {
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    for u in uris {
        params
            .subject_alt_names
            .push(rcgen::SanType::URI((*u).try_into().unwrap()));
    }
    for d in dns {
        params
            .subject_alt_names
            .push(rcgen::SanType::DnsName((*d).try_into().unwrap()));
    }
    let req = params.serialize_request(&key).unwrap();
    (key, req.der().to_vec())
}

/// Mints an X.509-SVID for `spiffe_id` from a fresh key through the CA's CLI (`x509 mint`, `ttl` e.g. "1h") into
/// `dir`; returns the key and the paths of `svid.pem`, `key.pem` and `bundle.pem`.
pub fn mint_svid(
    ca: &Ca,
    dir: &Path,
    spiffe_id: &str,
    ttl: &str,
) -> (rcgen::KeyPair, PathBuf, PathBuf, PathBuf) {
    std::fs::create_dir_all(dir).unwrap();
    let (key, req) = csr(&[spiffe_id], &[]);
    std::fs::write(dir.join("req.der"), &req).unwrap();
    ca.cli_ok(&[
        "x509",
        "mint",
        "--csr",
        dir.join("req.der").to_str().unwrap(),
        "--spiffe-id",
        spiffe_id,
        "--ttl",
        ttl,
        "--write",
        dir.to_str().unwrap(),
    ]);
    std::fs::write(dir.join("key.pem"), key.serialize_pem()).unwrap();
    (
        key,
        dir.join("svid.pem"),
        dir.join("key.pem"),
        dir.join("bundle.pem"),
    )
}

/// Connects to the CA's agent API over mutual TLS 1.3, verifying the CA's SVID against `roots`; presents
/// `client` (chain, PKCS#8 key) if given.
pub async fn agent_client(
    addr: SocketAddr,
    roots: &[Vec<u8>],
    client: Option<(Vec<Vec<u8>>, Vec<u8>)>,
) -> Result<AgentClient<tonic::transport::Channel>, tonic::transport::Error> {
    let td = TrustDomain::new("example.org").unwrap();
    let bundle = TrustBundle::new(td, roots).unwrap();
    let ca_id = SpiffeId::new("spiffe://example.org/trustline/ca").unwrap();
    let verifier = Arc::new(SpiffeServerVerifier::new(
        bundle,
        ExpectedPeer::OneOf(vec![ca_id]),
    ));
    let cert = client.map(|(chain, key)| {
        let rc = Arc::new(RotatingCert::default());
        rc.set(chain, &key).unwrap();
        rc
    });
    let cfg = Arc::new(client_config(verifier, cert).unwrap());
    let connector = tokio_rustls::TlsConnector::from(cfg);
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect_with_connector(tower::service_fn(move |_: tonic::transport::Uri| {
            let connector = connector.clone();
            async move {
                let tcp = tokio::net::TcpStream::connect(addr).await?;
                let name = rustls::pki_types::ServerName::try_from("trustline-ca").unwrap();
                let tls = connector.connect(name, tcp).await?;
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(tls))
            }
        }))
        .await?;
    Ok(AgentClient::new(channel))
}

/// Verifies an X.509-SVID chain (leaf first) against `roots` at `at` (unix seconds), as a TLS server would
/// verify a client. Returns the SPIFFE ID.
pub fn verify_svid(chain: &[Vec<u8>], roots: &[Vec<u8>], at: u64) -> Result<String, String> {
    let td = TrustDomain::new("example.org").unwrap();
    let bundle = TrustBundle::new(td, roots).map_err(|e| e.to_string())?;
    let ee = rustls::pki_types::CertificateDer::from(chain[0].clone());
    let inter: Vec<_> = chain[1..]
        .iter()
        .map(|c| rustls::pki_types::CertificateDer::from(c.clone()))
        .collect();
    bundle
        .verify_chain(
            &ee,
            &inter,
            rustls::pki_types::UnixTime::since_unix_epoch(Duration::from_secs(at)),
            true,
        )
        .map(|id| id.to_string())
        .map_err(|e| e.to_string())
}

/// Now, in unix seconds.
pub fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}
