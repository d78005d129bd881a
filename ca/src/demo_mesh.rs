//! The local mesh of `trustline up` (and `trustline-ca quickstart`): an identity agent and three services, all
//! real processes on loopback, so the first command shows mutual TLS, policy, the signed caller chain and the
//! accountability log on real requests:
//!
//! ```text
//! curl --plaintext--> web sidecar (outbound, 127.0.0.1:15001) ==mTLS==> api sidecar (inbound, policy) --> api app
//! api app --plaintext--> api sidecar (outbound) ==mTLS + caller chain==> payments sidecar (inbound) --> payments app
//! ```
//!
//! The agent tells the sidecars apart by executable path (`unix:path`), so each gets a private copy of the
//! sidecar binary under `<dir>/mesh/bin/<name>/`; in production each service's sidecar usually runs as its own uid
//! and is registered by `unix:uid`.

use std::net::SocketAddr;
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use crate::admin_api;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, Command};
use trustline_identity::lifecycle::PARENT_PID_ENV;
use trustline_proto::admin as pb;

/// How long a process of the mesh gets to print its ready line: generous, since a busy machine is slow to start
/// a debug build, and a process that fails says so and exits well before this.
const READY_TIMEOUT: Duration = Duration::from_secs(90);

/// The fixed address of web's outbound listener, for the tour (`curl -H 'host: api' http://127.0.0.1:15001/...`).
pub const WEB_OUTBOUND: &str = "127.0.0.1:15001";
const NODE: &str = "spiffe://example.org/trustline/agent/quickstart";

const ALLOW: &str = "# Written by the local mesh: web may GET and POST under /api/.\n\
name: web-reads-api\naction: ALLOW\nrules:\n  - from:\n      - source:\n          principals: [\"spiffe://example.org/web\"]\n    to:\n      - operation:\n          methods: [GET, POST]\n          paths: [\"/api/*\"]\n";
const DENY: &str = "# Written by the local mesh: nobody reaches /api/admin.\n\
name: no-admin\naction: DENY\nrules:\n  - to:\n      - operation:\n          paths: [\"/api/admin*\"]\n";
const PAYMENTS: &str = "# Written by the local mesh: payments takes calls from api, and only for requests that started at web\n\
# (the verified caller chain's first caller).\n\
name: payments-start-at-web\naction: ALLOW\nrules:\n  - from:\n      - source:\n          principals: [\"spiffe://example.org/api\"]\n    to:\n      - operation:\n          paths: [\"/payments/*\"]\n    when:\n      - key: request.chain.origin\n        values: [\"spiffe://example.org/web\"]\n";

/// How the agent and the sidecars are started: as the separate binaries next to this one, or as subcommands of
/// the `trustline` multi-call binary.
static MULTICALL: std::sync::OnceLock<std::path::PathBuf> = std::sync::OnceLock::new();

/// Makes the mesh start the agent and sidecars as `<exe> agent …` and `<exe> sidecar …` (the `trustline`
/// multi-call binary calls this before `up`).
pub fn use_multicall(exe: std::path::PathBuf) {
    let _ = MULTICALL.set(exe);
}

/// The command line that runs `tool` (`ca`, `agent`, `sidecar`, `audit`), for the hints printed to the user.
pub fn command(tool: &str) -> String {
    match MULTICALL.get() {
        Some(exe) => format!("{} {tool}", exe.display()),
        None => {
            let here = std::env::current_exe()
                .ok()
                .and_then(|p| p.parent().map(Path::to_path_buf))
                .unwrap_or_default();
            here.join(format!("trustline-{tool}")).display().to_string()
        }
    }
}

/// (binary, leading arguments) that run `tool`, if it is built.
fn launcher(tool: &str) -> Option<(std::path::PathBuf, Vec<String>)> {
    if let Some(exe) = MULTICALL.get() {
        return Some((exe.clone(), vec![tool.to_owned()]));
    }
    let here = std::env::current_exe().ok()?.parent()?.to_path_buf();
    let p = here.join(format!("trustline-{tool}"));
    p.exists().then_some((p, Vec::new()))
}

