//! Parsing a `#cloud-config` document: the header, YAML syntax, types (with
//! the field path and line/column of a wrong one), and warnings for keys
//! Ballast does not act on. Meaning is checked later, in [`super::validate`].

use super::ballast::Ballast;
use super::network::NetworkConfig;
use super::yaml::{bool11, mode, Command, NameList, SudoRules};
use serde::de::{self, Deserializer, MapAccess, Visitor};
use serde::Deserialize;
use serde_yaml_ng::Value;
use std::fmt;

/// Why a document could not be read. Each says where, when it can.
#[derive(thiserror::Error, Debug, Clone, PartialEq, Eq)]
pub enum DocError {
    #[error("{0}")]
    Header(String),
    #[error("{what} is not valid YAML: {why}")]
    Yaml { what: &'static str, why: String },
    #[error("{1}: {0}")]
    Field(FieldError, &'static str),
    #[error("{0} is not a mapping of keys to values")]
    NotMapping(&'static str),
    #[error("{} error(s):\n  {}", .0.len(), .0.join("\n  "))]
    Invalid(Vec<String>),
}

/// A value of the wrong type or shape, with its place in the document.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    /// `users[1].groups`; `.` for the document itself.
    pub path: String,
    pub message: String,
    pub line: Option<usize>,
    pub column: Option<usize>,
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.path != "." {
            write!(f, "{}: ", self.path)?;
        }
        f.write_str(&self.message)?;
        if let (Some(l), Some(c)) = (self.line, self.column) {
            write!(f, " at line {l} column {c}")?;
        }
        Ok(())
    }
}

/// The keys of a cloud-config document Ballast reads. Everything is optional;
/// a null value counts as absent, as in cloud-init.
#[derive(Debug, Default, Deserialize)]
pub struct CloudConfig {
    pub hostname: Option<String>,
    pub fqdn: Option<String>,
    pub users: Option<Vec<UserItem>>,
    pub groups: Option<Vec<GroupItem>>,
    pub ssh_authorized_keys: Option<Vec<String>>,
    pub write_files: Option<Vec<WriteFile>>,
    pub timezone: Option<String>,
    pub bootcmd: Option<Vec<Command>>,
    pub runcmd: Option<Vec<Command>>,
    pub network: Option<NetworkConfig>,
    pub ca_certs: Option<CaCerts>,
    pub ntp: Option<Ntp>,
    pub ballast: Option<Ballast>,
}

/// `ntp:` (cloud-init's cc_ntp), for systemd-timesyncd.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Ntp {
    pub enabled: Option<bool>,
    #[serde(default)]
    pub servers: Vec<String>,
    #[serde(default)]
    pub pools: Vec<String>,
}

/// `ca_certs:` (cloud-init's cc_ca_certs): extra roots the agent trusts.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CaCerts {
    #[serde(default)]
    pub remove_defaults: bool,
    #[serde(default)]
    pub trusted: Vec<String>,
}

/// An item of `users:`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UserItem {
    /// A bare name; `default` means cloud-init's distribution user.
    Name(String),
    Spec(Box<UserSpec>),
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct UserSpec {
    pub name: String,
    pub gecos: Option<String>,
    pub groups: Option<NameList>,
    pub sudo: Option<SudoRules>,
    pub shell: Option<String>,
    pub homedir: Option<String>,
    pub ssh_authorized_keys: Option<Vec<String>>,
    #[serde(default, deserialize_with = "bool11")]
    pub lock_passwd: Option<bool>,
    pub hashed_passwd: Option<String>,
    /// cloud-init's older name for `hashed_passwd` (a hash, not a password).
    pub passwd: Option<String>,
}

impl<'de> Deserialize<'de> for UserItem {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = UserItem;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a user name or a mapping with at least `name`")
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<UserItem, E> {
                Ok(UserItem::Name(s.to_string()))
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<UserItem, A::Error> {
                UserSpec::deserialize(de::value::MapAccessDeserializer::new(map))
                    .map(|u| UserItem::Spec(Box::new(u)))
            }
        }
        d.deserialize_any(V)
    }
}

/// An item of top-level `groups:`: a name, or `{name: [members]}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupItem {
    pub name: String,
    pub members: Vec<String>,
}

