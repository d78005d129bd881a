//! Idle HTTP/1.1 keep-alive connections without hyper's buffers ("parking").
//!
//! hyper keeps a read buffer (8 to 16 KiB) and a header write buffer (8 KiB) for the whole life of an HTTP/1.1
//! connection, idle or not: 10,000 idle keep-alive connections would hold over 200 MiB doing nothing. nginx
//! releases its buffers on an idle keep-alive connection; so does this module.
//!
//! A connection is served by a hyper connection ("an activation") whose I/O is a `ParkIo`. When hyper, idle
//! between requests, asks for the next request's bytes and none are there, `ParkIo` answers end-of-stream:
//! hyper ends that activation cleanly (flushing what it wrote, without closing the transport), its state and
//! buffers are freed, and the transport comes back. It waits a short while in its task for the next request
//! (holding nothing but the transport), then moves to its listener's [`Lot`]: a table of parked connections
//! tended by one task, which starts the next activation in a new task when the socket becomes readable, and
//! closes connections idle for longer than the idle timeout.
//!
//! "Idle" is decided from what hyper provably finished, never guessed: every request body and response body is
//! wrapped ([`Tracked`]) so the connection knows when each has ended. A connection parks only when
//! - every request body was read to its end and every response body was written to its end,
//! - no byte has reached hyper since (the start of a next request head would be in hyper's buffer), and
//! - the transport has nothing to read right now.
//!
//! HTTP/2 connections (which read continuously), upgraded connections (`101 Switching Protocols`, after which
//! the bytes are not HTTP) and connections whose request body was dropped unread (hyper drains or closes those
//! itself) never park: they stay with hyper for their whole life, as before.
//!
//! A connection can also be retired before shutdown ([`Retire`], [`Lot::serve_retiring`]): the inbound
//! listeners retire a connection whose peer's certificate nears its end or is no longer valid
//! (`crate::live_peer`). It then drains as on shutdown, or is closed if parked.

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Wake, Waker};
use std::time::Duration;

use http::{Request, Response, StatusCode, Version};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt as _, ReadBuf};
use tokio::sync::{watch, Notify};

use crate::config::Limits;
use crate::server::stopped;

/// The body of every request the proxy's services receive.
pub type RequestBody = Tracked<Incoming>;

/// A transport that can say when it has bytes to read without reading them (so a parked connection holds no
/// read buffer).
pub trait Transport: AsyncRead + AsyncWrite + Unpin + Send + 'static {
    /// Resolves when the transport is readable (or failed).
    fn poll_readable(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>>;
}

impl<T: Transport> Transport for Box<T> {
    fn poll_readable(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        (**self).poll_readable(cx)
    }
}

impl Transport for tokio::net::TcpStream {
    fn poll_readable(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.poll_read_ready(cx)
    }
}

/// What one activation knows about its requests.
#[derive(Debug, Default)]
struct State {
    /// Request bodies not yet read to their end.
    bodies: AtomicUsize,
    /// Responses whose body was not yet written to its end.
    responses: AtomicUsize,
    /// Bytes reached hyper since the last request started, while no request body was open: the start of the
    /// next request head is in hyper's buffer.
    dirty: AtomicBool,
    /// HTTP/2, an upgrade, or a request body dropped before its end: this connection stays with hyper.
    never: AtomicBool,
    /// An HTTP/1.x request was served: the connection speaks HTTP/1.1.
    http1: AtomicBool,
}

impl State {
    fn parkable(&self) -> bool {
        !self.never.load(Ordering::Acquire)
            && !self.dirty.load(Ordering::Acquire)
            && self.bodies.load(Ordering::Acquire) == 0
            && self.responses.load(Ordering::Acquire) == 0
    }
}

/// A request or response body that tells its connection when it has ended.
#[derive(Debug)]
pub struct Tracked<B> {
    inner: B,
    /// `None` for a request body that counts for nothing (ended from the start).
    state: Option<Arc<State>>,
    request: bool,
    ended: bool,
}

impl<B: Body> Tracked<B> {
    fn request(inner: B, state: &Arc<State>) -> Self {
        let state = (!inner.is_end_stream()).then(|| {
            state.bodies.fetch_add(1, Ordering::AcqRel);
            state.clone()
        });
        Self {
            inner,
            state,
            request: true,
            ended: false,
        }
    }

    /// The response to `pending`'s request: it keeps the request's place in `responses` until written.
    fn response(inner: B, mut pending: PendingResponse) -> Self {
        Self {
            inner,
            state: pending.0.take(),
            request: false,
            ended: false,
        }
    }
}

