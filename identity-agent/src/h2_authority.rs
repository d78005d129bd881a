//! Lets HTTP/2 clients that send a non-URI `:authority` use the Workload API socket, and bounds everything a
//! caller can make the agent hold before it is attested.
//!
//! gRPC's C core (grpc-python, hence the Python `spiffe` package) sends `:authority: run%2Fagent.sock` for a
//! `unix:` target, and grpc-java sends the raw socket path. The `http` crate refuses both as URI authorities, so
//! `h2` resets the stream with PROTOCOL_ERROR before tonic sees the request. SPIRE (Go) accepts them, so Trustline
//! must too, and the fix has to sit below `h2`:
//!
//! [`AuthorityFix`] wraps each accepted connection and rewrites the client-to-server byte stream only. It passes
//! the connection preface and every frame through untouched, except header blocks (HEADERS plus CONTINUATION
//! frames): those are HPACK-decoded with the connection's own decoder state, an `:authority` that does not parse
//! is replaced by `localhost` (it carries no meaning on a Unix socket), and the block is re-encoded with literal
//! fields that never touch the dynamic table, so the server's HPACK state stays trivially in sync. Padding is
//! dropped; priority data and END_STREAM are kept; blocks larger than 16 KiB are split into CONTINUATION frames.
//! The server-to-client direction is passed through; the shim only follows its frame boundaries (below).
//!
//! # Bounds
//!
//! The socket is open to every local user (mode 0777) and all of this runs before the agent knows who is
//! calling, so every buffer has a fixed size and the first excess closes the connection:
//!
//! - a frame whose 9-byte header declares more than [`MAX_FRAME_SIZE`] (the SETTINGS_MAX_FRAME_SIZE the server
//!   advertises) is refused from that header, before any of its payload is buffered (FRAME_SIZE_ERROR);
//! - a header block (HEADERS + CONTINUATION, without padding and priority) longer than [`MAX_HEADER_LIST_SIZE`]
//!   is refused (ENHANCE_YOUR_CALM), and so is any other frame in the middle of a header block (PROTOCOL_ERROR);
//! - the HPACK dynamic table holds at most [`HEADER_TABLE_SIZE`] bytes, what the server allows (it sends no
//!   SETTINGS_HEADER_TABLE_SIZE, so the protocol default): a table size update above it is refused
//!   (COMPRESSION_ERROR), and an entry larger than the table empties it (RFC 7541 §4.4) instead of growing it;
//! - the block is decoded one field at a time, and decoding stops at the first field that takes the running
//!   header list size (RFC 9113 §6.5.2: name + value + 32 per field) past [`MAX_HEADER_LIST_SIZE`]
//!   (ENHANCE_YOUR_CALM): a block that references one table entry thousands of times is never expanded.
//!
//! A connection therefore holds at most one frame being read (16 KiB + 9 bytes, plus one 8 KiB read), one header
//! block, its decoded list and its re-encoding (16 KiB each). What h2 and tonic keep after that is bounded by the
//! server settings in `server.rs`, which take the same constants.
//!
//! On a refusal the shim logs it, writes a GOAWAY naming the limit (error code and reason as debug data) if the
//! server is between two frames of its own, and fails the read, which makes the server drop the connection.

use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// SETTINGS_MAX_FRAME_SIZE of the Workload API server (the HTTP/2 default, set explicitly in `server.rs`).
pub const MAX_FRAME_SIZE: u32 = 16_384;
/// SETTINGS_MAX_HEADER_LIST_SIZE of the Workload API server: the most a header block may hold, encoded or
/// decoded (decoded size as RFC 9113 §6.5.2 counts it).
pub const MAX_HEADER_LIST_SIZE: u32 = 16_384;
/// The largest HPACK dynamic table a client may use: the protocol default, as the server sends no
/// SETTINGS_HEADER_TABLE_SIZE.
pub const HEADER_TABLE_SIZE: usize = 4_096;

const PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const FRAME_HEADER: usize = 9;
const HEADERS: u8 = 0x1;
const GOAWAY: u8 = 0x7;
const CONTINUATION: u8 = 0x9;
const END_STREAM: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
const PADDED: u8 = 0x8;
const PRIORITY: u8 = 0x20;
const PROTOCOL_ERROR: u32 = 0x1;
const FRAME_SIZE_ERROR: u32 = 0x6;
const COMPRESSION_ERROR: u32 = 0x9;
const ENHANCE_YOUR_CALM: u32 = 0xb;

