//! Writing a release into the inactive slot. The order is what keeps a host
//! bootable whatever happens (see `engine::apply`): this module does the
//! steps, each checked, and never makes anything bootable itself.

use super::channel::Channel;
use super::device::{DeviceError, DeviceWriter};
use super::io::{drain, limit_exceeded, HashingReader, LimitReader, ProgressReader};
use super::offload::Split;
use crate::disk::{self, slot::Slot, BlockPartition};
use crate::host::Host;
use anyhow::{Context, Result};
use ballast_common::manifest::Manifest;
use ballast_common::verity::{self, Tree, TreeBuilder};
use sha2::{Digest, Sha256};
use std::io::{Read, Seek, SeekFrom, Write};

/// Why a payload was refused. Each names the values involved.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Rejection {
    #[error("release {version} is the booted version (root hash {root_hash})")]
    SameVersion { version: String, root_hash: String },
    #[error("root payload of {size} bytes does not fit slot {slot} ({label}: {capacity} bytes)")]
    RootTooBig {
        size: u64,
        slot: Slot,
        label: String,
        capacity: u64,
    },
    #[error("verity tree of {size} bytes does not fit {label} ({capacity} bytes)")]
    TreeTooBig {
        size: u64,
        label: String,
        capacity: u64,
    },
    #[error("{what} is larger than the {limit} bytes the manifest says")]
    Oversized { what: &'static str, limit: u64 },
    #[error("truncated download of {what}: got {got} of {want} bytes")]
    Truncated {
        what: &'static str,
        got: u64,
        want: u64,
    },
    #[error("sha256 of {what} is {got}, the manifest says {want}")]
    Sha256Mismatch {
        what: &'static str,
        got: String,
        want: String,
    },
    #[error("root payload decompressed to {got} bytes, the manifest says {want}")]
    UncompressedSize { got: u64, want: u64 },
    #[error("verity root hash of the written slot is {got}, the manifest says {want}")]
    RootHash { got: String, want: String },
    #[error("the written slot has {got} data blocks, the manifest says {want}")]
    DataBlocks { got: u64, want: u64 },
}

/// The inactive slot: its root and verity partitions and their sizes.
#[derive(Debug, Clone)]
pub struct Target {
    pub slot: Slot,
    pub root: BlockPartition,
    pub root_label: String,
    pub root_capacity: u64,
    pub verity: BlockPartition,
    pub verity_label: String,
    pub verity_capacity: u64,
}

/// Finds the slot that is not `booted`.
pub fn target(host: &dyn Host, booted: Slot) -> Result<Target> {
    let slot = booted.other();
    let root_label = slot.label().to_string();
    let verity_label = format!("{root_label}-verity");
    let root = disk::locate_by_partlabel(host, &root_label)?;
    let verity = disk::locate_by_partlabel(host, &verity_label)?;
    Ok(Target {
        slot,
        root_capacity: disk::size_bytes(host, &root.name)?,
        verity_capacity: disk::size_bytes(host, &verity.name)?,
        root,
        root_label,
        verity,
        verity_label,
    })
}

/// Refuses before anything is written if the release cannot fit.
pub fn check_fits(m: &Manifest, t: &Target) -> Result<(), Rejection> {
    if m.root.uncompressed_size > t.root_capacity {
        return Err(Rejection::RootTooBig {
            size: m.root.uncompressed_size,
            slot: t.slot,
            label: t.root_label.clone(),
            capacity: t.root_capacity,
        });
    }
    let tree = verity::hash_area_size(m.verity.data_blocks);
    if tree > t.verity_capacity {
        return Err(Rejection::TreeTooBig {
            size: tree,
            label: t.verity_label.clone(),
            capacity: t.verity_capacity,
        });
    }
    Ok(())
}

fn parse_hash(hex_text: &str) -> Result<[u8; 32]> {
    let v = hex::decode(hex_text).with_context(|| format!("{hex_text:?} is not hex"))?;
    v.try_into()
        .map_err(|_| anyhow::anyhow!("{hex_text:?} is not 32 bytes"))
}

/// Streams the root payload into the target's root partition: HTTP →
/// count and cap → sha256 → zstd → (partition, verity tree). Checks every
/// hash and size against the manifest; returns the verified tree. The
/// partition holds garbage if this fails, but nothing boots it.
pub fn write_root(
    host: &dyn Host,
    channel: &Channel,
    m: &Manifest,
    t: &Target,
    progress: &mut dyn FnMut(u64),
) -> Result<Tree> {
    let body = channel.open_payload(&m.root.url, m.root.size)?;
    write_root_from(host, body, m, t, progress)
}

