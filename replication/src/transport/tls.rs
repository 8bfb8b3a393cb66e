//! Cluster credentials: a cluster CA (rcgen), node certificates that name their node, and the
//! mutual-TLS rustls configurations of the QUIC transport (ring provider, chosen explicitly).
//!
//! A node's certificate carries the DNS name `node-<id>.<cluster_id>`. Both sides of a connection
//! verify the peer's chain against the cluster CA only, and the peer's node id is read from that
//! name; a certificate without exactly one such name for this cluster is refused.

use std::fmt;
use std::net::IpAddr;
use std::path::Path;
use std::path::PathBuf;
use std::sync::Arc;

use rcgen::BasicConstraints;
use rcgen::CertificateParams;
use rcgen::DnType;
use rcgen::ExtendedKeyUsagePurpose;
use rcgen::IsCa;
use rcgen::Issuer;
use rcgen::KeyPair;
use rcgen::KeyUsagePurpose;
use rcgen::SanType;
use rustls::client::danger::HandshakeSignatureValid;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;
use rustls::pki_types::PrivateKeyDer;
use rustls::pki_types::UnixTime;
use rustls::server::danger::ClientCertVerified;
use rustls::server::danger::ClientCertVerifier;
use rustls::server::WebPkiClientVerifier;
use rustls::CertificateError;
use rustls::DigitallySignedStruct;
use rustls::DistinguishedName;
use rustls::RootCertStore;
use rustls::SignatureScheme;

use crate::raft_types::NodeId;

/// Decides whether a peer node id may connect: a member, or a node being added.
pub type Admit = Arc<dyn Fn(NodeId) -> bool + Send + Sync>;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("invalid cluster id {0:?}: expected 1 to 63 characters of [a-z0-9-]")]
    ClusterId(String),
    #[error("invalid node id 0: node ids start at 1")]
    NodeId,
    #[error("generate certificate: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("parse {what}: {reason}")]
    Pem { what: &'static str, reason: String },
    #[error("parse certificate: {0}")]
    Certificate(String),
    #[error("certificate names {found:?}, expected node-{expected}.{cluster_id}")]
    WrongNode {
        expected: NodeId,
        found: Option<NodeId>,
        cluster_id: String,
    },
    #[error("certificate names no node of cluster {cluster_id} (names: {names:?})")]
    NoNodeName {
        cluster_id: String,
        names: Vec<String>,
    },
    #[error("certificate names several nodes of cluster {cluster_id}: {ids:?}")]
    SeveralNodeNames {
        cluster_id: String,
        ids: Vec<NodeId>,
    },
    #[error("rustls: {0}")]
    Rustls(#[from] rustls::Error),
    #[error("client verifier: {0}")]
    Verifier(String),
}

/// The cluster CA: its certificate and private key, both PEM.
#[derive(Clone)]
pub struct CaMaterial {
    pub cert_pem: String,
    pub key_pem: String,
}

/// One node's certificate (signed by the cluster CA) and private key, both PEM.
#[derive(Clone)]
pub struct NodeMaterial {
    pub cert_pem: String,
    pub key_pem: String,
}

// Private keys never reach logs through Debug.
impl fmt::Debug for CaMaterial {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CaMaterial").finish_non_exhaustive()
    }
}

impl fmt::Debug for NodeMaterial {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NodeMaterial").finish_non_exhaustive()
    }
}

/// Checks a cluster id: 1 to 63 characters of `[a-z0-9-]`, so it is one DNS label.
pub fn validate_cluster_id(cluster_id: &str) -> Result<(), TlsError> {
    let valid = (1..=63).contains(&cluster_id.len())
        && cluster_id
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    if valid {
        Ok(())
    } else {
        Err(TlsError::ClusterId(cluster_id.to_owned()))
    }
}

/// The DNS name a node's certificate carries and peers dial it by.
pub fn node_name(cluster_id: &str, node_id: NodeId) -> String {
    format!("node-{node_id}.{cluster_id}")
}

