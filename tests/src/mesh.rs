//! A local mesh for sidecar tests: a CA, one agent, sidecars (each a copy of the binary, so the agent tells
//! them apart by `unix:path`), an echo app, and a small HTTP client.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};

use crate::{bin, spawn_ready, terminate, wait_logged, Agent, Ca, PATIENCE};

/// Trust domain of every mesh.
pub const TD: &str = "spiffe://example.org";

/// A CA and an agent, attested with a join token.
pub struct Mesh {
    /// Agent.
    pub agent: Agent,
    /// CA.
    pub ca: Ca,
    /// Temp root (removed on drop).
    pub tmp: tempfile::TempDir,
}

impl Mesh {
    /// Starts a CA (`ca_extra` appended to its config) and an agent.
    pub fn start(ca_extra: &str) -> Mesh {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("ca");
        let mut cfg = crate::default_config(&dir);
        cfg.push_str(ca_extra);
        let ca = Ca::start_with(&dir, &cfg);
        let node = format!("{TD}/trustline/agent/mesh");
        let token: serde_json::Value = serde_json::from_str(&ca.cli_ok(&[
            "token",
            "generate",
            "--spiffe-id",
            &node,
            "--output",
            "json",
        ]))
        .unwrap();
        let agent = Agent::start(&tmp.path().join("agent"), &ca, token["token"].as_str(), "");
        Mesh { agent, ca, tmp }
    }

    /// Registers `spiffe://example.org/<name>` for a private copy of the sidecar binary and returns its path.
    /// `entry_args` are passed to `entry create` (e.g. `--x509-ttl 6s`).
    pub fn register_sidecar(&self, name: &str, entry_args: &[&str]) -> PathBuf {
        let dir = self.tmp.path().join("bin").join(name);
        std::fs::create_dir_all(&dir).unwrap();
        let exe = dir.join("trustline-sidecar");
        std::fs::copy(bin("trustline-sidecar"), &exe).unwrap();
        let id = format!("{TD}/{name}");
        let sel = format!("unix:path:{}", exe.display());
        let mut args = vec![
            "entry",
            "create",
            "--spiffe-id",
            &id,
            "--parent-id",
            &self.agent.id,
            "--selector",
            &sel,
        ];
        args.extend_from_slice(entry_args);
        self.ca.cli_ok(&args);
        exe
    }

    /// Registers and starts sidecar `name` with config `body` (listeners; the socket, metrics listener and
    /// policy folder are added) and the given policy files.
    pub fn sidecar(&self, name: &str, body: &str, policies: &[(&str, &str)]) -> Sidecar {
        self.sidecar_with(name, body, policies, &[])
    }

    /// [`sidecar`](Self::sidecar) with extra `entry create` arguments.
    pub fn sidecar_with(
        &self,
        name: &str,
        body: &str,
        policies: &[(&str, &str)],
        entry_args: &[&str],
    ) -> Sidecar {
        let exe = self.register_sidecar(name, entry_args);
        let dir = self.tmp.path().join("sidecars").join(name);
        let policy_dir = dir.join("policies");
        std::fs::create_dir_all(&policy_dir).unwrap();
        for (file, text) in policies {
            std::fs::write(policy_dir.join(file), text).unwrap();
        }
        let config = dir.join("sidecar.toml");
        std::fs::write(
            &config,
            format!(
                "workload_api_socket = \"{}\"\npolicy_dir = \"{}\"\npolicy_reload_interval = \"200ms\"\nmetrics_listen = \"127.0.0.1:0\"\n{body}",
                self.agent.socket.display(),
                policy_dir.display()
            ),
        )
        .unwrap();
        Sidecar::spawn(name, &exe, &config, policy_dir)
    }
}

/// A running `trustline-sidecar`.
pub struct Sidecar {
    child: Option<Child>,
    /// Name (`spiffe://example.org/<name>`).
    pub name: String,
    /// Its policy folder.
    pub policy_dir: PathBuf,
    /// Bound inbound listeners.
    pub inbound: Vec<SocketAddr>,
    /// Bound outbound listeners.
    pub outbound: Vec<SocketAddr>,
    /// Metrics listener.
    pub metrics: SocketAddr,
    /// stderr lines.
    pub logs: Arc<std::sync::Mutex<Vec<String>>>,
    exe: PathBuf,
    config: PathBuf,
}

impl Sidecar {
    fn spawn(name: &str, exe: &Path, config: &Path, policy_dir: PathBuf) -> Sidecar {
        let mut cmd = Command::new(exe);
        cmd.arg("run").arg("--config").arg(config);
        let (child, ready, logs) = spawn_ready(cmd, "trustline-sidecar ready:");
        let field = |k: &str| -> Vec<SocketAddr> {
            ready
                .split_whitespace()
                .find_map(|p| p.strip_prefix(k))
                .unwrap_or_default()
                .split(',')
                .filter(|s| !s.is_empty())
                .map(|s| s.parse().unwrap())
                .collect()
        };
        Sidecar {
            child: Some(child),
            name: name.to_owned(),
            policy_dir,
            inbound: field("inbound="),
            outbound: field("outbound="),
            metrics: field("metrics=")[0],
            logs,
            exe: exe.to_owned(),
            config: config.to_owned(),
        }
    }

    /// The Prometheus text of `/metrics`.
    pub async fn metrics_text(&self) -> String {
        let r = request(self.metrics, "GET", "metrics", "/metrics", &[], "")
            .await
            .unwrap();
        r.body
    }

