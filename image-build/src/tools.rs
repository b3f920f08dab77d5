//! Host tools image-build runs, and the Debian package that provides each, so
//! a missing tool is an error that says what to install.

use anyhow::{bail, Result};
use std::path::PathBuf;

pub const REQUIRED: &[(&str, &str)] = &[
    ("mmdebstrap", "mmdebstrap"),
    ("mkfs.erofs", "erofs-utils"),
    ("mkfs.vfat", "dosfstools"),
    ("mmd", "mtools"),
    ("mcopy", "mtools"),
    ("objcopy", "binutils"),
    ("mkfs.ext4", "e2fsprogs"),
    ("qemu-img", "qemu-utils"),
    ("dpkg-query", "dpkg"),
    ("chroot", "coreutils"),
    ("mount", "mount"),
    ("umount", "mount"),
];

/// Finds `tool` on PATH (plus the sbin directories, which a non-login root
/// shell may lack).
pub fn which(tool: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin", "/usr/bin", "/bin"].map(PathBuf::from))
        .map(|d| d.join(tool))
        .find(|p| p.is_file())
}

/// Checks every required tool; the error lists all that are missing and the
/// `apt-get install` line that fixes it.
pub fn check() -> Result<()> {
    check_list(REQUIRED)
}

pub fn check_list(list: &[(&str, &str)]) -> Result<()> {
    let missing: Vec<_> = list.iter().filter(|(t, _)| which(t).is_none()).collect();
    if missing.is_empty() {
        return Ok(());
    }
    let tools: Vec<_> = missing.iter().map(|(t, _)| *t).collect();
    let mut pkgs: Vec<_> = missing.iter().map(|(_, p)| *p).collect();
    pkgs.dedup();
    bail!(
        "missing host tools: {} (install with: apt-get install {})",
        tools.join(", "),
        pkgs.join(" ")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_tool_names_its_package() {
        let err = check_list(&[("sh", "dash"), ("no-such-tool-xyz", "xyz-utils")])
            .unwrap_err()
            .to_string();
        assert!(err.contains("no-such-tool-xyz"), "{err}");
        assert!(err.contains("apt-get install xyz-utils"), "{err}");
        assert!(!err.contains("dash"), "{err}");
        check_list(&[("sh", "dash")]).unwrap();
    }
}
