//! Unified kernel images on the ESP (/efi/EFI/Linux): which one booted, which
//! belong to which version, and the boot-counting names systemd-boot reads
//! (`<name>-<version>+LEFT[-DONE].efi`).

use crate::host::Host;
use crate::update::io::HashingReader;
use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};

/// Where type #2 entries (UKIs) live on the ESP, mounted at /efi.
pub const UKI_DIR: &str = "/efi/EFI/Linux";

/// Removes a boot-counting suffix: `name-1.0+2-1.efi` → `name-1.0.efi`.
pub fn strip_boot_counter(entry: &str) -> String {
    let (stem, ext) = match entry.strip_suffix(".efi") {
        Some(s) => (s, ".efi"),
        None => (entry, ""),
    };
    if let Some((base, counter)) = stem.rsplit_once('+') {
        let digits = |s: &str| !s.is_empty() && s.chars().all(|c| c.is_ascii_digit());
        let is_counter = match counter.split_once('-') {
            Some((left, done)) => digits(left) && digits(done),
            None => digits(counter),
        };
        if is_counter {
            return format!("{base}{ext}");
        }
    }
    entry.to_string()
}

/// The UKI file of an entry on the ESP: under its own name, or, once
/// systemd-bless-boot renamed it, under the name without the counter.
pub fn find_entry_file(host: &dyn Host, entry: &str) -> Result<Option<PathBuf>> {
    for name in [entry.to_string(), strip_boot_counter(entry)] {
        let path = Path::new(UKI_DIR).join(name);
        if host
            .exists(&path)
            .with_context(|| format!("cannot check {}", path.display()))?
        {
            return Ok(Some(path));
        }
    }
    Ok(None)
}

/// Tries a new entry gets: systemd-boot falls back after this many failed boots.
pub const TRIES: u32 = 3;

/// `name+LEFT-DONE.efi` → (LEFT, DONE); `None` without a counter.
pub fn counter(file: &str) -> Option<(u32, u32)> {
    let stem = file.strip_suffix(".efi")?;
    let (_, c) = stem.rsplit_once('+')?;
    let (left, done) = c.split_once('-').unwrap_or((c, "0"));
    Some((left.parse().ok()?, done.parse().ok()?))
}

/// The version an entry file of image `name` carries.
pub fn version_of(name: &str, file: &str) -> Option<String> {
    strip_boot_counter(file)
        .strip_prefix(&format!("{name}-"))?
        .strip_suffix(".efi")
        .map(str::to_string)
}

pub fn uki_path(file: &str) -> PathBuf {
    Path::new(UKI_DIR).join(file)
}

/// The UKI files on the ESP (hidden and temporary files left out).
pub fn list(host: &dyn Host) -> Result<Vec<String>> {
    Ok(host
        .list_dir(Path::new(UKI_DIR))
        .with_context(|| format!("cannot list {UKI_DIR}"))?
        .into_iter()
        .filter(|f| f.ends_with(".efi") && !f.starts_with('.'))
        .collect())
}

/// The file of the entry systemd-boot booted, under its current name
/// (systemd-boot renames it to count the try, bless-boot to bless it).
pub fn booted_file(host: &dyn Host) -> Result<String> {
    let entry = super::selected_entry(host)?.context(
        "systemd-boot did not say which entry it booted (no LoaderEntrySelected EFI variable)",
    )?;
    let want = strip_boot_counter(&entry.to_ascii_lowercase());
    list(host)?
        .into_iter()
        .find(|f| strip_boot_counter(&f.to_ascii_lowercase()) == want)
        .with_context(|| format!("the booted entry {entry} is not in {UKI_DIR}"))
}

/// Makes every change to the ESP so far durable: an fsync of the entry
/// directory, then a `syncfs` of the whole filesystem (vfat keeps the FAT
/// and the entries' sizes apart from the directory; docs/update.md says what
/// a power cut showed was needed).
fn sync_dir(host: &dyn Host) -> Result<()> {
    let dir = host
        .open(Path::new(UKI_DIR))
        .with_context(|| format!("cannot open {UKI_DIR}"))?;
    dir.sync_all()
        .with_context(|| format!("cannot sync {UKI_DIR}"))?;
    rustix::fs::syncfs(&dir).with_context(|| format!("cannot sync the filesystem of {UKI_DIR}"))
}

/// Size and SHA-256 of an entry file as the disk holds it: its cached pages
/// are dropped first (they are clean after a sync), so the read comes from
/// the device, not from what the kernel still remembers having written.
pub fn sha256_on_disk(host: &dyn Host, file: &str) -> Result<(u64, String)> {
    let path = uki_path(file);
    let f = host
        .open(&path)
        .with_context(|| format!("cannot open {}", path.display()))?;
    rustix::fs::fadvise(&f, 0, None, rustix::fs::Advice::DontNeed)
        .with_context(|| format!("cannot drop the cached pages of {}", path.display()))?;
    let mut r = HashingReader::new(f);
    let size = std::io::copy(&mut r, &mut std::io::sink())
        .with_context(|| format!("cannot read {}", path.display()))?;
    Ok((size, r.finish().0))
}