    /// Sum of the samples of `metric` whose label set contains every `labels` pair.
    pub async fn metric(&self, metric: &str, labels: &[(&str, &str)]) -> f64 {
        let text = self.metrics_text().await;
        text.lines()
            .filter(|l| l.starts_with(metric) && !l.starts_with('#'))
            .filter(|l| labels.iter().all(|(k, v)| l.contains(&format!("{k}=\"{v}\""))))
            .filter_map(|l| l.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()))
            .sum()
    }

    /// Whether a log line contains `needle`, waiting for it if need be (see [`wait_logged`]).
    pub fn logged(&self, needle: &str) -> bool {
        wait_logged(&self.logs, needle)
    }

    /// SIGTERM and wait.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            terminate(&mut c);
        }
    }

    /// Starts the same sidecar again (after [`stop`](Self::stop) or a kill); listeners get new ports.
    pub fn restart(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        *self = Self::spawn(
            &self.name.clone(),
            &self.exe.clone(),
            &self.config.clone(),
            self.policy_dir.clone(),
        );
    }

    /// The child process id, while running.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }
}

impl Drop for Sidecar {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A response from [`request`].
#[derive(Debug, Clone)]
pub struct Reply {
    /// Status.
    pub status: u16,
    /// Headers.
    pub headers: http::HeaderMap,
    /// Body text.
    pub body: String,
}

impl Reply {
    /// The body as JSON.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.body))
    }
}

/// One HTTP/1.1 request on a fresh connection to `addr` with `Host: host`.
pub async fn request(
    addr: SocketAddr,
    method: &str,
    host: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> Result<Reply, String> {
    let tcp = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| e.to_string())?;
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    let mut b = http::Request::builder()
        .method(method)
        .uri(path)
        .header("host", host);
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    let req = b.body(Full::new(Bytes::from(body.to_owned()))).unwrap();
    let resp = tokio::time::timeout(PATIENCE, send.send_request(req))
        .await
        .map_err(|_| "timed out".to_owned())?
        .map_err(|e| e.to_string())?;
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let body = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| e.to_string())?
        .to_bytes();
    Ok(Reply {
        status,
        headers,
        body: String::from_utf8_lossy(&body).into_owned(),
    })
}

/// A pooled HTTP/1.1 client (keep-alive), for load.
pub fn pooled_client(
) -> hyper_util::client::legacy::Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>> {
    hyper_util::client::legacy::Client::builder(TokioExecutor::new()).build_http()
}

/// An in-process app on loopback: answers every request with JSON describing it (method, path, the target as
/// received, every Host and x-forwarded-client-cert value, version, headers, body length); a path ending in `/slow` answers after 1.5 s; one ending in `/ws` with `Upgrade` switches protocols and echoes bytes.
pub async fn echo_app() -> SocketAddr {
    echo_app_counting_slow().await.0
}

/// [`echo_app`], and how many `/slow` requests have reached it (counted on arrival, before the pause).
pub async fn echo_app_counting_slow() -> (SocketAddr, Arc<AtomicU64>) {
    let slow_started = Arc::new(AtomicU64::new(0));
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let counter = slow_started.clone();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = l.accept().await else { return };
            let counter = counter.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |mut req: http::Request<hyper::body::Incoming>| {
                    let counter = counter.clone();
                    async move {
                        if req.uri().path().ends_with("/ws") && req.headers().contains_key("upgrade") {
                            let up = hyper::upgrade::on(&mut req);
                            tokio::spawn(async move {
                                if let Ok(u) = up.await {
                                    let mut io = TokioIo::new(u);
                                    let (mut r, mut w) = tokio::io::split(&mut io);
                                    let _ = tokio::io::copy(&mut r, &mut w).await;
                                }
                            });
                            let r = http::Response::builder()
                                .status(101)
                                .header("connection", "upgrade")
                                .header("upgrade", "echo")
                                .body(Full::new(Bytes::new()))
                                .unwrap();
                            return Ok::<_, std::convert::Infallible>(r);
                        }
                        if req.uri().path().ends_with("/slow") {
                            counter.fetch_add(1, Ordering::SeqCst);
                            tokio::time::sleep(Duration::from_millis(1500)).await;
                        }
                        let headers: serde_json::Map<String, serde_json::Value> = req
                            .headers()
                            .iter()
                            .map(|(k, v)| (k.to_string(), v.to_str().unwrap_or_default().into()))
                            .collect();
                        let method = req.method().to_string();
                        let path = req.uri().path().to_owned();
                        let uri = req.uri().to_string();
                        let hosts: Vec<String> = req
                            .headers()
                            .get_all("host")
                            .iter()
                            .map(|v| v.to_str().unwrap_or_default().to_owned())
                            .collect();
                        let xfcc: Vec<String> = req
                            .headers()
                            .get_all("x-forwarded-client-cert")
                            .iter()
                            .map(|v| v.to_str().unwrap_or_default().to_owned())
                            .collect();
                        let version = format!("{:?}", req.version());
                        let body = req
                            .into_body()
                            .collect()
                            .await
                            .map(|b| b.to_bytes().len())
                            .unwrap_or(0);
                        let j = serde_json::json!({
                            "method": method, "path": path, "uri": uri, "hosts": hosts, "xfcc": xfcc,
                            "version": version, "headers": headers, "body_len": body,
                        });
                        Ok(http::Response::builder()
                            .header("content-type", "application/json")
                            .body(Full::new(Bytes::from(j.to_string())))
                            .unwrap())
                    }
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection_with_upgrades(TokioIo::new(tcp), svc)
                    .await;
            });
        }
    });
    (addr, slow_started)
}
