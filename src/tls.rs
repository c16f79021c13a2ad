//! TLS with rustls (ring provider): the acceptor for clients, from the PEM
//! certificate chain and key named in `[tls]`, and the connector to the
//! servers, from `[server_tls]`.

use std::sync::Arc;

use arc_swap::ArcSwap;
use rustls::DigitallySignedStruct;
use rustls::SignatureScheme;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use sha2::Digest;
use tokio_rustls::{TlsAcceptor, TlsConnector};

use crate::config::{ServerSslMode, ServerTlsConfig, TlsConfig};

/// Why the TLS configuration cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read certificate chain {path}: {reason}")]
    Cert { path: String, reason: String },
    #[error("cannot read private key {path}: {reason}")]
    Key { path: String, reason: String },
    #[error("client certificate {cert} and key {key} cannot be used together: {reason}")]
    ClientCert { cert: String, key: String, reason: String },
    #[error("certificate and key do not make a usable server configuration: {0}")]
    Config(#[from] rustls::Error),
}

/// Every certificate of a PEM file; at least one.
fn load_certs(path: &std::path::Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let problem = |reason: String| TlsError::Cert {
        path: path.display().to_string(),
        reason,
    };
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
        .and_then(|it| it.collect::<Result<_, _>>())
        .map_err(|e| problem(e.to_string()))?;
    if certs.is_empty() {
        return Err(problem("no CERTIFICATE block found".to_owned()));
    }
    Ok(certs)
}

/// The private key of a PEM file, which others may not read (as
/// PostgreSQL and libpq require of theirs).
fn load_key(path: &std::path::Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let problem = |reason: String| TlsError::Key {
        path: path.display().to_string(),
        reason,
    };
    let key = PrivateKeyDer::from_pem_file(path).map_err(|e| problem(e.to_string()))?;
    if let Ok(meta) = std::fs::metadata(path) {
        use std::os::unix::fs::MetadataExt;
        key_mode_problem(meta.uid(), meta.mode()).map_or(Ok(()), |p| Err(problem(p.to_owned())))?;
    }
    Ok(key)
}

/// libpq's rule for a private key file: one owned by root may be read by its
/// group (0640 or less, for system-wide keys shared through a group), any
/// other has no group or world access (0600 or less).
fn key_mode_problem(owner: u32, mode: u32) -> Option<&'static str> {
    let forbidden = if owner == 0 { 0o037 } else { 0o077 };
    (mode & forbidden != 0).then_some(
        "the file has group or world access; it must have permissions u=rw (0600) or less, \
         or u=rw,g=r (0640) or less if owned by root",
    )
}

/// Loads the certificate and key and builds an acceptor.
pub fn acceptor(cfg: &TlsConfig) -> Result<TlsAcceptor, TlsError> {
    let certs = load_certs(&cfg.cert)?;
    let key = load_key(&cfg.key)?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(certs, key)?;
    Ok(TlsAcceptor::from(Arc::new(config)))
}

/// TLS to the servers, per `[server_tls]`.
#[derive(Clone)]
pub struct ServerTls {
    pub mode: ServerSslMode,
    /// `None` with `sslmode = "disable"`.
    connector: Option<TlsConnector>,
    /// The authorities of `ca_file`, as read (to tell whether a reload
    /// changed what is trusted).
    authorities: Vec<CertificateDer<'static>>,
    /// SHA-256 of the client certificate chain and key presented to the
    /// servers, if any (to tell whether a reload changed them without
    /// keeping the key twice).
    identity: Option<[u8; 32]>,
    /// Which setting this is: [`ServerTlsSetting::replace`] numbers each
    /// change, and a connection opened under an older one is not reused.
    epoch: u64,
}

impl std::fmt::Debug for ServerTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerTls")
            .field("mode", &self.mode)
            .finish_non_exhaustive()
    }
}

impl ServerTls {
    /// Plain TCP to every server.
    pub fn disabled() -> ServerTls {
        ServerTls {
            mode: ServerSslMode::Disable,
            connector: None,
            authorities: Vec::new(),
            identity: None,
            epoch: 0,
        }
    }

    /// See [`ServerTlsSetting::epoch`].
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// Whether `other` connects as this does: same mode, same authorities,
    /// same client certificate.
    pub fn same_as(&self, other: &ServerTls) -> bool {
        self.mode == other.mode && self.authorities == other.authorities && self.identity == other.identity
    }

    /// The connector, unless TLS is off.
    pub fn connector(&self) -> Option<&TlsConnector> {
        self.connector.as_ref()
    }
}

