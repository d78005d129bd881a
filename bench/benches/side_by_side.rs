//! Side by side: the same loopback scenario through three sidecar pairs, Trustline, nginx and HAProxy (and, for
//! scale, a "floor" pair: HAProxy as a plaintext TCP relay on both sides, the upper bound of any pair here):
//!
//! ```text
//! load --plaintext HTTP/1.1 keep-alive--> client-side proxy ==mTLS 1.3, client cert==> server-side proxy --> backend
//! ```
//!
//! Every proxy runs one worker thread, and all of them are pinned to one CPU (`TRUSTLINE_BENCH_PROXY_CPU`,
//! default 1); the load generator, the backend, the CA and the agent to the other (`TRUSTLINE_BENCH_LOAD_CPU`,
//! default 0). Trustline: the sidecar pair with one ALLOW and one DENY policy and the accountability log on in
//! both sidecars. nginx and HAProxy: certificates minted by the same CA, the client certificate required and
//! verified, a path rule refusing `/admin*`, an access log.
//!
//! Prints, from one run: open-loop latency at fixed rates (no coordinated omission) and the latency each pair
//! adds over the direct path, the pair's CPU; closed-loop maximum throughput; new mutual-TLS connections per
//! second against each server-side proxy; memory; the ratios Trustline/nginx and Trustline/HAProxy; and the
//! resident memory of a Trustline sidecar idle and holding 10,000 idle mutual-TLS connections.
//!
//! Run everything with `bench/run.sh` (installs nginx and haproxy, builds the release binaries, runs this).
//! Knobs: `TRUSTLINE_BENCH_RATES=1000,2000,4000`, `TRUSTLINE_BENCH_SECS=5`, `TRUSTLINE_BENCH_CONNS=16`,
//! `TRUSTLINE_BENCH_MAX_CONNS=32`, `TRUSTLINE_BENCH_HS_THREADS=4`, `TRUSTLINE_BENCH_IDLE=10000`,
//! `TRUSTLINE_BENCH_ONLY=trustline,nginx,haproxy,floor` (or `idle`: only the idle-memory figures; `floor` is a
//! plaintext HAProxy TCP relay pair, the upper bound of any pair here), `TRUSTLINE_BENCH_TL_LOG=0` (log off, for comparison),
//! `TRUSTLINE_BENCH_TL_FSYNC=batch|10ms|never` (the log's fsync policy, default `batch`),
//! `TRUSTLINE_BENCH_IDLE_REQUEST=0` (idle connections without their one request).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use trustline_bench::load::{self, Stats};
use trustline_bench::procstat::{self, Procs};
use trustline_bench::proxies::{self, Certs, Proxy};
use trustline_identity::spiffe_id::TrustDomain;
use trustline_identity::tls::{client_config, ExpectedPeer, RotatingCert, SpiffeServerVerifier, TrustBundle};
use trustline_tests::mesh::{Mesh, Sidecar, TD};

const DENY: &str = "name: bench-deny-admin\naction: DENY\nrules:\n  - to:\n      - operation:\n          paths: [\"/admin*\"]\n";

fn allow(principals: &[String]) -> String {
    let list: Vec<String> = principals.iter().map(|p| format!("\"{p}\"")).collect();
    format!(
        "name: bench-allow\naction: ALLOW\nrules:\n  - from:\n      - source:\n          principals: [{}]\n    to:\n      - operation:\n          methods: [\"GET\"]\n          paths: [\"/bench*\"]\n",
        list.join(", ")
    )
}

fn env_or<T: std::str::FromStr>(k: &str, d: T) -> T {
    std::env::var(k).ok().and_then(|v| v.parse().ok()).unwrap_or(d)
}

