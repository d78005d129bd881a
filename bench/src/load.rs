//! The load generator and the backend.
//!
//! Open loop: each keep-alive connection has its own timetable, and a request held up by a slow previous answer
//! is timed from its *scheduled* time (no coordinated omission). Closed loop: connections back to back for the
//! maximum throughput. New connections: full mutual-TLS 1.3 handshakes (no resumption) plus one request each.
//! Idle connections: many mutual-TLS connections opened and then left alone.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The request every path gets (the Trustline outbound sidecar routes it by `host`).
pub const REQ: &[u8] = b"GET /bench/item HTTP/1.1\r\nhost: api\r\n\r\n";
/// A request every proxy's policy refuses with 403.
pub const DENIED: &[u8] = b"GET /admin/x HTTP/1.1\r\nhost: api\r\n\r\n";

/// One request on a keep-alive connection; returns the status (0 on an I/O error or a closed connection).
pub fn request<S: Read + Write>(r: &mut BufReader<S>, req: &[u8]) -> u16 {
    if r.get_mut()
        .write_all(req)
        .and_then(|()| r.get_mut().flush())
        .is_err()
    {
        return 0;
    }
    let (mut len, mut status) = (0usize, 0u16);
    let mut line = String::new();
    loop {
        line.clear();
        match r.read_line(&mut line) {
            Ok(0) | Err(_) => return 0,
            Ok(_) => {}
        }
        if let Some(s) = line.strip_prefix("HTTP/1.1 ") {
            status = s.get(..3).and_then(|c| c.parse().ok()).unwrap_or(0);
        } else if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
            len = v.trim().parse().unwrap_or(0);
        }
        if line == "\r\n" {
            break;
        }
    }
    let mut body = vec![0u8; len];
    if r.read_exact(&mut body).is_err() {
        return 0;
    }
    status
}

/// A plaintext keep-alive connection.
pub fn connect(addr: SocketAddr) -> BufReader<TcpStream> {
    let s = TcpStream::connect(addr).unwrap();
    s.set_nodelay(true).unwrap();
    BufReader::new(s)
}

/// Latencies (sorted) and errors of a run.
#[derive(Debug, Default)]
pub struct Stats {
    /// Every request's latency, sorted.
    pub lat: Vec<Duration>,
    /// Requests that did not get a 200.
    pub errors: u64,
}

impl Stats {
    /// Percentile `p` (0..=1) in µs.
    pub fn pct(&self, p: f64) -> f64 {
        if self.lat.is_empty() {
            return f64::NAN;
        }
        let i = ((self.lat.len() as f64 * p) as usize).min(self.lat.len() - 1);
        self.lat[i].as_secs_f64() * 1e6
    }
}

/// Open loop: `rate` req/s for `secs` over `conns` keep-alive connections.
pub fn open_loop(addr: SocketAddr, rate: u64, secs: u64, conns: usize) -> Stats {
    let per_conn = rate as f64 / conns as f64;
    let n_per_conn = (per_conn * secs as f64) as usize;
    let interval = Duration::from_secs_f64(1.0 / per_conn);
    let start = Instant::now() + Duration::from_millis(100);
    let handles: Vec<_> = (0..conns)
        .map(|c| {
            std::thread::spawn(move || {
                let mut r = connect(addr);
                let mut st = Stats {
                    lat: Vec::with_capacity(n_per_conn),
                    errors: 0,
                };
                // Spread the connections' timetables evenly over one interval.
                let offset = interval.mul_f64(c as f64 / conns as f64);
                let mut prev_done = start;
                for i in 0..n_per_conn {
                    let scheduled = start + offset + interval.mul_f64(i as f64);
                    let now = Instant::now();
                    if now < scheduled {
                        std::thread::sleep(scheduled - now);
                    }
                    // Timed from the schedule when the previous answer held this request up, else from the send
                    // (so the sleep's own wake-up delay is not counted).
                    let t0 = if prev_done > scheduled {
                        scheduled
                    } else {
                        Instant::now()
                    };
                    if request(&mut r, REQ) != 200 {
                        st.errors += 1;
                        r = connect(addr);
                    }
                    prev_done = Instant::now();
                    st.lat.push(prev_done - t0);
                }
                st
            })
        })
        .collect();
    let mut all = Stats::default();
    for h in handles {
        let s = h.join().unwrap();
        all.lat.extend(s.lat);
        all.errors += s.errors;
    }
    all.lat.sort();
    all
}

/// Closed loop: `conns` connections back to back for `secs`; returns (requests per second, errors).
pub fn closed_loop(addr: SocketAddr, conns: usize, secs: u64) -> (f64, u64) {
    let stop = Arc::new(AtomicBool::new(false));
    let (count, errors) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let handles: Vec<_> = (0..conns)
        .map(|_| {
            let (stop, count, errors) = (stop.clone(), count.clone(), errors.clone());
            std::thread::spawn(move || {
                let mut r = connect(addr);
                while !stop.load(Ordering::Relaxed) {
                    if request(&mut r, REQ) == 200 {
                        count.fetch_add(1, Ordering::Relaxed);
                    } else {
                        errors.fetch_add(1, Ordering::Relaxed);
                        r = connect(addr);
                    }
                }
            })
        })
        .collect();
    let t = Instant::now();
    std::thread::sleep(Duration::from_secs(secs));
    stop.store(true, Ordering::Relaxed);
    for h in handles {
        h.join().unwrap();
    }
    (
        count.load(Ordering::Relaxed) as f64 / t.elapsed().as_secs_f64(),
        errors.load(Ordering::Relaxed),
    )
}

