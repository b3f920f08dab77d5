//! The `ballast:` section: the agent's own settings (update channel and
//! strategy, reboot window, group, etcd, containers), written as an agent
//! config drop-in, and systemd units applied directly.

use super::cloudconfig::check_keys;
use super::plan::{Action, FileWrite, Step, UnitVerb};
use super::yaml::{bool11, Minutes};
use serde::Deserialize;
use serde_yaml_ng::Value;
use std::path::PathBuf;

/// The agent config drop-in user data becomes.
pub const AGENT_DROPIN: &str = "/etc/ballast/agent.d/50-user-data.toml";
/// Where etcd TLS material goes; the drop-in names these files.
pub const ETCD_DIR: &str = "/etc/ballast/etcd";
pub const UNIT_DIR: &str = "/etc/systemd/system";

#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
pub struct Ballast {
    pub update: Option<Update>,
    pub group: Option<String>,
    pub etcd: Option<Etcd>,
    pub containers: Option<Vec<Value>>,
    /// `host[:port]` → settings, as `[registries."host:port"]` of the agent
    /// configuration (docs/containers.md).
    pub registries: Option<Value>,
    /// `proxy`, `no_proxy`: the agent configuration's `[http]`.
    pub http: Option<Value>,
    pub units: Option<Vec<Unit>>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
pub struct Update {
    pub channel_url: Option<String>,
    pub channel: Option<String>,
    pub interval_secs: Option<u64>,
    pub jitter_secs: Option<u64>,
    /// Checked by the agent's config code (`config::Strategy`).
    pub strategy: Option<String>,
    pub window: Option<Window>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
pub struct Window {
    pub days: Option<Vec<String>>,
    pub start: Option<String>,
    pub length: Option<Minutes>,
    pub timezone: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
pub struct Etcd {
    pub endpoints: Option<Vec<String>>,
    pub ca: Option<String>,
    pub cert: Option<String>,
    pub key: Option<String>,
    pub username: Option<String>,
    pub password: Option<String>,
    pub prefix: Option<String>,
    pub lease_ttl_secs: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Unit {
    pub name: String,
    pub content: Option<String>,
    pub dropins: Option<Vec<Dropin>>,
    #[serde(default, deserialize_with = "bool11")]
    pub enabled: Option<bool>,
    pub command: Option<UnitCommand>,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Dropin {
    pub name: String,
    pub content: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum UnitCommand {
    Start,
    Restart,
    None,
}

pub(crate) fn check_keys_of(v: &Value, warnings: &mut Vec<String>) {
    let keys = [
        "update",
        "group",
        "etcd",
        "containers",
        "registries",
        "http",
        "units",
    ];
    check_keys(v, "ballast", &keys, &[], warnings);
    if let Some(u) = v.get("update") {
        check_keys(
            u,
            "ballast.update",
            &[
                "channel_url",
                "channel",
                "interval_secs",
                "jitter_secs",
                "strategy",
                "window",
            ],
            &[],
            warnings,
        );
        if let Some(w) = u.get("window") {
            let keys = ["days", "start", "length", "timezone"];
            check_keys(w, "ballast.update.window", &keys, &[], warnings);
        }
    }
    if let Some(e) = v.get("etcd") {
        let keys = [
            "endpoints",
            "ca",
            "cert",
            "key",
            "username",
            "password",
            "prefix",
            "lease_ttl_secs",
        ];
        check_keys(e, "ballast.etcd", &keys, &[], warnings);
    }
    if let Some(Value::Sequence(units)) = v.get("units") {
        for (i, u) in units.iter().enumerate() {
            let keys = ["name", "content", "dropins", "enabled", "command"];
            check_keys(u, &format!("ballast.units[{i}]"), &keys, &[], warnings);
            if let Some(Value::Sequence(ds)) = u.get("dropins") {
                for (j, d) in ds.iter().enumerate() {
                    let p = format!("ballast.units[{i}].dropins[{j}]");
                    check_keys(d, &p, &["name", "content"], &[], warnings);
                }
            }
        }
    }
}

const UNIT_SUFFIXES: &[&str] = &[
    "service",
    "socket",
    "timer",
    "target",
    "path",
    "mount",
    "automount",
    "swap",
    "slice",
    "device",
];

/// A systemd unit name: `[A-Za-z0-9:_.\-@]`, a known type suffix, ≤ 255.
pub fn valid_unit_name(name: &str) -> bool {
    let Some((stem, suffix)) = name.rsplit_once('.') else {
        return false;
    };
    name.len() <= 255
        && !stem.is_empty()
        && UNIT_SUFFIXES.contains(&suffix)
        && stem
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, ':' | '_' | '.' | '-' | '@' | '\\'))
}

fn valid_dropin_name(name: &str) -> bool {
    name.len() <= 255
        && name.len() > ".conf".len()
        && name.ends_with(".conf")
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, ':' | '_' | '.' | '-' | '@'))
}

fn valid_url(s: &str) -> bool {
    let rest = s
        .strip_prefix("https://")
        .or_else(|| s.strip_prefix("http://"));
    matches!(rest, Some(r) if !r.is_empty() && !r.starts_with('/') && !r.contains(char::is_whitespace))
}

fn pem(s: &str) -> bool {
    s.contains("-----BEGIN ") && s.contains("-----END ")
}

/// What the `ballast:` section turns into.
pub struct Validated {
    pub steps: Vec<Step>,
}

/// Validates the section and maps it to the agent's configuration schema
/// (PEM text → files, `length` → `length_minutes`). `check_agent` runs the
/// agent's own configuration checks over the drop-in this would write, so
/// provisioning refuses what the agent would. Errors go to `errors`; the
/// steps are only meaningful when there were none.
pub fn validate(
    b: &Ballast,
    check_agent: &dyn Fn(&str) -> anyhow::Result<()>,
    errors: &mut Vec<String>,
) -> Validated {
    let mut steps = Vec::new();
    let mut agent = toml::Table::new();
    let mut secret = false;

    if let Some(g) = &b.group {
        if g.is_empty()
            || !g
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        {
            errors.push(format!(
                "ballast.group: {g:?} must be letters, digits, - _ . (it is part of etcd keys)"
            ));
        }
        agent.insert("group".into(), g.clone().into());
    }

    if let Some(u) = &b.update {
        let mut t = toml::Table::new();
        if let Some(url) = &u.channel_url {
            if !valid_url(url) {
                errors.push(format!(
                    "ballast.update.channel_url: {url:?} is not an http(s) URL"
                ));
            }
            t.insert("channel_url".into(), url.clone().into());
        }
        if let Some(c) = &u.channel {
            if valid_url(c) {
                errors.push(format!(
                    "ballast.update.channel: {c:?} is a URL; the channel's name goes here \
                     (like stable) and the URL of the channel directory in ballast.update.channel_url"
                ));
            }
            t.insert("channel".into(), c.clone().into());
        }
        for (key, v) in [
            ("interval_secs", u.interval_secs),
            ("jitter_secs", u.jitter_secs),
        ] {
            if let Some(v) = v {
                t.insert(key.into(), secs(v));
            }
        }
        if let Some(s) = &u.strategy {
            t.insert("strategy".into(), s.clone().into());
        }
        // Days, start and time zone go through as written: the agent's
        // window parser (update/window.rs) checks them in `check_agent`.
        if let Some(w) = &u.window {
            let mut wt = toml::Table::new();
            if let Some(days) = &w.days {
                let days = days.iter().map(|d| toml::Value::from(d.as_str()));
                wt.insert("days".into(), toml::Value::Array(days.collect()));
            }
            if let Some(start) = &w.start {
                wt.insert("start".into(), start.clone().into());
            }
            if let Some(Minutes(m)) = w.length {
                wt.insert("length_minutes".into(), i64::from(m).into());
            }
            if let Some(tz) = &w.timezone {
                wt.insert("timezone".into(), tz.clone().into());
            }
            t.insert("window".into(), toml::Value::Table(wt));
        }
        agent.insert("update".into(), toml::Value::Table(t));
    }

    if let Some(e) = &b.etcd {
        let mut t = toml::Table::new();
        let endpoints = e.endpoints.clone().unwrap_or_default();
        if endpoints.is_empty() {
            errors.push("ballast.etcd.endpoints: at least one endpoint is needed".to_string());
        }
        for (i, ep) in endpoints.iter().enumerate() {
            if !valid_url(ep) {
                errors.push(format!(
                    "ballast.etcd.endpoints[{i}]: {ep:?} is not an http(s) URL"
                ));
            }
        }
        t.insert(
            "endpoints".into(),
            toml::Value::Array(endpoints.into_iter().map(Into::into).collect()),
        );
        if e.cert.is_some() != e.key.is_some() {
            errors.push("ballast.etcd: cert and key go together".to_string());
        }
        for (key, val, file, mode) in [
            ("ca", &e.ca, "ca.pem", 0o644),
            ("cert", &e.cert, "cert.pem", 0o644),
            ("key", &e.key, "key.pem", 0o600),
        ] {
            let Some(pem_text) = val else { continue };
            if !pem(pem_text) {
                errors.push(format!(
                    "ballast.etcd.{key}: not a PEM block (-----BEGIN ...)"
                ));
            }
            let path = PathBuf::from(format!("{ETCD_DIR}/{file}"));
            t.insert(format!("{key}_file"), path.display().to_string().into());
            steps.push(Step::new(
                format!("ballast.etcd.{key}"),
                Action::WriteFile(FileWrite {
                    path,
                    content: pem_text.as_bytes().to_vec(),
                    mode,
                    owner: None,
                    append: false,
                }),
            ));
        }
        if e.username.is_some() != e.password.is_some() {
            errors.push("ballast.etcd: username and password go together".to_string());
        }
        if let Some(u) = &e.username {
            t.insert("username".into(), u.clone().into());
        }
        if let Some(p) = &e.password {
            secret = true;
            t.insert("password".into(), p.clone().into());
        }
        if let Some(p) = &e.prefix {
            if !p.starts_with('/') {
                errors.push(format!("ballast.etcd.prefix: {p:?} must start with /"));
            }
            t.insert("prefix".into(), p.clone().into());
        }
        if let Some(ttl) = e.lease_ttl_secs {
            t.insert("lease_ttl_secs".into(), secs(ttl));
        }
        agent.insert("etcd".into(), toml::Value::Table(t));
    }

    if let Some(r) = &b.registries {
        // Checked with the rest of the drop-in by the agent's configuration
        // code (containers/registries.rs).
        match (r, yaml_to_toml(r, "ballast.registries")) {
            (Value::Mapping(m), Ok(t)) => {
                secret |= m.values().any(|e| e.get("password").is_some());
                agent.insert("registries".into(), t);
            }
            (_, Err(why)) => errors.push(why),
            (_, Ok(_)) => errors.push(
                "ballast.registries: must be a mapping of host[:port] to settings".to_string(),
            ),
        }
    }

    if let Some(h) = &b.http {
        // Checked with the rest of the drop-in by the agent's configuration
        // code (config/http.rs).
        match (h, yaml_to_toml(h, "ballast.http")) {
            (Value::Mapping(_), Ok(t)) => {
                agent.insert("http".into(), t);
            }
            (_, Err(why)) => errors.push(why),
            (_, Ok(_)) => {
                errors.push("ballast.http: must be a mapping (proxy, no_proxy)".to_string())
            }
        }
    }

    if let Some(cs) = &b.containers {
        let mut arr = Vec::new();
        for (i, c) in cs.iter().enumerate() {
            let p = format!("ballast.containers[{i}]");
            if !matches!(c, Value::Mapping(_)) {
                errors.push(format!(
                    "{p}: must be a mapping with at least name and image"
                ));
                continue;
            }
            for req in ["name", "image"] {
                match c.get(req) {
                    Some(Value::String(s)) if !s.is_empty() => {}
                    Some(_) => errors.push(format!("{p}.{req}: must be a non-empty string")),
                    None => errors.push(format!("{p}.{req}: missing")),
                }
            }
            match yaml_to_toml(c, &p) {
                Ok(v) => {
                    // The agent's own check of the format (docs/containers.md),
                    // so a bad container fails provisioning, not a later pass.
                    match crate::containers::spec::RawContainer::deserialize(v.clone()) {
                        Ok(raw) => {
                            if let Err(es) = raw.validate(&p, i) {
                                errors.extend(es.iter().map(ToString::to_string));
                            }
                        }
                        Err(e) => errors.push(format!("{p}: {e}")),
                    }
                    arr.push(v)
                }
                Err(why) => errors.push(why),
            }
        }
        agent.insert("containers".into(), toml::Value::Array(arr));
    }

    if !agent.is_empty() {
        match toml::to_string(&agent) {
            Ok(body) => {
                let text = format!(
                    "# Written by os-agent provision from the ballast: section of user data.\n\
                     # Rewritten when a new instance is provisioned; override in a later drop-in.\n{body}"
                );
                // Only what the agent itself accepts: its own parser and
                // checks, over the host's other config files, decide.
                if errors.is_empty() {
                    if let Err(e) = check_agent(&text) {
                        errors.push(format!(
                            "ballast: the agent would refuse this configuration: {e:#}"
                        ));
                    }
                }
                steps.push(Step::new(
                    "ballast",
                    Action::WriteFile(FileWrite {
                        path: PathBuf::from(AGENT_DROPIN),
                        content: text.into_bytes(),
                        // It may hold the etcd password.
                        mode: if secret { 0o600 } else { 0o644 },
                        owner: None,
                        append: false,
                    }),
                ))
            }
            Err(e) => errors.push(format!("ballast: cannot be written as TOML: {e}")),
        }
    }

    steps.extend(unit_steps(b.units.as_deref().unwrap_or_default(), errors));
    Validated { steps }
}

fn unit_steps(units: &[Unit], errors: &mut Vec<String>) -> Vec<Step> {
    let mut files = Vec::new();
    let mut after = Vec::new();
    let mut seen = std::collections::BTreeSet::new();
    for (i, u) in units.iter().enumerate() {
        let p = format!("ballast.units[{i}]");
        if !valid_unit_name(&u.name) {
            errors.push(format!(
                "{p}.name: {:?} is not a unit name (letters, digits, : _ . - @ and a suffix such as .service)",
                u.name
            ));
            continue;
        }
        if !seen.insert(u.name.clone()) {
            errors.push(format!("{p}.name: {} is listed twice", u.name));
        }
        if let Some(c) = &u.content {
            files.push(Step::new(
                p.clone(),
                Action::WriteFile(FileWrite {
                    path: PathBuf::from(format!("{UNIT_DIR}/{}", u.name)),
                    content: c.clone().into_bytes(),
                    mode: 0o644,
                    owner: None,
                    append: false,
                }),
            ));
        }
        for (j, d) in u.dropins.iter().flatten().enumerate() {
            if !valid_dropin_name(&d.name) {
                errors.push(format!(
                    "{p}.dropins[{j}].name: {:?} is not a drop-in name (ending in .conf)",
                    d.name
                ));
                continue;
            }
            files.push(Step::new(
                format!("{p}.dropins[{j}]"),
                Action::WriteFile(FileWrite {
                    path: PathBuf::from(format!("{UNIT_DIR}/{}.d/{}", u.name, d.name)),
                    content: d.content.clone().into_bytes(),
                    mode: 0o644,
                    owner: None,
                    append: false,
                }),
            ));
        }
        let enabled = u.enabled.unwrap_or(false);
        if enabled {
            after.push(Step::new(
                p.clone(),
                Action::Systemctl {
                    verb: UnitVerb::Enable,
                    unit: u.name.clone(),
                },
            ));
        }
        // Enabling during boot does not start a unit in this boot, so an
        // enabled unit is started unless told otherwise.
        let command = u.command.unwrap_or(if enabled {
            UnitCommand::Start
        } else {
            UnitCommand::None
        });
        let verb = match command {
            UnitCommand::Start => Some(UnitVerb::Start),
            UnitCommand::Restart => Some(UnitVerb::Restart),
            UnitCommand::None => None,
        };
        if let Some(verb) = verb {
            after.push(Step::new(
                p.clone(),
                Action::Systemctl {
                    verb,
                    unit: u.name.clone(),
                },
            ));
        }
    }
    let mut steps = files;
    if !steps.is_empty() {
        steps.push(Step::new("ballast.units", Action::DaemonReload));
    }
    steps.extend(after);
    steps
}

/// A YAML value as TOML; TOML has no null.
/// Seconds as TOML has them (i64); beyond that the agent's check refuses them.
fn secs(v: u64) -> toml::Value {
    toml::Value::Integer(i64::try_from(v).unwrap_or(i64::MAX))
}

fn yaml_to_toml(v: &Value, path: &str) -> Result<toml::Value, String> {
    Ok(match v {
        Value::Null => return Err(format!("{path}: null has no TOML form; leave the key out")),
        Value::Bool(b) => toml::Value::Boolean(*b),
        Value::Number(n) => {
            if let Some(i) = n.as_i64() {
                toml::Value::Integer(i)
            } else if let Some(f) = n.as_f64() {
                toml::Value::Float(f)
            } else {
                return Err(format!("{path}: number {n} is out of range"));
            }
        }
        Value::String(s) => toml::Value::String(s.clone()),
        Value::Sequence(seq) => toml::Value::Array(
            seq.iter()
                .enumerate()
                .map(|(i, x)| yaml_to_toml(x, &format!("{path}[{i}]")))
                .collect::<Result<_, _>>()?,
        ),
        Value::Mapping(m) => {
            let mut t = toml::Table::new();
            for (k, x) in m {
                let Value::String(k) = k else {
                    return Err(format!("{path}: keys must be strings"));
                };
                t.insert(k.clone(), yaml_to_toml(x, &format!("{path}.{k}"))?);
            }
            toml::Value::Table(t)
        }
        Value::Tagged(t) => yaml_to_toml(&t.value, path)?,
    })
}
