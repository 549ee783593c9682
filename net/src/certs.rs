//! Cluster certificates (rcgen) and the mutual-TLS configurations (rustls, ring).
//!
//! A cluster CA signs node certificates (SAN DNS name `node-<id>.shoal`) and
//! client certificates (SAN DNS name `client-<name>.shoal`). Both sides of every
//! connection verify the chain against the CA and the validity period; the
//! dialer checks that the server's certificate names the node it dialed, and
//! the acceptor reads the caller's identity ([`Peer`]) from its certificate.
//! These functions are what `shoal certs` uses.

use std::sync::Arc;
use std::time::Duration as StdDuration;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use time::OffsetDateTime;

use crate::config::ALPN;
use crate::error::CertError;
use crate::{NodeId, Peer};

/// DNS suffix of every name in cluster certificates.
pub const NAME_SUFFIX: &str = ".shoal";
/// Common name of the cluster CA. It is fixed so a CA reloaded from PEM
/// ([`ClusterCa::from_pem`]) signs certificates that chain to the original.
pub const CA_COMMON_NAME: &str = "Shoal cluster CA";
/// Default validity of issued certificates (10 years).
pub const VALIDITY_DEFAULT: StdDuration = StdDuration::from_secs(10 * 365 * 24 * 3600);

/// The certificate authority of one cluster.
pub struct ClusterCa {
    cert: rcgen::Certificate,
    key: KeyPair,
}

impl std::fmt::Debug for ClusterCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterCa").finish_non_exhaustive()
    }
}

fn ca_params() -> CertificateParams {
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, CA_COMMON_NAME);
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let now = OffsetDateTime::now_utc();
    params.not_before = now - StdDuration::from_secs(3600);
    params.not_after = now + VALIDITY_DEFAULT + VALIDITY_DEFAULT;
    params
}

/// The SAN DNS name for a peer identity.
pub fn peer_dns_name(peer: &Peer) -> String {
    match peer {
        Peer::Node(id) => format!("node-{}{NAME_SUFFIX}", id.0),
        Peer::Client(name) => format!("client-{name}{NAME_SUFFIX}"),
    }
}

fn valid_client_name(name: &str) -> bool {
    (1..=63).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

impl ClusterCa {
    /// Creates a new CA with a fresh ECDSA P-256 key.
    pub fn generate() -> Result<Self, CertError> {
        let key = KeyPair::generate()?;
        let cert = ca_params().self_signed(&key)?;
        Ok(ClusterCa { cert, key })
    }

    /// Loads a CA from the PEM written by [`ClusterCa::cert_pem`] and
    /// [`ClusterCa::key_pem`]. Only the key is needed to sign; the certificate
    /// PEM is kept for distribution.
    pub fn from_pem(key_pem: &str) -> Result<Self, CertError> {
        let key = KeyPair::from_pem(key_pem)?;
        let cert = ca_params().self_signed(&key)?;
        Ok(ClusterCa { cert, key })
    }

    /// The CA certificate, PEM. Every node and client needs it.
    pub fn cert_pem(&self) -> String {
        self.cert.pem()
    }

    /// The CA private key, PEM. Keep it off the nodes if you can.
    pub fn key_pem(&self) -> String {
        self.key.serialize_pem()
    }

    /// Issues a node certificate valid for [`VALIDITY_DEFAULT`].
    pub fn issue_node(&self, id: NodeId) -> Result<Identity, CertError> {
        let now = OffsetDateTime::now_utc();
        self.issue(
            &Peer::Node(id),
            now - StdDuration::from_secs(3600),
            now + VALIDITY_DEFAULT,
        )
    }

    /// Issues a client certificate (`name`: `[a-z0-9-]`, 1..=63 characters).
    pub fn issue_client(&self, name: &str) -> Result<Identity, CertError> {
        let now = OffsetDateTime::now_utc();
        self.issue(
            &Peer::Client(name.to_string()),
            now - StdDuration::from_secs(3600),
            now + VALIDITY_DEFAULT,
        )
    }

    /// Issues a certificate for `subject` with an explicit validity window
    /// (tests use a window in the past to get an expired certificate).
    pub fn issue(
        &self,
        subject: &Peer,
        not_before: OffsetDateTime,
        not_after: OffsetDateTime,
    ) -> Result<Identity, CertError> {
        if let Peer::Client(name) = subject {
            if !valid_client_name(name) {
                return Err(CertError::InvalidClientName(name.clone()));
            }
        }
        let dns = peer_dns_name(subject);
        let mut params = CertificateParams::new(vec![dns.clone()])?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, dns);
        params.distinguished_name = dn;
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.not_before = not_before;
        params.not_after = not_after;
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &self.cert, &self.key)?;
        Ok(Identity {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            ca_cert_pem: self.cert.pem(),
        })
    }
}

