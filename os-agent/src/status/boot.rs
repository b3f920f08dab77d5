//! The boot loader entry (UKI) systemd-boot says it started.

use crate::host::Host;
use anyhow::{bail, Context, Result};
use std::io;
use std::path::{Path, PathBuf};

/// systemd-boot's vendor GUID for its EFI variables.
pub const LOADER_GUID: &str = "4a67b082-0a4c-41cf-b6c7-440b29bb8c4f";
pub const EFIVARS: &str = "/sys/firmware/efi/efivars";
/// Where type #2 entries (UKIs) live on the ESP, mounted at /efi.
pub const UKI_DIR: &str = "/efi/EFI/Linux";

/// Decodes an efivarfs file holding a UTF-16LE string: 4 bytes of attributes,
/// then the string, usually NUL-terminated.
pub fn decode_efi_string(raw: &[u8]) -> Result<String> {
    if raw.len() < 4 || (raw.len() - 4) % 2 == 1 {
        bail!("EFI variable of {} bytes is not a UTF-16 string", raw.len());
    }
    let units: Vec<u16> = raw[4..]
        .chunks(2)
        .map(|c| u16::from_le_bytes([c[0], c[1]]))
        .take_while(|&u| u != 0)
        .collect();
    String::from_utf16(&units).context("EFI variable is not valid UTF-16")
}

/// The entry id systemd-boot booted (LoaderEntrySelected), if it set one.
pub fn selected_entry(host: &dyn Host) -> Result<Option<String>> {
    let path = PathBuf::from(format!("{EFIVARS}/LoaderEntrySelected-{LOADER_GUID}"));
    match host.read(&path) {
        Ok(raw) => decode_efi_string(&raw)
            .with_context(|| format!("cannot decode {}", path.display()))
            .map(Some),
        // Not booted by systemd-boot (or not via UEFI): there is no entry.
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("cannot read {}", path.display())),
    }
}

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
pub fn uki_path(host: &dyn Host, entry: &str) -> Result<Option<PathBuf>> {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::disk::fixture::write;
    use crate::host::DirHost;

    fn efi_string(s: &str) -> Vec<u8> {
        let mut v = vec![6, 0, 0, 0];
        for u in s.encode_utf16().chain([0]) {
            v.extend(u.to_le_bytes());
        }
        v
    }

    #[test]
    fn strips_counters() {
        let cases = [
            ("ballast-1.0+3.efi", "ballast-1.0.efi"),
            ("ballast-1.0+2-1.efi", "ballast-1.0.efi"),
            ("ballast-1.0+0-3.efi", "ballast-1.0.efi"),
            ("ballast-1.0.efi", "ballast-1.0.efi"),
            ("ballast-1.0+rc1.efi", "ballast-1.0+rc1.efi"),
            ("ballast+1-x.efi", "ballast+1-x.efi"),
            ("entry+2", "entry"),
        ];
        for (input, want) in cases {
            assert_eq!(strip_boot_counter(input), want, "{input}");
        }
    }

    #[test]
    fn reads_the_selected_entry_and_finds_its_uki() {
        let dir = tempfile::tempdir().unwrap();
        let host = DirHost::new(dir.path()).unwrap();
        assert_eq!(selected_entry(&host).unwrap(), None);

        let var = format!("sys/firmware/efi/efivars/LoaderEntrySelected-{LOADER_GUID}");
        let p = dir.path().join(&var);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(&p, efi_string("ballast-1.0+2-1.efi")).unwrap();
        let entry = selected_entry(&host).unwrap().unwrap();
        assert_eq!(entry, "ballast-1.0+2-1.efi");

        assert_eq!(uki_path(&host, &entry).unwrap(), None);
        write(dir.path(), "efi/EFI/Linux/ballast-1.0.efi", "");
        assert_eq!(
            uki_path(&host, &entry).unwrap(),
            Some(PathBuf::from("/efi/EFI/Linux/ballast-1.0.efi"))
        );
        write(dir.path(), "efi/EFI/Linux/ballast-1.0+2-1.efi", "");
        assert_eq!(
            uki_path(&host, &entry).unwrap(),
            Some(PathBuf::from("/efi/EFI/Linux/ballast-1.0+2-1.efi"))
        );

        std::fs::write(&p, [6, 0, 0, 0, 0x41]).unwrap();
        let e = format!("{:#}", selected_entry(&host).unwrap_err());
        assert!(
            e.contains("cannot decode") && e.contains("not a UTF-16 string"),
            "{e}"
        );
    }
}
