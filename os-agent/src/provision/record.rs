//! What provisioning did, kept on /var: one record per instance id, a
//! `current.json` naming the instance the host was provisioned as, and a
//! `last.json` for the last attempt of any kind (also no data, a source
//! that failed, an invalid document). All written atomically.

use super::apply::StepRecord;
use super::source::SourceKind;
use crate::host::Host;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

pub const RECORD_DIR: &str = "/var/lib/ballast/provision";
pub const CURRENT: &str = "current.json";
pub const LAST: &str = "last.json";

/// How an attempt ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "kebab-case")]
pub enum AttemptResult {
    /// No source had user data.
    NoUserData,
    /// A source was there but could not be read.
    SourceError {
        error: String,
    },
    /// The document was refused; nothing was changed.
    Invalid {
        error: String,
    },
    /// Being applied (a record left like this means the host stopped halfway).
    Applying,
    Applied,
    /// A step failed; the steps say what was and was not applied.
    Failed {
        error: String,
    },
    /// This instance was provisioned before; only `bootcmd` ran.
    AlreadyApplied,
}

impl fmt::Display for AttemptResult {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AttemptResult::NoUserData => write!(f, "no user data"),
            AttemptResult::SourceError { error } => write!(f, "source error: {error}"),
            AttemptResult::Invalid { error } => write!(f, "invalid: {error}"),
            AttemptResult::Applying => write!(f, "interrupted while applying"),
            AttemptResult::Applied => write!(f, "applied"),
            AttemptResult::Failed { error } => write!(f, "failed: {error}"),
            AttemptResult::AlreadyApplied => write!(f, "already applied (bootcmd only)"),
        }
    }
}

/// One attempt to provision.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attempt {
    /// RFC 3339, UTC.
    pub time: String,
    pub time_unix: u64,
    /// Where the data came from (`fw_cfg`, `nocloud /dev/sr0`, `url …`).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub source: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub instance_id: Option<String>,
    #[serde(flatten)]
    pub result: AttemptResult,
    #[serde(default)]
    pub warnings: Vec<String>,
    #[serde(default)]
    pub steps: Vec<StepRecord>,
}

impl Attempt {
    pub fn new(now: SystemTime, result: AttemptResult) -> Attempt {
        let time_unix = now
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        Attempt {
            time: rfc3339(time_unix),
            time_unix,
            source: None,
            instance_id: None,
            result,
            warnings: Vec::new(),
            steps: Vec::new(),
        }
    }

    /// Whether this instance's provisioning ran (fully, partly, or was cut
    /// short), so it must not run again.
    pub fn provisioned(&self) -> bool {
        matches!(
            self.result,
            AttemptResult::Applied | AttemptResult::Failed { .. } | AttemptResult::Applying
        )
    }
}

/// `current.json`: which instance the host was provisioned as.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Current {
    pub instance_id: String,
    /// The record's file name in [`RECORD_DIR`].
    pub record: String,
}

#[derive(thiserror::Error, Debug)]
pub enum RecordError {
    #[error("reading {}: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{} is not a valid provisioning record: {source}", path.display())]
    Parse {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("writing {}: {source}", path.display())]
    Write {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("meta-data is not valid YAML: {0}")]
    MetaData(String),
}

/// The instance id: meta-data's `instance-id` (or `instance_id`); else for
/// user data from a URL `url:` and the URL as the command line gives it;
/// else `sha256:` and the hash of the user data.
///
/// Not the hash for a URL: what a URL serves can change under it (or be
/// changed on the way over plain http), and a changed document must not
/// provision the host again. The operator makes a new instance by naming
/// another URL.
pub fn instance_id(
    source: &SourceKind,
    user_data: &[u8],
    meta_data: Option<&[u8]>,
) -> Result<String, RecordError> {
    if let Some(md) = meta_data {
        let text = String::from_utf8_lossy(md);
        let v: serde_yaml_ng::Value = {
            super::cloudconfig::check_nesting(&text, "meta-data")
                .map_err(|e| RecordError::MetaData(e.to_string()))?;
            serde_yaml_ng::from_str(&text).map_err(|e| RecordError::MetaData(e.to_string()))?
        };
        for key in ["instance-id", "instance_id"] {
            match v.get(key) {
                Some(serde_yaml_ng::Value::String(s)) if !s.trim().is_empty() => {
                    return Ok(s.trim().to_string())
                }
                Some(serde_yaml_ng::Value::Number(n)) => return Ok(n.to_string()),
                _ => {}
            }
        }
    }
    Ok(match source {
        SourceKind::KernelCmdlineUrl(url) => format!("url:{url}"),
        SourceKind::FwCfg | SourceKind::NoCloud { .. } => {
            format!("sha256:{}", hex::encode(Sha256::digest(user_data)))
        }
    })
}

