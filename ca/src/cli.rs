//! Command-line parsing and output. Errors print as one line `Error: …` and exit 1.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use crate::admin_api;
use crate::config::{parse_duration, Config};
use clap::{Args, Parser, Subcommand, ValueEnum};
use serde_json::json;
use trustline_identity::bundle::certs_to_pem;
use trustline_identity::lifecycle::Shutdown;
use trustline_proto::admin as pb;
use trustline_proto::agent as apb;

const DEFAULT_SOCKET: &str = ".trustline/ca/admin.sock";

/// The Trustline certificate authority.
#[derive(Parser, Debug)]
#[command(name = "trustline-ca", version, about, long_about = None)]
struct Cli {
    /// Admin socket of the running CA.
    #[arg(long, global = true, env = "TRUSTLINE_CA_SOCKET")]
    socket: Option<PathBuf>,
    /// Read the admin socket path from this CA config file.
    #[arg(long, global = true)]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the CA.
    ///
    /// Example: trustline-ca run --config /etc/trustline/ca.toml
    Run {
        /// Load and check the configuration (and keys/store reachability is not tested), then exit.
        #[arg(long)]
        validate: bool,
    },
    /// Bring up a local mesh on embedded defaults (SQLite, software keys, loopback): a CA, a first SVID, and
    /// (when the agent and sidecar are built next to this binary, or under `trustline up`) an agent and three
    /// services (web -> api -> payments) talking through sidecars with mutual TLS, policy, the signed caller chain
    /// and the accountability log.
    ///
    /// Example: cargo run --release -- up     (from the repository: the `trustline` binary)
    #[command(alias = "up")]
    Quickstart {
        /// State folder (created if missing; reused on the next run).
        #[arg(long, default_value = ".trustline")]
        dir: PathBuf,
        /// Exit after the demo requests instead of serving until Ctrl-C.
        #[arg(long)]
        exit: bool,
        /// Start only the CA (no agent, sidecars or app).
        #[arg(long)]
        ca_only: bool,
    },
    /// Registration entries.
    #[command(subcommand)]
    Entry(EntryCmd),
    /// Join tokens for node attestation.
    #[command(subcommand)]
    Token(TokenCmd),
    /// Attested agents: list them, evict one.
    #[command(subcommand)]
    Agent(AgentCmd),
    /// The trust bundle.
    #[command(subcommand)]
    Bundle(BundleCmd),
    /// The CA's own keys.
    #[command(subcommand)]
    Ca(CaCmd),
    /// The record of everything issued.
    #[command(subcommand)]
    Issued(IssuedCmd),
    /// X.509-SVIDs signed from your own CSR.
    #[command(subcommand)]
    X509(X509Cmd),
    /// JWT-SVIDs.
    #[command(subcommand)]
    Jwt(JwtCmd),
    /// Check that the CA is up and ready (exit 0) or not (exit 1).
    ///
    /// Example: trustline-ca healthcheck --socket /run/trustline/ca.sock
    Healthcheck,
}

#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq)]
enum Output {
    Pretty,
    Json,
}

#[derive(Args, Debug)]
struct EntryFields {
    /// SPIFFE ID the workload gets, e.g. spiffe://example.org/web.
    #[arg(long = "spiffe-id", visible_alias = "spiffeID")]
    spiffe_id: Option<String>,
    /// SPIFFE ID of the node (agent) allowed to issue it.
    #[arg(long = "parent-id", visible_alias = "parentID")]
    parent_id: Option<String>,
    /// Selector type:value (repeatable), e.g. unix:uid:1000.
    #[arg(long = "selector")]
    selectors: Vec<String>,
    /// X.509-SVID lifetime (e.g. 1h, 30m, or seconds); default: the CA's.
    #[arg(long = "x509-ttl")]
    x509_ttl: Option<String>,
    /// JWT-SVID lifetime; default: the CA's.
    #[arg(long = "jwt-ttl")]
    jwt_ttl: Option<String>,
    /// DNS name for the X.509-SVID (repeatable).
    #[arg(long = "dns")]
    dns: Vec<String>,
    /// Mark the entry as admin.
    #[arg(long)]
    admin: Option<bool>,
}

