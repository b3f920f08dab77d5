//! From a parsed document to a [`Plan`]: every value checked against the
//! host's users, groups and time zones before anything changes.

use super::ballast;
use super::cloudconfig::{DocError, Parsed, UserItem, UserSpec, WriteFile};
use super::network;
use super::plan::{Action, FileWrite, Plan, Step};
use crate::host::Host;
use base64::Engine as _;
use std::collections::{BTreeMap, BTreeSet};
use std::io::{self, Read};
use std::path::{Component, Path, PathBuf};

/// The largest file a gzip-encoded `write_files` item may expand to.
const MAX_GUNZIPPED: u64 = 64 << 20;
const ZONEINFO: &str = "/usr/share/zoneinfo";
const SUDOERS_D: &str = "/etc/sudoers.d";
pub const SUDOERS_FILE: &str = "/etc/sudoers.d/90-ballast-users";

/// Groups of a Debian bookworm base system with systemd and openssh-server
/// (base-passwd, systemd's sysusers, openssh's `_ssh`): what offline
/// validation assumes the image has, besides the validating machine's own.
pub const DEBIAN_BASE_GROUPS: &[&str] = &[
    "root",
    "daemon",
    "bin",
    "sys",
    "adm",
    "tty",
    "disk",
    "lp",
    "mail",
    "news",
    "uucp",
    "man",
    "proxy",
    "kmem",
    "dialout",
    "fax",
    "voice",
    "cdrom",
    "floppy",
    "tape",
    "sudo",
    "audio",
    "dip",
    "www-data",
    "backup",
    "operator",
    "list",
    "irc",
    "src",
    "shadow",
    "utmp",
    "video",
    "sasl",
    "plugdev",
    "staff",
    "games",
    "users",
    "nogroup",
    "systemd-journal",
    "systemd-network",
    "systemd-timesync",
    "systemd-resolve",
    "input",
    "sgx",
    "kvm",
    "render",
    "messagebus",
    "_ssh",
];

/// Users of the same base system, with their homes.
const DEBIAN_BASE_USERS: &[(&str, &str)] = &[
    ("root", "/root"),
    ("daemon", "/usr/sbin"),
    ("bin", "/bin"),
    ("sys", "/dev"),
    ("nobody", "/nonexistent"),
    ("systemd-network", "/nonexistent"),
    ("systemd-resolve", "/nonexistent"),
    ("systemd-timesync", "/nonexistent"),
    ("messagebus", "/nonexistent"),
    ("sshd", "/run/sshd"),
];

/// What validation needs to know about the host a plan is for.
#[derive(Debug, Clone)]
pub struct Facts {
    pub groups: BTreeSet<String>,
    /// User name → home directory.
    pub users: BTreeMap<String, PathBuf>,
    /// Whether /etc/sudoers.d exists; `None` when validating offline.
    pub sudoers_d: Option<bool>,
    /// Says where the groups came from, for error messages.
    pub groups_from: String,
}

fn parse_group(text: &str) -> impl Iterator<Item = String> + '_ {
    text.lines()
        .filter_map(|l| l.split(':').next())
        .filter(|n| !n.is_empty() && !n.starts_with('#'))
        .map(String::from)
}

fn parse_passwd(text: &str) -> impl Iterator<Item = (String, PathBuf)> + '_ {
    text.lines().filter_map(|l| {
        let f: Vec<&str> = l.split(':').collect();
        (f.len() >= 7 && !f[0].is_empty()).then(|| (f[0].to_string(), PathBuf::from(f[5])))
    })
}

fn read_optional(host: &dyn Host, path: &str) -> io::Result<Option<String>> {
    match host.read_to_string(Path::new(path)) {
        Ok(t) => Ok(Some(t)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io::Error::new(e.kind(), format!("reading {path}: {e}"))),
    }
}

impl Facts {
    /// The facts of the host provisioning runs on.
    pub fn from_host(host: &dyn Host) -> io::Result<Facts> {
        let group = read_optional(host, "/etc/group")?.unwrap_or_default();
        let passwd = read_optional(host, "/etc/passwd")?.unwrap_or_default();
        Ok(Facts {
            groups: parse_group(&group).collect(),
            users: parse_passwd(&passwd).collect(),
            sudoers_d: Some(host.exists(Path::new(SUDOERS_D))?),
            groups_from: "this host's /etc/group".to_string(),
        })
    }

