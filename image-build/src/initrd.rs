//! The initrd: dracut, run inside the image's own root so the initrd matches
//! its kernel, systemd and udev. Cached by everything that goes into it.

use crate::stage::Stage;
use anyhow::{bail, Context, Result};
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use std::process::Command;

const RECIPE: &str = "initrd-v3";

/// zstd level of the initrd (the kernel unpacks zstd; dracut itself would
/// need zstd inside the image).
const ZSTD_LEVEL: i32 = 19;

/// dracut modules of the initrd: systemd-based, verity, and Ballast's own
/// module that mounts /var and the /etc overlay (units/dracut/).
const MODULES: &str =
    "systemd systemd-initrd systemd-veritysetup dm kernel-modules rootfs-block udev-rules base fs-lib ballast";

/// The only drivers of the initrd (dracut `--drivers`, with their
/// dependencies): what finds and mounts the root and /var. Without the list
/// dracut's kernel-modules takes every filesystem, block, SCSI, HID and
/// crypto module of the kernel (38 MB of the 68 MB the initrd was). The
/// rest load from the root after the switch. Those the kernel lacks (say,
/// ahci on the cloud kernel) are left out rather than failing dracut.
const DRIVERS: &[&str] = &[
    // VMs
    "virtio_blk",
    "virtio_pci",
    "virtio_scsi",
    "xen-blkfront",
    "hv_storvsc",
    // Metal: NVMe, SATA, SAS/RAID HBAs, USB sticks, SD/eMMC.
    "nvme",
    "ahci",
    "ata_piix",
    "sd_mod",
    "mpt3sas",
    "megaraid_sas",
    "xhci_pci",
    "ehci_pci",
    "usb_storage",
    "uas",
    "sdhci_pci",
    "mmc_block",
    // The root, the data partition and the /etc overlay.
    "dm-verity",
    "erofs",
    "ext4",
    "overlay",
];

/// The drivers of `DRIVERS` this kernel has, as modules or built in.
pub fn available_drivers(root: &Path, kver: &str) -> Result<Vec<&'static str>> {
    let dir = root.join("usr/lib/modules").join(kver);
    let mut known = String::new();
    for f in ["modules.dep", "modules.builtin"] {
        let p = dir.join(f);
        known.push_str(
            &std::fs::read_to_string(&p).with_context(|| format!("cannot read {}", p.display()))?,
        );
    }
    let names: std::collections::BTreeSet<String> = known
        .lines()
        .filter_map(|l| l.split(':').next())
        .map(crate::modules::module_name)
        .collect();
    Ok(DRIVERS
        .iter()
        .copied()
        .filter(|d| names.contains(&d.replace('-', "_")))
        .collect())
}

fn hash_tree(h: &mut Sha256, dir: &Path) -> Result<()> {
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .with_context(|| format!("cannot read {}", dir.display()))?
        .collect::<Result<_, _>>()?;
    entries.sort_by_key(|e| e.file_name());
    for e in entries {
        let p = e.path();
        h.update(e.file_name().as_encoded_bytes());
        if p.is_dir() {
            hash_tree(h, &p)?;
        } else {
            h.update(std::fs::read(&p)?);
        }
    }
    Ok(())
}

pub struct InitrdInputs<'a> {
    pub root: &'a Path,
    pub kver: &'a str,
    pub rootfs_key: &'a str,
    pub units_dir: &'a Path,
    pub epoch: u64,
    pub cache_dir: &'a Path,
}

pub fn build(stage: &Stage, inp: &InitrdInputs, out: &Path) -> Result<()> {
    let drivers = available_drivers(inp.root, inp.kver)?;
    // dracut's dm module takes all of drivers/md (RAID, bcache, thin, cache,
    // multipath: 3.5 MB of cpio); the boot needs dm-verity and what it needs.
    let omit = crate::modules::unneeded_under(inp.root, inp.kver, "drivers/md", &drivers)?;
    let mut h = Sha256::new();
    for part in [RECIPE, inp.rootfs_key, inp.kver, MODULES] {
        h.update(part.as_bytes());
        h.update([0]);
    }
    h.update(drivers.join(" ").as_bytes());
    h.update([0]);
    h.update(omit.join(" ").as_bytes());
    h.update(inp.epoch.to_le_bytes());
    let dracut_dir = inp.units_dir.join("dracut");
    if dracut_dir.is_dir() {
        hash_tree(&mut h, &dracut_dir)?;
    }
    let key = hex::encode(&h.finalize()[..12]);
    let cached: PathBuf = inp.cache_dir.join("initrd").join(format!("{key}.img"));
    if cached.is_file() {
        stage.log(&format!("using cached initrd {}", cached.display()))?;
        std::fs::copy(&cached, out)?;
        return Ok(());
    }
    let inner = "/tmp/ballast-initrd.img";
    stage.cmd(
        Command::new("chroot")
            .arg(inp.root)
            .args([
                "dracut",
                "--no-hostonly",
                "--reproducible",
                "--force",
                "--no-compress",
                "--tmpdir",
                "/tmp",
                "--kver",
            ])
            .arg(inp.kver)
            .arg("-m")
            .arg(MODULES)
            .arg("--drivers")
            .arg(drivers.join(" "))
            .arg("--omit-drivers")
            .arg(omit.join(" "))
            .arg(inner)
            .env("SOURCE_DATE_EPOCH", inp.epoch.to_string()),
    )?;
    let produced = inp.root.join(inner.trim_start_matches('/'));
    if !produced.is_file() {
        bail!("dracut succeeded but wrote no {inner}");
    }
    std::fs::create_dir_all(cached.parent().unwrap_or(inp.cache_dir))?;
    let tmp = cached.with_extension("tmp");
    let cpio = std::fs::File::open(&produced)
        .with_context(|| format!("cannot open {}", produced.display()))?;
    let raw = cpio.metadata()?.len();
    let mut enc = zstd::Encoder::new(std::fs::File::create(&tmp)?, ZSTD_LEVEL)?;
    // As the kernel's own build compresses (`zstd -19`): an 8 MiB window.
    enc.include_checksum(true)?;
    enc.window_log(23)?;
    std::io::copy(&mut std::io::BufReader::new(cpio), &mut enc)?;
    enc.finish()?.sync_all()?;
    std::fs::remove_file(&produced)?;
    std::fs::rename(&tmp, &cached)?;
    std::fs::copy(&cached, out)?;
    stage.log(&format!(
        "initrd: {} MB of cpio, {} MB compressed",
        raw / 1_000_000,
        std::fs::metadata(out)?.len() / 1_000_000
    ))?;
    Ok(())
}