/// Why a Workload API connection was closed before its requests reached the server.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Refusal {
    /// A frame header declared a payload larger than the server advertises.
    #[error("frame of type {ty:#04x} on stream {stream} declares {len} bytes, above SETTINGS_MAX_FRAME_SIZE {max}")]
    FrameTooLarge {
        /// Frame type.
        ty: u8,
        /// Stream identifier.
        stream: u32,
        /// Declared payload length.
        len: usize,
        /// The advertised maximum.
        max: u32,
    },
    /// A header block (HEADERS + CONTINUATION) grew past the limit.
    #[error("header block of stream {stream} reached {len} bytes, above {max}")]
    HeaderBlockTooLarge {
        /// Stream identifier.
        stream: u32,
        /// Block length so far.
        len: usize,
        /// The limit.
        max: u32,
    },
    /// Decoding a header block passed the header list limit; decoding stopped there.
    #[error(
        "decoded header list of stream {stream} passed SETTINGS_MAX_HEADER_LIST_SIZE {max} at field {field}"
    )]
    HeaderListTooLarge {
        /// Stream identifier.
        stream: u32,
        /// The field (counted from 1) that passed the limit.
        field: usize,
        /// The limit.
        max: u32,
    },
    /// An HPACK dynamic table size update above the table size the server allows.
    #[error("HPACK dynamic table size update to {size} bytes on stream {stream}, above the allowed {max}")]
    TableSizeTooLarge {
        /// Stream identifier.
        stream: u32,
        /// The size asked for.
        size: usize,
        /// The allowed size.
        max: usize,
    },
    /// A malformed HPACK block.
    #[error("HPACK block of stream {stream}: {reason}")]
    Hpack {
        /// Stream identifier.
        stream: u32,
        /// What is wrong with it.
        reason: String,
    },
    /// Bytes that break HTTP/2 framing.
    #[error("stream {stream}: {reason}")]
    Protocol {
        /// Stream identifier.
        stream: u32,
        /// What is wrong.
        reason: &'static str,
    },
}

impl Refusal {
    /// The HTTP/2 error code its GOAWAY carries.
    pub fn code(&self) -> u32 {
        match self {
            Self::FrameTooLarge { .. } => FRAME_SIZE_ERROR,
            Self::HeaderBlockTooLarge { .. } | Self::HeaderListTooLarge { .. } => ENHANCE_YOUR_CALM,
            Self::TableSizeTooLarge { .. } | Self::Hpack { .. } => COMPRESSION_ERROR,
            Self::Protocol { .. } => PROTOCOL_ERROR,
        }
    }
}

struct Pending {
    stream: [u8; 4],
    end_stream: bool,
    priority: Option<[u8; 5]>,
    block: Vec<u8>,
}

/// Where the server's own output is in its framing: a GOAWAY may only be slipped in between two of its frames.
#[derive(Default)]
struct FrameCursor {
    header: [u8; FRAME_HEADER],
    have: usize,
    left: usize,
}

impl FrameCursor {
    fn advance(&mut self, mut bytes: &[u8]) {
        while !bytes.is_empty() {
            if self.left > 0 {
                let n = self.left.min(bytes.len());
                self.left -= n;
                bytes = &bytes[n..];
                continue;
            }
            let n = (FRAME_HEADER - self.have).min(bytes.len());
            self.header[self.have..self.have + n].copy_from_slice(&bytes[..n]);
            self.have += n;
            bytes = &bytes[n..];
            if self.have == FRAME_HEADER {
                self.have = 0;
                self.left = frame_len(&self.header);
            }
        }
    }

    fn between_frames(&self) -> bool {
        self.have == 0 && self.left == 0
    }
}

/// A connection whose client header blocks get a usable `:authority`, within the bounds above.
pub struct AuthorityFix<S> {
    inner: S,
    raw: Vec<u8>,
    out: Vec<u8>,
    out_pos: usize,
    preface_done: bool,
    pending: Option<Pending>,
    decoder: loona_hpack::Decoder<'static>,
    /// Highest client stream whose headers were passed on (the GOAWAY's last stream ID).
    last_stream: u32,
    server: FrameCursor,
    refused: bool,
}

impl<S> AuthorityFix<S> {
    /// Wraps an accepted connection.
    pub fn new(inner: S) -> Self {
        let mut decoder = loona_hpack::Decoder::new();
        decoder.set_max_allowed_table_size(HEADER_TABLE_SIZE);
        Self {
            inner,
            raw: Vec::with_capacity(16 * 1024),
            out: Vec::with_capacity(16 * 1024),
            out_pos: 0,
            preface_done: false,
            pending: None,
            decoder,
            last_stream: 0,
            server: FrameCursor::default(),
            refused: false,
        }
    }

    /// The wrapped connection.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// Consumes raw client bytes; appends rewritten bytes to `out`.
    fn process(&mut self) -> Result<(), Refusal> {
        if !self.preface_done {
            let n = self.raw.len().min(PREFACE.len());
            if self.raw[..n] != PREFACE[..n] {
                return Err(Refusal::Protocol {
                    stream: 0,
                    reason: "not the HTTP/2 connection preface",
                });
            }
            if n < PREFACE.len() {
                return Ok(());
            }
            self.out.extend_from_slice(PREFACE);
            self.raw.drain(..PREFACE.len());
            self.preface_done = true;
        }
        let mut at = 0;
        let result = loop {
            let Some(h) = self
                .raw
                .get(at..at + FRAME_HEADER)
                .and_then(|h| <[u8; FRAME_HEADER]>::try_from(h).ok())
            else {
                break Ok(());
            };
            let len = frame_len(&h);
            let (ty, flags) = (h[3], h[4]);
            let stream = [h[5], h[6], h[7], h[8]];
            // Refused from its header: a frame the server would refuse is never buffered.
            if len > MAX_FRAME_SIZE as usize {
                break Err(Refusal::FrameTooLarge {
                    ty,
                    stream: stream_id(stream),
                    len,
                    max: MAX_FRAME_SIZE,
                });
            }
            if self.raw.len() - at < FRAME_HEADER + len {
                break Ok(());
            }
            let frame = self.raw[at..at + FRAME_HEADER + len].to_vec();
            at += FRAME_HEADER + len;
            if let Err(e) = self.frame(ty, flags, stream, &frame) {
                break Err(e);
            }
        };
        self.raw.drain(..at);
        result
    }

