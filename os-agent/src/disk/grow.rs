//! Growing the data partition and its ext4 to fill the disk (first boot, or
//! after the operator enlarged the virtual disk).
//!
//! Each step checks the state it would change, so a run after a crash
//! between steps finishes the job and a run on a grown disk does nothing.

use super::{ext4, locate_by_partlabel, size_bytes, start_sector, BlockPartition};
use crate::host::Host;
use anyhow::{bail, Context, Result};
use ballast_common::gpt::{Gpt, SECTOR};
use std::io::{Read, Seek, SeekFrom};

pub const DATA_LABEL: &str = "data";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Wrote the GPT with the bigger partition and the backup at the disk's end.
    WroteTable,
    /// Told the kernel the partition's new size (resizepart).
    ResizedPartition,
    /// Grew the mounted filesystem (resize2fs).
    ResizedFilesystem,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GrowReport {
    pub partition: BlockPartition,
    pub disk_size: u64,
    pub partition_before: u64,
    pub partition_after: u64,
    pub fs_before: u64,
    pub steps: Vec<Step>,
}

/// The LBA the primary GPT header says its backup is at.
fn backup_header_lba<R: Read + Seek>(disk: &mut R) -> std::io::Result<u64> {
    let mut b = [0u8; 8];
    disk.seek(SeekFrom::Start(SECTOR + 32))?;
    disk.read_exact(&mut b)?;
    Ok(u64::from_le_bytes(b))
}

fn run_checked(host: &dyn Host, program: &str, args: &[&str]) -> Result<()> {
    tracing::info!("running {program} {}", args.join(" "));
    crate::host::run_ok(host, program, args).map(drop)
}