    /// For checking a document away from the host: Debian's base groups and
    /// users, plus the groups of the machine running the check.
    pub fn offline(host: &dyn Host) -> io::Result<Facts> {
        let mut groups: BTreeSet<String> =
            DEBIAN_BASE_GROUPS.iter().map(|g| g.to_string()).collect();
        groups.extend(parse_group(
            &read_optional(host, "/etc/group")?.unwrap_or_default(),
        ));
        Ok(Facts {
            groups,
            users: DEBIAN_BASE_USERS
                .iter()
                .map(|(u, h)| (u.to_string(), PathBuf::from(h)))
                .collect(),
            sudoers_d: None,
            groups_from: "the Debian base groups or this machine's /etc/group".to_string(),
        })
    }
}

/// Debian's useradd rule (NAME_REGEX): `[a-z_][a-z0-9_-]*[$]?`, ≤ 32.
pub fn valid_user_name(n: &str) -> bool {
    let body = n.strip_suffix('$').unwrap_or(n);
    let mut chars = body.chars();
    n.len() <= 32
        && matches!(chars.next(), Some(c) if c.is_ascii_lowercase() || c == '_')
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '-')
}

/// RFC 1123 labels joined by dots, each 1-63 characters.
fn valid_dns_name(n: &str, max: usize) -> bool {
    !n.is_empty()
        && n.len() <= max
        && n.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && !l.starts_with('-')
                && !l.ends_with('-')
                && l.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
        })
}

/// Linux allows 64 bytes for the hostname.
const MAX_HOSTNAME: usize = 64;

/// Places on the read-only root (or not files at all).
const READ_ONLY: &[&str] = &[
    "/usr", "/bin", "/sbin", "/boot", "/efi", "/proc", "/sys", "/dev",
];
/// Places an image keeps writable.
const WRITABLE: &[&str] = &["/etc", "/var", "/run", "/home", "/root", "/tmp"];

fn under(p: &Path, dir: &str) -> bool {
    p.starts_with(dir)
}

fn check_file_path(path: &str) -> Result<PathBuf, String> {
    let p = Path::new(path);
    if !p.is_absolute() {
        return Err(format!("{path:?} is not an absolute path"));
    }
    if path.ends_with('/') {
        return Err(format!("{path:?} names a directory, not a file"));
    }
    if p.components()
        .any(|c| matches!(c, Component::ParentDir | Component::CurDir))
    {
        return Err(format!("{path:?} has . or .. in it"));
    }
    let first = p.components().nth(1);
    let lib = matches!(first, Some(Component::Normal(n)) if n.to_string_lossy().starts_with("lib"));
    if lib || READ_ONLY.iter().any(|d| under(p, d)) {
        return Err(format!(
            "{path:?} is on the read-only root (/usr, /bin, /sbin, /lib*) or not a place for files; write under /etc or /var"
        ));
    }
    Ok(p.to_path_buf())
}

fn decode(content: &str, encoding: Option<&str>) -> Result<Vec<u8>, String> {
    let b64 = |s: &str| {
        let clean: String = s.chars().filter(|c| !c.is_ascii_whitespace()).collect();
        base64::engine::general_purpose::STANDARD
            .decode(clean)
            .map_err(|e| format!("content is not valid base64: {e}"))
    };
    let gunzip = |bytes: Vec<u8>| -> Result<Vec<u8>, String> {
        let mut out = Vec::new();
        flate2::read::GzDecoder::new(bytes.as_slice())
            .take(MAX_GUNZIPPED + 1)
            .read_to_end(&mut out)
            .map_err(|e| format!("content is not valid gzip data: {e}"))?;
        if out.len() as u64 > MAX_GUNZIPPED {
            return Err(format!(
                "content expands to more than {MAX_GUNZIPPED} bytes"
            ));
        }
        Ok(out)
    };
    match encoding.map(|e| e.to_ascii_lowercase()).as_deref() {
        None | Some("text") | Some("text/plain") => Ok(content.as_bytes().to_vec()),
        Some("b64" | "base64") => b64(content),
        // Plain `gz` content is binary, which YAML carries only as `!!binary`
        // base64; serde_yaml_ng hands us that base64 text.
        Some("gz" | "gzip" | "gz+base64" | "gzip+base64" | "gz+b64" | "gzip+b64") => {
            gunzip(b64(content)?)
        }
        Some(other) => Err(format!(
            "unknown encoding {other:?} (use b64, base64, gzip, gz, gz+base64, gzip+base64, gz+b64, gzip+b64 or text)"
        )),
    }
}

