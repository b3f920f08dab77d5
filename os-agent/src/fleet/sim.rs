//! Simulated hosts for the fleet tests and the fleet bench: each registers,
//! takes its group's reboot lock through the same [`Fleet`] calls the real
//! agent makes, "reboots" (its registration stops and a new one starts after
//! the simulated reboot time, as a rebooted host's would), then reports the
//! outcome and releases the slot. Many of them share one process and one etcd.
//!
//! [`HolderWatch`] counts lock holders from etcd's own event stream, so a
//! test checks the semaphore from outside the hosts that use it.

use super::lock::Acquire;
use super::model::{HostRecord, Keys};
use super::register::Registration;
use super::view::{self, GroupView, GroupWatch};
use super::{lock, Fleet};
use crate::update::fleet_lock::Released;
use anyhow::{Context, Result};
use etcd_client::{Client, EventType, GetOptions};
use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::watch;
use tokio::time::Instant;

#[derive(Debug, Clone)]
pub struct SimParams {
    /// How long a reboot takes.
    pub reboot: Duration,
    /// How often a host waiting for the lock asks again (plus up to as much
    /// again at random); with a view of the group, how long it waits for a
    /// change before it asks anyway.
    pub poll: Duration,
    /// The new version fails its boot assessment on this host.
    pub fails: bool,
}

/// How a simulated rollout ended for one host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SimEnd {
    Updated,
    RolledBack,
    /// The deadline passed while waiting; the last reason it waited.
    GaveUp(String),
}

pub struct SimHost {
    pub fleet: Fleet,
    pub registration: Registration,
    /// The group's lock as a [`GroupWatch`] sees it, as the agent waits for
    /// a slot; without one the host polls.
    pub view: Option<watch::Receiver<GroupView>>,
    /// Reboots done.
    pub reboots: u32,
}

impl SimHost {
    pub fn record(fleet: &Fleet, version: &str) -> HostRecord {
        HostRecord {
            machine_id: fleet.machine_id.clone(),
            hostname: format!("sim-{}", &fleet.machine_id[..8.min(fleet.machine_id.len())]),
            addresses: vec!["127.0.0.1".into()],
            group: fleet.group.clone(),
            booted_version: version.into(),
            booted_slot: "a".into(),
            staged_version: None,
            update_state: "idle".into(),
            last_error: None,
            containers: Default::default(),
            agent_version: env!("CARGO_PKG_VERSION").into(),
        }
    }

    /// Registers a host booted on `version`.
    pub fn start(fleet: Fleet, version: &str) -> SimHost {
        let registration = Registration::start(fleet.clone(), Self::record(&fleet, version));
        SimHost {
            fleet: fleet.with_registration(&registration),
            registration,
            view: None,
            reboots: 0,
        }
    }

    /// Waits for slots as the agent does, on `watch`'s view of the group
    /// (hosts on one connection may share one).
    pub fn with_view(mut self, watch: &GroupWatch) -> SimHost {
        self.view = Some(watch.subscribe());
        self.fleet = self.fleet.with_view(watch);
        self
    }

    pub fn booted_version(&self) -> String {
        self.registration.record().booted_version
    }

    /// Stages `target` and waits for a reboot slot until `deadline`; reboots
    /// into it, then releases the slot as blessed or rolled back. etcd
    /// errors are retried; without the lock the host never reboots.
    pub async fn roll(&mut self, target: &str, p: &SimParams, deadline: Instant) -> Result<SimEnd> {
        self.registration.modify(|r| {
            r.staged_version = Some(target.into());
            r.update_state = "staged".into();
        });
        let mut last = String::from("never asked");
        loop {
            if Instant::now() >= deadline {
                return Ok(SimEnd::GaveUp(last));
            }
            match self.fleet.try_acquire(target).await {
                Ok(Acquire::Granted) => break,
                Ok(Acquire::Wait(why)) => last = why,
                Err(e) => {
                    last = format!("{e:#}");
                    self.registration
                        .modify(|r| r.last_error = Some(last.clone()));
                }
            }
            let pause = p.poll + super::random_up_to(p.poll);
            match &mut self.view {
                Some(rx) => {
                    let woken = view::wait_for_slot(rx, &self.fleet.machine_id, target);
                    if tokio::time::timeout(pause, woken).await.is_err() {
                        tracing::debug!("no slot freed in {pause:?}; asking anyway");
                    }
                }
                None => tokio::time::sleep(pause).await,
            }
        }
        // The reboot: the agent stops, the lease lives on until its TTL, the
        // new boot registers afresh.
        self.registration
            .modify(|r| r.update_state = "rebooting".into());
        let mut rec = self.registration.record();
        self.registration.stop();
        tokio::time::sleep(p.reboot).await;
        self.reboots += 1;
        let (outcome, end) = if p.fails {
            rec.last_error = Some(format!("{target} failed its boot assessment"));
            (
                Released::RolledBack {
                    version: target.into(),
                    reason: "simulated failure".into(),
                },
                SimEnd::RolledBack,
            )
        } else {
            rec.booted_version = target.into();
            rec.booted_slot = "b".into();
            rec.last_error = None;
            (
                Released::Blessed {
                    version: target.into(),
                },
                SimEnd::Updated,
            )
        };
        rec.staged_version = None;
        rec.update_state = "idle".into();
        self.registration = Registration::start(self.fleet.clone(), rec);
        self.fleet = self.fleet.clone().with_registration(&self.registration);
        // The new boot retries its release until etcd takes it.
        loop {
            match self.fleet.release(&outcome).await {
                Ok(()) => return Ok(end),
                Err(e) if Instant::now() < deadline => {
                    tracing::warn!("{}: release failed: {e:#}", self.fleet.machine_id);
                    tokio::time::sleep(p.poll).await;
                }
                Err(e) => return Err(e.context("cannot release the reboot slot")),
            }
        }
    }
}

