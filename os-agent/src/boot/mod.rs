//! Boot entries, in one place: what systemd-boot says through its EFI
//! variables (which entry it booted, which one it is counting), and in
//! [`entries`] the UKI files on the ESP, their boot-counting names, and every
//! write the agent makes to them.

pub mod entries;
pub mod secure_boot;

use crate::host::Host;
use anyhow::{bail, Context, Result};
use std::io;
use std::path::PathBuf;

/// systemd-boot's vendor GUID for its EFI variables.
pub const LOADER_GUID: &str = "4a67b082-0a4c-41cf-b6c7-440b29bb8c4f";
pub const EFIVARS: &str = "/sys/firmware/efi/efivars";

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

/// The file systemd-boot names in `LoaderBootCountPath` when it booted an
/// entry whose tries it counts (a `+N` name), without its directory.
pub fn boot_count_entry(host: &dyn Host) -> Result<Option<String>> {
    let path = PathBuf::from(format!("{EFIVARS}/LoaderBootCountPath-{LOADER_GUID}"));
    let raw = match host.read(&path) {
        Ok(raw) => raw,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
    };
    let text =
        decode_efi_string(&raw).with_context(|| format!("cannot decode {}", path.display()))?;
    Ok(text.rsplit(['\\', '/']).next().map(str::to_string))
}

#[cfg(test)]
mod tests {
    use super::entries::{find_entry_file, strip_boot_counter};
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

        assert_eq!(find_entry_file(&host, &entry).unwrap(), None);
        write(dir.path(), "efi/EFI/Linux/ballast-1.0.efi", "");
        assert_eq!(
            find_entry_file(&host, &entry).unwrap(),
            Some(PathBuf::from("/efi/EFI/Linux/ballast-1.0.efi"))
        );
        write(dir.path(), "efi/EFI/Linux/ballast-1.0+2-1.efi", "");
        assert_eq!(
            find_entry_file(&host, &entry).unwrap(),
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
