//! The agent's configuration: TOML files with drop-ins (see [`files`]) →
//! one partial config per file → merged → one validated [`Settings`].
//!
//! A later file overrides the keys it sets; lists are replaced, not appended,
//! so a drop-in can also empty a list. Unknown keys are warnings that name
//! the key and the file, so a newer config does not break an older agent.

pub mod files;
pub mod fleet;
pub mod http;
pub mod update;

pub use update::{Strategy, UpdateSettings};

use self::fleet::{self as fleet_config, FleetSettings};
use crate::containers::registries::{self, RegistrySettings};
use std::collections::BTreeMap;

use crate::host::Host;
use anyhow::{bail, Context, Result};
use serde::Deserialize;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// How long `health-check` waits for the daemon's status file by default.
pub const DEFAULT_STATUS_TIMEOUT: Duration = Duration::from_secs(60);
const MAX_STATUS_TIMEOUT_SECS: u64 = 3600;

/// The validated configuration the agent runs with.
#[derive(Debug, Clone, PartialEq)]
pub struct Settings {
    pub health: HealthSettings,
    pub update: UpdateSettings,
    /// `None`: no etcd endpoints, the host is not part of a fleet.
    pub fleet: Option<FleetSettings>,
    /// Registries by `host[:port]`; each entry comes whole from the last
    /// file that has it (docs/containers.md).
    pub registries: BTreeMap<String, RegistrySettings>,
    /// The `containers` list of the last file that sets it, as written: the
    /// containers code checks it as one layer of the desired state
    /// (containers/desired.rs), so a bad container fails that layer and not
    /// the agent's whole configuration.
    pub containers: Option<ConfiguredContainers>,
    pub http: http::HttpSettings,
}

/// A `containers` list and the file it came from.
#[derive(Debug, Clone, PartialEq)]
pub struct ConfiguredContainers {
    pub file: PathBuf,
    pub value: toml::Value,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthSettings {
    /// Units that must be active.
    pub required_units: Vec<String>,
    /// Shell commands (`/bin/sh -c`) that must exit 0.
    pub commands: Vec<String>,
    /// If this file exists the health check fails (a test knob).
    pub fail_marker: Option<PathBuf>,
    /// How long to wait for the daemon's status file.
    pub status_timeout: Duration,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            health: HealthSettings {
                required_units: Vec::new(),
                commands: Vec::new(),
                fail_marker: None,
                status_timeout: DEFAULT_STATUS_TIMEOUT,
            },
            update: UpdateSettings::default(),
            fleet: None,
            registries: BTreeMap::new(),
            containers: None,
            http: http::HttpSettings::default(),
        }
    }
}

/// One file's worth of settings; `None` means "not set here".
#[derive(Debug, Default, Deserialize)]
struct Partial {
    #[serde(default)]
    health: PartialHealth,
    #[serde(default)]
    update: update::PartialUpdate,
    /// The host's fleet group (top level: provisioning writes it there).
    group: Option<String>,
    #[serde(default)]
    etcd: fleet_config::PartialFleet,
    #[serde(default)]
    http: http::PartialHttp,
    /// Checked by [`registries::parse`] when the file is read.
    #[serde(default, skip)]
    registries: BTreeMap<String, RegistrySettings>,
    #[serde(default, skip)]
    containers: Option<toml::Value>,
}

#[derive(Debug, Default, Deserialize)]
struct PartialHealth {
    required_units: Option<Vec<String>>,
    commands: Option<Vec<String>>,
    fail_marker: Option<PathBuf>,
    status_timeout_secs: Option<u64>,
}

/// Every key the agent understands, as dotted paths.
const KNOWN_KEYS: &[&str] = &[
    // The containers list is handed on whole and checked by
    // containers/desired.rs; registries by containers/registries.rs, called
    // from here.
    "containers",
    "registries",
    "health",
    "health.required_units",
    "health.commands",
    "health.fail_marker",
    "health.status_timeout_secs",
];

/// A key in a config file the agent does not know.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnknownKey {
    pub file: PathBuf,
    pub key: String,
}

impl std::fmt::Display for UnknownKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}: unknown key {:?} ignored",
            self.file.display(),
            self.key
        )
    }
}

/// The settings and the warnings found on the way.
#[derive(Debug)]
pub struct Loaded {
    pub settings: Settings,
    pub files: Vec<PathBuf>,
    pub unknown_keys: Vec<UnknownKey>,
}

fn unknown_keys(table: &toml::Table, prefix: &str, file: &Path, out: &mut Vec<UnknownKey>) {
    for (k, v) in table {
        let key = if prefix.is_empty() {
            k.clone()
        } else {
            format!("{prefix}.{k}")
        };
        if !KNOWN_KEYS.contains(&key.as_str())
            && !update::KNOWN_KEYS.contains(&key.as_str())
            && !fleet_config::KNOWN_KEYS.contains(&key.as_str())
            && !http::KNOWN_KEYS.contains(&key.as_str())
        {
            out.push(UnknownKey {
                file: file.to_path_buf(),
                key,
            });
            continue;
        }
        if let toml::Value::Table(t) = v {
            if !OWN_CHECKS.contains(&key.as_str()) {
                unknown_keys(t, &key, file, out);
            }
        }
    }
}

/// Sections whose keys are names (registries) and whose parser rejects
/// unknown keys itself.
const OWN_CHECKS: &[&str] = &["registries"];