/// What the ESP shows of the entry of one version, seen from a boot of
/// another: the evidence that tells "never tried" from "tried and failed".
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EntryEvidence {
    /// No file, an empty one, or one whose bytes are not the staged UKI: the
    /// install did not reach the disk whole (a power cut), so systemd-boot
    /// could not have booted it.
    Broken { why: String },
    /// The file is whole and its counter untouched (`+LEFT` with nothing
    /// done): systemd-boot never started it.
    Untried { file: String },
    /// systemd-boot counted at least one try (`+LEFT-DONE` with DONE > 0),
    /// or the entry was blessed (no counter).
    Tried { file: String },
}

/// Looks at the entry of `version` of image `name`; `sha256` is the staged
/// UKI's, when known.
pub fn evidence(
    host: &dyn Host,
    name: &str,
    version: &str,
    sha256: Option<&str>,
) -> Result<EntryEvidence> {
    let files: Vec<String> = list(host)?
        .into_iter()
        .filter(|f| version_of(name, f).as_deref() == Some(version))
        .collect();
    let Some(file) = files.first().cloned() else {
        return Ok(EntryEvidence::Broken {
            why: format!("no entry of {version} in {UKI_DIR}"),
        });
    };
    let (size, sha) = sha256_on_disk(host, &file)?;
    if size == 0 {
        return Ok(EntryEvidence::Broken {
            why: format!("{file} is empty"),
        });
    }
    if let Some(want) = sha256 {
        if sha != want {
            return Ok(EntryEvidence::Broken {
                why: format!("{file} has sha256 {sha}, the staged UKI {want}"),
            });
        }
    }
    Ok(match counter(&file) {
        Some((_, 0)) => EntryEvidence::Untried { file },
        _ => EntryEvidence::Tried { file },
    })
}

/// Removes every UKI except `keep` (and leftover temporary files): they may
/// point at the slot about to be overwritten. Returns what it removed.
pub fn remove_all_except(host: &dyn Host, keep: &str) -> Result<Vec<String>> {
    let mut removed = Vec::new();
    for f in host
        .list_dir(Path::new(UKI_DIR))
        .with_context(|| format!("cannot list {UKI_DIR}"))?
    {
        let ours_tmp = f.starts_with('.') && f.contains(".tmp");
        if f == keep || !(f.ends_with(".efi") || ours_tmp) {
            continue;
        }
        let p = uki_path(&f);
        host.remove_file(&p)
            .with_context(|| format!("cannot remove {}", p.display()))?;
        removed.push(f);
    }
    sync_dir(host)?;
    Ok(removed)
}

/// Removes the entry files of one version; returns them.
pub fn remove_version(host: &dyn Host, name: &str, version: &str) -> Result<Vec<String>> {
    let mut removed = Vec::new();
    for f in list(host)? {
        if version_of(name, &f).as_deref() == Some(version) {
            let p = uki_path(&f);
            host.remove_file(&p)
                .with_context(|| format!("cannot remove {}", p.display()))?;
            removed.push(f);
        }
    }
    if !removed.is_empty() {
        sync_dir(host)?;
    }
    Ok(removed)
}

/// Writes a verified UKI under its boot-counting name: temporary file, fsync,
/// rename, fsync under the new name, fsync of the directory, `syncfs`; then
/// reads it back from the disk and compares. Only after this is the new slot
/// bootable, and it stays so through a power cut.
pub fn install(host: &dyn Host, name: &str, version: &str, uki: &[u8]) -> Result<String> {
    let file = format!("{name}-{version}+{TRIES}.efi");
    let path = uki_path(&file);
    host.write_atomic(&path, uki)
        .with_context(|| format!("cannot write {}", path.display()))?;
    sync_dir(host)?;
    let want = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(uki));
    let (size, got) = sha256_on_disk(host, &file)?;
    if size != uki.len() as u64 || got != want {
        bail!(
            "{} reads back as {size} bytes with sha256 {got} after it was synced, \
             not the {} bytes with sha256 {want} written",
            path.display(),
            uki.len()
        );
    }
    Ok(file)
}

/// Marks an entry as having used all its tries (`+0-1`), so systemd-boot
/// sorts it after every entry that has tries left. Returns the new name.
pub fn exhaust(host: &dyn Host, file: &str) -> Result<String> {
    let base = strip_boot_counter(file);
    let Some(stem) = base.strip_suffix(".efi") else {
        bail!("{file} is not a .efi entry");
    };
    let new = format!("{stem}+0-1.efi");
    if new == file {
        return Ok(new);
    }
    // The Host has no rename: copy through a temporary file, then remove the old name.
    let bytes = host
        .read(&uki_path(file))
        .with_context(|| format!("cannot read {}", uki_path(file).display()))?;
    host.write_atomic(&uki_path(&new), &bytes)
        .with_context(|| format!("cannot write {}", uki_path(&new).display()))?;
    host.remove_file(&uki_path(file))
        .with_context(|| format!("cannot remove {}", uki_path(file).display()))?;
    sync_dir(host)?;
    Ok(new)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert_eq!(counter("ballast-1.0+3.efi"), Some((3, 0)));
        assert_eq!(counter("ballast-1.0+0-3.efi"), Some((0, 3)));
        assert_eq!(counter("ballast-1.0.efi"), None);
        assert_eq!(
            version_of("ballast", "ballast-1.0+2-1.efi").as_deref(),
            Some("1.0")
        );
        assert_eq!(
            version_of("ballast", "ballast-1.0.efi").as_deref(),
            Some("1.0")
        );
        assert_eq!(version_of("ballast", "other-1.0.efi"), None);
    }
}