#[derive(Subcommand, Debug)]
enum EntryCmd {
    /// Create an entry.
    ///
    /// Example: trustline-ca entry create --spiffe-id spiffe://example.org/web
    ///   --parent-id spiffe://example.org/trustline/agent/join_token/abc --selector unix:uid:1000
    Create {
        #[command(flatten)]
        fields: EntryFields,
        #[arg(long, value_enum, default_value = "pretty")]
        output: Output,
    },
    /// Update an entry; flags given replace the stored values (repeatable flags replace the whole list).
    ///
    /// Example: trustline-ca entry update --id 3f2a… --x509-ttl 30m
    Update {
        /// Entry id.
        #[arg(long)]
        id: String,
        #[command(flatten)]
        fields: EntryFields,
        #[arg(long, value_enum, default_value = "pretty")]
        output: Output,
    },
    /// List entries.
    ///
    /// Example: trustline-ca entry list --parent-id spiffe://example.org/trustline/agent/web-1 --output json
    List {
        /// Only this SPIFFE ID.
        #[arg(long = "spiffe-id")]
        spiffe_id: Option<String>,
        /// Only entries under this parent.
        #[arg(long = "parent-id")]
        parent_id: Option<String>,
        /// Only entries with this selector.
        #[arg(long)]
        selector: Option<String>,
        #[arg(long, value_enum, default_value = "pretty")]
        output: Output,
    },
    /// Show one entry.
    ///
    /// Example: trustline-ca entry show --id 3f2a…
    Show {
        /// Entry id.
        #[arg(long)]
        id: String,
        #[arg(long, value_enum, default_value = "pretty")]
        output: Output,
    },
    /// Delete an entry.
    ///
    /// Example: trustline-ca entry delete --id 3f2a…
    Delete {
        /// Entry id.
        #[arg(long)]
        id: String,
    },
}

#[derive(Subcommand, Debug)]
enum TokenCmd {
    /// Generate a one-time join token.
    ///
    /// Example: trustline-ca token generate --ttl 10m --spiffe-id spiffe://example.org/trustline/agent/web-1
    Generate {
        /// Token lifetime (default 10m).
        #[arg(long)]
        ttl: Option<String>,
        /// SPIFFE ID the attested node gets, under spiffe://<td>/trustline/agent/ (default
        /// .../trustline/agent/join_token/<token>).
        #[arg(long = "spiffe-id", visible_alias = "spiffeID")]
        spiffe_id: Option<String>,
        #[arg(long, value_enum, default_value = "pretty")]
        output: Output,
    },
}

#[derive(Subcommand, Debug)]
enum AgentCmd {
    /// Every attested agent: ID, how it attested, its current SVID.
    ///
    /// Example: trustline-ca agent list --output json
    List {
        #[arg(long, value_enum, default_value = "pretty")]
        output: Output,
    },
    /// Evict an agent: its renewals, entry fetches and SVID requests are refused from now on, and its update stream
    /// ends; SVIDs it already holds stay valid until they expire. It can come back only by attesting again.
    ///
    /// Example: trustline-ca agent evict --spiffe-id spiffe://example.org/trustline/agent/web-1
    Evict {
        /// The agent's SPIFFE ID.
        #[arg(long = "spiffe-id", visible_alias = "spiffeID")]
        spiffe_id: String,
    },
}

#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq)]
enum BundleFormat {
    Pem,
    Jwks,
}

#[derive(Subcommand, Debug)]
enum BundleCmd {
    /// Print the trust bundle.
    ///
    /// Example: trustline-ca bundle show --format pem > bundle.pem
    Show {
        #[arg(long, value_enum, default_value = "pem")]
        format: BundleFormat,
    },
}

#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq)]
enum KindArg {
    All,
    X509,
    Jwt,
}

#[derive(Subcommand, Debug)]
enum CaCmd {
    /// Advance key rotation one phase: prepare a next key (published in the bundle) if none is prepared, else
    /// activate the prepared key. Run it twice, some time apart, to rotate by hand.
    ///
    /// Example: trustline-ca ca rotate --kind x509
    Rotate {
        #[arg(long, value_enum, default_value = "all")]
        kind: KindArg,
        #[arg(long, value_enum, default_value = "pretty")]
        output: Output,
    },
    /// Show the CA keys and their phases.
    ///
    /// Example: trustline-ca ca status --output json
    Status {
        #[arg(long, value_enum, default_value = "pretty")]
        output: Output,
    },
}

#[derive(Subcommand, Debug)]
enum IssuedCmd {
    /// List issued SVIDs, newest first.
    ///
    /// Example: trustline-ca issued list --spiffe-id spiffe://example.org/web --limit 20
    List {
        #[arg(long = "spiffe-id")]
        spiffe_id: Option<String>,
        /// Only this serial (hex).
        #[arg(long)]
        serial: Option<String>,
        #[arg(long, default_value_t = 100)]
        limit: i64,
        #[arg(long, value_enum, default_value = "pretty")]
        output: Output,
    },
}

#[derive(Subcommand, Debug)]
enum X509Cmd {
    /// Sign an X.509-SVID for your own CSR (your key never leaves you).
    ///
    /// Example: openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout k.pem -subj /O=x
    ///   -out req.pem && trustline-ca x509 mint --csr req.pem --spiffe-id spiffe://example.org/web --write out/
    Mint {
        /// PKCS#10 CSR, PEM or DER.
        #[arg(long)]
        csr: PathBuf,
        #[arg(long = "spiffe-id", visible_alias = "spiffeID")]
        spiffe_id: String,
        /// Lifetime (default: the CA's X.509-SVID TTL).
        #[arg(long)]
        ttl: Option<String>,
        /// DNS name (repeatable).
        #[arg(long)]
        dns: Vec<String>,
        /// Write svid.pem and bundle.pem into this folder instead of printing.
        #[arg(long)]
        write: Option<PathBuf>,
    },
}

