//! Unified kernel image: systemd-boot's EFI stub with the kernel, initrd,
//! command line and os-release added as PE sections (what ukify does), with
//! objcopy from binutils.

use crate::stage::Stage;
use anyhow::{Context, Result};
use ballast_common::pe::parse as parse_pe;
use std::path::Path;
use std::process::Command;

pub struct UkiParts<'a> {
    pub stub: &'a Path,
    pub os_release: &'a Path,
    pub cmdline: &'a str,
    pub kernel: &'a Path,
    pub initrd: &'a Path,
    pub epoch: u64,
}

/// Assembles the UKI at `out`. Sections follow the stub's last section in
/// ukify's order, each on a section-alignment boundary; the kernel goes last.
pub fn assemble(stage: &Stage, p: &UkiParts, out: &Path, work: &Path) -> Result<()> {
    let stub = std::fs::read(p.stub)
        .with_context(|| format!("cannot read EFI stub {}", p.stub.display()))?;
    let info = parse_pe(&stub).with_context(|| format!("EFI stub {}", p.stub.display()))?;
    let align = info.section_alignment as u64;
    let end = info
        .sections
        .iter()
        .map(|s| s.virtual_address as u64 + s.virtual_size.max(s.raw_size) as u64)
        .max()
        .unwrap_or(info.size_of_image as u64);
    let cmdline_file = work.join("cmdline");
    std::fs::write(&cmdline_file, format!("{}\0", p.cmdline))?;
    let parts: [(&str, &Path); 4] = [
        (".osrel", p.os_release),
        (".cmdline", &cmdline_file),
        (".initrd", p.initrd),
        (".linux", p.kernel),
    ];
    let mut cmd = Command::new("objcopy");
    let mut offset = end.div_ceil(align) * align;
    for (name, path) in parts {
        let size = std::fs::metadata(path)
            .with_context(|| format!("cannot stat {}", path.display()))?
            .len();
        cmd.arg("--add-section")
            .arg(format!("{name}={}", path.display()))
            .arg("--change-section-vma")
            .arg(format!("{name}={:#x}", info.image_base + offset));
        offset += size.div_ceil(align) * align;
    }
    let tmp = out.with_extension("tmp");
    cmd.arg(p.stub)
        .arg(&tmp)
        .env("SOURCE_DATE_EPOCH", p.epoch.to_string());
    stage.cmd(&mut cmd)?;
    // objcopy may stamp the PE header with the time of the build; use the
    // build's epoch so two builds are byte-identical.
    let mut bytes = std::fs::read(&tmp)?;
    let built = parse_pe(&bytes)?;
    let ts = (p.epoch.min(u32::MAX as u64) as u32).to_le_bytes();
    bytes[built.timestamp_offset..built.timestamp_offset + 4].copy_from_slice(&ts);
    let sum = pe_checksum(&bytes, built.checksum_offset).to_le_bytes();
    bytes[built.checksum_offset..built.checksum_offset + 4].copy_from_slice(&sum);
    std::fs::write(&tmp, &bytes)?;
    std::fs::rename(&tmp, out)?;
    Ok(())
}

/// The PE image checksum (as IMAGEHLP's CheckSumMappedFile): 16-bit one's
/// complement sum of the file with the checksum field taken as zero, plus the
/// file's length.
pub fn pe_checksum(bytes: &[u8], checksum_offset: usize) -> u32 {
    let mut sum: u64 = 0;
    for (i, chunk) in bytes.chunks(2).enumerate() {
        let off = i * 2;
        if off >= checksum_offset && off < checksum_offset + 4 {
            continue;
        }
        let word = u16::from_le_bytes([chunk[0], *chunk.get(1).unwrap_or(&0)]) as u64;
        sum += word;
        sum = (sum & 0xffff) + (sum >> 16);
    }
    sum = (sum & 0xffff) + (sum >> 16);
    (sum as u32).wrapping_add(bytes.len() as u32)
}

