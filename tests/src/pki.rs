//! A throw-away PKI for the test depot: one CA and one server certificate.
//!
//! Every key is ECDSA P-256, made fresh by rcgen for each [`TestPki`]. The server
//! certificate names `localhost`, `127.0.0.1` and `::1`, so a client that trusts
//! `ca.pem` can reach the depot by any of them. Nothing here is meant to be
//! secure, only real: the agent under test verifies the chain like in production.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair, KeyUsagePurpose};
use rustls::crypto::CryptoProvider;
use rustls::version::{TLS12, TLS13};
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

/// A CA and a server certificate signed by it, with `ca.pem` written to disk.
pub struct TestPki {
    /// Where `ca.pem` was written, for the agent's `depot` trust configuration.
    ca_pem_path: PathBuf,
    /// The CA certificate in PEM, as written to `ca_pem_path`.
    ca_pem: String,
    /// The CA certificate in DER, for in-process clients.
    ca_der: CertificateDer<'static>,
    /// The server certificate (`localhost`, `127.0.0.1`, `::1`) in DER.
    server_cert: CertificateDer<'static>,
    /// The server certificate's private key, PKCS#8 DER.
    server_key: Vec<u8>,
    /// The server certificate and key as PEM, for servers that read files (nginx).
    server_pem: (String, String),
}

impl TestPki {
    /// Generates a fresh CA and server certificate and writes the CA to `dir/ca.pem`.
    ///
    /// Panics if key generation or the write fails: this is test setup.
    pub fn new(dir: &Path) -> TestPki {
        let ca_key =
            KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("generate test CA key");
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        ca_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "vibstage test CA");
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let ca_cert = ca_params.self_signed(&ca_key).expect("self-sign test CA");

        let server_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
            .expect("generate test server key");
        let names = ["localhost", "127.0.0.1", "::1"].map(String::from).to_vec();
        let mut server_params = CertificateParams::new(names).expect("server params");
        server_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "localhost");
        let issuer = Issuer::new(ca_params, &ca_key);
        let server_cert = server_params
            .signed_by(&server_key, &issuer)
            .expect("sign test server certificate");

        let ca_pem_path = dir.join("ca.pem");
        let ca_pem = ca_cert.pem();
        std::fs::write(&ca_pem_path, &ca_pem)
            .unwrap_or_else(|e| panic!("write {}: {e}", ca_pem_path.display()));

        TestPki {
            ca_pem_path,
            ca_pem,
            ca_der: ca_cert.der().clone(),
            server_cert: server_cert.der().clone(),
            server_key: server_key.serialize_der(),
            server_pem: (server_cert.pem(), server_key.serialize_pem()),
        }
    }

    /// Path of the written `ca.pem`.
    pub fn ca_pem_path(&self) -> &Path {
        &self.ca_pem_path
    }

    /// Writes the server certificate (names `localhost`, `127.0.0.1`, `::1`) and its key as
    /// PEM files `server.pem` and `server.key` in `dir`; returns their paths.
    pub fn write_server_pem(&self, dir: &Path) -> (PathBuf, PathBuf) {
        let (cert, key) = (dir.join("server.pem"), dir.join("server.key"));
        std::fs::write(&cert, &self.server_pem.0).expect("write server.pem");
        std::fs::write(&key, &self.server_pem.1).expect("write server.key");
        (cert, key)
    }

    /// The CA certificate, PEM encoded.
    pub fn ca_pem(&self) -> &str {
        &self.ca_pem
    }

    /// A rustls server configuration presenting the server certificate
    /// (aws-lc-rs, TLS 1.3 and 1.2, ALPN `http/1.1`, no client authentication).
    pub fn server_config(&self) -> Arc<ServerConfig> {
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.server_key.clone()));
        let mut config = ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&TLS13, &TLS12])
            .expect("aws-lc-rs supports TLS 1.2 and 1.3")
            .with_no_client_auth()
            .with_single_cert(vec![self.server_cert.clone()], key)
            .expect("test server certificate matches its key");
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Arc::new(config)
    }

    /// A rustls client configuration that trusts only this CA, for in-process clients.
    pub fn client_config(&self) -> Arc<ClientConfig> {
        let mut roots = RootCertStore::empty();
        roots
            .add(self.ca_der.clone())
            .expect("test CA is a valid trust anchor");
        let config = ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&TLS13, &TLS12])
            .expect("aws-lc-rs supports TLS 1.2 and 1.3")
            .with_root_certificates(roots)
            .with_no_client_auth();
        Arc::new(config)
    }
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}
