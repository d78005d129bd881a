//! The inbound TLS stream: rustls' unbuffered server connection over a TCP socket, holding buffers only while
//! bytes are in flight.
//!
//! rustls' buffered connection (what `tokio-rustls` drives) keeps a 4 KiB record buffer for the life of the
//! connection, plus its plaintext queues. A sidecar holding thousands of idle keep-alive connections pays that
//! for each; with the unbuffered API the buffers are ours: received TLS records, decrypted bytes not yet read,
//! and TLS bytes not yet sent each live in a `Vec` that is reused while the connection is busy and freed when
//! a read finds nothing to do (the moment a connection goes idle). rustls does all of the TLS: this module
//! only moves bytes between the socket, rustls and the reader.

use std::future::poll_fn;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use rustls::server::UnbufferedServerConnection;
use rustls::unbuffered::{ConnectionState, EncodeError, EncryptError, InsufficientSizeError};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

/// Bytes asked of the socket at a time (more when a record being received is larger).
const READ_SIZE: usize = 4096;
/// Most plaintext taken by one write (four full records).
const MAX_WRITE: usize = 4 * 16384;
/// TLS 1.3 record overhead: header, content type, AEAD tag.
const RECORD_OVERHEAD: usize = 5 + 1 + 16;

fn tls_error(e: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e)
}

/// What [`ServerTls::drive`] does once the connection may send application data.
enum Op<'a> {
    Nothing,
    Encrypt(&'a [u8]),
    CloseNotify,
}

/// A server-side TLS connection over TCP (see the module documentation).
pub struct ServerTls {
    tcp: TcpStream,
    conn: UnbufferedServerConnection,
    /// TLS bytes received and not yet processed (a partial record, between reads).
    incoming: Vec<u8>,
    /// Decrypted bytes not yet read: `plain[plain_at..]`.
    plain: Vec<u8>,
    plain_at: usize,
    /// TLS bytes not yet sent: `outgoing[sent..]`.
    outgoing: Vec<u8>,
    sent: usize,
    /// The peer sent close_notify or closed the socket: reads return end-of-stream.
    peer_closed: bool,
    close_sent: bool,
}

impl std::fmt::Debug for ServerTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerTls")
            .field("peer", &self.tcp.peer_addr().ok())
            .field("handshaking", &self.conn.is_handshaking())
            .finish()
    }
}

