//! The fleet reboot lock of the `fleet-lock` strategy: a host reboots into
//! an update only while it holds one of its group's reboot slots, so a fleet
//! never reboots all at once. The real lock is a semaphore in etcd
//! ([`crate::fleet::lock::EtcdLock`]); [`NoopLock`] grants every request.
//!
//! The trait is blocking because the engine is: the engine runs in
//! `spawn_blocking`, and the etcd implementation drives its requests on the
//! daemon's runtime from there.

use anyhow::Result;

/// How a held slot ends, so the fleet learns how the version did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Released {
    /// The host booted `version` and the boot was blessed.
    Blessed { version: String },
    /// The host fell back from `version`.
    RolledBack { version: String, reason: String },
    /// `version` never booted (its install did not survive a power cut):
    /// no verdict on the release, the slot is free for the next try.
    NeverBooted { version: String },
}

pub trait RebootLock {
    /// Tries to take a reboot slot for this host, to boot `version`.
    /// `Ok(false)`: not now, ask again later. Taking a slot already held is
    /// granted again.
    fn acquire(&self, version: &str) -> Result<bool>;

    /// Gives the slot back, once the host booted into the update and it was
    /// blessed (or it fell back). Releasing a slot not held is not an error.
    fn release(&self, outcome: &Released) -> Result<()>;
}

/// Always granted; for hosts without a fleet.
#[derive(Debug, Default, Clone, Copy)]
pub struct NoopLock;

impl RebootLock for NoopLock {
    fn acquire(&self, _version: &str) -> Result<bool> {
        Ok(true)
    }

    fn release(&self, _outcome: &Released) -> Result<()> {
        Ok(())
    }
}