/// Mints an X.509-SVID for `spiffe_id` (plus a DNS SAN when given) through the CA's `x509 mint`.
fn mint(mesh: &Mesh, name: &str, dns: Option<&str>) -> Certs {
    let dir = mesh.tmp.path().join("certs").join(name);
    std::fs::create_dir_all(&dir).unwrap();
    let id = format!("{TD}/{name}");
    let dns_list: Vec<&str> = dns.into_iter().collect();
    let (key, req) = trustline_tests::csr(&[&id], &dns_list);
    std::fs::write(dir.join("req.der"), &req).unwrap();
    let req_path = dir.join("req.der").display().to_string();
    let dir_s = dir.display().to_string();
    let mut args = vec![
        "x509",
        "mint",
        "--csr",
        &req_path,
        "--spiffe-id",
        &id,
        "--ttl",
        "2h",
        "--write",
        &dir_s,
    ];
    if let Some(d) = dns {
        args.extend(["--dns", d]);
    }
    mesh.ca.cli_ok(&args);
    std::fs::write(dir.join("key.pem"), key.serialize_pem()).unwrap();
    let combined = dir.join("combined.pem");
    let mut both = std::fs::read_to_string(dir.join("svid.pem")).unwrap();
    both.push_str(&key.serialize_pem());
    std::fs::write(&combined, both).unwrap();
    Certs {
        cert: dir.join("svid.pem"),
        key: dir.join("key.pem"),
        combined,
        bundle: dir.join("bundle.pem"),
    }
}

/// A rustls client presenting `certs`, accepting any SPIFFE ID of the trust domain, without resumption (every
/// connection is a full handshake). The Trustline TLS profile: TLS 1.3, X25519MLKEM768 then X25519 then P-256.
fn tls_client(mesh: &Mesh, certs: &Certs) -> Arc<rustls::ClientConfig> {
    let roots = mesh.ca.bundle_roots();
    let bundle = TrustBundle::new(TrustDomain::new("example.org").unwrap(), &roots).unwrap();
    let verifier = Arc::new(SpiffeServerVerifier::new(bundle, ExpectedPeer::AnyInTrustDomain));
    let chain =
        trustline_identity::bundle::certs_from_pem(&std::fs::read_to_string(&certs.cert).unwrap()).unwrap();
    let key_pem = std::fs::read_to_string(&certs.key).unwrap();
    let key = key_pem
        .lines()
        .filter(|l| !l.starts_with("-----"))
        .collect::<String>();
    let key = base64::Engine::decode(&base64::engine::general_purpose::STANDARD, key).unwrap();
    let rc = Arc::new(RotatingCert::default());
    rc.set(chain, &key).unwrap();
    let mut cfg = client_config(verifier, Some(rc)).unwrap();
    cfg.resumption = rustls::client::Resumption::disabled();
    // The bench speaks HTTP/1.1 on these connections.
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Arc::new(cfg)
}

/// One pair under test.
struct Pair {
    name: &'static str,
    /// Where the load enters (client-side proxy).
    entry: SocketAddr,
    /// The server-side proxy's mTLS listener (for new-connection runs) and the DNS name to ask for.
    server: SocketAddr,
    client_procs: Procs,
    server_procs: Procs,
    /// False for the floor (a plaintext TCP relay): no TLS, no path rule.
    proxy: bool,
}

impl Pair {
    /// A pair of proxy processes: the load enters at `client`, which forwards to `server`.
    fn of(name: &'static str, client: &Proxy, server: &Proxy, proxy: bool) -> Self {
        Self {
            name,
            entry: client.listen,
            server: server.listen,
            client_procs: client.procs.clone(),
            server_procs: server.procs.clone(),
            proxy,
        }
    }