/// Parses one file; errors name the file (and toml's message the line).
fn parse_file(path: &Path, text: &str, unknown: &mut Vec<UnknownKey>) -> Result<Partial> {
    let mut table: toml::Table =
        toml::from_str(text).with_context(|| format!("invalid TOML in {}", path.display()))?;
    unknown_keys(&table, "", path, unknown);
    let registries = match table.remove("registries") {
        Some(v) => registries::parse(v, &path.display().to_string())?,
        None => BTreeMap::new(),
    };
    let containers = table.remove("containers");
    let mut partial = Partial::deserialize(table)
        .with_context(|| format!("invalid settings in {}", path.display()))?;
    partial.registries = registries;
    partial.containers = containers;
    Ok(partial)
}

fn merge(into: &mut PartialHealth, from: PartialHealth) {
    let PartialHealth {
        required_units,
        commands,
        fail_marker,
        status_timeout_secs,
    } = from;
    if required_units.is_some() {
        into.required_units = required_units;
    }
    if commands.is_some() {
        into.commands = commands;
    }
    if fail_marker.is_some() {
        into.fail_marker = fail_marker;
    }
    if status_timeout_secs.is_some() {
        into.status_timeout_secs = status_timeout_secs;
    }
}

fn validate(
    merged: PartialHealth,
    update: update::PartialUpdate,
    fleet: fleet_config::PartialFleet,
    registries: BTreeMap<String, RegistrySettings>,
) -> Result<Settings> {
    let mut s = Settings {
        update: update::validate(update)?,
        fleet: fleet_config::validate(fleet)?,
        registries,
        ..Settings::default()
    };
    if let Some(units) = merged.required_units {
        for u in &units {
            if u.is_empty() || u.chars().any(|c| c.is_whitespace() || c == '/') || !u.contains('.')
            {
                bail!("health.required_units: {u:?} is not a unit name (like \"ssh.service\")");
            }
        }
        s.health.required_units = units;
    }
    if let Some(commands) = merged.commands {
        if commands.iter().any(|c| c.trim().is_empty()) {
            bail!("health.commands: a command is empty");
        }
        s.health.commands = commands;
    }
    if let Some(marker) = merged.fail_marker {
        if !marker.is_absolute() {
            bail!(
                "health.fail_marker: {} is not an absolute path",
                marker.display()
            );
        }
        s.health.fail_marker = Some(marker);
    }
    if let Some(secs) = merged.status_timeout_secs {
        if secs > MAX_STATUS_TIMEOUT_SECS {
            bail!("health.status_timeout_secs: {secs} is more than {MAX_STATUS_TIMEOUT_SECS}");
        }
        s.health.status_timeout = Duration::from_secs(secs);
    }
    Ok(s)
}

/// Loads, merges and validates the configuration of `host`.
pub fn load(host: &dyn Host) -> Result<Loaded> {
    load_files(host, files::config_files(host)?, None)
}

/// The configuration `host` would run with once `text` is written to the
/// drop-in `path`: the same parsing, merging and checks as [`load`], before
/// anything is written (provisioning's `ballast:` section goes through here).
pub fn load_with(host: &dyn Host, path: &Path, text: &str) -> Result<Loaded> {
    let files = files::config_files_with(host, Some(path))?;
    load_files(host, files, Some((path, text)))
}

fn load_files(
    host: &dyn Host,
    files: Vec<PathBuf>,
    pending: Option<(&Path, &str)>,
) -> Result<Loaded> {
    let mut merged = PartialHealth::default();
    let mut merged_update = update::PartialUpdate::default();
    let mut merged_fleet = fleet_config::PartialFleet::default();
    let mut merged_http = http::PartialHttp::default();
    let mut merged_registries = BTreeMap::new();
    let mut containers = None;
    let mut unknown = Vec::new();
    for path in &files {
        let text = match pending {
            Some((p, text)) if p == path.as_path() => text.to_string(),
            _ => host
                .read_to_string(path)
                .with_context(|| format!("cannot read {}", path.display()))?,
        };
        let partial = parse_file(path, &text, &mut unknown)?;
        merged_registries.extend(partial.registries);
        if let Some(value) = partial.containers {
            containers = Some(ConfiguredContainers {
                file: path.clone(),
                value,
            });
        }
        merge(&mut merged, partial.health);
        update::merge(&mut merged_update, partial.update);
        http::merge(&mut merged_http, partial.http);
        let mut fleet = partial.etcd;
        fleet.group = partial.group;
        fleet_config::merge(&mut merged_fleet, fleet, path);
    }
    let mut settings = validate(merged, merged_update, merged_fleet, merged_registries)
        .and_then(|mut s| {
            s.http = http::validate(merged_http)?;
            s.update.http = s.http.clone();
            Ok(s)
        })
        .with_context(|| {
            let names: Vec<String> = files.iter().map(|f| f.display().to_string()).collect();
            format!("invalid agent configuration (from {})", names.join(", "))
        })?;
    settings.containers = containers;
    Ok(Loaded {
        settings,
        files,
        unknown_keys: unknown,
    })
}

/// Loads the configuration and logs a warning per unknown key, once per
/// process: the daemon reads the config on every tick, and the same warning
/// each time would bury everything else in the journal.
pub fn load_and_warn(host: &dyn Host) -> Result<Settings> {
    static WARNED: std::sync::Mutex<std::collections::BTreeSet<String>> =
        std::sync::Mutex::new(std::collections::BTreeSet::new());
    let loaded = load(host)?;
    let mut warned = WARNED
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    for u in &loaded.unknown_keys {
        if warned.insert(u.to_string()) {
            tracing::warn!("{u}");
        }
    }
    Ok(loaded.settings)
}

#[cfg(test)]
mod tests;
