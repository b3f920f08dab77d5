//! Unpacking one OCI layer (a tar, plain, gzip or zstd) onto a root directory
//! that holds the layers below it, applying whiteouts (`.wh.<name>` deletes a
//! lower file, `.wh..wh..opq` empties a lower directory).
//!
//! The layer is untrusted: every path is checked before anything is written.
//! Refused with an [`UnpackError`] naming the entry: absolute paths, `..`,
//! writing through a symbolic link (a directory on the way that is a link),
//! relative link targets that climb out of the root, and hard links to
//! anything outside it. Absolute symlink targets are kept as they are: they
//! resolve inside the container's root when it runs, and the unpacker itself
//! never follows a link.
//!
//! Extended attributes come from PAX `SCHILY.xattr.<name>` records (as docker
//! and containers/image write them). Only the image's own are applied:
//! `user.*`, and `security.capability` when running as root (file
//! capabilities: Debian's ping needs `cap_net_raw`). Others (`trusted.*`,
//! which overlayfs reads as its own, `security.selinux`, ACLs) are the
//! host's business and are skipped with a debug log.

use crate::update::io::{drain, limit_exceeded, HashingReader, LimitReader};
use std::collections::HashSet;
use std::fs;
use std::io::{self, BufRead, BufReader, Read};
use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::{Component, Path, PathBuf};

const WHITEOUT: &str = ".wh.";
const OPAQUE: &str = ".wh..wh..opq";

/// Why a layer was refused.
#[derive(Debug, thiserror::Error)]
pub enum UnpackError {
    #[error("layer entry {entry:?}: {why}")]
    Refused { entry: String, why: String },
    #[error("layer entry {entry:?}: {source}")]
    Io {
        entry: String,
        #[source]
        source: io::Error,
    },
    #[error("cannot read the layer: {0}")]
    Read(#[source] io::Error),
    #[error("layer entry {entry:?}: the image would unpack to more than the {limit} bytes it may")]
    Quota { entry: String, limit: u64 },
}

/// An error reading the layer's stream: past the limit, it is the quota's.
fn read_err(entry: &str, limit: u64, e: io::Error) -> UnpackError {
    if limit_exceeded(&e).is_some() {
        UnpackError::Quota {
            entry: entry.to_string(),
            limit,
        }
    } else {
        UnpackError::Read(e)
    }
}

/// What a layer unpacked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unpacked {
    /// The sha256 (hex) of the uncompressed tar: the layer's `diff_id`.
    pub diff_id: String,
    /// The uncompressed tar's size, which is what counts against the limit.
    pub bytes: u64,
}

fn refused(entry: &str, why: impl Into<String>) -> UnpackError {
    UnpackError::Refused {
        entry: entry.to_string(),
        why: why.into(),
    }
}

/// The compression of a layer, told from its first bytes (media types lie
/// more often than magic numbers do).
pub fn decompress<'a, R: Read + 'a>(r: R) -> io::Result<Box<dyn Read + 'a>> {
    let mut r = BufReader::new(r);
    let head = r.fill_buf()?;
    Ok(if head.starts_with(&[0x1f, 0x8b]) {
        Box::new(flate2::read::MultiGzDecoder::new(r))
    } else if head.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        Box::new(zstd::stream::read::Decoder::with_buffer(r)?)
    } else {
        Box::new(r)
    })
}

/// A path inside the layer as a clean relative path; `None` is the root itself.
fn clean(entry: &str, raw: &Path) -> Result<Option<PathBuf>, UnpackError> {
    // The root's own entry: `/` (umoci writes it), `./` or `.`.
    if raw
        .components()
        .all(|c| matches!(c, Component::RootDir | Component::CurDir))
    {
        return Ok(None);
    }
    let mut out = PathBuf::new();
    for c in raw.components() {
        match c {
            Component::Normal(n) => out.push(n),
            Component::CurDir => {}
            Component::RootDir | Component::Prefix(_) => {
                return Err(refused(entry, "absolute path"));
            }
            Component::ParentDir => return Err(refused(entry, "path contains `..`")),
        }
    }
    Ok(if out.as_os_str().is_empty() {
        None
    } else {
        Some(out)
    })
}

