//! The desired-state format of one container (docs/containers.md): the raw
//! form as written in TOML (files, user data) or JSON (etcd), and the
//! validated [`Container`] the rest of the agent works with.

use super::reference::Reference;
use super::volume;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Component, Path};

/// One container as written by an operator; every field but `name` and
/// `image` is optional. Unknown keys are errors: a typo in a limit must not
/// silently run a container without it.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawContainer {
    pub name: Option<String>,
    pub image: Option<String>,
    pub command: Option<Vec<String>>,
    pub args: Option<Vec<String>>,
    pub env: Option<BTreeMap<String, String>>,
    pub working_dir: Option<String>,
    pub user: Option<String>,
    pub volumes: Option<Vec<String>>,
    pub network: Option<String>,
    pub ports: Option<Vec<String>>,
    pub restart: Option<String>,
    pub memory: Option<MemoryValue>,
    pub cpus: Option<f64>,
    pub enabled: Option<bool>,
}

/// `memory` may be a byte count or a string with a K/M/G/T suffix.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(untagged)]
pub enum MemoryValue {
    Bytes(u64),
    Text(String),
}

/// A validated container.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Container {
    pub name: String,
    pub image: Reference,
    /// Replaces the image's entrypoint; `None`: the image's.
    pub command: Option<Vec<String>>,
    /// Replaces the image's cmd; `None`: the image's (unless `command` is set,
    /// then none, as docker does).
    pub args: Option<Vec<String>>,
    pub env: BTreeMap<String, String>,
    pub working_dir: Option<String>,
    pub user: Option<String>,
    pub volumes: Vec<Volume>,
    pub network: Network,
    pub restart: Restart,
    pub memory_max: Option<u64>,
    /// CPU quota in hundredths of a CPU (`cpus = 0.5` → 50, CPUQuota=50%).
    pub cpu_quota_percent: Option<u32>,
    pub enabled: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Volume {
    pub host: String,
    pub container: String,
    pub read_only: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Network {
    Host,
    Private { ports: Vec<Port> },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Port {
    pub host: u16,
    pub container: u16,
    pub udp: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Restart {
    No,
    OnFailure,
    Always,
}

impl Restart {
    /// The unit's `Restart=` value.
    pub fn as_systemd(self) -> &'static str {
        match self {
            Restart::No => "no",
            Restart::OnFailure => "on-failure",
            Restart::Always => "always",
        }
    }
}

/// A container definition that does not validate: where it came from, which
/// container and field, and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{origin}: container {container}: {field}: {message}")]
pub struct SpecError {
    pub origin: String,
    pub container: String,
    pub field: String,
    pub message: String,
}

/// A name is a machine name, a unit name part and a directory name: keep it
/// to what all three accept.
pub fn valid_name(n: &str) -> bool {
    (1..=63).contains(&n.len())
        && n.bytes()
            .all(|b| matches!(b, b'a'..=b'z' | b'0'..=b'9' | b'-'))
        && !n.starts_with('-')
        && !n.ends_with('-')
}

/// An environment variable name: letters, digits and `_`, not starting with
/// a digit (the container's `env` and an image's `Env` alike).
pub fn valid_env_name(k: &str) -> bool {
    !k.is_empty()
        && !k.as_bytes()[0].is_ascii_digit()
        && k.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

fn clean_absolute(p: &str) -> bool {
    let path = Path::new(p);
    path.is_absolute()
        && !p.contains('\0')
        && !p.contains(':')
        && path
            .components()
            .all(|c| matches!(c, Component::RootDir | Component::Normal(_)))
}

fn parse_memory(v: &MemoryValue) -> Result<u64, String> {
    let bytes = match v {
        MemoryValue::Bytes(b) => Some(*b),
        MemoryValue::Text(s) => {
            let t = s.trim();
            let (num, mult) = match t.char_indices().last() {
                Some((i, 'K' | 'k')) => (&t[..i], 1u64 << 10),
                Some((i, 'M' | 'm')) => (&t[..i], 1 << 20),
                Some((i, 'G' | 'g')) => (&t[..i], 1 << 30),
                Some((i, 'T' | 't')) => (&t[..i], 1 << 40),
                _ => (t, 1),
            };
            num.parse::<u64>().ok().and_then(|n| n.checked_mul(mult))
        }
    };
    match bytes {
        Some(b) if b >= 1 << 20 => Ok(b),
        Some(b) => Err(format!("{b} bytes is less than the 1M minimum")),
        None => Err(format!(
            "{v:?} is not a size (bytes, or a number with K, M, G or T)"
        )),
    }
}

/// One `HOST:CONTAINER[:ro|rw]` volume of container `name`; the host side
/// must be the container's own data directory (volume.rs).
fn parse_volume(name: &str, s: &str) -> Result<Volume, String> {
    let parts: Vec<&str> = s.split(':').collect();
    let (host, container, read_only) = match parts.as_slice() {
        [h, c] => (*h, *c, false),
        [h, c, "ro"] => (*h, *c, true),
        [h, c, "rw"] => (*h, *c, false),
        _ => return Err(format!("{s:?} is not HOST:CONTAINER[:ro|rw]")),
    };
    let host = volume::check_host_path(name, host).map_err(|e| format!("{s:?}: {e}"))?;
    // nspawn reads `\.` in --bind= as `.`.
    if !clean_absolute(container) || container == "/" || container.contains('\\') {
        return Err(format!(
            "{s:?}: container path {container:?} must be a clean absolute path other than /"
        ));
    }
    Ok(Volume {
        host,
        container: container.to_string(),
        read_only,
    })
}

fn parse_port(s: &str) -> Result<Port, String> {
    let (ports, udp) = match s.rsplit_once('/') {
        Some((p, "tcp")) => (p, false),
        Some((p, "udp")) => (p, true),
        Some(_) => return Err(format!("{s:?}: protocol must be tcp or udp")),
        None => (s, false),
    };
    let parse = |p: &str| match p.parse::<u16>() {
        Ok(n) if n > 0 => Ok(n),
        _ => Err(format!("{s:?}: {p:?} is not a port number (1-65535)")),
    };
    let (host, container) = match ports.split_once(':') {
        Some((h, c)) => (parse(h)?, parse(c)?),
        None => {
            let p = parse(ports)?;
            (p, p)
        }
    };
    Ok(Port {
        host,
        container,
        udp,
    })
}

impl RawContainer {
    /// Validates one container. `origin` names where it was written (a file,
    /// "user data", an etcd key) and `index` its place there, for errors.
    pub fn validate(&self, origin: &str, index: usize) -> Result<Container, Vec<SpecError>> {
        let label = match &self.name {
            Some(n) => n.clone(),
            None => format!("#{index}"),
        };
        let mut errors = Vec::new();
        let mut err = |field: &str, message: String| {
            errors.push(SpecError {
                origin: origin.to_string(),
                container: label.clone(),
                field: field.to_string(),
                message,
            })
        };
        let name = match &self.name {
            Some(n) if valid_name(n) => n.clone(),
            Some(n) => {
                err(
                    "name",
                    format!("{n:?} must be 1-63 of a-z 0-9 - (not at the ends)"),
                );
                String::new()
            }
            None => {
                err("name", "missing".into());
                String::new()
            }
        };
        let image = match self.image.as_deref().map(Reference::parse) {
            Some(Ok(r)) => Some(r),
            Some(Err(e)) => {
                err("image", e);
                None
            }
            None => {
                err("image", "missing".into());
                None
            }
        };
        for (field, list) in [("command", &self.command), ("args", &self.args)] {
            if let Some(l) = list {
                if l.iter().any(|a| a.contains('\0')) {
                    err(field, "contains a NUL byte".into());
                }
            }
        }
        if matches!(&self.command, Some(c) if c.is_empty()) {
            err(
                "command",
                "is empty; leave it out to use the image's entrypoint".into(),
            );
        }
        for (k, v) in self.env.iter().flatten() {
            if !valid_env_name(k) {
                err(
                    "env",
                    format!("{k:?} is not a variable name (letters, digits, _)"),
                );
            }
            if v.contains('\0') {
                err("env", format!("{k}: value contains a NUL byte"));
            }
        }
        if let Some(w) = &self.working_dir {
            if !clean_absolute(w) {
                err("working_dir", format!("{w:?} is not a clean absolute path"));
            }
        }
        if let Some(u) = &self.user {
            let ok = !u.is_empty()
                && u.len() <= 32
                && u.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'))
                && !u.starts_with('-');
            if !ok {
                err("user", format!("{u:?} is not a user name or uid"));
            }
        }
        let mut volumes = Vec::new();
        for (i, v) in self.volumes.iter().flatten().enumerate() {
            match parse_volume(&label, v) {
                Ok(v) => volumes.push(v),
                Err(e) => err(&format!("volumes[{i}]"), e),
            }
        }
        let mut ports = Vec::new();
        for (i, p) in self.ports.iter().flatten().enumerate() {
            match parse_port(p) {
                Ok(p) => ports.push(p),
                Err(e) => err(&format!("ports[{i}]"), e),
            }
        }
        // A network of its own unless the host's is asked for: a container
        // on the host's network can reach every service listening there.
        let network = match self.network.as_deref() {
            None | Some("private") => Network::Private { ports },
            Some("host") if ports.is_empty() => Network::Host,
            Some("host") => {
                err(
                    "ports",
                    "published ports need network = \"private\"; with the host's network the container's ports are the host's".into(),
                );
                Network::Host
            }
            Some(other) => {
                err("network", format!("{other:?} is not host or private"));
                Network::Host
            }
        };
        let restart = match self.restart.as_deref() {
            None | Some("always") => Restart::Always,
            Some("on-failure") => Restart::OnFailure,
            Some("no") => Restart::No,
            Some(other) => {
                err(
                    "restart",
                    format!("{other:?} is not no, on-failure or always"),
                );
                Restart::Always
            }
        };
        let memory_max = match &self.memory {
            Some(m) => match parse_memory(m) {
                Ok(b) => Some(b),
                Err(e) => {
                    err("memory", e);
                    None
                }
            },
            None => None,
        };
        let cpu_quota_percent = match self.cpus {
            Some(c) if (0.01..=1024.0).contains(&c) => Some((c * 100.0).round() as u32),
            Some(c) => {
                err("cpus", format!("{c} is not between 0.01 and 1024"));
                None
            }
            None => None,
        };
        match (errors.is_empty(), image) {
            (true, Some(image)) => Ok(Container {
                name,
                image,
                command: self.command.clone(),
                args: self.args.clone(),
                env: self.env.clone().unwrap_or_default(),
                working_dir: self.working_dir.clone(),
                user: self.user.clone(),
                volumes,
                network,
                restart,
                memory_max,
                cpu_quota_percent,
                enabled: self.enabled.unwrap_or(true),
            }),
            _ => Err(errors),
        }
    }
}

#[cfg(test)]
mod tests;
