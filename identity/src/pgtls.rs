//! TLS 1.3 to PostgreSQL (the CA's store, the audit tool's central store) through rustls, verifying the server's
//! certificate against the operator's roots and the host name in the conninfo. Connections use it when roots are
//! configured; `sslmode=require` in the conninfo then refuses a server that does not speak TLS.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_postgres::tls::{ChannelBinding, MakeTlsConnect, TlsConnect, TlsStream};

use crate::tls::TlsError;

/// Makes TLS connections to PostgreSQL servers.
#[derive(Clone)]
pub struct PgTls(Arc<rustls::ClientConfig>);

impl std::fmt::Debug for PgTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PgTls")
    }
}

impl PgTls {
    /// Trusts the CA certificates in `pem` (the server's issuing CA); TLS 1.3 only, no client certificate.
    pub fn from_pem(pem: &str) -> Result<Self, TlsError> {
        let certs = crate::bundle::certs_from_pem(pem).map_err(|e| TlsError::Key(format!("CA file: {e}")))?;
        if certs.is_empty() {
            return Err(TlsError::Key("CA file holds no certificate".into()));
        }
        let mut roots = rustls::RootCertStore::empty();
        for (index, der) in certs.into_iter().enumerate() {
            roots.add(der.into()).map_err(|e| TlsError::Anchor {
                index,
                reason: e.to_string(),
            })?;
        }
        let mut cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::aws_lc_rs::default_provider(),
        ))
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(roots)
        .with_no_client_auth();
        // As every Trustline client (`tls::client_config`): never resume, so the server's certificate is verified
        // against the roots on every connection (rustls does not verify it again on a resumed handshake).
        cfg.resumption = rustls::client::Resumption::disabled();
        Ok(Self(Arc::new(cfg)))
    }
}

/// One connection attempt's TLS parameters.
pub struct PgTlsConnect {
    cfg: Arc<rustls::ClientConfig>,
    name: ServerName<'static>,
}

impl<S> MakeTlsConnect<S> for PgTls
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Stream = PgTlsStream<S>;
    type TlsConnect = PgTlsConnect;
    type Error = io::Error;

    fn make_tls_connect(&mut self, domain: &str) -> Result<PgTlsConnect, io::Error> {
        let name = ServerName::try_from(domain.to_owned())
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, format!("host {domain:?}: {e}")))?;
        Ok(PgTlsConnect {
            cfg: self.0.clone(),
            name,
        })
    }
}

impl<S> TlsConnect<S> for PgTlsConnect
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Stream = PgTlsStream<S>;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<PgTlsStream<S>>> + Send>>;

    fn connect(self, stream: S) -> Self::Future {
        Box::pin(async move {
            tokio_rustls::TlsConnector::from(self.cfg)
                .connect(self.name, stream)
                .await
                .map(PgTlsStream)
        })
    }
}

/// A TLS stream to PostgreSQL.
pub struct PgTlsStream<S>(tokio_rustls::client::TlsStream<S>);

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for PgTlsStream<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for PgTlsStream<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> TlsStream for PgTlsStream<S> {
    /// SCRAM channel binding (`SCRAM-SHA-256-PLUS`, `channel_binding=prefer|require` in the conninfo):
    /// `tls-server-end-point`, the hash of the certificate the server presented on this connection, so the
    /// password exchange cannot be relayed through a server with another certificate.
    fn channel_binding(&self) -> ChannelBinding {
        self.0
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|certs| certs.first())
            .and_then(|leaf| server_end_point(leaf))
            .map_or_else(ChannelBinding::none, ChannelBinding::tls_server_end_point)
    }
}

/// RFC 5929 `tls-server-end-point`: the server certificate hashed with its signature's hash (SHA-256 for MD5,
/// SHA-1 and SHA-256). `None` where RFC 5929 defines no hash (EdDSA), as PostgreSQL itself has none to offer.
fn server_end_point(der: &[u8]) -> Option<Vec<u8>> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let alg = match cert.signature_algorithm.algorithm.to_id_string().as_str() {
        // ecdsa-with-SHA384, sha384WithRSAEncryption
        "1.2.840.10045.4.3.3" | "1.2.840.113549.1.1.12" => &aws_lc_rs::digest::SHA384,
        // ecdsa-with-SHA512, sha512WithRSAEncryption
        "1.2.840.10045.4.3.4" | "1.2.840.113549.1.1.13" => &aws_lc_rs::digest::SHA512,
        // Ed25519, Ed448
        "1.3.101.112" | "1.3.101.113" => return None,
        _ => &aws_lc_rs::digest::SHA256,
    };
    Some(aws_lc_rs::digest::digest(alg, der).as_ref().to_vec())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn the_end_point_hash_follows_the_certificate_signature() {
        let cert = |alg: &'static rcgen::SignatureAlgorithm| {
            let key = rcgen::KeyPair::generate_for(alg).unwrap();
            rcgen::CertificateParams::new(vec!["db".into()])
                .unwrap()
                .self_signed(&key)
                .unwrap()
        };
        for (alg, len) in [
            (&rcgen::PKCS_ECDSA_P256_SHA256, 32),
            (&rcgen::PKCS_ECDSA_P384_SHA384, 48),
        ] {
            let h = server_end_point(cert(alg).der()).unwrap();
            assert_eq!(h.len(), len);
        }
        assert_eq!(server_end_point(cert(&rcgen::PKCS_ED25519).der()), None);
        assert_eq!(server_end_point(b"not a certificate"), None);
    }
}
