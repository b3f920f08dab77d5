//! The whole disk: GPT with Discoverable Partitions types, the partitions'
//! contents at their offsets (sparse), and a qcow2 copy for VMs.

use crate::stage::Stage;
use anyhow::{bail, Context, Result};
use ballast_common::gpt::{Gpt, PartSpec, ALIGN};
use ballast_common::{derived_uuid, part_type, slot_partuuids, verity};
use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::Path;
use std::process::Command;

const MIB: u64 = 1 << 20;

pub struct Layout {
    pub esp_mib: u64,
    pub slot_mib: u64,
    pub data_mib: u64,
}

/// Size of a verity partition for a slot of `slot_mib`: the tree of a full slot.
pub fn verity_partition_size(slot_mib: u64) -> u64 {
    verity::hash_area_size(slot_mib * MIB / verity::BLOCK as u64).div_ceil(ALIGN) * ALIGN
}

/// Plans the table. Slot A's PARTUUIDs come from its root hash; the empty
/// slot B and the rest get UUIDs derived from `seed`, so rebuilds agree.
pub fn plan(layout: &Layout, root_hash: &[u8; 32], seed: &str) -> Result<Gpt> {
    let (a, a_verity) = slot_partuuids(root_hash);
    let vsize = verity_partition_size(layout.slot_mib);
    let p = |label: &str, type_guid, uuid, size| PartSpec {
        label: label.to_string(),
        type_guid,
        uuid,
        size,
    };
    Ok(Gpt::plan(
        derived_uuid(&format!("{seed}/disk")),
        &[
            p(
                "esp",
                part_type::ESP,
                derived_uuid(&format!("{seed}/esp")),
                layout.esp_mib * MIB,
            ),
            p("root-a", part_type::ROOT_X86_64, a, layout.slot_mib * MIB),
            p(
                "root-a-verity",
                part_type::ROOT_X86_64_VERITY,
                a_verity,
                vsize,
            ),
            p(
                "root-b",
                part_type::ROOT_X86_64,
                derived_uuid(&format!("{seed}/root-b")),
                layout.slot_mib * MIB,
            ),
            p(
                "root-b-verity",
                part_type::ROOT_X86_64_VERITY,
                derived_uuid(&format!("{seed}/root-b-verity")),
                vsize,
            ),
            p(
                "data",
                part_type::VAR,
                derived_uuid(&format!("{seed}/data")),
                layout.data_mib * MIB,
            ),
        ],
    )?)
}

/// Copies `src` into `dst` at `offset`, skipping all-zero chunks so the image stays sparse.
fn copy_sparse(src: &Path, dst: &mut File, offset: u64, limit: u64) -> Result<()> {
    let mut f = File::open(src).with_context(|| format!("cannot open {}", src.display()))?;
    let len = f.metadata()?.len();
    if len > limit {
        bail!(
            "{} is {} MiB, larger than its {} MiB partition",
            src.display(),
            len.div_ceil(MIB),
            limit / MIB
        );
    }
    let mut buf = vec![0u8; MIB as usize];
    let mut pos = 0u64;
    loop {
        let n = read_full(&mut f, &mut buf)?;
        if n == 0 {
            break;
        }
        if buf[..n].iter().any(|&b| b != 0) {
            dst.seek(SeekFrom::Start(offset + pos))?;
            dst.write_all(&buf[..n])?;
        }
        pos += n as u64;
    }
    Ok(())
}

fn read_full(f: &mut File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match f.read(&mut buf[n..])? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}

pub struct Contents<'a> {
    pub esp: &'a Path,
    pub root: &'a Path,
    pub verity: &'a Path,
    pub data: &'a Path,
}