    fn procs(&self) -> Procs {
        Procs {
            pids: [self.client_procs.pids.clone(), self.server_procs.pids.clone()].concat(),
        }
    }
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

/// Runs `f` and returns its result and the CPU seconds `procs` used meanwhile, with the wall time.
fn measured<T>(procs: &Procs, f: impl FnOnce() -> T) -> (T, f64, f64) {
    let (c0, t0) = (procs.cpu_secs(), std::time::Instant::now());
    let r = f();
    (r, procs.cpu_secs() - c0, t0.elapsed().as_secs_f64())
}

fn sidecar_pid(s: &Sidecar) -> u32 {
    s.pid().unwrap()
}

struct Row {
    stats: Stats,
    cpu: f64,
    wall: f64,
}

fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        return; // `cargo test --benches` builds and runs benches without `--bench`: nothing to do.
    }
    let rates: Vec<u64> = std::env::var("TRUSTLINE_BENCH_RATES")
        .unwrap_or_else(|_| "1000,2000,4000".into())
        .split(',')
        .filter_map(|r| r.trim().parse().ok())
        .collect();
    let secs = env_or("TRUSTLINE_BENCH_SECS", 5u64);
    let conns = env_or("TRUSTLINE_BENCH_CONNS", 16usize);
    let max_conns = env_or("TRUSTLINE_BENCH_MAX_CONNS", 32usize);
    let hs_threads = env_or("TRUSTLINE_BENCH_HS_THREADS", 4usize);
    let idle_n = env_or("TRUSTLINE_BENCH_IDLE", 10_000usize);
    let load_cpu = env_or("TRUSTLINE_BENCH_LOAD_CPU", 0usize);
    let proxy_cpu = env_or("TRUSTLINE_BENCH_PROXY_CPU", 1usize);
    let only =
        std::env::var("TRUSTLINE_BENCH_ONLY").unwrap_or_else(|_| "trustline,nginx,haproxy,floor".into());

    // Room for 10,000 idle connections (the sidecars inherit the limit).
    raise_nofile();
    procstat::pin_self(load_cpu);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let backend = load::backend(&rt);
    let mesh = Mesh::start("");
    let tmp = mesh.tmp.path().to_owned();
    let loadgen = mint(&mesh, "loadgen", None);
    let client = tls_client(&mesh, &loadgen);
    if only == "idle" {
        // `TRUSTLINE_BENCH_ONLY=idle`: only the idle-memory measurement.
        idle_memory(&mesh, backend, &client, idle_n, proxy_cpu);
        return;
    }
    let mut pairs: Vec<Pair> = Vec::new();
    let mut keep_sidecars: Vec<Sidecar> = Vec::new();
    let mut keep_proxies: Vec<Proxy> = Vec::new();

    if only.contains("trustline") {
        let (api, web) = trustline_pair(&mesh, backend, proxy_cpu);
        pairs.push(Pair {
            name: "Trustline",
            entry: web.outbound[0],
            server: api.inbound[0],
            client_procs: Procs {
                pids: vec![sidecar_pid(&web)],
            },
            server_procs: Procs {
                pids: vec![sidecar_pid(&api)],
            },
            proxy: true,
        });
        keep_sidecars.extend([api, web]);
    }
    if only.contains("nginx") {
        let (web_c, api_c) = (
            mint(&mesh, "web-nginx", None),
            mint(&mesh, "api-nginx", Some("api.nginx")),
        );
        let (s_addr, c_addr) = (free_addr(), free_addr());
        let dir_s = tmp.join("nginx-server");
        let s = proxies::spawn_nginx(
            &dir_s,
            &proxies::nginx_server(&dir_s, s_addr, backend, &api_c),
            s_addr,
            proxy_cpu,
        );
        let dir_c = tmp.join("nginx-client");
        let c = proxies::spawn_nginx(
            &dir_c,
            &proxies::nginx_client(&dir_c, c_addr, s_addr, &web_c, "api.nginx"),
            c_addr,
            proxy_cpu,
        );
        pairs.push(Pair::of("nginx", &c, &s, true));
        keep_proxies.extend([s, c]);
    }
    if only.contains("haproxy") {
        let (web_c, api_c) = (
            mint(&mesh, "web-haproxy", None),
            mint(&mesh, "api-haproxy", Some("api.haproxy")),
        );
        let (s_addr, c_addr) = (free_addr(), free_addr());
        let s = proxies::spawn_haproxy(
            &tmp.join("haproxy-server"),
            &proxies::haproxy_server(s_addr, backend, &api_c),
            s_addr,
            proxy_cpu,
        );
        let c = proxies::spawn_haproxy(
            &tmp.join("haproxy-client"),
            &proxies::haproxy_client(c_addr, s_addr, &web_c, "api.haproxy"),
            c_addr,
            proxy_cpu,
        );
        pairs.push(Pair::of("HAProxy", &c, &s, true));
        keep_proxies.extend([s, c]);
    }

    if only.contains("floor") {
        let (s_addr, c_addr) = (free_addr(), free_addr());
        let s = proxies::spawn_haproxy(
            &tmp.join("floor-server"),
            &proxies::haproxy_tcp_relay(s_addr, backend),
            s_addr,
            proxy_cpu,
        );
        let c = proxies::spawn_haproxy(
            &tmp.join("floor-client"),
            &proxies::haproxy_tcp_relay(c_addr, s_addr),
            c_addr,
            proxy_cpu,
        );
        pairs.push(Pair::of("floor (TCP relay)", &c, &s, false));
        keep_proxies.extend([s, c]);
    }

    // Idle memory, before any traffic.
    std::thread::sleep(Duration::from_secs(1));
    let idle_rss: Vec<(u64, u64)> = pairs
        .iter()
        .map(|p| (p.client_procs.rss_kib(), p.server_procs.rss_kib()))
        .collect();

    // Every pair enforces its path rule, and every path answers.
    for p in &pairs {
        let mut r = load::connect(p.entry);
        assert_eq!(
            load::request(&mut r, load::REQ),
            200,
            "{}: the request is allowed",
            p.name
        );
        if p.proxy {
            assert_eq!(
                load::request(&mut r, load::DENIED),
                403,
                "{}: /admin is refused",
                p.name
            );
        }
    }
    // Warm up every path (connections, pools, caches).
    load::closed_loop(backend, 4, 1);
    for p in &pairs {
        load::closed_loop(p.entry, 4, 1);
    }

    // All the machine's CPUs (this thread is pinned to one, so not `available_parallelism`).
    let cores = std::fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .filter(|l| l.starts_with("processor"))
        .count();
    let loadavg = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    println!("# Side by side: Trustline, nginx, HAProxy");
    println!();
    println!(
        "{cores} cores; proxies pinned to CPU {proxy_cpu} (one worker thread each), load generator, backend, CA and agent to CPU {load_cpu}; load average before: {}",
        loadavg.split_whitespace().take(3).collect::<Vec<_>>().join(" ")
    );
    println!(
        "versions: {}; {}",
        first_line(&["nginx", "-v"]),
        first_line(&["haproxy", "-v"])
    );
    println!();
    println!("## Open loop: {conns} keep-alive HTTP/1.1 connections, {secs} s per rate; latency in µs");
    println!();
    println!("| rate (req/s) | path | p50 | p90 | p99 | p99.9 | max | errors | added p50 | added p90 | added p99 | added p99.9 | pair CPU (% of a core) | CPU µs/req |");
    println!("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |");
    let ps = [0.50, 0.90, 0.99, 0.999];
    // added[rate][pair][percentile]
    let mut added: Vec<Vec<[f64; 4]>> = Vec::new();
    let mut cpu_per_req: Vec<Vec<f64>> = Vec::new();
    for &rate in &rates {
        let d = load::open_loop(backend, rate, secs, conns);
        print_row(rate, "direct", &d, &[0.0; 4], None);
        let mut a_rate = Vec::new();
        let mut c_rate = Vec::new();
        for p in &pairs {
            let (stats, cpu, wall) = measured(&p.procs(), || load::open_loop(p.entry, rate, secs, conns));
            let row = Row { stats, cpu, wall };
            let a: [f64; 4] = std::array::from_fn(|i| row.stats.pct(ps[i]) - d.pct(ps[i]));
            let per_req = row.cpu * 1e6 / row.stats.lat.len().max(1) as f64;
            print_row(
                rate,
                p.name,
                &row.stats,
                &a,
                Some((row.cpu / row.wall * 100.0, per_req)),
            );
            a_rate.push(a);
            c_rate.push(per_req);
        }
        added.push(a_rate);
        cpu_per_req.push(c_rate);
    }

    println!();
    println!("## Maximum throughput: closed loop, {max_conns} keep-alive connections, {secs} s");
    println!();
    println!("| path | req/s | errors | pair CPU (% of a core) | CPU µs/req | client-side RSS (MiB) | server-side RSS (MiB) | peak RSS client / server (MiB) |");
    println!("| --- | --- | --- | --- | --- | --- | --- | --- |");
    let (d, de) = load::closed_loop(backend, max_conns, secs);
    println!("| direct | {d:.0} | {de} | | | | | |");
    let mut max_tp = Vec::new();
    let mut busy_rss = Vec::new();
    for p in &pairs {
        let ((tp, e), cpu, wall) = measured(&p.procs(), || load::closed_loop(p.entry, max_conns, secs));
        let (cr, sr) = (p.client_procs.rss_kib(), p.server_procs.rss_kib());
        println!(
            "| {} | {tp:.0} | {e} | {:.0} | {:.1} | {:.1} | {:.1} | {:.1} / {:.1} |",
            p.name,
            cpu / wall * 100.0,
            cpu * 1e6 / (tp * wall).max(1.0),
            mib(cr),
            mib(sr),
            mib(p.client_procs.hwm_kib()),
            mib(p.server_procs.hwm_kib())
        );
        max_tp.push(tp);
        busy_rss.push((cr, sr));
    }

    println!();
    println!(
        "## New connections: full mutual-TLS 1.3 handshakes (no resumption) + one request each, straight to the server-side proxy, {hs_threads} client threads, {secs} s"
    );
    println!();
    println!("| server-side proxy | connections/s | errors | key exchange | server CPU (% of a core) | server CPU µs/connection |");
    println!("| --- | --- | --- | --- | --- | --- |");
    let mut hs_rate = Vec::new();
    for p in &pairs {
        if !p.proxy {
            hs_rate.push(0.0);
            continue;
        }
        let ((r, e, g), cpu, wall) = measured(&p.server_procs, || {
            load::handshakes(client.clone(), "server", p.server, hs_threads, secs)
        });
        println!(
            "| {} | {r:.0} | {e} | {g} | {:.0} | {:.0} |",
            p.name,
            cpu / wall * 100.0,
            cpu * 1e6 / (r * wall).max(1.0)
        );
        hs_rate.push(r);
    }

    println!();
    println!("## Memory (VmRSS, MiB; nginx: master + worker)");
    println!();
    println!("| pair | client side idle | server side idle | client side after the max-throughput run | server side after |");
    println!("| --- | --- | --- | --- | --- |");
    for (i, p) in pairs.iter().enumerate() {
        println!(
            "| {} | {:.1} | {:.1} | {:.1} | {:.1} |",
            p.name,
            mib(idle_rss[i].0),
            mib(idle_rss[i].1),
            mib(busy_rss[i].0),
            mib(busy_rss[i].1)
        );
    }

    // Ratios, from this run.
    let find = |n: &str| pairs.iter().position(|p| p.name == n);
    let (t, ng, ha) = (find("Trustline"), find("nginx"), find("HAProxy"));
    if let Some(t) = t {
        println!();
        println!("## Ratios (Trustline / other, same run; below 1 is better for latency and CPU, above 1 for throughput)");
        println!();
        println!("| measure | Trustline / nginx | Trustline / HAProxy |");
        println!("| --- | --- | --- |");
        let ratio = |o: Option<usize>, f: &dyn Fn(usize) -> f64| {
            o.map_or("-".to_owned(), |o| format!("{:.2}", f(t) / f(o)))
        };
        for (ri, rate) in rates.iter().enumerate() {
            for (pi, pn) in ["p50", "p90", "p99", "p99.9"].iter().enumerate() {
                println!(
                    "| added {pn} at {rate} req/s | {} | {} |",
                    ratio(ng, &|i| added[ri][i][pi]),
                    ratio(ha, &|i| added[ri][i][pi])
                );
            }
            println!(
                "| pair CPU per request at {rate} req/s | {} | {} |",
                ratio(ng, &|i| cpu_per_req[ri][i]),
                ratio(ha, &|i| cpu_per_req[ri][i])
            );
        }
        println!(
            "| max throughput | {} | {} |",
            ratio(ng, &|i| max_tp[i]),
            ratio(ha, &|i| max_tp[i])
        );
        println!(
            "| new connections/s | {} | {} |",
            ratio(ng, &|i| hs_rate[i]),
            ratio(ha, &|i| hs_rate[i])
        );
        println!(
            "| server-side RSS after max throughput | {} | {} |",
            ratio(ng, &|i| busy_rss[i].1 as f64),
            ratio(ha, &|i| busy_rss[i].1 as f64)
        );

        println!();
        println!("## Targets");
        println!();
        let verdict = |ok: bool| if ok { "met" } else { "MISSED" };
        for (ri, rate) in rates.iter().enumerate() {
            if let Some(n) = ng {
                let (tv, nv) = (added[ri][t][2], added[ri][n][2]);
                println!(
                    "- added p99 at {rate} req/s ≤ 0.8 × nginx: {tv:.0} µs vs 0.8 × {nv:.0} = {:.0} µs: {}",
                    0.8 * nv,
                    verdict(tv <= 0.8 * nv)
                );
            }
            if let Some(h) = ha {
                let (tv, hv) = (added[ri][t][2], added[ri][h][2]);
                println!(
                    "- added p99 at {rate} req/s ≤ HAProxy: {tv:.0} µs vs {hv:.0} µs: {}",
                    verdict(tv <= hv)
                );
            }
        }
        if let Some(n) = ng {
            println!(
                "- max throughput ≥ 1.2 × nginx: {:.0} vs 1.2 × {:.0} = {:.0} req/s: {}",
                max_tp[t],
                max_tp[n],
                1.2 * max_tp[n],
                verdict(max_tp[t] >= 1.2 * max_tp[n])
            );
            if let Some(f) = find("floor (TCP relay)") {
                println!(
                    "- for scale, the floor (plaintext TCP relay pair: no TLS, no HTTP) reaches {:.0} req/s = {:.2} × nginx",
                    max_tp[f],
                    max_tp[f] / max_tp[n]
                );
            }
        }
    }
    drop(keep_proxies);
    drop(keep_sidecars);

    if only.contains("trustline") && idle_n > 0 {
        idle_memory(&mesh, backend, &client, idle_n, proxy_cpu);
    }
}

