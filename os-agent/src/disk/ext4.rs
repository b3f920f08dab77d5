//! Just enough of the ext4 superblock to know how big the filesystem is.

use anyhow::{bail, Result};
use std::io::{Read, Seek, SeekFrom};

const SUPERBLOCK: u64 = 1024;
const MAGIC: u16 = 0xEF53;
const INCOMPAT_64BIT: u32 = 0x80;

/// Sizes of an ext2/3/4 filesystem, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Geometry {
    pub size: u64,
    pub block_size: u64,
    /// Bytes per block group: resize2fs never leaves a whole group of the
    /// device unused, but may leave a too-small last one.
    pub group_size: u64,
}

/// Reads the geometry of the ext2/3/4 filesystem on `dev`.
pub fn geometry<R: Read + Seek>(dev: &mut R) -> Result<Geometry> {
    let mut sb = [0u8; 1024];
    dev.seek(SeekFrom::Start(SUPERBLOCK))?;
    dev.read_exact(&mut sb)?;
    let u16_at = |o: usize| u16::from_le_bytes([sb[o], sb[o + 1]]);
    let u32_at = |o: usize| u32::from_le_bytes([sb[o], sb[o + 1], sb[o + 2], sb[o + 3]]);
    if u16_at(0x38) != MAGIC {
        bail!("no ext4 superblock (magic {:#06x})", u16_at(0x38));
    }
    let log = u32_at(0x18);
    if log > 6 {
        bail!("implausible ext4 block size 2^(10+{log})");
    }
    let mut blocks = u64::from(u32_at(0x04));
    if u32_at(0x60) & INCOMPAT_64BIT != 0 {
        blocks |= u64::from(u32_at(0x150)) << 32;
    }
    let block_size = 1u64 << (10 + log);
    Ok(Geometry {
        size: blocks * block_size,
        block_size,
        group_size: u64::from(u32_at(0x20)) * block_size,
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::io::Cursor;

    /// The start of a device holding a superblock for `blocks` 4 KiB blocks.
    pub fn image(blocks: u64, sixty_four: bool) -> Vec<u8> {
        let mut d = vec![0u8; 4096];
        let sb = &mut d[1024..2048];
        sb[0x04..0x08].copy_from_slice(&(blocks as u32).to_le_bytes());
        sb[0x18..0x1c].copy_from_slice(&2u32.to_le_bytes());
        sb[0x20..0x24].copy_from_slice(&32768u32.to_le_bytes());
        sb[0x38..0x3a].copy_from_slice(&MAGIC.to_le_bytes());
        if sixty_four {
            sb[0x60..0x64].copy_from_slice(&INCOMPAT_64BIT.to_le_bytes());
            sb[0x150..0x154].copy_from_slice(&((blocks >> 32) as u32).to_le_bytes());
        }
        d
    }

    #[test]
    fn table() {
        let cases = [
            (1024, false, 4 << 20),
            (1024, true, 4 << 20),
            ((1 << 32) + 1, true, ((1u64 << 32) + 1) * 4096),
        ];
        for (blocks, b64, want) in cases {
            let g = geometry(&mut Cursor::new(image(blocks, b64))).unwrap();
            assert_eq!(g.size, want);
            assert_eq!((g.block_size, g.group_size), (4096, 128 << 20));
        }
        assert!(geometry(&mut Cursor::new(vec![0u8; 4096])).is_err());
        assert!(geometry(&mut Cursor::new(vec![0u8; 100])).is_err());
    }

    #[test]
    fn agrees_with_mkfs_ext4_when_present() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("fs.img");
        std::fs::File::create(&path)
            .unwrap()
            .set_len(8 << 20)
            .unwrap();
        let out = std::process::Command::new("mkfs.ext4")
            .args(["-q", "-F", "-b", "4096"])
            .arg(&path)
            .output();
        match out {
            Ok(o) if o.status.success() => {
                let mut f = std::fs::File::open(&path).unwrap();
                let g = geometry(&mut f).unwrap();
                assert_eq!((g.size, g.block_size), (8 << 20, 4096));
            }
            // e2fsprogs is not on every build machine; the table above still runs.
            Ok(o) => panic!("mkfs.ext4 failed: {}", String::from_utf8_lossy(&o.stderr)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => panic!("cannot run mkfs.ext4: {e}"),
        }
    }
}
