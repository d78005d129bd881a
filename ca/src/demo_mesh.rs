//! `trustline-ca quickstart`'s local mesh: an identity agent, an app called `api` behind its sidecar, and a caller
//! `web` with its own sidecar, all real processes on loopback, so the first command shows mutual TLS and policy
//! on real requests.
//!
//! The agent tells the two sidecars apart by executable path (`unix:path`), so each gets a private copy of the
//! `trustline-sidecar` binary under `<dir>/mesh/bin/<name>/`; in production each service's sidecar usually runs
//! as its own uid and is registered by `unix:uid`.

use std::net::SocketAddr;
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, Command};
use trustline_ca::admin_api;
use trustline_proto::admin as pb;

/// The fixed address of web's outbound listener, for the tour (`curl -H 'host: api' http://127.0.0.1:15001/...`).
pub const WEB_OUTBOUND: &str = "127.0.0.1:15001";
const NODE: &str = "spiffe://example.org/node/quickstart";

const ALLOW: &str = "# Written by trustline-ca quickstart: web may GET and POST under /api/.\n\
name: web-reads-api\naction: ALLOW\nrules:\n  - from:\n      - source:\n          principals: [\"spiffe://example.org/web\"]\n    to:\n      - operation:\n          methods: [GET, POST]\n          paths: [\"/api/*\"]\n";
const DENY: &str = "# Written by trustline-ca quickstart: nobody reaches /api/admin.\n\
name: no-admin\naction: DENY\nrules:\n  - to:\n      - operation:\n          paths: [\"/api/admin*\"]\n";

/// The running mesh; [`stop`](Self::stop) ends its processes.
pub struct DemoMesh {
    children: Vec<(String, Child)>,
}

fn err(what: &str, e: impl std::fmt::Display) -> String {
    format!("local mesh: {what}: {e}")
}

/// Copies `from` to `to` through a temporary name, so a running copy is never overwritten in place.
fn install(from: &Path, to: &Path) -> Result<(), String> {
    let tmp = to.with_extension("new");
    std::fs::copy(from, &tmp).map_err(|e| err(&format!("copy {}", from.display()), e))?;
    std::fs::rename(&tmp, to).map_err(|e| err(&format!("install {}", to.display()), e))
}

/// Spawns `exe args`, logging stderr to `log`, and waits (bounded) for a stdout line starting with `ready`.
async fn spawn(
    name: &str,
    exe: &Path,
    args: &[&str],
    log: &Path,
    ready: &str,
) -> Result<(Child, String), String> {
    let logf = std::fs::File::create(log).map_err(|e| err(&log.display().to_string(), e))?;
    let mut child = Command::new(exe)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(logf)
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| err(&format!("start {}", exe.display()), e))?;
    let stdout = child.stdout.take().ok_or_else(|| err(name, "no stdout"))?;
    let mut lines = BufReader::new(stdout).lines();
    let line = tokio::time::timeout(Duration::from_secs(30), async {
        while let Ok(Some(l)) = lines.next_line().await {
            if l.starts_with(ready) {
                return Some(l);
            }
        }
        None
    })
    .await
    .ok()
    .flatten()
    .ok_or_else(|| err(name, format!("did not start; see {}", log.display())))?;
    // Keep draining stdout so the child never blocks on a full pipe.
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    Ok((child, line))
}

/// A tiny app for the demo: answers every request with JSON naming the caller the sidecar vouched for.
async fn app() -> Result<SocketAddr, String> {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .map_err(|e| err("app listener", e))?;
    let addr = l.local_addr().map_err(|e| err("app listener", e))?;
    let router = axum::Router::new().fallback(|req: axum::extract::Request| async move {
        let caller = req
            .headers()
            .get("x-forwarded-client-cert")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_owned();
        let trace = req
            .headers()
            .get("traceparent")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_owned();
        axum::Json(serde_json::json!({
            "service": "api",
            "path": req.uri().path(),
            "x-forwarded-client-cert": caller,
            "traceparent": trace,
        }))
    });
    tokio::spawn(async move {
        let _ = axum::serve(l, router).await;
    });
    Ok(addr)
}

