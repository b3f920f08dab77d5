//! The host's registration: `hosts/<machine-id>` holds its [`HostRecord`] on
//! a lease of the configured TTL, so a dead host's entry disappears within
//! the TTL. The record is written when it changes, not on a timer; the lease
//! is renewed once per [`keep_alive_interval`] (three quarters of the TTL, so
//! about 1.3 keep-alive messages per host per TTL, the least a lease allows
//! with room to spare). A renewal or write that fails or hangs is retried
//! with backoff on the same lease (on another member of the cluster, if the
//! client has several): the host registers once and keeps that lease for as
//! long as etcd does. Only when etcd says the lease is gone (it ran out while
//! no renewal got through) does it register again, under a new lease.

use super::model::{self, HostRecord};
use super::{Backoff, Fleet};
use anyhow::{Context, Result};
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
    /// The lease, while its last renewal (or write) got through; `None`
    /// while they fail, though etcd may still keep the lease.
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

    /// Whether and under which lease the host is registered, as it changes.
    pub fn watch_state(&self) -> watch::Receiver<Registered> {
        self.state.clone()
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
        let lease = match fleet
            .client
            .clone()
            .lease_grant(fleet.lease_ttl.as_secs().max(1) as i64, None)
            .await
        {
            Ok(granted) => granted.id(),
            Err(e) => {
                fleet.suspect();
                let wait = backoff.next_wait();
                tracing::warn!(
                    "cannot grant the registration lease of {} ({e}); again in {wait:?}",
                    fleet.machine_id
                );
                tokio::time::sleep(wait).await;
                continue;
            }
        };
        backoff.reset();
        let why = keep(&fleet, lease, &mut rx, &state).await;
        state.send_modify(|s| s.lease = None);
        tracing::warn!(
            "the registration lease {lease:x} of {} is gone ({why}); registering again",
            fleet.machine_id
        );
    }
}

/// How long a renewal or a write of the record may take before it is
/// retried (on another member, if the client has several): a quarter of the
/// margin [`keep_alive_interval`] leaves, so a hung member costs a few
/// retries, not the lease. TTL 60 s: 3.75 s; 8 s: 1 s; 2 s: 250 ms.
pub fn answer_timeout(ttl: Duration) -> Duration {
    ((ttl - keep_alive_interval(ttl).min(ttl)) / 4)
        .clamp(Duration::from_millis(100), super::REQUEST_TIMEOUT)
}

/// Why keeping the lease stopped: etcd said it is gone, or a try failed.
enum Keep {
    Gone(String),
    Failed(anyhow::Error),
}

/// Whether etcd's answer says the lease does not exist (any more).
fn lease_not_found(e: &etcd_client::Error) -> bool {
    let text = e.to_string();
    text.contains("lease not found")
}

type KeepAlive = (etcd_client::LeaseKeeper, etcd_client::LeaseKeepAliveStream);

/// Renews `lease` once, on the open keep-alive stream or on a new one.
async fn renew(
    c: &mut etcd_client::Client,
    stream: &mut Option<KeepAlive>,
    lease: i64,
    within: Duration,
) -> Result<(), Keep> {
    let failed = |e: anyhow::Error| Keep::Failed(e);
    let Some((keeper, answers)) = stream.as_mut() else {
        // Opening a stream sends a keep-alive and reads its answer.
        return match tokio::time::timeout(within, c.lease_keep_alive(lease)).await {
            Err(_) => Err(failed(anyhow::anyhow!(
                "no answer to the lease keep-alive within {within:?}"
            ))),
            Ok(Err(e)) if lease_not_found(&e) => Err(Keep::Gone(e.to_string())),
            Ok(Err(e)) => Err(failed(
                anyhow::Error::new(e).context("the lease keep-alive failed"),
            )),
            Ok(Ok(opened)) => {
                *stream = Some(opened);
                Ok(())
            }
        };
    };
    keeper
        .keep_alive()
        .await
        .context("cannot send a lease keep-alive")
        .map_err(failed)?;
    let resp = tokio::time::timeout(within, answers.message())
        .await
        .map_err(|_| {
            failed(anyhow::anyhow!(
                "no answer to the lease keep-alive within {within:?}"
            ))
        })?
        .context("the lease keep-alive failed")
        .map_err(failed)?
        .ok_or_else(|| failed(anyhow::anyhow!("etcd closed the keep-alive stream")))?;
    if resp.ttl() <= 0 {
        return Err(Keep::Gone(format!("the lease {lease:x} expired")));
    }
    Ok(())
}