/// Checks a zone name and whether the host has it; `None`: cannot tell.
fn zone_exists(host: &dyn Host, tz: &str) -> Result<Option<bool>, String> {
    let ok_chars = tz
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '/' | '_' | '-' | '+'));
    if tz.is_empty() || !ok_chars || tz.starts_with('/') || tz.split('/').any(|p| p.is_empty()) {
        return Ok(Some(false));
    }
    let dir = Path::new(ZONEINFO);
    let exists = |p: &Path| {
        host.exists(p)
            .map_err(|e| format!("cannot check {}: {e}", p.display()))
    };
    if !exists(dir)? {
        return Ok(None);
    }
    Ok(Some(exists(&dir.join(tz))?))
}

struct V<'a> {
    facts: &'a Facts,
    errors: Vec<String>,
    warnings: Vec<String>,
    steps: Vec<Step>,
    /// Users and groups this document creates.
    new_users: BTreeSet<String>,
    new_groups: BTreeSet<String>,
}

impl V<'_> {
    fn group_known(&self, g: &str) -> bool {
        self.facts.groups.contains(g) || self.new_groups.contains(g) || self.new_users.contains(g)
    }

    fn user_known(&self, u: &str) -> bool {
        self.facts.users.contains_key(u) || self.new_users.contains(u)
    }

    fn push(&mut self, origin: impl Into<String>, action: Action) {
        self.steps.push(Step::new(origin, action));
    }

    fn check_keys(&mut self, origin: &str, keys: &[String]) {
        for (i, k) in keys.iter().enumerate() {
            let k = k.trim();
            if k.is_empty() || k.contains('\n') {
                self.errors.push(format!(
                    "{origin}[{i}]: an SSH key must be one non-empty line"
                ));
            } else if !["ssh-", "ecdsa-", "sk-"].iter().any(|t| k.contains(t)) {
                self.warnings.push(format!(
                    "{origin}[{i}]: does not look like an OpenSSH public key"
                ));
            }
        }
    }

    /// Whether a file must wait for the users: `defer: true`, or an owner
    /// this document creates. cloud-init writes such a file before the user
    /// exists and fails to chown it; here it is moved after the users.
    fn deferred(&self, f: &WriteFile) -> bool {
        if f.defer.unwrap_or(false) {
            return true;
        }
        let Some(owner) = &f.owner else { return false };
        let (user, group) = owner.split_once(':').unwrap_or((owner, ""));
        self.new_users.contains(user)
            || (!self.facts.groups.contains(group) && self.new_users.contains(group))
    }

    fn write_file(&mut self, i: usize, f: &WriteFile) {
        let origin = format!("write_files[{i}]");
        let path = match check_file_path(&f.path) {
            Ok(p) => p,
            Err(why) => {
                self.errors.push(format!("{origin}.path: {why}"));
                return;
            }
        };
        if !WRITABLE.iter().any(|d| under(&path, d)) {
            self.warnings.push(format!(
                "{origin}.path: {} is on the read-only root unless the image makes it writable",
                path.display()
            ));
        }
        if under(&path, "/run") || under(&path, "/tmp") {
            self.warnings.push(format!(
                "{origin}.path: {} does not survive a reboot, and write_files runs once per instance",
                path.display()
            ));
        }
        let content = match decode(f.content.as_deref().unwrap_or(""), f.encoding.as_deref()) {
            Ok(c) => c,
            Err(why) => {
                self.errors.push(format!("{origin}.content: {why}"));
                return;
            }
        };
        if !f.defer.unwrap_or(false) && self.deferred(f) {
            self.warnings.push(format!(
                "{origin}: owner {:?} is created by this document, so the file is written after the users (as with defer: true)",
                f.owner.as_deref().unwrap_or_default()
            ));
        }
        if let Some(owner) = &f.owner {
            let (user, group) = match owner.split_once(':') {
                Some((u, g)) => (u, Some(g).filter(|g| !g.is_empty())),
                None => (owner.as_str(), None),
            };
            if !self.user_known(user) {
                self.errors.push(format!(
                    "{origin}.owner: user {user:?} does not exist and is not created by this document"
                ));
            }
            if let Some(g) = group {
                if !self.group_known(g) {
                    self.errors.push(format!(
                        "{origin}.owner: group {g:?} is not in {} and not created by this document",
                        self.facts.groups_from
                    ));
                }
            }
        }
        self.push(
            origin,
            Action::WriteFile(FileWrite {
                path,
                content,
                mode: f.permissions.unwrap_or(0o644),
                owner: f.owner.clone(),
                append: f.append.unwrap_or(false),
            }),
        );
    }

    fn user(&mut self, i: usize, u: &UserSpec, sudo_lines: &mut Vec<String>) {
        let origin = format!("users[{i}]");
        let name = u.name.clone();
        let exists = self.facts.users.contains_key(&name);
        let groups = u.groups.clone().unwrap_or_default().0;
        for g in &groups {
            if !self.group_known(g) {
                self.errors.push(format!(
                    "{origin}.groups: user {name}: group {g:?} is not in {} and not created by this document (list it under top-level groups:)",
                    self.facts.groups_from
                ));
            }
        }
        if let Some(shell) = &u.shell {
            if !shell.starts_with('/') {
                self.errors
                    .push(format!("{origin}.shell: {shell:?} is not an absolute path"));
            }
        }
        if let Some(h) = &u.homedir {
            if exists {
                self.warnings.push(format!(
                    "{origin}.homedir: {name} exists already; its home is not changed"
                ));
            } else if let Err(why) = check_file_path(h) {
                self.errors.push(format!("{origin}.homedir: {why}"));
            }
        }
        for (field, v) in [
            ("gecos", &u.gecos),
            ("shell", &u.shell),
            ("homedir", &u.homedir),
        ] {
            if v.as_deref().is_some_and(|v| v.contains([':', '\n'])) {
                self.errors.push(format!(
                    "{origin}.{field}: must not contain ':' or a newline"
                ));
            }
        }
        let home = if exists {
            self.facts.users[&name].clone()
        } else {
            PathBuf::from(u.homedir.clone().unwrap_or_else(|| format!("/home/{name}")))
        };
        if exists {
            if u.gecos.is_some() || !groups.is_empty() || u.shell.is_some() {
                self.push(
                    origin.clone(),
                    Action::ModifyUser {
                        name: name.clone(),
                        gecos: u.gecos.clone(),
                        groups,
                        shell: u.shell.clone(),
                    },
                );
            }
        } else {
            self.push(
                origin.clone(),
                Action::CreateUser {
                    name: name.clone(),
                    gecos: u.gecos.clone(),
                    groups,
                    shell: u.shell.clone(),
                    homedir: u.homedir.clone(),
                },
            );
        }
        let hash = match (&u.hashed_passwd, &u.passwd) {
            (Some(h), Some(_)) => {
                self.warnings.push(format!(
                    "{origin}: both hashed_passwd and passwd given; using hashed_passwd"
                ));
                Some(h)
            }
            (h, p) => h.as_ref().or(p.as_ref()),
        };
        let lock = u.lock_passwd.unwrap_or(true);
        if let Some(h) = hash {
            if h.contains([':', '\n']) || h.is_empty() {
                self.errors.push(format!(
                    "{origin}.hashed_passwd: not a crypt(3) hash (empty, or has ':' or a newline)"
                ));
            } else if !h.starts_with('$') {
                self.warnings.push(format!(
                    "{origin}.hashed_passwd: does not look like a crypt(3) hash ($6$..., $y$...); it is used as the hash as is"
                ));
            }
            if lock {
                self.warnings.push(format!(
                    "{origin}: hashed_passwd with lock_passwd true (the default): the password is set but locked, as in cloud-init; set lock_passwd: false to log in with it"
                ));
            }
            self.push(
                origin.clone(),
                Action::SetPasswordHash {
                    user: name.clone(),
                    hash: h.clone(),
                },
            );
        }
        if lock {
            self.push(origin.clone(), Action::LockPassword { user: name.clone() });
        }
        if let Some(keys) = &u.ssh_authorized_keys {
            self.check_keys(&format!("{origin}.ssh_authorized_keys"), keys);
            if !keys.is_empty() {
                self.push(
                    origin.clone(),
                    Action::AuthorizedKeys {
                        user: name.clone(),
                        home,
                        keys: keys.iter().map(|k| k.trim().to_string()).collect(),
                    },
                );
            }
        }
        let rules = u.sudo.clone().unwrap_or_default().0;
        if !rules.is_empty() {
            for r in &rules {
                if r.contains('\n') || r.trim().is_empty() {
                    self.errors
                        .push(format!("{origin}.sudo: a rule must be one non-empty line"));
                }
            }
            match self.facts.sudoers_d {
                Some(false) => self.warnings.push(format!(
                    "{origin}.sudo: sudo is not installed in this image (no {SUDOERS_D}), ignored"
                )),
                Some(true) => sudo_lines.extend(rules.iter().map(|r| format!("{name} {r}"))),
                None => {
                    self.warnings.push(format!(
                        "{origin}.sudo: applied only if the image has {SUDOERS_D}; Ballast images do not ship sudo"
                    ));
                    sudo_lines.extend(rules.iter().map(|r| format!("{name} {r}")));
                }
            }
        }
    }
}

