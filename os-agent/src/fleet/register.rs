//! The host's registration: `hosts/<machine-id>` holds its [`HostRecord`] on
//! a lease of the configured TTL, so a dead host's entry disappears within
//! the TTL. The record is written when it changes, not on a timer; the lease
//! is renewed once per [`keep_alive_interval`] (three quarters of the TTL, so
//! about 1.3 keep-alive messages per host per TTL, the least a lease allows
//! with room to spare). When etcd is unreachable or the lease
//! was lost (etcd restarted after the TTL, say), the task retries with
//! backoff and registers again under a new lease.

use super::model::{self, HostRecord};
use super::{Backoff, Fleet};
use anyhow::{bail, Context, Result};
use etcd_client::PutOptions;
use std::time::Duration;
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// The least time left on the lease when it is renewed: room for a slow
/// keep-alive ([`super::REQUEST_TIMEOUT`]) and a re-registration after a failed
/// one, before the entry would disappear.
const RENEW_MARGIN_FLOOR: Duration = Duration::from_secs(10);

/// How often the registration lease is renewed. A lease must be renewed at
/// least once per TTL, and each renewal is a message to etcd from every host,
/// so this is as late as is safe: a quarter of the TTL is left as margin, and
/// never less than [`RENEW_MARGIN_FLOOR`] (or half the TTL, for short ones).
/// TTL 60 s: every 45 s; 30 s: every 20 s; 10 s: every 5 s.
pub fn keep_alive_interval(ttl: Duration) -> Duration {
    let margin = (ttl / 4).max(RENEW_MARGIN_FLOOR.min(ttl / 2));
    (ttl - margin).max(Duration::from_millis(100))
}

/// The running registration; dropping it stops the task (the entry then
/// disappears when its lease runs out).
#[derive(Debug)]
pub struct Registration {
    record: watch::Sender<HostRecord>,
    state: watch::Receiver<Registered>,
    task: JoinHandle<()>,
}

/// Whether the host is registered right now, and under which lease.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Registered {
    pub lease: Option<i64>,
    /// How many times the host registered (1 + re-registrations).
    pub sessions: u64,
}

impl Registration {
    /// Starts keeping `record` in etcd. Must be called inside a tokio runtime.
    pub fn start(fleet: Fleet, record: HostRecord) -> Registration {
        let (tx, rx) = watch::channel(record);
        let (state_tx, state_rx) = watch::channel(Registered::default());
        let task = tokio::spawn(run(fleet, rx, state_tx));
        Registration {
            record: tx,
            state: state_rx,
            task,
        }
    }

    /// Publishes `record` if it differs from the last one.
    pub fn update(&self, record: HostRecord) {
        self.record.send_if_modified(|old| {
            if *old == record {
                return false;
            }
            *old = record;
            true
        });
    }

    /// Changes the record in place; published if it changed.
    pub fn modify(&self, f: impl FnOnce(&mut HostRecord)) {
        let mut r = self.record.borrow().clone();
        f(&mut r);
        self.update(r);
    }

    /// Stops keeping the record (as a host going down does); the entry
    /// disappears when its lease runs out.
    pub fn stop(&self) {
        self.task.abort();
    }

    /// The record as it changes.
    pub fn subscribe(&self) -> watch::Receiver<HostRecord> {
        self.record.subscribe()
    }

    pub fn record(&self) -> HostRecord {
        self.record.borrow().clone()
    }

    pub fn registered(&self) -> Registered {
        *self.state.borrow()
    }

    /// Waits until the host is registered (again) at least `sessions` times.
    pub async fn wait_sessions(&self, sessions: u64) {
        let mut rx = self.state.clone();
        // The sender lives as long as the task; a finished task never registers.
        let waited = rx
            .wait_for(|s| s.sessions >= sessions && s.lease.is_some())
            .await;
        if waited.is_err() {
            tracing::warn!("the registration task stopped");
        }
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn run(fleet: Fleet, mut rx: watch::Receiver<HostRecord>, state: watch::Sender<Registered>) {
    let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(10));
    loop {
        let e = session(&fleet, &mut rx, &state, &mut backoff).await;
        state.send_modify(|s| s.lease = None);
        let wait = backoff.next_wait();
        tracing::warn!(
            "fleet registration of {} lost ({e:#}); again in {wait:?}",
            fleet.machine_id
        );
        tokio::time::sleep(wait).await;
    }
}

/// Registers and keeps the registration until something fails.
async fn session(
    fleet: &Fleet,
    rx: &mut watch::Receiver<HostRecord>,
    state: &watch::Sender<Registered>,
    backoff: &mut Backoff,
) -> anyhow::Error {
    match session_inner(fleet, rx, state, backoff).await {
        Ok(never) => match never {},
        Err(e) => e,
    }
}

async fn session_inner(
    fleet: &Fleet,
    rx: &mut watch::Receiver<HostRecord>,
    state: &watch::Sender<Registered>,
    backoff: &mut Backoff,
) -> Result<std::convert::Infallible> {
    let mut c = fleet.client.clone();
    let key = fleet.keys.host(&fleet.machine_id);
    let ttl = fleet.lease_ttl.as_secs().max(1) as i64;
    let lease = c
        .lease_grant(ttl, None)
        .await
        .context("cannot grant the registration lease")?
        .id();
    let put = |c: &mut etcd_client::Client, r: &HostRecord| {
        let (mut c, key, value) = (c.clone(), key.clone(), model::to_json(r));
        async move {
            c.put(
                key.as_str(),
                value,
                Some(PutOptions::new().with_lease(lease)),
            )
            .await
            .with_context(|| format!("cannot write {key}"))
        }
    };
    let first = rx.borrow_and_update().clone();
    put(&mut c, &first).await?;
    let (mut keeper, mut stream) = c
        .lease_keep_alive(lease)
        .await
        .context("cannot keep the registration lease alive")?;
    state.send_modify(|s| {
        s.lease = Some(lease);
        s.sessions += 1;
    });
    backoff.reset();
    tracing::info!("registered {key} (lease {lease:x}, TTL {ttl} s)");
    let mut tick = tokio::time::interval(keep_alive_interval(fleet.lease_ttl));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tokio::select! {
            _ = tick.tick() => {
                keeper.keep_alive().await.context("cannot send a lease keep-alive")?;
                let resp = tokio::time::timeout(super::REQUEST_TIMEOUT, stream.message())
                    .await
                    .context("no answer to the lease keep-alive")?
                    .context("the lease keep-alive failed")?
                    .context("etcd closed the keep-alive stream")?;
                if resp.ttl() <= 0 {
                    bail!("the registration lease {lease:x} expired");
                }
            }
            changed = rx.changed() => {
                if changed.is_err() {
                    // The Registration was dropped; the task is being aborted.
                    std::future::pending::<()>().await;
                }
                let r = rx.borrow_and_update().clone();
                put(&mut c, &r).await?;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renewal_leaves_a_margin() {
        let secs = |s: u64| Duration::from_secs(s);
        for (ttl, every) in [(60, 45), (30, 20), (20, 10), (10, 5), (2, 1), (3600, 2700)] {
            assert_eq!(keep_alive_interval(secs(ttl)), secs(every), "TTL {ttl} s");
        }
    }
}
