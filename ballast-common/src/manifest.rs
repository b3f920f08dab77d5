//! The signed release manifest of an update channel (docs/channel.md).
//!
//! A channel file is an envelope: the manifest as JSON text, and signatures
//! over exactly those bytes. Keeping the signed bytes as text means a reader
//! never re-serialises before verifying, so field order or unknown fields can
//! never make a good signature fail or a bad one pass.

use crate::keys::{PublicKey, SecretKey};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

pub const FORMAT: &str = "ballast-manifest-v1";

/// Largest root filesystem a manifest may name, compressed or not (1 TiB):
/// far above any root partition, far below where arithmetic on it overflows.
pub const MAX_ROOT_BYTES: u64 = 1 << 40;
/// Largest UKI a manifest may name (256 MiB): a host holds it in memory and
/// writes it to the ESP.
pub const MAX_UKI_BYTES: u64 = 256 << 20;
/// Longest staged rollout (a year, as `image-build release` allows).
pub const MAX_ROLLOUT_SECS: u64 = 365 * 86_400;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Envelope {
    pub format: String,
    /// The manifest, as the JSON text that was signed.
    pub manifest: String,
    pub signatures: Vec<SignatureEntry>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct SignatureEntry {
    pub key_id: String,
    /// ed25519 over `FORMAT + "\n" + manifest`, base64.
    pub signature: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub channel: String,
    /// Image name (IMAGE_ID): a host takes releases of its own image only.
    pub name: String,
    pub version: String,
    /// Grows with every publication to the channel; a host never accepts a lower one.
    pub sequence: u64,
    pub issued_at: u64,
    pub expires_at: u64,
    pub architecture: String,
    /// dm-verity root hash of the root payload, hex.
    pub root_hash: String,
    pub verity: VerityParams,
    pub root: RootPayload,
    pub uki: Payload,
    pub rollout: Rollout,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct VerityParams {
    /// Salt of the hash tree, hex.
    pub salt: String,
    pub uuid: String,
    pub data_blocks: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct RootPayload {
    /// Relative to the channel's base URL.
    pub url: String,
    /// Compressed size in bytes.
    pub size: u64,
    /// SHA-256 of the compressed payload, hex.
    pub sha256: String,
    pub uncompressed_size: u64,
    /// Only "zstd".
    pub compression: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Payload {
    pub url: String,
    pub size: u64,
    pub sha256: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Rollout {
    /// Unix time at which the first hosts become due.
    pub start: u64,
    /// Seconds over which the rest follow; 0 makes every host due at `start`.
    pub duration_secs: u64,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ManifestError {
    #[error("channel file is not a manifest envelope: {0}")]
    Envelope(String),
    #[error("unsupported manifest format {0:?} (this host understands {FORMAT})")]
    Format(String),
    #[error("no signature by a trusted key (signed by {signed_by:?}, trusted {trusted:?})")]
    UnknownKey {
        signed_by: Vec<String>,
        trusted: Vec<String>,
    },
    #[error("signature by trusted key {0} does not verify")]
    BadSignature(String),
    #[error("manifest is not valid: {0}")]
    Invalid(String),
}

fn signed_bytes(manifest: &str) -> Vec<u8> {
    format!("{FORMAT}\n{manifest}").into_bytes()
}

/// Serialises and signs a manifest with each key.
pub fn sign(m: &Manifest, keys: &[&SecretKey]) -> Result<Envelope, ManifestError> {
    m.validate()?;
    let text =
        serde_json::to_string_pretty(m).map_err(|e| ManifestError::Invalid(e.to_string()))?;
    let msg = signed_bytes(&text);
    Ok(Envelope {
        format: FORMAT.into(),
        signatures: keys
            .iter()
            .map(|k| SignatureEntry {
                key_id: k.public().key_id(),
                signature: k.sign(&msg),
            })
            .collect(),
        manifest: text,
    })
}

/// Parses a channel file and returns its manifest if a trusted key signed it.
/// Checks only authenticity and well-formedness: whether this host should
/// take it is [`check`]'s job.
pub fn open(bytes: &[u8], trusted: &[PublicKey]) -> Result<Manifest, ManifestError> {
    let env: Envelope =
        serde_json::from_slice(bytes).map_err(|e| ManifestError::Envelope(e.to_string()))?;
    if env.format != FORMAT {
        return Err(ManifestError::Format(env.format));
    }
    let msg = signed_bytes(&env.manifest);
    let mut matched = None;
    for s in &env.signatures {
        if let Some(k) = trusted.iter().find(|k| k.key_id() == s.key_id) {
            if k.verify(&msg, &s.signature) {
                matched = Some(());
                break;
            }
            // A bad signature by a trusted key is an attack or corruption, not a
            // reason to look further.
            return Err(ManifestError::BadSignature(s.key_id.clone()));
        }
    }
    if matched.is_none() {
        return Err(ManifestError::UnknownKey {
            signed_by: env.signatures.iter().map(|s| s.key_id.clone()).collect(),
            trusted: trusted.iter().map(PublicKey::key_id).collect(),
        });
    }
    let m: Manifest =
        serde_json::from_str(&env.manifest).map_err(|e| ManifestError::Invalid(e.to_string()))?;
    m.validate()?;
    Ok(m)
}

fn is_hex(s: &str, len: usize) -> bool {
    s.len() == len
        && s.bytes()
            .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase())
}

fn relative_url_ok(u: &str) -> bool {
    !u.is_empty()
        && !u.starts_with('/')
        && !u.contains("..")
        && !u.contains("://")
        && u.bytes()
            .all(|c| c.is_ascii_alphanumeric() || b"-._/".contains(&c))
}

impl Manifest {
    pub fn validate(&self) -> Result<(), ManifestError> {
        let bad = |m: String| Err(ManifestError::Invalid(m));
        if self.version.is_empty()
            || self
                .version
                .contains(|c: char| c.is_whitespace() || c == '/' || c == '+')
        {
            return bad(format!("version {:?}", self.version));
        }
        if self.name.is_empty() || self.name.contains(|c: char| c.is_whitespace() || c == '/') {
            return bad(format!("name {:?}", self.name));
        }
        if !is_hex(&self.root_hash, 64) {
            return bad("root_hash must be 64 lowercase hex digits".into());
        }
        if !is_hex(&self.root.sha256, 64) || !is_hex(&self.uki.sha256, 64) {
            return bad("payload sha256 must be 64 lowercase hex digits".into());
        }
        if self.verity.salt.len() > 512 || hex::decode(&self.verity.salt).is_err() {
            return bad("verity.salt must be hex, at most 256 bytes".into());
        }
        if uuid::Uuid::parse_str(&self.verity.uuid).is_err() {
            return bad("verity.uuid is not a UUID".into());
        }
        // Sizes first, so that no arithmetic below (or on a host) can overflow.
        for (field, value, max) in [
            ("root.size", self.root.size, MAX_ROOT_BYTES),
            (
                "root.uncompressed_size",
                self.root.uncompressed_size,
                MAX_ROOT_BYTES,
            ),
            ("uki.size", self.uki.size, MAX_UKI_BYTES),
            (
                "verity.data_blocks",
                self.verity.data_blocks,
                MAX_ROOT_BYTES / crate::verity::BLOCK as u64,
            ),
            (
                "rollout.duration_secs",
                self.rollout.duration_secs,
                MAX_ROLLOUT_SECS,
            ),
        ] {
            if value > max {
                return bad(format!("{field} {value} is more than {max}"));
            }
        }
        let data_bytes = self
            .verity
            .data_blocks
            .checked_mul(crate::verity::BLOCK as u64);
        if data_bytes != Some(self.root.uncompressed_size) {
            return bad("verity.data_blocks does not match root.uncompressed_size".into());
        }
        if self.root.compression != "zstd" {
            return bad(format!(
                "root.compression {:?} (only zstd)",
                self.root.compression
            ));
        }
        if !relative_url_ok(&self.root.url) || !relative_url_ok(&self.uki.url) {
            return bad("payload urls must be relative paths inside the channel".into());
        }
        if self.expires_at <= self.issued_at {
            return bad("expires_at is not after issued_at".into());
        }
        if self.rollout.start > self.expires_at {
            return bad(format!(
                "rollout.start {} is after expires_at {}: no host would ever be due",
                self.rollout.start, self.expires_at
            ));
        }
        Ok(())
    }
}

/// What a host knows when it weighs a manifest.
pub struct HostFacts<'a> {
    pub now: u64,
    /// The channel the host asked for: a manifest signed for another is
    /// refused (one key may sign several channels).
    pub channel: &'a str,
    pub name: &'a str,
    pub architecture: &'a str,
    pub booted_version: &'a str,
    /// Highest sequence this host accepted before, if any.
    pub last_sequence: Option<u64>,
    /// Versions that failed on this host: never tried again.
    pub failed_versions: &'a [String],
    pub machine_id: &'a str,
}

/// Why a verified manifest is not for this host (now).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Skip {
    #[error("manifest is for channel {got:?}, this host follows {want:?}")]
    OtherChannel { got: String, want: String },
    #[error("manifest expired at {expires_at} (now {now}): the channel may be frozen")]
    Expired { expires_at: u64, now: u64 },
    #[error("sequence {got} is lower than {last}, already accepted: a rollback of the channel")]
    SequenceWentBack { got: u64, last: u64 },
    #[error("release is for image {got:?}, this host runs {want:?}")]
    OtherImage { got: String, want: String },
    #[error("release is for architecture {got}, this host is {want}")]
    WrongArchitecture { got: String, want: String },
    #[error("version {version} is not newer than the booted {booted}")]
    NotNewer { version: String, booted: String },
    #[error("version {0} failed on this host before and is never retried")]
    KnownBad(String),
    #[error("staged rollout: this host is due at {due_at} (now {now})")]
    NotDue { due_at: u64, now: u64 },
}

/// Decides whether this host should take the release now. Checks come in
/// order of severity, so the reason given is the most important one.
pub fn check(m: &Manifest, h: &HostFacts) -> Result<(), Skip> {
    // Before anything else: a manifest of another channel must not even
    // move this channel's sequence.
    if m.channel != h.channel {
        return Err(Skip::OtherChannel {
            got: m.channel.clone(),
            want: h.channel.into(),
        });
    }
    if h.now >= m.expires_at {
        return Err(Skip::Expired {
            expires_at: m.expires_at,
            now: h.now,
        });
    }
    if let Some(last) = h.last_sequence {
        if m.sequence < last {
            return Err(Skip::SequenceWentBack {
                got: m.sequence,
                last,
            });
        }
    }
    if m.name != h.name {
        return Err(Skip::OtherImage {
            got: m.name.clone(),
            want: h.name.into(),
        });
    }
    if m.architecture != h.architecture {
        return Err(Skip::WrongArchitecture {
            got: m.architecture.clone(),
            want: h.architecture.into(),
        });
    }
    if crate::version::compare(&m.version, h.booted_version) != std::cmp::Ordering::Greater {
        return Err(Skip::NotNewer {
            version: m.version.clone(),
            booted: h.booted_version.into(),
        });
    }
    if h.failed_versions.iter().any(|v| v == &m.version) {
        return Err(Skip::KnownBad(m.version.clone()));
    }
    let due = due_at(m, h.machine_id);
    if h.now < due {
        return Err(Skip::NotDue {
            due_at: due,
            now: h.now,
        });
    }
    Ok(())
}

/// This host's place in the staged rollout, in [0, 1): a stable hash of its
/// machine id and the release, so a host keeps its place on every poll and
/// gets a fresh, independent place for each release.
pub fn rollout_fraction(machine_id: &str, name: &str, version: &str) -> f64 {
    let d = Sha256::digest(format!("ballast-rollout\n{machine_id}\n{name}\n{version}").as_bytes());
    let mut b = [0u8; 8];
    b.copy_from_slice(&d[..8]);
    // 53 bits: exactly representable in an f64.
    (u64::from_be_bytes(b) >> 11) as f64 / (1u64 << 53) as f64
}

pub fn due_at(m: &Manifest, machine_id: &str) -> u64 {
    let f = rollout_fraction(machine_id, &m.name, &m.version);
    // The float-to-int cast saturates; the sum must too (an unvalidated
    // manifest must not wrap around to "due long ago").
    m.rollout
        .start
        .saturating_add((f * m.rollout.duration_secs as f64) as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    pub fn sample() -> Manifest {
        Manifest {
            channel: "stable".into(),
            name: "ballast".into(),
            version: "0.2.0".into(),
            sequence: 5,
            issued_at: 1000,
            expires_at: 1000 + 30 * 86400,
            architecture: "x86-64".into(),
            root_hash: "ab".repeat(32),
            verity: VerityParams {
                salt: "00ff".into(),
                uuid: uuid::Uuid::nil().to_string(),
                data_blocks: 10,
            },
            root: RootPayload {
                url: "payloads/sha256-aa".into(),
                size: 100,
                sha256: "aa".repeat(32),
                uncompressed_size: 40960,
                compression: "zstd".into(),
            },
            uki: Payload {
                url: "payloads/sha256-bb".into(),
                size: 10,
                sha256: "bb".repeat(32),
            },
            rollout: Rollout {
                start: 2000,
                duration_secs: 3600,
            },
        }
    }

    fn facts<'a>(failed: &'a [String]) -> HostFacts<'a> {
        HostFacts {
            now: 10_000,
            channel: "stable",
            name: "ballast",
            architecture: "x86-64",
            booted_version: "0.1.0",
            last_sequence: Some(4),
            failed_versions: failed,
            machine_id: "0123456789abcdef0123456789abcdef",
        }
    }

    #[test]
    fn signed_manifest_opens_with_a_trusted_key_only() {
        let k = SecretKey::from_seed([1; 32]);
        let other = SecretKey::from_seed([2; 32]);
        let env = sign(&sample(), &[&k]).unwrap();
        let bytes = serde_json::to_vec(&env).unwrap();
        assert_eq!(
            open(&bytes, &[other.public(), k.public()]).unwrap(),
            sample()
        );
        assert!(matches!(
            open(&bytes, &[other.public()]),
            Err(ManifestError::UnknownKey { .. })
        ));
        // Key rotation: a file signed by old and new keys opens with either.
        let both = serde_json::to_vec(&sign(&sample(), &[&k, &other]).unwrap()).unwrap();
        assert!(open(&both, &[other.public()]).is_ok());
    }

    #[test]
    fn table_of_bad_channel_files() {
        let k = SecretKey::from_seed([1; 32]);
        let trusted = [k.public()];
        let good = sign(&sample(), &[&k]).unwrap();
        let tamper = |f: &dyn Fn(&mut Envelope)| {
            let mut e = good.clone();
            f(&mut e);
            serde_json::to_vec(&e).unwrap()
        };
        let mut invalid = sample();
        invalid.root.url = "../../etc/shadow".into();
        let invalid_signed = serde_json::to_vec(&sign_unchecked(&invalid, &k)).unwrap();
        let cases: Vec<(&str, Vec<u8>, &str)> = vec![
            ("not json", b"hello".to_vec(), "not a manifest envelope"),
            (
                "truncated",
                serde_json::to_vec(&good).unwrap()[..50].to_vec(),
                "not a manifest envelope",
            ),
            (
                "format",
                tamper(&|e| e.format = "v0".into()),
                "unsupported manifest format",
            ),
            (
                "version changed",
                tamper(&|e| e.manifest = e.manifest.replace("0.2.0", "9.9.9")),
                "does not verify",
            ),
            (
                "sig garbled",
                tamper(&|e| e.signatures[0].signature = "AAAA".into()),
                "does not verify",
            ),
            (
                "unsigned",
                tamper(&|e| e.signatures.clear()),
                "no signature by a trusted key",
            ),
            (
                "unknown key",
                tamper(&|e| e.signatures[0].key_id = "00".repeat(8)),
                "no signature by a trusted key",
            ),
            (
                "extra field",
                tamper(&|e| e.manifest = e.manifest.replacen('{', "{\"x\":1,", 1)),
                "does not verify",
            ),
            ("bad url", invalid_signed, "relative paths"),
        ];
        for (name, bytes, want) in cases {
            let err = open(&bytes, &trusted).unwrap_err().to_string();
            assert!(err.contains(want), "{name}: {err:?} lacks {want:?}");
        }
    }

    /// A change to a good manifest.
    type Change = dyn Fn(&mut Manifest);

    /// Signed numbers that overflow the arithmetic done with them, or size
    /// what a host would hold in memory, are refused when the channel file is
    /// opened, with the field named: no panic, no abort.
    #[test]
    fn huge_numbers_are_refused_when_opened() {
        let k = SecretKey::from_seed([1; 32]);
        let cases: &[(&str, &Change, &str)] = &[
            (
                // 2^52+16 blocks of 4096 bytes wrap around to 65536 bytes.
                "data_blocks overflowing",
                &|m| {
                    m.verity.data_blocks = (1 << 52) + 16;
                    m.root.uncompressed_size = 65536;
                },
                "verity.data_blocks 4503599627370512 is more than",
            ),
            (
                "uncompressed root too large",
                &|m| {
                    m.verity.data_blocks = 1 << 40;
                    m.root.uncompressed_size = 1 << 52;
                },
                "root.uncompressed_size 4503599627370496 is more than",
            ),
            (
                "compressed root too large",
                &|m| m.root.size = u64::MAX,
                "root.size 18446744073709551615 is more than",
            ),
            (
                "uki too large",
                &|m| m.uki.size = 1 << 62,
                "uki.size 4611686018427387904 is more than",
            ),
            (
                "rollout after expiry",
                &|m| m.rollout.start = u64::MAX - 10,
                "rollout.start 18446744073709551605 is after expires_at",
            ),
            (
                "rollout too long",
                &|m| m.rollout.duration_secs = u64::MAX,
                "rollout.duration_secs 18446744073709551615 is more than",
            ),
        ];
        for (name, change, want) in cases {
            let mut m = sample();
            change(&mut m);
            let bytes = serde_json::to_vec(&sign_unchecked(&m, &k)).unwrap();
            let err = open(&bytes, &[k.public()]).unwrap_err().to_string();
            assert!(err.contains(want), "{name}: {err:?} lacks {want:?}");
        }
    }

    /// `due_at` of a manifest that was not validated saturates rather than
    /// wrapping to "due long ago".
    #[test]
    fn due_at_saturates() {
        let mut m = sample();
        m.rollout.start = u64::MAX - 10;
        m.rollout.duration_secs = u64::MAX;
        assert!(due_at(&m, "0123456789abcdef0123456789abcdef") >= u64::MAX - 10);
    }

    fn sign_unchecked(m: &Manifest, k: &SecretKey) -> Envelope {
        let text = serde_json::to_string(m).unwrap();
        Envelope {
            format: FORMAT.into(),
            signatures: vec![SignatureEntry {
                key_id: k.public().key_id(),
                signature: k.sign(&signed_bytes(&text)),
            }],
            manifest: text,
        }
    }

    #[test]
    fn table_of_host_decisions() {
        let failed = vec!["0.2.0".to_string()];
        let none: Vec<String> = vec![];
        let m = sample();
        assert_eq!(check(&m, &facts(&none)), Ok(()));
        let cases: Vec<(&str, Manifest, HostFacts, &str)> = vec![
            (
                // A manifest of another channel, signed by the same key,
                // served under this channel's name; its sequence is higher
                // and it has not expired: still refused.
                "channel",
                Manifest {
                    channel: "beta".into(),
                    sequence: 500,
                    ..m.clone()
                },
                facts(&none),
                "for channel \"beta\", this host follows \"stable\"",
            ),
            (
                "expired",
                m.clone(),
                HostFacts {
                    now: m.expires_at,
                    ..facts(&none)
                },
                "expired",
            ),
            (
                "sequence",
                m.clone(),
                HostFacts {
                    last_sequence: Some(6),
                    ..facts(&none)
                },
                "lower than 6",
            ),
            (
                "image",
                m.clone(),
                HostFacts {
                    name: "other",
                    ..facts(&none)
                },
                "for image",
            ),
            (
                "arch",
                Manifest {
                    architecture: "arm64".into(),
                    ..m.clone()
                },
                facts(&none),
                "architecture arm64",
            ),
            (
                "same",
                m.clone(),
                HostFacts {
                    booted_version: "0.2.0",
                    ..facts(&none)
                },
                "not newer",
            ),
            (
                "downgrade",
                m.clone(),
                HostFacts {
                    booted_version: "0.10.0",
                    ..facts(&none)
                },
                "not newer",
            ),
            ("bad", m.clone(), facts(&failed), "never retried"),
            (
                "not due",
                m.clone(),
                HostFacts {
                    now: 1500,
                    ..facts(&none)
                },
                "due at",
            ),
        ];
        for (name, m, f, want) in cases {
            let err = check(&m, &f).unwrap_err().to_string();
            assert!(err.contains(want), "{name}: {err:?} lacks {want:?}");
        }
        // Equal sequence is accepted: the same publication polled again.
        assert_eq!(
            check(
                &m,
                &HostFacts {
                    last_sequence: Some(5),
                    ..facts(&none)
                }
            ),
            Ok(())
        );
    }

    /// Due times of 10,000 machine ids spread uniformly over the rollout:
    /// each of 10 deciles holds 1,000 ± 120 hosts (about 4 standard
    /// deviations of a binomial(10000, 0.1)), and the chi-square statistic
    /// over the deciles stays below 27.9 (p = 0.001, 9 degrees of freedom).
    #[test]
    fn rollout_is_uniform_over_ten_thousand_hosts() {
        let m = sample();
        let mut buckets = [0u32; 10];
        for i in 0..10_000u32 {
            let id = hex::encode(Sha256::digest(i.to_le_bytes()))[..32].to_string();
            let due = due_at(&m, &id);
            assert!(due >= m.rollout.start && due < m.rollout.start + m.rollout.duration_secs);
            let b = ((due - m.rollout.start) * 10 / m.rollout.duration_secs) as usize;
            buckets[b] += 1;
        }
        let chi2: f64 = buckets
            .iter()
            .map(|&n| (n as f64 - 1000.0).powi(2) / 1000.0)
            .sum();
        for n in buckets {
            assert!((880..=1120).contains(&n), "{buckets:?}");
        }
        assert!(chi2 < 27.9, "chi2 {chi2} for {buckets:?}");
        // A host's place is stable, and independent across releases.
        let id = "0123456789abcdef0123456789abcdef";
        assert_eq!(
            rollout_fraction(id, "b", "1"),
            rollout_fraction(id, "b", "1")
        );
        assert_ne!(
            rollout_fraction(id, "b", "1"),
            rollout_fraction(id, "b", "2")
        );
        let zero = Manifest {
            rollout: Rollout {
                start: 7,
                duration_secs: 0,
            },
            ..m
        };
        assert_eq!(due_at(&zero, id), 7);
    }
}