/// Turns a parsed document into a plan, or every error found.
pub fn validate(parsed: &Parsed, facts: &Facts, host: &dyn Host) -> Result<Plan, DocError> {
    let c = &parsed.config;
    let mut v = V {
        facts,
        errors: Vec::new(),
        warnings: parsed.warnings.clone(),
        steps: Vec::new(),
        new_users: BTreeSet::new(),
        new_groups: BTreeSet::new(),
    };
    for i in &parsed.write_file_sources {
        v.errors.push(format!(
            "write_files[{i}].source: fetching content from a URL is not supported by Ballast; inline it with content:"
        ));
    }

    // Who this document creates, so that later checks can refer to them.
    let mut specs: Vec<(usize, UserSpec)> = Vec::new();
    for (i, item) in c.users.iter().flatten().enumerate() {
        let spec = match item {
            UserItem::Name(n) if n == "default" => {
                v.warnings.push(format!(
                    "users[{i}]: \"default\": Ballast has no default user, ignored"
                ));
                continue;
            }
            UserItem::Name(n) => UserSpec {
                name: n.clone(),
                gecos: None,
                groups: None,
                sudo: None,
                shell: None,
                homedir: None,
                ssh_authorized_keys: None,
                lock_passwd: None,
                hashed_passwd: None,
                passwd: None,
            },
            UserItem::Spec(s) => (**s).clone(),
        };
        if !valid_user_name(&spec.name) {
            v.errors.push(format!(
                "users[{i}].name: {:?} is not a valid user name (lowercase letters, digits, _ and -, starting with a letter or _, at most 32)",
                spec.name
            ));
            continue;
        }
        if specs.iter().any(|(_, s)| s.name == spec.name) {
            v.errors
                .push(format!("users[{i}].name: {} is listed twice", spec.name));
            continue;
        }
        if !facts.users.contains_key(&spec.name) {
            v.new_users.insert(spec.name.clone());
        }
        specs.push((i, spec));
    }
    let mut memberships = Vec::new();
    let mut group_steps = Vec::new();
    for (i, g) in c.groups.iter().flatten().enumerate() {
        if !valid_user_name(&g.name) {
            v.errors.push(format!(
                "groups[{i}]: {:?} is not a valid group name",
                g.name
            ));
            continue;
        }
        if !facts.groups.contains(&g.name) && v.new_groups.insert(g.name.clone()) {
            group_steps.push(Step::new(
                format!("groups[{i}]"),
                Action::CreateGroup {
                    name: g.name.clone(),
                },
            ));
        }
        for m in &g.members {
            memberships.push((i, m.clone(), g.name.clone()));
        }
    }

    for (i, cmd) in c.bootcmd.iter().flatten().enumerate() {
        check_command(&mut v.errors, &format!("bootcmd[{i}]"), cmd);
        v.push(
            format!("bootcmd[{i}]"),
            Action::Run {
                cmd: cmd.clone(),
                every_boot: true,
            },
        );
    }

    hostname(&mut v, c.hostname.as_deref(), c.fqdn.as_deref());

    if let Some(tz) = &c.timezone {
        match zone_exists(host, tz) {
            Ok(Some(true)) => {}
            Ok(Some(false)) => v
                .errors
                .push(format!("timezone: {tz:?} is not a time zone in {ZONEINFO}")),
            Ok(None) => v.warnings.push(format!(
                "timezone: cannot check {tz:?} here (no {ZONEINFO})"
            )),
            Err(why) => v.errors.push(format!("timezone: {why}")),
        }
        v.push("timezone", Action::SetTimezone { zone: tz.clone() });
    }

    if let Some(ca) = &c.ca_certs {
        ca_certs(&mut v, ca);
    }
    if let Some(ntp) = &c.ntp {
        ntp_servers(&mut v, ntp);
    }

    v.steps.extend(group_steps);

    if let Some(net) = &c.network {
        let rendered = network::render(net, "network", &mut v.errors, &mut v.warnings);
        let any = !rendered.is_empty();
        for (id, path, text) in rendered {
            v.push(
                format!("network.ethernets.{id}"),
                Action::WriteFile(FileWrite {
                    path,
                    content: text.into_bytes(),
                    mode: 0o644,
                    owner: None,
                    append: false,
                }),
            );
        }
        if any {
            v.push("network", Action::ReloadNetwork);
        }
    }

    let files = c.write_files.as_deref().unwrap_or_default();
    let deferred: Vec<bool> = files.iter().map(|f| v.deferred(f)).collect();
    for (i, f) in files.iter().enumerate() {
        if !deferred[i] {
            v.write_file(i, f);
        }
    }

    let mut sudo_lines = Vec::new();
    for (i, spec) in &specs {
        v.user(*i, spec, &mut sudo_lines);
    }
    if !sudo_lines.is_empty() {
        v.push(
            "users",
            Action::WriteFile(FileWrite {
                path: PathBuf::from(SUDOERS_FILE),
                content: format!(
                    "# Written by os-agent provision from the users' sudo: rules.\n{}\n",
                    sudo_lines.join("\n")
                )
                .into_bytes(),
                mode: 0o440,
                owner: None,
                append: false,
            }),
        );
    }
    for (i, user, group) in memberships {
        if !v.user_known(&user) {
            v.errors.push(format!(
                "groups[{i}]: member {user:?} of {group} does not exist and is not created by this document"
            ));
            continue;
        }
        v.push(format!("groups[{i}]"), Action::AddToGroup { user, group });
    }

    if let Some(keys) = &c.ssh_authorized_keys {
        v.check_keys("ssh_authorized_keys", keys);
        if !keys.is_empty() {
            let home = facts
                .users
                .get("root")
                .cloned()
                .unwrap_or_else(|| PathBuf::from("/root"));
            v.push(
                "ssh_authorized_keys",
                Action::AuthorizedKeys {
                    user: "root".to_string(),
                    home,
                    keys: keys.iter().map(|k| k.trim().to_string()).collect(),
                },
            );
        }
    }

    for (i, f) in files.iter().enumerate() {
        if deferred[i] {
            v.write_file(i, f);
        }
    }

    if let Some(b) = &c.ballast {
        let check_agent = |text: &str| {
            crate::config::load_with(host, std::path::Path::new(ballast::AGENT_DROPIN), text)
                .map(drop)
        };
        let out = ballast::validate(b, &check_agent, &mut v.errors);
        v.steps.extend(out.steps);
    }

    for (i, cmd) in c.runcmd.iter().flatten().enumerate() {
        check_command(&mut v.errors, &format!("runcmd[{i}]"), cmd);
        v.push(
            format!("runcmd[{i}]"),
            Action::Run {
                cmd: cmd.clone(),
                every_boot: false,
            },
        );
    }

    // Two steps writing one path would leave whichever ran last.
    let mut written = BTreeMap::new();
    for s in &v.steps {
        if let Action::WriteFile(w) = &s.action {
            if let Some(first) = written.insert(w.path.clone(), s.origin.clone()) {
                if !w.append {
                    v.errors.push(format!(
                        "{}: {} is also written by {first}",
                        s.origin,
                        w.path.display()
                    ));
                }
            }
        }
    }

    if v.errors.is_empty() {
        Ok(Plan {
            steps: v.steps,
            warnings: v.warnings,
        })
    } else {
        Err(DocError::Invalid(v.errors))
    }
}

