//! The EFI system partition: systemd-boot as the removable-media loader, a
//! loader.conf that picks the newest good entry, and the UKI under a
//! boot-counting name. Built as a FAT image with mtools: no mounts, no loop devices.

use crate::stage::Stage;
use anyhow::Result;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Boot attempts a new entry gets before systemd-boot falls back.
pub const TRIES: u32 = 3;

pub fn uki_entry_name(name: &str, version: &str) -> String {
    format!("{name}-{version}+{TRIES}.efi")
}

/// loader.conf: boot at once, no editor, the newest entry of this image that
/// has tries left. systemd-boot 252 keeps `+N-M` in entry ids, hence the glob.
/// `secure_boot_enroll` is systemd-boot's `secure-boot-enroll` when the
/// image carries keys to enroll.
pub fn loader_conf(name: &str, secure_boot_enroll: Option<&str>) -> String {
    let mut conf = format!("timeout 0\ndefault {name}-*\neditor no\nconsole-mode keep\nauto-entries no\nauto-firmware no\n");
    if let Some(enroll) = secure_boot_enroll {
        conf.push_str(&format!("secure-boot-enroll {enroll}\n"));
    }
    conf
}

pub struct EspInputs<'a> {
    pub size_mib: u64,
    pub volume_id: u32,
    pub systemd_boot: &'a Path,
    pub uki: &'a Path,
    pub uki_entry: &'a str,
    pub loader_conf: &'a str,
    /// Signed variable updates for systemd-boot to enroll, copied to
    /// `loader/keys/auto/` under their file names.
    pub enroll_keys: &'a [PathBuf],
    pub epoch: u64,
}

pub fn build(stage: &Stage, inp: &EspInputs, out: &Path, work: &Path) -> Result<()> {
    if out.exists() {
        std::fs::remove_file(out)?;
    }
    std::fs::File::create(out)?.set_len(inp.size_mib << 20)?;
    stage.cmd(
        Command::new("mkfs.vfat")
            .args(["-F", "32", "-S", "512", "-s", "1", "-n", "ESP", "-i"])
            .arg(format!("{:08x}", inp.volume_id))
            .arg(out)
            .env("SOURCE_DATE_EPOCH", inp.epoch.to_string()),
    )?;
    let img = out.to_string_lossy().into_owned();
    let mtools = |c: &str| {
        let mut cmd = Command::new(c);
        cmd.env("MTOOLS_SKIP_CHECK", "1").arg("-i").arg(&img);
        cmd
    };
    stage.cmd(mtools("mmd").args([
        "::/EFI",
        "::/EFI/BOOT",
        "::/EFI/systemd",
        "::/EFI/Linux",
        "::/loader",
    ]))?;
    let conf = work.join("loader.conf");
    std::fs::write(&conf, inp.loader_conf)?;
    stage.cmd(
        mtools("mcopy")
            .arg(inp.systemd_boot)
            .arg("::/EFI/BOOT/BOOTX64.EFI"),
    )?;
    stage.cmd(
        mtools("mcopy")
            .arg(inp.systemd_boot)
            .arg("::/EFI/systemd/systemd-bootx64.efi"),
    )?;
    stage.cmd(mtools("mcopy").arg(&conf).arg("::/loader/loader.conf"))?;
    if !inp.enroll_keys.is_empty() {
        stage.cmd(mtools("mmd").args(["::/loader/keys", "::/loader/keys/auto"]))?;
        for key in inp.enroll_keys {
            let name = key.file_name().unwrap_or_default().to_string_lossy();
            stage.cmd(
                mtools("mcopy")
                    .arg(key)
                    .arg(format!("::/loader/keys/auto/{name}")),
            )?;
        }
    }
    stage.cmd(
        mtools("mcopy")
            .arg(inp.uki)
            .arg(format!("::/EFI/Linux/{}", inp.uki_entry)),
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entry_names_carry_three_tries() {
        assert_eq!(uki_entry_name("ballast", "1.2"), "ballast-1.2+3.efi");
        assert!(loader_conf("ballast", None).contains("default ballast-*\n"));
        assert!(!loader_conf("ballast", None).contains("secure-boot"));
        assert!(loader_conf("ballast", Some("force")).ends_with("\nsecure-boot-enroll force\n"));
    }
}