/// A fresh inbound sidecar: RSS idle, then holding `n` idle mutual-TLS connections.
fn idle_memory(mesh: &Mesh, backend: SocketAddr, client: &Arc<rustls::ClientConfig>, n: usize, cpu: usize) {
    let hold = mesh.sidecar(
        "hold",
        &format!(
            "worker_threads = 1\n[log]\ndir = \"{}\"\n[limits]\nmax_connections = {}\nidle_timeout = \"10m\"\n[[inbound]]\nlisten = \"127.0.0.1:0\"\napp = \"{backend}\"\n",
            mesh.tmp.path().join("log-hold").display(),
            n + 1000
        ),
        &[
            ("10-allow.yaml", allow(&[format!("{TD}/loadgen")]).as_str()),
            ("20-deny.yaml", DENY),
        ],
    );
    // `TRUSTLINE_BENCH_IDLE_REQUEST=0`: handshake only, no request (to see what the HTTP layer holds).
    let one_request = env_or("TRUSTLINE_BENCH_IDLE_REQUEST", 1u8) != 0;
    let pid = sidecar_pid(&hold);
    procstat::pin(pid, cpu);
    std::thread::sleep(Duration::from_secs(2));
    let (idle, idle_fds) = (procstat::rss_kib(pid), procstat::fds(pid));
    let t = std::time::Instant::now();
    let (held, failed) = load::idle_connections(client.clone(), "server", hold.inbound[0], n, 8, one_request);
    let open_s = t.elapsed().as_secs_f64();
    std::thread::sleep(Duration::from_secs(2));
    let (rss, fds) = (procstat::rss_kib(pid), procstat::fds(pid));
    println!();
    println!("## Trustline sidecar memory: idle, and holding {n} idle mutual-TLS connections");
    println!();
    println!("| state | VmRSS (MiB) | peak (MiB) | open fds | target |");
    println!("| --- | --- | --- | --- | --- |");
    println!(
        "| idle (inbound, policy and log on, 1 worker thread) | {:.1} | | {} | ≤ 15 MiB: {} |",
        mib(idle),
        idle_fds,
        if mib(idle) <= 15.0 { "met" } else { "MISSED" }
    );
    println!(
        "| holding {} connections ({failed} failed; opened in {open_s:.1} s, {} each) | {:.1} | {:.1} | {fds} | ≤ 64 MiB: {} |",
        held.len(),
        if one_request { "one request" } else { "handshake only" },
        mib(rss),
        mib(procstat::hwm_kib(pid)),
        if mib(rss) <= 64.0 { "met" } else { "MISSED" }
    );
    drop(held);
}