/// Counts a group's lock holders from etcd's watch stream and remembers the
/// most seen at once, and every host that ever held a slot. The counts are
/// exact across failed members: a broken watch resumes from the revision
/// after the last event it saw.
#[derive(Debug, Clone, Default)]
pub struct HolderStats {
    pub current: BTreeSet<String>,
    pub max_seen: usize,
    pub ever: BTreeSet<String>,
    /// For each key, the leases it was written on (a host's registrations).
    pub leases: std::collections::BTreeMap<String, BTreeSet<i64>>,
    pub events: u64,
    /// The integral of the holder count over time, in holder-seconds.
    pub holder_seconds: f64,
    /// For each grant that followed a release, the seconds from the oldest
    /// release not yet followed by a grant to it: how long freed slots stay
    /// empty (releases and grants paired first in, first out).
    pub refill_secs: Vec<f64>,
    freed: std::collections::VecDeque<std::time::Instant>,
    last_change: Option<std::time::Instant>,
}

impl HolderStats {
    /// Brings `holder_seconds` up to now.
    fn account(&mut self) {
        let now = std::time::Instant::now();
        if let Some(t) = self.last_change {
            self.holder_seconds += self.current.len() as f64 * (now - t).as_secs_f64();
        }
        self.last_change = Some(now);
    }
}

pub struct HolderWatch {
    pub stats: Arc<Mutex<HolderStats>>,
    task: tokio::task::JoinHandle<()>,
}

/// Counts the events of one watch into `stats` until it fails or ends;
/// `last`: the revision of the last event counted.
async fn follow(
    _watcher: etcd_client::Watcher,
    mut stream: etcd_client::WatchStream,
    stats: &Mutex<HolderStats>,
    last: &mut i64,
) -> Result<()> {
    // The watcher cancels the watch when dropped: it is kept until here.
    while let Some(resp) = stream.message().await.context("the holder watch failed")? {
        if resp.canceled() {
            anyhow::bail!("etcd cancelled the holder watch: {}", resp.cancel_reason());
        }
        let mut s = lock(stats);
        s.account();
        for ev in resp.events() {
            let Some(kv) = ev.kv() else { continue };
            *last = (*last).max(kv.mod_revision());
            let k = String::from_utf8_lossy(kv.key()).into_owned();
            s.events += 1;
            match ev.event_type() {
                EventType::Put => {
                    s.leases.entry(k.clone()).or_default().insert(kv.lease());
                    if let Some(t) = s.freed.pop_front() {
                        s.refill_secs.push(t.elapsed().as_secs_f64());
                    }
                    s.ever.insert(k.clone());
                    s.current.insert(k);
                }
                EventType::Delete => {
                    s.freed.push_back(std::time::Instant::now());
                    s.current.remove(&k);
                }
            }
        }
        s.max_seen = s.max_seen.max(s.current.len());
    }
    Ok(())
}

impl HolderWatch {
    /// Counts the holders of `group`'s reboot slots.
    pub async fn start(client: &Client, keys: &Keys, group: &str) -> Result<HolderWatch> {
        Self::on_prefix(client, keys.holders(group)).await
    }

    /// Counts the registered hosts the same way; [`HolderStats::leases`]
    /// then tells how many times each host registered.
    pub async fn registrations(client: &Client, keys: &Keys) -> Result<HolderWatch> {
        Self::on_prefix(client, keys.hosts()).await
    }

    async fn on_prefix(client: &Client, prefix: String) -> Result<HolderWatch> {
        let mut c = client.clone();
        let now = c
            .get(prefix.as_str(), Some(GetOptions::new().with_prefix()))
            .await
            .context("cannot read the holders")?;
        let rev = now.header().map_or(0, |h| h.revision());
        let stats = Arc::new(Mutex::new(HolderStats::default()));
        {
            let mut s = lock(&stats);
            for kv in now.kvs() {
                let k = String::from_utf8_lossy(kv.key()).into_owned();
                s.leases.entry(k.clone()).or_default().insert(kv.lease());
                s.ever.insert(k.clone());
                s.current.insert(k);
            }
            s.max_seen = s.current.len();
        }
        let st = stats.clone();
        let mut last = rev;
        // The first watch is made here, so a test that starts the watch
        // sees its errors.
        let mut first = Some(super::watch_after(&mut c, &prefix, true, rev).await?);
        let task = tokio::spawn(async move {
            loop {
                let watched = match first.take() {
                    Some(w) => Ok(w),
                    None => super::watch_after(&mut c, &prefix, true, last).await,
                };
                let e = match watched {
                    Ok((watcher, stream)) => follow(watcher, stream, &st, &mut last).await.err(),
                    Err(e) => Some(e),
                };
                // A member died or hung: watch again from the last revision
                // seen, on whichever member answers, so no event is missed
                // and the counts stay exact.
                tracing::debug!(
                    "holder watch: {}; again from revision {last}",
                    e.map_or("ended".into(), |e| format!("{e:#}"))
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        });
        Ok(HolderWatch { stats, task })
    }

    pub fn snapshot(&self) -> HolderStats {
        let mut s = lock(&self.stats);
        s.account();
        s.clone()
    }

    /// Whether the watch task died (it outlives members that die: it
    /// watches again from where it was).
    pub fn is_finished(&self) -> bool {
        self.task.is_finished()
    }
}

impl Drop for HolderWatch {
    fn drop(&mut self) {
        self.task.abort();
    }
}
