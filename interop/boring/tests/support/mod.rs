//! A minimal end-to-end harness without OpenSSL: start the real `trustline-ca`, `trustline-agent` and
//! `trustline-sidecar` binaries on loopback (port 0, a temp dir), wait on their readiness lines, and kill them
//! when dropped. A smaller copy of what `trustline-tests` does, since that crate may link the system OpenSSL.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

/// Trust domain of the mesh.
pub const TD: &str = "spiffe://example.org";
/// How long a process gets to print its readiness line, or a CLI command to finish.
const READY_TIMEOUT: Duration = Duration::from_secs(60);
/// Read/write timeout on every socket the tests open.
pub const IO_TIMEOUT: Duration = Duration::from_secs(20);

/// Path of a Trustline binary: `$TRUSTLINE_BIN_DIR/<name>` if set, else next to the test executable
/// (`target/<profile>/deps/<test>` -> `target/<profile>/<name>`), as `cargo build --workspace --bins` leaves it.
pub fn bin(name: &str) -> PathBuf {
    let dir = match std::env::var_os("TRUSTLINE_BIN_DIR") {
        Some(d) => PathBuf::from(d),
        None => {
            let exe = std::env::current_exe().expect("current exe");
            exe.parent()
                .and_then(Path::parent)
                .expect("target dir")
                .to_owned()
        }
    };
    let p = dir.join(name);
    assert!(
        p.exists(),
        "{} is missing: build it with `cargo build --workspace --bins`, or point TRUSTLINE_BIN_DIR at a folder \
         holding trustline-ca, trustline-agent and trustline-sidecar",
        p.display()
    );
    p
}

/// A child process, killed when dropped; its stderr lines are kept for failure messages.
pub struct Proc {
    child: Child,
    logs: Arc<Mutex<Vec<String>>>,
}

impl Proc {
    /// Spawns `cmd` and waits (bounded) for a stdout line starting with `prefix`; returns it with the process.
    fn spawn_ready(mut cmd: Command, prefix: &str) -> (Proc, String) {
        cmd.env("TRUSTLINE_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        // A binary copied by a test can briefly be "text file busy" while another test thread forks: retry.
        let mut tries = 0;
        let mut child = loop {
            match cmd.spawn() {
                Ok(c) => break c,
                Err(e) if e.raw_os_error() == Some(26) && tries < 50 => {
                    tries += 1;
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) => panic!("spawn {cmd:?}: {e}"),
            }
        };
        let logs = Arc::new(Mutex::new(Vec::new()));
        let (stderr, l2) = (child.stderr.take().unwrap(), logs.clone());
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
        let proc = Proc { child, logs };
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
                Ok(line) if line.starts_with(prefix) => return (proc, line),
                Ok(_) => {}
                Err(_) => panic!(
                    "{cmd:?} did not print {prefix:?}; logs:\n{}",
                    proc.logs.lock().unwrap().join("\n")
                ),
            }
        }
    }

    /// Its stderr so far.
    pub fn logs(&self) -> String {
        self.logs.lock().unwrap().join("\n")
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The value after `key` in a readiness line made of `key value` parts separated by `sep`.
fn field<'a>(line: &'a str, sep: &str, key: &str) -> &'a str {
    line.split(sep)
        .find_map(|p| p.split_once(key).map(|(_, v)| v.trim()))
        .unwrap_or_else(|| panic!("no {key:?} in {line:?}"))
}

/// Runs `cmd` to completion (bounded) and returns its stdout, or what went wrong with its stderr.
fn run(mut cmd: Command) -> Result<String, String> {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"));
    // CLI output is small: it fits the pipe buffer, so waiting before reading cannot deadlock.
    let deadline = Instant::now() + READY_TIMEOUT;
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Err(format!("{cmd:?} timed out"));
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let (mut out, mut err) = (String::new(), String::new());
    child.stdout.take().unwrap().read_to_string(&mut out).unwrap();
    child.stderr.take().unwrap().read_to_string(&mut err).unwrap();
    if status.success() {
        Ok(out)
    } else {
        Err(format!("{cmd:?} failed: {err}"))
    }
}

/// A running `trustline-ca` and its admin socket.
pub struct Ca {
    proc: Proc,
    socket: PathBuf,
}

impl Ca {
    /// Runs `trustline-ca --socket <admin socket> ARGS…` and returns its stdout.
    pub fn cli(&self, args: &[&str]) -> String {
        let mut cmd = Command::new(bin("trustline-ca"));
        cmd.arg("--socket").arg(&self.socket).args(args);
        run(cmd).unwrap_or_else(|e| panic!("{e}\nCA logs:\n{}", self.proc.logs()))
    }
}