fn trustline_pair(mesh: &Mesh, backend: SocketAddr, cpu: usize) -> (Sidecar, Sidecar) {
    // `TRUSTLINE_BENCH_TL_LOG=0` turns the accountability log off (for comparison only: the targets need it on).
    // `TRUSTLINE_BENCH_TL_FSYNC=10ms` (or `never`) sets `log.fsync` (default `batch`, the sidecar's default).
    let on = env_or("TRUSTLINE_BENCH_TL_LOG", 1u8) != 0;
    let fsync = std::env::var("TRUSTLINE_BENCH_TL_FSYNC").unwrap_or_else(|_| "batch".into());
    let log = |n: &str| {
        if on {
            format!(
                "[log]\ndir = \"{}\"\nfsync = \"{fsync}\"\n",
                mesh.tmp.path().join(format!("log-{n}")).display()
            )
        } else {
            String::new()
        }
    };
    let allow = allow(&[format!("{TD}/web"), format!("{TD}/loadgen")]);
    let api = mesh.sidecar(
        "api",
        &format!(
            "worker_threads = 1\n{}[[inbound]]\nlisten = \"127.0.0.1:0\"\napp = \"{backend}\"\n",
            log("api")
        ),
        &[("10-allow.yaml", allow.as_str()), ("20-deny.yaml", DENY)],
    );
    let web = mesh.sidecar(
        "web",
        &format!(
            "worker_threads = 1\n{}[[outbound]]\nlisten = \"127.0.0.1:0\"\n[[outbound.route]]\nhost = \"api\"\nupstream = \"{}\"\nspiffe_ids = [\"{TD}/api\"]\n",
            log("web"),
            api.inbound[0]
        ),
        &[],
    );
    procstat::pin(sidecar_pid(&api), cpu);
    procstat::pin(sidecar_pid(&web), cpu);
    (api, web)
}