/// The record's file name: a readable part (the id with anything outside
/// `[A-Za-z0-9._-]` replaced by `_`, cut at 100 characters) and the SHA-256
/// of the id itself, so that ids differing only in the replaced characters
/// (`i/1`, `i_1`) never share a file, and no id names `current.json` or
/// `last.json`. The id itself is kept inside the record.
pub fn file_name(instance_id: &str) -> String {
    let mut readable: String = instance_id.chars().take(100).map(safe_char).collect();
    if readable.starts_with('.') {
        readable.insert_str(0, "id");
    }
    let hash = hex::encode(Sha256::digest(instance_id.as_bytes()));
    format!("{readable}.{hash}.json")
}

/// The file name records had before [`file_name`] carried a hash. Still read,
/// so that an instance recorded under it is not provisioned again; the record
/// inside names its id, which tells apart the ids that shared the name.
fn legacy_file_name(instance_id: &str) -> String {
    let mut s: String = instance_id.chars().map(safe_char).take(200).collect();
    if s.is_empty() || s.starts_with('.') {
        s.insert_str(0, "id");
    }
    format!("{s}.json")
}

fn safe_char(c: char) -> char {
    if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') {
        c
    } else {
        '_'
    }
}

fn path_of(name: &str) -> PathBuf {
    Path::new(RECORD_DIR).join(name)
}

fn read_json<T: serde::de::DeserializeOwned>(
    host: &dyn Host,
    path: &Path,
) -> Result<Option<T>, RecordError> {
    let bytes = match host.read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(RecordError::Read {
                path: path.to_path_buf(),
                source,
            })
        }
    };
    serde_json::from_slice(&bytes)
        .map(Some)
        .map_err(|source| RecordError::Parse {
            path: path.to_path_buf(),
            source,
        })
}

fn write_json<T: Serialize>(host: &dyn Host, path: &Path, v: &T) -> Result<(), RecordError> {
    let mut text = serde_json::to_vec_pretty(v).map_err(|e| RecordError::Write {
        path: path.to_path_buf(),
        source: io::Error::other(e),
    })?;
    text.push(b'\n');
    host.write_atomic(path, &text)
        .map_err(|source| RecordError::Write {
            path: path.to_path_buf(),
            source,
        })
}

/// The record of an instance, if there is one for exactly this id.
pub fn load_instance(host: &dyn Host, instance_id: &str) -> Result<Option<Attempt>, RecordError> {
    for name in [file_name(instance_id), legacy_file_name(instance_id)] {
        let rec: Option<Attempt> = read_json(host, &path_of(&name))?;
        if let Some(rec) = rec.filter(|r| r.instance_id.as_deref() == Some(instance_id)) {
            return Ok(Some(rec));
        }
    }
    Ok(None)
}

/// The record of the instance the host was provisioned as, if any.
pub fn load_current(host: &dyn Host) -> Result<Option<Attempt>, RecordError> {
    match read_json::<Current>(host, &path_of(CURRENT))? {
        Some(c) => read_json(host, &path_of(&c.record)),
        None => Ok(None),
    }
}

/// Saves an attempt that has an instance id as that instance's record.
pub fn save_instance(host: &dyn Host, a: &Attempt) -> Result<(), RecordError> {
    let Some(id) = &a.instance_id else {
        return Ok(());
    };
    write_json(host, &path_of(&file_name(id)), a)
}

/// Points `current.json` at an instance's record.
pub fn set_current(host: &dyn Host, instance_id: &str) -> Result<(), RecordError> {
    let c = Current {
        instance_id: instance_id.to_string(),
        record: file_name(instance_id),
    };
    write_json(host, &path_of(CURRENT), &c)
}

pub fn save_last(host: &dyn Host, a: &Attempt) -> Result<(), RecordError> {
    write_json(host, &path_of(LAST), a)
}