/// A running sidecar's bound addresses.
pub struct Sidecar {
    /// The process.
    pub proc: Proc,
    /// Inbound (mutual TLS) listeners.
    pub inbound: Vec<SocketAddr>,
    /// Outbound (plaintext, loopback) listeners.
    pub outbound: Vec<SocketAddr>,
    /// `/metrics`.
    pub metrics: SocketAddr,
}

/// A CA, an agent attested with a join token, and one sidecar whose identity is `spiffe://example.org/<name>`.
/// Fields drop in order: the processes first, the temp dir last.
pub struct Mesh {
    /// The sidecar.
    pub sidecar: Sidecar,
    _agent: Proc,
    /// The CA.
    pub ca: Ca,
    /// Temp root (removed on drop).
    pub tmp: tempfile::TempDir,
}

impl Mesh {
    /// Starts a CA and an agent, registers `spiffe://example.org/<name>` for a private copy of the sidecar binary
    /// (selector `unix:path:`), and starts it with `listeners` (TOML) appended to its config.
    pub fn start(name: &str, listeners: &str) -> Mesh {
        use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path();

        // CA: a 32-byte sealing key (0600) and a minimal config.
        let ca_dir = root.join("ca");
        std::fs::create_dir_all(&ca_dir).unwrap();
        let mut seal = [0u8; 32];
        boring::rand::rand_bytes(&mut seal).unwrap();
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(ca_dir.join("seal.key"))
            .unwrap()
            .write_all(&seal)
            .unwrap();
        let ca_cfg = ca_dir.join("ca.toml");
        std::fs::write(
            &ca_cfg,
            format!(
                "trust_domain = \"example.org\"\ndata_dir = \"{d}\"\n\n[server]\nagent_listen = \"127.0.0.1:0\"\n\n[keys]\nkey_file = \"{d}/seal.key\"\n",
                d = ca_dir.display()
            ),
        )
        .unwrap();
        let mut cmd = Command::new(bin("trustline-ca"));
        cmd.arg("run").arg("--config").arg(&ca_cfg);
        let (proc, ready) = Proc::spawn_ready(cmd, "trustline-ca ready:");
        let ca_addr = field(&ready, ", ", "agent API listening on ").to_owned();
        let socket = PathBuf::from(field(&ready, ", ", "admin socket "));
        let ca = Ca { proc, socket };

        // Agent: join token, bundle, config; sockets in a world-traversable folder.
        let token: serde_json::Value = serde_json::from_str(&ca.cli(&[
            "token",
            "generate",
            "--spiffe-id",
            &format!("{TD}/trustline/agent/boring"),
            "--output",
            "json",
        ]))
        .unwrap();
        let agent_dir = root.join("agent");
        std::fs::create_dir_all(agent_dir.join("sock")).unwrap();
        std::fs::set_permissions(&agent_dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        let bundle = agent_dir.join("bundle.pem");
        std::fs::write(&bundle, ca.cli(&["bundle", "show", "--format", "pem"])).unwrap();
        let agent_cfg = agent_dir.join("agent.toml");
        let socket = agent_dir.join("sock/workload.sock");
        std::fs::write(
            &agent_cfg,
            format!(
                "trust_domain = \"example.org\"\nca_address = \"{ca_addr}\"\ntrust_bundle = \"{}\"\ndata_dir = \"{}\"\nsocket = \"{}\"\nhttp_socket = \"{}\"\n",
                bundle.display(),
                agent_dir.join("state").display(),
                socket.display(),
                agent_dir.join("sock/http.sock").display(),
            ),
        )
        .unwrap();
        let mut cmd = Command::new(bin("trustline-agent"));
        cmd.arg("run")
            .arg("--config")
            .arg(&agent_cfg)
            .arg("--join-token")
            .arg(token["token"].as_str().unwrap())
            .env_remove("TRUSTLINE_JOIN_TOKEN");
        let (agent, ready) = Proc::spawn_ready(cmd, "trustline-agent ready:");
        let agent_id = field(&ready, ", ", "agent ID ");

        // Sidecar: a private copy of the binary, so that its path is its own and a rebuild cannot change it.
        let side_dir = root.join("sidecar");
        std::fs::create_dir_all(&side_dir).unwrap();
        let exe = side_dir.join("trustline-sidecar");
        std::fs::copy(bin("trustline-sidecar"), &exe).unwrap();
        ca.cli(&[
            "entry",
            "create",
            "--spiffe-id",
            &format!("{TD}/{name}"),
            "--parent-id",
            agent_id,
            "--selector",
            &format!("unix:path:{}", exe.display()),
        ]);
        let cfg = side_dir.join("sidecar.toml");
        std::fs::write(
            &cfg,
            format!(
                "workload_api_socket = \"{}\"\nmetrics_listen = \"127.0.0.1:0\"\n{listeners}",
                socket.display()
            ),
        )
        .unwrap();
        let mut cmd = Command::new(&exe);
        cmd.arg("run").arg("--config").arg(&cfg);
        let (proc, ready) = Proc::spawn_ready(cmd, "trustline-sidecar ready:");
        let addrs = |key: &str| -> Vec<SocketAddr> {
            field(&ready, " ", key)
                .split(',')
                .filter(|s| !s.is_empty())
                .map(|s| s.parse().unwrap())
                .collect()
        };
        let sidecar = Sidecar {
            inbound: addrs("inbound="),
            outbound: addrs("outbound="),
            metrics: addrs("metrics=")[0],
            proc,
        };
        Mesh {
            sidecar,
            _agent: agent,
            ca,
            tmp,
        }
    }

    /// Mints an X.509-SVID for `spiffe://example.org/<name>` from `csr_der` into a fresh folder, which it returns
    /// (`svid.pem`: the chain, leaf first; `bundle.pem`: the trust bundle).
    pub fn mint(&self, name: &str, csr_der: &[u8]) -> PathBuf {
        let dir = self.tmp.path().join("svids").join(name);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("req.der"), csr_der).unwrap();
        self.ca.cli(&[
            "x509",
            "mint",
            "--csr",
            dir.join("req.der").to_str().unwrap(),
            "--spiffe-id",
            &format!("{TD}/{name}"),
            "--ttl",
            "1h",
            "--write",
            dir.to_str().unwrap(),
        ]);
        dir
    }
}

