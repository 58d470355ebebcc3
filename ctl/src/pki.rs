//! Development X.509 material for mutual TLS (SPEC §3 `certs init`, §5 client certificates), and
//! loading PEM certificates and keys for the TLS listeners and clients.
//!
//! A [`DevCa`] is a self-signed ECDSA P-256 CA whose subject is a single common name
//! ("vibstage development CA" and a random suffix, unique per CA so that two development CAs are
//! never confused by a name-based chain builder). It issues server certificates ([`issue_server`]: the host's name
//! plus `localhost`, `127.0.0.1` and `::1`) and controller client certificates ([`issue_client`]:
//! CN and DNS SAN = the operator name that `tls.operators` lists). Every issued certificate gets a
//! fresh key. A CA written by `certs init` can be loaded back with [`DevCa::from_pem`] to issue
//! more certificates; only CAs of this shape are accepted, so that issued certificates really
//! chain to the `ca.pem` on disk.

use std::net::IpAddr;

use rcgen::{
    BasicConstraints, CertificateParams, DnType, DnValue, ExtendedKeyUsagePurpose, IsCa, Issuer,
    KeyPair, KeyUsagePurpose,
};
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject as _;
use time::{Duration, OffsetDateTime};

/// Common-name prefix of development CAs.
pub const CA_NAME_PREFIX: &str = "vibstage development CA";

/// How long `certs init` certificates live, backdating included (SPEC §3): 397 days, the
/// longest lifetime browsers and Apple's TLS stack accept for a server certificate.
pub const DEFAULT_VALIDITY_DAYS: u32 = 397;

/// How far before "now" a certificate starts, for clock skew between controller and hosts.
const BACKDATE: Duration = Duration::hours(1);

/// Why certificate material could not be made or loaded.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PkiError {
    /// rcgen refused to build a certificate or key.
    #[error("failed to generate {what}: {source}")]
    Generate {
        /// What was being generated ("CA certificate", "server certificate for esx1", …).
        what: String,
        /// rcgen's reason.
        #[source]
        source: rcgen::Error,
    },
    /// A CA certificate/key pair is not one this module can issue from.
    #[error("cannot issue from this CA: {0}")]
    UnusableCa(String),
}

/// A validity period.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Validity {
    /// First instant the certificate is valid.
    pub not_before: OffsetDateTime,
    /// Last instant the certificate is valid.
    pub not_after: OffsetDateTime,
}

impl Validity {
    /// The `certs init` period: [`DEFAULT_VALIDITY_DAYS`] from an hour before `now`.
    pub fn standard(now: OffsetDateTime) -> Self {
        Self::lasting(now, DEFAULT_VALIDITY_DAYS)
    }

    /// `days` days in all, starting an hour before `now` (clock skew between controller and
    /// hosts): the backdate counts against the lifetime, it does not extend it.
    pub fn lasting(now: OffsetDateTime, days: u32) -> Self {
        let not_before = now - BACKDATE;
        Self {
            not_before,
            not_after: not_before + Duration::days(i64::from(days)),
        }
    }
}

/// A certificate and its private key, both PEM.
#[derive(Clone, Debug)]
pub struct IssuedCert {
    /// The certificate (`CERTIFICATE` PEM).
    pub cert_pem: String,
    /// Its private key (PKCS#8 `PRIVATE KEY` PEM).
    pub key_pem: String,
}

/// A development certificate authority that can issue server and client certificates.
pub struct DevCa {
    issuer: Issuer<'static, KeyPair>,
    cert_pem: String,
    name: String,
}

impl std::fmt::Debug for DevCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DevCa").field("name", &self.name).finish()
    }
}

fn generate_error(what: impl Into<String>) -> impl FnOnce(rcgen::Error) -> PkiError {
    let what = what.into();
    move |source| PkiError::Generate { what, source }
}

/// The CA's parameters. Everything an [`Issuer`] copies into issued certificates (subject, key
/// identifier method) is a function of the name alone, so a loaded CA issues exactly what a fresh
/// one would.
fn ca_params(name: &str, validity: Validity) -> CertificateParams {
    let mut params = CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    params
        .distinguished_name
        .push(DnType::CommonName, DnValue::Utf8String(name.to_owned()));
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params.not_before = validity.not_before;
    params.not_after = validity.not_after;
    params
}

