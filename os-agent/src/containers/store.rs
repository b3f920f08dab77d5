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
//! match; an image is unpacked in tmp/ and renamed when every layer is in.

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
        Ok(Store { root })
    }

    pub fn root(&self) -> &Path {
        &self.root
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

    /// Builds an image directory with `fill(rootfs)` in tmp/ and moves it in
    /// place only when `fill` succeeded.
    pub fn commit_image<E: From<StoreError>>(
        &self,
        info: ImageInfo,
        fill: impl FnOnce(&Path) -> Result<(), E>,
    ) -> Result<Image, E> {
        let work = tempfile::Builder::new()
            .prefix("image-")
            .tempdir_in(self.root.join("tmp"))
            .map_err(io_err("cannot create a temporary image directory"))?;
        let rootfs = work.path().join("rootfs");
        fs::create_dir(&rootfs).map_err(io_err(format!("cannot create {}", rootfs.display())))?;
        fill(&rootfs)?;
        // systemd-nspawn refuses a directory without /usr as "not an OS
        // tree", which many images are (busybox, static binaries on
        // scratch): an empty /usr changes nothing for them.
        let usr = rootfs.join("usr");
        if fs::symlink_metadata(&usr).is_err() {
            fs::create_dir(&usr).map_err(io_err(format!("cannot create {}", usr.display())))?;
        }
        let json = serde_json::to_vec_pretty(&info)
            .map_err(|e| io_err("cannot serialize image.json")(io::Error::other(e)))?;
        let mut f = fs::File::create(work.path().join("image.json"))
            .map_err(io_err("cannot write image.json"))?;
        f.write_all(&json)
            .and_then(|()| f.sync_all())
            .map_err(io_err("cannot write image.json"))?;
        let dest = self.image_dir(&info.manifest);
        let kept = work.keep();
        fs::rename(&kept, &dest).map_err(io_err(format!(
            "cannot move the image to {}",
            dest.display()
        )))?;
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