/// Builds the client side of TLS to the servers. Without `ca_file`,
/// `prefer` and `require` encrypt without checking the certificate (libpq's
/// behaviour); with it, or with `verify-ca`, the chain must lead to one of
/// its authorities; `verify-full` also checks the certificate names the host.
pub fn server_connector(cfg: &ServerTlsConfig) -> Result<ServerTls, TlsError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder =
        rustls::ClientConfig::builder_with_provider(provider.clone()).with_safe_default_protocol_versions()?;
    let mut authorities = Vec::new();
    let chain = match &cfg.ca_file {
        Some(path) => {
            authorities = load_certs(path)?;
            let mut roots = rustls::RootCertStore::empty();
            roots.add_parsable_certificates(authorities.iter().cloned());
            let webpki = rustls::client::WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider.clone())
                .build()
                .map_err(|e| TlsError::Cert {
                    path: path.display().to_string(),
                    reason: e.to_string(),
                })?;
            Some(webpki)
        }
        None => None,
    };
    let verifier: Arc<dyn ServerCertVerifier> = match (chain, cfg.sslmode) {
        (Some(webpki), ServerSslMode::VerifyFull) => webpki,
        (chain, _) => Arc::new(Lenient { chain, provider }),
    };
    let builder = builder.dangerous().with_custom_certificate_verifier(verifier);
    let (config, identity) = match (&cfg.cert_file, &cfg.key_file) {
        (Some(cert), Some(key_path)) => {
            let chain = load_certs(cert)?;
            let key = load_key(key_path)?;
            let mut digest = sha2::Sha256::new();
            for c in &chain {
                digest.update(c.as_ref());
            }
            digest.update(key.secret_der());
            let identity: [u8; 32] = digest.finalize().into();
            let config = builder
                .with_client_auth_cert(chain, key)
                .map_err(|e| TlsError::ClientCert {
                    cert: cert.display().to_string(),
                    key: key_path.display().to_string(),
                    reason: e.to_string(),
                })?;
            (config, Some(identity))
        }
        _ => (builder.with_no_client_auth(), None),
    };
    if cfg.sslmode == ServerSslMode::Disable {
        // The files are checked all the same, so --check finds a bad path
        // before the mode is changed.
        return Ok(ServerTls::disabled());
    }
    Ok(ServerTls {
        mode: cfg.sslmode,
        connector: Some(TlsConnector::from(Arc::new(config))),
        authorities,
        identity,
        epoch: 0,
    })
}

/// The `[server_tls]` in force, shared by every pool: each new server
/// connection reads it, and a reload replaces it.
#[derive(Clone)]
pub struct ServerTlsSetting(Arc<SettingInner>);

struct SettingInner {
    current: ArcSwap<ServerTls>,
    /// The epoch of `current`, readable with one atomic load (every checkin
    /// compares a connection's with it).
    epoch: std::sync::atomic::AtomicU64,
}

impl ServerTlsSetting {
    /// What a new server connection uses now.
    pub fn current(&self) -> Arc<ServerTls> {
        self.0.current.load_full()
    }

    /// The epoch of the setting in force: a connection opened under an
    /// older one ([`ServerTls::epoch`]) is closed instead of reused.
    pub fn epoch(&self) -> u64 {
        self.0.epoch.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Puts `new` in force; returns whether it differs from the old one.
    /// (Reloads are serialised by the caller.)
    pub fn replace(&self, mut new: ServerTls) -> bool {
        let old = self.0.current.load_full();
        let changed = !old.same_as(&new);
        new.epoch = old.epoch + u64::from(changed);
        let epoch = new.epoch;
        self.0.current.store(Arc::new(new));
        // Published after the setting itself: from here on a connection
        // stamped with an older epoch is stale. One opened with the new
        // setting just before this store may be closed once, needlessly.
        self.0.epoch.store(epoch, std::sync::atomic::Ordering::Release);
        changed
    }
}

impl From<ServerTls> for ServerTlsSetting {
    fn from(tls: ServerTls) -> Self {
        let epoch = tls.epoch;
        ServerTlsSetting(Arc::new(SettingInner {
            current: ArcSwap::from_pointee(tls),
            epoch: std::sync::atomic::AtomicU64::new(epoch),
        }))
    }
}

impl std::fmt::Debug for ServerTlsSetting {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.current().fmt(f)
    }
}

/// The certificate check short of `verify-full`: with `ca_file`, the chain
/// must lead to one of its authorities, whatever name the certificate gives
/// (`verify-ca`, and `prefer`/`require` given a CA file); without, nothing
/// (`prefer`/`require`: encryption against passive eavesdroppers only, as in
/// libpq). The handshake's signature is always checked against the
/// certificate the server sent.
#[derive(Debug)]
struct Lenient {
    chain: Option<Arc<rustls::client::WebPkiServerVerifier>>,
    provider: Arc<rustls::crypto::CryptoProvider>,
}

impl ServerCertVerifier for Lenient {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        use rustls::CertificateError::{NotValidForName, NotValidForNameContext};
        let Some(chain) = &self.chain else {
            return Ok(ServerCertVerified::assertion());
        };
        match chain.verify_server_cert(end_entity, intermediates, server_name, ocsp, now) {
            Err(rustls::Error::InvalidCertificate(NotValidForName | NotValidForNameContext { .. })) => {
                Ok(ServerCertVerified::assertion())
            }
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider.signature_verification_algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::key_mode_problem;

    #[test]
    fn key_files_others_can_read_are_refused() {
        let user = 1000;
        assert!(key_mode_problem(user, 0o100600).is_none());
        assert!(key_mode_problem(user, 0o100400).is_none());
        assert!(key_mode_problem(user, 0o100640).is_some());
        assert!(key_mode_problem(user, 0o100604).is_some());
        // Root's file may be read by its group, not by the world.
        assert!(key_mode_problem(0, 0o100640).is_none());
        assert!(key_mode_problem(0, 0o100600).is_none());
        assert!(key_mode_problem(0, 0o100644).is_some());
        assert!(key_mode_problem(0, 0o100660).is_some());
    }
}
