//! Fleet state in etcd (docs/etcd.md): the host's registration, the reboot
//! lock of the `fleet-lock` strategy (a counting semaphore per group), group
//! policy and self-pausing rollouts, and what `osctl fleet` reads and writes.
//!
//! - the `[etcd]` section and `group` of the agent config are `crate::config::fleet`;
//! - [`agent`]: the daemon's side: the host's record, the policy watch;
//! - [`containers`](mod@containers): the desired containers kept in etcd;
//! - [`model`]: key layout and the JSON values, parsed as untrusted input;
//! - [`register`]: the host's record, on a lease kept alive;
//! - [`lock`]: the semaphore, failure reports, and [`lock::EtcdLock`], the
//!   [`crate::update::fleet_lock::RebootLock`] the update engine calls;
//! - [`view`]: a watched view of the group's lock, to wait for a free slot
//!   without polling;
//! - [`members`]: failover between the members of an etcd cluster (a hung
//!   member is taken out of the client's balancer);
//! - [`admin`]: the operator's view and actions, [`cli`]: `osctl fleet`;
//! - `sim`: a simulated host, for the tests and the fleet bench;
//! - `server`: a throwaway local etcd, or a three-member cluster of them,
//!   for the tests and the bench.
//!
//! (Those two only with the `testing` feature: not in the agent users run.)
//!
//! Everything here is async on the caller's tokio runtime; nothing builds its own.

pub mod admin;
pub mod agent;
pub mod cli;

pub mod containers;
pub mod lock;
pub mod members;
pub mod model;
pub mod register;
#[cfg(any(test, feature = "testing"))]
pub mod server;
#[cfg(any(test, feature = "testing"))]
pub mod sim;
pub mod view;

use anyhow::{Context, Result};
use etcd_client::{
    Certificate, Client, ConnectOptions, Identity, TlsOptions, WatchOptions, WatchStream, Watcher,
};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub use crate::config::fleet::FleetSettings;
pub use model::Keys;

/// How long one etcd request may take before it counts as a failure.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

/// A client for etcd as `settings` describe it. The connection is made
/// lazily and re-made after failures, so this succeeds with etcd down as
/// long as the settings (certificates included) are usable. With several
/// endpoints it spreads requests over them; [`members::Members`] takes
/// the hung ones out.
pub async fn connect(settings: &FleetSettings) -> Result<Client> {
    let opts = connect_options(settings, true).await?;
    Client::connect(&settings.endpoints, Some(opts))
        .await
        .with_context(|| {
            format!(
                "cannot connect to etcd at {}",
                settings.endpoints.join(", ")
            )
        })
}

/// The client options `settings` describe; the user and password only
/// `with_user`.
async fn connect_options(settings: &FleetSettings, with_user: bool) -> Result<ConnectOptions> {
    let mut opts = ConnectOptions::new()
        .with_timeout(REQUEST_TIMEOUT)
        .with_connect_timeout(CONNECT_TIMEOUT)
        .with_keep_alive(Duration::from_secs(10), Duration::from_secs(5));
    if let Some(tls) = &settings.tls {
        let mut t = TlsOptions::new();
        if let Some(ca) = &tls.ca_file {
            let pem = tokio::fs::read(ca)
                .await
                .with_context(|| format!("cannot read the etcd CA {}", ca.display()))?;
            t = t.ca_certificate(Certificate::from_pem(pem));
        }
        if let Some((cert, key)) = &tls.client {
            let c = tokio::fs::read(cert).await.with_context(|| {
                format!("cannot read the client certificate {}", cert.display())
            })?;
            let k = tokio::fs::read(key)
                .await
                .with_context(|| format!("cannot read the client key {}", key.display()))?;
            t = t.identity(Identity::from_pem(c, k));
        }
        opts = opts.with_tls(t);
    }
    if let Some((user, password)) = settings.user.as_ref().filter(|_| with_user) {
        opts = opts.with_user(user.clone(), password.clone());
    }
    Ok(opts)
}

/// One host's handle on the fleet: a client, where its keys are, who it is.
/// Cheap to clone (the client shares its connection).
#[derive(Clone)]
pub struct Fleet {
    pub client: Client,
    pub keys: Keys,
    pub group: String,
    pub machine_id: String,
    pub lease_ttl: Duration,
    pub lock_ttl: Duration,
    /// A lock lease granted for a compare-and-swap that lost, kept for the
    /// next attempt so that contention does not cost a grant and a revoke
    /// each time: (id, when granted).
    pub(crate) spare_lease: Arc<Mutex<Option<(i64, Instant)>>>,
    /// The group as a watch sees it: when it says a slot is free, a take is
    /// tried on it without reading first ([`lock`]).
    pub(crate) view: Option<tokio::sync::watch::Receiver<view::GroupView>>,
    /// The watch over the cluster's members, told when a request failed.
    pub(crate) members: Option<members::Members>,
    /// The host's registration, whose lease its place in the group's queue
    /// of waiting hosts is written on ([`view`]).
    pub(crate) registered: Option<tokio::sync::watch::Receiver<register::Registered>>,
}

