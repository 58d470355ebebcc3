//! The agent's mutual-TLS server configuration: TLS 1.3 and 1.2 with the aws-lc-rs provider, a
//! client certificate required and verified against `tls.client_ca`.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::RootCertStore;
use rustls::server::WebPkiClientVerifier;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

/// Why a TLS configuration could not be built.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A PEM file could not be read or parsed.
    #[error("failed to load {what} from {path}: {detail}")]
    Load {
        /// Which setting.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// What is wrong, in words for the operator (the message ends with it).
        detail: String,
    },
    /// rustls refused the combination.
    #[error("invalid TLS configuration: {0}")]
    Config(String),
}

/// The crypto provider used everywhere.
pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// A [`TlsError::Load`] of the file `path` holding `what`.
fn load_error<'a>(what: &'static str, path: &'a Path) -> impl Fn(String) -> TlsError + 'a {
    move |detail| TlsError::Load {
        what,
        path: path.to_owned(),
        detail,
    }
}

/// The bytes of a PEM file, bounded like every configuration file.
fn read_pem(what: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    crate::fsutil::read_config_file(path, crate::fsutil::MAX_CONFIG_FILE)
        .map_err(|e| load_error(what, path)(e.to_string()))
}

/// Loads every certificate of a PEM file.
pub fn load_certs(
    what: &'static str,
    path: &Path,
) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let load = load_error(what, path);
    let certs = CertificateDer::pem_slice_iter(&read_pem(what, path)?)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| load(e.to_string()))?;
    if certs.is_empty() {
        return Err(load("no certificate in the file".into()));
    }
    Ok(certs)
}

/// Loads a PEM private key.
pub fn load_key(what: &'static str, path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_slice(&read_pem(what, path)?)
        .map_err(|e| load_error(what, path)(e.to_string()))
}

/// The server configuration for the mTLS listener.
pub fn server_config(
    cert: &Path,
    key: &Path,
    client_ca: &Path,
) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let key_path = key;
    let chain = load_certs("tls.cert", cert)?;
    let key = load_key("tls.key", key)?;
    let mut roots = RootCertStore::empty();
    for ca in load_certs("tls.client_ca", client_ca)? {
        roots.add(ca).map_err(|e| TlsError::Load {
            what: "tls.client_ca",
            path: client_ca.to_owned(),
            detail: e.to_string(),
        })?;
    }
    let provider = provider();
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .build()
        .map_err(|e| TlsError::Config(e.to_string()))?;
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| TlsError::Config(e.to_string()))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)
        .map_err(|e| match e {
            rustls::Error::InconsistentKeys(_) => TlsError::Config(format!(
                "the private key in tls.key ({}) does not match the certificate in tls.cert \
                 ({}): {e}; give the key the certificate was issued for",
                key_path.display(),
                cert.display()
            )),
            e => TlsError::Config(format!(
                "tls.cert {} with tls.key {}: {e}",
                cert.display(),
                key_path.display()
            )),
        })?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// The names a client certificate carries: its DNS SANs, then its CN.
pub fn cert_names(cert: &CertificateDer<'_>) -> Vec<String> {
    let Ok((_, parsed)) = x509_parser::parse_x509_certificate(cert.as_ref()) else {
        return Vec::new();
    };
    let mut names = Vec::new();
    if let Ok(Some(san)) = parsed.subject_alternative_name() {
        for name in &san.value.general_names {
            if let x509_parser::extensions::GeneralName::DNSName(dns) = name {
                names.push((*dns).to_owned());
            }
        }
    }
    for cn in parsed.subject().iter_common_name() {
        if let Ok(cn) = cn.as_str() {
            names.push(cn.to_owned());
        }
    }
    names
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The one PEM loader of the workspace (the controller and the test harness use it too)
    /// names the file and what it should hold.
    #[test]
    fn loaders_name_the_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let missing = dir.path().join("nope.pem");
        let e = load_certs("client CA", &missing).expect_err("missing");
        assert!(e.to_string().contains("nope.pem"), "{e}");
        assert!(e.to_string().contains("client CA"), "{e}");
        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "").expect("write");
        let e = load_certs("server certificate", &empty).expect_err("empty");
        assert!(e.to_string().contains("no certificate"), "{e}");
        assert!(load_key("server key", &empty).is_err());
    }
}