    fn frame(&mut self, ty: u8, flags: u8, stream: [u8; 4], frame: &[u8]) -> Result<(), Refusal> {
        let payload = &frame[FRAME_HEADER..];
        let id = stream_id(stream);
        let protocol = |reason| Refusal::Protocol { stream: id, reason };
        if self
            .pending
            .as_ref()
            .is_some_and(|p| ty != CONTINUATION || p.stream != stream)
        {
            return Err(protocol(
                "a header block must go on in CONTINUATION frames of its stream (RFC 9113 §6.10)",
            ));
        }
        match ty {
            HEADERS => {
                let mut p = payload;
                let mut pad = 0usize;
                if flags & PADDED != 0 {
                    pad = usize::from(
                        *p.first()
                            .ok_or_else(|| protocol("HEADERS frame missing pad length"))?,
                    );
                    p = &p[1..];
                }
                let mut priority = None;
                if flags & PRIORITY != 0 {
                    let pr: [u8; 5] = p
                        .get(..5)
                        .and_then(|s| s.try_into().ok())
                        .ok_or_else(|| protocol("short HEADERS priority"))?;
                    priority = Some(pr);
                    p = &p[5..];
                }
                if pad > p.len() {
                    return Err(protocol("HEADERS padding longer than the frame"));
                }
                let fragment = &p[..p.len() - pad];
                if fragment.len() > MAX_HEADER_LIST_SIZE as usize {
                    return Err(Refusal::HeaderBlockTooLarge {
                        stream: id,
                        len: fragment.len(),
                        max: MAX_HEADER_LIST_SIZE,
                    });
                }
                let pending = Pending {
                    stream,
                    end_stream: flags & END_STREAM != 0,
                    priority,
                    block: fragment.to_vec(),
                };
                if flags & END_HEADERS != 0 {
                    self.emit(pending)
                } else {
                    self.pending = Some(pending);
                    Ok(())
                }
            }
            CONTINUATION if self.pending.is_some() => {
                let mut pending = self
                    .pending
                    .take()
                    .ok_or_else(|| protocol("CONTINUATION without HEADERS"))?;
                let len = pending.block.len() + payload.len();
                if len > MAX_HEADER_LIST_SIZE as usize {
                    return Err(Refusal::HeaderBlockTooLarge {
                        stream: id,
                        len,
                        max: MAX_HEADER_LIST_SIZE,
                    });
                }
                pending.block.extend_from_slice(payload);
                if flags & END_HEADERS != 0 {
                    self.emit(pending)
                } else {
                    self.pending = Some(pending);
                    Ok(())
                }
            }
            // Everything else (and protocol errors h2 will report itself) passes through unchanged.
            _ => {
                self.out.extend_from_slice(frame);
                Ok(())
            }
        }
    }

    fn emit(&mut self, p: Pending) -> Result<(), Refusal> {
        let id = stream_id(p.stream);
        let fields = decode_block(&mut self.decoder, &p.block, id)?;
        self.last_stream = self.last_stream.max(id);
        let mut block = Vec::with_capacity(p.block.len() + 64);
        for (name, value) in &fields {
            let value: &[u8] = if name.as_slice() == b":authority"
                && http::uri::Authority::try_from(value.as_slice()).is_err()
            {
                b"localhost"
            } else {
                value
            };
            encode_literal(&mut block, name, value);
        }
        let max = MAX_FRAME_SIZE as usize;
        let mut chunks: Vec<&[u8]> = Vec::new();
        let first_room = max - if p.priority.is_some() { 5 } else { 0 };
        let (first, mut rest) = block.split_at(block.len().min(first_room));
        chunks.push(first);
        while !rest.is_empty() {
            let (c, r) = rest.split_at(rest.len().min(max));
            chunks.push(c);
            rest = r;
        }
        let last = chunks.len() - 1;
        for (i, chunk) in chunks.iter().enumerate() {
            let (ty, mut flags, extra) = if i == 0 {
                let mut f = if p.end_stream { END_STREAM } else { 0 };
                if p.priority.is_some() {
                    f |= PRIORITY;
                }
                (HEADERS, f, p.priority.map(|pr| pr.to_vec()).unwrap_or_default())
            } else {
                (CONTINUATION, 0, Vec::new())
            };
            if i == last {
                flags |= END_HEADERS;
            }
            let len = extra.len() + chunk.len();
            self.out
                .extend_from_slice(&[(len >> 16) as u8, (len >> 8) as u8, len as u8, ty, flags]);
            self.out.extend_from_slice(&p.stream);
            self.out.extend_from_slice(&extra);
            self.out.extend_from_slice(chunk);
        }
        Ok(())
    }
}