impl<B: Body + Unpin> Body for Tracked<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let r = Pin::new(&mut self.inner).poll_frame(cx);
        match &r {
            Poll::Ready(None) => self.ended = true,
            Poll::Ready(Some(Ok(_))) if self.inner.is_end_stream() => self.ended = true,
            _ => {}
        }
        r
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl<B> Drop for Tracked<B> {
    fn drop(&mut self) {
        let Some(state) = self.state.take() else { return };
        if self.request {
            // Dropped before its end: hyper drains or closes the rest itself, so it keeps the connection.
            if !self.ended {
                state.never.store(true, Ordering::Release);
            }
            state.bodies.fetch_sub(1, Ordering::AcqRel);
        } else {
            state.responses.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

/// A request that reached the service and whose response is not yet written: counted in `responses` from the
/// call on (hyper reads while the service works, and that read must not park), until the response body is
/// written ([`Tracked::response`] takes the count over) or the call is abandoned.
struct PendingResponse(Option<Arc<State>>);

impl PendingResponse {
    fn new(state: &Arc<State>) -> Self {
        state.responses.fetch_add(1, Ordering::AcqRel);
        Self(Some(state.clone()))
    }
}

impl Drop for PendingResponse {
    fn drop(&mut self) {
        if let Some(state) = self.0.take() {
            state.responses.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

/// The transport as hyper sees it during one activation: answers end-of-stream instead of "nothing yet" once
/// the connection is parkable, and gives the transport back (not shut down) when hyper drops it.
struct ParkIo<T: Transport> {
    io: Option<T>,
    state: Arc<State>,
    parked: bool,
    back: Option<tokio::sync::oneshot::Sender<T>>,
}

impl<T: Transport> Drop for ParkIo<T> {
    fn drop(&mut self) {
        if self.parked {
            if let (Some(io), Some(back)) = (self.io.take(), self.back.take()) {
                let _ = back.send(io);
            }
        }
    }
}

fn gone() -> io::Error {
    io::Error::new(io::ErrorKind::NotConnected, "transport already handed back")
}

impl<T: Transport> AsyncRead for ParkIo<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.parked {
            return Poll::Ready(Ok(()));
        }
        let before = buf.filled().len();
        let this = &mut *self;
        let Some(io) = this.io.as_mut() else {
            return Poll::Ready(Err(gone()));
        };
        match Pin::new(io).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                if buf.filled().len() > before && this.state.bodies.load(Ordering::Acquire) == 0 {
                    this.state.dirty.store(true, Ordering::Release);
                }
                Poll::Ready(Ok(()))
            }
            Poll::Pending if this.state.parkable() => {
                this.parked = true;
                Poll::Ready(Ok(()))
            }
            other => other,
        }
    }
}

impl<T: Transport> AsyncWrite for ParkIo<T> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        match self.io.as_mut() {
            Some(io) => Pin::new(io).poll_write(cx, buf),
            None => Poll::Ready(Err(gone())),
        }
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.io.as_mut() {
            Some(io) => Pin::new(io).poll_write_vectored(cx, bufs),
            None => Poll::Ready(Err(gone())),
        }
    }

    fn is_write_vectored(&self) -> bool {
        self.io.as_ref().is_some_and(|io| io.is_write_vectored())
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.io.as_mut() {
            Some(io) => Pin::new(io).poll_flush(cx),
            None => Poll::Ready(Err(gone())),
        }
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let parked = self.parked;
        match self.io.as_mut() {
            // Parked: hyper is done with this activation, not with the connection.
            Some(io) if parked => Pin::new(io).poll_flush(cx),
            Some(io) => Pin::new(io).poll_shutdown(cx),
            None => Poll::Ready(Err(gone())),
        }
    }
}

/// Runs one activation until it ends (`Some`), or drains it gracefully on shutdown or once `retired` resolves
/// (`None`).
async fn activation<C, E>(
    mut conn: Pin<Box<C>>,
    shutdown: &mut watch::Receiver<bool>,
    retired: impl Future<Output = ()>,
    graceful: fn(Pin<&mut C>),
) -> Option<Result<(), E>>
where
    C: Future<Output = Result<(), E>>,
{
    tokio::select! {
        r = conn.as_mut() => Some(r),
        () = stopped(shutdown) => {
            graceful(conn.as_mut());
            let _ = conn.await;
            None
        }
        () = retired => {
            graceful(conn.as_mut());
            let _ = conn.await;
            None
        }
    }
}

/// Tells one connection to stop taking requests before its listener shuts down: at once ([`now`](Self::now)),
/// or from a time on. It then drains as on shutdown: HTTP/2 sends GOAWAY and finishes the streams in flight,
/// HTTP/1.1 finishes the response in flight and closes.
///
/// At the time, an HTTP/1.1 connection is closed only if it is parked (idle, as the idle timeout closes it):
/// closing it while it serves a request would leave the client no way to tell that the connection will not
/// take its next request. The service says so on that request's response instead (`Connection: close`, and
/// [`now`](Self::now)). HTTP/2's GOAWAY has no such race: the time drains an HTTP/2 connection, busy or idle.
#[derive(Debug, Default)]
pub struct Retire {
    at: Option<tokio::time::Instant>,
    asked: AtomicBool,
    notify: Notify,
}

impl Retire {
    /// Retires the connection when asked, and also at `at` if given.
    pub fn new(at: Option<tokio::time::Instant>) -> Self {
        Self {
            at,
            ..Self::default()
        }
    }

    /// Drains the connection now: no new request, the ones in flight finish.
    pub fn now(&self) {
        if !self.asked.swap(true, Ordering::AcqRel) {
            self.notify.notify_waiters();
        }
    }

    /// The time it is retired at, if any.
    pub fn at(&self) -> Option<tokio::time::Instant> {
        self.at
    }

    /// Whether [`now`](Self::now) was called.
    pub fn asked(&self) -> bool {
        self.asked.load(Ordering::Acquire)
    }

