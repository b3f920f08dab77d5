//! Containers (docs/containers.md): desired state from layered sources →
//! OCI images pulled, verified and unpacked under /var/lib/ballast → one
//! systemd-nspawn unit per container, reconciled over D-Bus.
//!
//! - [`spec`], [`desired`]: the format, its validation, sources and merge.
//! - [`reference`](mod@reference), [`oci`], [`registry`], [`registries`], [`store`],
//!   [`unpack`]: images.
//! - [`unit`](mod@unit), [`reconcile`], [`systemd`], [`agent`]: running them;
//!   [`network`]: the container's side of a private network; [`volume`]:
//!   which host directories a container may bind, made safely.
//! - [`cli`]: `osctl containers`.
//! - `local_registry`: a real registry for tests and benchmarks (with the
//!   `testing` feature only).

pub mod agent;
pub mod cli;
pub mod desired;
#[cfg(any(test, feature = "testing"))]
pub mod local_registry;
pub mod network;
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
pub mod volume;