/// Makes sure every directory above `rel` exists inside `root` and none of
/// them is a symbolic link (which would make a write land elsewhere).
fn prepare_parents(root: &Path, rel: &Path, entry: &str) -> Result<(), UnpackError> {
    let mut cur = root.to_path_buf();
    let Some(parent) = rel.parent() else {
        return Ok(());
    };
    for c in parent.components() {
        cur.push(c);
        match fs::symlink_metadata(&cur) {
            Ok(m) if m.file_type().is_symlink() => {
                return Err(refused(
                    entry,
                    format!(
                        "writes through the symbolic link {}",
                        display_rel(root, &cur)
                    ),
                ));
            }
            Ok(m) if m.is_dir() => {}
            Ok(_) => {
                return Err(refused(
                    entry,
                    format!("{} is not a directory", display_rel(root, &cur)),
                ));
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                fs::create_dir(&cur).map_err(|e| io_err(entry, e))?;
            }
            Err(e) => return Err(io_err(entry, e)),
        }
    }
    Ok(())
}

fn display_rel(root: &Path, p: &Path) -> String {
    format!("/{}", p.strip_prefix(root).unwrap_or(p).display())
}

fn io_err(entry: &str, source: io::Error) -> UnpackError {
    UnpackError::Io {
        entry: entry.to_string(),
        source,
    }
}

