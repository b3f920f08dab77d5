//! The fleet reboot lock of the `fleet-lock` strategy: a host reboots into
//! an update only while it holds one of the fleet's reboot slots, so a fleet
//! never reboots all at once.
//!
//! This is the interface the fleet issue fills in (a semaphore in etcd).
//! Until then [`NoopLock`] grants every request, so `fleet-lock` behaves as
//! `immediate`.

use anyhow::Result;

pub trait RebootLock {
    /// Tries to take a reboot slot for this host. `Ok(false)`: not now, ask
    /// again later. Taking a slot already held is granted again.
    fn acquire(&self) -> Result<bool>;

    /// Gives the slot back, once the host booted into the update and it was
    /// blessed (or it fell back). Releasing a slot not held is not an error.
    fn release(&self) -> Result<()>;
}

/// Always granted; for single hosts and until the fleet lock exists.
#[derive(Debug, Default, Clone, Copy)]
pub struct NoopLock;

impl RebootLock for NoopLock {
    fn acquire(&self) -> Result<bool> {
        Ok(true)
    }

    fn release(&self) -> Result<()> {
        Ok(())
    }
}