/// A mutual-TLS client connection.
pub type TlsStream = rustls::StreamOwned<rustls::ClientConnection, TcpStream>;

/// Opens a mutual-TLS connection to `addr` with `cfg` (server name `name`) and completes the handshake.
pub fn tls_connect(
    cfg: &Arc<rustls::ClientConfig>,
    name: &str,
    addr: SocketAddr,
) -> std::io::Result<BufReader<TlsStream>> {
    let tcp = TcpStream::connect(addr)?;
    tcp.set_nodelay(true)?;
    let sn = rustls::pki_types::ServerName::try_from(name.to_owned()).map_err(std::io::Error::other)?;
    let conn = rustls::ClientConnection::new(cfg.clone(), sn).map_err(std::io::Error::other)?;
    let mut s = rustls::StreamOwned::new(conn, tcp);
    while s.conn.is_handshaking() {
        s.conn.complete_io(&mut s.sock)?;
    }
    Ok(BufReader::new(s))
}

/// New connections: `threads` clients each open a fresh mutual-TLS connection (full handshake), send one
/// request, and close it, back to back for `secs`. Returns (connections per second with a 200, errors, the key
/// exchange group negotiated, or the first error).
pub fn handshakes(
    cfg: Arc<rustls::ClientConfig>,
    name: &str,
    addr: SocketAddr,
    threads: usize,
    secs: u64,
) -> (f64, u64, String) {
    let stop = Arc::new(AtomicBool::new(false));
    let (count, errors) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let group = Arc::new(std::sync::Mutex::new(String::new()));
    let handles: Vec<_> = (0..threads)
        .map(|_| {
            let (stop, count, errors, group) = (stop.clone(), count.clone(), errors.clone(), group.clone());
            let (cfg, name) = (cfg.clone(), name.to_owned());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let ok = match tls_connect(&cfg, &name, addr) {
                        Ok(mut r) => {
                            if let Some(g) = r.get_ref().conn.negotiated_key_exchange_group() {
                                let mut gr = group.lock().unwrap();
                                if gr.is_empty() {
                                    *gr = format!("{:?}", g.name());
                                }
                            }
                            let ok = request(&mut r, REQ) == 200;
                            r.get_mut().conn.send_close_notify();
                            let _ = r.get_mut().flush();
                            ok
                        }
                        Err(e) => {
                            let mut gr = group.lock().unwrap();
                            if gr.is_empty() {
                                *gr = format!("error: {e}");
                            }
                            false
                        }
                    };
                    if ok {
                        count.fetch_add(1, Ordering::Relaxed);
                    } else {
                        errors.fetch_add(1, Ordering::Relaxed);
                    }
                }
            })
        })
        .collect();
    let t = Instant::now();
    std::thread::sleep(Duration::from_secs(secs));
    stop.store(true, Ordering::Relaxed);
    for h in handles {
        h.join().unwrap();
    }
    let g = group.lock().unwrap().clone();
    (
        count.load(Ordering::Relaxed) as f64 / t.elapsed().as_secs_f64(),
        errors.load(Ordering::Relaxed),
        g,
    )
}

/// Opens `n` mutual-TLS connections (each completes its handshake and, with `one_request`, one request) from
/// `threads` threads and returns them, to be held idle. Connections that fail are counted, not retried.
pub fn idle_connections(
    cfg: Arc<rustls::ClientConfig>,
    name: &str,
    addr: SocketAddr,
    n: usize,
    threads: usize,
    one_request: bool,
) -> (Vec<BufReader<TlsStream>>, usize) {
    let handles: Vec<_> = (0..threads)
        .map(|t| {
            let (cfg, name) = (cfg.clone(), name.to_owned());
            let mine = n / threads + usize::from(t < n % threads);
            std::thread::spawn(move || {
                let mut held = Vec::with_capacity(mine);
                let mut failed = 0;
                for _ in 0..mine {
                    match tls_connect(&cfg, &name, addr) {
                        Ok(mut r) => {
                            if !one_request || request(&mut r, REQ) == 200 {
                                held.push(r);
                            } else {
                                failed += 1;
                            }
                        }
                        Err(_) => failed += 1,
                    }
                }
                (held, failed)
            })
        })
        .collect();
    let (mut all, mut failed) = (Vec::with_capacity(n), 0);
    for h in handles {
        let (held, f) = h.join().unwrap();
        all.extend(held);
        failed += f;
    }
    (all, failed)
}

/// The backend every path ends at: a minimal HTTP/1.1 keep-alive server answering `200` with an 11-byte JSON
/// body, on `rt`.
pub fn backend(rt: &tokio::runtime::Runtime) -> SocketAddr {
    rt.block_on(async {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let a = l.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((tcp, _)) = l.accept().await {
                let _ = tcp.set_nodelay(true);
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(|_req| async {
                        Ok::<_, std::convert::Infallible>(hyper::Response::new(http_body_util::Full::new(
                            bytes::Bytes::from_static(b"{\"ok\":true}"),
                        )))
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(tcp), svc)
                        .await;
                });
            }
        });
        a
    })
}