fn check_command(errors: &mut Vec<String>, origin: &str, cmd: &super::yaml::Command) {
    use super::yaml::Command;
    match cmd {
        Command::Shell(s) if s.trim().is_empty() => {
            errors.push(format!("{origin}: empty command"));
        }
        Command::Argv(a) if a.is_empty() || a[0].is_empty() => {
            errors.push(format!("{origin}: empty argument list"));
        }
        _ => {}
    }
}

/// cloud-init's rule: `fqdn` wins; without it a dotted `hostname` is the
/// fqdn; the hostname set is the first label unless `hostname` says otherwise.
fn hostname(v: &mut V<'_>, hostname: Option<&str>, fqdn: Option<&str>) {
    let (host, fq) = match (hostname, fqdn) {
        (None, None) => return,
        (h, Some(f)) => (
            h.map(String::from)
                .unwrap_or_else(|| f.split('.').next().unwrap_or(f).to_string()),
            Some(f.to_string()),
        ),
        (Some(h), None) if h.contains('.') => (
            h.split('.').next().unwrap_or(h).to_string(),
            Some(h.to_string()),
        ),
        (Some(h), None) => (h.to_string(), None),
    };
    let mut ok = true;
    if let Some(f) = &fq {
        if !valid_dns_name(f, 253) {
            v.errors.push(format!(
                "fqdn: {f:?} is not a valid name (RFC 1123 labels of letters, digits and -)"
            ));
            ok = false;
        }
    }
    if !valid_dns_name(&host, MAX_HOSTNAME) {
        v.errors.push(format!(
            "hostname: {host:?} is not a valid host name (RFC 1123 labels of letters, digits and -, at most {MAX_HOSTNAME} characters)"
        ));
        ok = false;
    }
    if ok {
        let origin = if hostname.is_some() {
            "hostname"
        } else {
            "fqdn"
        };
        v.push(
            origin,
            Action::SetHostname {
                hostname: host,
                fqdn: fq,
            },
        );
    }
}

