//! ed25519 keys that sign update channels. Files are one line:
//! `ballast-ed25519-public <base64 of 32 bytes>` or
//! `ballast-ed25519-secret <base64 of the 32-byte seed>`.
//! A key id is the first 8 bytes of the SHA-256 of the public key, in hex.

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use ed25519_dalek::{Signature, Signer, SigningKey, Verifier, VerifyingKey};
use sha2::{Digest, Sha256};
use std::io::Read;

const PUBLIC: &str = "ballast-ed25519-public";
const SECRET: &str = "ballast-ed25519-secret";

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum KeyError {
    #[error("not a Ballast {0} key: the line must start with `{1} `")]
    WrongKind(&'static str, &'static str),
    #[error("key is not valid base64: {0}")]
    Base64(String),
    #[error("key must be 32 bytes, got {0}")]
    Length(usize),
    #[error("not a valid ed25519 public key")]
    Invalid,
    #[error("cannot read random bytes: {0}")]
    Random(String),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PublicKey(VerifyingKey);

pub struct SecretKey(SigningKey);

fn decode32(text: &str, prefix: &'static str, kind: &'static str) -> Result<[u8; 32], KeyError> {
    let rest = text
        .trim()
        .strip_prefix(prefix)
        .and_then(|r| r.strip_prefix(' '))
        .ok_or(KeyError::WrongKind(kind, prefix))?;
    let bytes = B64
        .decode(rest.trim())
        .map_err(|e| KeyError::Base64(e.to_string()))?;
    bytes
        .as_slice()
        .try_into()
        .map_err(|_| KeyError::Length(bytes.len()))
}

impl PublicKey {
    pub fn parse(text: &str) -> Result<PublicKey, KeyError> {
        let b = decode32(text, PUBLIC, "public")?;
        VerifyingKey::from_bytes(&b)
            .map(PublicKey)
            .map_err(|_| KeyError::Invalid)
    }

    pub fn to_text(&self) -> String {
        format!("{PUBLIC} {}\n", B64.encode(self.0.as_bytes()))
    }

    pub fn key_id(&self) -> String {
        hex::encode(&Sha256::digest(self.0.as_bytes())[..8])
    }

    /// Checks `sig` (base64) over `message`.
    pub fn verify(&self, message: &[u8], sig_b64: &str) -> bool {
        let Ok(bytes) = B64.decode(sig_b64) else {
            return false;
        };
        let Ok(sig) = Signature::from_slice(&bytes) else {
            return false;
        };
        self.0.verify(message, &sig).is_ok()
    }
}

impl SecretKey {
    /// A new key from the kernel's random number generator.
    pub fn generate() -> Result<SecretKey, KeyError> {
        let mut seed = [0u8; 32];
        std::fs::File::open("/dev/urandom")
            .and_then(|mut f| f.read_exact(&mut seed))
            .map_err(|e| KeyError::Random(e.to_string()))?;
        Ok(SecretKey(SigningKey::from_bytes(&seed)))
    }

    pub fn from_seed(seed: [u8; 32]) -> SecretKey {
        SecretKey(SigningKey::from_bytes(&seed))
    }

    pub fn parse(text: &str) -> Result<SecretKey, KeyError> {
        Ok(SecretKey::from_seed(decode32(text, SECRET, "secret")?))
    }

    pub fn to_text(&self) -> String {
        format!("{SECRET} {}\n", B64.encode(self.0.to_bytes()))
    }

    pub fn public(&self) -> PublicKey {
        PublicKey(self.0.verifying_key())
    }

    /// Signs `message`; the signature in base64.
    pub fn sign(&self, message: &[u8]) -> String {
        B64.encode(self.0.sign(message).to_bytes())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_sign_and_verify() {
        let k = SecretKey::generate().unwrap();
        let k2 = SecretKey::parse(&k.to_text()).unwrap();
        let p = PublicKey::parse(&k2.public().to_text()).unwrap();
        assert_eq!(p, k.public());
        assert_eq!(p.key_id().len(), 16);
        let sig = k.sign(b"hello");
        assert!(p.verify(b"hello", &sig));
        assert!(!p.verify(b"hellO", &sig));
        assert!(!p.verify(b"hello", "not base64!"));
        assert!(!SecretKey::generate()
            .unwrap()
            .public()
            .verify(b"hello", &sig));
    }

    #[test]
    fn bad_key_files() {
        let k = SecretKey::from_seed([7; 32]);
        assert_eq!(
            PublicKey::parse(&k.to_text()).unwrap_err(),
            KeyError::WrongKind("public", PUBLIC)
        );
        assert!(matches!(
            PublicKey::parse("ballast-ed25519-public %%%"),
            Err(KeyError::Base64(_))
        ));
        assert_eq!(
            PublicKey::parse("ballast-ed25519-public AAAA").unwrap_err(),
            KeyError::Length(3)
        );
    }
}