/// What an endpoint needs to speak mutual TLS: its certificate and key, and
/// the cluster CA certificate to verify the other side. All PEM.
#[derive(Clone)]
pub struct Identity {
    /// This endpoint's certificate, PEM.
    pub cert_pem: String,
    /// This endpoint's private key, PEM (PKCS#8).
    pub key_pem: String,
    /// The cluster CA certificate, PEM.
    pub ca_cert_pem: String,
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Identity")
            .field("peer", &self.peer())
            .finish_non_exhaustive()
    }
}

impl Identity {
    /// The identity named in this certificate, if it is a cluster name.
    pub fn peer(&self) -> Option<Peer> {
        let der = CertificateDer::from_pem_slice(self.cert_pem.as_bytes()).ok()?;
        peer_from_cert_der(&der)
    }

    fn parts(
        &self,
    ) -> Result<
        (
            CertificateDer<'static>,
            PrivateKeyDer<'static>,
            rustls::RootCertStore,
        ),
        CertError,
    > {
        let cert = CertificateDer::from_pem_slice(self.cert_pem.as_bytes())
            .map_err(|e| CertError::Pem(format!("certificate: {e}")))?;
        let key = PrivateKeyDer::from_pem_slice(self.key_pem.as_bytes())
            .map_err(|e| CertError::Pem(format!("private key: {e}")))?;
        let ca = CertificateDer::from_pem_slice(self.ca_cert_pem.as_bytes())
            .map_err(|e| CertError::Pem(format!("CA certificate: {e}")))?;
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(ca)
            .map_err(|e| CertError::Tls(format!("CA certificate: {e}")))?;
        Ok((cert, key, roots))
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn tls_err(e: impl std::fmt::Display) -> CertError {
    CertError::Tls(e.to_string())
}

/// QUIC server config: requires a client certificate signed by the cluster CA.
pub fn server_config(
    identity: &Identity,
    transport: Arc<quinn::TransportConfig>,
) -> Result<quinn::ServerConfig, CertError> {
    let (cert, key, roots) = identity.parts()?;
    let verifier =
        rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
            .build()
            .map_err(tls_err)?;
    let mut tls = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(tls_err)?
        .with_client_cert_verifier(verifier)
        .with_single_cert(vec![cert], key)
        .map_err(tls_err)?;
    tls.alpn_protocols = vec![ALPN.to_vec()];
    tls.max_early_data_size = 0;
    let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(tls).map_err(tls_err)?;
    let mut config = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    config.transport_config(transport);
    Ok(config)
}

/// QUIC client config presenting `identity` and trusting only the cluster CA.
/// `alpn` is normally `&[ALPN]`; tests pass something else to check refusal.
pub fn client_config(
    identity: &Identity,
    alpn: &[&[u8]],
    transport: Arc<quinn::TransportConfig>,
) -> Result<quinn::ClientConfig, CertError> {
    let (cert, key, roots) = identity.parts()?;
    let mut tls = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(tls_err)?
        .with_root_certificates(roots)
        .with_client_auth_cert(vec![cert], key)
        .map_err(tls_err)?;
    tls.alpn_protocols = alpn.iter().map(|a| a.to_vec()).collect();
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls).map_err(tls_err)?;
    let mut config = quinn::ClientConfig::new(Arc::new(crypto));
    config.transport_config(transport);
    Ok(config)
}

/// The cluster identity named by a certificate's SAN DNS names
/// (`node-<u64>.shoal` or `client-<name>.shoal`), if any.
pub fn peer_from_cert_der(der: &[u8]) -> Option<Peer> {
    san_dns_names(der)?
        .into_iter()
        .find_map(|name| parse_peer_name(&name))
}

/// The cluster identity named by a PEM certificate, if any.
pub fn peer_from_cert_pem(pem: &str) -> Option<Peer> {
    let der = CertificateDer::from_pem_slice(pem.as_bytes()).ok()?;
    peer_from_cert_der(&der)
}

/// Parses `node-<u64>.shoal` / `client-<name>.shoal`.
pub fn parse_peer_name(name: &str) -> Option<Peer> {
    let stem = name.strip_suffix(NAME_SUFFIX)?;
    if let Some(id) = stem.strip_prefix("node-") {
        if id.is_empty() || !id.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        return id.parse().ok().map(|id| Peer::Node(NodeId(id)));
    }
    let client = stem.strip_prefix("client-")?;
    valid_client_name(client).then(|| Peer::Client(client.to_string()))
}

/// A minimal DER reader: just enough to find the subjectAltName extension.
/// The certificate was already verified by webpki; this only reads names.
struct Der<'a>(&'a [u8]);