/// The mesh's processes, as far as they have started; [`stop`](Self::stop) ends them. [`start`] adds each process
/// as soon as it is spawned, so a mesh interrupted half-way (Ctrl-C during startup) still stops everything.
#[derive(Default)]
pub struct DemoMesh {
    children: Vec<(String, Child)>,
    /// The sidecars' accountability logs.
    pub audit_dirs: Vec<std::path::PathBuf>,
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
    args: &[String],
    log: &Path,
    ready: &str,
) -> Result<(Child, String), String> {
    let logf = std::fs::File::create(log).map_err(|e| err(&log.display().to_string(), e))?;
    let mut child = Command::new(exe)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(logf)
        // Its own process group: a Ctrl-C in the terminal reaches only `up`, which stops its children in order
        // (sidecars first, then the agent) instead of all of them dying at once mid-start.
        .process_group(0)
        // The child asks the kernel for SIGTERM when this process dies (identity::lifecycle::exit_with_parent),
        // so a `kill -9` of `up` leaves nothing behind. The kernel ties that to the thread that forks: `up`
        // spawns from the thread that runs its main future, which lives as long as the process.
        .env(PARENT_PID_ENV, std::process::id().to_string())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| err(&format!("start {}", exe.display()), e))?;
    let stdout = child.stdout.take().ok_or_else(|| err(name, "no stdout"))?;
    let mut lines = BufReader::new(stdout).lines();
    let line = tokio::time::timeout(READY_TIMEOUT, async {
        while let Ok(Some(l)) = lines.next_line().await {
            if l.starts_with(ready) {
                return Some(l);
            }
        }
        None
    })
    .await
    .ok()
    .flatten();
    let Some(line) = line else {
        let status = child.try_wait().ok().flatten();
        let _ = child.start_kill();
        // Say why: the last lines the process wrote (its errors are one line each).
        let text = std::fs::read_to_string(log).unwrap_or_default();
        let tail: Vec<&str> = text.lines().rev().take(3).collect();
        let why = tail.into_iter().rev().collect::<Vec<_>>().join(" | ");
        return Err(err(
            name,
            format!(
                "did not start ({}): {} (full log: {})",
                status.map_or(
                    format!("no ready line within {} s", READY_TIMEOUT.as_secs()),
                    |s| s.to_string()
                ),
                if why.is_empty() { "no output" } else { &why },
                log.display()
            ),
        ));
    };
    // Keep draining stdout so the child never blocks on a full pipe.
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    Ok((child, line))
}

/// The first callers of a `trustline-caller-chain` value, oldest first (display only: the sidecar in front of
/// the app verified every hop before passing the header on).
fn chain_callers(value: &str) -> Vec<String> {
    use base64::Engine as _;
    value
        .split(',')
        .filter_map(|hop| hop.split('.').next())
        .filter_map(|p| base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(p).ok())
        .filter_map(|j| serde_json::from_slice::<serde_json::Value>(&j).ok())
        .filter_map(|v| v.get("from").and_then(|f| f.as_str()).map(str::to_owned))
        .collect()
}

fn header(req: &axum::extract::Request, name: &str) -> String {
    req.headers()
        .get(name)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned()
}

/// A tiny app for the demo: answers every request with JSON naming the caller the sidecar vouched for and the
/// verified caller chain. `api`'s `/api/checkout` calls `payments` through api's own sidecar (`onward`),
/// propagating the caller chain and `traceparent` as an instrumented app does.
async fn app(
    service: &'static str,
    onward: Option<std::sync::Arc<std::sync::OnceLock<String>>>,
) -> Result<SocketAddr, String> {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .map_err(|e| err(&format!("{service} app listener"), e))?;
    let addr = l
        .local_addr()
        .map_err(|e| err(&format!("{service} app listener"), e))?;
    let router = axum::Router::new().fallback(move |req: axum::extract::Request| {
        let onward = onward.clone();
        async move {
            let chain = header(&req, "trustline-caller-chain");
            let trace = header(&req, "traceparent");
            let mut out = serde_json::json!({
                "service": service,
                "path": req.uri().path(),
                "x-forwarded-client-cert": header(&req, "x-forwarded-client-cert"),
                "caller_chain": chain_callers(&chain),
                "traceparent": trace,
            });
            if let (Some(via), "/api/checkout") = (onward.as_ref().and_then(|o| o.get()), req.uri().path()) {
                let mut extra = vec![("traceparent", trace.as_str())];
                if !chain.is_empty() {
                    extra.push(("trustline-caller-chain", chain.as_str()));
                }
                out["payments"] = match request(via, "POST", "payments", "/payments/charge", &extra).await {
                    Ok((status, body)) => serde_json::json!({
                        "status": status,
                        "body": serde_json::from_str::<serde_json::Value>(body.trim()).unwrap_or(serde_json::Value::String(body)),
                    }),
                    Err(e) => serde_json::Value::String(e),
                };
            }
            axum::Json(out)
        }
    });
    tokio::spawn(async move {
        let _ = axum::serve(l, router).await;
    });
    Ok(addr)
}

/// What starting a sidecar needs from the mesh.
struct Ctx<'a> {
    admin: pb::admin_client::AdminClient<tonic::transport::Channel>,
    existing: Vec<trustline_proto::agent::Entry>,
    mesh: &'a Path,
    socket: String,
    bin: std::path::PathBuf,
    pre: Vec<String>,
}