#[derive(Subcommand, Debug)]
enum JwtCmd {
    /// Mint a JWT-SVID.
    ///
    /// Example: trustline-ca jwt mint --spiffe-id spiffe://example.org/web --audience payments
    Mint {
        #[arg(long = "spiffe-id", visible_alias = "spiffeID")]
        spiffe_id: String,
        /// Audience (repeatable, at least one).
        #[arg(long)]
        audience: Vec<String>,
        #[arg(long)]
        ttl: Option<String>,
    },
}

/// An error for the user: one line.
#[derive(Debug, thiserror::Error)]
enum CliError {
    #[error("{0}")]
    Msg(String),
    #[error(
        "cannot reach the CA admin socket {path}: {reason} (is the CA running? pass --socket or --config)"
    )]
    Connect { path: String, reason: String },
    #[error("{}", status_line(.0))]
    Status(tonic::Status),
}

fn status_line(s: &tonic::Status) -> String {
    let code = match s.code() {
        tonic::Code::InvalidArgument => "invalid argument",
        tonic::Code::NotFound => "not found",
        tonic::Code::AlreadyExists => "already exists",
        tonic::Code::PermissionDenied => "permission denied",
        tonic::Code::Unauthenticated => "unauthenticated",
        tonic::Code::Unavailable => "CA unavailable",
        _ => "CA error",
    };
    format!("{code}: {}", s.message())
}

impl From<tonic::Status> for CliError {
    fn from(s: tonic::Status) -> Self {
        CliError::Status(s)
    }
}

fn msg(s: impl Into<String>) -> CliError {
    CliError::Msg(s.into())
}

fn init_tracing() {
    init_tracing_at("info");
}

