//! DSSE envelopes (the Dead Simple Signing Envelope of in-toto and sigstore) with ed25519.
//!
//! The signature covers `PAE(payloadType, payload)`, so the exact payload bytes are what is
//! signed and no JSON canonicalisation is ever needed. Payloads travel as standard, padded
//! base64; anything else is refused when the envelope is parsed.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use ed25519_dalek::{Signer as _, SigningKey, VerifyingKey};
use serde::{Deserialize, Serialize};

use crate::types::KeyId;

/// A signed document: the payload bytes, their type, and one or more signatures.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Envelope {
    /// What the payload is; part of what is signed, so a document cannot change its type.
    pub payload_type: String,
    /// The exact payload bytes (base64 on the wire).
    #[serde(with = "b64")]
    pub payload: Vec<u8>,
    /// Signatures over `PAE(payload_type, payload)`.
    pub signatures: Vec<Signature>,
}

/// One signature of an envelope.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Signature {
    /// Which key signed: hex sha256 of its raw public key.
    pub keyid: KeyId,
    /// The ed25519 signature (base64 on the wire).
    #[serde(with = "b64")]
    pub sig: Vec<u8>,
}

/// DSSE's pre-authentication encoding: `"DSSEv1" SP LEN(type) SP type SP LEN(body) SP body`.
pub fn pae(payload_type: &str, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(payload.len() + payload_type.len() + 32);
    out.extend_from_slice(b"DSSEv1 ");
    out.extend_from_slice(payload_type.len().to_string().as_bytes());
    out.push(b' ');
    out.extend_from_slice(payload_type.as_bytes());
    out.push(b' ');
    out.extend_from_slice(payload.len().to_string().as_bytes());
    out.push(b' ');
    out.extend_from_slice(payload);
    out
}

impl Envelope {
    /// Signs `payload` as `payload_type` with `key`.
    pub fn sign(payload_type: &str, payload: Vec<u8>, key: &SigningKey) -> Self {
        let mut env = Envelope {
            payload_type: payload_type.to_owned(),
            payload,
            signatures: Vec::new(),
        };
        env.add_signature(key);
        env
    }

    /// Adds a signature by `key` over the current type and payload.
    pub fn add_signature(&mut self, key: &SigningKey) {
        let sig = key.sign(&pae(&self.payload_type, &self.payload));
        self.signatures.push(Signature {
            keyid: key_id(&key.verifying_key()),
            sig: sig.to_bytes().to_vec(),
        });
    }

    /// The bytes every signature of this envelope covers: `PAE(payload_type, payload)`. Build it
    /// once per envelope and check each signature with [`signature_verifies_over`].
    pub fn pae(&self) -> Vec<u8> {
        pae(&self.payload_type, &self.payload)
    }

    /// Checks one signature of this envelope against `key`. Builds the PAE; to check several
    /// signatures, build it once with [`Envelope::pae`] and use [`signature_verifies_over`].
    pub fn signature_verifies(&self, sig: &Signature, key: &VerifyingKey) -> bool {
        signature_verifies_over(&self.pae(), sig, key)
    }
}

/// Checks `sig` by `key` over already-encoded PAE bytes (ed25519 `verify_strict`).
pub fn signature_verifies_over(pae: &[u8], sig: &Signature, key: &VerifyingKey) -> bool {
    let Ok(bytes) = <[u8; 64]>::try_from(sig.sig.as_slice()) else {
        return false;
    };
    let sig = ed25519_dalek::Signature::from_bytes(&bytes);
    key.verify_strict(pae, &sig).is_ok()
}

impl Envelope {
    /// The number of signatures an envelope may carry at most. A signer needs one; a threshold
    /// of several keys needs a few. Every signature the verifier looks at may cost a hash of
    /// the whole payload, so an envelope with more is refused before any is checked
    /// (issue 11, item 6: 11 500 signatures of one key cost 21 s of CPU per request).
    pub const MAX_SIGNATURES: usize = 16;
}

/// The key id of a public key.
pub fn key_id(key: &VerifyingKey) -> KeyId {
    KeyId::of_public_key(key.as_bytes())
}

// Key files live in `crate::keys`; re-exported here for existing callers.
pub use crate::keys::{
    KeyError, signing_key_from_pem, signing_key_to_pem, verifying_key_from_pem,
    verifying_key_to_pem,
};

mod b64 {
    use super::*;
    use serde::{Deserializer, Serializer};

    pub fn serialize<S: Serializer>(bytes: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&STANDARD.encode(bytes))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        STANDARD
            .decode(s.as_bytes())
            .map_err(|e| serde::de::Error::custom(format!("malformed base64: {e}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(seed: u8) -> SigningKey {
        SigningKey::from_bytes(&[seed; 32])
    }

    #[test]
    fn pae_matches_the_dsse_spec_example() {
        // From the DSSE protocol document.
        assert_eq!(
            pae("http://example.com/HelloWorld", b"hello world"),
            b"DSSEv1 29 http://example.com/HelloWorld 11 hello world".to_vec()
        );
    }

    #[test]
    fn sign_then_verify_and_tamper() {
        let k = key(1);
        let env = Envelope::sign("t", b"{}".to_vec(), &k);
        assert!(env.signature_verifies(&env.signatures[0], &k.verifying_key()));
        let mut bad = env.clone();
        bad.payload = b"{ }".to_vec();
        assert!(!bad.signature_verifies(&bad.signatures[0], &k.verifying_key()));
        let mut retyped = env.clone();
        retyped.payload_type = "u".into();
        assert!(!retyped.signature_verifies(&retyped.signatures[0], &k.verifying_key()));
    }

    #[test]
    fn envelope_json_round_trip_and_strict_base64() {
        let env = Envelope::sign("t", b"payload".to_vec(), &key(2));
        let json = serde_json::to_string(&env).expect("serialize");
        assert!(json.contains("\"payloadType\":\"t\""));
        let back: Envelope = serde_json::from_str(&json).expect("parse");
        assert_eq!(back, env);
        let unpadded = json.replace("cGF5bG9hZA==", "cGF5bG9hZA");
        assert!(serde_json::from_str::<Envelope>(&unpadded).is_err());
    }

    #[test]
    fn pem_round_trip() {
        let k = key(3);
        let pem = signing_key_to_pem(&k).expect("pem");
        assert_eq!(
            signing_key_from_pem(&pem).expect("parse").to_bytes(),
            k.to_bytes()
        );
        let pubpem = verifying_key_to_pem(&k.verifying_key()).expect("pem");
        assert_eq!(
            verifying_key_from_pem(&pubpem).expect("parse"),
            k.verifying_key()
        );
        assert!(verifying_key_from_pem(&pem).is_err());
    }
}