/// Writes the record on `lease` (a new one), then keeps the lease alive and
/// the record up to date until etcd says the lease is gone; returns why. A
/// renewal or write (the first included) that fails or is not
/// answered in time (a member killed or hung, no quorum) is retried with
/// backoff on a new stream, which the client may send to another member,
/// under the same lease: the host stays registered once, on one lease, for
/// as long as etcd keeps that lease, whatever happens to the member it
/// talked to. Only etcd's word that the lease is gone (it ran out while no
/// renewal got through) makes a new registration.
async fn keep(
    fleet: &Fleet,
    lease: i64,
    rx: &mut watch::Receiver<HostRecord>,
    state: &watch::Sender<Registered>,
) -> String {
    let mut c = fleet.client.clone();
    let key = fleet.keys.host(&fleet.machine_id);
    let within = answer_timeout(fleet.lease_ttl);
    let mut stream: Option<KeepAlive> = None;
    // Retries come at least every half margin, jitter included under 3/4:
    // when etcd is back (a new leader gives every lease its whole TTL
    // again), the lease is renewed before it runs out.
    let margin = fleet.lease_ttl - keep_alive_interval(fleet.lease_ttl).min(fleet.lease_ttl);
    let mut retry = Backoff::new(
        Duration::from_millis(100),
        (margin / 2).max(Duration::from_millis(100)),
    );
    let mut tick = tokio::time::interval(keep_alive_interval(fleet.lease_ttl));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    // The first write registers the host.
    let (mut renew_due, mut write_due) = (false, true);
    let mut registered = false;
    loop {
        if !renew_due && !write_due {
            tokio::select! {
                _ = tick.tick() => renew_due = true,
                changed = rx.changed() => {
                    if changed.is_err() {
                        // The Registration was dropped; the task is being aborted.
                        std::future::pending::<()>().await;
                    }
                    write_due = true;
                }
            }
        }
        let mut outcome = Ok(());
        if renew_due {
            outcome = renew(&mut c, &mut stream, lease, within).await;
            renew_due = outcome.is_err();
        }
        if write_due && outcome.is_ok() {
            let record = rx.borrow_and_update().clone();
            let put = c.put(
                key.as_str(),
                model::to_json(&record),
                Some(PutOptions::new().with_lease(lease)),
            );
            outcome = match tokio::time::timeout(within, put).await {
                Err(_) => Err(Keep::Failed(anyhow::anyhow!(
                    "no answer to the write of {key} within {within:?}"
                ))),
                Ok(Err(e)) if lease_not_found(&e) => Err(Keep::Gone(e.to_string())),
                Ok(Err(e)) => Err(Keep::Failed(
                    anyhow::Error::new(e).context(format!("cannot write {key}")),
                )),
                Ok(Ok(_)) => Ok(()),
            };
            write_due = outcome.is_err();
        }
        match outcome {
            Ok(()) if !registered => {
                registered = true;
                // Open the keep-alive stream now, as the first renewal.
                renew_due = true;
                retry.reset();
                state.send_modify(|s| {
                    s.lease = Some(lease);
                    s.sessions += 1;
                });
                tracing::info!(
                    "registered {key} (lease {lease:x}, TTL {} s)",
                    fleet.lease_ttl.as_secs()
                );
            }
            Ok(()) => {
                retry.reset();
                state.send_if_modified(|s| {
                    let was = s.lease;
                    s.lease = Some(lease);
                    if was.is_none() {
                        tracing::info!("the registration lease {lease:x} is renewed again");
                    }
                    was.is_none()
                });
            }
            Err(Keep::Gone(why)) => return why,
            Err(Keep::Failed(e)) => {
                stream = None;
                fleet.suspect();
                state.send_if_modified(|s| s.lease.take().is_some());
                let wait = retry.next_wait();
                tracing::warn!(
                    "registration of {}: {e:#}; again in {wait:?}",
                    fleet.machine_id
                );
                tokio::time::sleep(wait).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_are_awaited_a_quarter_of_the_margin() {
        let ms = Duration::from_millis;
        for (ttl, within) in [(60, 3750), (8, 1000), (2, 250), (3600, 5000)] {
            assert_eq!(
                answer_timeout(Duration::from_secs(ttl)),
                ms(within),
                "TTL {ttl} s"
            );
        }
        assert_eq!(answer_timeout(ms(100)), ms(100));
    }

    #[test]
    fn renewal_leaves_a_margin() {
        let secs = |s: u64| Duration::from_secs(s);
        for (ttl, every) in [(60, 45), (30, 20), (20, 10), (10, 5), (2, 1), (3600, 2700)] {
            assert_eq!(keep_alive_interval(secs(ttl)), secs(every), "TTL {ttl} s");
        }
    }
}
