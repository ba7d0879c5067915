//! TLS for both connections: one rustls client configuration per `sslmode`, the
//! `tls-server-end-point` channel-binding hash SCRAM-SHA-256-PLUS needs, and the connector the
//! SQL connection hands tokio-postgres, which tells a server without TLS from a failed
//! handshake.
//!
//! libpq's levels map onto certificate verifiers: `prefer`/`require` encrypt without checking
//! the certificate (they protect against passive sniffing only), `verify-ca` checks the chain
//! but not the name, `verify-full` checks both (rustls' WebPKI verifier).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{CertificateError, DigitallySignedStruct, RootCertStore, SignatureScheme};
use sha2::Digest;
use tokio_postgres::tls::{MakeTlsConnect, TlsConnect};
use tokio_postgres_rustls::MakeRustlsConnect;

use super::config::SslMode;
use super::error::ReplicationError;

/// Builds the rustls configuration for `mode` (never called for `disable`). `root_cert` is the
/// `sslrootcert` path; `None` or `"system"` trusts the bundled Mozilla roots.
pub(crate) fn client_config(
    mode: SslMode,
    root_cert: Option<&str>,
) -> Result<rustls::ClientConfig, ReplicationError> {
    // An explicit provider rather than the process default: another crate enabling aws-lc-rs
    // would otherwise make the default ambiguous and rustls would panic.
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|error| ReplicationError::TlsConfig {
            reason: error.to_string(),
        })?;
    let verifier: Arc<dyn ServerCertVerifier> = match mode {
        SslMode::Disable | SslMode::Prefer | SslMode::Require => {
            Arc::new(UnverifiedCertificate { provider })
        }
        SslMode::VerifyCa | SslMode::VerifyFull => {
            let roots = Arc::new(root_store(root_cert)?);
            let webpki = WebPkiServerVerifier::builder_with_provider(roots, provider)
                .build()
                .map_err(|error| ReplicationError::TlsConfig {
                    reason: error.to_string(),
                })?;
            if mode == SslMode::VerifyFull {
                webpki
            } else {
                Arc::new(ChainOnly(webpki))
            }
        }
    };
    Ok(builder
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth())
}

fn root_store(root_cert: Option<&str>) -> Result<RootCertStore, ReplicationError> {
    let mut roots = RootCertStore::empty();
    match root_cert {
        None | Some("system") => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
        Some(path) => {
            let pem = std::fs::read(path).map_err(|error| ReplicationError::TlsConfig {
                reason: format!("cannot read sslrootcert {path:?}: {error}"),
            })?;
            let mut reader = pem.as_slice();
            for cert in rustls_pemfile::certs(&mut reader) {
                let cert = cert.map_err(|error| ReplicationError::TlsConfig {
                    reason: format!("malformed PEM in sslrootcert {path:?}: {error}"),
                })?;
                roots
                    .add(cert)
                    .map_err(|error| ReplicationError::TlsConfig {
                        reason: format!("unusable certificate in sslrootcert {path:?}: {error}"),
                    })?;
            }
            if roots.is_empty() {
                return Err(ReplicationError::TlsConfig {
                    reason: format!("sslrootcert {path:?} contains no PEM certificate"),
                });
            }
        }
    }
    Ok(roots)
}

/// tokio-postgres's rustls connector, noting whether a TLS handshake was started.
///
/// When TLS is required and the server answers the SSLRequest with "no" (it runs with
/// `ssl = off`), tokio-postgres fails before it hands the socket to the connector, with the
/// same error kind ("error performing TLS handshake") as a handshake that failed. Whether the
/// handshake started tells the two apart without reading its messages.
#[derive(Clone)]
pub(crate) struct WatchedTlsConnect {
    inner: MakeRustlsConnect,
    handshake_started: Arc<AtomicBool>,
}

impl WatchedTlsConnect {
    pub(crate) fn new(config: rustls::ClientConfig) -> WatchedTlsConnect {
        WatchedTlsConnect {
            inner: MakeRustlsConnect::new(config),
            handshake_started: Arc::new(AtomicBool::new(false)),
        }
    }

    /// Whether any connection made through this connector got as far as a TLS handshake.
    pub(crate) fn handshake_started(&self) -> bool {
        self.handshake_started.load(Ordering::Relaxed)
    }
}

impl<S> MakeTlsConnect<S> for WatchedTlsConnect
where
    MakeRustlsConnect: MakeTlsConnect<S>,
{
    type Stream = <MakeRustlsConnect as MakeTlsConnect<S>>::Stream;
    type TlsConnect = WatchedHandshake<<MakeRustlsConnect as MakeTlsConnect<S>>::TlsConnect>;
    type Error = <MakeRustlsConnect as MakeTlsConnect<S>>::Error;

    fn make_tls_connect(&mut self, domain: &str) -> Result<Self::TlsConnect, Self::Error> {
        Ok(WatchedHandshake {
            inner: self.inner.make_tls_connect(domain)?,
            handshake_started: self.handshake_started.clone(),
        })
    }
}