impl<S: AsyncWrite + Unpin> AuthorityFix<S> {
    /// Closes the connection's input for `refusal`: logs it, frees the buffers and, if the server is between two
    /// of its frames, tries once to write a GOAWAY naming it (never waited on: the connection closes either way).
    fn refuse(&mut self, cx: &mut Context<'_>, refusal: &Refusal) {
        tracing::warn!(%refusal, "Workload API: connection closed before attestation");
        self.refused = true;
        self.raw = Vec::new();
        self.out = Vec::new();
        self.out_pos = 0;
        self.pending = None;
        if self.server.between_frames() {
            let frame = goaway(self.last_stream, refusal.code(), refusal.to_string().as_bytes());
            if let Poll::Ready(Ok(n)) = Pin::new(&mut self.inner).poll_write(cx, &frame) {
                self.server.advance(&frame[..n]);
                let _ = Pin::new(&mut self.inner).poll_flush(cx);
            }
        }
    }
}

fn frame_len(h: &[u8; FRAME_HEADER]) -> usize {
    (usize::from(h[0]) << 16) | (usize::from(h[1]) << 8) | usize::from(h[2])
}

fn stream_id(s: [u8; 4]) -> u32 {
    u32::from_be_bytes(s) & 0x7fff_ffff
}

/// A GOAWAY frame (RFC 9113 §6.8) with at most 256 bytes of debug data.
fn goaway(last_stream: u32, code: u32, debug: &[u8]) -> Vec<u8> {
    let debug = &debug[..debug.len().min(256)];
    let len = 8 + debug.len();
    let mut f = vec![
        (len >> 16) as u8,
        (len >> 8) as u8,
        len as u8,
        GOAWAY,
        0,
        0,
        0,
        0,
        0,
    ];
    f.extend_from_slice(&(last_stream & 0x7fff_ffff).to_be_bytes());
    f.extend_from_slice(&code.to_be_bytes());
    f.extend_from_slice(debug);
    f
}

/// HPACK integer with an `n`-bit prefix (RFC 7541 §5.1) at the start of `b`: its value and length. `None` if it
/// is truncated or above 2^28 (no field within these bounds needs more).
fn decode_int(b: &[u8], n: u8) -> Option<(usize, usize)> {
    let max = (1usize << n) - 1;
    let mut v = usize::from(*b.first()?) & max;
    if v < max {
        return Some((v, 1));
    }
    for (i, &c) in b.iter().enumerate().skip(1).take(4) {
        v += usize::from(c & 0x7f) << (7 * (i - 1));
        if c & 0x80 == 0 {
            return Some((v, i + 1));
        }
    }
    None
}

/// Length of the string literal (RFC 7541 §5.2) at the start of `b`, if `b` holds all of it.
fn string_len(b: &[u8]) -> Option<usize> {
    let (len, used) = decode_int(b, 7)?;
    let end = used.checked_add(len)?;
    (end <= b.len()).then_some(end)
}

/// One representation of a header block (RFC 7541 §6), measured without decoding it.
enum Representation {
    /// A header field of this many bytes.
    Field(usize),
    /// A dynamic table size update to `size`, of `len` bytes.
    SizeUpdate { size: usize, len: usize },
}

fn next_representation(b: &[u8]) -> Option<Representation> {
    let literal = |prefix: u8| -> Option<usize> {
        let (name_index, mut at) = decode_int(b, prefix)?;
        if name_index == 0 {
            at += string_len(b.get(at..)?)?;
        }
        at += string_len(b.get(at..)?)?;
        Some(at)
    };
    let first = *b.first()?;
    if first & 0x80 != 0 {
        decode_int(b, 7).map(|(_, len)| Representation::Field(len))
    } else if first & 0xc0 == 0x40 {
        literal(6).map(Representation::Field)
    } else if first & 0xe0 == 0x20 {
        decode_int(b, 5).map(|(size, len)| Representation::SizeUpdate { size, len })
    } else {
        literal(4).map(Representation::Field)
    }
}

/// A decoded header field: name and value.
type Field = (Vec<u8>, Vec<u8>);

