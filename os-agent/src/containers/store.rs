//! The content-addressed image store (default root /var/lib/ballast/images):
//!
//! ```text
//! blobs/sha256/<hex>          manifests, configs and layers, each verified against its digest
//! images/<manifest hex>/      one unpacked image: rootfs/ and image.json
//! refs.json                   reference (registry/repo:tag) → manifest digest of the last pull
//! tmp/                        downloads and unpacks in progress
//! ```
//!
//! Nothing appears under its final name before it is verified: a blob is
//! hashed while it is written to tmp/ and renamed only when digest and size
//! match; an image is unpacked in tmp/, every file and directory of it is
//! synced, and it is renamed into images/ last (then images/ is synced).
//!
//! What the store holds is capped by its [`Quota`]: one image may unpack to
//! [`MAX_IMAGE_BYTES`], and the store (blobs, images, work in tmp/) may fill
//! half of its filesystem, as measured by [`sync_tree`]'s rule (file
//! contents, plus [`ENTRY_BYTES`] for every entry).

use super::oci::RunConfig;
use super::reference::Digest;
use crate::update::io::{limit_exceeded, HashingReader, LimitReader};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

/// Where the store lives on a host.
pub const DEFAULT_ROOT: &str = "/var/lib/ballast/images";

/// Most bytes one image may unpack to (the sum of its layers' uncompressed
/// sizes while unpacking, its tree once unpacked).
pub const MAX_IMAGE_BYTES: u64 = 16 << 30;

/// What an entry (file, directory, link) counts for besides its contents: a
/// tree of empty files is not free.
pub const ENTRY_BYTES: u64 = 512;

/// Limits on what the store holds (docs/containers.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Quota {
    /// Most bytes one image may unpack to.
    pub image: u64,
    /// Most bytes the whole store may hold.
    pub store: u64,
}

/// How much the image being committed may unpack to, and what set that.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Room {
    pub bytes: u64,
    pub why: String,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("blob {expected}: content has digest sha256:{actual}; refused")]
    DigestMismatch { expected: Digest, actual: String },
    #[error("blob {digest}: {actual} bytes where the descriptor says {expected}; refused")]
    SizeMismatch {
        digest: Digest,
        expected: u64,
        actual: u64,
    },
    #[error("{what}; refused")]
    Quota { what: String },
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: io::Error,
    },
}

fn io_err(what: impl Into<String>) -> impl FnOnce(io::Error) -> StoreError {
    let what = what.into();
    move |source| StoreError::Io { what, source }
}

/// What the store records about an unpacked image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageInfo {
    pub reference: String,
    pub manifest: Digest,
    /// The index the manifest was chosen from, if any (kept with the image).
    pub index: Option<Digest>,
    pub config_digest: Digest,
    pub layers: Vec<Digest>,
    pub config: RunConfig,
}

/// An image ready to run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Image {
    pub info: ImageInfo,
    pub rootfs: PathBuf,
}

pub struct Store {
    root: PathBuf,
    quota: Quota,
}

/// What [`sync_tree`] went through.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Tree {
    /// Regular files synced (a file with several names once).
    pub files: u64,
    /// Directories synced, the top one included.
    pub dirs: u64,
    /// Contents of the files plus [`ENTRY_BYTES`] per entry below the top.
    pub bytes: u64,
}

/// Syncs every regular file and directory under `top` (children before the
/// directory that names them, `top` last) and measures the tree. Symbolic
/// links are not followed: their directory's sync keeps them.
pub fn sync_tree(top: &Path) -> Result<Tree, StoreError> {
    walk(top, true)
}

fn walk(top: &Path, sync: bool) -> Result<Tree, StoreError> {
    use std::os::unix::fs::MetadataExt;
    fn dir(
        d: &Path,
        sync: bool,
        seen: &mut BTreeSet<(u64, u64)>,
        t: &mut Tree,
    ) -> Result<(), StoreError> {
        for e in fs::read_dir(d).map_err(io_err(format!("cannot list {}", d.display())))? {
            let p = e
                .map_err(io_err(format!("cannot list {}", d.display())))?
                .path();
            let m =
                fs::symlink_metadata(&p).map_err(io_err(format!("cannot stat {}", p.display())))?;
            t.bytes += ENTRY_BYTES;
            if m.is_dir() {
                dir(&p, sync, seen, t)?;
            } else if m.is_file() && (m.nlink() == 1 || seen.insert((m.dev(), m.ino()))) {
                t.bytes += m.len();
                t.files += 1;
                if sync {
                    fs::File::open(&p)
                        .and_then(|f| f.sync_all())
                        .map_err(io_err(format!("cannot sync {}", p.display())))?;
                }
            }
        }
        t.dirs += 1;
        if sync {
            sync_dir(d)?;
        }
        Ok(())
    }
    let mut t = Tree::default();
    dir(top, sync, &mut BTreeSet::new(), &mut t)?;
    Ok(t)
}