/// Removes whatever is at `p` (a directory with its contents); nothing there is fine.
fn remove_any(p: &Path) -> io::Result<()> {
    match fs::symlink_metadata(p) {
        Ok(m) if m.is_dir() => fs::remove_dir_all(p),
        Ok(_) => fs::remove_file(p),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

/// Whether a relative symlink target, seen from the link's directory, stays
/// inside the root.
fn link_stays_inside(link_rel: &Path, target: &Path) -> bool {
    let mut depth: i64 = if target.is_absolute() {
        0
    } else {
        link_rel
            .parent()
            .map_or(0, |p| p.components().count() as i64)
    };
    for c in target.components() {
        match c {
            Component::ParentDir => {
                depth -= 1;
                if depth < 0 {
                    return false;
                }
            }
            Component::Normal(_) => depth += 1,
            Component::RootDir | Component::CurDir | Component::Prefix(_) => {}
        }
    }
    true
}

/// Options for [`unpack_layer`].
#[derive(Debug, Clone, Copy)]
pub struct Options {
    /// Apply the owners and file capabilities in the layer (needs root);
    /// else files belong to us and carry no capabilities.
    pub chown: bool,
}

const XATTR_RECORD: &str = "SCHILY.xattr.";
const CAPABILITY: &str = "security.capability";

/// The extended attributes of an entry that the image may set (see the
/// module doc), in the order the layer gives them.
fn xattrs<R: Read>(
    entry: &mut tar::Entry<'_, R>,
    name: &str,
    opts: Options,
) -> Result<Vec<(String, Vec<u8>)>, UnpackError> {
    let mut out = Vec::new();
    let Some(records) = entry.pax_extensions().map_err(UnpackError::Read)? else {
        return Ok(out);
    };
    for record in records {
        let record = record.map_err(UnpackError::Read)?;
        let key = record
            .key()
            .map_err(|_| refused(name, "a PAX record key is not UTF-8"))?;
        let Some(attr) = key.strip_prefix(XATTR_RECORD) else {
            continue;
        };
        if attr.starts_with("user.") || (attr == CAPABILITY && opts.chown) {
            out.push((attr.to_string(), record.value_bytes().to_vec()));
        } else {
            tracing::debug!("layer entry {name:?}: not applying extended attribute {attr:?}");
        }
    }
    Ok(out)
}

impl Options {
    /// Owners are applied when running as root.
    pub fn for_this_process() -> Options {
        Options {
            chown: rustix::process::geteuid().is_root(),
        }
    }
}

/// Unpacks a layer (compressed or not) onto `root`, refusing it once its
/// uncompressed tar passes `limit` bytes (an entry that would is refused
/// before anything of it is written), and hashing that tar for its diff_id.
pub fn unpack_layer(
    layer: impl Read,
    root: &Path,
    opts: Options,
    limit: u64,
) -> Result<Unpacked, UnpackError> {
    let reader = decompress(layer).map_err(UnpackError::Read)?;
    let mut archive = tar::Archive::new(HashingReader::new(LimitReader::new(reader, limit)));
    // Paths this layer wrote: whiteouts only remove what lower layers left.
    let mut written: HashSet<PathBuf> = HashSet::new();
    let mut dir_modes: Vec<(PathBuf, u32, filetime::FileTime)> = Vec::new();
    // For errors between entries (a header, a PAX record): where they were.
    let mut last = String::from("(the start of the layer)");
    for entry in archive.entries().map_err(UnpackError::Read)? {
        let mut entry = entry.map_err(|e| read_err(&format!("(after) {last}"), limit, e))?;
        let raw_path = entry.path().map_err(UnpackError::Read)?.into_owned();
        let name = raw_path.display().to_string();
        if entry.raw_file_position().saturating_add(entry.size()) > limit {
            return Err(UnpackError::Quota { entry: name, limit });
        }
        last.clone_from(&name);
        let Some(rel) = clean(&name, &raw_path)? else {
            continue;
        };
        prepare_parents(root, &rel, &name)?;
        let file_name = rel
            .file_name()
            .map(|f| f.to_string_lossy().into_owned())
            .unwrap_or_default();
        let dest = root.join(&rel);

        if file_name == OPAQUE {
            let dir = dest.parent().unwrap_or(root);
            for child in fs::read_dir(dir).map_err(|e| io_err(&name, e))? {
                let child = child.map_err(|e| io_err(&name, e))?.path();
                let child_rel = child.strip_prefix(root).unwrap_or(&child).to_path_buf();
                if !written.contains(&child_rel) {
                    remove_any(&child).map_err(|e| io_err(&name, e))?;
                }
            }
            continue;
        }
        if let Some(hidden) = file_name.strip_prefix(WHITEOUT) {
            if hidden.is_empty() || hidden == "." || hidden == ".." {
                return Err(refused(&name, "whiteout of nothing"));
            }
            let target = dest.with_file_name(hidden);
            let target_rel = rel.with_file_name(hidden);
            if !written.contains(&target_rel) {
                remove_any(&target).map_err(|e| io_err(&name, e))?;
            }
            continue;
        }

        let attrs = xattrs(&mut entry, &name, opts)?;
        let header = entry.header();
        let kind = header.entry_type();
        let mode = header.mode().map_err(|e| io_err(&name, e))? & 0o7777;
        // An empty numeric field is 0, as Go's archive/tar (and so docker) reads it.
        let numeric = |v: io::Result<u64>, raw: &[u8]| -> Result<u64, UnpackError> {
            match v {
                Ok(v) => Ok(v),
                Err(_) if raw.iter().all(|b| matches!(b, 0 | b' ')) => Ok(0),
                Err(e) => Err(io_err(&name, e)),
            }
        };
        let id = |v: u64| -> Result<u32, UnpackError> {
            u32::try_from(v).map_err(|_| refused(&name, format!("owner id {v} is out of range")))
        };
        let old = header.as_old();
        let owner = (
            id(numeric(header.uid(), &old.uid)?)?,
            id(numeric(header.gid(), &old.gid)?)?,
        );
        let mtime = numeric(header.mtime(), &old.mtime)?;
        let mtime = filetime::FileTime::from_unix_time(i64::try_from(mtime).unwrap_or(i64::MAX), 0);
        let existing = fs::symlink_metadata(&dest);
        // A directory over a directory merges; anything else replaces.
        let keep_dir = kind.is_dir() && matches!(&existing, Ok(m) if m.is_dir());
        if !keep_dir {
            remove_any(&dest).map_err(|e| io_err(&name, e))?;
        }
        match kind {
            tar::EntryType::Directory => {
                if !keep_dir {
                    fs::create_dir(&dest).map_err(|e| io_err(&name, e))?;
                }
                // Modes last: a read-only directory would refuse its own children.
                dir_modes.push((rel.clone(), mode, mtime));
            }
            tar::EntryType::Regular | tar::EntryType::Continuous => {
                let mut f = fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .open(&dest)
                    .map_err(|e| io_err(&name, e))?;
                io::copy(&mut entry, &mut f).map_err(|e| io_err(&name, e))?;
                // Owner before mode: chown clears setuid and setgid bits.
                if opts.chown {
                    std::os::unix::fs::fchown(&f, Some(owner.0), Some(owner.1))
                        .map_err(|e| io_err(&name, e))?;
                }
                f.set_permissions(fs::Permissions::from_mode(mode))
                    .map_err(|e| io_err(&name, e))?;
                filetime::set_file_handle_times(&f, None, Some(mtime))
                    .map_err(|e| io_err(&name, e))?;
            }
            tar::EntryType::Symlink => {
                let target = entry
                    .link_name()
                    .map_err(UnpackError::Read)?
                    .ok_or_else(|| refused(&name, "symbolic link without a target"))?
                    .into_owned();
                if !link_stays_inside(&rel, &target) {
                    return Err(refused(
                        &name,
                        format!(
                            "symbolic link to {} points outside the root",
                            target.display()
                        ),
                    ));
                }
                symlink(&target, &dest).map_err(|e| io_err(&name, e))?;
            }
            tar::EntryType::Link => {
                let target = entry
                    .link_name()
                    .map_err(UnpackError::Read)?
                    .ok_or_else(|| refused(&name, "hard link without a target"))?
                    .into_owned();
                let target_rel = clean(&name, &target)
                    .map_err(|_| {
                        refused(
                            &name,
                            format!("hard link to {} points outside the root", target.display()),
                        )
                    })?
                    .ok_or_else(|| refused(&name, "hard link to the root"))?;
                prepare_parents(root, &target_rel, &name)?;
                let src = root.join(&target_rel);
                match fs::symlink_metadata(&src) {
                    Ok(m) if m.is_file() || m.file_type().is_symlink() => {}
                    Ok(_) => {
                        return Err(refused(
                            &name,
                            format!("hard link to {}, not a file", target.display()),
                        ))
                    }
                    Err(e) => {
                        return Err(refused(
                            &name,
                            format!("hard link to {}: {e}", target.display()),
                        ))
                    }
                }
                fs::hard_link(&src, &dest).map_err(|e| io_err(&name, e))?;
            }
            tar::EntryType::XGlobalHeader | tar::EntryType::XHeader => continue,
            other => {
                // Device nodes and FIFOs: nspawn gives the container its own /dev.
                tracing::warn!("layer entry {name:?}: skipping {other:?} entry");
                continue;
            }
        }
        // Files got theirs above; a hard link shares its target's inode
        // (whose entry set the owner, and a chown would clear its setuid).
        let owned = matches!(
            kind,
            tar::EntryType::Regular | tar::EntryType::Continuous | tar::EntryType::Link
        );
        if opts.chown && !owned {
            std::os::unix::fs::lchown(&dest, Some(owner.0), Some(owner.1))
                .map_err(|e| io_err(&name, e))?;
        }
        if kind == tar::EntryType::Symlink {
            // Does not follow the link (utimensat with AT_SYMLINK_NOFOLLOW).
            filetime::set_symlink_file_times(&dest, mtime, mtime).map_err(|e| io_err(&name, e))?;
            if !attrs.is_empty() {
                // The kernel takes no user.* attribute on a link, and a
                // capability means nothing there.
                tracing::debug!(
                    "layer entry {name:?}: extended attributes on a symbolic link skipped"
                );
            }
        } else {
            // After the owner: a chown clears security.capability.
            for (attr, value) in &attrs {
                rustix::fs::lsetxattr(&dest, attr.as_str(), value, rustix::fs::XattrFlags::empty())
                    .map_err(|e| {
                        let e = io::Error::new(e.kind(), format!("extended attribute {attr}: {e}"));
                        io_err(&name, e)
                    })?;
            }
        }
        written.insert(rel);
    }
    // The diff_id covers the whole stream: the end-of-archive blocks and
    // whatever follows them (within the limit).
    let mut rest = archive.into_inner();
    drain(&mut rest).map_err(|e| read_err("(after the end of the archive)", limit, e))?;
    let (diff_id, counted) = rest.finish();
    let bytes = counted.count();
    for (rel, mode, mtime) in dir_modes.into_iter().rev() {
        // A later entry may have replaced the directory, or one above it,
        // with a symbolic link: chmod follows links, so look first.
        let mut cur = root.to_path_buf();
        let mut still_dir = true;
        for c in rel.components() {
            cur.push(c);
            match fs::symlink_metadata(&cur) {
                Ok(m) if m.is_dir() => {}
                Ok(_) => still_dir = false,
                Err(e) if e.kind() == io::ErrorKind::NotFound => still_dir = false,
                Err(e) => return Err(io_err(&rel.display().to_string(), e)),
            }
        }
        if still_dir {
            fs::set_permissions(&cur, fs::Permissions::from_mode(mode))
                .map_err(|e| io_err(&rel.display().to_string(), e))?;
            filetime::set_symlink_file_times(&cur, mtime, mtime)
                .map_err(|e| io_err(&rel.display().to_string(), e))?;
        }
    }
    Ok(Unpacked { diff_id, bytes })
}

#[cfg(test)]
mod tests;
