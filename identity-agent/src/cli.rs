//! `trustline-agent`: the Trustline identity agent and its client commands.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use crate::config::Config;
use crate::svid_files::{SvidFolder, WriteError, KEY_MODE, PUBLIC_MODE};
use clap::{Parser, Subcommand};
use trustline_identity::bundle::certs_to_pem;
use trustline_identity::lifecycle::{exit_with_parent, Shutdown};
use trustline_proto::workload as pb;

/// The Trustline identity agent.
#[derive(Parser, Debug)]
#[command(name = "trustline-agent", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the agent.
    ///
    /// Example: trustline-agent run --config /etc/trustline/agent.toml --join-token 3f2a…
    Run {
        /// Config file.
        #[arg(long)]
        config: PathBuf,
        /// One-time join token for the first attestation (not needed once the node has an SVID).
        #[arg(long, env = "TRUSTLINE_JOIN_TOKEN", hide_env_values = true)]
        join_token: Option<String>,
    },
    /// Talk to a running agent through the Workload API, as a workload would.
    #[command(subcommand)]
    Api(ApiCmd),
    /// This node's TPM DevID key (for `tpm_devid` node attestation).
    #[command(subcommand)]
    Devid(DevidCmd),
    /// Check that the agent answers (exit 0) and say whether it is connected to the CA.
    ///
    /// Example: trustline-agent healthcheck --http-socket /run/trustline/agent/http.sock
    Healthcheck {
        /// The agent's HTTP API socket.
        #[arg(long, default_value = ".trustline/agent/sockets/http.sock")]
        http_socket: PathBuf,
    },
}

#[derive(Subcommand, Debug)]
enum DevidCmd {
    /// Create a DevID key inside the TPM (non-exportable), write its reference (a blob only this TPM can load)
    /// and a CSR for your DevID CA to sign. Point `[tpm_devid]` at the key file and the signed certificate.
    ///
    /// Example: trustline-agent devid create --tcti device:/dev/tpmrm0 --key-out /etc/trustline/devid.key
    ///          --csr-out devid.csr --common-name node-1.example.org
    Create {
        /// The TPM: device:/dev/tpmrm0, tabrmd:, swtpm:host=127.0.0.1,port=2321.
        #[arg(long)]
        tcti: String,
        /// Where to write the key reference (refuses to overwrite).
        #[arg(long)]
        key_out: PathBuf,
        /// Where to write the CSR (PEM).
        #[arg(long)]
        csr_out: PathBuf,
        /// Subject common name for the CSR (e.g. the node's hostname or serial number).
        #[arg(long)]
        common_name: Option<String>,
        /// Key type: ec-p256 or ec-p384.
        #[arg(long, default_value = "ec-p256")]
        key_type: String,
    },
}

#[derive(Subcommand, Debug)]
enum ApiCmd {
    /// Fetch SVIDs.
    #[command(subcommand)]
    Fetch(FetchCmd),
}

#[derive(Subcommand, Debug)]
enum FetchCmd {
    /// Fetch the caller's X.509-SVIDs and bundle; write them as PEM files (svid.N.pem, svid.N.key, bundle.N.pem)
    /// or print them.
    ///
    /// Example: trustline-agent api fetch x509 --socket /run/trustline/agent/workload.sock --write /tmp/svid
    X509 {
        /// Workload API socket.
        #[arg(
            long,
            env = "SPIFFE_ENDPOINT_SOCKET",
            default_value = ".trustline/agent/sockets/workload.sock"
        )]
        socket: String,
        /// Folder to write PEM files into (private keys with mode 0600). It must be yours, not a symbolic link,
        /// and not writable by group or others; it is created (0700) if missing.
        #[arg(long)]
        write: Option<PathBuf>,
    },
    /// Fetch a JWT-SVID for an audience and print the token.
    ///
    /// Example: trustline-agent api fetch jwt --audience payments
    Jwt {
        /// Workload API socket.
        #[arg(
            long,
            env = "SPIFFE_ENDPOINT_SOCKET",
            default_value = ".trustline/agent/sockets/workload.sock"
        )]
        socket: String,
        /// Audience (repeatable).
        #[arg(long, required = true)]
        audience: Vec<String>,
    },
}

