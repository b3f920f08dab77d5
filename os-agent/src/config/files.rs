//! Finding the agent's configuration files in systemd's precedence.

use crate::host::Host;
use anyhow::{Context, Result};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// The main file, shipped in the image.
pub const MAIN: &str = "/usr/lib/ballast/agent.toml";

/// Drop-in directories, lowest precedence first.
pub const DROPIN_DIRS: [&str; 3] = [
    "/usr/lib/ballast/agent.d",
    "/etc/ballast/agent.d",
    "/run/ballast/agent.d",
];

/// The files to apply, in order: the main file if present, then the drop-ins
/// sorted by file name, where a file in a later directory masks one of the
/// same name in an earlier directory (as systemd does for its own drop-ins).
pub fn config_files(host: &dyn Host) -> Result<Vec<PathBuf>> {
    config_files_with(host, None)
}

/// As [`config_files`], with `extra` (a drop-in not written yet) in the place
/// it would take once written.
pub fn config_files_with(host: &dyn Host, extra: Option<&Path>) -> Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    let main = Path::new(MAIN);
    if host
        .exists(main)
        .with_context(|| format!("cannot check {MAIN}"))?
    {
        files.push(main.to_path_buf());
    }
    let mut dropins: BTreeMap<String, PathBuf> = BTreeMap::new();
    for dir in DROPIN_DIRS {
        let names = host
            .list_dir(Path::new(dir))
            .with_context(|| format!("cannot list {dir}"))?;
        for name in names.into_iter().filter(|n| n.ends_with(".toml")) {
            let path = Path::new(dir).join(&name);
            dropins.insert(name, path);
        }
        if let Some(p) = extra.filter(|p| p.parent() == Some(Path::new(dir))) {
            if let Some(name) = p.file_name() {
                dropins.insert(name.to_string_lossy().into_owned(), p.to_path_buf());
            }
        }
    }
    files.extend(dropins.into_values());
    Ok(files)
}
