//! Block devices as sysfs and udev show them: which disk and partition carry
//! a GPT label, how big they are, and the disk's partition table.

pub mod ext4;
pub mod grow;
pub mod slot;

use crate::host::Host;
use anyhow::{bail, Context, Result};
use ballast_common::gpt::{Gpt, SECTOR};
use std::path::{Path, PathBuf};

/// A partition and the disk it is on, by kernel name (`vda6` on `vda`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockPartition {
    pub name: String,
    /// The partition number (1-based), as the kernel and the GPT count.
    pub number: u32,
    pub disk: String,
}

impl BlockPartition {
    pub fn dev_path(&self) -> PathBuf {
        Path::new("/dev").join(&self.name)
    }
    pub fn disk_dev_path(&self) -> PathBuf {
        Path::new("/dev").join(&self.disk)
    }
}

fn file_name(p: &Path) -> Result<String> {
    p.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .with_context(|| format!("{} has no file name", p.display()))
}

/// Finds the partition udev links as /dev/disk/by-partlabel/<label>.
pub fn locate_by_partlabel(host: &dyn Host, label: &str) -> Result<BlockPartition> {
    let link = Path::new("/dev/disk/by-partlabel").join(label);
    let dev = host
        .canonicalize(&link)
        .with_context(|| format!("cannot resolve {}", link.display()))?;
    let name = file_name(&dev)?;
    let class = Path::new("/sys/class/block").join(&name);
    let number_path = class.join("partition");
    let number = host.read_to_string(&number_path).with_context(|| {
        format!(
            "cannot read {} (is {name} a partition?)",
            number_path.display()
        )
    })?;
    let number: u32 = number
        .trim()
        .parse()
        .with_context(|| format!("{}: {number:?} is not a number", number_path.display()))?;
    // /sys/class/block/vda6 -> ../../devices/.../block/vda/vda6: the parent is the disk.
    let sys_dev = host
        .canonicalize(&class)
        .with_context(|| format!("cannot resolve {}", class.display()))?;
    let disk_dir = sys_dev
        .parent()
        .with_context(|| format!("{} has no parent", sys_dev.display()))?;
    let disk = file_name(disk_dir)?;
    if disk == "block" {
        bail!("{} is not below a disk in sysfs", sys_dev.display());
    }
    Ok(BlockPartition { name, number, disk })
}

/// The size of a block device in bytes, from /sys/class/block/<name>/size
/// (always counted in 512-byte sectors).
pub fn size_bytes(host: &dyn Host, name: &str) -> Result<u64> {
    let path = Path::new("/sys/class/block").join(name).join("size");
    let text = host
        .read_to_string(&path)
        .with_context(|| format!("cannot read {}", path.display()))?;
    let sectors: u64 = text
        .trim()
        .parse()
        .with_context(|| format!("{}: {text:?} is not a number", path.display()))?;
    sectors
        .checked_mul(SECTOR)
        .with_context(|| format!("{}: {sectors} sectors overflow", path.display()))
}

/// Where a partition starts on its disk, in 512-byte sectors (sysfs `start`).
pub fn start_sector(host: &dyn Host, name: &str) -> Result<u64> {
    let path = Path::new("/sys/class/block").join(name).join("start");
    let text = host
        .read_to_string(&path)
        .with_context(|| format!("cannot read {}", path.display()))?;
    text.trim()
        .parse()
        .with_context(|| format!("{}: {text:?} is not a number", path.display()))
}

/// Reads the primary GPT of a disk.
pub fn read_gpt(host: &dyn Host, disk: &str) -> Result<Gpt> {
    let size = size_bytes(host, disk)?;
    let dev = Path::new("/dev").join(disk);
    let mut f = host
        .open(&dev)
        .with_context(|| format!("cannot open {}", dev.display()))?;
    Gpt::read_from(&mut f, size)
        .with_context(|| format!("cannot read the GPT of {}", dev.display()))
}

#[cfg(test)]
pub(crate) mod fixture {
    //! A fake host with a Ballast disk: a file-backed GPT image as /dev/vda,
    //! sysfs and udev links as the kernel would show them.

    use crate::host::DirHost;
    use ballast_common::gpt::{Gpt, PartSpec, SECTOR};
    use ballast_common::{part_type, slot_partuuids};
    use std::path::Path;

    pub const HASH_A: [u8; 32] = [0xaa; 32];
    pub const HASH_B: [u8; 32] = [0xbb; 32];
    pub const MIB: u64 = 1 << 20;