/// One sidecar of the mesh: registered by the path of its private binary copy, configured, started.
struct SidecarSpec<'a> {
    name: &'static str,
    body: String,
    policies: &'a [(&'a str, &'a str)],
}

/// Starts the agent, the apps and the three sidecars into `m`. `Ok(false)` when the agent or sidecar binary is not
/// built.
pub async fn start(
    m: &mut DemoMesh,
    dir: &Path,
    admin_socket: &Path,
    agent_addr: SocketAddr,
    bundle_pem: &Path,
) -> Result<bool, String> {
    let (Some((agent_bin, agent_pre)), Some((sidecar_bin, sidecar_pre))) =
        (launcher("agent"), launcher("sidecar"))
    else {
        println!(
            "[--] local mesh skipped: trustline-agent and trustline-sidecar are not built next to this binary\n     \
             (run `cargo run --release -- up` from the repository, or build everything with\n     \
             cargo build --release --workspace --bins)"
        );
        return Ok(false);
    };
    let mesh = dir.join("mesh");
    let logs = mesh.join("logs");
    for d in [&logs, &mesh.join("audit")] {
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
            "# Written by the local mesh.\ntrust_domain = \"example.org\"\nca_address = \"{agent_addr}\"\ntrust_bundle = \"{}\"\ndata_dir = \"{}\"\n\n[keys]\nkey_file = \"{}\"\n",
            bundle_pem.display(),
            agent_dir.display(),
            mesh.join("agent-seal.key").display()
        ),
    )
    .map_err(|e| err("agent config", e))?;
    let mut agent_args = agent_pre;
    agent_args.extend([
        "run".to_owned(),
        "--config".to_owned(),
        agent_cfg.display().to_string(),
    ]);
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
    let (agent, line) = spawn(
        "identity agent",
        &agent_bin,
        &agent_args,
        &logs.join("agent.log"),
        "trustline-agent ready:",
    )
    .await?;
    let socket = line
        .split(", ")
        .find_map(|p| p.strip_prefix("Workload API socket "))
        .map(str::trim)
        .ok_or_else(|| err("identity agent", "no Workload API socket in its ready line"))?
        .to_owned();
    m.children.push(("identity agent".to_owned(), agent));
    println!("[ok] identity agent attested as {NODE}; Workload API at {socket}");

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

    let mut ctx = Ctx {
        admin: c,
        existing,
        mesh: &mesh,
        socket,
        bin: sidecar_bin,
        pre: sidecar_pre,
    };
    // payments, then api (which calls payments), then web (which calls api): each sidecar starts once its
    // upstream is listening.
    let payments_app = app("payments", None).await?;
    let payments_in = m
        .sidecar(
            &mut ctx,
            SidecarSpec {
                name: "payments",
                body: format!("[[inbound]]\nlisten = \"127.0.0.1:0\"\napp = \"{payments_app}\"\n"),
                policies: &[("10-payments-start-at-web.yaml", PAYMENTS)],
            },
        )
        .await?;
    let onward = std::sync::Arc::new(std::sync::OnceLock::new());
    let api_app = app("api", Some(onward.clone())).await?;
    let api_line = m.sidecar(
            &mut ctx,
            SidecarSpec {
                name: "api",
                body: format!(
                    "[[inbound]]\nlisten = \"127.0.0.1:0\"\napp = \"{api_app}\"\n\n[[outbound]]\nlisten = \"127.0.0.1:0\"\n[[outbound.route]]\nhost = \"payments\"\nupstream = \"{}\"\nspiffe_ids = [\"spiffe://example.org/payments\"]\n",
                    first(&payments_in, "inbound=")
                ),
                policies: &[("10-allow.yaml", ALLOW), ("20-no-admin.yaml", DENY)],
            },
        )
        .await?;
    let _ = onward.set(first(&api_line, "outbound="));
    let api_in = first(&api_line, "inbound=");
    m.sidecar(
            &mut ctx,
            SidecarSpec {
            name: "web",
            body: format!(
                "[[outbound]]\nlisten = \"{WEB_OUTBOUND}\"\n[[outbound.route]]\nhost = \"api\"\nupstream = \"{api_in}\"\nspiffe_ids = [\"spiffe://example.org/api\"]\n"
            ),
            policies: &[],
        },
    )
    .await?;
    println!("[ok] local mesh:");
    println!("     curl --> {WEB_OUTBOUND} (web sidecar) ==mTLS==> {api_in} (api sidecar, policy) --> api app {api_app}");
    println!(
        "     api app --> api sidecar ==mTLS + caller chain==> {} (payments sidecar, policy) --> payments app {payments_app}",
        first(&payments_in, "inbound=")
    );
    println!(
        "     config and policies: {}   process logs: {}",
        mesh.display(),
        logs.display()
    );
    Ok(true)
}