impl Sidecar {
    /// Sum of the samples of `metric` whose label set contains every `labels` pair, from `/metrics`.
    pub fn metric(&self, metric: &str, labels: &[(&str, &str)]) -> f64 {
        let text = http_get(self.metrics, "metrics", "/metrics");
        text.lines()
            .filter(|l| l.starts_with(metric))
            .filter(|l| labels.iter().all(|(k, v)| l.contains(&format!("{k}=\"{v}\""))))
            .filter_map(|l| l.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()))
            .sum()
    }
}

/// One plaintext HTTP/1.1 GET on a fresh connection; returns the whole response (head and body).
pub fn http_get(addr: SocketAddr, host: &str, path: &str) -> String {
    let mut tcp = TcpStream::connect_timeout(&addr, IO_TIMEOUT).unwrap();
    tcp.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    tcp.set_write_timeout(Some(IO_TIMEOUT)).unwrap();
    write!(
        tcp,
        "GET {path} HTTP/1.1\r\nhost: {host}\r\nconnection: close\r\n\r\n"
    )
    .unwrap();
    read_http(&mut tcp, false)
}

/// Reads one HTTP/1.1 message: the head, then `content-length` bytes of body; without that header, a request
/// ends with its head and a response at EOF. A read error after some bytes (a peer closing without TLS
/// close_notify, a timeout) ends the message.
pub fn read_http(r: &mut impl Read, request: bool) -> String {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let text = String::from_utf8_lossy(&buf);
        if let Some(head_end) = text.find("\r\n\r\n") {
            let len = text[..head_end].lines().find_map(|l| {
                let (k, v) = l.split_once(':')?;
                k.trim()
                    .eq_ignore_ascii_case("content-length")
                    .then(|| v.trim().parse::<usize>().ok())?
            });
            match len {
                Some(n) if buf.len() >= head_end + 4 + n => break,
                None if request => break,
                _ => {}
            }
        }
        match r.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) if buf.is_empty() => panic!("read: {e}"),
            Err(_) => break,
        }
    }
    String::from_utf8_lossy(&buf).into_owned()
}

/// A trivial HTTP app on loopback: answers every request `200` with the request's head as the body.
pub fn echo_app() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    std::thread::spawn(move || {
        for tcp in l.incoming() {
            let Ok(mut tcp) = tcp else { return };
            std::thread::spawn(move || {
                let _ = tcp.set_read_timeout(Some(IO_TIMEOUT));
                let _ = tcp.set_write_timeout(Some(IO_TIMEOUT));
                let req = read_http(&mut tcp, true);
                let head = req.split("\r\n\r\n").next().unwrap_or_default();
                let _ = write!(
                    tcp,
                    "HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{head}",
                    head.len()
                );
            });
        }
    });
    addr
}