/// [`write_root`] from any reader of the compressed payload.
pub fn write_root_from(
    host: &dyn Host,
    body: impl Read,
    m: &Manifest,
    t: &Target,
    progress: &mut dyn FnMut(u64),
) -> Result<Tree> {
    const WHAT: &str = "the root payload";
    let salt = hex::decode(&m.verity.salt).context("verity.salt")?;
    let uuid = uuid::Uuid::parse_str(&m.verity.uuid).context("verity.uuid")?;
    let builder =
        TreeBuilder::new(verity::Params { salt, uuid }).context("cannot start the verity tree")?;
    let dev_path = t.root.dev_path();
    let dev = host
        .open_rw(&dev_path)
        .with_context(|| format!("cannot open {}", dev_path.display()))?;
    let device = DeviceWriter::new(dev, dev_path.display().to_string());
    // The slot write and the verity tree each get a thread of their own, so
    // they overlap with download, sha256 and zstd (docs: bench/).
    let mut sink = Split::new(device, builder);
    let source = ProgressReader::new(
        HashingReader::new(LimitReader::new(body, m.root.size)),
        progress,
    );
    let mut decoder =
        zstd::stream::read::Decoder::new(source).context("cannot start the zstd decoder")?;
    let copied = sink.copy_from(&mut decoder, m.root.uncompressed_size);
    let received = decoder.get_ref().get_ref().get_ref().get_ref().count();
    if let Err(e) = copied {
        if let Some(l) = limit_exceeded(&e) {
            // The reader's limit is the compressed size, the writer's the uncompressed.
            let what = if l.writing {
                "the decompressed root payload"
            } else {
                "the compressed root payload"
            };
            return Err(Rejection::Oversized {
                what,
                limit: l.limit,
            }
            .into());
        }
        if e.get_ref().is_some_and(|i| i.is::<DeviceError>()) {
            return Err(anyhow::Error::new(e).context(format!("writing slot {}", t.slot)));
        }
        if received < m.root.size {
            return Err(anyhow::Error::new(e).context(Rejection::Truncated {
                what: WHAT,
                got: received,
                want: m.root.size,
            }));
        }
        return Err(anyhow::Error::new(e).context("cannot decompress the root payload"));
    }
    // The decoder stops at the end of the last frame: hash what follows too.
    let mut source = decoder.finish().into_inner();
    drain(&mut source).map_err(|e| match limit_exceeded(&e) {
        Some(l) => anyhow::Error::new(Rejection::Oversized {
            what: "the compressed root payload",
            limit: l.limit,
        }),
        None => anyhow::Error::new(e).context("reading the end of the root payload"),
    })?;
    let hashing = source.into_inner();
    let received = hashing.get_ref().count();
    if received < m.root.size {
        return Err(Rejection::Truncated {
            what: WHAT,
            got: received,
            want: m.root.size,
        }
        .into());
    }
    let (sha, _) = hashing.finish();
    if sha != m.root.sha256 {
        return Err(Rejection::Sha256Mismatch {
            what: WHAT,
            got: sha,
            want: m.root.sha256.clone(),
        }
        .into());
    }
    let written = sink.count();
    if written != m.root.uncompressed_size {
        return Err(Rejection::UncompressedSize {
            got: written,
            want: m.root.uncompressed_size,
        }
        .into());
    }
    let (device, builder) = sink.finish();
    let device = device
        .map_err(anyhow::Error::new)
        .with_context(|| format!("writing slot {}", t.slot))?;
    let builder = builder.context("cannot hash the written slot")?;
    device
        .sync()
        .with_context(|| format!("cannot fsync {}", dev_path.display()))?;
    let tree = builder
        .finish()
        .context("cannot build the verity tree of the written slot")?;
    if tree.root_hash_hex() != m.root_hash {
        return Err(Rejection::RootHash {
            got: tree.root_hash_hex(),
            want: m.root_hash.clone(),
        }
        .into());
    }
    if tree.data_blocks != m.verity.data_blocks {
        return Err(Rejection::DataBlocks {
            got: tree.data_blocks,
            want: m.verity.data_blocks,
        }
        .into());
    }
    Ok(tree)
}

/// Writes the verified tree's hash area at the start of the verity partition.
pub fn write_hash_area(host: &dyn Host, t: &Target, tree: &Tree) -> Result<()> {
    let path = t.verity.dev_path();
    let mut f = host
        .open_rw(&path)
        .with_context(|| format!("cannot open {}", path.display()))?;
    f.seek(SeekFrom::Start(0))
        .and_then(|_| f.write_all(&tree.hash_area))
        .and_then(|()| f.sync_all())
        .with_context(|| format!("cannot write the verity tree to {}", path.display()))
}