    /// Resolves when the activation whose requests `state` tracks must drain (`http1`: the connection served
    /// HTTP/1.x requests in an earlier activation); never without a `Retire`.
    async fn due(this: Option<&Self>, state: &State, http1: bool) {
        let Some(this) = this else {
            return std::future::pending().await;
        };
        let asked = async {
            loop {
                let told = this.notify.notified();
                tokio::pin!(told);
                told.as_mut().enable();
                if this.asked() {
                    return;
                }
                told.await;
            }
        };
        let timed = async {
            if let Some(at) = this.at {
                tokio::time::sleep_until(at).await;
                if !http1 && !state.http1.load(Ordering::Acquire) {
                    return;
                }
            }
            std::future::pending::<()>().await;
        };
        tokio::select! {
            () = asked => {}
            () = timed => {}
        }
    }
}

/// How a listener serves HTTP: hyper's settings and the idle timeout, shared by its connections (so an idle
/// connection's task does not carry a copy).
#[derive(Clone)]
pub struct Http {
    /// A connection's first activation: HTTP/1.1 or HTTP/2, told apart by the first bytes.
    auto: auto::Builder<TokioExecutor>,
    /// Activations once an HTTP/1.1 request was served (the protocol is known: no detection, and no read
    /// just for it).
    h1: hyper::server::conn::http1::Builder,
    idle_timeout: Duration,
    /// How long a connection that has not sent a request yet may stay silent (`limits.request_timeout`, also
    /// hyper's header read timeout, or the idle timeout if shorter): parked, it is closed after this.
    first_request_timeout: Duration,
}

impl std::fmt::Debug for Http {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Http")
            .field("idle_timeout", &self.idle_timeout)
            .field("first_request_timeout", &self.first_request_timeout)
            .finish_non_exhaustive()
    }
}

/// Concurrent HTTP/2 streams one connection may open (the common default of servers and proxies).
pub const MAX_STREAMS_PER_CONNECTION: u32 = 100;

impl Http {
    /// HTTP/1.1 (with upgrades) and HTTP/2 per `limits`.
    pub fn new(limits: &Limits) -> Arc<Self> {
        let mut b = auto::Builder::new(TokioExecutor::new());
        b.http1()
            .timer(TokioTimer::new())
            .header_read_timeout(limits.request_timeout)
            .max_buf_size(limits.max_header_bytes.max(8192));
        let mut h1 = hyper::server::conn::http1::Builder::new();
        h1.timer(TokioTimer::new())
            .header_read_timeout(limits.request_timeout)
            .max_buf_size(limits.max_header_bytes.max(8192));
        b.http2()
            .timer(TokioTimer::new())
            .adaptive_window(true)
            .keep_alive_interval(Some(Duration::from_secs(30)))
            // Per-connection state is bounded: a peer gets at most this many streams at once (each holds its
            // headers, up to limits.max_header_bytes, and flow-control buffers); more are refused with
            // REFUSED_STREAM, as HTTP/2 prescribes.
            .max_concurrent_streams(MAX_STREAMS_PER_CONNECTION)
            .max_header_list_size(u32::try_from(limits.max_header_bytes).unwrap_or(u32::MAX));
        Arc::new(Self {
            auto: b,
            h1,
            idle_timeout: limits.idle_timeout,
            first_request_timeout: limits.request_timeout.min(limits.idle_timeout),
        })
    }
}

/// What a lot serves: the proxy's services, closures over [`RequestBody`] requests.
pub trait Serve: Clone + Send + Sync + 'static {
    /// The response body.
    type Body: Body<Data: Send, Error: Into<Box<dyn std::error::Error + Send + Sync>>>
        + Send
        + Unpin
        + 'static;
    /// The response future.
    type Future: Future<Output = Result<Response<Self::Body>, Infallible>> + Send + 'static;
    /// Answers `req`.
    fn call(&self, req: Request<RequestBody>) -> Self::Future;
}

impl<F, Fut, B> Serve for F
where
    F: Fn(Request<RequestBody>) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Result<Response<B>, Infallible>> + Send + 'static,
    B: Body<Data: Send, Error: Into<Box<dyn std::error::Error + Send + Sync>>> + Send + Unpin + 'static,
{
    type Body = B;
    type Future = Fut;

    fn call(&self, req: Request<RequestBody>) -> Fut {
        self(req)
    }
}

/// How long a connection that just went idle waits in its own task (holding no buffers) before it moves to
/// the lot.
const LINGER: Duration = Duration::from_millis(50);

/// A connection between activations: the transport, the service, and what it keeps while it lives (the
/// listener's connection permit, a gauge).
struct Conn<T, F, K> {
    io: T,
    svc: F,
    /// Held for its `Drop`.
    _keep: K,
    /// It served an HTTP/1.x request: later activations skip protocol detection.
    http1: bool,
    /// When to stop taking requests, besides shutdown.
    retire: Option<Arc<Retire>>,
}

/// A parked connection.
struct Slot<T, F, K> {
    conn: Conn<T, F, K>,
    /// Closed at this time unless it becomes readable first.
    deadline: std::time::Instant,
    waker: Waker,
}