/// Reads a node id from one DNS name of the form `node-<id>.<cluster_id>`. The id must be in
/// canonical decimal form (no sign, no leading zero) so one node has exactly one name.
fn parse_node_name(name: &str, cluster_id: &str) -> Option<NodeId> {
    let name = name.to_ascii_lowercase();
    let label = name.strip_suffix(cluster_id)?.strip_suffix('.')?;
    let digits = label.strip_prefix("node-")?;
    if digits.is_empty() || digits.starts_with('0') || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse::<NodeId>().ok()
}

/// The node id a DER certificate names for `cluster_id`: exactly one distinct id among its DNS
/// subject alternative names. This only reads the name; the chain is verified by rustls.
pub fn peer_node_id(cert_der: &[u8], cluster_id: &str) -> Result<NodeId, TlsError> {
    let (_, cert) = x509_parser::parse_x509_certificate(cert_der)
        .map_err(|e| TlsError::Certificate(e.to_string()))?;
    let san = cert
        .subject_alternative_name()
        .map_err(|e| TlsError::Certificate(e.to_string()))?;
    let mut names = Vec::new();
    if let Some(san) = san {
        for name in &san.value.general_names {
            if let x509_parser::extensions::GeneralName::DNSName(dns) = name {
                names.push((*dns).to_owned());
            }
        }
    }
    let mut ids: Vec<NodeId> = names
        .iter()
        .filter_map(|name| parse_node_name(name, cluster_id))
        .collect();
    ids.sort_unstable();
    ids.dedup();
    match ids.as_slice() {
        [id] => Ok(*id),
        [] => Err(TlsError::NoNodeName {
            cluster_id: cluster_id.to_owned(),
            names,
        }),
        _ => Err(TlsError::SeveralNodeNames {
            cluster_id: cluster_id.to_owned(),
            ids,
        }),
    }
}

/// Creates a new cluster CA (ECDSA P-256) for `cluster_id`.
pub fn generate_ca(cluster_id: &str) -> Result<CaMaterial, TlsError> {
    validate_cluster_id(cluster_id)?;
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::default();
    params
        .distinguished_name
        .push(DnType::CommonName, format!("shale cluster {cluster_id} CA"));
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let cert = params.self_signed(&key)?;
    Ok(CaMaterial {
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
    })
}

/// Issues a certificate for node `node_id`, signed by `ca`. It names `node-<id>.<cluster_id>` and
/// also carries `ips` and `dns` as extra names (for operators' tools; peers use the node name).
/// It is valid for both TLS server and client authentication, since every node is both.
pub fn issue_node_cert(
    ca: &CaMaterial,
    cluster_id: &str,
    node_id: NodeId,
    ips: &[IpAddr],
    dns: &[String],
) -> Result<NodeMaterial, TlsError> {
    validate_cluster_id(cluster_id)?;
    if node_id == 0 {
        return Err(TlsError::NodeId);
    }
    let ca_key = KeyPair::from_pem(&ca.key_pem)?;
    let issuer = Issuer::from_ca_cert_pem(&ca.cert_pem, ca_key)?;
    let name = node_name(cluster_id, node_id);
    let mut params = CertificateParams::new(vec![name.clone()])?;
    for extra in dns {
        params
            .subject_alt_names
            .push(SanType::DnsName(extra.clone().try_into()?));
    }
    for ip in ips {
        params.subject_alt_names.push(SanType::IpAddress(*ip));
    }
    params.distinguished_name.push(DnType::CommonName, name);
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    params.use_authority_key_identifier_extension = true;
    let key = KeyPair::generate()?;
    let cert = params.signed_by(&key, &issuer)?;
    Ok(NodeMaterial {
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
    })
}

/// This node's TLS identity within its cluster.
#[derive(Clone)]
pub struct ClusterTls {
    pub cluster_id: String,
    pub node_id: NodeId,
    pub ca_cert_pem: String,
    pub cert_pem: String,
    pub key_pem: String,
}

impl fmt::Debug for ClusterTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClusterTls")
            .field("cluster_id", &self.cluster_id)
            .field("node_id", &self.node_id)
            .finish_non_exhaustive()
    }
}

