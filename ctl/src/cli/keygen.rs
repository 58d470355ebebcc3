//! `vibstagectl keygen --out NAME`: a new ed25519 signing key pair for images or VIB descriptors.
//!
//! Writes `NAME.key` (PKCS#8 PEM, mode 0600) and `NAME.pub` (SPKI PEM, mode 0644) and prints the
//! key id (hex sha256 of the raw public key, as in DSSE signatures and the trust store). Neither
//! file is ever overwritten: a key may already be trusted by a fleet, and losing it is not
//! something a typo should do. The seed comes straight from the OS (`getrandom`).

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use ed25519_dalek::SigningKey;
use vibstage_protocol::dsse::{key_id, signing_key_to_pem, verifying_key_to_pem};
use vibstage_protocol::{ErrorCode, KeyId};

use super::{CliError, Context, Existing, emit, emit_json, parent_dir, with_suffix, write_file};

/// Arguments of `keygen`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Path prefix of the key pair: NAME.key and NAME.pub are written.
    #[arg(long, value_name = "NAME")]
    pub out: PathBuf,
}

/// A key pair written to disk.
#[derive(Debug, Clone)]
pub struct GeneratedKey {
    /// The key id (hex sha256 of the raw public key).
    pub key_id: KeyId,
    /// Where the private key went (`NAME.key`).
    pub private_key: PathBuf,
    /// Where the public key went (`NAME.pub`).
    pub public_key: PathBuf,
}

/// Generates a key pair and writes it next to `out`, refusing to replace either file.
pub fn generate(out: &Path) -> Result<GeneratedKey, CliError> {
    let private_key = with_suffix(out, "key");
    let public_key = with_suffix(out, "pub");
    for path in [&private_key, &public_key] {
        if path.symlink_metadata().is_ok() {
            return Err(CliError::Usage(format!(
                "{} already exists; refusing to overwrite it",
                path.display()
            )));
        }
    }
    let dir = parent_dir(&private_key);
    super::ensure_dir(dir, 0o700)?;

    let mut seed = [0u8; 32];
    getrandom::fill(&mut seed).map_err(|e| CliError::Failed {
        code: ErrorCode::Internal,
        message: format!("failed to gather randomness for a key: {e}"),
    })?;
    let key = SigningKey::from_bytes(&seed);
    seed.fill(0);
    let pem_error = |e: vibstage_protocol::dsse::KeyError| CliError::Failed {
        code: ErrorCode::Internal,
        message: format!("failed to encode the new key: {e}"),
    };
    let private_pem = signing_key_to_pem(&key).map_err(pem_error)?;
    let public_pem = verifying_key_to_pem(&key.verifying_key()).map_err(pem_error)?;

    write_file(
        &private_key,
        private_pem.as_bytes(),
        0o600,
        Existing::Refuse,
    )?;
    if let Err(e) = write_file(&public_key, public_pem.as_bytes(), 0o644, Existing::Refuse) {
        // Never leave half a pair behind: a lone private key is easy to mistake for a used one.
        let _ = fs::remove_file(&private_key);
        return Err(e);
    }
    Ok(GeneratedKey {
        key_id: key_id(&key.verifying_key()),
        private_key,
        public_key,
    })
}

/// Runs `keygen`: prints the key id (or a JSON object with the key id and both paths).
pub fn run(args: Args, ctx: &Context, out: &mut dyn Write) -> Result<(), CliError> {
    let generated = generate(&args.out)?;
    if ctx.json {
        emit_json(
            out,
            &serde_json::json!({
                "key_id": generated.key_id.to_string(),
                "private_key": generated.private_key,
                "public_key": generated.public_key,
            }),
        )
    } else {
        emit(out, generated.key_id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt as _;

    #[test]
    fn writes_a_usable_pair_and_refuses_to_overwrite() {
        let dir = tempfile::tempdir().expect("tempdir");
        let prefix = dir.path().join("keys").join("image");
        let made = generate(&prefix).expect("keygen");
        let mode = |p: &Path| fs::metadata(p).expect("stat").permissions().mode() & 0o777;
        assert_eq!(mode(&made.private_key), 0o600);
        assert_eq!(mode(&made.public_key), 0o644);

        let private = fs::read_to_string(&made.private_key).expect("read");
        let public = fs::read_to_string(&made.public_key).expect("read");
        let sk = vibstage_protocol::dsse::signing_key_from_pem(&private).expect("pkcs8");
        let pk = vibstage_protocol::dsse::verifying_key_from_pem(&public).expect("spki");
        assert_eq!(sk.verifying_key(), pk);
        assert_eq!(key_id(&pk), made.key_id);

        let again = generate(&prefix).expect_err("must refuse");
        assert_eq!(again.exit_code(), 2);
        assert_eq!(
            fs::read_to_string(&made.private_key).expect("read"),
            private
        );
    }

    #[test]
    fn two_keys_differ() {
        let dir = tempfile::tempdir().expect("tempdir");
        let a = generate(&dir.path().join("a")).expect("a");
        let b = generate(&dir.path().join("b")).expect("b");
        assert_ne!(a.key_id, b.key_id);
    }
}