/// Keys of parked connections whose transport became readable.
#[derive(Default)]
struct Ready {
    keys: Mutex<Vec<u64>>,
    notify: Notify,
}

/// Wakes the lot for one parked connection.
struct SlotWaker {
    key: u64,
    ready: Arc<Ready>,
}

impl Wake for SlotWaker {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        lock(&self.ready.keys).push(self.key);
        self.ready.notify.notify_one();
    }
}

fn lock<X>(m: &Mutex<X>) -> std::sync::MutexGuard<'_, X> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Where a listener's idle HTTP/1.1 connections wait for their next request: each is an entry in a table
/// (the transport, the service, a waker), not a task. One task per listener tends the lot: it restarts a
/// connection whose transport became readable (a new task, a new activation), closes those idle for longer
/// than the idle timeout, and closes them all on shutdown.
pub struct Lot<T, F, K> {
    shared: Arc<Shared<T, F, K>>,
}

impl<T, F, K> Clone for Lot<T, F, K> {
    fn clone(&self) -> Self {
        Self {
            shared: self.shared.clone(),
        }
    }
}

struct Shared<T, F, K> {
    http: Arc<Http>,
    shutdown: watch::Receiver<bool>,
    slots: Mutex<HashMap<u64, Slot<T, F, K>>>,
    ready: Arc<Ready>,
    next: AtomicU64,
    releases: AtomicU64,
}

impl<T: Transport, F: Serve, K: Send + 'static> Lot<T, F, K> {
    /// A lot for one listener, and the task tending it (until `shutdown`).
    pub fn new(http: Arc<Http>, shutdown: watch::Receiver<bool>) -> Self {
        let shared = Arc::new(Shared {
            http,
            shutdown,
            slots: Mutex::new(HashMap::new()),
            ready: Arc::new(Ready::default()),
            next: AtomicU64::new(0),
            releases: AtomicU64::new(0),
        });
        tokio::spawn(Shared::tend(shared.clone()));
        Self { shared }
    }

    /// Serves one connection (HTTP/1.1 with upgrades, or HTTP/2) until it closes or parks; a parked
    /// connection is served again, in a task of its own, when its next bytes arrive. `keep` lives as long as
    /// the connection. On shutdown an active connection drains gracefully and a parked one is closed.
    pub async fn serve(&self, io: T, svc: F, keep: K) {
        self.run(io, svc, keep, None).await;
    }

    /// [`serve`](Self::serve), and drains the connection early when `retire` says so (a parked connection is
    /// not woken for it: its next request finds out).
    pub async fn serve_retiring(&self, io: T, svc: F, keep: K, retire: Arc<Retire>) {
        self.run(io, svc, keep, Some(retire)).await;
    }

    async fn run(&self, io: T, svc: F, keep: K, retire: Option<Arc<Retire>>) {
        Shared::run(
            self.shared.clone(),
            Conn {
                io,
                svc,
                _keep: keep,
                http1: false,
                retire,
            },
        )
        .await;
    }

    /// Times a connection of this lot went idle and let go of hyper's state and buffers (then lingered, and
    /// parked if nothing came).
    pub fn releases(&self) -> u64 {
        self.shared.releases.load(Ordering::Relaxed)
    }

    /// Connections parked now.
    pub fn parked(&self) -> usize {
        lock(&self.shared.slots).len()
    }
}