/// Decodes a header block one field at a time (a size update goes to the decoder with the field after it), and
/// stops at the first field that takes the header list past [`MAX_HEADER_LIST_SIZE`]: that field is not kept, and
/// nothing after it is decoded.
fn decode_block(
    decoder: &mut loona_hpack::Decoder<'static>,
    block: &[u8],
    stream: u32,
) -> Result<Vec<Field>, Refusal> {
    let hpack = |reason: String| Refusal::Hpack { stream, reason };
    let max = MAX_HEADER_LIST_SIZE as usize;
    let mut fields = Vec::new();
    let mut size = 0usize;
    let mut over = false;
    let (mut start, mut at) = (0, 0);
    while at < block.len() {
        match next_representation(&block[at..])
            .ok_or_else(|| hpack(format!("truncated or oversized representation at byte {at}")))?
        {
            Representation::SizeUpdate { size: new, len } => {
                if new > HEADER_TABLE_SIZE {
                    return Err(Refusal::TableSizeTooLarge {
                        stream,
                        size: new,
                        max: HEADER_TABLE_SIZE,
                    });
                }
                if !fields.is_empty() {
                    return Err(hpack(
                        "dynamic table size update after a header field (RFC 7541 §4.2)".into(),
                    ));
                }
                at += len;
            }
            Representation::Field(len) => {
                at += len;
                decoder
                    .decode_with_cb(&block[start..at], |name, value| {
                        size = size.saturating_add(name.len() + value.len() + 32);
                        if size > max {
                            over = true;
                        } else {
                            fields.push((name.into_owned(), value.into_owned()));
                        }
                    })
                    .map_err(|e| hpack(e.to_string()))?;
                if over {
                    return Err(Refusal::HeaderListTooLarge {
                        stream,
                        field: fields.len() + 1,
                        max: MAX_HEADER_LIST_SIZE,
                    });
                }
                start = at;
            }
        }
    }
    if start < block.len() {
        return Err(hpack("block ends with a dynamic table size update".into()));
    }
    Ok(fields)
}

/// HPACK integer with an `n`-bit prefix (RFC 7541 §5.1); `first` holds the bits above the prefix.
fn encode_int(out: &mut Vec<u8>, first: u8, n: u8, mut v: usize) {
    let max = (1usize << n) - 1;
    if v < max {
        out.push(first | v as u8);
        return;
    }
    out.push(first | max as u8);
    v -= max;
    while v >= 128 {
        out.push((v % 128) as u8 | 0x80);
        v /= 128;
    }
    out.push(v as u8);
}