/// Grows the partition labelled `data` to the end of its disk, then its ext4.
pub fn grow_data(host: &dyn Host) -> Result<GrowReport> {
    let part = locate_by_partlabel(host, DATA_LABEL)?;
    let disk_size = size_bytes(host, &part.disk)?;
    let disk_dev = part.disk_dev_path();
    let mut disk = host
        .open_rw(&disk_dev)
        .with_context(|| format!("cannot open {} for writing", disk_dev.display()))?;
    let mut gpt = Gpt::read_from(&mut disk, disk_size)
        .with_context(|| format!("cannot read the GPT of {}", disk_dev.display()))?;
    let before = gpt.find(DATA_LABEL)?.clone();
    // The kernel's partition and the table's must be the same one, or
    // resizepart would move the wrong partition's end.
    let kernel_start = start_sector(host, &part.name)?;
    if kernel_start != before.first_lba {
        bail!(
            "/dev/{} starts at sector {kernel_start} but the GPT's {DATA_LABEL:?} at {}",
            part.name,
            before.first_lba
        );
    }
    let mut steps = Vec::new();

    let backup_lba = backup_header_lba(&mut disk)
        .with_context(|| format!("cannot read the GPT header of {}", disk_dev.display()))?;
    let grew = gpt.grow_to(disk_size, DATA_LABEL)?;
    if grew || backup_lba != gpt.last_lba() {
        gpt.write_to(&mut disk)
            .with_context(|| format!("cannot write the GPT of {}", disk_dev.display()))?;
        disk.sync_all()
            .with_context(|| format!("cannot fsync {}", disk_dev.display()))?;
        steps.push(Step::WroteTable);
    }
    drop(disk);
    let after = gpt.find(DATA_LABEL)?.clone();

    if size_bytes(host, &part.name)? != after.size() {
        let disk_arg = disk_dev.to_string_lossy();
        let number = part.number.to_string();
        let sectors = (after.size() / SECTOR).to_string();
        run_checked(host, "resizepart", &[&disk_arg, &number, &sectors])?;
        steps.push(Step::ResizedPartition);
    }

    let part_dev = part.dev_path();
    let mut dev = host
        .open(&part_dev)
        .with_context(|| format!("cannot open {}", part_dev.display()))?;
    let fs = ext4::geometry(&mut dev)
        .with_context(|| format!("cannot read the filesystem on {}", part_dev.display()))?;
    drop(dev);
    let gap = after.size().saturating_sub(fs.size);
    // After growing the partition any whole free block counts; otherwise only
    // a gap resize2fs would fill (it may leave a too-small last group).
    let threshold = if steps.is_empty() {
        fs.group_size
    } else {
        fs.block_size
    };
    if gap >= threshold.max(1) {
        run_checked(host, "resize2fs", &[&part_dev.to_string_lossy()])?;
        steps.push(Step::ResizedFilesystem);
    }

    Ok(GrowReport {
        partition: part,
        disk_size,
        partition_before: before.size(),
        partition_after: after.size(),
        fs_before: fs.size,
        steps,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::disk::ext4::tests::image;
    use crate::disk::fixture::{ballast_disk, write, MIB};
    use crate::host::CmdOutput;

    #[test]
    fn grows_once_then_does_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let disk_size = 300 * MIB + 4096;
        let (host, built) = ballast_disk(dir.path(), disk_size);
        let data = built.find("data").unwrap().clone();
        // The built filesystem fills the built partition.
        std::fs::write(dir.path().join("dev/vda6"), image(data.size() / 4096, true)).unwrap();

        let r = grow_data(&host).unwrap();
        assert_eq!(
            r.steps,
            vec![
                Step::WroteTable,
                Step::ResizedPartition,
                Step::ResizedFilesystem
            ]
        );
        assert_eq!(r.partition_before, 4 * MIB);
        // Aligned down to 1 MiB, leaving room for the backup table.
        let end = data.offset() + r.partition_after;
        assert_eq!(end % MIB, 0);
        assert!(end <= disk_size - 33 * 512 && end > disk_size - 2 * MIB);
        let sectors = (r.partition_after / 512).to_string();
        assert_eq!(
            host.commands(),
            vec![
                vec![
                    "resizepart".to_string(),
                    "/dev/vda".into(),
                    "6".into(),
                    sectors
                ],
                vec!["resize2fs".to_string(), "/dev/vda6".into()],
            ]
        );
        // The table on disk is the grown one, primary and backup.
        let mut f = std::fs::File::open(dir.path().join("dev/vda")).unwrap();
        let on_disk = Gpt::read_from(&mut f, disk_size).unwrap();
        assert_eq!(on_disk.find("data").unwrap().size(), r.partition_after);
        assert_eq!(backup_header_lba(&mut f).unwrap(), disk_size / 512 - 1);
        // sfdisk (util-linux, as gpt.rs's tests) is the independent reader.
        let out = std::process::Command::new("sfdisk")
            .arg("--verify")
            .arg(dir.path().join("dev/vda"))
            .output()
            .expect("sfdisk not found: install util-linux / fdisk");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stdout)
        );

        // What the kernel and resize2fs did.
        write(
            dir.path(),
            "sys/devices/virtual/block/vda/vda6/size",
            &format!("{}\n", r.partition_after / 512),
        );
        std::fs::write(
            dir.path().join("dev/vda6"),
            image(r.partition_after / 4096 - 3, true),
        )
        .unwrap();

        let again = grow_data(&host).unwrap();
        assert_eq!(again.steps, vec![]);
        assert_eq!(again.partition_before, again.partition_after);
        assert_eq!(host.commands().len(), 2);
    }

    #[test]
    fn finishes_after_a_crash_between_steps() {
        let dir = tempfile::tempdir().unwrap();
        let (host, built) = ballast_disk(dir.path(), 300 * MIB);
        let data = built.find("data").unwrap().clone();
        std::fs::write(dir.path().join("dev/vda6"), image(data.size() / 4096, true)).unwrap();
        // resize2fs "crashes" on the first run.
        host.set_output(
            "resize2fs",
            CmdOutput {
                code: Some(1),
                stderr: "boom".into(),
                ..CmdOutput::default()
            },
        );
        let e = grow_data(&host).unwrap_err().to_string();
        assert!(
            e.contains("resize2fs /dev/vda6 failed: exit code 1: boom"),
            "{e}"
        );
        host.set_output(
            "resize2fs",
            CmdOutput {
                code: Some(0),
                ..CmdOutput::default()
            },
        );
        let grown = Gpt::read_from(
            &mut std::fs::File::open(dir.path().join("dev/vda")).unwrap(),
            300 * MIB,
        )
        .unwrap();
        let size = grown.find("data").unwrap().size();
        write(
            dir.path(),
            "sys/devices/virtual/block/vda/vda6/size",
            &format!("{}\n", size / 512),
        );

        let r = grow_data(&host).unwrap();
        assert_eq!(r.steps, vec![Step::ResizedFilesystem]);
    }

    #[test]
    fn refuses_when_kernel_and_table_disagree() {
        let dir = tempfile::tempdir().unwrap();
        let (host, _) = ballast_disk(dir.path(), 300 * MIB);
        write(
            dir.path(),
            "sys/devices/virtual/block/vda/vda6/start",
            "2048\n",
        );
        let e = grow_data(&host).unwrap_err().to_string();
        assert!(
            e.contains("/dev/vda6 starts at sector 2048 but the GPT's \"data\""),
            "{e}"
        );
        assert!(host.commands().is_empty());
    }
}