/// Runs the `trustline-agent` command line with `args` (the first is the program name), as the binary does;
/// the `trustline` multi-call binary calls it too.
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
        Ok(c) => c,
        Err(e) => {
            eprintln!("Error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn socket_path(s: &str) -> PathBuf {
    PathBuf::from(
        s.strip_prefix("unix://")
            .or_else(|| s.strip_prefix("unix:"))
            .unwrap_or(s),
    )
}

async fn workload_client(
    socket: &str,
) -> Result<pb::spiffe_workload_api_client::SpiffeWorkloadApiClient<tonic::transport::Channel>, String> {
    let path = socket_path(socket);
    let p2 = path.clone();
    let ch = tonic::transport::Endpoint::from_static("http://localhost")
        .connect_with_connector(tower::service_fn(move |_: tonic::transport::Uri| {
            let p = p2.clone();
            async move {
                let s = tokio::net::UnixStream::connect(p).await?;
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(s))
            }
        }))
        .await
        .map_err(|e| {
            format!(
                "cannot reach the Workload API at {}: {e} (is the agent running?)",
                path.display()
            )
        })?;
    Ok(pb::spiffe_workload_api_client::SpiffeWorkloadApiClient::new(ch))
}

fn with_header<T>(msg: T) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    r.metadata_mut().insert(
        "workload.spiffe.io",
        tonic::metadata::MetadataValue::from_static("true"),
    );
    r
}

fn split_ders(concat: &[u8]) -> Result<Vec<Vec<u8>>, String> {
    let mut out = Vec::new();
    let mut rest = concat;
    while !rest.is_empty() {
        let (r, _) =
            x509_parser::parse_x509_certificate(rest).map_err(|e| format!("bad certificate: {e}"))?;
        let used = rest.len() - r.len();
        out.push(rest[..used].to_vec());
        rest = r;
    }
    Ok(out)
}

fn write_file(path: &Path, body: &[u8], mode: u32) -> Result<(), String> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(path)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    f.write_all(body).map_err(|e| format!("{}: {e}", path.display()))
}

/// Writes a file that must not exist yet.
fn write_new_file(path: &Path, body: &[u8], mode: u32) -> Result<(), String> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    f.write_all(body)
        .and_then(|_| f.sync_all())
        .map_err(|e| format!("{}: {e}", path.display()))
}

async fn http_get(socket: &Path, path: &str) -> Result<(u16, String), String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::UnixStream::connect(socket).await.map_err(|e| {
        format!(
            "cannot reach the agent at {}: {e} (is it running?)",
            socket.display()
        )
    })?;
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: agent\r\nConnection: close\r\n\r\n").as_bytes())
        .await
        .map_err(|e| e.to_string())?;
    let mut buf = String::new();
    s.read_to_string(&mut buf).await.map_err(|e| e.to_string())?;
    let status = buf
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = buf
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    Ok((status, body))
}