/// Logs to stderr at `default` unless `TRUSTLINE_LOG` says otherwise.
fn init_tracing_at(default: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("TRUSTLINE_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}

/// Runs the `trustline-ca` command line with `args` (the first is the program name), as the binary does; the
/// `trustline` multi-call binary calls it too.
pub fn main_with<I, T>(args: I) -> ExitCode
where
    I: IntoIterator<Item = T>,
    T: Into<std::ffi::OsString> + Clone,
{
    let cli = Cli::parse_from(args);
    let rt = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("Error: cannot start runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(cli)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("Error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn parse_ttl(flag: &str, v: &Option<String>) -> Result<Option<i64>, CliError> {
    match v {
        None => Ok(None),
        Some(s) => {
            if let Ok(n) = s.parse::<i64>() {
                return Ok(Some(n));
            }
            parse_duration(s)
                .map(|d| Some(d.as_secs() as i64))
                .map_err(|e| msg(format!("{flag} {s:?}: {e}")))
        }
    }
}

fn socket_path(cli: &Cli) -> Result<PathBuf, CliError> {
    if let Some(s) = &cli.socket {
        return Ok(s.clone());
    }
    if let Some(c) = &cli.config {
        let v = Config::load(c).map_err(|e| msg(e.to_string()))?;
        return Ok(v.admin_socket);
    }
    Ok(PathBuf::from(DEFAULT_SOCKET))
}

async fn client(cli: &Cli) -> Result<pb::admin_client::AdminClient<tonic::transport::Channel>, CliError> {
    let path = socket_path(cli)?;
    admin_api::connect(&path).await.map_err(|e| CliError::Connect {
        path: path.display().to_string(),
        reason: std::error::Error::source(&e).map_or_else(|| e.to_string(), |s| s.to_string()),
    })
}

async fn run(cli: Cli) -> Result<ExitCode, CliError> {
    match &cli.command {
        Command::Run { validate } => {
            let path = cli.config.clone().ok_or_else(|| msg("run needs --config FILE"))?;
            let cfg = Config::load(&path).map_err(|e| msg(e.to_string()))?;
            if *validate {
                println!(
                    "config {} is valid (trust domain {})",
                    path.display(),
                    cfg.trust_domain
                );
                return Ok(ExitCode::SUCCESS);
            }
            init_tracing();
            serve(cfg).await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Quickstart { dir, exit, ca_only } => {
            // The tour prints its own progress; the CA's routine log lines would bury it.
            init_tracing_at("warn");
            let dir = std::path::absolute(dir).map_err(|e| msg(format!("--dir {}: {e}", dir.display())))?;
            quickstart(&dir, *exit, *ca_only).await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Healthcheck => {
            let mut c = client(&cli).await?;
            let h = c.health(pb::HealthRequest {}).await?.into_inner();
            if h.ready {
                println!("CA is healthy (trust domain {}): {}", h.trust_domain, h.message);
                Ok(ExitCode::SUCCESS)
            } else {
                println!("CA is not ready: {}", h.message);
                Ok(ExitCode::FAILURE)
            }
        }
        Command::Entry(cmd) => entry(&cli, cmd).await,
        Command::Agent(AgentCmd::List { output }) => {
            let mut c = client(&cli).await?;
            let agents = c.list_agents(pb::ListAgentsRequest {}).await?.into_inner().agents;
            for a in &agents {
                if *output == Output::Json {
                    println!(
                        "{}",
                        json!({"spiffe_id": a.spiffe_id, "attestation_type": a.attestation_type, "serial": a.serial,
                               "expires_at": a.expires_at, "created_at": a.created_at, "updated_at": a.updated_at})
                    );
                } else {
                    println!(
                        "{}  {}  SVID {} expires {}",
                        a.spiffe_id,
                        a.attestation_type,
                        a.serial,
                        fmt_time(a.expires_at)
                    );
                }
            }
            if agents.is_empty() && *output != Output::Json {
                println!("no attested agents");
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Agent(AgentCmd::Evict { spiffe_id }) => {
            let mut c = client(&cli).await?;
            c.evict_agent(pb::EvictAgentRequest {
                spiffe_id: spiffe_id.clone(),
            })
            .await?;
            println!("evicted {spiffe_id}");
            Ok(ExitCode::SUCCESS)
        }
        Command::Token(TokenCmd::Generate {
            ttl,
            spiffe_id,
            output,
        }) => {
            let ttl = parse_ttl("--ttl", ttl)?.unwrap_or(0);
            let mut c = client(&cli).await?;
            let t = c
                .generate_join_token(pb::GenerateJoinTokenRequest {
                    ttl,
                    spiffe_id: spiffe_id.clone().unwrap_or_default(),
                })
                .await?
                .into_inner();
            if *output == Output::Json {
                println!(
                    "{}",
                    json!({"token": t.token, "expires_at": t.expires_at, "agent_spiffe_id": t.agent_spiffe_id})
                );
            } else {
                println!("Token: {}", t.token);
                println!("Agent SPIFFE ID: {}", t.agent_spiffe_id);
                println!("Expires at: {}", fmt_time(t.expires_at));
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Bundle(BundleCmd::Show { format }) => {
            let mut c = client(&cli).await?;
            let b = c.get_bundle(pb::GetBundleRequest {}).await?.into_inner();
            match format {
                BundleFormat::Pem => print!("{}", certs_to_pem(&b.x509_authorities)),
                BundleFormat::Jwks => {
                    let v: serde_json::Value =
                        serde_json::from_slice(&b.jwks).map_err(|e| msg(format!("bundle JSON: {e}")))?;
                    println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Ca(CaCmd::Rotate { kind, output }) => {
            let kind = match kind {
                KindArg::All => "",
                KindArg::X509 => "x509",
                KindArg::Jwt => "jwt",
            };
            let mut c = client(&cli).await?;
            let st = c
                .rotate_ca(pb::RotateCaRequest { kind: kind.into() })
                .await?
                .into_inner();
            print_status(&st, *output);
            Ok(ExitCode::SUCCESS)
        }
        Command::Ca(CaCmd::Status { output }) => {
            let mut c = client(&cli).await?;
            let st = c.get_ca_status(pb::GetCaStatusRequest {}).await?.into_inner();
            print_status(&st, *output);
            Ok(ExitCode::SUCCESS)
        }
        Command::Issued(IssuedCmd::List {
            spiffe_id,
            serial,
            limit,
            output,
        }) => {
            let mut c = client(&cli).await?;
            let r = c
                .list_issued(pb::ListIssuedRequest {
                    spiffe_id: spiffe_id.clone().unwrap_or_default(),
                    limit: *limit,
                    serial: serial.clone().unwrap_or_default(),
                })
                .await?
                .into_inner();
            for i in &r.issued {
                if *output == Output::Json {
                    println!(
                        "{}",
                        json!({"serial": i.serial, "spiffe_id": i.spiffe_id, "kind": i.kind, "issued_at": i.issued_at,
                               "not_after": i.not_after, "signing_key_id": i.signing_key_id, "requested_by": i.requested_by})
                    );
                } else {
                    println!(
                        "{}  {:4}  {}  expires {}  key {}  by {}",
                        i.serial,
                        i.kind,
                        i.spiffe_id,
                        fmt_time(i.not_after),
                        i.signing_key_id,
                        i.requested_by
                    );
                }
            }
            if *output == Output::Pretty {
                println!("{} record(s)", r.issued.len());
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::X509(X509Cmd::Mint {
            csr,
            spiffe_id,
            ttl,
            dns,
            write,
        }) => {
            let raw = std::fs::read(csr).map_err(|e| msg(format!("--csr {}: {e}", csr.display())))?;
            let der = match std::str::from_utf8(&raw) {
                Ok(text) if text.contains("-----BEGIN") => pem::parse(text)
                    .map_err(|e| msg(format!("--csr {}: {e}", csr.display())))?
                    .into_contents(),
                _ => raw,
            };
            let ttl = parse_ttl("--ttl", ttl)?.unwrap_or(0);
            let mut c = client(&cli).await?;
            let svid = c
                .mint_x509svid(pb::MintX509svidRequest {
                    csr: der,
                    spiffe_id: spiffe_id.clone(),
                    ttl,
                    dns_names: dns.clone(),
                })
                .await?
                .into_inner();
            let bundle = c.get_bundle(pb::GetBundleRequest {}).await?.into_inner();
            let chain = certs_to_pem(&svid.cert_chain);
            match write {
                Some(dir) => {
                    std::fs::create_dir_all(dir)
                        .map_err(|e| msg(format!("--write {}: {e}", dir.display())))?;
                    let sp = dir.join("svid.pem");
                    let bp = dir.join("bundle.pem");
                    std::fs::write(&sp, chain).map_err(|e| msg(format!("{}: {e}", sp.display())))?;
                    std::fs::write(&bp, certs_to_pem(&bundle.x509_authorities))
                        .map_err(|e| msg(format!("{}: {e}", bp.display())))?;
                    println!(
                        "wrote {} and {} (serial {})",
                        sp.display(),
                        bp.display(),
                        svid.serial
                    );
                }
                None => print!("{chain}"),
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Jwt(JwtCmd::Mint {
            spiffe_id,
            audience,
            ttl,
        }) => {
            let ttl = parse_ttl("--ttl", ttl)?.unwrap_or(0);
            let mut c = client(&cli).await?;
            let t = c
                .mint_jwtsvid(pb::MintJwtsvidRequest {
                    spiffe_id: spiffe_id.clone(),
                    audience: audience.clone(),
                    ttl,
                })
                .await?
                .into_inner();
            println!("{}", t.token);
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn fmt_time(unix: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp(unix)
        .ok()
        .and_then(|t| t.format(&time::format_description::well_known::Rfc3339).ok())
        .unwrap_or_else(|| unix.to_string())
}

fn entry_json(e: &apb::Entry) -> serde_json::Value {
    json!({
        "id": e.id, "spiffe_id": e.spiffe_id, "parent_id": e.parent_id,
        "selectors": e.selectors.iter().map(|s| format!("{}:{}", s.r#type, s.value)).collect::<Vec<_>>(),
        "x509_svid_ttl": e.x509_svid_ttl, "jwt_svid_ttl": e.jwt_svid_ttl, "dns_names": e.dns_names,
        "admin": e.admin, "revision": e.revision, "created_at": e.created_at,
    })
}

fn print_entry(e: &apb::Entry) {
    let ttl = |s: i64| {
        if s == 0 {
            "default".to_owned()
        } else {
            format!("{s}s")
        }
    };
    println!("Entry ID         : {}", e.id);
    println!("SPIFFE ID        : {}", e.spiffe_id);
    println!("Parent ID        : {}", e.parent_id);
    println!("Revision         : {}", e.revision);
    println!("X509-SVID TTL    : {}", ttl(e.x509_svid_ttl));
    println!("JWT-SVID TTL     : {}", ttl(e.jwt_svid_ttl));
    for s in &e.selectors {
        println!("Selector         : {}:{}", s.r#type, s.value);
    }
    for d in &e.dns_names {
        println!("DNS name         : {d}");
    }
    if e.admin {
        println!("Admin            : true");
    }
    println!();
}

fn print_status(st: &pb::CaStatus, output: Output) {
    if output == Output::Json {
        let keys: Vec<_> = st
            .keys
            .iter()
            .map(|k| {
                json!({"id": k.id, "kind": k.kind, "state": k.state, "key_type": k.key_type, "not_before": k.not_before,
                       "not_after": k.not_after, "created_at": k.created_at, "activated_at": k.activated_at,
                       "retired_at": k.retired_at, "public_key_sha256": k.public_key_sha256})
            })
            .collect();
        println!(
            "{}",
            json!({"keys": keys, "message": st.message, "backend": st.backend})
        );
        return;
    }
    if !st.message.is_empty() {
        println!("{}", st.message);
    }
    println!("key backend: {}", st.backend);
    for k in &st.keys {
        println!(
            "{:4}  {:8}  {}  {:8}  valid {} .. {}",
            k.kind,
            k.state,
            k.id,
            k.key_type,
            fmt_time(k.not_before),
            fmt_time(k.not_after)
        );
    }
}

async fn entry(cli: &Cli, cmd: &EntryCmd) -> Result<ExitCode, CliError> {
    match cmd {
        EntryCmd::Create { fields, output } => {
            let spec = pb::EntrySpec {
                spiffe_id: fields
                    .spiffe_id
                    .clone()
                    .ok_or_else(|| msg("--spiffe-id is required"))?,
                parent_id: fields
                    .parent_id
                    .clone()
                    .ok_or_else(|| msg("--parent-id is required"))?,
                selectors: fields.selectors.clone(),
                x509_svid_ttl: parse_ttl("--x509-ttl", &fields.x509_ttl)?.unwrap_or(0),
                jwt_svid_ttl: parse_ttl("--jwt-ttl", &fields.jwt_ttl)?.unwrap_or(0),
                dns_names: fields.dns.clone(),
                admin: fields.admin.unwrap_or(false),
            };
            let mut c = client(cli).await?;
            let e = c
                .create_entry(pb::CreateEntryRequest { spec: Some(spec) })
                .await?
                .into_inner();
            if *output == Output::Json {
                println!("{}", entry_json(&e));
            } else {
                print_entry(&e);
            }
        }
        EntryCmd::Update { id, fields, output } => {
            let req = pb::UpdateEntryRequest {
                id: id.clone(),
                spiffe_id: fields.spiffe_id.clone(),
                parent_id: fields.parent_id.clone(),
                replace_selectors: !fields.selectors.is_empty(),
                selectors: fields.selectors.clone(),
                x509_svid_ttl: parse_ttl("--x509-ttl", &fields.x509_ttl)?,
                jwt_svid_ttl: parse_ttl("--jwt-ttl", &fields.jwt_ttl)?,
                replace_dns_names: !fields.dns.is_empty(),
                dns_names: fields.dns.clone(),
                admin: fields.admin,
            };
            let mut c = client(cli).await?;
            let e = c.update_entry(req).await?.into_inner();
            if *output == Output::Json {
                println!("{}", entry_json(&e));
            } else {
                print_entry(&e);
            }
        }
        EntryCmd::List {
            spiffe_id,
            parent_id,
            selector,
            output,
        } => {
            let mut c = client(cli).await?;
            let r = c
                .list_entries(pb::ListEntriesRequest {
                    spiffe_id: spiffe_id.clone().unwrap_or_default(),
                    parent_id: parent_id.clone().unwrap_or_default(),
                    selector: selector.clone().unwrap_or_default(),
                })
                .await?
                .into_inner();
            if *output == Output::Json {
                for e in &r.entries {
                    println!("{}", entry_json(e));
                }
            } else {
                println!(
                    "Found {} entr{}\n",
                    r.entries.len(),
                    if r.entries.len() == 1 { "y" } else { "ies" }
                );
                for e in &r.entries {
                    print_entry(e);
                }
            }
        }
        EntryCmd::Show { id, output } => {
            let mut c = client(cli).await?;
            let e = c
                .get_entry(pb::GetEntryRequest { id: id.clone() })
                .await?
                .into_inner();
            if *output == Output::Json {
                println!("{}", entry_json(&e));
            } else {
                print_entry(&e);
            }
        }
        EntryCmd::Delete { id } => {
            let mut c = client(cli).await?;
            c.delete_entry(pb::DeleteEntryRequest { id: id.clone() }).await?;
            println!("Deleted entry {id}");
        }
    }
    Ok(ExitCode::SUCCESS)
}

async fn serve(cfg: crate::config::Validated) -> Result<(), CliError> {
    // SIGINT and SIGTERM are caught from here on, before the ready line.
    let shutdown = Shutdown::install().map_err(|e| msg(format!("cannot install signal handlers: {e}")))?;
    let (running, join) = crate::server::start(cfg.clone(), shutdown.wait())
        .await
        .map_err(|e| msg(e.to_string()))?;
    println!(
        "trustline-ca ready: trust domain {}, agent API listening on {}, admin socket {}{}",
        cfg.trust_domain,
        running.agent_addr,
        running.admin_socket.display(),
        running
            .health_addr
            .map(|a| format!(", health on http://{a}"))
            .unwrap_or_default()
    );
    join.await
        .map_err(|e| msg(format!("CA task: {e}")))?
        .map_err(|e| msg(e.to_string()))?;
    println!("trustline-ca stopped");
    Ok(())
}

const QUICKSTART_ID: &str = "spiffe://example.org/demo/web";

async fn quickstart(dir: &Path, exit: bool, ca_only: bool) -> Result<(), CliError> {
    // The handlers first: from here on a Ctrl-C (or SIGTERM) at any moment stops whatever has started, in order,
    // instead of killing this process and orphaning the agent and sidecars.
    let mut shutdown =
        Shutdown::install().map_err(|e| msg(format!("cannot install signal handlers: {e}")))?;
    let ca_dir = dir.join("ca");
    crate::private_files::create_dir_all(&ca_dir).map_err(|e| msg(format!("{}: {e}", ca_dir.display())))?;
    tighten_own_state(&ca_dir)?;
    let cfg_path = ca_dir.join("ca.toml");
    let key_path = ca_dir.join("seal.key");
    if !key_path.exists() {
        trustline_hsm::SoftwareKeyStore::create_key_file(&key_path).map_err(|e| msg(e.to_string()))?;
    }
    if !cfg_path.exists() {
        let text = "# Written by `trustline-ca quickstart`. Edit freely; see docs/operator-guide.md.\n\
                    trust_domain = \"example.org\"\n\
                    data_dir = \".\"\n\n\
                    [server]\n\
                    agent_listen = \"127.0.0.1:8081\"\n\
                    health_listen = \"127.0.0.1:0\"\n\n\
                    [keys]\n\
                    key_file = \"seal.key\"\n";
        std::fs::write(&cfg_path, text).map_err(|e| msg(format!("{}: {e}", cfg_path.display())))?;
    }
    let cfg = Config::load(&cfg_path).map_err(|e| msg(e.to_string()))?;
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let (running, join) = crate::server::start(cfg.clone(), async move {
        let _ = stop_rx.await;
    })
    .await
    .map_err(|e| msg(format!("CA: {e}")))?;
    println!("[ok] CA started for trust domain {}", cfg.trust_domain);
    println!("     agent API (mTLS gRPC)  : {}", running.agent_addr);
    println!("     admin socket           : {}", running.admin_socket.display());
    if let Some(h) = running.health_addr {
        println!("     health and metrics     : http://{h}/readyz  http://{h}/metrics");
    }

    let mut mesh = crate::demo_mesh::DemoMesh::default();
    let toured = tokio::select! {
        r = tour(dir, &ca_dir, ca_only, &running, &mut mesh) => Some(r),
        sig = shutdown.recv() => {
            println!("\n{sig}: stopping what has started");
            None
        }
    };
    let result = match toured {
        Some(Ok(())) if !exit => {
            println!("\nServing until Ctrl-C. State lives in {}.", dir.display());
            let sig = shutdown.recv().await;
            println!("{sig}: stopping");
            Ok(())
        }
        Some(r) => r,
        None => Err(msg(
            "interrupted while starting the local mesh; everything it started is stopped",
        )),
    };
    // Stopped on every path (done, failed half-way, interrupted): nothing this command started outlives it.
    mesh.stop().await;
    let _ = stop_tx.send(());
    join.await
        .map_err(|e| msg(format!("CA task: {e}")))?
        .map_err(|e| msg(e.to_string()))?;
    println!("stopped");
    result
}

/// Takes group and other access away from the CA folder of the tour's own state and the database in it, which
/// versions before private database files left readable by every local user (0755, 0644): the CA would refuse
/// them, and they are the tour's own files, so fixing them beats telling the user to. A database the config was
/// edited to keep elsewhere is not touched here: the CA names it and the `chmod` to run.
fn tighten_own_state(ca_dir: &Path) -> Result<(), CliError> {
    let own =
        std::iter::once(ca_dir.to_owned()).chain(crate::private_files::sqlite_files(&ca_dir.join("ca.db")));
    for path in own {
        let was = crate::private_files::tighten(&path)
            .map_err(|e| msg(format!("making {} private: {e}", path.display())))?;
        if let Some(mode) = was {
            println!(
                "[ok] {} had mode {mode:o} (readable by other users, as older versions left it): now private",
                path.display()
            );
        }
    }
    Ok(())
}

/// The agent ID the tour's node had before agent IDs lived under `spiffe://<td>/trustline/agent/`.
const OLD_TOUR_NODE: &str = "spiffe://example.org/node/quickstart";

/// State from a version before the reserved agent path: the tour's agent attested as [`OLD_TOUR_NODE`] and would
/// keep renewing that ID (old agents do), while the tour now registers its services under the new one. The node is
/// the tour's own, so move it: evict it, drop its entries and the agent's saved SVID, and the mesh attests again
/// with a fresh join token under the new ID.
async fn retire_old_tour_node(
    c: &mut pb::admin_client::AdminClient<tonic::transport::Channel>,
    dir: &Path,
) -> Result<(), CliError> {
    let agents = c.list_agents(pb::ListAgentsRequest {}).await?.into_inner().agents;
    if !agents.iter().any(|a| a.spiffe_id == OLD_TOUR_NODE) {
        return Ok(());
    }
    c.evict_agent(pb::EvictAgentRequest {
        spiffe_id: OLD_TOUR_NODE.into(),
    })
    .await?;
    let old = c
        .list_entries(pb::ListEntriesRequest {
            parent_id: OLD_TOUR_NODE.into(),
            ..Default::default()
        })
        .await?
        .into_inner()
        .entries;
    for e in old {
        c.delete_entry(pb::DeleteEntryRequest { id: e.id }).await?;
    }
    let saved = dir.join("mesh/agent/agent-svid.json");
    match std::fs::remove_file(&saved) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(msg(format!("{}: {e}", saved.display()))),
    }
    println!(
        "[ok] the local mesh's agent was {OLD_TOUR_NODE} (an older version): evicted, to attest again under \
         spiffe://example.org/trustline/agent/, where agent IDs now live"
    );
    Ok(())
}

/// The tour: a first SVID and JWT-SVID, the local mesh (into `mesh`, process by process) and three requests
/// through it, then what to try next.
async fn tour(
    dir: &Path,
    ca_dir: &Path,
    ca_only: bool,
    running: &crate::server::Running,
    mesh: &mut crate::demo_mesh::DemoMesh,
) -> Result<(), CliError> {
    // Mint a first X.509-SVID the way a workload would: our key, our CSR, the CA signs.
    let key = rcgen::KeyPair::generate().map_err(|e| msg(e.to_string()))?;
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).map_err(|e| msg(e.to_string()))?;
    params.subject_alt_names = vec![rcgen::SanType::URI(
        QUICKSTART_ID
            .try_into()
            .map_err(|e: rcgen::Error| msg(e.to_string()))?,
    )];
    let csr = params.serialize_request(&key).map_err(|e| msg(e.to_string()))?;
    let mut c = admin_api::connect(&running.admin_socket)
        .await
        .map_err(|e| msg(format!("admin socket: {e}")))?;
    let svid = c
        .mint_x509svid(pb::MintX509svidRequest {
            csr: csr.der().to_vec(),
            spiffe_id: QUICKSTART_ID.into(),
            ttl: 0,
            dns_names: Vec::new(),
        })
        .await?
        .into_inner();
    let bundle = c.get_bundle(pb::GetBundleRequest {}).await?.into_inner();
    let svid_path = ca_dir.join("demo-svid.pem");
    let bundle_path = ca_dir.join("bundle.pem");
    std::fs::write(&svid_path, certs_to_pem(&svid.cert_chain)).map_err(|e| msg(e.to_string()))?;
    std::fs::write(&bundle_path, certs_to_pem(&bundle.x509_authorities)).map_err(|e| msg(e.to_string()))?;
    println!(
        "[ok] minted X.509-SVID {} serial {} (expires {})",
        svid.spiffe_id,
        svid.serial,
        fmt_time(svid.expires_at)
    );
    println!(
        "     certificate: {}   bundle: {}",
        svid_path.display(),
        bundle_path.display()
    );
    let jwt = c
        .mint_jwtsvid(pb::MintJwtsvidRequest {
            spiffe_id: QUICKSTART_ID.into(),
            audience: vec!["demo".into()],
            ttl: 0,
        })
        .await?
        .into_inner();
    println!(
        "[ok] minted JWT-SVID for audience \"demo\": {}…",
        &jwt.token[..jwt.token.len().min(40)]
    );
    if !ca_only {
        retire_old_tour_node(&mut c, dir).await?;
    }
    let meshed = !ca_only
        && crate::demo_mesh::start(mesh, dir, &running.admin_socket, running.agent_addr, &bundle_path)
            .await
            .map_err(msg)?;
    let mut last_trace = None;
    if meshed {
        println!("\nThree requests through the mesh (curl -> web sidecar -> api sidecar -> api app):");
        for (what, method, path) in [
            ("allowed by policy web-reads-api", "GET", "/api/hello"),
            ("denied by policy no-admin", "GET", "/api/admin/users"),
            ("api calls payments: the caller chain", "POST", "/api/checkout"),
        ] {
            let (status, body) = crate::demo_mesh::call(method, path).await.map_err(msg)?;
            println!("[ok] {method} {path} ({what}): {status}");
            let v: serde_json::Value = serde_json::from_str(body.trim()).unwrap_or(serde_json::Value::Null);
            if let Some(tp) = v.get("traceparent").and_then(|t| t.as_str()) {
                last_trace = tp.split('-').nth(1).map(str::to_owned);
            }
            match v.get("payments") {
                Some(p) => println!(
                    "     api saw caller {} and called payments: {}\n     payments saw the verified caller chain {} (origin {}), so policy payments-start-at-web allowed it",
                    v["x-forwarded-client-cert"].as_str().unwrap_or_default(),
                    p["status"].as_str().unwrap_or_default(),
                    p["body"]["caller_chain"],
                    p["body"]["caller_chain"][0].as_str().unwrap_or("?"),
                ),
                None => println!("     {}", body.trim()),
            }
        }
    }
    let sock = running.admin_socket.display();
    let ca_cmd = crate::demo_mesh::command("ca");
    println!("\nTry, in another terminal:");
    println!("  {ca_cmd} --socket {sock} token generate");
    println!("  {ca_cmd} --socket {sock} issued list");
    println!("  {ca_cmd} --socket {sock} bundle show --format jwks");
    println!(
        "  openssl verify -CAfile {} {}",
        bundle_path.display(),
        svid_path.display()
    );
    if meshed {
        println!(
            "  curl -s -H 'host: api' http://{}/api/hello        # through the sidecars",
            crate::demo_mesh::WEB_OUTBOUND
        );
        println!(
            "  curl -s -H 'host: api' http://{}/api/admin/users  # denied by policy no-admin",
            crate::demo_mesh::WEB_OUTBOUND
        );
        println!(
            "  curl -s -H 'host: api' -X POST http://{}/api/checkout  # web -> api -> payments",
            crate::demo_mesh::WEB_OUTBOUND
        );
        println!(
            "  edit {}/mesh/policies/*/*.yaml                  # reloaded within a second",
            dir.display()
        );
        let dirs: Vec<String> = mesh.audit_dirs.iter().map(|d| d.display().to_string()).collect();
        println!("\nAccountability logs (one per sidecar): {}", dirs.join("  "));
        let audit = crate::demo_mesh::command("audit");
        if let Some(t) = &last_trace {
            println!("The last request, as a call tree from all three logs:");
            println!("  {audit} trace {t} {}", dirs.join(" "));
        }
        println!(
            "  {audit} verify --bundle {} {}",
            bundle_path.display(),
            dirs.join(" ")
        );
    }
    Ok(())
}