impl ServerTls {
    /// Runs the server side of a handshake on `tcp`. A refused peer gets rustls' alert before the error is
    /// returned; the error wraps the [`rustls::Error`] (as `tokio-rustls` does), so callers can classify it.
    pub async fn accept(tcp: TcpStream, config: Arc<rustls::ServerConfig>) -> io::Result<Self> {
        let conn = UnbufferedServerConnection::new(config).map_err(tls_error)?;
        let mut s = Self {
            tcp,
            conn,
            incoming: Vec::new(),
            plain: Vec::new(),
            plain_at: 0,
            outgoing: Vec::new(),
            sent: 0,
            peer_closed: false,
            close_sent: false,
        };
        loop {
            if let Err(e) = s.drive(Op::Nothing) {
                // rustls queued an alert telling the peer why; what the socket does not take at once gets a
                // moment.
                let e = s.fail(e);
                let flushed = poll_fn(|cx| s.poll_flush_out(cx));
                let _ = tokio::time::timeout(Duration::from_secs(1), flushed).await;
                return Err(e);
            }
            poll_fn(|cx| s.poll_flush_out(cx)).await?;
            if !s.conn.is_handshaking() {
                return Ok(s);
            }
            if poll_fn(|cx| s.poll_fill(cx)).await? == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the peer closed the connection during the TLS handshake",
                ));
            }
        }
    }

    /// The TLS session: peer certificates, ALPN, key exchange group.
    pub fn session(&self) -> &rustls::CommonState {
        &self.conn
    }

    /// The TCP socket.
    pub fn tcp(&self) -> &TcpStream {
        &self.tcp
    }

    /// Lets rustls process what was received and emit what it must send, until it needs more input or may
    /// send application data; then performs `op`. Returns the plaintext bytes encrypted (for
    /// [`Op::Encrypt`]; 0 when the connection can no longer send).
    fn drive(&mut self, op: Op<'_>) -> io::Result<usize> {
        let mut op = Some(op);
        loop {
            let Self {
                conn,
                incoming,
                plain,
                outgoing,
                peer_closed,
                ..
            } = self;
            let status = conn.process_tls_records(incoming);
            let mut discard = status.discard;
            let mut done = None;
            match status.state.map_err(tls_error)? {
                ConnectionState::ReadTraffic(mut r) => {
                    while let Some(rec) = r.next_record() {
                        let rec = rec.map_err(tls_error)?;
                        discard += rec.discard;
                        plain.extend_from_slice(rec.payload);
                    }
                }
                ConnectionState::EncodeTlsData(mut e) => {
                    append(outgoing, 1024, |buf| match e.encode(buf) {
                        Ok(n) => Ok(n),
                        Err(EncodeError::InsufficientSize(InsufficientSizeError { required_size })) => {
                            Err(Some(required_size))
                        }
                        Err(e) => Err({
                            tracing::debug!(error = %e, "TLS encode");
                            None
                        }),
                    })?;
                }
                // What was encoded waits in `outgoing`, which goes out before anything written after it.
                ConnectionState::TransmitTlsData(t) => t.done(),
                ConnectionState::PeerClosed => *peer_closed = true,
                ConnectionState::Closed => {
                    *peer_closed = true;
                    done = Some(0);
                }
                ConnectionState::BlockedHandshake => done = Some(0),
                ConnectionState::WriteTraffic(mut w) => {
                    done = Some(match op.take() {
                        Some(Op::Encrypt(data)) => {
                            let room = data.len() + RECORD_OVERHEAD * (data.len() / 16384 + 2);
                            append(outgoing, room, |buf| encrypt_result(w.encrypt(data, buf)))?;
                            data.len()
                        }
                        Some(Op::CloseNotify) => {
                            append(outgoing, 64, |buf| encrypt_result(w.queue_close_notify(buf)))?;
                            0
                        }
                        Some(Op::Nothing) | None => 0,
                    });
                }
                ConnectionState::ReadEarlyData(_) => {
                    return Err(tls_error("unexpected early data (0-RTT is not accepted)"));
                }
                other => return Err(tls_error(format!("unexpected TLS state {other:?}"))),
            }
            if discard > 0 {
                self.incoming.drain(..discard);
            }
            if let Some(n) = done {
                return Ok(n);
            }
        }
    }

    /// Sends `outgoing[sent..]` with `write`; ready once all of it is out.
    fn flush_out_with(
        &mut self,
        mut write: impl FnMut(&mut TcpStream, &[u8]) -> Poll<io::Result<usize>>,
    ) -> Poll<io::Result<()>> {
        while self.sent < self.outgoing.len() {
            let n = ready!(write(&mut self.tcp, &self.outgoing[self.sent..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.sent += n;
        }
        self.outgoing.clear();
        self.sent = 0;
        Poll::Ready(Ok(()))
    }

    /// Sends `outgoing[sent..]`; ready once all of it is out.
    fn poll_flush_out(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.flush_out_with(|tcp, b| Pin::new(tcp).poll_write(cx, b))
    }

    /// Sends what of `outgoing` the socket takes now, without registering for writability (the read side
    /// uses this, so it never takes the writer's wake-up).
    fn try_flush_out(&mut self) -> io::Result<()> {
        let sent = self.flush_out_with(|tcp, b| match tcp.try_write(b) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Poll::Pending,
            r => Poll::Ready(r),
        });
        match sent {
            Poll::Ready(r) => r,
            Poll::Pending => Ok(()),
        }
    }

    /// After a TLS error: sends the alert rustls queued for the peer, best effort, and returns the error.
    fn fail(&mut self, e: io::Error) -> io::Error {
        let _ = self.drive(Op::Nothing);
        let _ = self.try_flush_out();
        e
    }

    /// Reads what the socket has into `incoming` (at least the rest of a record being received).
    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        let have = self.incoming.len();
        let want = record_rest(&self.incoming).max(READ_SIZE);
        self.incoming.resize(have + want, 0);
        let mut rb = ReadBuf::new(&mut self.incoming[have..]);
        let r = Pin::new(&mut self.tcp).poll_read(cx, &mut rb);
        let n = rb.filled().len();
        self.incoming.truncate(have + n);
        r.map_ok(|()| n)
    }

    /// Frees the buffers that hold nothing (called when the connection goes idle).
    fn release_empty_buffers(&mut self) {
        if self.incoming.is_empty() {
            self.incoming = Vec::new();
        }
        if self.plain_at >= self.plain.len() {
            self.plain = Vec::new();
            self.plain_at = 0;
        }
        if self.sent >= self.outgoing.len() {
            self.outgoing = Vec::new();
            self.sent = 0;
        }
    }
}