impl DevCa {
    /// A new CA with a fresh key and a unique name.
    pub fn generate(validity: Validity) -> Result<Self, PkiError> {
        let mut suffix = [0u8; 4];
        getrandom::fill(&mut suffix)
            .map_err(|e| PkiError::UnusableCa(format!("no randomness for the CA name: {e}")))?;
        let name = format!("{CA_NAME_PREFIX} {}", hex::encode(suffix));
        let key = KeyPair::generate().map_err(generate_error("CA key"))?;
        let params = ca_params(&name, validity);
        let cert = params
            .self_signed(&key)
            .map_err(generate_error("CA certificate"))?;
        Ok(Self {
            cert_pem: cert.pem(),
            issuer: Issuer::new(params, key),
            name,
        })
    }

    /// Loads a CA written by [`DevCa::generate`] (`ca.pem`, `ca.key`). Refuses a certificate
    /// that is not a CA, whose subject is not a single UTF-8 common name, or whose key does not
    /// match.
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Self, PkiError> {
        let unusable = |m: &str| PkiError::UnusableCa(m.to_owned());
        let der = CertificateDer::from_pem_slice(cert_pem.as_bytes())
            .map_err(|e| PkiError::UnusableCa(format!("certificate PEM: {e}")))?;
        let (_, cert) = x509_parser::parse_x509_certificate(&der)
            .map_err(|e| PkiError::UnusableCa(format!("certificate: {e}")))?;
        if !cert.is_ca() {
            return Err(unusable("the certificate is not a CA"));
        }
        let key = KeyPair::from_pem(key_pem)
            .map_err(|e| PkiError::UnusableCa(format!("private key: {e}")))?;
        if key.public_key_raw() != &*cert.public_key().subject_public_key.data {
            return Err(unusable(
                "the private key does not belong to the certificate",
            ));
        }
        let subject = cert.subject();
        let mut names = subject.iter_common_name();
        let name = match (
            names.next(),
            names.next(),
            subject.iter_attributes().count(),
        ) {
            (Some(cn), None, 1) => cn
                .as_str()
                .map_err(|_| unusable("the subject common name is not text"))?
                .to_owned(),
            _ => return Err(unusable("the subject is not a single common name")),
        };
        let validity = Validity {
            not_before: cert.validity().not_before.to_datetime(),
            not_after: cert.validity().not_after.to_datetime(),
        };
        let params = ca_params(&name, validity);
        // Issued certificates name their issuer by these bytes; make sure they are the same as
        // the loaded certificate's subject before issuing anything that would not chain.
        let probe = params
            .self_signed(&key)
            .map_err(generate_error("CA probe certificate"))?;
        let (_, probe) = x509_parser::parse_x509_certificate(probe.der())
            .map_err(|e| PkiError::UnusableCa(format!("probe certificate: {e}")))?;
        if probe.subject().as_raw() != subject.as_raw() {
            return Err(unusable(
                "the subject is not encoded as vibstagectl encodes it",
            ));
        }
        Ok(Self {
            cert_pem: cert_pem.to_owned(),
            issuer: Issuer::new(params, key),
            name,
        })
    }

    /// The CA certificate, PEM (`ca.pem`).
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// The CA private key, PKCS#8 PEM (`ca.key`).
    pub fn key_pem(&self) -> String {
        self.issuer.key().serialize_pem()
    }

    /// The CA's common name.
    pub fn name(&self) -> &str {
        &self.name
    }

