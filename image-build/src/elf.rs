//! The shared libraries each program and library in the root asks for, so a
//! build that purges or leaves out files fails when something still links
//! what is gone, rather than a host failing when it runs it.

use anyhow::{bail, Context, Result};
use std::collections::BTreeSet;
use std::io::Read;
use std::path::{Path, PathBuf};

/// What the dynamic linker reads from one ELF file.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Dynamic {
    /// DT_NEEDED: sonames.
    pub needed: Vec<String>,
    /// DT_RPATH and DT_RUNPATH directories, `$ORIGIN` unexpanded.
    pub search: Vec<String>,
}

const PT_LOAD: u32 = 1;
const PT_DYNAMIC: u32 = 2;
const DT_NEEDED: u64 = 1;
const DT_STRTAB: u64 = 5;
const DT_RPATH: u64 = 15;
const DT_RUNPATH: u64 = 29;

fn u16_at(b: &[u8], at: usize) -> Result<u16> {
    let s = b.get(at..).and_then(|s| s.get(..2)).context("truncated")?;
    Ok(u16::from_le_bytes([s[0], s[1]]))
}

fn u32_at(b: &[u8], at: usize) -> Result<u32> {
    let s = b.get(at..).and_then(|s| s.get(..4)).context("truncated")?;
    Ok(u32::from_le_bytes(s.try_into()?))
}

fn u64_at(b: &[u8], at: usize) -> Result<u64> {
    let s = b.get(at..).and_then(|s| s.get(..8)).context("truncated")?;
    Ok(u64::from_le_bytes(s.try_into()?))
}

fn c_str(b: &[u8], at: u64) -> Result<String> {
    let start = usize::try_from(at)?;
    let rest = b
        .get(start..)
        .context("string offset past the end of the file")?;
    let len = rest
        .iter()
        .position(|c| *c == 0)
        .context("unterminated string")?;
    Ok(String::from_utf8_lossy(&rest[..len]).into_owned())
}

/// Reads the dynamic section of a 64-bit little-endian ELF executable or
/// shared object. `Ok(None)` for anything else (not ELF, relocatable objects
/// such as kernel modules, static programs).
pub fn dynamic(b: &[u8]) -> Result<Option<Dynamic>> {
    if b.len() < 64 || &b[..4] != b"\x7fELF" {
        return Ok(None);
    }
    if b[4] != 2 || b[5] != 1 {
        bail!("not a 64-bit little-endian ELF file");
    }
    let e_type = u16_at(b, 0x10)?;
    if e_type != 2 && e_type != 3 {
        return Ok(None);
    }
    let phoff = usize::try_from(u64_at(b, 0x20)?)?;
    let phentsize = usize::from(u16_at(b, 0x36)?);
    let phnum = usize::from(u16_at(b, 0x38)?);
    if phentsize < 56 {
        bail!("program header entries of {phentsize} bytes");
    }
    let mut loads = Vec::new();
    let mut dyn_range = None;
    for i in 0..phnum {
        let ph = phoff
            .checked_add(
                i.checked_mul(phentsize)
                    .context("program headers overflow")?,
            )
            .context("program headers overflow")?;
        if ph >= b.len() {
            bail!("program header {i} past the end of the file");
        }
        let p_type = u32_at(b, ph)?;
        let offset = u64_at(b, ph + 8)?;
        let vaddr = u64_at(b, ph + 16)?;
        let filesz = u64_at(b, ph + 32)?;
        match p_type {
            PT_LOAD => loads.push((vaddr, offset, filesz)),
            PT_DYNAMIC => dyn_range = Some((offset, filesz)),
            _ => {}
        }
    }
    let Some((dyn_off, dyn_size)) = dyn_range else {
        return Ok(None);
    };
    let start = usize::try_from(dyn_off)?;
    let end = start
        .checked_add(usize::try_from(dyn_size)?)
        .context("dynamic section overflows")?;
    let section = b
        .get(start..end)
        .context("dynamic section past the end of the file")?;
    let (mut strtab, mut needed, mut search) = (None, Vec::new(), Vec::new());
    for entry in section.chunks_exact(16) {
        let tag = u64_at(entry, 0)?;
        let val = u64_at(entry, 8)?;
        match tag {
            0 => break,
            DT_STRTAB => strtab = Some(val),
            DT_NEEDED => needed.push(val),
            DT_RPATH | DT_RUNPATH => search.push(val),
            _ => {}
        }
    }
    if needed.is_empty() && search.is_empty() {
        return Ok(Some(Dynamic::default()));
    }
    let strtab = strtab.context("a dynamic section without a string table")?;
    let strtab_off = loads
        .iter()
        .find(|(vaddr, _, size)| strtab >= *vaddr && strtab - vaddr < *size)
        .map(|(vaddr, off, _)| strtab - vaddr + off)
        .context("the string table is in no loaded segment")?;
    let at = |v: u64| -> Result<String> {
        c_str(
            b,
            strtab_off
                .checked_add(v)
                .context("string offset overflows")?,
        )
    };
    Ok(Some(Dynamic {
        needed: needed.into_iter().map(at).collect::<Result<_>>()?,
        search: search
            .into_iter()
            .map(at)
            .collect::<Result<Vec<_>>>()?
            .iter()
            .flat_map(|s| s.split(':').map(str::to_string).collect::<Vec<_>>())
            .filter(|s| !s.is_empty())
            .collect(),
    }))
}

