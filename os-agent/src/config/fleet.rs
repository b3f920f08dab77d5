//! The fleet's part of the agent config: the `[etcd]` section (where etcd
//! is, how to authenticate, key prefix, lease TTLs) and the top-level `group`,
//! the layout provisioning writes from user data. No endpoints, no fleet: the
//! host updates on its own (docs/etcd.md).

use anyhow::{bail, Context, Result};
use serde::Deserialize;
use std::path::{Path, PathBuf};
use std::time::Duration;

pub const DEFAULT_PREFIX: &str = "/ballast";
pub const DEFAULT_GROUP: &str = "default";
pub const DEFAULT_LEASE_TTL: Duration = Duration::from_secs(60);
pub const DEFAULT_LOCK_TTL: Duration = Duration::from_secs(3600);
/// etcd refuses leases shorter than its minimum TTL (about 2 s by default).
pub const MIN_LEASE_TTL_SECS: u64 = 2;
pub const MAX_LEASE_TTL_SECS: u64 = 24 * 3600;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tls {
    /// The CA that signed etcd's server certificate; `None`: the system roots.
    pub ca_file: Option<PathBuf>,
    /// Client certificate and key, both or neither.
    pub client: Option<(PathBuf, PathBuf)>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FleetSettings {
    /// `http://` or `https://` URLs of etcd's client endpoints.
    pub endpoints: Vec<String>,
    /// Set when an endpoint is https or a CA / client certificate is given.
    pub tls: Option<Tls>,
    /// etcd user and password (etcd's own auth), both or neither.
    pub user: Option<(String, String)>,
    /// Every key the fleet uses starts with this ("/ballast").
    pub prefix: String,
    pub group: String,
    /// TTL of the registration lease: a dead host disappears within it.
    pub lease_ttl: Duration,
    /// TTL of a reboot lock holder: a host that never comes back frees its
    /// slot after this long.
    pub lock_ttl: Duration,
}

impl FleetSettings {
    /// Settings for etcd at `endpoints` with every other value at its default.
    pub fn new(endpoints: Vec<String>) -> FleetSettings {
        FleetSettings {
            endpoints,
            tls: None,
            user: None,
            prefix: DEFAULT_PREFIX.into(),
            group: DEFAULT_GROUP.into(),
            lease_ttl: DEFAULT_LEASE_TTL,
            lock_ttl: DEFAULT_LOCK_TTL,
        }
    }
}

#[derive(Debug, Default, Deserialize)]
pub(crate) struct PartialFleet {
    endpoints: Option<Vec<String>>,
    ca_file: Option<PathBuf>,
    cert_file: Option<PathBuf>,
    key_file: Option<PathBuf>,
    username: Option<String>,
    password: Option<String>,
    prefix: Option<String>,
    /// The top-level `group` key, moved in by the config loader.
    #[serde(skip)]
    pub(crate) group: Option<String>,
    lease_ttl_secs: Option<u64>,
    lock_ttl_secs: Option<u64>,
    /// The files that set the keys whose errors must name them.
    #[serde(skip)]
    origin: Origin,
}

/// Which file set a key (the last one, as merging goes).
#[derive(Debug, Default)]
struct Origin {
    endpoints: Option<PathBuf>,
    username: Option<PathBuf>,
    password: Option<PathBuf>,
}

impl Origin {
    /// `etcd.<key> (in <file>)`, or just `etcd.<key>` when no file is known.
    fn name(key: &str, file: &Option<PathBuf>) -> String {
        match file {
            Some(f) => format!("etcd.{key} (in {})", f.display()),
            None => format!("etcd.{key}"),
        }
    }
}

pub(crate) const KNOWN_KEYS: &[&str] = &[
    "group",
    "etcd",
    "etcd.endpoints",
    "etcd.ca_file",
    "etcd.cert_file",
    "etcd.key_file",
    "etcd.username",
    "etcd.password",
    "etcd.prefix",
    "etcd.lease_ttl_secs",
    "etcd.lock_ttl_secs",
];

fn set<T>(into: &mut Option<T>, from: Option<T>) {
    if from.is_some() {
        *into = from;
    }
}

/// Merges `from`, read from `file`, over `into`.
pub(crate) fn merge(into: &mut PartialFleet, from: PartialFleet, file: &Path) {
    let from_file = |set: bool| set.then(|| file.to_path_buf());
    set(
        &mut into.origin.endpoints,
        from_file(from.endpoints.is_some()),
    );
    set(
        &mut into.origin.username,
        from_file(from.username.is_some()),
    );
    set(
        &mut into.origin.password,
        from_file(from.password.is_some()),
    );
    set(&mut into.endpoints, from.endpoints);
    set(&mut into.ca_file, from.ca_file);
    set(&mut into.cert_file, from.cert_file);
    set(&mut into.key_file, from.key_file);
    set(&mut into.username, from.username);
    set(&mut into.password, from.password);
    set(&mut into.prefix, from.prefix);
    set(&mut into.group, from.group);
    set(&mut into.lease_ttl_secs, from.lease_ttl_secs);
    set(&mut into.lock_ttl_secs, from.lock_ttl_secs);
}

/// Group names become key segments: no '/', nothing odd.
pub fn check_group(g: &str) -> Result<()> {
    if g.is_empty()
        || g.len() > 64
        || g.starts_with('.')
        || !g
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
    {
        bail!("{g:?} is not a group name (1-64 letters, digits, '-', '_', '.')");
    }
    Ok(())
}

fn absolute(key: &str, p: Option<PathBuf>) -> Result<Option<PathBuf>> {
    match p {
        Some(p) if !p.is_absolute() => bail!("{key}: {} is not an absolute path", p.display()),
        other => Ok(other),
    }
}

/// `None` when no endpoints are configured (an empty list turns the fleet off).
pub(crate) fn validate(p: PartialFleet) -> Result<Option<FleetSettings>> {
    let endpoints = p.endpoints.unwrap_or_default();
    if endpoints.is_empty() {
        return Ok(None);
    }
    let mut s = FleetSettings::new(Vec::new());
    let mut https = false;
    let mut http = false;
    for e in endpoints {
        let e = e.trim_end_matches('/').to_string();
        let rest = if let Some(r) = e.strip_prefix("https://") {
            https = true;
            r
        } else if let Some(r) = e.strip_prefix("http://") {
            http = true;
            r
        } else {
            bail!("etcd.endpoints: {e:?} is not an http:// or https:// URL");
        };
        if rest.is_empty() || rest.contains('/') {
            bail!("etcd.endpoints: {e:?} must be scheme://host:port, without a path");
        }
        s.endpoints.push(e);
    }
    // A client fails over between endpoints: one plain http endpoint among
    // https ones would carry, now and then, what TLS was set up to protect.
    if http && https {
        bail!(
            "{}: {:?} mixes http:// and https:// endpoints; use https:// for all",
            Origin::name("endpoints", &p.origin.endpoints),
            s.endpoints
        );
    }
    let ca_file = absolute("etcd.ca_file", p.ca_file)?;
    let cert_file = absolute("etcd.cert_file", p.cert_file)?;
    let key_file = absolute("etcd.key_file", p.key_file)?;
    let client = match (cert_file, key_file) {
        (Some(c), Some(k)) => Some((c, k)),
        (None, None) => None,
        (Some(_), None) => bail!("etcd.cert_file is set but etcd.key_file is not"),
        (None, Some(_)) => bail!("etcd.key_file is set but etcd.cert_file is not"),
    };
    if (ca_file.is_some() || client.is_some()) && !https {
        bail!("etcd: a CA or client certificate is set but no endpoint is https://");
    }
    if https {
        s.tls = Some(Tls { ca_file, client });
    }
    s.user = match (p.username, p.password) {
        (Some(u), Some(pw)) if !u.is_empty() => Some((u, pw)),
        (None, None) => None,
        (Some(u), Some(_)) if u.is_empty() => bail!("etcd.username is empty"),
        _ => bail!("etcd.username and etcd.password go together"),
    };
    if s.user.is_some() && !https {
        bail!(
            "{} and {} are set but {} are plain http://: the password (and the fleet's \
             state) would cross the network in clear text; use https:// endpoints",
            Origin::name("username", &p.origin.username),
            Origin::name("password", &p.origin.password),
            Origin::name("endpoints", &p.origin.endpoints),
        );
    }
    if let Some(prefix) = p.prefix {
        let prefix = prefix.trim_end_matches('/').to_string();
        if !prefix.starts_with('/') || prefix.contains("//") || prefix.len() < 2 {
            bail!("etcd.prefix: {prefix:?} is not a key prefix like \"/ballast\"");
        }
        s.prefix = prefix;
    }
    if let Some(g) = p.group {
        check_group(&g).context("group")?;
        s.group = g;
    }
    let ttl = |key: &str, v: u64| -> Result<Duration> {
        if !(MIN_LEASE_TTL_SECS..=MAX_LEASE_TTL_SECS).contains(&v) {
            bail!("{key}: {v} is not between {MIN_LEASE_TTL_SECS} and {MAX_LEASE_TTL_SECS}");
        }
        Ok(Duration::from_secs(v))
    };
    if let Some(v) = p.lease_ttl_secs {
        s.lease_ttl = ttl("etcd.lease_ttl_secs", v)?;
    }
    if let Some(v) = p.lock_ttl_secs {
        s.lock_ttl = ttl("etcd.lock_ttl_secs", v)?;
    }
    if s.lock_ttl < s.lease_ttl {
        bail!(
            "etcd.lock_ttl_secs ({}) is shorter than etcd.lease_ttl_secs ({}): \
             the lock must outlive a reboot",
            s.lock_ttl.as_secs(),
            s.lease_ttl.as_secs()
        );
    }
    Ok(Some(s))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Option<FleetSettings>> {
        #[derive(Deserialize)]
        struct Doc {
            group: Option<String>,
            etcd: PartialFleet,
        }
        let mut d: Doc = toml::from_str(text)?;
        d.etcd.group = d.group;
        validate(d.etcd)
    }

    #[test]
    fn no_endpoints_no_fleet() {
        assert_eq!(parse("group = \"web\"\n[etcd]").unwrap(), None);
        assert_eq!(parse("[etcd]\nendpoints = []").unwrap(), None);
    }

    #[test]
    fn full_settings() {
        let s = parse(
            r#"group = "web-eu"
[etcd]
endpoints = ["https://10.0.0.1:2379/", "https://10.0.0.2:2379"]
ca_file = "/etc/ballast/etcd/ca.pem"
cert_file = "/etc/ballast/etcd/host.pem"
key_file = "/etc/ballast/etcd/host.key"
username = "agent"
password = "secret"
prefix = "/prod/"
lease_ttl_secs = 30
lock_ttl_secs = 1800
"#,
        )
        .unwrap()
        .unwrap();
        assert_eq!(
            s.endpoints,
            ["https://10.0.0.1:2379", "https://10.0.0.2:2379"]
        );
        let tls = s.tls.unwrap();
        assert_eq!(
            tls.ca_file.unwrap(),
            PathBuf::from("/etc/ballast/etcd/ca.pem")
        );
        assert!(tls.client.is_some());
        assert_eq!(s.user, Some(("agent".into(), "secret".into())));
        assert_eq!(s.prefix, "/prod");
        assert_eq!(s.group, "web-eu");
        assert_eq!(s.lease_ttl, Duration::from_secs(30));
        assert_eq!(s.lock_ttl, Duration::from_secs(1800));
    }

    #[test]
    fn bad_settings_name_the_key() {
        let cases = [
            ("endpoints = [\"10.0.0.1:2379\"]", "etcd.endpoints"),
            ("endpoints = [\"http://h:1/x\"]", "without a path"),
            (
                "endpoints = [\"https://h:1\"]\ncert_file = \"/c\"",
                "etcd.key_file is not",
            ),
            (
                "endpoints = [\"http://h:1\"]\nca_file = \"/ca\"",
                "no endpoint is https",
            ),
            (
                "endpoints = [\"https://h:1\"]\nca_file = \"ca.pem\"",
                "etcd.ca_file",
            ),
            (
                "endpoints = [\"http://h:1\"]\nusername = \"u\"",
                "go together",
            ),
            (
                "endpoints = [\"http://h:1\"]\nusername = \"u\"\npassword = \"p\"",
                "etcd.username and etcd.password are set but etcd.endpoints are plain http://",
            ),
            (
                "endpoints = [\"https://a:1\", \"http://b:1\"]",
                "etcd.endpoints: [\"https://a:1\", \"http://b:1\"] mixes http:// and https://",
            ),
            (
                "endpoints = [\"http://a:1\", \"https://b:1\"]\nusername = \"u\"\npassword = \"p\"",
                "mixes http:// and https://",
            ),
            (
                "endpoints = [\"http://h:1\"]\nprefix = \"ballast\"",
                "etcd.prefix",
            ),
            (
                "endpoints = [\"http://h:1\"]\nlease_ttl_secs = 1",
                "etcd.lease_ttl_secs",
            ),
            (
                "endpoints = [\"http://h:1\"]\nlease_ttl_secs = 60\nlock_ttl_secs = 30",
                "shorter",
            ),
        ];
        for (body, want) in cases {
            let e = parse(&format!("[etcd]\n{body}")).unwrap_err();
            let msg = format!("{e:#}");
            assert!(msg.contains(want), "{body}: {msg}");
        }
        let e = parse("group = \"a/b\"\n[etcd]\nendpoints = [\"http://h:1\"]").unwrap_err();
        assert!(format!("{e:#}").starts_with("group: "), "{e:#}");
    }
}