/// The kernel command line of a slot's UKI. The root hash names the
/// partitions too (their PARTUUIDs are halves of it), so the line fits any slot.
pub fn cmdline(root_hash: &[u8; 32], extra: &[String]) -> String {
    let (data, hash) = ballast_common::slot_partuuids(root_hash);
    let mut args = vec![
        format!("roothash={}", hex::encode(root_hash)),
        format!("systemd.verity_root_data=PARTUUID={data}"),
        format!("systemd.verity_root_hash=PARTUUID={hash}"),
        "systemd.verity_root_options=restart-on-corruption".into(),
        "rootfstype=erofs".into(),
        "ro".into(),
        "console=tty0".into(),
        "console=ttyS0,115200".into(),
        "rd.shell=0".into(),
        "rd.emergency=reboot".into(),
        "systemd.default_timeout_start_sec=20".into(),
        "panic=10".into(),
    ];
    args.extend(extra.iter().cloned());
    args.join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stage::Stages;

    const STUB: &str = "/usr/lib/systemd/boot/efi/linuxx64.efi.stub";

    #[test]
    fn cmdline_names_the_slot_by_root_hash() {
        let mut h = [0u8; 32];
        h[0] = 0xab;
        h[31] = 0xcd;
        let c = cmdline(&h, &["quiet".into()]);
        assert!(c.starts_with(&format!("roothash={}", hex::encode(h))));
        assert!(
            c.contains("systemd.verity_root_data=PARTUUID=ab000000-0000-0000-0000-000000000000")
        );
        assert!(
            c.contains("systemd.verity_root_hash=PARTUUID=00000000-0000-0000-0000-0000000000cd")
        );
        assert!(
            !c.contains(" root="),
            "root= must be left out (systemd derives it from roothash)"
        );
        assert!(c.ends_with(" quiet"));
    }

    #[test]
    fn not_a_pe_is_an_error() {
        assert!(parse_pe(b"hello").is_err());
        let mut b = vec![0u8; 256];
        b[0..2].copy_from_slice(b"MZ");
        b[0x3c] = 0x80;
        assert!(format!("{:#}", parse_pe(&b).unwrap_err()).contains("PE signature"));
    }

    /// Assembles a UKI from the real systemd stub (Debian's systemd-boot-efi)
    /// and checks its sections with objdump, an independent reader.
    #[test]
    fn assembles_sections_after_the_stub_without_overlap() {
        assert!(
            Path::new(STUB).exists(),
            "{STUB} missing: apt-get install systemd-boot-efi"
        );
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        std::fs::write(
            d.join("os-release"),
            "ID=debian\nIMAGE_ID=t\nIMAGE_VERSION=1\n",
        )
        .unwrap();
        std::fs::write(d.join("vmlinuz"), vec![7u8; 300_000]).unwrap();
        std::fs::write(d.join("initrd"), vec![9u8; 1_000_000]).unwrap();
        let mut stages = Stages::new(&d.join("logs"), 1).unwrap();
        let parts = UkiParts {
            stub: Path::new(STUB),
            os_release: &d.join("os-release"),
            cmdline: "roothash=00 ro",
            kernel: &d.join("vmlinuz"),
            initrd: &d.join("initrd"),
            epoch: 1_700_000_000,
        };
        stages
            .run("uki", |s| assemble(s, &parts, &d.join("a.efi"), d))
            .unwrap();
        stages
            .run("uki", |s| assemble(s, &parts, &d.join("b.efi"), d))
            .unwrap();
        let a = std::fs::read(d.join("a.efi")).unwrap();
        assert!(
            a == std::fs::read(d.join("b.efi")).unwrap(),
            "two assemblies differ"
        );

        let info = parse_pe(&a).unwrap();
        let stored = u32::from_le_bytes(
            a[info.checksum_offset..info.checksum_offset + 4]
                .try_into()
                .unwrap(),
        );
        assert_eq!(stored, pe_checksum(&a, info.checksum_offset), "PE checksum");
        let names: Vec<_> = info.sections.iter().map(|s| s.name.as_str()).collect();
        for want in [".osrel", ".cmdline", ".initrd", ".linux"] {
            assert!(names.contains(&want), "{want} missing in {names:?}");
        }
        let mut spans: Vec<_> = info
            .sections
            .iter()
            .map(|s| (s.virtual_address, s.virtual_address + s.virtual_size))
            .collect();
        spans.sort();
        for w in spans.windows(2) {
            assert!(w[0].1 <= w[1].0, "sections overlap: {spans:?}");
        }
        let linux = info.sections.iter().find(|s| s.name == ".linux").unwrap();
        assert_eq!(linux.virtual_size, 300_000);
        let out = Command::new("objdump")
            .arg("-h")
            .arg(d.join("a.efi"))
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            text.contains(".cmdline") && text.contains(".linux"),
            "{text}"
        );
        let cmdline = info.sections.iter().find(|s| s.name == ".cmdline").unwrap();
        assert_eq!(cmdline.virtual_size as usize, "roothash=00 ro\0".len());
    }
}
