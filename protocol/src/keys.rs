//! ed25519 key files (SPEC §2): PKCS#8 PEM private keys, SPKI PEM public keys.
//!
//! Private keys are written as PKCS#8 v1 (RFC 5208, the secret alone: what
//! `openssl genpkey -algorithm ed25519` writes and what OpenSSL 3.0 and Python `cryptography`
//! read); v1 and v2 (RFC 5958, with the public key, checked against the secret) are both read.
//! A file must hold exactly one PEM block: a second key in a trust key file is refused by name
//! rather than misread as one long block. A weak (small-order) public key, which would accept
//! forged signatures for many messages, is refused when it is read.

use ed25519_dalek::pkcs8::spki::der::pem::LineEnding;
use ed25519_dalek::pkcs8::{
    DecodePrivateKey, DecodePublicKey, EncodePrivateKey, EncodePublicKey, KeypairBytes,
};
use ed25519_dalek::{SigningKey, VerifyingKey};

/// Why a key file could not be used.
#[derive(Debug, thiserror::Error)]
#[error("not an ed25519 {kind} key in PEM ({detail})")]
pub struct KeyError {
    kind: &'static str,
    detail: String,
}

const PRIVATE: &str = "private (PKCS#8)";
const PUBLIC: &str = "public (SPKI)";

/// Refuses text that does not hold exactly one PEM block.
fn one_block(kind: &'static str, pem: &str) -> Result<(), KeyError> {
    let blocks = pem
        .lines()
        .filter(|l| l.trim_start().starts_with("-----BEGIN "))
        .count();
    match blocks {
        1 => Ok(()),
        0 => Err(KeyError {
            kind,
            detail: "the file holds no PEM block (no \"-----BEGIN\" line)".into(),
        }),
        n => Err(KeyError {
            kind,
            detail: format!("the file holds {n} PEM blocks; it must hold exactly one key"),
        }),
    }
}

/// Parses a PKCS#8 PEM private key (v1 or v2).
pub fn signing_key_from_pem(pem: &str) -> Result<SigningKey, KeyError> {
    one_block(PRIVATE, pem)?;
    SigningKey::from_pkcs8_pem(pem).map_err(|e| KeyError {
        kind: PRIVATE,
        detail: e.to_string(),
    })
}

/// Parses an SPKI PEM public key; refuses a weak (small-order) key.
pub fn verifying_key_from_pem(pem: &str) -> Result<VerifyingKey, KeyError> {
    one_block(PUBLIC, pem)?;
    let key = VerifyingKey::from_public_key_pem(pem).map_err(|e| KeyError {
        kind: PUBLIC,
        detail: e.to_string(),
    })?;
    if key.is_weak() {
        return Err(KeyError {
            kind: PUBLIC,
            detail: "a weak (small-order) key, which would accept forged signatures".into(),
        });
    }
    Ok(key)
}

/// PKCS#8 v1 PEM text of a private key (the secret alone, as OpenSSL writes it).
pub fn signing_key_to_pem(key: &SigningKey) -> Result<String, KeyError> {
    KeypairBytes {
        secret_key: key.to_bytes(),
        public_key: None,
    }
    .to_pkcs8_pem(LineEnding::LF)
    .map(|s| s.to_string())
    .map_err(|e| KeyError {
        kind: PRIVATE,
        detail: e.to_string(),
    })
}

/// SPKI PEM text of a public key.
pub fn verifying_key_to_pem(key: &VerifyingKey) -> Result<String, KeyError> {
    key.to_public_key_pem(LineEnding::LF).map_err(|e| KeyError {
        kind: PUBLIC,
        detail: e.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(seed: u8) -> SigningKey {
        SigningKey::from_bytes(&[seed; 32])
    }

    #[test]
    fn private_keys_are_written_as_pkcs8_v1_and_both_versions_are_read() {
        let k = key(7);
        let pem = signing_key_to_pem(&k).expect("pem");
        let der = ed25519_dalek::pkcs8::SecretDocument::from_pkcs8_pem(&pem).expect("pem");
        let bytes = der.as_bytes();
        // SEQUENCE { INTEGER 0 (v1), AlgorithmIdentifier, OCTET STRING }: 48 bytes, no [1] public key.
        assert_eq!(bytes.len(), 48, "{bytes:02x?}");
        assert_eq!(&bytes[2..5], &[0x02, 0x01, 0x00], "version must be v1 (0)");
        assert_eq!(
            signing_key_from_pem(&pem).expect("v1").to_bytes(),
            k.to_bytes()
        );

        let v2 = k.to_pkcs8_pem(LineEnding::LF).expect("v2 pem").to_string();
        assert_ne!(v2, pem);
        assert_eq!(
            signing_key_from_pem(&v2).expect("v2").to_bytes(),
            k.to_bytes()
        );
    }

    #[test]
    fn a_weak_public_key_is_refused() {
        // The identity point (small order): y = 1.
        let mut identity = [0u8; 32];
        identity[0] = 1;
        let weak = VerifyingKey::from_bytes(&identity).expect("decodes");
        assert!(weak.is_weak());
        let pem = weak.to_public_key_pem(LineEnding::LF).expect("pem");
        let e = verifying_key_from_pem(&pem).expect_err("weak key accepted");
        assert!(e.to_string().contains("weak"), "{e}");
    }

    #[test]
    fn a_file_with_two_keys_says_so() {
        let a = verifying_key_to_pem(&key(1).verifying_key()).expect("a");
        let b = verifying_key_to_pem(&key(2).verifying_key()).expect("b");
        let e = verifying_key_from_pem(&format!("{a}{b}")).expect_err("two keys accepted");
        assert!(e.to_string().contains("2 PEM blocks"), "{e}");
        assert!(!e.to_string().contains("Base64"), "{e}");
        let sa = signing_key_to_pem(&key(1)).expect("sa");
        let sb = signing_key_to_pem(&key(2)).expect("sb");
        let e = signing_key_from_pem(&format!("{sa}{sb}")).expect_err("two keys accepted");
        assert!(e.to_string().contains("2 PEM blocks"), "{e}");
        let e = verifying_key_from_pem("").expect_err("empty accepted");
        assert!(e.to_string().contains("no PEM block"), "{e}");
    }
}
