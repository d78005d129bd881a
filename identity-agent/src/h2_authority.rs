//! Lets HTTP/2 clients that send a non-URI `:authority` use the Workload API socket.
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
//! The server-to-client direction is not touched.

use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

const PREFACE_LEN: usize = 24;
const FRAME_HEADER: usize = 9;
const MAX_FRAME: usize = 16_384;
const MAX_HEADER_BLOCK: usize = 1 << 20;
const HEADERS: u8 = 0x1;
const CONTINUATION: u8 = 0x9;
const END_STREAM: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
const PADDED: u8 = 0x8;
const PRIORITY: u8 = 0x20;

struct Pending {
    stream: [u8; 4],
    end_stream: bool,
    priority: Option<[u8; 5]>,
    block: Vec<u8>,
}

/// A connection whose client header blocks get a usable `:authority`.
pub struct AuthorityFix<S> {
    inner: S,
    raw: Vec<u8>,
    out: Vec<u8>,
    out_pos: usize,
    preface_done: bool,
    pending: Option<Pending>,
    decoder: loona_hpack::Decoder<'static>,
}

impl<S> AuthorityFix<S> {
    /// Wraps an accepted connection.
    pub fn new(inner: S) -> Self {
        Self {
            inner,
            raw: Vec::with_capacity(16 * 1024),
            out: Vec::with_capacity(16 * 1024),
            out_pos: 0,
            preface_done: false,
            pending: None,
            decoder: loona_hpack::Decoder::new(),
        }
    }

    /// The wrapped connection.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// Consumes raw client bytes; appends rewritten bytes to `out`.
    fn process(&mut self) -> std::io::Result<()> {
        if !self.preface_done {
            if self.raw.len() < PREFACE_LEN {
                return Ok(());
            }
            self.out.extend_from_slice(&self.raw[..PREFACE_LEN]);
            self.raw.drain(..PREFACE_LEN);
            self.preface_done = true;
        }
        let mut at = 0;
        while self.raw.len() - at >= FRAME_HEADER {
            let h = &self.raw[at..at + FRAME_HEADER];
            let len = (usize::from(h[0]) << 16) | (usize::from(h[1]) << 8) | usize::from(h[2]);
            if self.raw.len() - at < FRAME_HEADER + len {
                break;
            }
            let (ty, flags) = (h[3], h[4]);
            let stream = [h[5], h[6], h[7], h[8]];
            let frame = self.raw[at..at + FRAME_HEADER + len].to_vec();
            at += FRAME_HEADER + len;
            self.frame(ty, flags, stream, &frame)?;
        }
        self.raw.drain(..at);
        Ok(())
    }

    fn frame(&mut self, ty: u8, flags: u8, stream: [u8; 4], frame: &[u8]) -> std::io::Result<()> {
        let payload = &frame[FRAME_HEADER..];
        match ty {
            HEADERS => {
                let mut p = payload;
                let mut pad = 0usize;
                if flags & PADDED != 0 {
                    pad = usize::from(*p.first().ok_or_else(|| bad("HEADERS frame missing pad length"))?);
                    p = &p[1..];
                }
                let mut priority = None;
                if flags & PRIORITY != 0 {
                    let pr: [u8; 5] = p
                        .get(..5)
                        .and_then(|s| s.try_into().ok())
                        .ok_or_else(|| bad("short HEADERS priority"))?;
                    priority = Some(pr);
                    p = &p[5..];
                }
                if pad > p.len() {
                    return Err(bad("HEADERS padding longer than the frame"));
                }
                let fragment = &p[..p.len() - pad];
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
            CONTINUATION if self.pending.as_ref().is_some_and(|p| p.stream == stream) => {
                let mut pending = self
                    .pending
                    .take()
                    .ok_or_else(|| bad("CONTINUATION without HEADERS"))?;
                if pending.block.len() + payload.len() > MAX_HEADER_BLOCK {
                    return Err(bad("header block too large"));
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

    fn emit(&mut self, p: Pending) -> std::io::Result<()> {
        let fields = self
            .decoder
            .decode(&p.block)
            .map_err(|e| bad(&format!("HPACK: {e:?}")))?;
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
        let mut chunks: Vec<&[u8]> = Vec::new();
        let first_room = MAX_FRAME - if p.priority.is_some() { 5 } else { 0 };
        let (first, mut rest) = block.split_at(block.len().min(first_room));
        chunks.push(first);
        while !rest.is_empty() {
            let (c, r) = rest.split_at(rest.len().min(MAX_FRAME));
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

fn bad(msg: &str) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, msg.to_owned())
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

impl<S: AsyncRead + Unpin> AsyncRead for AuthorityFix<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
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
                    if this.raw.len() > MAX_HEADER_BLOCK + MAX_FRAME {
                        return Poll::Ready(Err(bad("frame larger than the Workload API accepts")));
                    }
                    this.process()?;
                }
            }
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for AuthorityFix<S> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
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

    const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

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
        let mut fix = AuthorityFix::new(());
        fix.raw.extend_from_slice(PREFACE);
        fix.raw.extend(frame(
            HEADERS,
            END_HEADERS,
            1,
            &[0xff, 0xff, 0xff, 0xff, 0xff, 0xff],
        ));
        assert!(fix.process().is_err());
    }

    /// Workloads control every byte of this stream: mutated frames must give an error or output, never a panic.
    #[test]
    fn mutated_frames_never_panic() {
        let mut enc = loona_hpack::Encoder::new();
        let block = enc.encode([
            (&b":authority"[..], &b"run%2Fagent.sock"[..]),
            (&b":path"[..], &b"/x"[..]),
        ]);
        let mut input = PREFACE.to_vec();
        input.extend(frame(HEADERS, END_HEADERS, 1, &block));
        input.extend(frame(0x0, END_STREAM, 1, b"data"));
        let mut rng = trustline_identity::mutate::Rng::new(5);
        for _ in 0..3000 {
            let m = trustline_identity::mutate::mutate(&mut rng, &input);
            let mut fix = AuthorityFix::new(());
            fix.raw.extend_from_slice(&m);
            let _ = fix.process();
        }
    }

    #[test]
    fn long_integers_encode_per_rfc7541() {
        let mut out = Vec::new();
        encode_int(&mut out, 0, 5, 1337);
        assert_eq!(out, vec![31, 154, 10]);
    }
}