/// Appends to `out` what `f` writes into a slice of at least `room` bytes; `f` answers `Err(Some(n))` when it
/// needs `n` bytes, `Err(None)` on failure.
fn append(
    out: &mut Vec<u8>,
    room: usize,
    mut f: impl FnMut(&mut [u8]) -> Result<usize, Option<usize>>,
) -> io::Result<()> {
    let start = out.len();
    let mut room = room;
    loop {
        out.resize(start + room, 0);
        match f(&mut out[start..]) {
            Ok(n) => {
                out.truncate(start + n);
                return Ok(());
            }
            Err(Some(need)) if need > room => room = need,
            Err(_) => {
                out.truncate(start);
                return Err(tls_error("TLS record could not be written"));
            }
        }
    }
}

fn encrypt_result(r: Result<usize, EncryptError>) -> Result<usize, Option<usize>> {
    match r {
        Ok(n) => Ok(n),
        Err(EncryptError::InsufficientSize(InsufficientSizeError { required_size })) => {
            Err(Some(required_size))
        }
        Err(e) => {
            tracing::debug!(error = %e, "TLS encrypt");
            Err(None)
        }
    }
}

/// Bytes still missing from the record at the start of `buf` (0 when none is started or it is complete).
fn record_rest(buf: &[u8]) -> usize {
    if buf.len() < 5 {
        return 0;
    }
    let total = 5 + usize::from(u16::from_be_bytes([buf[3], buf[4]]));
    total.saturating_sub(buf.len())
}

impl AsyncRead for ServerTls {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        loop {
            if this.plain_at < this.plain.len() {
                let n = buf.remaining().min(this.plain.len() - this.plain_at);
                buf.put_slice(&this.plain[this.plain_at..this.plain_at + n]);
                this.plain_at += n;
                if this.plain_at == this.plain.len() {
                    this.plain.clear();
                    this.plain_at = 0;
                }
                return Poll::Ready(Ok(()));
            }
            if this.peer_closed {
                return Poll::Ready(Ok(()));
            }
            if let Err(e) = this.drive(Op::Nothing) {
                return Poll::Ready(Err(this.fail(e)));
            }
            if !this.plain.is_empty() || this.peer_closed {
                continue;
            }
            // What rustls must send (a key update answer) goes out even while only reading.
            this.try_flush_out()?;
            match this.poll_fill(cx) {
                Poll::Ready(Ok(0)) => {
                    // As rustls' own reader: the end of the socket without close_notify may be a truncation.
                    this.peer_closed = true;
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "the peer closed the connection without sending TLS close_notify",
                    )));
                }
                Poll::Ready(Ok(_)) => {}
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => {
                    this.release_empty_buffers();
                    return Poll::Pending;
                }
            }
        }
    }
}

impl AsyncWrite for ServerTls {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        if data.is_empty() {
            return Poll::Ready(Ok(0));
        }
        let this = &mut *self;
        // Earlier records go out first (this is the backpressure).
        ready!(this.poll_flush_out(cx))?;
        let n = this.drive(Op::Encrypt(&data[..data.len().min(MAX_WRITE)]))?;
        if n == 0 {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "the TLS connection can no longer send",
            )));
        }
        // Send what the socket takes now; the rest goes with the next write or flush.
        if let Poll::Ready(Err(e)) = this.poll_flush_out(cx) {
            return Poll::Ready(Err(e));
        }
        Poll::Ready(Ok(n))
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(self.poll_flush_out(cx))?;
        Pin::new(&mut self.tcp).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if !self.close_sent {
            self.close_sent = true;
            self.drive(Op::CloseNotify)?;
        }
        ready!(self.poll_flush_out(cx))?;
        Pin::new(&mut self.tcp).poll_shutdown(cx)
    }
}

impl crate::park::Transport for ServerTls {
    fn poll_readable(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // Records are processed until rustls needs more input before a read returns "nothing yet", so what is
        // left in `incoming` is part of a record: only the socket can complete it.
        if self.plain_at < self.plain.len() || self.peer_closed {
            return Poll::Ready(Ok(()));
        }
        self.tcp.poll_read_ready(cx)
    }
}
