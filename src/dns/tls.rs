//! DNS over TLS (RFC 7858): the certificate and key, read from PEM files
//! and swapped whole on reload, so a renewed certificate is served to the
//! next connection without the listener ever closing.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use arc_swap::ArcSwap;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;

/// Why the certificate or key cannot be used.
#[derive(Debug, thiserror::Error)]
#[error("{path}: {message}", path = path.display())]
pub struct TlsError {
    path: PathBuf,
    message: String,
}

/// The certificate DoT serves, reloadable.
#[derive(Debug)]
pub struct Certificates {
    current: ArcSwap<CertifiedKey>,
    cert: PathBuf,
    key: PathBuf,
}

impl Certificates {
    /// Reads the certificate chain at `cert` and the private key at `key`.
    pub fn load(cert: &Path, key: &Path) -> Result<Self, TlsError> {
        Ok(Self {
            current: ArcSwap::from_pointee(read(cert, key)?),
            cert: cert.to_path_buf(),
            key: key.to_path_buf(),
        })
    }

    /// Reads both files again, without serving them yet.
    pub fn read_again(&self) -> Result<CertifiedKey, TlsError> {
        read(&self.cert, &self.key)
    }

    /// Serves `key` from the next handshake on.
    pub fn install(&self, key: CertifiedKey) {
        self.current.store(Arc::new(key));
    }

    /// The chain being served, leaf first.
    pub fn chain(&self) -> Vec<CertificateDer<'static>> {
        self.current.load().cert.clone()
    }
}

impl ResolvesServerCert for Certificates {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.load_full())
    }
}

fn read(cert: &Path, key: &Path) -> Result<CertifiedKey, TlsError> {
    let error = |path: &Path, message: String| TlsError {
        path: path.to_path_buf(),
        message,
    };
    let chain = CertificateDer::pem_file_iter(cert)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .map_err(|e| error(cert, format!("cannot read the certificate chain: {e}")))?;
    if chain.is_empty() {
        return Err(error(cert, "no certificate in the file".into()));
    }
    let private = PrivateKeyDer::from_pem_file(key)
        .map_err(|e| error(key, format!("cannot read the private key: {e}")))?;
    let signing = rustls::crypto::ring::sign::any_supported_type(&private)
        .map_err(|e| error(key, format!("unusable private key: {e}")))?;
    Ok(CertifiedKey::new(chain, signing))
}
