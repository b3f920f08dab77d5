//! Containers: desired state from several sources ([`desired`]), OCI images
//! pulled and unpacked under /var/lib/ballast, and systemd-nspawn units
//! reconciled over D-Bus. The format is documented in docs/containers.md.

pub mod agent;
pub mod cli;
pub mod desired;
pub mod oci;
pub mod reconcile;
pub mod reference;
pub mod registries;
pub mod registry;
pub mod spec;
pub mod store;
pub mod systemd;
pub mod unit;
pub mod unpack;