/// One connection's handshake, for [`WatchedTlsConnect`].
pub(crate) struct WatchedHandshake<T> {
    inner: T,
    handshake_started: Arc<AtomicBool>,
}

impl<S, T: TlsConnect<S>> TlsConnect<S> for WatchedHandshake<T> {
    type Stream = T::Stream;
    type Error = T::Error;
    type Future = T::Future;

    fn connect(self, stream: S) -> Self::Future {
        self.handshake_started.store(true, Ordering::Relaxed);
        self.inner.connect(stream)
    }
}

/// `sslmode=prefer|require`: any certificate is accepted, but the handshake signatures are
/// still checked so the session keys belong to whoever holds that certificate.
#[derive(Debug)]
struct UnverifiedCertificate {
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for UnverifiedCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// `sslmode=verify-ca`: the WebPKI chain check, minus the host-name check (which WebPKI performs
/// after the chain check, so a name mismatch error means the chain was fine).
#[derive(Debug)]
struct ChainOnly(Arc<WebPkiServerVerifier>);

impl ServerCertVerifier for ChainOnly {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match self
            .0
            .verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
        {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

/// The `tls-server-end-point` channel-binding data (RFC 5929): the server certificate hashed
/// with its signature's hash, SHA-256 for MD5/SHA-1. `None` when the signature algorithm has no
/// single hash (Ed25519) or the certificate cannot be read, in which case channel binding is
/// not offered.
pub(crate) fn server_end_point_hash(cert: &[u8]) -> Option<Vec<u8>> {
    let oid = signature_algorithm_oid(cert)?;
    // DER-encoded OID contents, without tag and length.
    const SHA256_OIDS: [&[u8]; 5] = [
        &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x04], // md5WithRSAEncryption
        &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x05], // sha1WithRSAEncryption
        &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x0b], // sha256WithRSAEncryption
        &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x03, 0x02],       // ecdsa-with-SHA256
        &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x01],             // ecdsa-with-SHA1
    ];
    const SHA384_OIDS: [&[u8]; 2] = [
        &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x0c], // sha384WithRSAEncryption
        &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x03, 0x03],       // ecdsa-with-SHA384
    ];
    const SHA512_OIDS: [&[u8]; 2] = [
        &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x0d], // sha512WithRSAEncryption
        &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x03, 0x04],       // ecdsa-with-SHA512
    ];
    if SHA256_OIDS.contains(&oid) {
        Some(sha2::Sha256::digest(cert).to_vec())
    } else if SHA384_OIDS.contains(&oid) {
        Some(sha2::Sha384::digest(cert).to_vec())
    } else if SHA512_OIDS.contains(&oid) {
        Some(sha2::Sha512::digest(cert).to_vec())
    } else {
        None
    }
}

/// Reads `Certificate.signatureAlgorithm.algorithm` out of a DER certificate:
/// `SEQUENCE { tbsCertificate SEQUENCE, signatureAlgorithm SEQUENCE { OID, .. }, .. }`.
fn signature_algorithm_oid(cert: &[u8]) -> Option<&[u8]> {
    const SEQUENCE: u8 = 0x30;
    const OBJECT_IDENTIFIER: u8 = 0x06;
    let (certificate, _) = der_element(cert, SEQUENCE)?;
    let (_tbs, after_tbs) = der_element(certificate, SEQUENCE)?;
    let (algorithm, _) = der_element(after_tbs, SEQUENCE)?;
    let (oid, _) = der_element(algorithm, OBJECT_IDENTIFIER)?;
    Some(oid)
}

/// Splits one DER element with tag `tag` off the front of `input`: `(contents, rest)`.
fn der_element(input: &[u8], tag: u8) -> Option<(&[u8], &[u8])> {
    let (&found, input) = input.split_first()?;
    if found != tag {
        return None;
    }
    let (&first, mut input) = input.split_first()?;
    let length = if first < 0x80 {
        usize::from(first)
    } else {
        let count = usize::from(first & 0x7f);
        if count == 0 || count > 4 {
            return None;
        }
        let (digits, rest) = input.split_at_checked(count)?;
        input = rest;
        digits
            .iter()
            .fold(0usize, |length, &digit| (length << 8) | usize::from(digit))
    };
    input.split_at_checked(length)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn der_walk_rejects_truncated_input() {
        assert_eq!(der_element(&[0x30, 0x03, 1, 2], 0x30), None);
        assert_eq!(der_element(&[0x30, 0x82, 0x00], 0x30), None);
        assert_eq!(
            der_element(&[0x30, 0x02, 1, 2, 9], 0x30),
            Some((&[1u8, 2][..], &[9u8][..]))
        );
        assert_eq!(signature_algorithm_oid(&[]), None);
        // A sha256WithRSAEncryption skeleton: empty TBS then the algorithm identifier.
        let cert = [
            0x30, 0x0f, 0x30, 0x00, 0x30, 0x0b, 0x06, 0x09, 0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d,
            0x01, 0x01, 0x0b,
        ];
        assert_eq!(
            server_end_point_hash(&cert).map(|hash| hash.len()),
            Some(32)
        );
    }
}
