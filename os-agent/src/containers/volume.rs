//! Where a container's volumes may come from on the host, and making them
//! there without following anyone's symbolic links.
//!
//! A container may bind only its own data directory,
//! `/var/lib/ballast-volumes/<name>/`, and what is below it. Everything else
//! on /var is someone else's: the agent's state under /var/lib/ballast (the
//! /etc overlay's upper directory, the update state, the image store),
//! other containers' data, the journal. Whoever could bind those could write
//! the host's /etc and so become host root; whoever could bind another
//! container's directory could plant a symbolic link there for a third
//! container to follow.
//!
//! The unit creates the host side before nspawn binds it
//! (`os-agent container-volume <name> <path>`, its `ExecStartPre=`): one
//! component at a time, refusing any component that is a symbolic link or
//! not a directory. Nothing can swap a component between that check and
//! nspawn's bind: the per-container directory is written only by root and by
//! the container itself, which is not running while its unit starts, and
//! the directories above it are root's.

use std::io;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};

/// The directory that holds every container's data directory.
pub const VOLUMES_DIR: &str = "/var/lib/ballast-volumes";

/// The agent's own state: never a volume, and named so in errors.
const AGENT_STATE: &str = "/var/lib/ballast";

/// Checks that `host` is container `name`'s own data directory or below it
/// and returns it in plain form (no `//`, `/./` or trailing `/`); the error
/// says why not.
pub fn check_host_path(name: &str, host: &str) -> Result<String, String> {
    let path = Path::new(host);
    if !path.is_absolute() || host.contains('\0') {
        return Err(format!("host path {host:?} is not an absolute path"));
    }
    // nspawn reads `\.` in --bind= as `.`: a path could spell `..` so.
    if host.contains('\\') {
        return Err(format!("host path {host:?} contains a backslash"));
    }
    let mut parts = Vec::new();
    for c in path.components() {
        match c {
            Component::RootDir => {}
            Component::Normal(p) => parts.push(p.to_string_lossy().into_owned()),
            Component::ParentDir | Component::CurDir | Component::Prefix(_) => {
                return Err(format!("host path {host:?} contains `..`"));
            }
        }
    }
    let plain = format!("/{}", parts.join("/"));
    let own = format!("{VOLUMES_DIR}/{name}");
    if Path::new(&plain).starts_with(&own) {
        return Ok(plain);
    }
    let why = if Path::new(&plain).starts_with(AGENT_STATE) {
        format!(
            "{AGENT_STATE} is the agent's own state (the /etc overlay, the update state, the image store)"
        )
    } else if Path::new(&plain).starts_with(VOLUMES_DIR) {
        "that is not this container's data directory".to_string()
    } else {
        "the rest of the host is not the container's".to_string()
    };
    Err(format!(
        "host path {host:?} must be under {own}/, the container's own data directory: {why}"
    ))
}

/// A volume's host directory that cannot be made safely.
#[derive(Debug, thiserror::Error)]
pub enum VolumeError {
    #[error("container {container}: volume {host}: {why}")]
    Refused {
        container: String,
        host: String,
        why: String,
    },
    #[error("container {container}: volume {host}: {path}: {source}")]
    Io {
        container: String,
        host: String,
        path: PathBuf,
        source: io::Error,
    },
}

/// Creates container `name`'s volume directory `host` (checked by
/// [`check_host_path`]) under `base`, which stands for [`VOLUMES_DIR`]
/// (tests give a temporary directory). Missing directories are made (the
/// base 0700, so no host user reaches what a container writes, the rest
/// 0755); an existing component must be a directory, not a symbolic link.
/// Returns the directory's path under `base`.
pub fn create(base: &Path, name: &str, host: &str) -> Result<PathBuf, VolumeError> {
    let refused = |why: String| VolumeError::Refused {
        container: name.to_string(),
        host: host.to_string(),
        why,
    };
    let io_err = |path: &Path, source: io::Error| VolumeError::Io {
        container: name.to_string(),
        host: host.to_string(),
        path: path.to_path_buf(),
        source,
    };
    let plain = check_host_path(name, host).map_err(refused)?;
    let below = Path::new(&plain)
        .strip_prefix(VOLUMES_DIR)
        .map_err(|_| refused(format!("{plain} is not under {VOLUMES_DIR}")))?;
    ensure_dir(base, 0o700).map_err(|e| match e {
        DirError::Io(e) => io_err(base, e),
        DirError::Not(what) => refused(format!("{} is {what}", base.display())),
    })?;
    let mut at = base.to_path_buf();
    for c in below.components() {
        at.push(c);
        ensure_dir(&at, 0o755).map_err(|e| match e {
            DirError::Io(e) => io_err(&at, e),
            DirError::Not(what) => refused(format!(
                "{} is {what}; a volume is bound only through real directories",
                at.display()
            )),
        })?;
    }
    Ok(at)
}

enum DirError {
    Io(io::Error),
    /// What the path is instead of a directory.
    Not(&'static str),
}

/// Makes `path` a directory if nothing is there; refuses a symbolic link or
/// anything else that is not a directory. A new directory gets `mode`.
fn ensure_dir(path: &Path, mode: u32) -> Result<(), DirError> {
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_symlink() => Err(DirError::Not("a symbolic link")),
        Ok(m) if m.is_dir() => Ok(()),
        Ok(_) => Err(DirError::Not("not a directory")),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            std::fs::DirBuilder::new()
                .mode(mode)
                .create(path)
                .map_err(DirError::Io)?;
            // The umask may have taken bits the mode asked for.
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
                .map_err(DirError::Io)
        }
        Err(e) => Err(DirError::Io(e)),
    }
}

#[cfg(test)]
mod tests;