/// Starts the agent, the app and both sidecars. `Ok(None)` when the agent or sidecar binary is not built.
pub async fn start(
    dir: &Path,
    admin_socket: &Path,
    agent_addr: SocketAddr,
    bundle_pem: &Path,
) -> Result<Option<DemoMesh>, String> {
    let here = std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().map(Path::to_path_buf))
        .unwrap_or_default();
    let (agent_bin, sidecar_bin) = (here.join("trustline-agent"), here.join("trustline-sidecar"));
    if !agent_bin.exists() || !sidecar_bin.exists() {
        println!(
            "[--] local mesh skipped: trustline-agent and trustline-sidecar are not built next to {}\n     \
             (build everything with: cargo build --release --workspace --bins)",
            here.display()
        );
        return Ok(None);
    }
    let mesh = dir.join("mesh");
    let logs = mesh.join("logs");
    for d in [
        &logs,
        &mesh.join("policies"),
        &mesh.join("bin/web"),
        &mesh.join("bin/api"),
    ] {
        std::fs::create_dir_all(d).map_err(|e| err(&d.display().to_string(), e))?;
    }
    let mut c = admin_api::connect(admin_socket)
        .await
        .map_err(|e| err("admin socket", e))?;

    // The agent: a join token the first time; its sealed SVID afterwards.
    let agent_dir = mesh.join("agent");
    let agent_cfg = mesh.join("agent.toml");
    std::fs::write(
        &agent_cfg,
        format!(
            "# Written by trustline-ca quickstart.\ntrust_domain = \"example.org\"\nca_address = \"{agent_addr}\"\ntrust_bundle = \"{}\"\ndata_dir = \"{}\"\n\n[keys]\nkey_file = \"{}\"\n",
            bundle_pem.display(),
            agent_dir.display(),
            mesh.join("agent-seal.key").display()
        ),
    )
    .map_err(|e| err("agent config", e))?;
    let mut agent_args = vec![
        "run".to_owned(),
        "--config".to_owned(),
        agent_cfg.display().to_string(),
    ];
    if !agent_dir.join("agent-svid.json").exists() {
        let t = c
            .generate_join_token(pb::GenerateJoinTokenRequest {
                ttl: 600,
                spiffe_id: NODE.into(),
            })
            .await
            .map_err(|s| err("join token", s.message()))?
            .into_inner();
        agent_args.extend(["--join-token".to_owned(), t.token]);
    }
    let args: Vec<&str> = agent_args.iter().map(String::as_str).collect();
    let (agent, line) = spawn(
        "agent",
        &agent_bin,
        &args,
        &logs.join("agent.log"),
        "trustline-agent ready:",
    )
    .await?;
    let socket = line
        .split(", ")
        .find_map(|p| p.strip_prefix("Workload API socket "))
        .map(str::trim)
        .ok_or_else(|| err("agent", "no Workload API socket in its ready line"))?
        .to_owned();
    let mut children = vec![("agent".to_owned(), agent)];
    println!("[ok] identity agent attested as {NODE}; Workload API at {socket}");

    // One registration entry per sidecar, selected by its binary's path.
    let existing = c
        .list_entries(pb::ListEntriesRequest {
            spiffe_id: String::new(),
            parent_id: NODE.into(),
            selector: String::new(),
        })
        .await
        .map_err(|s| err("list entries", s.message()))?
        .into_inner()
        .entries;
    for name in ["web", "api"] {
        let exe = mesh.join("bin").join(name).join("trustline-sidecar");
        install(&sidecar_bin, &exe)?;
        let id = format!("spiffe://example.org/{name}");
        if !existing.iter().any(|e| e.spiffe_id == id) {
            c.create_entry(pb::CreateEntryRequest {
                spec: Some(pb::EntrySpec {
                    spiffe_id: id.clone(),
                    parent_id: NODE.into(),
                    selectors: vec![format!("unix:path:{}", exe.display())],
                    ..Default::default()
                }),
            })
            .await
            .map_err(|s| err("create entry", s.message()))?;
        }
    }

    let app = app().await?;
    for (file, text) in [("10-allow.yaml", ALLOW), ("20-no-admin.yaml", DENY)] {
        let p = mesh.join("policies").join(file);
        if !p.exists() {
            std::fs::write(&p, text).map_err(|e| err(&p.display().to_string(), e))?;
        }
    }
    let common = format!("workload_api_socket = \"{socket}\"\nmetrics_listen = \"127.0.0.1:0\"\n");
    let api_cfg = mesh.join("api.toml");
    std::fs::write(
        &api_cfg,
        format!(
            "# Written by trustline-ca quickstart: the api service's sidecar.\n{common}policy_dir = \"{}\"\n\n[[inbound]]\nlisten = \"127.0.0.1:0\"\napp = \"{app}\"\n",
            mesh.join("policies").display()
        ),
    )
    .map_err(|e| err("api config", e))?;
    let api_exe = mesh.join("bin/api/trustline-sidecar");
    let (api, line) = spawn(
        "api sidecar",
        &api_exe,
        &["run", "--config", &api_cfg.display().to_string()],
        &logs.join("api.log"),
        "trustline-sidecar ready:",
    )
    .await?;
    children.push(("api sidecar".into(), api));
    let api_in = line
        .split_whitespace()
        .find_map(|p| p.strip_prefix("inbound="))
        .unwrap_or_default()
        .to_owned();
    let web_cfg = mesh.join("web.toml");
    std::fs::write(
        &web_cfg,
        format!(
            "# Written by trustline-ca quickstart: the web service's sidecar.\n{common}\n[[outbound]]\nlisten = \"{WEB_OUTBOUND}\"\n[[outbound.route]]\nhost = \"api\"\nupstream = \"{api_in}\"\nspiffe_ids = [\"spiffe://example.org/api\"]\n"
        ),
    )
    .map_err(|e| err("web config", e))?;
    let web_exe = mesh.join("bin/web/trustline-sidecar");
    let (web, _) = spawn(
        "web sidecar",
        &web_exe,
        &["run", "--config", &web_cfg.display().to_string()],
        &logs.join("web.log"),
        "trustline-sidecar ready:",
    )
    .await?;
    children.push(("web sidecar".into(), web));
    println!("[ok] local mesh: web --plaintext--> {WEB_OUTBOUND} (web sidecar) ==mTLS==> {api_in} (api sidecar, policy) --> app {app}");
    println!(
        "     policies: {}   logs: {}",
        mesh.join("policies").display(),
        logs.display()
    );
    Ok(Some(DemoMesh { children }))
}