    pub fn write(root: &Path, rel: &str, contents: &str) {
        let p = root.join(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, contents).unwrap();
    }

    fn symlink(root: &Path, rel: &str, target: &str) {
        let p = root.join(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::os::unix::fs::symlink(target, p).unwrap();
    }

    /// Lays out the six Ballast partitions on a disk of `disk_size` bytes (the
    /// table itself describes the smaller built image) and returns the host.
    pub fn ballast_disk(dir: &Path, disk_size: u64) -> (DirHost, Gpt) {
        let (a, av) = slot_partuuids(&HASH_A);
        let (b, bv) = slot_partuuids(&HASH_B);
        let p = |label: &str, type_guid, uuid, size| PartSpec {
            label: label.into(),
            type_guid,
            uuid,
            size,
        };
        let gpt = Gpt::plan(
            ballast_common::derived_uuid("disk"),
            &[
                p(
                    "esp",
                    part_type::ESP,
                    ballast_common::derived_uuid("esp"),
                    MIB,
                ),
                p("root-a", part_type::ROOT_X86_64, a, 2 * MIB),
                p("root-a-verity", part_type::ROOT_X86_64_VERITY, av, MIB),
                p("root-b", part_type::ROOT_X86_64, b, 2 * MIB),
                p("root-b-verity", part_type::ROOT_X86_64_VERITY, bv, MIB),
                p(
                    "data",
                    part_type::VAR,
                    ballast_common::derived_uuid("data"),
                    4 * MIB,
                ),
            ],
        )
        .unwrap();
        assert!(disk_size >= gpt.disk_size);
        let disk = dir.join("dev/vda");
        std::fs::create_dir_all(disk.parent().unwrap()).unwrap();
        let mut f = std::fs::File::create(&disk).unwrap();
        f.set_len(gpt.disk_size).unwrap();
        gpt.write_to(&mut f).unwrap();
        f.set_len(disk_size).unwrap();
        write(
            dir,
            "sys/devices/virtual/block/vda/size",
            &format!("{}\n", disk_size / SECTOR),
        );
        symlink(
            dir,
            "sys/class/block/vda",
            "../../devices/virtual/block/vda",
        );
        for (i, part) in gpt.partitions.iter().enumerate() {
            let name = format!("vda{}", i + 1);
            let sys = format!("sys/devices/virtual/block/vda/{name}");
            write(dir, &format!("{sys}/partition"), &format!("{}\n", i + 1));
            write(
                dir,
                &format!("{sys}/size"),
                &format!("{}\n", part.size() / SECTOR),
            );
            write(
                dir,
                &format!("{sys}/start"),
                &format!("{}\n", part.first_lba),
            );
            symlink(
                dir,
                &format!("sys/class/block/{name}"),
                &format!("../../devices/virtual/block/vda/{name}"),
            );
            symlink(
                dir,
                &format!("dev/disk/by-partlabel/{}", part.label),
                &format!("../../{name}"),
            );
            write(dir, &format!("dev/{name}"), "");
        }
        (DirHost::new(dir).unwrap(), gpt)
    }

    #[test]
    fn the_fixture_reads_back() {
        let dir = tempfile::tempdir().unwrap();
        let (host, gpt) = ballast_disk(dir.path(), 32 * MIB);
        let data = super::locate_by_partlabel(&host, "data").unwrap();
        assert_eq!(
            data,
            super::BlockPartition {
                name: "vda6".into(),
                number: 6,
                disk: "vda".into()
            }
        );
        assert_eq!(super::size_bytes(&host, "vda").unwrap(), 32 * MIB);
        assert_eq!(super::size_bytes(&host, "vda6").unwrap(), 4 * MIB);
        let read = super::read_gpt(&host, "vda").unwrap();
        assert_eq!(read.partitions, gpt.partitions);
    }

    #[test]
    fn missing_links_are_clear_errors() {
        let dir = tempfile::tempdir().unwrap();
        let (host, _) = ballast_disk(dir.path(), 32 * MIB);
        let e = format!(
            "{:#}",
            super::locate_by_partlabel(&host, "nope").unwrap_err()
        );
        assert!(
            e.contains("cannot resolve /dev/disk/by-partlabel/nope"),
            "{e}"
        );
        let e = format!("{:#}", super::size_bytes(&host, "vdz").unwrap_err());
        assert!(e.contains("cannot read /sys/class/block/vdz/size"), "{e}");
    }
}