/// `path` (absolute, inside the image) resolved against `root`, following
/// links as the image would: an absolute link target is the image's, not
/// the build host's. `None` when it does not exist.
fn resolve(root: &Path, path: &str) -> Option<PathBuf> {
    let mut todo: Vec<String> = path
        .split('/')
        .filter(|c| !c.is_empty())
        .map(str::to_string)
        .rev()
        .collect();
    let mut at: Vec<String> = Vec::new();
    let mut hops = 0;
    while let Some(c) = todo.pop() {
        match c.as_str() {
            "." => continue,
            ".." => {
                at.pop();
                continue;
            }
            _ => {}
        }
        at.push(c);
        let host = root.join(at.join("/"));
        let meta = host.symlink_metadata().ok()?;
        if meta.file_type().is_symlink() {
            hops += 1;
            if hops > 40 {
                return None;
            }
            let target = std::fs::read_link(&host).ok()?;
            at.pop();
            let t = target.to_string_lossy();
            if t.starts_with('/') {
                at.clear();
            }
            todo.extend(
                t.split('/')
                    .filter(|c| !c.is_empty())
                    .map(str::to_string)
                    .rev(),
            );
        }
    }
    Some(root.join(at.join("/")))
}

/// The dynamic linker's default and configured directories in the image.
fn linker_dirs(root: &Path) -> Result<Vec<String>> {
    let mut dirs: Vec<String> = [
        "/lib/x86_64-linux-gnu",
        "/usr/lib/x86_64-linux-gnu",
        "/lib",
        "/usr/lib",
    ]
    .map(str::to_string)
    .to_vec();
    if let Some(conf) = resolve(root, "/etc/ld.so.conf.d") {
        if let Ok(entries) = std::fs::read_dir(&conf) {
            let mut files: Vec<_> = entries.filter_map(|e| e.ok()).map(|e| e.path()).collect();
            files.sort();
            for f in files
                .iter()
                .filter(|f| f.extension().is_some_and(|e| e == "conf"))
            {
                let text = std::fs::read_to_string(f)
                    .with_context(|| format!("cannot read {}", f.display()))?;
                dirs.extend(
                    text.lines()
                        .map(str::trim)
                        .filter(|l| l.starts_with('/'))
                        .map(str::to_string),
                );
            }
        }
    }
    Ok(dirs)
}