/// One HTTP/1.1 request through web's sidecar; returns the status line and body.
pub async fn call(method: &str, path: &str) -> Result<(String, String), String> {
    let mut s = tokio::net::TcpStream::connect(WEB_OUTBOUND)
        .await
        .map_err(|e| err("connect", e))?;
    s.write_all(format!("{method} {path} HTTP/1.1\r\nhost: api\r\nconnection: close\r\n\r\n").as_bytes())
        .await
        .map_err(|e| err("send", e))?;
    let mut out = String::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_string(&mut out))
        .await
        .map_err(|_| err("request", "timed out"))?
        .map_err(|e| err("read", e))?;
    let status = out.lines().next().unwrap_or_default().to_owned();
    let body = out
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    Ok((status, body))
}

impl DemoMesh {
    /// SIGTERM to every process (they drain), then wait.
    pub async fn stop(mut self) {
        for (_, c) in self.children.iter_mut().rev() {
            if let Some(pid) = c.id() {
                let _ = Command::new("kill")
                    .arg("-TERM")
                    .arg(pid.to_string())
                    .status()
                    .await;
            }
        }
        for (name, c) in &mut self.children {
            if tokio::time::timeout(Duration::from_secs(20), c.wait())
                .await
                .is_err()
            {
                let _ = c.start_kill();
                eprintln!("{name} did not stop in time; killed");
            }
        }
    }
}