fn print_row(rate: u64, name: &str, s: &Stats, added: &[f64; 4], cpu: Option<(f64, f64)>) {
    let ps = [0.50, 0.90, 0.99, 0.999];
    let pcts: Vec<String> = ps.iter().map(|&p| format!("{:.0}", s.pct(p))).collect();
    let (add, c) = match cpu {
        Some((pct, per)) => (
            added
                .iter()
                .map(|a| format!("{a:.0}"))
                .collect::<Vec<_>>()
                .join(" | "),
            format!("{pct:.0} | {per:.1}"),
        ),
        None => (" |  |  | ".to_owned(), " | ".to_owned()),
    };
    println!(
        "| {rate} | {name} | {} | {:.0} | {} | {add} | {c} |",
        pcts.join(" | "),
        s.pct(1.0),
        s.errors
    );
}

fn free_addr() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], trustline_tests::free_port()))
}

fn first_line(cmd: &[&str]) -> String {
    std::process::Command::new(cmd[0])
        .args(&cmd[1..])
        .output()
        .map(|o| {
            let t = if o.stdout.is_empty() { o.stderr } else { o.stdout };
            String::from_utf8_lossy(&t)
                .lines()
                .next()
                .unwrap_or_default()
                .to_owned()
        })
        .unwrap_or_default()
}

/// Soft `RLIMIT_NOFILE` up to the hard limit (`prlimit`), for the idle connections.
fn raise_nofile() {
    let limits = std::fs::read_to_string("/proc/self/limits").unwrap_or_default();
    let hard = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .and_then(|l| l.split_whitespace().nth(4).map(str::to_owned))
        .unwrap_or_default();
    if hard.parse::<u64>().is_ok() {
        let _ = std::process::Command::new("prlimit")
            .args([
                "--pid",
                &std::process::id().to_string(),
                &format!("--nofile={hard}:{hard}"),
            ])
            .status();
    }
}