fn sync_dir(d: &Path) -> Result<(), StoreError> {
    fs::File::open(d)
        .and_then(|f| f.sync_all())
        .map_err(io_err(format!("cannot sync {}", d.display())))
}

/// What a garbage collection removed.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Collected {
    pub images: Vec<Digest>,
    pub blobs: Vec<Digest>,
}

impl Store {
    /// Opens (creating) the store at `root`, and makes `root` root's alone
    /// (0700): images keep their files' modes, setuid included, and a local
    /// user who could reach a pulled image's setuid-root binary could run it
    /// on the host (as containerd's CVE-2021-41103). systemd-nspawn runs as
    /// root and needs nothing more.
    pub fn open(root: impl Into<PathBuf>) -> Result<Store, StoreError> {
        use std::os::unix::fs::PermissionsExt;
        let root = root.into();
        for d in ["blobs/sha256", "images", "tmp"] {
            let p = root.join(d);
            fs::create_dir_all(&p).map_err(io_err(format!("cannot create {}", p.display())))?;
        }
        fs::set_permissions(&root, fs::Permissions::from_mode(0o700))
            .map_err(io_err(format!("cannot make {} private", root.display())))?;
        // /var holds more than images (volumes, the journal, etcd's data):
        // the store takes at most half of it.
        let fs = rustix::fs::statvfs(&root).map_err(|e| {
            io_err(format!(
                "cannot measure the filesystem of {}",
                root.display()
            ))(e.into())
        })?;
        let quota = Quota {
            image: MAX_IMAGE_BYTES,
            store: fs.f_blocks.saturating_mul(fs.f_frsize) / 2,
        };
        Ok(Store { root, quota })
    }

    /// The same store with other limits (tests, and hosts that know better).
    pub fn with_quota(self, quota: Quota) -> Store {
        Store { quota, ..self }
    }

    pub fn quota(&self) -> Quota {
        self.quota
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Bytes the store holds now, by [`sync_tree`]'s measure.
    fn used(&self) -> Result<u64, StoreError> {
        Ok(walk(&self.root, false)?.bytes)
    }

    /// Refuses `need` more bytes (blobs about to be fetched for `what`) that
    /// would take the store past its quota.
    pub fn check_room(&self, what: &str, need: u64) -> Result<(), StoreError> {
        let used = self.used()?;
        if used.saturating_add(need) > self.quota.store {
            return Err(StoreError::Quota {
                what: format!(
                    "{what}: {need} bytes to fetch, and the store holds {used} of its {} bytes",
                    self.quota.store
                ),
            });
        }
        Ok(())
    }

    /// How much the next image may unpack to: its own limit, or what the
    /// store has left if that is less.
    pub fn room(&self) -> Result<Room, StoreError> {
        let used = self.used()?;
        let left = self.quota.store.saturating_sub(used);
        Ok(if self.quota.image <= left {
            Room {
                bytes: self.quota.image,
                why: format!("the limit for one image is {} bytes", self.quota.image),
            }
        } else {
            Room {
                bytes: left,
                why: format!("the store holds {used} of its {} bytes", self.quota.store),
            }
        })
    }

    pub fn blob_path(&self, d: &Digest) -> PathBuf {
        self.root.join("blobs/sha256").join(d.hex())
    }

    pub fn has_blob(&self, d: &Digest) -> bool {
        self.blob_path(d).is_file()
    }

    fn image_dir(&self, manifest: &Digest) -> PathBuf {
        self.root.join("images").join(manifest.hex())
    }

    /// Streams `content` into the store as blob `digest`, refusing it (and
    /// keeping nothing) unless it has exactly `size` bytes and that digest.
    pub fn put_blob(
        &self,
        digest: &Digest,
        size: u64,
        content: impl Read,
    ) -> Result<PathBuf, StoreError> {
        let dest = self.blob_path(digest);
        let mut tmp = tempfile::NamedTempFile::new_in(self.root.join("tmp"))
            .map_err(io_err("cannot create a temporary blob"))?;
        let mut reader = HashingReader::new(LimitReader::new(content, size));
        let copied = io::copy(&mut reader, tmp.as_file_mut());
        let (actual, limited) = reader.finish();
        match copied {
            Ok(n) if n != size => {
                return Err(StoreError::SizeMismatch {
                    digest: digest.clone(),
                    expected: size,
                    actual: n,
                })
            }
            Ok(_) => {}
            Err(e) if limit_exceeded(&e).is_some() => {
                return Err(StoreError::SizeMismatch {
                    digest: digest.clone(),
                    expected: size,
                    actual: limited.count() + 1,
                })
            }
            Err(e) => return Err(io_err(format!("cannot download blob {digest}"))(e)),
        }
        if actual != digest.hex() {
            return Err(StoreError::DigestMismatch {
                expected: digest.clone(),
                actual,
            });
        }
        tmp.as_file()
            .sync_all()
            .map_err(io_err(format!("cannot sync blob {digest}")))?;
        tmp.persist(&dest)
            .map_err(|e| io_err(format!("cannot store blob {digest}"))(e.error))?;
        Ok(dest)
    }

    /// Reads a stored blob whole (manifests, configs), re-checking its digest:
    /// the disk is not trusted more than the network.
    pub fn read_blob(&self, d: &Digest) -> Result<Vec<u8>, StoreError> {
        let bytes = fs::read(self.blob_path(d)).map_err(io_err(format!("cannot read blob {d}")))?;
        let actual = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(&bytes));
        if actual != d.hex() {
            return Err(StoreError::DigestMismatch {
                expected: d.clone(),
                actual,
            });
        }
        Ok(bytes)
    }

