//! A validated document as an ordered list of named steps: what `apply`
//! does, and what `osctl provision validate` prints. Nothing here touches
//! the host.

use super::yaml::Command;
use std::fmt;
use std::path::PathBuf;

/// Everything a document asks for, in the order it is applied, and the
/// warnings found while validating it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plan {
    pub steps: Vec<Step>,
    pub warnings: Vec<String>,
}

/// One step: where in the document it comes from, and what it does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Step {
    /// The document path it comes from (`write_files[2]`, `users[0]`).
    pub origin: String,
    pub action: Action,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// A `bootcmd` (every boot) or `runcmd` (once) command.
    Run {
        cmd: Command,
        every_boot: bool,
    },
    SetHostname {
        hostname: String,
        fqdn: Option<String>,
    },
    SetTimezone {
        zone: String,
    },
    CreateGroup {
        name: String,
    },
    CreateUser {
        name: String,
        gecos: Option<String>,
        groups: Vec<String>,
        shell: Option<String>,
        homedir: Option<String>,
    },
    /// The user exists already (root, or one in the image): change what the
    /// document sets, adding (not replacing) supplementary groups.
    ModifyUser {
        name: String,
        gecos: Option<String>,
        groups: Vec<String>,
        shell: Option<String>,
    },
    AddToGroup {
        user: String,
        group: String,
    },
    SetPasswordHash {
        user: String,
        hash: String,
    },
    LockPassword {
        user: String,
    },
    /// Adds keys to `<home>/.ssh/authorized_keys`, keeping the keys there.
    AuthorizedKeys {
        user: String,
        home: PathBuf,
        keys: Vec<String>,
    },
    WriteFile(FileWrite),
    /// `networkctl reload`, after network files changed.
    ReloadNetwork,
    /// `systemctl daemon-reload`, after unit files changed.
    DaemonReload,
    /// `systemctl <verb> <unit>`.
    Systemctl {
        verb: UnitVerb,
        unit: String,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UnitVerb {
    Enable,
    Start,
    Restart,
}

impl UnitVerb {
    pub fn as_str(self) -> &'static str {
        match self {
            UnitVerb::Enable => "enable",
            UnitVerb::Start => "start",
            UnitVerb::Restart => "restart",
        }
    }
}

/// A file to write atomically, then chown and chmod.
#[derive(Clone, PartialEq, Eq)]
pub struct FileWrite {
    pub path: PathBuf,
    pub content: Vec<u8>,
    pub mode: u32,
    /// `user`, `user:group` or `user:`; `None` leaves root's.
    pub owner: Option<String>,
    pub append: bool,
}

// Contents may be keys or passwords: Debug shows their size only.
impl fmt::Debug for FileWrite {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FileWrite")
            .field("path", &self.path)
            .field("bytes", &self.content.len())
            .field("mode", &format_args!("{:04o}", self.mode))
            .field("owner", &self.owner)
            .field("append", &self.append)
            .finish()
    }
}

impl Step {
    pub fn new(origin: impl Into<String>, action: Action) -> Step {
        Step {
            origin: origin.into(),
            action,
        }
    }

    /// Whether the step runs on every boot (`bootcmd`), not once per instance.
    pub fn every_boot(&self) -> bool {
        matches!(
            self.action,
            Action::Run {
                every_boot: true,
                ..
            }
        )
    }
}

impl fmt::Display for Step {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.origin, self.action)
    }
}

fn opt(label: &str, v: &Option<String>) -> String {
    v.as_ref()
        .map(|v| format!(", {label} {v:?}"))
        .unwrap_or_default()
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Action::Run { cmd, every_boot } => {
                let when = if *every_boot { "every boot" } else { "once" };
                write!(f, "run {cmd} ({when})")
            }
            Action::SetHostname { hostname, fqdn } => {
                write!(f, "set hostname {hostname}")?;
                if let Some(fq) = fqdn {
                    write!(f, " (fqdn {fq})")?;
                }
                Ok(())
            }
            Action::SetTimezone { zone } => write!(f, "set timezone {zone}"),
            Action::CreateGroup { name } => write!(f, "create group {name}"),
            Action::CreateUser {
                name,
                gecos,
                groups,
                shell,
                homedir,
            } => {
                write!(f, "create user {name}")?;
                if !groups.is_empty() {
                    write!(f, ", groups {}", groups.join(","))?;
                }
                write!(
                    f,
                    "{}{}{}",
                    opt("shell", shell),
                    opt("gecos", gecos),
                    opt("home", homedir)
                )
            }
            Action::ModifyUser {
                name,
                gecos,
                groups,
                shell,
            } => {
                write!(f, "modify existing user {name}")?;
                if !groups.is_empty() {
                    write!(f, ", add groups {}", groups.join(","))?;
                }
                write!(f, "{}{}", opt("shell", shell), opt("gecos", gecos))
            }
            Action::AddToGroup { user, group } => write!(f, "add {user} to group {group}"),
            Action::SetPasswordHash { user, .. } => write!(f, "set password hash of {user}"),
            Action::LockPassword { user } => write!(f, "lock password of {user}"),
            Action::AuthorizedKeys { user, home, keys } => write!(
                f,
                "add {} ssh key(s) to {}/.ssh/authorized_keys of {user}",
                keys.len(),
                home.display()
            ),
            Action::WriteFile(w) => {
                let verb = if w.append { "append to" } else { "write" };
                write!(
                    f,
                    "{verb} {} ({} bytes, mode {:04o}, owner {})",
                    w.path.display(),
                    w.content.len(),
                    w.mode,
                    w.owner.as_deref().unwrap_or("root:root")
                )
            }
            Action::ReloadNetwork => write!(f, "reload systemd-networkd"),
            Action::DaemonReload => write!(f, "reload systemd units"),
            Action::Systemctl { verb, unit } => write!(f, "{} {unit}", verb.as_str()),
        }
    }
}

impl Plan {
    /// The human-readable form `osctl provision validate` prints.
    pub fn render(&self) -> String {
        let mut out = String::new();
        if self.steps.is_empty() {
            out.push_str("nothing to apply\n");
        } else {
            out.push_str(&format!("{} step(s):\n", self.steps.len()));
            for (i, s) in self.steps.iter().enumerate() {
                out.push_str(&format!("{:>4}. {s}\n", i + 1));
            }
        }
        for w in &self.warnings {
            out.push_str(&format!("warning: {w}\n"));
        }
        out
    }
}