fn read_pem(path: PathBuf) -> Result<String, TlsError> {
    std::fs::read_to_string(&path).map_err(|source| TlsError::Read { path, source })
}

impl ClusterTls {
    /// Builds the identity from PEM material, refusing a certificate that does not name
    /// `node-<node_id>.<cluster_id>`.
    pub fn new(
        cluster_id: &str,
        node_id: NodeId,
        ca_cert_pem: String,
        node: NodeMaterial,
    ) -> Result<ClusterTls, TlsError> {
        validate_cluster_id(cluster_id)?;
        if node_id == 0 {
            return Err(TlsError::NodeId);
        }
        let tls = ClusterTls {
            cluster_id: cluster_id.to_owned(),
            node_id,
            ca_cert_pem,
            cert_pem: node.cert_pem,
            key_pem: node.key_pem,
        };
        let chain = tls.cert_chain()?;
        let found = peer_node_id(&chain[0], cluster_id).ok();
        if found != Some(node_id) {
            return Err(TlsError::WrongNode {
                expected: node_id,
                found,
                cluster_id: cluster_id.to_owned(),
            });
        }
        // Parse the rest now so a bad file fails at start-up, not at the first connection.
        tls.ca_roots()?;
        tls.private_key()?;
        Ok(tls)
    }

    /// Reads `ca.pem`, `node-<id>.pem` and `node-<id>.key` from `dir`.
    pub fn load(dir: &Path, cluster_id: &str, node_id: NodeId) -> Result<ClusterTls, TlsError> {
        let ca_cert_pem = read_pem(dir.join("ca.pem"))?;
        let cert_pem = read_pem(dir.join(format!("node-{node_id}.pem")))?;
        let key_pem = read_pem(dir.join(format!("node-{node_id}.key")))?;
        ClusterTls::new(
            cluster_id,
            node_id,
            ca_cert_pem,
            NodeMaterial { cert_pem, key_pem },
        )
    }

    fn cert_chain(&self) -> Result<Vec<CertificateDer<'static>>, TlsError> {
        let chain = CertificateDer::pem_slice_iter(self.cert_pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| TlsError::Pem {
                what: "node certificate",
                reason: e.to_string(),
            })?;
        if chain.is_empty() {
            return Err(TlsError::Pem {
                what: "node certificate",
                reason: "no certificate in PEM".to_owned(),
            });
        }
        Ok(chain)
    }

    fn private_key(&self) -> Result<PrivateKeyDer<'static>, TlsError> {
        PrivateKeyDer::from_pem_slice(self.key_pem.as_bytes()).map_err(|e| TlsError::Pem {
            what: "node key",
            reason: e.to_string(),
        })
    }

    fn ca_roots(&self) -> Result<Arc<RootCertStore>, TlsError> {
        let mut roots = RootCertStore::empty();
        let mut count = 0;
        for cert in CertificateDer::pem_slice_iter(self.ca_cert_pem.as_bytes()) {
            let cert = cert.map_err(|e| TlsError::Pem {
                what: "cluster CA",
                reason: e.to_string(),
            })?;
            roots.add(cert)?;
            count += 1;
        }
        if count == 0 {
            return Err(TlsError::Pem {
                what: "cluster CA",
                reason: "no certificate in PEM".to_owned(),
            });
        }
        Ok(Arc::new(roots))
    }

    /// The TLS 1.3 server side: client certificates are mandatory, verified against the cluster
    /// CA, and must name an admitted node of this cluster.
    pub fn server_config(&self, admit: Admit) -> Result<rustls::ServerConfig, TlsError> {
        let provider = provider();
        let inner = WebPkiClientVerifier::builder_with_provider(self.ca_roots()?, provider.clone())
            .build()
            .map_err(|e| TlsError::Verifier(e.to_string()))?;
        let verifier = Arc::new(NodeClientVerifier {
            inner,
            cluster_id: self.cluster_id.clone(),
            admit,
        });
        let config = rustls::ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_client_cert_verifier(verifier)
            .with_single_cert(self.cert_chain()?, self.private_key()?)?;
        Ok(config)
    }

    /// The TLS 1.3 client side: the server is verified against the cluster CA and the name the
    /// caller dials (`node-<target>.<cluster_id>`); this node presents its own certificate.
    pub fn client_config(&self) -> Result<rustls::ClientConfig, TlsError> {
        let config = rustls::ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_root_certificates(self.ca_roots()?)
            .with_client_auth_cert(self.cert_chain()?, self.private_key()?)?;
        Ok(config)
    }
}

