//! Carrying out a [`Plan`] through the [`Host`]: step by step, stopping at
//! the first failure, with an outcome for every step.

use super::plan::{Action, FileWrite, Step};
use super::yaml::Command;
use crate::host::{CmdOutput, Host};
use serde::{Deserialize, Serialize};
use std::io;
use std::path::{Path, PathBuf};

/// What became of one step.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "outcome", rename_all = "kebab-case")]
pub enum StepOutcome {
    Applied,
    Failed {
        error: String,
    },
    /// Not tried, because an earlier step failed.
    Skipped,
    /// Not tried yet: the record is written before applying, so a host
    /// that stops halfway leaves these behind.
    Pending,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StepRecord {
    /// The step as the plan shows it (`users[0]: create user alice`).
    pub step: String,
    #[serde(flatten)]
    pub outcome: StepOutcome,
}

#[derive(thiserror::Error, Debug)]
pub enum ApplyError {
    #[error("{what} {}: {source}", path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot run {cmd}: {source}")]
    Spawn {
        cmd: String,
        #[source]
        source: io::Error,
    },
    #[error("{cmd} failed: {how}")]
    Command { cmd: String, how: String },
}

/// Records with every step pending, written before applying.
pub fn pending(steps: &[Step]) -> Vec<StepRecord> {
    steps
        .iter()
        .map(|s| StepRecord {
            step: s.to_string(),
            outcome: StepOutcome::Pending,
        })
        .collect()
}

/// Applies the steps in order; after a failure the rest are skipped. Returns
/// every step's outcome and the first error.
pub fn apply(host: &dyn Host, steps: &[Step]) -> (Vec<StepRecord>, Option<String>) {
    let mut records = Vec::new();
    let mut first_error = None;
    for s in steps {
        let outcome = if first_error.is_some() {
            StepOutcome::Skipped
        } else {
            match apply_one(host, &s.action) {
                Ok(()) => {
                    tracing::info!("provision: {s}");
                    StepOutcome::Applied
                }
                Err(e) => {
                    let error = e.to_string();
                    tracing::error!("provision: {s}: {error}");
                    first_error = Some(format!("{s}: {error}"));
                    StepOutcome::Failed { error }
                }
            }
        };
        records.push(StepRecord {
            step: s.to_string(),
            outcome,
        });
    }
    (records, first_error)
}

/// Runs a command; `shown` is how it appears in errors (secrets left out).
fn run_shown(
    host: &dyn Host,
    program: &str,
    args: &[&str],
    shown: String,
) -> Result<CmdOutput, ApplyError> {
    let out = host
        .run(program, args)
        .map_err(|source| ApplyError::Spawn {
            cmd: shown.clone(),
            source,
        })?;
    if !out.success() {
        return Err(ApplyError::Command {
            cmd: shown,
            how: out.describe(),
        });
    }
    Ok(out)
}

fn run(host: &dyn Host, program: &str, args: &[&str]) -> Result<CmdOutput, ApplyError> {
    let shown = std::iter::once(program)
        .chain(args.iter().copied())
        .collect::<Vec<_>>()
        .join(" ");
    run_shown(host, program, args, shown)
}

fn path_str(p: &Path) -> Result<&str, ApplyError> {
    p.to_str().ok_or_else(|| ApplyError::Io {
        what: "path is not UTF-8:",
        path: p.to_path_buf(),
        source: io::Error::from(io::ErrorKind::InvalidInput),
    })
}

fn read_existing(host: &dyn Host, path: &Path) -> Result<Vec<u8>, ApplyError> {
    match host.read(path) {
        Ok(b) => Ok(b),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(source) => Err(ApplyError::Io {
            what: "reading",
            path: path.to_path_buf(),
            source,
        }),
    }
}

/// Writes atomically (temporary file + rename), then sets mode and owner.
/// The temporary file is 0600 root, so the file is never more open than asked.
fn write_file(host: &dyn Host, w: &FileWrite) -> Result<(), ApplyError> {
    let content = if w.append {
        let mut old = read_existing(host, &w.path)?;
        old.extend_from_slice(&w.content);
        old
    } else {
        w.content.clone()
    };
    host.write_atomic(&w.path, &content)
        .map_err(|source| ApplyError::Io {
            what: "writing",
            path: w.path.clone(),
            source,
        })?;
    let p = path_str(&w.path)?;
    run(host, "chmod", &[&format!("{:04o}", w.mode), p])?;
    if let Some(owner) = &w.owner {
        run(host, "chown", &[owner, p])?;
    }
    Ok(())
}

fn authorized_keys(
    host: &dyn Host,
    user: &str,
    home: &Path,
    keys: &[String],
) -> Result<(), ApplyError> {
    let dir = home.join(".ssh");
    let file = dir.join("authorized_keys");
    let old = String::from_utf8_lossy(&read_existing(host, &file)?).into_owned();
    let mut text = old.clone();
    if !text.is_empty() && !text.ends_with('\n') {
        text.push('\n');
    }
    for k in keys {
        if !old.lines().any(|l| l.trim() == k) {
            text.push_str(k);
            text.push('\n');
        }
    }
    host.write_atomic(&file, text.as_bytes())
        .map_err(|source| ApplyError::Io {
            what: "writing",
            path: file.clone(),
            source,
        })?;
    let (d, f) = (path_str(&dir)?, path_str(&file)?);
    run(host, "chmod", &["0700", d])?;
    run(host, "chmod", &["0600", f])?;
    // `user:` is the user and their login group.
    let owner = format!("{user}:");
    run(host, "chown", &[&owner, d, f])?;
    Ok(())
}

fn apply_one(host: &dyn Host, a: &Action) -> Result<(), ApplyError> {
    match a {
        Action::Run { cmd, .. } => {
            let out = match cmd {
                Command::Shell(s) => run(host, "/bin/sh", &["-c", s])?,
                Command::Argv(argv) => {
                    let rest: Vec<&str> = argv[1..].iter().map(String::as_str).collect();
                    run(host, &argv[0], &rest)?
                }
            };
            for (stream, text) in [("stdout", &out.stdout), ("stderr", &out.stderr)] {
                if !text.trim().is_empty() {
                    tracing::info!("{cmd} {stream}: {}", text.trim_end());
                }
            }
        }
        Action::SetHostname { hostname, .. } => {
            write_file(
                host,
                &FileWrite {
                    path: PathBuf::from("/etc/hostname"),
                    content: format!("{hostname}\n").into_bytes(),
                    mode: 0o644,
                    owner: None,
                    append: false,
                },
            )?;
            run(host, "hostname", &[hostname])?;
        }
        Action::SetTimezone { zone } => {
            let target = format!("/usr/share/zoneinfo/{zone}");
            run(host, "ln", &["-sfn", &target, "/etc/localtime"])?;
            write_file(
                host,
                &FileWrite {
                    path: PathBuf::from("/etc/timezone"),
                    content: format!("{zone}\n").into_bytes(),
                    mode: 0o644,
                    owner: None,
                    append: false,
                },
            )?;
        }
        Action::CreateGroup { name } => {
            run(host, "groupadd", &[name])?;
        }
        Action::CreateUser {
            name,
            gecos,
            groups,
            shell,
            homedir,
        } => {
            let groups = groups.join(",");
            let mut args = vec!["-m"];
            for (flag, v) in [
                ("--comment", gecos),
                ("--shell", shell),
                ("--home-dir", homedir),
            ] {
                if let Some(v) = v {
                    args.extend([flag, v.as_str()]);
                }
            }
            if !groups.is_empty() {
                args.extend(["--groups", &groups]);
            }
            args.push(name);
            run(host, "useradd", &args)?;
        }
        Action::ModifyUser {
            name,
            gecos,
            groups,
            shell,
        } => {
            let groups = groups.join(",");
            let mut args = Vec::new();
            for (flag, v) in [("--comment", gecos), ("--shell", shell)] {
                if let Some(v) = v {
                    args.extend([flag, v.as_str()]);
                }
            }
            if !groups.is_empty() {
                args.extend(["--append", "--groups", &groups]);
            }
            args.push(name);
            run(host, "usermod", &args)?;
        }
        Action::AddToGroup { user, group } => {
            run(host, "usermod", &["--append", "--groups", group, user])?;
        }
        Action::SetPasswordHash { user, hash } => {
            let shown = format!("usermod --password <hash> {user}");
            run_shown(host, "usermod", &["--password", hash, user], shown)?;
        }
        Action::LockPassword { user } => {
            run(host, "usermod", &["--lock", user])?;
        }
        Action::AuthorizedKeys { user, home, keys } => authorized_keys(host, user, home, keys)?,
        Action::WriteFile(w) => write_file(host, w)?,
        Action::ReloadNetwork => {
            run(host, "networkctl", &["reload"])?;
        }
        Action::DaemonReload => {
            run(host, "systemctl", &["daemon-reload"])?;
        }
        Action::Systemctl { verb, unit } => {
            // Provisioning runs during boot: waiting for a start job could
            // wait for a unit ordered after us, so queue it and go on.
            let mut args = vec![verb.as_str()];
            if !matches!(verb, super::plan::UnitVerb::Enable) {
                args.push("--no-block");
            }
            args.push(unit);
            run(host, "systemctl", &args)?;
        }
    }
    Ok(())
}