impl<T: Transport, F: Serve, K: Send + 'static> Shared<T, F, K> {
    /// Activations until the connection closes or parks.
    async fn run(self: Arc<Self>, mut c: Conn<T, F, K>) {
        let mut shutdown = self.shutdown.clone();
        loop {
            let state = Arc::new(State::default());
            let (back, returned) = tokio::sync::oneshot::channel();
            let pio = TokioIo::new(ParkIo {
                io: Some(c.io),
                state: state.clone(),
                parked: false,
                back: Some(back),
            });
            let (svc, st) = (c.svc.clone(), state.clone());
            let tracked = hyper::service::service_fn(move |req: Request<Incoming>| {
                st.dirty.store(false, Ordering::Release);
                if req.version() == Version::HTTP_2 {
                    st.never.store(true, Ordering::Release);
                } else {
                    st.http1.store(true, Ordering::Release);
                }
                let pending = PendingResponse::new(&st);
                let req = req.map(|b| Tracked::request(b, &st));
                let (fut, st) = (svc.call(req), st.clone());
                async move {
                    let Ok(resp) = fut.await;
                    if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
                        st.never.store(true, Ordering::Release);
                    }
                    Ok::<_, Infallible>(resp.map(|b| Tracked::response(b, pending)))
                }
            });
            let http = &self.http;
            let retired = Retire::due(c.retire.as_deref(), &state, c.http1);
            let ended = if !c.http1 {
                let conn = Box::pin(http.auto.serve_connection_with_upgrades(pio, tracked));
                activation(conn, &mut shutdown, retired, |c| c.graceful_shutdown()).await
            } else {
                let conn = Box::pin(http.h1.serve_connection(pio, tracked).with_upgrades());
                let ended = activation(conn, &mut shutdown, retired, |c| c.graceful_shutdown()).await;
                ended.map(|r| r.map_err(Into::into))
            };
            let Some(ended) = ended else { return };
            if let Err(e) = ended {
                tracing::debug!(error = %e, "connection ended with an error");
                return;
            }
            // Handed back only when it parked; otherwise hyper closed it.
            let Ok(io) = returned.await else { return };
            c.io = io;
            if c.retire.as_ref().is_some_and(|r| r.asked()) {
                // Retired while its last response was going out: closed, not parked.
                close_all(vec![c]).await;
                return;
            }
            c.http1 |= state.http1.load(Ordering::Acquire);
            self.releases.fetch_add(1, Ordering::Relaxed);
            // hyper's state and buffers are gone. A busy connection's next request usually comes within
            // LINGER: wait for it here, and go to the lot (which costs a hand-over and a new task) only if not.
            let io = &mut c.io;
            let next = tokio::time::timeout(LINGER, std::future::poll_fn(move |cx| io.poll_readable(cx)));
            if next.await.is_ok() {
                continue;
            }
            match self.park(c) {
                Some(readable) => c = readable,
                None => return,
            }
        }
    }

    /// Parks `c`; gives it back when its transport is readable already.
    fn park(&self, c: Conn<T, F, K>) -> Option<Conn<T, F, K>> {
        if *self.shutdown.borrow() {
            return None;
        }
        let key = self.next.fetch_add(1, Ordering::Relaxed);
        let waker = Waker::from(Arc::new(SlotWaker {
            key,
            ready: self.ready.clone(),
        }));
        let mut slots = lock(&self.slots);
        // Polled under the lock: a wake-up that comes at once finds the slot in place.
        match c.io.poll_readable(&mut Context::from_waker(&waker)) {
            Poll::Ready(_) => Some(c),
            Poll::Pending => {
                // A connection that never sent a request gets the time to send one, not to idle.
                let limit = if c.http1 {
                    self.http.idle_timeout
                } else {
                    self.http.first_request_timeout
                };
                // A connection retired at a time is closed then if it is still parked.
                let mut deadline = std::time::Instant::now() + limit;
                if let Some(at) = c.retire.as_ref().and_then(|r| r.at) {
                    deadline = deadline.min(at.into_std());
                }
                slots.insert(
                    key,
                    Slot {
                        conn: c,
                        deadline,
                        waker,
                    },
                );
                None
            }
        }
    }

    /// The lot's task: restarts readable connections, closes idle ones, and all of them on shutdown.
    async fn tend(self: Arc<Self>) {
        let mut shutdown = self.shutdown.clone();
        let idle = self.http.idle_timeout;
        // The shorter of the two deadlines a slot can have.
        let shortest = self.http.first_request_timeout;
        let mut sweep =
            tokio::time::interval((shortest / 4).clamp(Duration::from_millis(10), Duration::from_secs(1)));
        sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = self.ready.notify.notified() => self.restart_readable(),
                _ = sweep.tick() => {
                    let now = std::time::Instant::now();
                    let closing: Vec<_> = lock(&self.slots)
                        .extract_if(|_, s| now >= s.deadline)
                        .map(|(_, s)| s.conn)
                        .collect();
                    if !closing.is_empty() {
                        tracing::debug!(connections = closing.len(), idle = ?idle, "closing idle connections");
                        tokio::spawn(close_all(closing));
                    }
                }
                () = stopped(&mut shutdown) => {
                    let all: Vec<_> = lock(&self.slots).drain().map(|(_, s)| s.conn).collect();
                    close_all(all).await;
                    return;
                }
            }
        }
    }

    fn restart_readable(self: &Arc<Self>) {
        let keys = std::mem::take(&mut *lock(&self.ready.keys));
        let mut slots = lock(&self.slots);
        for key in keys {
            let Some(slot) = slots.get(&key) else { continue };
            if slot
                .conn
                .io
                .poll_readable(&mut Context::from_waker(&slot.waker))
                .is_pending()
            {
                continue;
            }
            if let Some(slot) = slots.remove(&key) {
                tokio::spawn(Shared::run(self.clone(), slot.conn));
            }
        }
    }
}