impl<'a> Der<'a> {
    fn next(&mut self) -> Option<(u8, &'a [u8])> {
        let data = self.0;
        let tag = *data.first()?;
        let first = *data.get(1)? as usize;
        let (len, header) = if first < 0x80 {
            (first, 2)
        } else {
            let n = first & 0x7f;
            if n == 0 || n > 4 {
                return None;
            }
            let mut len = 0usize;
            for i in 0..n {
                len = (len << 8) | *data.get(2 + i)? as usize;
            }
            (len, 2 + n)
        };
        let end = header.checked_add(len)?;
        let content = data.get(header..end)?;
        self.0 = &data[end..];
        Some((tag, content))
    }
}

fn san_dns_names(der: &[u8]) -> Option<Vec<String>> {
    const SEQUENCE: u8 = 0x30;
    const SAN_OID: &[u8] = &[0x55, 0x1d, 0x11];
    let (tag, cert) = Der(der).next()?;
    if tag != SEQUENCE {
        return None;
    }
    let (tag, tbs) = Der(cert).next()?;
    if tag != SEQUENCE {
        return None;
    }
    let mut fields = Der(tbs);
    while let Some((tag, content)) = fields.next() {
        if tag != 0xa3 {
            continue;
        }
        let (_, exts) = Der(content).next()?;
        let mut exts = Der(exts);
        while let Some((_, ext)) = exts.next() {
            let mut parts = Der(ext);
            let (_, oid) = parts.next()?;
            if oid != SAN_OID {
                continue;
            }
            let mut value = parts.next()?;
            if value.0 == 0x01 {
                value = parts.next()?; // skip `critical`
            }
            let (_, names) = Der(value.1).next()?;
            let mut names = Der(names);
            let mut out = Vec::new();
            while let Some((tag, name)) = names.next() {
                if tag == 0x82 {
                    out.push(String::from_utf8_lossy(name).into_owned());
                }
            }
            return Some(out);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn issued_certificates_name_their_peer() {
        let ca = ClusterCa::generate().unwrap();
        assert_eq!(
            ca.issue_node(NodeId(42)).unwrap().peer(),
            Some(Peer::Node(NodeId(42)))
        );
        assert_eq!(
            ca.issue_client("admin").unwrap().peer(),
            Some(Peer::Client("admin".into()))
        );
        assert!(ca.issue_client("Bad Name").is_err());
        let again = ClusterCa::from_pem(&ca.key_pem()).unwrap();
        assert_eq!(
            again.issue_node(NodeId(1)).unwrap().peer(),
            Some(Peer::Node(NodeId(1)))
        );
    }

    #[test]
    fn peer_names_parse_strictly() {
        assert_eq!(parse_peer_name("node-7.shoal"), Some(Peer::Node(NodeId(7))));
        assert_eq!(parse_peer_name("node-+7.shoal"), None);
        assert_eq!(parse_peer_name("node-7.evil"), None);
        assert_eq!(parse_peer_name("client-x_y.shoal"), None);
        assert_eq!(san_dns_names(b"\x30\x82\xff"), None);
    }
}
