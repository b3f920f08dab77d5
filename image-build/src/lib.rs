//! image-build: from a YAML spec to a bootable A/B disk image and the payloads
//! a release is made of. See docs/image.md.

pub mod build;
pub mod customize;
pub mod disk;
pub mod elf;
pub mod esp;
pub mod initrd;
pub mod modules;
pub mod purge;
pub mod release;
pub mod rootfs;
pub mod secure_boot;
pub mod spec;
pub mod stage;
pub mod tools;
pub mod uki;