/// Closes parked connections: TLS close_notify and the socket's end, as far as the socket takes them now (a
/// peer that does not read is not waited for; dropping the connection closes it anyway).
async fn close_all<T: Transport, F, K>(conns: Vec<Conn<T, F, K>>) {
    for mut c in conns {
        // A zero timeout polls the shutdown once.
        let _ = tokio::time::timeout(Duration::ZERO, c.io.shutdown()).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    #[test]
    fn a_fresh_activation_parks_until_bytes_arrive() {
        let s = State::default();
        assert!(
            s.parkable(),
            "a connection that has sent nothing yet holds no buffers either"
        );
        s.dirty.store(true, Ordering::Release);
        assert!(!s.parkable());
    }

    #[test]
    fn open_bodies_and_head_bytes_keep_the_connection() {
        let s = Arc::new(State::default());
        let pending = PendingResponse::new(&s);
        assert!(!s.parkable(), "the service is working on the request");
        let resp = Tracked::response(http_body_util::Empty::<Bytes>::new(), pending);
        assert!(!s.parkable(), "response not written");
        drop(resp);
        assert!(s.parkable());
        drop(PendingResponse::new(&s));
        assert!(s.parkable(), "an abandoned call releases its count");
        s.dirty.store(true, Ordering::Release);
        assert!(!s.parkable(), "a next head is in hyper's buffer");
    }

    #[test]
    fn a_request_body_dropped_unread_keeps_the_connection_for_good() {
        let s = Arc::new(State::default());
        let body = Tracked::request(http_body_util::Full::new(Bytes::from_static(b"abc")), &s);
        assert!(!s.parkable(), "request body open");
        drop(body);
        assert!(!s.parkable(), "dropped unread");
        assert!(s.never.load(Ordering::Acquire));
    }

    #[tokio::test]
    async fn a_request_body_read_to_its_end_releases_the_connection() {
        use http_body_util::BodyExt as _;
        let s = Arc::new(State::default());
        let mut body = Tracked::request(http_body_util::Full::new(Bytes::from_static(b"abc")), &s);
        while let Some(f) = body.frame().await {
            assert!(f.is_ok());
        }
        drop(body);
        assert!(s.parkable());
        let empty = Tracked::request(http_body_util::Empty::<Bytes>::new(), &s);
        assert!(s.parkable(), "an empty body counts for nothing");
        drop(empty);
        assert!(s.parkable());
    }

    /// Serves `n` connections on a loopback listener: answers each request with its method, path and body
    /// length, after reading the body to its end.
    /// A listener's lot, seen from a test: (times released, parked now).
    type Probe = Box<dyn Fn() -> (u64, usize) + Send + Sync>;

    async fn server(idle_timeout: Duration) -> (std::net::SocketAddr, watch::Sender<bool>, Probe) {
        server_with(Limits {
            idle_timeout,
            ..Limits::default()
        })
        .await
    }

    async fn server_with(limits: Limits) -> (std::net::SocketAddr, watch::Sender<bool>, Probe) {
        use http_body_util::BodyExt as _;
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let (stop_tx, stop) = watch::channel(false);
        let http = Http::new(&limits);
        let svc = |req: Request<RequestBody>| async move {
            let (parts, body) = req.into_parts();
            let n = body.collect().await.map(|b| b.to_bytes().len()).unwrap_or(0);
            let text = format!("{} {} {n}", parts.method, parts.uri.path());
            Ok::<_, Infallible>(Response::new(http_body_util::Full::new(Bytes::from(text))))
        };
        let lot = Lot::new(http, stop);
        let probe = lot.clone();
        tokio::spawn(async move {
            while let Ok((tcp, _)) = l.accept().await {
                let lot = lot.clone();
                tokio::spawn(async move { lot.serve(tcp, svc, ()).await });
            }
        });
        (
            addr,
            stop_tx,
            Box::new(move || (probe.releases(), probe.parked())),
        )
    }

    /// Waits (bounded) until `probe` shows `n` connections parked; returns the times released.
    async fn parked(probe: &Probe, n: usize) -> u64 {
        let t = std::time::Instant::now();
        loop {
            let (parks, now) = probe();
            if now == n {
                return parks;
            }
            assert!(t.elapsed() < Duration::from_secs(10), "{now} parked, not {n}");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    async fn send(
        tx: &mut hyper::client::conn::http1::SendRequest<http_body_util::Full<Bytes>>,
        method: &str,
        path: &str,
        body: &'static str,
    ) -> String {
        use http_body_util::BodyExt as _;
        tx.ready().await.unwrap();
        let req = Request::builder()
            .method(method)
            .uri(path)
            .header("host", "test")
            .body(http_body_util::Full::new(Bytes::from_static(body.as_bytes())))
            .unwrap();
        let resp = tx.send_request(req).await.unwrap();
        String::from_utf8(resp.into_body().collect().await.unwrap().to_bytes().to_vec()).unwrap()
    }

    #[tokio::test]
    async fn a_keep_alive_connection_parks_between_requests_and_carries_on() {
        let (addr, _stop, probe) = server(Duration::from_secs(30)).await;
        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (mut tx, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
            .await
            .unwrap();
        let conn = tokio::spawn(conn);
        for i in 0..5 {
            assert_eq!(
                send(&mut tx, "GET", &format!("/get/{i}"), "").await,
                format!("GET /get/{i} 0")
            );
            assert_eq!(send(&mut tx, "POST", "/post", "hello").await, "POST /post 5");
            // Idle long enough to park.
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // Released after each response (the next request was not there yet), in the pauses at least; parked
        // once idle for longer than LINGER.
        let released = parked(&probe, 1).await;
        assert!(released >= 5, "{released}");
        drop(tx);
        conn.await.unwrap().unwrap();
        parked(&probe, 0).await;
    }

    #[tokio::test]
    async fn a_head_split_across_writes_is_not_taken_for_idleness() {
        use tokio::io::AsyncReadExt as _;
        let (addr, _stop, probe) = server(Duration::from_secs(30)).await;
        let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        let mut got = Vec::new();
        for i in 0..3 {
            tcp.write_all(format!("GET /split/{i} HTTP/1.1\r\nho").as_bytes())
                .await
                .unwrap();
            tokio::time::sleep(Duration::from_millis(20)).await;
            tcp.write_all(b"st: test\r\n\r\n").await.unwrap();
            let mut buf = [0u8; 1024];
            let n = tcp.read(&mut buf).await.unwrap();
            got.push(String::from_utf8_lossy(&buf[..n]).into_owned());
        }
        for (i, r) in got.iter().enumerate() {
            assert!(r.starts_with("HTTP/1.1 200"), "{r}");
            assert!(r.ends_with(&format!("GET /split/{i} 0")), "{r}");
        }
        // Released after each response (and perhaps before the first bytes), never in the middle of a head.
        let released = parked(&probe, 1).await;
        assert!((3..=4).contains(&released), "{released}");
        drop(tcp);
    }

    /// A raw connection that has carried one request and read its answer.
    async fn get_once(addr: std::net::SocketAddr) -> tokio::net::TcpStream {
        use tokio::io::AsyncReadExt as _;
        let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        tcp.write_all(b"GET /once HTTP/1.1\r\nhost: test\r\n\r\n")
            .await
            .unwrap();
        let mut buf = vec![0u8; 1024];
        let n = tcp.read(&mut buf).await.unwrap();
        assert!(String::from_utf8_lossy(&buf[..n]).ends_with("GET /once 0"));
        tcp
    }

    #[tokio::test]
    async fn a_parked_connection_is_closed_after_the_idle_timeout() {
        use tokio::io::AsyncReadExt as _;
        let (addr, _stop, _) = server(Duration::from_millis(100)).await;
        let mut tcp = get_once(addr).await;
        let mut buf = vec![0u8; 1024];
        // Then nothing: the server closes the connection (end of stream) once the idle timeout has passed.
        let n = tokio::time::timeout(Duration::from_secs(10), tcp.read(&mut buf))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(n, 0);
    }

    #[tokio::test]
    async fn a_connection_that_never_sends_a_request_is_closed_after_the_request_timeout() {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let (addr, _stop, probe) = server_with(Limits {
            idle_timeout: Duration::from_secs(60),
            request_timeout: Duration::from_millis(300),
            ..Limits::default()
        })
        .await;
        // Silent from the start: closed at the request timeout, not after a minute of idling.
        let mut silent = tokio::net::TcpStream::connect(addr).await.unwrap();
        let mut buf = vec![0u8; 1024];
        let n = tokio::time::timeout(Duration::from_secs(10), silent.read(&mut buf))
            .await
            .expect("closed well before the idle timeout")
            .unwrap();
        assert_eq!(n, 0);
        // One that served a request idles past the request timeout and carries on.
        let mut tcp = get_once(addr).await;
        parked(&probe, 1).await;
        tokio::time::sleep(Duration::from_millis(900)).await;
        assert_eq!(probe().1, 1, "still parked");
        tcp.write_all(b"GET /again HTTP/1.1\r\nhost: t\r\n\r\n")
            .await
            .unwrap();
        let n = tcp.read(&mut buf).await.unwrap();
        assert!(String::from_utf8_lossy(&buf[..n]).ends_with("GET /again 0"));
    }

    #[tokio::test]
    async fn an_http2_connection_that_parked_before_its_preface_is_served_as_http2() {
        use http_body_util::BodyExt as _;
        let (addr, _stop, probe) = server(Duration::from_secs(30)).await;
        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        // Nothing yet: the connection goes idle, and parks.
        assert_eq!(parked(&probe, 1).await, 1);
        let (mut tx, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp))
            .await
            .unwrap();
        let conn = tokio::spawn(conn);
        for i in 0..3 {
            let req = Request::builder()
                .uri(format!("http://test/h2/{i}"))
                .body(http_body_util::Empty::<Bytes>::new())
                .unwrap();
            let resp = tx.send_request(req).await.unwrap();
            assert_eq!(resp.version(), Version::HTTP_2);
            let body = resp.into_body().collect().await.unwrap().to_bytes();
            assert_eq!(body, format!("GET /h2/{i} 0"));
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // Idle once, before the preface; never once it spoke HTTP/2.
        assert_eq!(probe(), (1, 0));
        drop(tx);
        let _ = conn.await;
    }

    #[tokio::test]
    async fn shutdown_closes_parked_connections() {
        use tokio::io::AsyncReadExt as _;
        let (addr, stop, probe) = server(Duration::from_secs(30)).await;
        let mut tcp = get_once(addr).await;
        let mut buf = vec![0u8; 1024];
        parked(&probe, 1).await;
        stop.send(true).unwrap();
        let n = tokio::time::timeout(Duration::from_secs(10), tcp.read(&mut buf))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(n, 0);
        assert_eq!(probe().1, 0);
    }

    /// A listener whose one connection is served with `retire`; requests to `/hold` wait for `release`, and
    /// each request's path is sent on the returned channel as it arrives.
    async fn retiring_server(
        retire: Arc<Retire>,
        release: Arc<Notify>,
    ) -> (
        std::net::SocketAddr,
        tokio::sync::mpsc::UnboundedReceiver<String>,
        watch::Sender<bool>,
    ) {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let (stop_tx, stop) = watch::channel(false);
        let (seen_tx, seen) = tokio::sync::mpsc::unbounded_channel();
        let svc = move |req: Request<RequestBody>| {
            let (release, seen_tx) = (release.clone(), seen_tx.clone());
            async move {
                let path = req.uri().path().to_owned();
                let _ = seen_tx.send(path.clone());
                if path == "/hold" {
                    release.notified().await;
                }
                Ok::<_, Infallible>(Response::new(http_body_util::Full::new(Bytes::from(path))))
            }
        };
        let lot = Lot::new(Http::new(&Limits::default()), stop);
        tokio::spawn(async move {
            if let Ok((tcp, _)) = l.accept().await {
                lot.serve_retiring(tcp, svc, (), retire).await;
            }
        });
        (addr, seen, stop_tx)
    }

    #[tokio::test]
    async fn a_retired_http2_connection_finishes_its_streams_and_goes_away() {
        use http_body_util::BodyExt as _;
        let (retire, release) = (Arc::new(Retire::new(None)), Arc::new(Notify::new()));
        let (addr, mut seen, _stop) = retiring_server(retire.clone(), release.clone()).await;
        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (mut tx, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp))
            .await
            .unwrap();
        let conn = tokio::spawn(conn);
        let held = tx.send_request(
            Request::builder()
                .uri("http://test/hold")
                .body(http_body_util::Empty::<Bytes>::new())
                .unwrap(),
        );
        let held = tokio::spawn(held);
        assert_eq!(seen.recv().await.unwrap(), "/hold");
        retire.now();
        release.notify_one();
        let resp = held.await.unwrap().expect("the stream in flight is answered");
        assert_eq!(resp.into_body().collect().await.unwrap().to_bytes(), "/hold");
        // GOAWAY, then the connection ends cleanly.
        tokio::time::timeout(Duration::from_secs(10), conn)
            .await
            .expect("the server closed the connection")
            .unwrap()
            .unwrap();
    }

    #[tokio::test]
    async fn an_http2_connection_is_retired_at_its_time_even_idle() {
        let at = tokio::time::Instant::now() + Duration::from_millis(200);
        let (addr, _seen, _stop) = retiring_server(Arc::new(Retire::new(Some(at))), Arc::default()).await;
        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (mut tx, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp))
            .await
            .unwrap();
        let conn = tokio::spawn(conn);
        let req = Request::builder()
            .uri("http://test/one")
            .body(http_body_util::Empty::<Bytes>::new())
            .unwrap();
        assert_eq!(tx.send_request(req).await.unwrap().status(), StatusCode::OK);
        tokio::time::timeout(Duration::from_secs(10), conn)
            .await
            .expect("retired at its time")
            .unwrap()
            .unwrap();
    }

    /// A raw HTTP/1.1 request; the response (head and body) as text.
    async fn raw_get(tcp: &mut tokio::net::TcpStream, path: &str) -> String {
        use tokio::io::AsyncReadExt as _;
        tcp.write_all(format!("GET {path} HTTP/1.1\r\nhost: test\r\n\r\n").as_bytes())
            .await
            .unwrap();
        let mut buf = vec![0u8; 1024];
        let n = tcp.read(&mut buf).await.unwrap();
        String::from_utf8_lossy(&buf[..n]).to_lowercase()
    }

    #[tokio::test]
    async fn a_retired_http1_connection_closes_after_the_response_in_flight() {
        use tokio::io::AsyncReadExt as _;
        let (retire, release) = (Arc::new(Retire::new(None)), Arc::new(Notify::new()));
        let (addr, mut seen, _stop) = retiring_server(retire.clone(), release.clone()).await;
        let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        let first = raw_get(&mut tcp, "/once").await;
        assert!(
            first.starts_with("http/1.1 200") && !first.contains("connection: close"),
            "{first}"
        );
        assert_eq!(seen.recv().await.unwrap(), "/once");
        tcp.write_all(b"GET /hold HTTP/1.1\r\nhost: test\r\n\r\n")
            .await
            .unwrap();
        assert_eq!(seen.recv().await.unwrap(), "/hold");
        // Asked while the request is in flight: its response says close, and the connection closes after it.
        retire.now();
        release.notify_one();
        let mut got = Vec::new();
        tokio::time::timeout(Duration::from_secs(10), tcp.read_to_end(&mut got))
            .await
            .expect("closed after the response")
            .unwrap();
        // Whether the head says `connection: close` depends on which came first, the request to drain or the
        // response (the sidecar's service, which asks while answering, sets the header itself).
        let got = String::from_utf8_lossy(&got).to_lowercase();
        assert!(got.starts_with("http/1.1 200"), "{got}");
        assert!(got.ends_with("/hold"), "{got}");
    }

    #[tokio::test]
    async fn a_parked_http1_connection_is_closed_at_its_retire_time() {
        use tokio::io::AsyncReadExt as _;
        let at = tokio::time::Instant::now() + Duration::from_millis(300);
        let (addr, _seen, _stop) = retiring_server(Arc::new(Retire::new(Some(at))), Arc::default()).await;
        let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        let first = raw_get(&mut tcp, "/once").await;
        assert!(
            first.starts_with("http/1.1 200") && !first.contains("connection: close"),
            "{first}"
        );
        // Idle: parked, then closed at its time (not after the 90 s idle timeout).
        let mut buf = vec![0u8; 64];
        let n = tokio::time::timeout(Duration::from_secs(10), tcp.read(&mut buf))
            .await
            .expect("closed at its retire time")
            .unwrap();
        assert_eq!(n, 0);
    }
}