    /// The unpacked image for a manifest, if complete.
    pub fn image(&self, manifest: &Digest) -> Result<Option<Image>, StoreError> {
        let dir = self.image_dir(manifest);
        let info_path = dir.join("image.json");
        let text = match fs::read_to_string(&info_path) {
            Ok(t) => t,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io_err(format!("cannot read {}", info_path.display()))(e)),
        };
        let info: ImageInfo = serde_json::from_str(&text).map_err(|e| {
            io_err(format!("{} is corrupt", info_path.display()))(io::Error::new(
                io::ErrorKind::InvalidData,
                e,
            ))
        })?;
        Ok(Some(Image {
            info,
            rootfs: dir.join("rootfs"),
        }))
    }

    /// Builds an image directory with `fill(rootfs, room)` in tmp/ and moves
    /// it in place only when `fill` succeeded, the tree is within `room` and
    /// every file and directory of it is on disk: a crash leaves either no
    /// image or a whole one. The rename is the last change; images/ is
    /// synced after it so that the image stays.
    pub fn commit_image<E: From<StoreError>>(
        &self,
        info: ImageInfo,
        fill: impl FnOnce(&Path, &Room) -> Result<(), E>,
    ) -> Result<Image, E> {
        let room = self.room()?;
        let work = tempfile::Builder::new()
            .prefix("image-")
            .tempdir_in(self.root.join("tmp"))
            .map_err(io_err("cannot create a temporary image directory"))?;
        let rootfs = work.path().join("rootfs");
        fs::create_dir(&rootfs).map_err(io_err(format!("cannot create {}", rootfs.display())))?;
        fill(&rootfs, &room)?;
        // systemd-nspawn refuses a directory without /usr as "not an OS
        // tree", which many images are (busybox, static binaries on
        // scratch): an empty /usr changes nothing for them.
        let usr = rootfs.join("usr");
        if fs::symlink_metadata(&usr).is_err() {
            fs::create_dir(&usr).map_err(io_err(format!("cannot create {}", usr.display())))?;
        }
        let tree = sync_tree(&rootfs)?;
        if tree.bytes > room.bytes {
            return Err(StoreError::Quota {
                what: format!(
                    "image {}: unpacks to {} bytes where {} may ({})",
                    info.manifest, tree.bytes, room.bytes, room.why
                ),
            }
            .into());
        }
        let json = serde_json::to_vec_pretty(&info)
            .map_err(|e| io_err("cannot serialize image.json")(io::Error::other(e)))?;
        let mut f = fs::File::create(work.path().join("image.json"))
            .map_err(io_err("cannot write image.json"))?;
        f.write_all(&json)
            .and_then(|()| f.sync_all())
            .map_err(io_err("cannot write image.json"))?;
        sync_dir(work.path())?;
        let dest = self.image_dir(&info.manifest);
        let kept = work.keep();
        fs::rename(&kept, &dest).map_err(io_err(format!(
            "cannot move the image to {}",
            dest.display()
        )))?;
        sync_dir(&self.root.join("images"))?;
        Ok(Image {
            rootfs: dest.join("rootfs"),
            info,
        })
    }

    fn refs_path(&self) -> PathBuf {
        self.root.join("refs.json")
    }

    pub fn refs(&self) -> Result<BTreeMap<String, Digest>, StoreError> {
        let p = self.refs_path();
        match fs::read_to_string(&p) {
            Ok(t) => serde_json::from_str(&t).map_err(|e| {
                io_err(format!("{} is corrupt", p.display()))(io::Error::new(
                    io::ErrorKind::InvalidData,
                    e,
                ))
            }),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(BTreeMap::new()),
            Err(e) => Err(io_err(format!("cannot read {}", p.display()))(e)),
        }
    }

    /// Records that `reference` last resolved to `manifest`, so it can be run
    /// without the registry (at boot, offline).
    pub fn set_ref(&self, reference: &str, manifest: &Digest) -> Result<(), StoreError> {
        let mut refs = self.refs()?;
        refs.insert(reference.to_string(), manifest.clone());
        let json = serde_json::to_vec_pretty(&refs)
            .map_err(|e| io_err("cannot serialize refs")(io::Error::other(e)))?;
        crate::host::write_atomic_at(&self.refs_path(), &json)
            .map_err(io_err("cannot write refs.json"))
    }

    /// Removes every image whose manifest is not in `keep`, the refs that
    /// point to them, every blob no kept image needs, and leftovers in tmp/.
    pub fn gc(&self, keep: &BTreeSet<Digest>) -> Result<Collected, StoreError> {
        let mut out = Collected::default();
        let mut needed: BTreeSet<Digest> = BTreeSet::new();
        let images = self.root.join("images");
        for e in
            fs::read_dir(&images).map_err(io_err(format!("cannot list {}", images.display())))?
        {
            let e = e.map_err(io_err(format!("cannot list {}", images.display())))?;
            let name = e.file_name().to_string_lossy().into_owned();
            // A name that is no digest is not the store's: it goes too.
            let digest = Digest::from_sha256_hex(&name).ok();
            match digest {
                Some(d) if keep.contains(&d) => {
                    if let Some(img) = self.image(&d)? {
                        needed.insert(img.info.manifest.clone());
                        needed.insert(img.info.config_digest.clone());
                        needed.extend(img.info.index.iter().cloned());
                        needed.extend(img.info.layers.iter().cloned());
                    }
                }
                _ => {
                    fs::remove_dir_all(e.path())
                        .map_err(io_err(format!("cannot remove {}", e.path().display())))?;
                    out.images.extend(digest);
                }
            }
        }
        let blobs = self.root.join("blobs/sha256");
        for e in fs::read_dir(&blobs).map_err(io_err(format!("cannot list {}", blobs.display())))? {
            let e = e.map_err(io_err(format!("cannot list {}", blobs.display())))?;
            let name = e.file_name().to_string_lossy().into_owned();
            // As above: a name that is no digest is a stray and goes.
            let digest = Digest::from_sha256_hex(&name).ok();
            if !digest.as_ref().is_some_and(|d| needed.contains(d)) {
                fs::remove_file(e.path())
                    .map_err(io_err(format!("cannot remove {}", e.path().display())))?;
                out.blobs.extend(digest);
            }
        }
        let mut refs = self.refs()?;
        let before = refs.len();
        refs.retain(|_, d| keep.contains(d));
        if refs.len() != before {
            let json = serde_json::to_vec_pretty(&refs)
                .map_err(|e| io_err("cannot serialize refs")(io::Error::other(e)))?;
            crate::host::write_atomic_at(&self.refs_path(), &json)
                .map_err(io_err("cannot write refs.json"))?;
        }
        let tmp = self.root.join("tmp");
        for e in fs::read_dir(&tmp).map_err(io_err(format!("cannot list {}", tmp.display())))? {
            let p = e
                .map_err(io_err(format!("cannot list {}", tmp.display())))?
                .path();
            let r = if p.is_dir() {
                fs::remove_dir_all(&p)
            } else {
                fs::remove_file(&p)
            };
            r.map_err(io_err(format!("cannot remove {}", p.display())))?;
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests;