/// The crypto provider of every cluster TLS config, chosen here rather than taken from a
/// process-wide default that another library could install differently.
fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Verifies client certificates with webpki against the cluster CA, then requires the
/// certificate to name one admitted node of this cluster, so a refused peer fails the handshake.
struct NodeClientVerifier {
    inner: Arc<dyn ClientCertVerifier>,
    cluster_id: String,
    admit: Admit,
}

impl fmt::Debug for NodeClientVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NodeClientVerifier")
            .field("cluster_id", &self.cluster_id)
            .finish_non_exhaustive()
    }
}

impl ClientCertVerifier for NodeClientVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let verified = self
            .inner
            .verify_client_cert(end_entity, intermediates, now)?;
        let peer = match peer_node_id(end_entity, &self.cluster_id) {
            Ok(peer) => peer,
            Err(error) => {
                tracing::warn!(%error, "refusing peer certificate without a node name");
                return Err(rustls::Error::InvalidCertificate(
                    CertificateError::NotValidForName,
                ));
            }
        };
        if !(self.admit)(peer) {
            tracing::warn!(peer, "refusing peer that is not admitted");
            return Err(rustls::Error::InvalidCertificate(
                CertificateError::ApplicationVerificationFailure,
            ));
        }
        Ok(verified)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_names_parse_only_in_canonical_form() {
        // Peer identity rests on this parse: anything but one canonical name must not yield an id.
        assert_eq!(parse_node_name("node-7.prod", "prod"), Some(7));
        assert_eq!(parse_node_name("NODE-7.PROD", "prod"), Some(7));
        assert_eq!(parse_node_name("node-07.prod", "prod"), None);
        assert_eq!(parse_node_name("node-0.prod", "prod"), None);
        assert_eq!(parse_node_name("node-+7.prod", "prod"), None);
        assert_eq!(parse_node_name("node-7.prod2", "prod"), None);
        assert_eq!(parse_node_name("node-7.xprod", "prod"), None);
        assert_eq!(parse_node_name("x.node-7.prod", "prod"), None);
        assert_eq!(parse_node_name("node-.prod", "prod"), None);
        assert_eq!(
            parse_node_name("node-99999999999999999999.prod", "prod"),
            None
        );
    }

    #[test]
    fn issued_certificate_names_its_node_and_loads() {
        // The CLI path (init-ca, issue-cert) must produce material that `ClusterTls` accepts for
        // the right node and refuses for another node id or cluster.
        let ca = generate_ca("prod").unwrap();
        let node = issue_node_cert(&ca, "prod", 3, &["127.0.0.3".parse().unwrap()], &[]).unwrap();
        let tls = ClusterTls::new("prod", 3, ca.cert_pem.clone(), node.clone()).unwrap();
        assert_eq!(
            peer_node_id(&tls.cert_chain().unwrap()[0], "prod").unwrap(),
            3
        );
        assert!(tls.server_config(Arc::new(|_| true)).is_ok());
        assert!(tls.client_config().is_ok());
        assert!(matches!(
            ClusterTls::new("prod", 4, ca.cert_pem.clone(), node.clone()),
            Err(TlsError::WrongNode { found: Some(3), .. })
        ));
        assert!(matches!(
            ClusterTls::new("test", 3, ca.cert_pem, node),
            Err(TlsError::WrongNode { found: None, .. })
        ));
        assert!(generate_ca("Prod").is_err());
        assert!(issue_node_cert(&generate_ca("p").unwrap(), "p", 0, &[], &[]).is_err());
    }
}