impl std::fmt::Debug for Fleet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Fleet")
            .field("keys", &self.keys)
            .field("group", &self.group)
            .field("machine_id", &self.machine_id)
            .finish_non_exhaustive()
    }
}

impl Fleet {
    pub fn new(client: Client, settings: &FleetSettings, machine_id: &str) -> Fleet {
        Fleet {
            client,
            keys: Keys::new(&settings.prefix),
            group: settings.group.clone(),
            machine_id: machine_id.to_string(),
            lease_ttl: settings.lease_ttl,
            lock_ttl: settings.lock_ttl,
            spare_lease: Arc::new(Mutex::new(None)),
            view: None,
            members: None,
            registered: None,
        }
    }

    /// Tells `members` when a request fails, so a hung member is taken
    /// out of the client (which must be the one `members` watches).
    pub fn with_members(mut self, members: Option<&members::Members>) -> Fleet {
        self.members = members.cloned();
        self
    }

    /// A request failed or was not answered: have the members checked.
    pub fn suspect(&self) {
        if let Some(m) = &self.members {
            m.suspect();
        }
    }

    /// Takes slots on what `watch` shows when it shows one free, saving the
    /// read before the take (half the requests of hosts that race for a
    /// freed slot, and one round trip less for the one that gets it).
    pub fn with_view(mut self, watch: &view::GroupWatch) -> Fleet {
        self.view = Some(watch.subscribe());
        self
    }

    /// Queues for slots on `registration`'s lease when told to wait (with
    /// a view): hosts then ask in turn instead of all at once.
    pub fn with_registration(mut self, registration: &register::Registration) -> Fleet {
        self.registered = Some(registration.watch_state());
        self
    }
}

/// A task that is aborted when this is dropped.
#[derive(Debug)]
pub(crate) struct AbortOnDrop(pub(crate) tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Locks `m`; a poisoned mutex still holds a valid value here (nothing in
/// the fleet panics while holding one).
pub(crate) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Options that watch `key` (a prefix if `prefix`) from just after `rev`,
/// the revision of the read the caller built its state from: no change
/// between that read and the watch is missed.
pub fn watch_options_after(rev: i64, prefix: bool) -> WatchOptions {
    // etcd's revision comes from the server: no overflow on a bad one.
    let opts = WatchOptions::new().with_start_revision(rev.saturating_add(1));
    if prefix {
        opts.with_prefix()
    } else {
        opts
    }
}

/// Watches `key` with [`watch_options_after`].
pub async fn watch_after(
    c: &mut Client,
    key: &str,
    prefix: bool,
    rev: i64,
) -> Result<(Watcher, WatchStream)> {
    c.watch(key, Some(watch_options_after(rev, prefix)))
        .await
        .with_context(|| format!("cannot watch {key}"))
}

/// Exponential backoff with jitter for retrying etcd.
#[derive(Debug, Clone)]
pub struct Backoff {
    next: Duration,
    min: Duration,
    max: Duration,
}

impl Backoff {
    pub fn new(min: Duration, max: Duration) -> Backoff {
        Backoff {
            next: min,
            min,
            max,
        }
    }

    /// The next wait: the current step plus up to half of it at random.
    pub fn next_wait(&mut self) -> Duration {
        let base = self.next;
        self.next = (self.next * 2).min(self.max);
        base + random_up_to(base / 2)
    }

    pub fn reset(&mut self) {
        self.next = self.min;
    }
}

/// A random duration in [0, max] at millisecond resolution (jitter of the
/// update checks, spreads of the fleet's retries), for any `max`.
pub fn random_up_to(max: Duration) -> Duration {
    let ms = u64::try_from(max.as_millis()).unwrap_or(u64::MAX);
    if ms == 0 {
        return Duration::ZERO;
    }
    // uuid's v4 generator is the random source the agent already has.
    let r = uuid::Uuid::new_v4().as_u128() as u64;
    let r = match ms.checked_add(1) {
        Some(n) => r % n,
        None => r,
    };
    Duration::from_millis(r)
}

pub fn now_unix() -> u64 {
    crate::update::store::now_unix()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_to_its_cap() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(1));
        let waits: Vec<Duration> = (0..6).map(|_| b.next_wait()).collect();
        assert!(waits[0] >= Duration::from_millis(100) && waits[0] <= Duration::from_millis(150));
        assert!(waits[5] >= Duration::from_secs(1) && waits[5] <= Duration::from_millis(1500));
        b.reset();
        assert!(b.next_wait() <= Duration::from_millis(150));
    }
}