async fn run(cli: Cli) -> Result<ExitCode, String> {
    match cli.command {
        Command::Run { config, join_token } => {
            // Started by `trustline up`: stop when it does, even if it is killed with SIGKILL.
            exit_with_parent().map_err(|e| e.to_string())?;
            // SIGINT and SIGTERM are caught from here on, before the ready line.
            let shutdown = Shutdown::install().map_err(|e| format!("cannot install signal handlers: {e}"))?;
            let cfg = Config::load(&config).map_err(|e| e.to_string())?;
            let filter = tracing_subscriber::EnvFilter::try_from_env("TRUSTLINE_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
            let _ = tracing_subscriber::fmt()
                .with_env_filter(filter)
                .with_writer(std::io::stderr)
                .try_init();
            crate::server::run(cfg, join_token, shutdown.wait(), |agent, cfg| {
                let id = agent.identity().map(|i| i.0).unwrap_or_default();
                println!(
                    "trustline-agent ready: agent ID {id}, Workload API socket {}, HTTP API socket {}",
                    cfg.socket.display(),
                    cfg.http_socket.display()
                );
            })
            .await
            .map_err(|e| e.to_string())?;
            println!("trustline-agent stopped");
            Ok(ExitCode::SUCCESS)
        }
        Command::Api(ApiCmd::Fetch(FetchCmd::X509 { socket, write })) => {
            // Checked before asking for a key, so a refused folder costs nothing.
            let folder = write
                .as_deref()
                .map(SvidFolder::open)
                .transpose()
                .map_err(|e| e.to_string())?;
            let mut c = workload_client(&socket).await?;
            let mut stream = c
                .fetch_x509svid(with_header(pb::X509svidRequest {}))
                .await
                .map_err(|s| format!("{:?}: {}", s.code(), s.message()))?
                .into_inner();
            let resp = stream
                .message()
                .await
                .map_err(|s| format!("{:?}: {}", s.code(), s.message()))?
                .ok_or("the agent closed the stream without an SVID")?;
            for (i, s) in resp.svids.iter().enumerate() {
                let chain = certs_to_pem(&split_ders(&s.x509_svid)?);
                let bundle = certs_to_pem(&split_ders(&s.bundle)?);
                let key = pem::encode(&pem::Pem::new("PRIVATE KEY", s.x509_svid_key.clone()));
                match &folder {
                    Some(folder) => {
                        let e = |e: WriteError| e.to_string();
                        folder
                            .write(&format!("svid.{i}.pem"), chain.as_bytes(), PUBLIC_MODE)
                            .map_err(e)?;
                        folder
                            .write(&format!("svid.{i}.key"), key.as_bytes(), KEY_MODE)
                            .map_err(e)?;
                        folder
                            .write(&format!("bundle.{i}.pem"), bundle.as_bytes(), PUBLIC_MODE)
                            .map_err(e)?;
                        println!(
                            "{}: wrote {}/svid.{i}.pem, svid.{i}.key, bundle.{i}.pem",
                            s.spiffe_id,
                            folder.path().display()
                        );
                    }
                    None => {
                        println!("SPIFFE ID: {}", s.spiffe_id);
                        print!("{chain}");
                    }
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Api(ApiCmd::Fetch(FetchCmd::Jwt { socket, audience })) => {
            let mut c = workload_client(&socket).await?;
            let resp = c
                .fetch_jwtsvid(with_header(pb::JwtsvidRequest {
                    audience,
                    spiffe_id: String::new(),
                }))
                .await
                .map_err(|s| format!("{:?}: {}", s.code(), s.message()))?
                .into_inner();
            for s in resp.svids {
                println!("{}", s.svid);
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Devid(DevidCmd::Create {
            tcti,
            key_out,
            csr_out,
            common_name,
            key_type,
        }) => {
            let kt: trustline_hsm::KeyType = key_type.parse().map_err(|e| format!("--key-type: {e}"))?;
            if key_out.exists() {
                return Err(format!(
                    "--key-out {}: already exists (a DevID key is never overwritten; remove it yourself if you mean to)",
                    key_out.display()
                ));
            }
            let store = trustline_hsm::KeyStore::open_tpm(&trustline_hsm::TpmConfig { tcti: tcti.clone() })
                .map_err(|e| format!("--tcti {tcti:?}: {e}"))?;
            let (signer, key_ref) = store
                .generate(kt)
                .map_err(|e| format!("--key-type {key_type}: {e}"))?;
            let csr = crate::agent::csr_for_signer(&signer, &[], common_name.as_deref())
                .map_err(|e| e.to_string())?;
            let mut body = key_ref.as_str().to_owned();
            body.push('\n');
            write_new_file(&key_out, body.as_bytes(), 0o600)?;
            write_file(
                &csr_out,
                pem::encode(&pem::Pem::new("CERTIFICATE REQUEST", csr)).as_bytes(),
                0o644,
            )?;
            println!(
                "created a {key_type} DevID key in the TPM; reference in {}, CSR in {} (have your DevID CA sign it)",
                key_out.display(),
                csr_out.display()
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Healthcheck { http_socket } => {
            let (status, body) = http_get(&http_socket, "/v1/health").await?;
            if status != 200 {
                return Err(format!("agent answered HTTP {status}: {body}"));
            }
            let v: serde_json::Value = serde_json::from_str(&body).map_err(|e| e.to_string())?;
            let up = v["ca_connected"].as_bool().unwrap_or(false);
            println!(
                "agent {} is serving; CA connection {}; {} entries",
                v["agent_id"].as_str().unwrap_or("?"),
                if up { "up" } else { "DOWN (serving cached SVIDs)" },
                v["entries"]
            );
            Ok(ExitCode::SUCCESS)
        }
    }
}
