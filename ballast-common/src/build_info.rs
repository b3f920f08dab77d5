//! `build.json`: what image-build made, for people, for the release step and
//! for the tests. Field meanings are documented in docs/image.md.

use serde::{Deserialize, Serialize};

pub const FORMAT_VERSION: u32 = 1;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct BuildInfo {
    pub format_version: u32,
    pub name: String,
    pub version: String,
    pub architecture: String,
    pub kernel_version: String,
    pub source_date_epoch: u64,
    /// dm-verity root hash of the root payload, hex.
    pub root_hash: String,
    /// The kernel command line baked into the UKI.
    pub cmdline: String,
    /// File name of the UKI on the ESP (with its boot counter).
    pub uki_entry: String,
    pub disk: Disk,
    pub partitions: Vec<PartitionInfo>,
    pub payloads: Payloads,
    /// Files written next to build.json.
    pub images: Images,
    /// Bill of materials: every Debian package in the root.
    pub packages: Vec<Package>,
    /// Kernel modules left out of the root by the spec's module set, by
    /// directory under /usr/lib/modules/<kver>.
    #[serde(default)]
    pub dropped_modules: Vec<DroppedModules>,
    /// Packages the bootstrap installed and the build purged (nothing on a
    /// running host uses them), in the order purged.
    #[serde(default)]
    pub purged_packages: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct DroppedModules {
    /// Directory relative to /usr/lib/modules/<kver>, e.g. `kernel/fs/btrfs`.
    pub dir: String,
    pub modules: u32,
    /// Bytes of the removed module files.
    pub bytes: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Disk {
    pub size: u64,
    pub guid: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct PartitionInfo {
    pub number: u32,
    pub label: String,
    pub type_guid: String,
    pub partuuid: String,
    pub offset: u64,
    pub size: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Payload {
    /// File name relative to build.json.
    pub file: String,
    pub size: u64,
    pub sha256: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Payloads {
    /// The erofs root filesystem, uncompressed (what a slot holds).
    pub root: Payload,
    /// The root, zstd-compressed: what an update channel serves.
    pub root_zst: Payload,
    /// The verity hash area (superblock + tree) of the root.
    pub verity: Payload,
    /// The unified kernel image.
    pub uki: Payload,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Images {
    pub raw: String,
    pub qcow2: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Package {
    pub name: String,
    pub version: String,
    pub architecture: String,
}
