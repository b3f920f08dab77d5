//! GUID Partition Table: plan, write and read the table of a Ballast disk.
//!
//! Only what Ballast needs: 512-byte logical sectors, 128 entries of 128 bytes,
//! a protective MBR, primary and backup tables. Reading checks both CRCs so a
//! damaged table is an error rather than a guess.

use std::io::{self, Read, Seek, SeekFrom, Write};
use uuid::Uuid;

pub const SECTOR: u64 = 512;
const ENTRIES: u32 = 128;
const ENTRY_SIZE: u32 = 128;
/// Sectors taken by the entry array (128 * 128 / 512).
const ENTRY_SECTORS: u64 = (ENTRIES as u64 * ENTRY_SIZE as u64) / SECTOR;
/// Partitions start on 1 MiB boundaries.
pub const ALIGN: u64 = 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum GptError {
    #[error("I/O error on the partition table: {0}")]
    Io(#[from] io::Error),
    #[error("no GPT signature at LBA {0}")]
    NoSignature(u64),
    #[error("GPT header at LBA {lba} has a bad CRC32")]
    HeaderCrc { lba: u64 },
    #[error("GPT entry array of header at LBA {lba} has a bad CRC32")]
    EntriesCrc { lba: u64 },
    #[error("unsupported GPT geometry: {0}")]
    Geometry(String),
    #[error("partition label {0:?} is longer than 36 UTF-16 units")]
    LabelTooLong(String),
    #[error("no partition labelled {0:?}")]
    NoSuchPartition(String),
    #[error("disk of {disk} bytes is too small for the table ({needed} bytes needed)")]
    TooSmall { disk: u64, needed: u64 },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Partition {
    pub label: String,
    pub type_guid: Uuid,
    pub uuid: Uuid,
    pub first_lba: u64,
    /// Inclusive, as in the on-disk format.
    pub last_lba: u64,
    pub attributes: u64,
}

impl Partition {
    pub fn offset(&self) -> u64 {
        self.first_lba * SECTOR
    }
    pub fn size(&self) -> u64 {
        (self.last_lba + 1 - self.first_lba) * SECTOR
    }
}

/// A partition to place: label, type, PARTUUID and size in bytes (rounded up to `ALIGN`).
#[derive(Debug, Clone)]
pub struct PartSpec {
    pub label: String,
    pub type_guid: Uuid,
    pub uuid: Uuid,
    pub size: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Gpt {
    pub disk_guid: Uuid,
    /// Size of the whole disk in bytes (a multiple of the sector size).
    pub disk_size: u64,
    pub partitions: Vec<Partition>,
}

fn align_up(v: u64, a: u64) -> u64 {
    v.div_ceil(a) * a
}

impl Gpt {
    /// Lays the partitions out back to back on 1 MiB boundaries, starting at
    /// 1 MiB, and sizes the disk to end 1 MiB after the last one (room for the
    /// backup table).
    pub fn plan(disk_guid: Uuid, parts: &[PartSpec]) -> Result<Gpt, GptError> {
        let mut offset = ALIGN;
        let mut partitions = Vec::with_capacity(parts.len());
        for p in parts {
            if p.label.encode_utf16().count() > 36 {
                return Err(GptError::LabelTooLong(p.label.clone()));
            }
            let size = align_up(p.size.max(1), ALIGN);
            partitions.push(Partition {
                label: p.label.clone(),
                type_guid: p.type_guid,
                uuid: p.uuid,
                first_lba: offset / SECTOR,
                last_lba: (offset + size) / SECTOR - 1,
                attributes: 0,
            });
            offset += size;
        }
        Ok(Gpt {
            disk_guid,
            disk_size: offset + ALIGN,
            partitions,
        })
    }

    pub fn last_lba(&self) -> u64 {
        self.disk_size / SECTOR - 1
    }

    fn first_usable(&self) -> u64 {
        2 + ENTRY_SECTORS
    }

    fn last_usable(&self) -> u64 {
        self.last_lba() - ENTRY_SECTORS - 1
    }

    pub fn find(&self, label: &str) -> Result<&Partition, GptError> {
        self.partitions
            .iter()
            .find(|p| p.label == label)
            .ok_or_else(|| GptError::NoSuchPartition(label.to_string()))
    }

    pub fn find_mut(&mut self, label: &str) -> Result<&mut Partition, GptError> {
        self.partitions
            .iter_mut()
            .find(|p| p.label == label)
            .ok_or_else(|| GptError::NoSuchPartition(label.to_string()))
    }

    /// Moves the end of the disk to `new_size` and lets the partition labelled
    /// `label` grow to the last usable 1 MiB boundary. Returns whether anything
    /// changed (so a second call on a grown disk is a no-op).
    pub fn grow_to(&mut self, new_size: u64, label: &str) -> Result<bool, GptError> {
        let new_size = new_size / SECTOR * SECTOR;
        if new_size < self.disk_size {
            return Err(GptError::Geometry(format!(
                "disk shrank from {} to {} bytes",
                self.disk_size, new_size
            )));
        }
        let old_disk = self.disk_size;
        self.disk_size = new_size;
        let last_usable = self.last_usable();
        let max_end = (last_usable + 1) * SECTOR / ALIGN * ALIGN;
        let part = self.find_mut(label)?;
        let new_last = max_end / SECTOR - 1;
        let changed_part = new_last > part.last_lba;
        if changed_part {
            part.last_lba = new_last;
        }
        Ok(changed_part || new_size != old_disk)
    }

    fn entries_bytes(&self) -> Result<Vec<u8>, GptError> {
        let mut buf = vec![0u8; (ENTRIES * ENTRY_SIZE) as usize];
        if self.partitions.len() > ENTRIES as usize {
            return Err(GptError::Geometry("more than 128 partitions".into()));
        }
        for (i, p) in self.partitions.iter().enumerate() {
            let e = &mut buf[i * ENTRY_SIZE as usize..(i + 1) * ENTRY_SIZE as usize];
            e[0..16].copy_from_slice(&p.type_guid.to_bytes_le());
            e[16..32].copy_from_slice(&p.uuid.to_bytes_le());
            e[32..40].copy_from_slice(&p.first_lba.to_le_bytes());
            e[40..48].copy_from_slice(&p.last_lba.to_le_bytes());
            e[48..56].copy_from_slice(&p.attributes.to_le_bytes());
            let units: Vec<u16> = p.label.encode_utf16().collect();
            if units.len() > 36 {
                return Err(GptError::LabelTooLong(p.label.clone()));
            }
            for (j, u) in units.iter().enumerate() {
                e[56 + 2 * j..58 + 2 * j].copy_from_slice(&u.to_le_bytes());
            }
        }
        Ok(buf)
    }

    fn header_bytes(
        &self,
        my_lba: u64,
        alt_lba: u64,
        entries_lba: u64,
        entries_crc: u32,
    ) -> Vec<u8> {
        let mut h = vec![0u8; SECTOR as usize];
        h[0..8].copy_from_slice(b"EFI PART");
        h[8..12].copy_from_slice(&0x0001_0000u32.to_le_bytes());
        h[12..16].copy_from_slice(&92u32.to_le_bytes());
        h[24..32].copy_from_slice(&my_lba.to_le_bytes());
        h[32..40].copy_from_slice(&alt_lba.to_le_bytes());
        h[40..48].copy_from_slice(&self.first_usable().to_le_bytes());
        h[48..56].copy_from_slice(&self.last_usable().to_le_bytes());
        h[56..72].copy_from_slice(&self.disk_guid.to_bytes_le());
        h[72..80].copy_from_slice(&entries_lba.to_le_bytes());
        h[80..84].copy_from_slice(&ENTRIES.to_le_bytes());
        h[84..88].copy_from_slice(&ENTRY_SIZE.to_le_bytes());
        h[88..92].copy_from_slice(&entries_crc.to_le_bytes());
        let crc = crc32fast::hash(&h[..92]);
        h[16..20].copy_from_slice(&crc.to_le_bytes());
        h
    }

    fn protective_mbr(&self) -> Vec<u8> {
        let mut m = vec![0u8; SECTOR as usize];
        let size = (self.disk_size / SECTOR - 1).min(u32::MAX as u64) as u32;
        let e = &mut m[446..462];
        e[0] = 0;
        e[1..4].copy_from_slice(&[0x00, 0x02, 0x00]);
        e[4] = 0xEE;
        e[5..8].copy_from_slice(&[0xFF, 0xFF, 0xFF]);
        e[8..12].copy_from_slice(&1u32.to_le_bytes());
        e[12..16].copy_from_slice(&size.to_le_bytes());
        m[510] = 0x55;
        m[511] = 0xAA;
        m
    }

    /// Writes the protective MBR, the primary table and the backup table.
    /// Partition contents are not touched.
    pub fn write_to<W: Write + Seek>(&self, w: &mut W) -> Result<(), GptError> {
        let needed = (2 + 2 * ENTRY_SECTORS + 1) * SECTOR;
        if self.disk_size < needed {
            return Err(GptError::TooSmall {
                disk: self.disk_size,
                needed,
            });
        }
        let entries = self.entries_bytes()?;
        let crc = crc32fast::hash(&entries);
        let last = self.last_lba();
        let backup_entries_lba = last - ENTRY_SECTORS;
        // Backup first, primary last: a reader that finds a valid primary
        // finds a complete table.
        w.seek(SeekFrom::Start(backup_entries_lba * SECTOR))?;
        w.write_all(&entries)?;
        w.write_all(&self.header_bytes(last, 1, backup_entries_lba, crc))?;
        w.seek(SeekFrom::Start(0))?;
        w.write_all(&self.protective_mbr())?;
        w.write_all(&self.header_bytes(1, last, 2, crc))?;
        w.write_all(&entries)?;
        w.flush()?;
        Ok(())
    }

    /// Reads the primary table of a disk of `disk_size` bytes.
    pub fn read_from<R: Read + Seek>(r: &mut R, disk_size: u64) -> Result<Gpt, GptError> {
        let mut h = vec![0u8; SECTOR as usize];
        r.seek(SeekFrom::Start(SECTOR))?;
        r.read_exact(&mut h)?;
        if &h[0..8] != b"EFI PART" {
            return Err(GptError::NoSignature(1));
        }
        let u32_at = |b: &[u8], o: usize| u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]]);
        let u64_at = |b: &[u8], o: usize| {
            let mut a = [0u8; 8];
            a.copy_from_slice(&b[o..o + 8]);
            u64::from_le_bytes(a)
        };
        let header_size = u32_at(&h, 12) as usize;
        if !(92..=SECTOR as usize).contains(&header_size) {
            return Err(GptError::Geometry(format!("header size {header_size}")));
        }
        let stored_crc = u32_at(&h, 16);
        let mut hc = h[..header_size].to_vec();
        hc[16..20].fill(0);
        if crc32fast::hash(&hc) != stored_crc {
            return Err(GptError::HeaderCrc { lba: 1 });
        }
        let entries_lba = u64_at(&h, 72);
        let n = u32_at(&h, 80);
        let esize = u32_at(&h, 84);
        if esize != ENTRY_SIZE || n == 0 || n > 1024 {
            return Err(GptError::Geometry(format!("{n} entries of {esize} bytes")));
        }
        let mut entries = vec![0u8; (n * esize) as usize];
        r.seek(SeekFrom::Start(entries_lba * SECTOR))?;
        r.read_exact(&mut entries)?;
        if crc32fast::hash(&entries) != u32_at(&h, 88) {
            return Err(GptError::EntriesCrc { lba: 1 });
        }
        let mut guid = [0u8; 16];
        guid.copy_from_slice(&h[56..72]);
        let disk_guid = Uuid::from_bytes_le(guid);
        let mut partitions = Vec::new();
        for e in entries.chunks(esize as usize) {
            let mut t = [0u8; 16];
            t.copy_from_slice(&e[0..16]);
            let type_guid = Uuid::from_bytes_le(t);
            if type_guid.is_nil() {
                continue;
            }
            let mut u = [0u8; 16];
            u.copy_from_slice(&e[16..32]);
            let units: Vec<u16> = e[56..128]
                .chunks(2)
                .map(|c| u16::from_le_bytes([c[0], c[1]]))
                .take_while(|&c| c != 0)
                .collect();
            partitions.push(Partition {
                label: String::from_utf16_lossy(&units),
                type_guid,
                uuid: Uuid::from_bytes_le(u),
                first_lba: u64_at(e, 32),
                last_lba: u64_at(e, 40),
                attributes: u64_at(e, 48),
            });
        }
        Ok(Gpt {
            disk_guid,
            disk_size: disk_size / SECTOR * SECTOR,
            partitions,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::part_type;
    use std::io::Cursor;

    fn sample() -> Gpt {
        let p = |label: &str, t, size| PartSpec {
            label: label.into(),
            type_guid: t,
            uuid: crate::derived_uuid(label),
            size,
        };
        Gpt::plan(
            crate::derived_uuid("disk"),
            &[
                p("esp", part_type::ESP, 256 << 20),
                p("root-a", part_type::ROOT_X86_64, 100 << 20),
                p("data", part_type::VAR, (64 << 20) + 1),
            ],
        )
        .unwrap()
    }

    #[test]
    fn plan_aligns_partitions_and_leaves_room_for_the_backup() {
        let g = sample();
        assert_eq!(g.partitions[0].offset(), 1 << 20);
        assert_eq!(g.partitions[1].offset(), 257 << 20);
        assert_eq!(g.partitions[2].size(), 65 << 20);
        let end = g.partitions[2].offset() + g.partitions[2].size();
        assert_eq!(g.disk_size, end + (1 << 20));
        assert!(g.partitions[2].last_lba <= g.last_usable());
    }

    #[test]
    fn write_then_read_round_trips() {
        let g = sample();
        let mut disk = Cursor::new(vec![0u8; g.disk_size as usize]);
        g.write_to(&mut disk).unwrap();
        let back = Gpt::read_from(&mut disk, g.disk_size).unwrap();
        assert_eq!(back, g);
    }

    #[test]
    fn sfdisk_agrees_with_the_table() {
        // sfdisk (util-linux) is on every Debian host; it is the independent reader.
        let g = sample();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disk.img");
        let mut f = std::fs::File::create(&path).unwrap();
        f.set_len(g.disk_size).unwrap();
        g.write_to(&mut f).unwrap();
        drop(f);
        let out = std::process::Command::new("sfdisk")
            .arg("--json")
            .arg(&path)
            .output();
        let Ok(out) = out else {
            panic!("sfdisk not found: install util-linux / fdisk");
        };
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let parts = v["partitiontable"]["partitions"].as_array().unwrap();
        assert_eq!(parts.len(), 3);
        for (p, want) in parts.iter().zip(&g.partitions) {
            assert_eq!(p["name"], want.label.as_str());
            assert_eq!(p["start"], want.first_lba);
            assert_eq!(p["size"], want.last_lba + 1 - want.first_lba);
            assert_eq!(
                p["uuid"].as_str().unwrap().to_lowercase(),
                want.uuid.to_string()
            );
            assert_eq!(
                p["type"].as_str().unwrap().to_lowercase(),
                want.type_guid.to_string()
            );
        }
        assert_eq!(
            v["partitiontable"]["id"].as_str().unwrap().to_lowercase(),
            g.disk_guid.to_string()
        );
    }

    #[test]
    fn corrupt_header_and_entries_are_errors() {
        let g = sample();
        let mut bytes = vec![0u8; g.disk_size as usize];
        g.write_to(&mut Cursor::new(&mut bytes)).unwrap();

        let mut bad = bytes.clone();
        bad[512 + 40] ^= 1; // first usable LBA
        assert!(matches!(
            Gpt::read_from(&mut Cursor::new(bad), g.disk_size),
            Err(GptError::HeaderCrc { .. })
        ));

        let mut bad = bytes.clone();
        bad[1024 + 60] ^= 1; // a label
        assert!(matches!(
            Gpt::read_from(&mut Cursor::new(bad), g.disk_size),
            Err(GptError::EntriesCrc { .. })
        ));

        let bad = vec![0u8; 4096];
        assert!(matches!(
            Gpt::read_from(&mut Cursor::new(bad), 4096),
            Err(GptError::NoSignature(1))
        ));
    }

    #[test]
    fn grow_moves_the_backup_and_extends_the_last_partition() {
        let mut g = sample();
        let old_last = g.find("data").unwrap().last_lba;
        let new_size = g.disk_size + (100 << 20) + 12345;
        assert!(g.grow_to(new_size, "data").unwrap());
        let data = g.find("data").unwrap().clone();
        assert!(data.last_lba > old_last);
        assert_eq!((data.last_lba + 1) * SECTOR % ALIGN, 0);
        assert!(data.last_lba <= g.last_usable());
        let mut disk = Cursor::new(vec![0u8; g.disk_size as usize]);
        g.write_to(&mut disk).unwrap();
        assert_eq!(Gpt::read_from(&mut disk, g.disk_size).unwrap(), g);
        // Growing again to the same size changes nothing.
        assert!(!g.grow_to(g.disk_size, "data").unwrap());
        assert!(g.grow_to(g.disk_size - 512, "data").is_err());
    }

    #[test]
    fn labels_longer_than_36_units_are_refused() {
        let r = Gpt::plan(
            Uuid::nil(),
            &[PartSpec {
                label: "x".repeat(37),
                type_guid: part_type::VAR,
                uuid: Uuid::nil(),
                size: 1,
            }],
        );
        assert!(matches!(r, Err(GptError::LabelTooLong(_))));
    }
}