/// "Literal Header Field without Indexing — New Name" (RFC 7541 §6.2.2), plain (non-Huffman) strings.
fn encode_literal(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.push(0x00);
    encode_int(out, 0x00, 7, name.len());
    out.extend_from_slice(name);
    encode_int(out, 0x00, 7, value.len());
    out.extend_from_slice(value);
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for AuthorityFix<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        if this.refused {
            return Poll::Ready(Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                "connection already refused",
            )));
        }
        loop {
            if this.out_pos < this.out.len() {
                let n = buf.remaining().min(this.out.len() - this.out_pos);
                buf.put_slice(&this.out[this.out_pos..this.out_pos + n]);
                this.out_pos += n;
                if this.out_pos == this.out.len() {
                    this.out.clear();
                    this.out_pos = 0;
                }
                return Poll::Ready(Ok(()));
            }
            let mut tmp = [0u8; 8192];
            let mut rb = ReadBuf::new(&mut tmp);
            match Pin::new(&mut this.inner).poll_read(cx, &mut rb) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Ready(Ok(())) => {
                    let got = rb.filled();
                    if got.is_empty() {
                        return Poll::Ready(Ok(()));
                    }
                    this.raw.extend_from_slice(got);
                    if let Err(refusal) = this.process() {
                        this.refuse(cx, &refusal);
                        return Poll::Ready(Err(std::io::Error::new(
                            std::io::ErrorKind::InvalidData,
                            refusal,
                        )));
                    }
                }
            }
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for AuthorityFix<S> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        if this.refused {
            return Poll::Ready(Err(std::io::ErrorKind::ConnectionAborted.into()));
        }
        let r = Pin::new(&mut this.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = r {
            this.server.advance(&buf[..n.min(buf.len())]);
        }
        r
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

impl tonic::transport::server::Connected for AuthorityFix<tokio::net::UnixStream> {
    type ConnectInfo = tonic::transport::server::UdsConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.inner.connect_info()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(ty: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let len = payload.len();
        let mut f = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, ty, flags];
        f.extend_from_slice(&stream.to_be_bytes());
        f.extend_from_slice(payload);
        f
    }

    fn run(input: &[u8]) -> Vec<u8> {
        let mut fix = AuthorityFix::new(());
        // Feed in small pieces to exercise partial frames.
        let mut out = Vec::new();
        for chunk in input.chunks(7) {
            fix.raw.extend_from_slice(chunk);
            fix.process().unwrap();
            out.append(&mut fix.out);
        }
        out
    }

    fn headers_of(out: &[u8]) -> Vec<(Vec<u8>, Vec<u8>)> {
        let mut dec = loona_hpack::Decoder::new();
        let mut at = PREFACE.len();
        let mut block = Vec::new();
        let mut all = Vec::new();
        while at < out.len() {
            let len =
                (usize::from(out[at]) << 16) | (usize::from(out[at + 1]) << 8) | usize::from(out[at + 2]);
            let (ty, flags) = (out[at + 3], out[at + 4]);
            let mut p = &out[at + 9..at + 9 + len];
            if ty == HEADERS && flags & PRIORITY != 0 {
                p = &p[5..];
            }
            if ty == HEADERS || ty == CONTINUATION {
                block.extend_from_slice(p);
                if flags & END_HEADERS != 0 {
                    all.extend(dec.decode(&block).unwrap());
                    block.clear();
                }
            }
            at += 9 + len;
        }
        all
    }

    /// A literal field with incremental indexing and a new name (RFC 7541 §6.2.1), plain strings.
    fn indexed_literal(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
        out.push(0x40);
        encode_int(out, 0, 7, name.len());
        out.extend_from_slice(name);
        encode_int(out, 0, 7, value.len());
        out.extend_from_slice(value);
    }

    /// The attack of issue 19: a dynamic table size update that makes room, one 10 KB literal added to the table,
    /// then 60,000 indexed references to it (index 62, the newest dynamic entry): 70 KB that decode to 600 MB.
    fn bomb_block() -> Vec<u8> {
        let mut b = Vec::new();
        encode_int(&mut b, 0x20, 5, 65_536);
        indexed_literal(&mut b, b"x-bomb", &[b'a'; 10_000]);
        b.extend(std::iter::repeat_n(0xbe, 60_000));
        b
    }

    fn refusal_of(input: &[u8]) -> Refusal {
        let mut fix = AuthorityFix::new(());
        fix.raw.extend_from_slice(input);
        fix.process().unwrap_err()
    }

    #[test]
    fn rewrites_an_unparseable_authority_and_keeps_the_rest() {
        let mut enc = loona_hpack::Encoder::new();
        let fields: Vec<(&[u8], &[u8])> = vec![
            (b":method", b"POST"),
            (b":scheme", b"http"),
            (b":path", b"/SpiffeWorkloadAPI/FetchX509SVID"),
            (b":authority", b"run%2Fagent.sock"),
            (b"workload.spiffe.io", b"true"),
        ];
        let block = enc.encode(fields.iter().copied());
        // Second request on the same connection reuses the dynamic table the client built.
        let block2 = enc.encode(fields.iter().copied());
        let mut input = PREFACE.to_vec();
        input.extend(frame(0x4, 0, 0, &[])); // SETTINGS passes through
        input.extend(frame(HEADERS, END_HEADERS, 1, &block));
        input.extend(frame(0x0, END_STREAM, 1, b"\x00\x00\x00\x00\x00")); // DATA
                                                                          // Split the second block across HEADERS + CONTINUATION, with padding and priority.
        let (a, b) = block2.split_at(block2.len() / 2);
        let mut p = vec![3u8];
        p.extend_from_slice(&[0, 0, 0, 0, 16]);
        p.extend_from_slice(a);
        p.extend_from_slice(&[0, 0, 0]);
        input.extend(frame(HEADERS, PADDED | PRIORITY, 3, &p));
        input.extend(frame(CONTINUATION, END_HEADERS, 3, b));
        let out = run(&input);
        assert!(out.starts_with(PREFACE));
        let got = headers_of(&out);
        let authorities: Vec<_> = got
            .iter()
            .filter(|(n, _)| n == b":authority")
            .map(|(_, v)| v.clone())
            .collect();
        assert_eq!(authorities, vec![b"localhost".to_vec(), b"localhost".to_vec()]);
        assert!(got
            .iter()
            .any(|(n, v)| n == b"workload.spiffe.io" && v == b"true"));
        assert_eq!(got.iter().filter(|(n, _)| n == b":path").count(), 2);
        // The DATA and SETTINGS frames are byte-for-byte unchanged.
        let data = frame(0x0, END_STREAM, 1, b"\x00\x00\x00\x00\x00");
        assert!(out.windows(data.len()).any(|w| w == data.as_slice()));
    }

    #[test]
    fn a_valid_authority_is_kept() {
        let mut enc = loona_hpack::Encoder::new();
        let block = enc.encode([(&b":authority"[..], &b"localhost:1234"[..])]);
        let mut input = PREFACE.to_vec();
        input.extend(frame(HEADERS, END_HEADERS | END_STREAM, 1, &block));
        let got = headers_of(&run(&input));
        assert_eq!(got, vec![(b":authority".to_vec(), b"localhost:1234".to_vec())]);
    }

    #[test]
    fn garbage_header_blocks_are_refused() {
        let mut input = PREFACE.to_vec();
        input.extend(frame(
            HEADERS,
            END_HEADERS,
            1,
            &[0xff, 0xff, 0xff, 0xff, 0xff, 0xff],
        ));
        assert!(matches!(refusal_of(&input), Refusal::Hpack { stream: 1, .. }));
        assert!(matches!(
            refusal_of(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"),
            Refusal::Protocol { stream: 0, .. }
        ));
    }

    /// The bomb in one HEADERS frame is refused from the frame's 9-byte header, before any of its payload is
    /// buffered. Fails before issue 19: the shim buffered frames of up to 1 MiB and decoded this one into 600 MB.
    #[test]
    fn a_frame_above_the_advertised_size_is_refused_from_its_header() {
        let bomb = frame(HEADERS, END_HEADERS | END_STREAM, 1, &bomb_block());
        let mut fix = AuthorityFix::new(());
        fix.raw.extend_from_slice(PREFACE);
        fix.raw.extend(frame(0x4, 0, 0, &[]));
        fix.raw.extend_from_slice(&bomb[..FRAME_HEADER]);
        let err = fix.process().unwrap_err();
        assert_eq!(
            err,
            Refusal::FrameTooLarge {
                ty: HEADERS,
                stream: 1,
                len: bomb.len() - FRAME_HEADER,
                max: 16_384
            }
        );
        assert_eq!(err.code(), FRAME_SIZE_ERROR);
        assert!(err.to_string().contains("SETTINGS_MAX_FRAME_SIZE 16384"), "{err}");
        assert_eq!(fix.raw.len(), FRAME_HEADER, "nothing of the payload was kept");
    }

    /// Split into frames of the allowed size, the same block is refused as soon as it passes 16 KiB, before any of
    /// it is decoded. Fails before issue 19 (blocks of up to 1 MiB were decoded).
    #[test]
    fn a_header_block_above_the_limit_is_refused_before_decoding() {
        let block = bomb_block();
        let chunks: Vec<&[u8]> = block.chunks(16_384).collect();
        let mut input = PREFACE.to_vec();
        for (i, c) in chunks.iter().enumerate() {
            let ty = if i == 0 { HEADERS } else { CONTINUATION };
            let flags = if i == chunks.len() - 1 { END_HEADERS } else { 0 };
            input.extend(frame(ty, flags, 1, c));
        }
        let err = refusal_of(&input);
        assert_eq!(
            err,
            Refusal::HeaderBlockTooLarge {
                stream: 1,
                len: 32_768,
                max: 16_384
            }
        );
        assert_eq!(err.code(), ENHANCE_YOUR_CALM);
    }

    /// A block within 16 KiB that asks for a 64 KiB table (to hold the 10 KB entry, then reference it 5,000 times:
    /// 50 MB decoded) is refused at the size update. Fails before issue 19: the decoder accepted any table size.
    #[test]
    fn a_table_size_update_above_4_kib_is_refused() {
        let mut block = bomb_block();
        block.truncate(block.len() - 55_000);
        assert!(block.len() <= 16_384);
        let mut input = PREFACE.to_vec();
        input.extend(frame(HEADERS, END_HEADERS, 1, &block));
        let err = refusal_of(&input);
        assert_eq!(
            err,
            Refusal::TableSizeTooLarge {
                stream: 1,
                size: 65_536,
                max: 4_096
            }
        );
        assert_eq!(err.code(), COMPRESSION_ERROR);
        // Without the update, the 10 KB entry does not fit the 4 KiB table (it empties it, RFC 7541 §4.4), so the
        // first reference to it points at nothing.
        let mut dec = loona_hpack::Decoder::new();
        dec.set_max_allowed_table_size(HEADER_TABLE_SIZE);
        let err = decode_block(&mut dec, &block[4..], 1).unwrap_err();
        assert!(matches!(err, Refusal::Hpack { stream: 1, .. }), "{err}");
        // Updates within 4 KiB are honoured.
        let mut ok = Vec::new();
        encode_int(&mut ok, 0x20, 5, 4_096);
        indexed_literal(&mut ok, b"x-small", b"v");
        ok.push(0xbe);
        assert_eq!(decode_block(&mut dec, &ok, 3).unwrap().len(), 2);
    }

    /// Entries that fit the table, referenced 10,000 times in a 14 KB block (40 MB decoded): decoding stops at the
    /// field that passes 16 KiB, and what follows it is never looked at (here: garbage, which would otherwise be
    /// reported as an HPACK error). Fails before issue 19: the whole list was decoded and passed on.
    #[test]
    fn decoding_stops_at_the_field_that_passes_the_header_list_limit() {
        let mut block = Vec::new();
        indexed_literal(&mut block, b"x-b", &[b'a'; 4_000]);
        block.extend(std::iter::repeat_n(0xbe, 10_000));
        assert!(block.len() <= 16_384);
        let mut input = PREFACE.to_vec();
        input.extend(frame(HEADERS, END_HEADERS, 1, &block));
        let err = refusal_of(&input);
        // 4,000 + 3 + 32 bytes per field: four fit in 16,384, the fifth does not.
        assert_eq!(
            err,
            Refusal::HeaderListTooLarge {
                stream: 1,
                field: 5,
                max: 16_384
            }
        );
        assert_eq!(err.code(), ENHANCE_YOUR_CALM);
        let mut dec = loona_hpack::Decoder::new();
        let literal = block.len() - 10_000;
        let mut stops = block[..literal + 4].to_vec();
        stops.extend_from_slice(&[0xff; 8]);
        assert!(matches!(
            decode_block(&mut dec, &stops, 1),
            Err(Refusal::HeaderListTooLarge { field: 5, .. })
        ));
    }

    #[test]
    fn size_updates_only_open_a_block() {
        let mut late = Vec::new();
        indexed_literal(&mut late, b"a", b"b");
        encode_int(&mut late, 0x20, 5, 0);
        indexed_literal(&mut late, b"c", b"d");
        let mut dec = loona_hpack::Decoder::new();
        assert!(matches!(
            decode_block(&mut dec, &late, 1),
            Err(Refusal::Hpack { .. })
        ));
        let mut trailing = Vec::new();
        encode_int(&mut trailing, 0x20, 5, 100);
        let mut dec = loona_hpack::Decoder::new();
        assert!(matches!(
            decode_block(&mut dec, &trailing, 1),
            Err(Refusal::Hpack { .. })
        ));
    }

    #[test]
    fn another_frame_inside_a_header_block_is_refused() {
        let mut enc = loona_hpack::Encoder::new();
        let block = enc.encode([(&b":path"[..], &b"/x"[..])]);
        let mut input = PREFACE.to_vec();
        input.extend(frame(HEADERS, 0, 1, &block));
        input.extend(frame(0x0, 0, 1, b"data"));
        assert!(matches!(refusal_of(&input), Refusal::Protocol { stream: 1, .. }));
        let mut input = PREFACE.to_vec();
        input.extend(frame(HEADERS, 0, 1, &block));
        input.extend(frame(CONTINUATION, END_HEADERS, 3, &[]));
        assert!(matches!(refusal_of(&input), Refusal::Protocol { stream: 3, .. }));
    }

    async fn read_until_refused(fix: &mut AuthorityFix<tokio::io::DuplexStream>) -> std::io::Error {
        use tokio::io::AsyncReadExt;
        let mut buf = [0u8; 256];
        loop {
            match fix.read(&mut buf).await {
                Ok(0) => panic!("EOF instead of a refusal"),
                Ok(_) => {}
                Err(e) => return e,
            }
        }
    }

    /// A refusal between two server frames writes a GOAWAY naming the limit, then every read and write fails.
    #[tokio::test]
    async fn a_refusal_sends_goaway_between_server_frames() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (mut client, server) = tokio::io::duplex(1 << 20);
        let mut fix = AuthorityFix::new(server);
        let settings = frame(0x4, 0, 0, &[0, 3, 0, 0, 0, 100]);
        // Written in two pieces: the cursor follows frames across writes.
        fix.write_all(&settings[..4]).await.unwrap();
        fix.write_all(&settings[4..]).await.unwrap();
        client.write_all(PREFACE).await.unwrap();
        client
            .write_all(&frame(HEADERS, END_HEADERS, 1, &bomb_block())[..4_096])
            .await
            .unwrap();
        let err = read_until_refused(&mut fix).await;
        assert!(err.to_string().contains("SETTINGS_MAX_FRAME_SIZE"), "{err}");
        assert!(read_until_refused(&mut fix).await.to_string().contains("refused"));
        assert!(fix.write_all(b"more").await.is_err());
        drop(fix);
        let mut got = Vec::new();
        client.read_to_end(&mut got).await.unwrap();
        assert_eq!(&got[..settings.len()], settings.as_slice());
        let g = &got[settings.len()..];
        assert_eq!((g[3], g[4]), (GOAWAY, 0));
        assert_eq!(&g[5..9], &[0, 0, 0, 0], "stream 0");
        assert_eq!(&g[9..13], &[0, 0, 0, 0], "no stream was passed on");
        assert_eq!(&g[13..17], &FRAME_SIZE_ERROR.to_be_bytes());
        assert!(String::from_utf8_lossy(&g[17..]).contains("declares 70015 bytes"));
        assert_eq!(frame_len(&g[..9].try_into().unwrap()), g.len() - 9);
    }

    /// In the middle of a server frame a GOAWAY would corrupt it: the connection is only closed.
    #[tokio::test]
    async fn no_goaway_inside_a_server_frame() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (mut client, server) = tokio::io::duplex(1 << 20);
        let mut fix = AuthorityFix::new(server);
        let settings = frame(0x4, 0, 0, &[0, 3, 0, 0, 0, 100]);
        fix.write_all(&settings[..12]).await.unwrap();
        client.write_all(b"PRI * HTTP/1.1\r\n").await.unwrap();
        read_until_refused(&mut fix).await;
        drop(fix);
        let mut got = Vec::new();
        client.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, &settings[..12]);
    }

    #[test]
    fn integers_encode_and_decode_per_rfc7541() {
        let mut out = Vec::new();
        encode_int(&mut out, 0, 5, 1337);
        assert_eq!(out, vec![31, 154, 10]);
        assert_eq!(decode_int(&out, 5), Some((1337, 3)));
        assert_eq!(decode_int(&[10], 5), Some((10, 1)));
        assert_eq!(decode_int(&[31, 154], 5), None, "truncated");
        assert_eq!(
            decode_int(&[31, 0xff, 0xff, 0xff, 0xff, 0x01], 5),
            None,
            "above 2^28"
        );
    }
}