/// Checks a slot written earlier against the root hash it was staged with:
/// reads the salt and block count from its hash area's superblock, hashes
/// every data block again, compares the root hash, and rewrites the hash
/// area if the one on the disk differs from the tree just built (a cut while
/// it was written). Used when a power cut took the slot's boot entry: the
/// entry is put back only over a slot that verifies.
pub fn reverify_slot(host: &dyn Host, t: &Target, root_hash_hex: &str) -> Result<()> {
    let vpath = t.verity.dev_path();
    let mut vdev = host
        .open(&vpath)
        .with_context(|| format!("cannot open {}", vpath.display()))?;
    let mut first = vec![0u8; verity::BLOCK];
    vdev.read_exact(&mut first)
        .with_context(|| format!("cannot read {}", vpath.display()))?;
    let sb = verity::read_superblock(&first)
        .with_context(|| format!("{} holds no verity tree", vpath.display()))?;
    let mut builder = TreeBuilder::new(verity::Params {
        salt: sb.salt,
        uuid: sb.uuid,
    })
    .context("cannot start the verity tree")?;
    let rpath = t.root.dev_path();
    let root = host
        .open(&rpath)
        .with_context(|| format!("cannot open {}", rpath.display()))?;
    let want = sb
        .data_blocks
        .checked_mul(verity::BLOCK as u64)
        .with_context(|| {
            format!(
                "the verity superblock on {} claims {} data blocks, more than any slot",
                vpath.display(),
                sb.data_blocks
            )
        })?;
    let copied = std::io::copy(&mut root.take(want), &mut builder)
        .with_context(|| format!("cannot read {}", rpath.display()))?;
    if copied != want {
        anyhow::bail!(
            "{} ends after {copied} bytes, its verity tree covers {want}",
            rpath.display()
        );
    }
    let tree = builder
        .finish()
        .with_context(|| format!("cannot build the verity tree of {}", rpath.display()))?;
    if tree.root_hash_hex() != root_hash_hex {
        return Err(Rejection::RootHash {
            got: tree.root_hash_hex(),
            want: root_hash_hex.to_string(),
        }
        .into());
    }
    let mut on_disk = vec![0u8; tree.hash_area.len()];
    vdev.seek(SeekFrom::Start(0))
        .and_then(|_| vdev.read_exact(&mut on_disk))
        .with_context(|| format!("cannot read the verity tree on {}", vpath.display()))?;
    if on_disk != tree.hash_area {
        tracing::warn!(
            "the verity tree on {} is not the one its slot needs: writing it again",
            vpath.display()
        );
        write_hash_area(host, t, &tree)?;
    }
    Ok(())
}

/// Names the target's partitions after the root hash it now holds, so the
/// UKI's `systemd.verity_root_data=PARTUUID=...` finds them.
pub fn set_partuuids(host: &dyn Host, t: &Target, root_hash_hex: &str) -> Result<()> {
    let hash = parse_hash(root_hash_hex)?;
    let (data_uuid, hash_uuid) = ballast_common::slot_partuuids(&hash);
    let mut gpt = disk::read_gpt(host, &t.root.disk)?;
    gpt.find_mut(&t.root_label)?.uuid = data_uuid;
    gpt.find_mut(&t.verity_label)?.uuid = hash_uuid;
    let dev = t.root.disk_dev_path();
    let mut f = host
        .open_rw(&dev)
        .with_context(|| format!("cannot open {}", dev.display()))?;
    gpt.write_to(&mut f)
        .with_context(|| format!("cannot write the partition table of {}", dev.display()))?;
    f.sync_all()
        .with_context(|| format!("cannot fsync {}", dev.display()))
}

/// Downloads the UKI into memory (tens of MiB) and checks size and sha256.
pub fn fetch_uki(channel: &Channel, m: &Manifest) -> Result<Vec<u8>> {
    fetch_uki_from(channel.open_payload(&m.uki.url, m.uki.size)?, m)
}

pub fn fetch_uki_from(body: impl Read, m: &Manifest) -> Result<Vec<u8>> {
    const WHAT: &str = "the UKI";
    let mut r = LimitReader::new(body, m.uki.size);
    // Grows with what arrives: a capacity taken from the manifest would let
    // a bad size allocate (and abort on) memory before a byte came.
    let mut bytes = Vec::new();
    if let Err(e) = r.read_to_end(&mut bytes) {
        if limit_exceeded(&e).is_some() {
            return Err(Rejection::Oversized {
                what: WHAT,
                limit: m.uki.size,
            }
            .into());
        }
        return Err(anyhow::Error::new(e).context(Rejection::Truncated {
            what: WHAT,
            got: r.count(),
            want: m.uki.size,
        }));
    }
    if r.count() < m.uki.size {
        return Err(Rejection::Truncated {
            what: WHAT,
            got: r.count(),
            want: m.uki.size,
        }
        .into());
    }
    let sha = hex::encode(Sha256::digest(&bytes));
    if sha != m.uki.sha256 {
        return Err(Rejection::Sha256Mismatch {
            what: WHAT,
            got: sha,
            want: m.uki.sha256.clone(),
        }
        .into());
    }
    Ok(bytes)
}
