//! Atomic A/B updates from a signed channel (docs/update.md).
//!
//! - [`engine`]: check, apply, reboot, and the boot after;
//! - [`apply`]: the payload pipeline into the inactive slot;
//! - [`state`]: the state machine, [`store`]: state.json and the lock;
//! - [`channel`]: HTTP and trusted keys, [`esp`]: boot entries on the ESP;
//! - [`window`], [`fleet_lock`]: when a staged update may reboot the host.

pub mod agent;
pub mod apply;
pub mod channel;
pub mod cli;
pub mod device;
pub mod engine;
pub mod fleet_lock;
pub mod io;
pub mod offload;
pub mod state;
pub mod store;
pub mod window;

#[cfg(test)]
mod tests;