/// What `osctl provision status` shows.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Status {
    /// The last attempt, whatever came of it.
    pub last: Option<Attempt>,
    /// The record of the instance the host was provisioned as.
    pub current: Option<Attempt>,
}

pub fn status(host: &dyn Host) -> Result<Status, RecordError> {
    let last = read_json(host, &path_of(LAST))?;
    let current = load_current(host)?;
    Ok(Status { last, current })
}

fn render_attempt(out: &mut String, a: &Attempt) {
    out.push_str(&format!("  time: {}\n", a.time));
    if let Some(s) = &a.source {
        out.push_str(&format!("  source: {s}\n"));
    }
    if let Some(id) = &a.instance_id {
        out.push_str(&format!("  instance: {id}\n"));
    }
    out.push_str(&format!("  result: {}\n", a.result));
    for w in &a.warnings {
        out.push_str(&format!("  warning: {w}\n"));
    }
    for s in &a.steps {
        use super::apply::StepOutcome::*;
        let (word, err) = match &s.outcome {
            Applied => ("applied", None),
            Failed { error } => ("FAILED", Some(error)),
            Skipped => ("skipped", None),
            Pending => ("pending", None),
        };
        out.push_str(&format!("  {word:>8} {}\n", s.step));
        if let Some(e) = err {
            out.push_str(&format!("           {e}\n"));
        }
    }
}

/// The human-readable form.
pub fn render(s: &Status) -> String {
    let mut out = String::new();
    match &s.last {
        None => out.push_str("Last attempt: none recorded\n"),
        Some(a) => {
            out.push_str("Last attempt:\n");
            render_attempt(&mut out, a);
        }
    }
    match &s.current {
        None => out.push_str("Provisioned instance: none\n"),
        Some(c) if s.last.as_ref() == Some(c) => {
            out.push_str("Provisioned instance: the last attempt's\n")
        }
        Some(c) => {
            out.push_str("Provisioned instance:\n");
            render_attempt(&mut out, c);
        }
    }
    out
}

/// Seconds since the epoch as `YYYY-MM-DDTHH:MM:SSZ`.
pub use ballast_common::rfc3339;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339(1_700_000_000), "2023-11-14T22:13:20Z");
    }

    #[test]
    fn instance_ids() {
        let fw = &SourceKind::FwCfg;
        assert_eq!(
            instance_id(fw, b"x", Some(b"instance-id: iid-1\n")).unwrap(),
            "iid-1"
        );
        assert_eq!(
            instance_id(fw, b"x", Some(b"instance_id: 42\n")).unwrap(),
            "42"
        );
        let h = instance_id(fw, b"x", Some(b"local-hostname: a\n")).unwrap();
        assert_eq!(h, instance_id(fw, b"x", None).unwrap());
        assert!(h.starts_with("sha256:2d711642"), "{h}");
        assert!(instance_id(fw, b"x", Some(b"a: [")).is_err());
        // From a URL: the URL, whatever it serves.
        let url = &SourceKind::KernelCmdlineUrl("https://h/u".into());
        for body in [&b"x"[..], b"y"] {
            assert_eq!(instance_id(url, body, None).unwrap(), "url:https://h/u");
        }
        assert_eq!(
            instance_id(url, b"x", Some(b"instance-id: i\n")).unwrap(),
            "i"
        );
        assert_eq!(legacy_file_name("sha256:ab/c"), "sha256_ab_c.json");
        assert_eq!(legacy_file_name(".."), "id...json");
    }

    #[test]
    fn file_names_do_not_collide() {
        let ids = ["i/1", "i_1", "i:1", "i 1", "", "..", "current", "last"];
        let names: std::collections::BTreeSet<String> =
            ids.iter().map(|id| file_name(id)).collect();
        assert_eq!(names.len(), ids.len(), "{names:?}");
        for name in &names {
            assert!(name.ends_with(".json") && name.len() < 255, "{name}");
            assert!(!name.contains('/') && !name.starts_with(".."), "{name}");
            assert!(name != CURRENT && name != LAST, "{name}");
        }
        assert_eq!(
            file_name("i/1"),
            format!("i_1.{}.json", hex::encode(Sha256::digest(b"i/1")))
        );
        // A long id stays within a file name's 255 bytes.
        assert!(file_name(&"x".repeat(10_000)).len() < 255);
    }
}