/// `ca_certs.trusted`: each entry PEM certificates, written to the agent's
/// extra roots ([`crate::http::EXTRA_ROOTS_DIR`]). The image's own store
/// stays (it is on the read-only root), so `remove_defaults` is refused
/// rather than silently ignored.
fn ca_certs(v: &mut V<'_>, ca: &super::cloudconfig::CaCerts) {
    if ca.remove_defaults {
        v.errors.push(
            "ca_certs.remove_defaults: not supported: the image's trust store is part of the verified root and stays; add roots with ca_certs.trusted".into(),
        );
    }
    for (i, pem) in ca.trusted.iter().enumerate() {
        let origin = format!("ca_certs.trusted[{i}]");
        if let Err(why) = crate::http::check_roots_pem(pem.as_bytes()) {
            v.errors.push(format!("{origin}: {why}"));
        }
        v.push(
            origin,
            Action::WriteFile(FileWrite {
                path: Path::new(crate::http::EXTRA_ROOTS_DIR).join(format!("user-data-{i}.pem")),
                content: pem.as_bytes().to_vec(),
                mode: 0o644,
                owner: None,
                append: false,
            }),
        );
    }
}

/// Where `ntp:` goes: a timesyncd drop-in, read before the image's own.
pub const TIMESYNCD_DROPIN: &str = "/etc/systemd/timesyncd.conf.d/50-user-data.conf";