/// Every ELF program and library under `root` whose DT_NEEDED libraries the
/// dynamic linker would not find in the image, as "path needs soname".
pub fn missing_libraries(root: &Path) -> Result<Vec<String>> {
    let dirs = linker_dirs(root)?;
    let mut missing = BTreeSet::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let rel = dir.strip_prefix(root).unwrap_or(&dir);
        if ["proc", "sys", "dev", "usr/lib/modules"]
            .iter()
            .any(|skip| rel == Path::new(skip))
        {
            continue;
        }
        for e in
            std::fs::read_dir(&dir).with_context(|| format!("cannot read {}", dir.display()))?
        {
            let e = e?;
            let ft = e.file_type()?;
            if ft.is_dir() {
                stack.push(e.path());
                continue;
            }
            if !ft.is_file() {
                continue;
            }
            let path = e.path();
            let mut f = std::fs::File::open(&path)
                .with_context(|| format!("cannot open {}", path.display()))?;
            let mut bytes = Vec::new();
            (&mut f).take(4).read_to_end(&mut bytes)?;
            if bytes != b"\x7fELF" {
                continue;
            }
            f.read_to_end(&mut bytes)
                .with_context(|| format!("cannot read {}", path.display()))?;
            let in_image = format!("/{}", path.strip_prefix(root)?.display());
            let Some(d) = dynamic(&bytes).with_context(|| format!("{in_image}: bad ELF file"))?
            else {
                continue;
            };
            let origin = in_image.rsplit_once('/').map(|(d, _)| d).unwrap_or("/");
            for lib in &d.needed {
                let found = d
                    .search
                    .iter()
                    .map(|s| s.replace("$ORIGIN", origin).replace("${ORIGIN}", origin))
                    .chain(dirs.iter().cloned())
                    // The object's own directory last: libsystemd-core needs
                    // libsystemd-shared beside it, which systemd's RUNPATH
                    // loaded.
                    .chain([origin.to_string()])
                    .any(|dir| resolve(root, &format!("{dir}/{lib}")).is_some_and(|p| p.is_file()));
                if !found {
                    missing.insert(format!("{in_image} needs {lib}"));
                }
            }
        }
    }
    Ok(missing.into_iter().collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The smallest shared object with a dynamic section: one PT_LOAD over
    /// the whole file, one PT_DYNAMIC, DT_STRTAB, two DT_NEEDED, a RUNPATH.
    fn tiny_elf(needed: &[&str], runpath: Option<&str>) -> Vec<u8> {
        let mut strtab = vec![0u8];
        let mut offsets = Vec::new();
        for s in needed.iter().copied().chain(runpath) {
            offsets.push(strtab.len() as u64);
            strtab.extend_from_slice(s.as_bytes());
            strtab.push(0);
        }
        let phoff = 64u64;
        let dyn_off = phoff + 2 * 56;
        let mut dynamic = Vec::new();
        let strtab_off = dyn_off + 16 * (needed.len() as u64 + 3);
        let mut push = |t: u64, v: u64| {
            dynamic.extend_from_slice(&t.to_le_bytes());
            dynamic.extend_from_slice(&v.to_le_bytes());
        };
        push(DT_STRTAB, 0x1000 + strtab_off);
        for o in &offsets[..needed.len()] {
            push(DT_NEEDED, *o);
        }
        if runpath.is_some() {
            push(DT_RUNPATH, offsets[needed.len()]);
        } else {
            push(99, 0);
        }
        push(0, 0);
        let total = strtab_off + strtab.len() as u64;
        let mut b = vec![0u8; 64];
        b[..4].copy_from_slice(b"\x7fELF");
        b[4] = 2;
        b[5] = 1;
        b[0x10..0x12].copy_from_slice(&3u16.to_le_bytes());
        b[0x20..0x28].copy_from_slice(&phoff.to_le_bytes());
        b[0x36..0x38].copy_from_slice(&56u16.to_le_bytes());
        b[0x38..0x3a].copy_from_slice(&2u16.to_le_bytes());
        for (t, off, vaddr, size) in [
            (PT_LOAD, 0, 0x1000, total),
            (PT_DYNAMIC, dyn_off, 0x1000 + dyn_off, dynamic.len() as u64),
        ] {
            let mut ph = vec![0u8; 56];
            ph[..4].copy_from_slice(&t.to_le_bytes());
            ph[8..16].copy_from_slice(&off.to_le_bytes());
            ph[16..24].copy_from_slice(&vaddr.to_le_bytes());
            ph[32..40].copy_from_slice(&size.to_le_bytes());
            b.extend(ph);
        }
        b.extend(dynamic);
        b.extend(strtab);
        b
    }

    #[test]
    fn reads_needed_and_runpath() {
        let d = dynamic(&tiny_elf(
            &["libc.so.6", "libfoo.so.1"],
            Some("$ORIGIN/../lib:/opt"),
        ))
        .unwrap()
        .unwrap();
        assert_eq!(d.needed, ["libc.so.6", "libfoo.so.1"]);
        assert_eq!(d.search, ["$ORIGIN/../lib", "/opt"]);
    }

    #[test]
    fn what_is_not_a_dynamic_elf_is_skipped() {
        assert_eq!(dynamic(b"#!/bin/sh\necho hello, this is long enough to be read as a header; really it is\n").unwrap(), None);
        let mut rel = tiny_elf(&["libc.so.6"], None);
        rel[0x10] = 1; // ET_REL, as kernel modules are
        assert_eq!(dynamic(&rel).unwrap(), None);
    }

    #[test]
    fn damaged_files_are_errors_not_panics() {
        let good = tiny_elf(&["libc.so.6"], None);
        for cut in [70, 130, 180, good.len() - 3] {
            assert!(dynamic(&good[..cut]).is_err(), "cut at {cut}");
        }
        let mut far = good.clone();
        far[0x20..0x28].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(dynamic(&far).is_err());
        let mut big_endian = good.clone();
        big_endian[5] = 2;
        assert!(dynamic(&big_endian).is_err());
        let mut bad_strtab = good;
        let dyn_at = 64 + 2 * 56;
        bad_strtab[dyn_at + 8..dyn_at + 16].copy_from_slice(&0xdead_0000u64.to_le_bytes());
        assert!(dynamic(&bad_strtab).is_err());
    }

    #[test]
    fn a_program_whose_library_is_gone_is_reported() {
        let root = tempfile::tempdir().unwrap();
        let r = root.path();
        for d in [
            "usr/lib/x86_64-linux-gnu",
            "usr/bin",
            "opt/app/lib",
            "etc/ld.so.conf.d",
            "usr/local/special",
        ] {
            std::fs::create_dir_all(r.join(d)).unwrap();
        }
        std::os::unix::fs::symlink("usr/lib", r.join("lib")).unwrap();
        std::fs::write(
            r.join("usr/lib/x86_64-linux-gnu/libc.so.6"),
            tiny_elf(&[], None),
        )
        .unwrap();
        // An absolute link: resolved inside the image, not on the build host.
        std::os::unix::fs::symlink(
            "/usr/local/special/libspecial.so.2",
            r.join("usr/lib/x86_64-linux-gnu/libalias.so.1"),
        )
        .unwrap();
        std::fs::write(
            r.join("opt/app/lib/libapp.so.1"),
            tiny_elf(&["libc.so.6"], None),
        )
        .unwrap();
        std::fs::write(
            r.join("usr/local/special/libspecial.so.2"),
            tiny_elf(&[], None),
        )
        .unwrap();
        std::fs::write(
            r.join("etc/ld.so.conf.d/special.conf"),
            "# comment\n/usr/local/special\n",
        )
        .unwrap();
        std::fs::write(
            r.join("usr/bin/ok"),
            tiny_elf(&["libc.so.6", "libalias.so.1", "libspecial.so.2"], None),
        )
        .unwrap();
        std::fs::write(
            r.join("opt/app/app"),
            tiny_elf(&["libapp.so.1"], Some("$ORIGIN/lib")),
        )
        .unwrap();
        std::fs::write(
            r.join("usr/bin/broken"),
            tiny_elf(&["libc.so.6", "libcurl.so.4"], None),
        )
        .unwrap();
        assert_eq!(
            missing_libraries(r).unwrap(),
            ["/usr/bin/broken needs libcurl.so.4"]
        );
    }
}