impl<'de> Deserialize<'de> for GroupItem {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = GroupItem;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a group name or a mapping of one group name to its members")
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<GroupItem, E> {
                Ok(GroupItem {
                    name: s.to_string(),
                    members: Vec::new(),
                })
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<GroupItem, A::Error> {
                let Some((name, members)) = map.next_entry::<String, NameList>()? else {
                    return Err(de::Error::invalid_length(0, &self));
                };
                if map.next_key::<de::IgnoredAny>()?.is_some() {
                    return Err(de::Error::custom(
                        "one group per list item: write `- name: [members]` for each",
                    ));
                }
                Ok(GroupItem {
                    name,
                    members: members.0,
                })
            }
        }
        d.deserialize_any(V)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct WriteFile {
    pub path: String,
    pub content: Option<String>,
    pub encoding: Option<String>,
    pub owner: Option<String>,
    #[serde(default, deserialize_with = "mode")]
    pub permissions: Option<u32>,
    #[serde(default, deserialize_with = "bool11")]
    pub append: Option<bool>,
    #[serde(default, deserialize_with = "bool11")]
    pub defer: Option<bool>,
}

/// Top-level keys Ballast reads.
const TOP_KEYS: &[&str] = &[
    "hostname",
    "fqdn",
    "users",
    "groups",
    "ssh_authorized_keys",
    "write_files",
    "timezone",
    "bootcmd",
    "runcmd",
    "network",
    "ca_certs",
    "ntp",
    "ballast",
];

/// cloud-init modules' keys that Ballast knowingly ignores: an immutable
/// image has no package manager, and the rest is the image's business.
const CLOUD_INIT_KEYS: &[&str] = &[
    "packages",
    "package_update",
    "package_upgrade",
    "package_reboot_if_required",
    "apt",
    "apt_pipelining",
    "yum_repos",
    "zypper",
    "snap",
    "chpasswd",
    "password",
    "ssh_pwauth",
    "disable_root",
    "disable_root_opts",
    "growpart",
    "resize_rootfs",
    "mounts",
    "mount_default_fields",
    "swap",
    "locale",
    "locale_configfile",
    "keyboard",
    "power_state",
    "phone_home",
    "final_message",
    "manage_etc_hosts",
    "preserve_hostname",
    "prefer_fqdn_over_hostname",
    "create_hostname_file",
    "manage_resolv_conf",
    "resolv_conf",
    "ca-certs",
    "disk_setup",
    "fs_setup",
    "device_aliases",
    "rsyslog",
    "ssh_keys",
    "ssh_genkeytypes",
    "ssh_deletekeys",
    "ssh_import_id",
    "ssh_publish_hostkeys",
    "ssh_fp_console_blacklist",
    "ssh_key_console_blacklist",
    "no_ssh_fingerprints",
    "ssh_quiet_keygen",
    "ssh",
    "user",
    "ansible",
    "chef",
    "puppet",
    "salt_minion",
    "mcollective",
    "landscape",
    "lxd",
    "seed_random",
    "random_seed",
    "byobu_by_default",
    "apk_repos",
    "output",
    "merge_how",
    "merge_type",
    "system_info",
    "ubuntu_advantage",
    "ubuntu_pro",
    "rh_subscription",
    "spacewalk",
    "wireguard",
    "write_metadata",
    "vendor_data",
    "updates",
    "drivers",
    "keys_to_console",
    "reporting",
    "autoinstall",
    "datasource",
    "datasource_list",
    "cloud_init_modules",
    "cloud_config_modules",
    "cloud_final_modules",
];

const USER_KEYS: &[&str] = &[
    "name",
    "gecos",
    "groups",
    "sudo",
    "shell",
    "homedir",
    "ssh_authorized_keys",
    "lock_passwd",
    "hashed_passwd",
    "passwd",
];
const USER_CLOUD_INIT_KEYS: &[&str] = &[
    "primary_group",
    "no_create_home",
    "no_user_group",
    "no_log_init",
    "system",
    "uid",
    "expiredate",
    "inactive",
    "plain_text_passwd",
    "selinux_user",
    "snapuser",
    "ssh_import_id",
    "ssh_redirect_user",
    "create_groups",
    "doas",
];
const WRITE_FILE_KEYS: &[&str] = &[
    "path",
    "content",
    "encoding",
    "owner",
    "permissions",
    "append",
    "defer",
];

/// Warns about each key of the mapping `v` that is not in `known`: a key
/// cloud-init knows (`cloud_init`) is "not supported", any other "unknown".
pub(crate) fn check_keys(
    v: &Value,
    path: &str,
    known: &[&str],
    cloud_init: &[&str],
    warnings: &mut Vec<String>,
) {
    let Value::Mapping(m) = v else { return };
    for k in m.keys() {
        let name = match k {
            Value::String(s) => s.clone(),
            other => format!("{other:?}"),
        };
        if known.contains(&name.as_str()) {
            continue;
        }
        let full = if path.is_empty() {
            name.clone()
        } else {
            format!("{path}.{name}")
        };
        if cloud_init.contains(&name.as_str()) {
            warnings.push(format!("{full}: not supported by Ballast, ignored"));
        } else {
            warnings.push(format!("{full}: unknown key, ignored"));
        }
    }
}

/// What the first line says a document is, for the error when it is not
/// cloud-config.
fn describe_first_line(first: &str) -> String {
    let lower = first.to_ascii_lowercase();
    if first.starts_with("#!") {
        format!("a script ({first:?})")
    } else if lower.starts_with("content-type:") || lower.starts_with("mime-version:") {
        "a MIME multipart document".to_string()
    } else if lower.starts_with("#include") {
        "an #include list".to_string()
    } else if lower.starts_with("## template:") {
        "a Jinja template".to_string()
    } else if lower.starts_with("#cloud-boothook") {
        "a cloud-boothook".to_string()
    } else if first.trim().is_empty() {
        "an empty first line".to_string()
    } else {
        format!("first line {first:?}")
    }
}

/// Checks the `#cloud-config` header and returns the text.
pub fn check_header(user_data: &[u8]) -> Result<&str, DocError> {
    let text = std::str::from_utf8(user_data).map_err(|e| {
        DocError::Header(format!(
            "user data is not UTF-8 text (byte {}); only #cloud-config is supported",
            e.valid_up_to()
        ))
    })?;
    let first = text.lines().next().unwrap_or("");
    if first.trim_end() != "#cloud-config" {
        if text.is_empty() {
            return Err(DocError::Header("user data is empty".to_string()));
        }
        return Err(DocError::Header(format!(
            "user data must start with a \"#cloud-config\" line; got {}. Ballast supports only cloud-config",
            describe_first_line(first)
        )));
    }
    Ok(text)
}

fn field_error(e: serde_path_to_error::Error<serde_yaml_ng::Error>) -> FieldError {
    let path = e.path().to_string();
    let loc = e.inner().location();
    let mut message = e.inner().to_string();
    // serde_yaml_ng puts its own copy of the path in front and the location
    // behind; keep one of each.
    if let Some(l) = &loc {
        let suffix = format!(" at line {} column {}", l.line(), l.column());
        if let Some(m) = message.strip_suffix(&suffix) {
            message = m.to_string();
        }
    }
    if let Some(m) = message.strip_prefix(&format!("{path}: ")) {
        message = m.to_string();
    }
    FieldError {
        path,
        message,
        line: loc.as_ref().map(|l| l.line()),
        column: loc.as_ref().map(|l| l.column()),
    }
}

/// How deep flow collections (`[`, `{`) may nest in a document, and how far
/// a line may be indented: far beyond any cloud-config, and well below what
/// makes the YAML parser's time grow out of bounds (a 160 KB document of
/// nested `[` took 94 s).
pub const MAX_FLOW_DEPTH: usize = 64;
pub const MAX_INDENT: usize = 512;

/// Refuses a document nested deeper than [`MAX_FLOW_DEPTH`] or indented
/// further than [`MAX_INDENT`], before the YAML parser sees it. Quoted
/// strings and comments are skipped; block scalars may look like anything
/// and are counted as written, which only errs on the safe side.
pub fn check_nesting(text: &str, what: &'static str) -> Result<(), DocError> {
    let too_deep = |line: usize, why: String| DocError::Yaml {
        what,
        why: format!("line {line}: {why}"),
    };
    let mut depth = 0usize;
    for (n, line) in text.lines().enumerate() {
        let indent = line.len() - line.trim_start_matches(' ').len();
        if indent > MAX_INDENT {
            return Err(too_deep(
                n + 1,
                format!("indented {indent} columns, more than the {MAX_INDENT} allowed"),
            ));
        }
        let mut quote: Option<char> = None;
        let mut prev = ' ';
        for c in line.chars() {
            match (quote, c) {
                (Some('\''), '\'') | (Some('"'), '"') if prev != '\\' => quote = None,
                (Some(_), _) => {}
                (None, '\'' | '"') => quote = Some(c),
                (None, '#') if prev.is_whitespace() => break,
                (None, '[' | '{') => {
                    depth += 1;
                    if depth > MAX_FLOW_DEPTH {
                        return Err(too_deep(
                            n + 1,
                            format!("nested more than {MAX_FLOW_DEPTH} levels deep"),
                        ));
                    }
                }
                (None, ']' | '}') => depth = depth.saturating_sub(1),
                _ => {}
            }
            prev = c;
        }
    }
    Ok(())
}

/// Parses YAML text into a value, after [`check_nesting`].
pub(crate) fn yaml_value(text: &str, what: &'static str) -> Result<Value, DocError> {
    check_nesting(text, what)?;
    serde_yaml_ng::from_str(text).map_err(|e| DocError::Yaml {
        what,
        why: e.to_string(),
    })
}

/// Parses YAML text into `T`, with syntax errors and field errors told apart.
pub(crate) fn parse_yaml<T: de::DeserializeOwned>(
    text: &str,
    what: &'static str,
) -> Result<(T, Value), DocError> {
    let value = yaml_value(text, what)?;
    if !matches!(value, Value::Mapping(_) | Value::Null) {
        return Err(DocError::NotMapping(what));
    }
    let parsed = if value.is_null() {
        // An empty document (only comments) is an empty mapping.
        serde_path_to_error::deserialize(Value::Mapping(Default::default()))
            .map_err(|e| DocError::Field(field_error(e), what))?
    } else {
        let de = serde_yaml_ng::Deserializer::from_str(text);
        serde_path_to_error::deserialize(de).map_err(|e| DocError::Field(field_error(e), what))?
    };
    Ok((parsed, value))
}

/// A parsed document and its warnings about ignored keys.
#[derive(Debug)]
pub struct Parsed {
    pub config: CloudConfig,
    pub warnings: Vec<String>,
    /// `write_files` items that name a `source:` (content fetched from a
    /// URL): refused, since the file would otherwise be written empty.
    pub write_file_sources: Vec<usize>,
}

/// Parses user data (and a separate network-config document, if any).
pub fn parse(user_data: &[u8], network_config: Option<&[u8]>) -> Result<Parsed, DocError> {
    let text = check_header(user_data)?;
    let (mut config, value): (CloudConfig, Value) = parse_yaml(text, "user data")?;
    let mut warnings = Vec::new();
    check_keys(&value, "", TOP_KEYS, CLOUD_INIT_KEYS, &mut warnings);
    let mut write_file_sources = Vec::new();
    if let Some(Value::Sequence(users)) = value.get("users") {
        for (i, u) in users.iter().enumerate() {
            check_keys(
                u,
                &format!("users[{i}]"),
                USER_KEYS,
                USER_CLOUD_INIT_KEYS,
                &mut warnings,
            );
        }
    }
    if let Some(Value::Sequence(files)) = value.get("write_files") {
        for (i, f) in files.iter().enumerate() {
            if f.get("source").is_some() {
                write_file_sources.push(i);
            }
            let mut w = Vec::new();
            check_keys(
                f,
                &format!("write_files[{i}]"),
                WRITE_FILE_KEYS,
                &[],
                &mut w,
            );
            warnings.extend(w.into_iter().filter(|w| !w.contains(".source:")));
        }
    }
    if let Some(n) = value.get("network") {
        super::network::check_keys_of(n, "network", &mut warnings);
    }
    if let Some(b) = value.get("ballast") {
        super::ballast::check_keys_of(b, &mut warnings);
    }
    if let Some(nc) = network_config {
        let text = std::str::from_utf8(nc).map_err(|e| DocError::Yaml {
            what: "network-config",
            why: format!("not UTF-8 text (byte {})", e.valid_up_to()),
        })?;
        let (net, v) = super::network::parse_document(text)?;
        if config.network.is_some() {
            warnings.push(
                "network: the separate network-config document replaces the user data's network key"
                    .to_string(),
            );
        }
        super::network::check_keys_of(&v, "network-config", &mut warnings);
        config.network = net;
    }
    Ok(Parsed {
        config,
        warnings,
        write_file_sources,
    })
}