/// `ntp:` → systemd-timesyncd's `NTP=` (servers and pools alike: timesyncd
/// resolves a name and uses its addresses), then a restart of the service.
/// `enabled: false` writes nothing: the image's time sync stays as it is.
fn ntp_servers(v: &mut V<'_>, ntp: &super::cloudconfig::Ntp) {
    if ntp.enabled == Some(false) {
        v.warnings.push(
            "ntp.enabled: false: nothing is written; systemd-timesyncd keeps the image's settings and DHCP's servers".into(),
        );
        return;
    }
    let mut names = Vec::new();
    for (key, list) in [("servers", &ntp.servers), ("pools", &ntp.pools)] {
        for (i, name) in list.iter().enumerate() {
            let ok = !name.is_empty()
                && name.len() <= 253
                && name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | ':' | '[' | ']'));
            if !ok {
                v.errors.push(format!(
                    "ntp.{key}[{i}]: {name:?} is not a host name or IP address"
                ));
            }
            names.push(name.clone());
        }
    }
    if names.is_empty() {
        v.errors
            .push("ntp: neither servers nor pools are given (or use enabled: false)".into());
        return;
    }
    v.push(
        "ntp",
        Action::WriteFile(FileWrite {
            path: PathBuf::from(TIMESYNCD_DROPIN),
            content: format!(
                "# Written by os-agent provision from the user data's ntp: section.\n[Time]\nNTP={}\n",
                names.join(" ")
            )
            .into_bytes(),
            mode: 0o644,
            owner: None,
            append: false,
        }),
    );
    v.push(
        "ntp",
        Action::Systemctl {
            verb: super::plan::UnitVerb::Restart,
            unit: "systemd-timesyncd.service".into(),
        },
    );
}