pub fn write_raw(gpt: &Gpt, c: &Contents, out: &Path) -> Result<()> {
    if out.exists() {
        std::fs::remove_file(out)?;
    }
    let mut f = File::create(out).with_context(|| format!("cannot create {}", out.display()))?;
    f.set_len(gpt.disk_size)?;
    for (label, src) in [
        ("esp", c.esp),
        ("root-a", c.root),
        ("root-a-verity", c.verity),
        ("data", c.data),
    ] {
        let p = gpt.find(label)?;
        copy_sparse(src, &mut f, p.offset(), p.size())
            .with_context(|| format!("partition {label}"))?;
    }
    gpt.write_to(&mut f)?;
    f.sync_all()?;
    Ok(())
}

pub fn to_qcow2(stage: &Stage, raw: &Path, out: &Path) -> Result<()> {
    stage.cmd(
        Command::new("qemu-img")
            .args(["convert", "-f", "raw", "-O", "qcow2"])
            .arg(raw)
            .arg(out),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_follows_the_design() {
        let h = [0x11u8; 32];
        let g = plan(
            &Layout {
                esp_mib: 256,
                slot_mib: 1024,
                data_mib: 256,
            },
            &h,
            "t",
        )
        .unwrap();
        let labels: Vec<_> = g.partitions.iter().map(|p| p.label.as_str()).collect();
        assert_eq!(
            labels,
            [
                "esp",
                "root-a",
                "root-a-verity",
                "root-b",
                "root-b-verity",
                "data"
            ]
        );
        assert_eq!(g.find("root-a").unwrap().size(), 1024 * MIB);
        assert_eq!(g.find("root-b").unwrap().size(), 1024 * MIB);
        // The tree of a full 1 GiB slot is a little over 8 MiB.
        assert_eq!(g.find("root-a-verity").unwrap().size(), 9 * MIB);
        assert_eq!(g.find("root-a").unwrap().uuid, slot_partuuids(&h).0);
        assert_eq!(g.find("root-a-verity").unwrap().uuid, slot_partuuids(&h).1);
        assert_eq!(g.find("data").unwrap().type_guid, part_type::VAR);
        assert_eq!(
            plan(
                &Layout {
                    esp_mib: 256,
                    slot_mib: 1024,
                    data_mib: 256
                },
                &h,
                "t"
            )
            .unwrap(),
            g
        );
    }

    #[test]
    fn contents_land_at_their_offsets_and_oversize_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let g = plan(
            &Layout {
                esp_mib: 64,
                slot_mib: 256,
                data_mib: 64,
            },
            &[1u8; 32],
            "t",
        )
        .unwrap();
        std::fs::write(d.join("esp"), b"ESP!").unwrap();
        std::fs::write(
            d.join("root"),
            [vec![0u8; MIB as usize], b"ROOT".to_vec()].concat(),
        )
        .unwrap();
        std::fs::write(d.join("verity"), b"VERI").unwrap();
        std::fs::write(d.join("data"), b"DATA").unwrap();
        let c = Contents {
            esp: &d.join("esp"),
            root: &d.join("root"),
            verity: &d.join("verity"),
            data: &d.join("data"),
        };
        write_raw(&g, &c, &d.join("disk.raw")).unwrap();
        let bytes = std::fs::read(d.join("disk.raw")).unwrap();
        let at = |label: &str, extra: u64| {
            let o = (g.find(label).unwrap().offset() + extra) as usize;
            bytes[o..o + 4].to_vec()
        };
        assert_eq!(at("esp", 0), b"ESP!");
        assert_eq!(at("root-a", MIB), b"ROOT");
        assert_eq!(at("root-a-verity", 0), b"VERI");
        assert_eq!(at("data", 0), b"DATA");
        let back = Gpt::read_from(&mut std::io::Cursor::new(&bytes), bytes.len() as u64).unwrap();
        assert_eq!(back, g);

        std::fs::write(d.join("esp"), vec![1u8; 65 * MIB as usize]).unwrap();
        let err = format!("{:#}", write_raw(&g, &c, &d.join("disk.raw")).unwrap_err());
        assert!(
            err.contains("partition esp") && err.contains("larger than"),
            "{err}"
        );
    }
}