/// The first address after `key` in a sidecar's ready line.
fn first(ready: &str, key: &str) -> String {
    ready
        .split_whitespace()
        .find_map(|p| p.strip_prefix(key))
        .and_then(|v| v.split(',').next())
        .unwrap_or_default()
        .to_owned()
}

/// One HTTP/1.1 request through web's sidecar; returns the status line and body.
pub async fn call(method: &str, path: &str) -> Result<(String, String), String> {
    request(WEB_OUTBOUND, method, "api", path, &[]).await
}

/// One HTTP/1.1 request to `addr` with `Host: host` and extra headers; returns the status line and body.
async fn request(
    addr: &str,
    method: &str,
    host: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> Result<(String, String), String> {
    let mut s = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| err(&format!("connect {addr}"), e))?;
    let mut head =
        format!("{method} {path} HTTP/1.1\r\nhost: {host}\r\nconnection: close\r\ncontent-length: 0\r\n");
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    s.write_all(head.as_bytes()).await.map_err(|e| err("send", e))?;
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
    /// Registers (once), configures and starts one sidecar; returns its ready line.
    async fn sidecar(&mut self, ctx: &mut Ctx<'_>, spec: SidecarSpec<'_>) -> Result<String, String> {
        let (mesh, socket, bin, pre) = (
            ctx.mesh,
            ctx.socket.as_str(),
            ctx.bin.as_path(),
            ctx.pre.as_slice(),
        );
        let name = spec.name;
        let exe_dir = mesh.join("bin").join(name);
        std::fs::create_dir_all(&exe_dir).map_err(|e| err(&exe_dir.display().to_string(), e))?;
        let exe = exe_dir.join(bin.file_name().unwrap_or_default());
        install(bin, &exe)?;
        let id = format!("spiffe://example.org/{name}");
        if !ctx.existing.iter().any(|e| e.spiffe_id == id) {
            ctx.admin
                .clone()
                .create_entry(pb::CreateEntryRequest {
                    spec: Some(pb::EntrySpec {
                        spiffe_id: id.clone(),
                        parent_id: NODE.into(),
                        selectors: vec![format!("unix:path:{}", exe.display())],
                        ..Default::default()
                    }),
                })
                .await
                .map_err(|s| err(&format!("{name}: create entry"), s.message()))?;
        }
        let policies = mesh.join("policies").join(name);
        std::fs::create_dir_all(&policies).map_err(|e| err(&policies.display().to_string(), e))?;
        for (file, text) in spec.policies {
            let p = policies.join(file);
            if !p.exists() {
                std::fs::write(&p, text).map_err(|e| err(&p.display().to_string(), e))?;
            }
        }
        let audit = mesh.join("audit").join(name);
        let cfg = mesh.join(format!("{name}.toml"));
        std::fs::write(
            &cfg,
            format!(
                "# Written by the local mesh: the {name} service's sidecar.\nworkload_api_socket = \"{socket}\"\nmetrics_listen = \"127.0.0.1:0\"\npolicy_dir = \"{}\"\n\n[log]\ndir = \"{}\"\n\n{}",
                policies.display(),
                audit.display(),
                spec.body
            ),
        )
        .map_err(|e| err(&format!("{name} sidecar config"), e))?;
        let mut args = pre.to_vec();
        args.extend(["run".to_owned(), "--config".to_owned(), cfg.display().to_string()]);
        let label = format!("{name} sidecar");
        let (child, line) = spawn(
            &label,
            &exe,
            &args,
            &mesh.join("logs").join(format!("{name}.log")),
            "trustline-sidecar ready:",
        )
        .await?;
        self.children.push((label, child));
        self.audit_dirs.push(audit);
        println!(
            "[ok] {name} sidecar is {id}: {}",
            line.trim_start_matches("trustline-sidecar ready: ")
        );
        Ok(line)
    }

    /// SIGTERM to every process, newest first (they drain), then wait; a process still running after 20 s is
    /// killed.
    pub async fn stop(&mut self) {
        for (_, c) in self.children.iter_mut().rev() {
            if let Some(pid) = c.id().and_then(|p| i32::try_from(p).ok()) {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGTERM,
                );
            }
        }
        for (name, mut c) in self.children.drain(..) {
            if tokio::time::timeout(Duration::from_secs(20), c.wait())
                .await
                .is_err()
            {
                let _ = c.start_kill();
                let _ = c.wait().await;
                eprintln!("{name} did not stop in time; killed");
            }
        }
    }
}