    fn issue(
        &self,
        what: String,
        sans: Vec<String>,
        common_name: &str,
        eku: ExtendedKeyUsagePurpose,
        validity: Validity,
    ) -> Result<IssuedCert, PkiError> {
        let mut params = CertificateParams::new(sans).map_err(generate_error(what.clone()))?;
        params.distinguished_name = rcgen::DistinguishedName::new();
        params
            .distinguished_name
            .push(DnType::CommonName, common_name);
        params.use_authority_key_identifier_extension = true;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![eku];
        params.not_before = validity.not_before;
        params.not_after = validity.not_after;
        let key = KeyPair::generate().map_err(generate_error(format!("key for {what}")))?;
        let cert = params
            .signed_by(&key, &self.issuer)
            .map_err(generate_error(what))?;
        Ok(IssuedCert {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }
}

/// The subject alternative names of a server certificate for `host`: the host itself (an IP
/// address SAN if it parses as one, a DNS name otherwise), then `localhost`, `127.0.0.1` and
/// `::1`, without duplicates.
pub fn server_sans(host: &str) -> Vec<String> {
    let mut sans: Vec<String> = vec![host.to_owned()];
    for extra in ["localhost", "127.0.0.1", "::1"] {
        let same = match (host.parse::<IpAddr>(), extra.parse::<IpAddr>()) {
            (Ok(a), Ok(b)) => a == b,
            _ => host.eq_ignore_ascii_case(extra),
        };
        if !same {
            sans.push(extra.to_owned());
        }
    }
    sans
}

/// A server certificate (EKU serverAuth) for `host`, CN = `host`, SANs from [`server_sans`].
pub fn issue_server(
    ca: &DevCa,
    host: &str,
    not_before: OffsetDateTime,
    not_after: OffsetDateTime,
) -> Result<IssuedCert, PkiError> {
    ca.issue(
        format!("server certificate for {host}"),
        server_sans(host),
        host,
        ExtendedKeyUsagePurpose::ServerAuth,
        Validity {
            not_before,
            not_after,
        },
    )
}

/// A controller client certificate (EKU clientAuth) with CN and DNS SAN `name`: the name that
/// an agent's `tls.operators` allow-list matches. Any validity range is accepted, so tests can
/// make expired or not-yet-valid certificates.
pub fn issue_client(
    ca: &DevCa,
    name: &str,
    not_before: OffsetDateTime,
    not_after: OffsetDateTime,
) -> Result<IssuedCert, PkiError> {
    ca.issue(
        format!("client certificate for {name}"),
        vec![name.to_owned()],
        name,
        ExtendedKeyUsagePurpose::ClientAuth,
        Validity {
            not_before,
            not_after,
        },
    )
}

/// The subject common name of the first certificate in `pem`, if it has one.
pub fn common_name(pem: &str) -> Option<String> {
    let der = CertificateDer::from_pem_slice(pem.as_bytes()).ok()?;
    let (_, cert) = x509_parser::parse_x509_certificate(&der).ok()?;
    let cn = cert.subject().iter_common_name().next()?;
    cn.as_str().ok().map(str::to_owned)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(pem: &str) -> Vec<u8> {
        CertificateDer::from_pem_slice(pem.as_bytes())
            .expect("pem")
            .to_vec()
    }

    #[test]
    fn issued_certificates_chain_to_the_ca() {
        let now = OffsetDateTime::now_utc();
        let ca = DevCa::generate(Validity::standard(now)).expect("ca");
        assert!(ca.name().starts_with(CA_NAME_PREFIX));
        let server = issue_server(&ca, "esx1", now, now + Duration::days(1)).expect("server");
        let ca_der = parse(ca.cert_pem());
        let (_, ca_cert) = x509_parser::parse_x509_certificate(&ca_der).expect("ca x509");
        let server_der = parse(&server.cert_pem);
        let (_, cert) = x509_parser::parse_x509_certificate(&server_der).expect("x509");
        assert_eq!(cert.issuer().as_raw(), ca_cert.subject().as_raw());
        assert!(!cert.is_ca());
        let sans = cert
            .subject_alternative_name()
            .expect("ext")
            .expect("san")
            .value
            .general_names
            .iter()
            .map(|n| n.to_string())
            .collect::<Vec<_>>();
        assert_eq!(sans.len(), 4, "{sans:?}");
    }

    #[test]
    fn a_loaded_ca_issues_certificates_that_chain() {
        let now = OffsetDateTime::now_utc();
        let ca = DevCa::generate(Validity::standard(now)).expect("ca");
        let loaded = DevCa::from_pem(ca.cert_pem(), &ca.key_pem()).expect("load");
        assert_eq!(loaded.name(), ca.name());
        let client = issue_client(
            &loaded,
            "reader",
            now - Duration::days(2),
            now - Duration::days(1),
        )
        .expect("client");
        let ca_der = parse(ca.cert_pem());
        let (_, ca_cert) = x509_parser::parse_x509_certificate(&ca_der).expect("ca x509");
        let der = parse(&client.cert_pem);
        let (_, cert) = x509_parser::parse_x509_certificate(&der).expect("x509");
        assert_eq!(cert.issuer().as_raw(), ca_cert.subject().as_raw());
        assert!(!cert.validity().is_valid());

        let other = DevCa::generate(Validity::standard(now)).expect("other");
        assert!(DevCa::from_pem(ca.cert_pem(), &other.key_pem()).is_err());
        assert!(DevCa::from_pem(&client.cert_pem, &client.key_pem).is_err());
    }

    #[test]
    fn standard_validity_is_at_most_397_days_backdate_included() {
        let now = OffsetDateTime::now_utc();
        let v = Validity::standard(now);
        assert!(v.not_after - v.not_before <= Duration::days(397));
        assert!(v.not_before < now);
        assert!(v.not_after > now + Duration::days(396));
    }

    #[test]
    fn server_sans_do_not_repeat_loopback_names() {
        assert_eq!(
            server_sans("esx1"),
            ["esx1", "localhost", "127.0.0.1", "::1"]
        );
        assert_eq!(server_sans("127.0.0.1"), ["127.0.0.1", "localhost", "::1"]);
        assert_eq!(server_sans("0:0::1"), ["0:0::1", "localhost", "127.0.0.1"]);
    }
}
