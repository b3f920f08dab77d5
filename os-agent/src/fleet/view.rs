//! A host's view of its group's lock (policy, slot keys, proven versions,
//! the queue of waiting hosts), kept from one etcd watch on the group's
//! keys, so a host waiting for a reboot slot learns that one was freed
//! without asking etcd again and again. Watches cost etcd no requests while
//! nothing changes.
//!
//! The view is only a hint: the take itself is a transaction that checks
//! everything ([`super::lock`]). It decides *when* to ask. A host that was
//! told to wait puts a key in the group's queue (on its registration lease,
//! so a host that dies leaves the queue with its lease), and the queue
//! orders the waiting hosts by the keys' create revisions. When a change
//! makes `k` slots look free, the first `k` hosts of the queue ask (each
//! after a random part of [`FRONT_SPREAD`]); the others ask only if no
//! change comes for a second per place they stand behind them (a host at
//! the front that does not ask does not stop the queue for long). A freed
//! slot so costs about one take, however many hosts wait: without the
//! queue every waiting host asked a random part of a second after each
//! change that showed a slot free, about one request per waiting host per
//! second during a rollout, which at 10,000 hosts was 1,650 transactions a
//! second for 100 freed slots and slowed the takes and releases that
//! mattered (bench/README.md). A successful take deletes the host's queue
//! key in the same transaction. The daemon runs [`wake_for_staged`]; the
//! simulated hosts wait on [`wait_for_slot`].

use super::lock::LockState;
use super::model::{HostRecord, Keys, Policy};
use super::{AbortOnDrop, Backoff};
use anyhow::{Context, Result};
use etcd_client::{Client, EventType, GetOptions};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{watch, Notify};

/// How long a host waits without a change, per place it stands behind the
/// hosts the free slots are for, before it asks anyway.
pub const BEHIND_WAIT: Duration = Duration::from_secs(1);

/// How long the hosts at the front of the queue, woken by the same change,
/// spread their requests over: long enough for most to see another's take
/// before they ask for the same slot.
pub const FRONT_SPREAD: Duration = Duration::from_millis(50);

/// How many places behind the hosts the free slots are for a host still
/// counts its place: one further back ([`Turn::Far`]) waits for changes or
/// the caller's own round.
const BEHIND_LOOKAHEAD: usize = 64;

/// A host [`Turn::Far`] back looks at its place again at most this often,
/// not on every change: with thousands of hosts on one view (`fleet-sim`)
/// that is what keeps a change from waking them all. It needs
/// [`BEHIND_LOOKAHEAD`] takes to come near the front, longer than this.
const FAR_RECHECK: Duration = Duration::from_millis(100);

/// A host [`Turn::Far`] back leaves free slots to the hosts before it as
/// long as the queue moves: a slot was taken less than this long ago. Past
/// it, the hosts at the front are not taking the free slots (stuck, or
/// their views behind), and any host that asks may take one.
pub const QUEUE_STALL: Duration = Duration::from_secs(10);

/// The most hosts the front of the queue (the part indexed) holds beyond
/// the group's `max_holders`, which it holds up to this many of.
const MAX_FRONT: usize = 4096;

/// Where a host stands when it waits for a slot ([`GroupView::turn`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Turn {
    /// No slot looks free for its version.
    NoSlot,
    /// Slots look free and the host is among the first that many in the
    /// queue (or the queue is shorter than that), at this place from 0: it
    /// asks.
    Now(usize),
    /// Slots look free, but this many hosts stand before it beyond the
    /// ones they are for.
    Behind(usize),
    /// More than [`BEHIND_LOOKAHEAD`] hosts beyond the ones the free slots
    /// are for stand before it (or beyond all the group's slots, free or
    /// not).
    Far,
}

/// One key of the group as a read or a watch event shows it.
#[derive(Debug, Clone, Copy)]
struct Entry<'a> {
    key: &'a str,
    /// `None`: deleted.
    value: Option<&'a [u8]>,
    mod_rev: i64,
    create_rev: i64,
    lease: i64,
}

impl<'a> Entry<'a> {
    fn of(kv: &'a etcd_client::KeyValue, deleted: bool) -> Entry<'a> {
        Entry {
            key: kv.key_str().unwrap_or(""),
            value: (!deleted).then(|| kv.value()),
            mod_rev: kv.mod_revision(),
            create_rev: kv.create_revision(),
            lease: kv.lease(),
        }
    }
}

/// The group's lock as the watch last saw it.
#[derive(Debug, Clone, Default)]
pub struct GroupView {
    /// `None` while the policy key holds something that does not parse (no
    /// slot looks free then, as the host would not take one).
    policy: Option<Policy>,
    /// The policy key's revision (0: none).
    policy_rev: i64,
    /// Slot number -> the machine id holding it, and the key's revision.
    slots: BTreeMap<u32, (String, i64)>,
    odd_slots: BTreeSet<String>,
    /// Machine ids with a holder key -> the key's revision and lease.
    holders: BTreeMap<String, (i64, i64)>,
    proven: BTreeSet<String>,
    /// Machine ids in the queue -> their key's create revision.
    queue: HashMap<Arc<str>, i64>,
    /// The queue in order: (create revision, machine id) -> the version
    /// waited for.
    queue_order: BTreeMap<(i64, Arc<str>), Arc<str>>,
    /// The front of the queue, indexed by [`Self::reindex`] so that a
    /// host's place costs a lookup: machine id -> the version it waits for
    /// and its place among the front's hosts waiting for that version.
    /// Shared strings: a reindex allocates nothing.
    front: HashMap<Arc<str>, (Arc<str>, usize)>,
    /// Hosts in the front per version.
    front_counts: HashMap<Arc<str>, usize>,
    /// The create revision of the front's last host.
    front_last: i64,
    /// Whether the queue goes on beyond the front.
    front_cut: bool,
    /// Whether the queue or the policy changed since the last reindex.
    stale: bool,
    /// When the view last saw a slot taken.
    last_take: Option<std::time::Instant>,
    /// Whether the view was read from etcd at all.
    pub synced: bool,
}

impl GroupView {
    /// Applies a put (`value`, at `rev`) or a delete of `key`, on no lease.
    #[cfg(test)]
    fn apply(&mut self, keys: &Keys, group: &str, key: &str, value: Option<&[u8]>, rev: i64) {
        let e = Entry {
            key,
            value,
            mod_rev: rev,
            create_rev: rev,
            lease: 0,
        };
        self.apply_entry(keys, group, e);
        self.reindex();
    }

    /// The view of a group read whole (at the start of a watch, and after
    /// a reconnect). Slots held at the read were not seen being taken:
    /// only a take in the watch afterwards says the queue moves
    /// ([`GroupView::yields`]).
    fn read<'a>(keys: &Keys, group: &str, entries: impl Iterator<Item = Entry<'a>>) -> GroupView {
        let mut view = GroupView {
            policy: Some(Policy::default()),
            synced: true,
            ..GroupView::default()
        };
        for e in entries {
            view.apply_entry(keys, group, e);
        }
        view.last_take = None;
        view.reindex();
        view
    }

    /// Applies a put or a delete of one key.
    fn apply_entry(&mut self, keys: &Keys, group: &str, e: Entry<'_>) {
        let (key, value, rev, lease) = (e.key, e.value, e.mod_rev, e.lease);
        let Some(rest) = key.strip_prefix(&keys.group(group)) else {
            return;
        };
        if rest == "policy" {
            self.stale = true;
            (self.policy, self.policy_rev) = match value {
                None => (Some(Policy::default()), 0),
                Some(v) => (Policy::parse(key, v).ok(), rev),
            };
        } else if let Some(n) = rest.strip_prefix("lock/slots/") {
            let number = n.parse::<u32>().ok().filter(|i| i.to_string() == n);
            match (number, value) {
                (Some(i), Some(v)) => {
                    self.last_take = Some(std::time::Instant::now());
                    let m = String::from_utf8_lossy(v).into_owned();
                    self.slots.insert(i, (m, rev));
                }
                (Some(i), None) => {
                    self.slots.remove(&i);
                }
                (None, Some(_)) => {
                    self.odd_slots.insert(n.to_string());
                }
                (None, None) => {
                    self.odd_slots.remove(n);
                }
            }
        } else if let Some(m) = rest.strip_prefix("lock/holders/") {
            if value.is_some() {
                self.holders.insert(m.to_string(), (rev, lease));
            } else {
                self.holders.remove(m);
            }
        } else if let Some(m) = rest.strip_prefix("queue/") {
            let m: Arc<str> = Arc::from(m);
            if let Some(created) = self.queue.remove(&m) {
                self.queue_order.remove(&(created, m.clone()));
                // Only a change in the front (or to its length) moves places.
                self.stale |= created <= self.front_last || !self.front_cut;
            }
            if let Some(v) = value {
                let version = Arc::from(String::from_utf8_lossy(v).as_ref());
                self.queue.insert(m.clone(), e.create_rev);
                self.queue_order.insert((e.create_rev, m), version);
                self.stale |= e.create_rev <= self.front_last || !self.front_cut;
            }
        } else if let Some(v) = rest.strip_prefix("proven/") {
            if value.is_some() {
                self.proven.insert(v.to_string());
            } else {
                self.proven.remove(v);
            }
        }
    }

    /// The lock state for `machine_id` and `version` as the view shows it;
    /// `None` before the view was read or while the policy does not parse.
    pub fn state(&self, machine_id: &str, version: &str) -> Option<LockState> {
        let policy = self.policy.as_ref().filter(|_| self.synced)?;
        Some(LockState {
            policy: policy.clone(),
            policy_rev: self.policy_rev,
            slots: self.slots.keys().copied().collect(),
            odd_slots: self.odd_slots.len(),
            holding: self.holders.contains_key(machine_id)
                || self.slots.values().any(|(m, _)| m == machine_id),
            proven: self.proven.contains(version),
        })
    }

    /// What `machine_id` holds as the view shows it; `None` before the view
    /// was read or if it has no holder key.
    pub fn held_by(&self, machine_id: &str) -> Option<Held> {
        if !self.synced {
            return None;
        }
        let (holder_rev, lease) = *self.holders.get(machine_id)?;
        let slots = self.slots.iter().filter(|(_, (m, _))| m == machine_id);
        Some(Held {
            holder_rev,
            lease,
            slots: slots.map(|(i, (_, rev))| (*i, *rev)).collect(),
        })
    }

    /// Whether a host that holds no slot might take one for `version` now:
    /// [`super::lock::decide`] on [`Self::state`], without copying the slots, since
    /// every waiting host asks this on every change of its group.
    pub fn may_take(&self, version: &str) -> bool {
        let Some(p) = self.policy.as_ref().filter(|_| self.synced) else {
            return false;
        };
        if p.paused
            || p.pinned_version
                .as_deref()
                .is_some_and(|pin| pin != version)
        {
            return false;
        }
        let held = self.slots.len() + self.odd_slots.len();
        if !self.proven.contains(version) {
            return held == 0;
        }
        held < p.max_holders as usize
            && self.odd_slots.is_empty()
            && self.slots.range(p.max_holders..).next().is_none()
    }

    /// How many slots look free for `version` (0 if it may not be taken).
    fn free_slots(&self, version: &str) -> usize {
        if !self.may_take(version) {
            return 0;
        }
        match self.policy.as_ref() {
            Some(p) if self.proven.contains(version) => {
                (p.max_holders as usize).saturating_sub(self.slots.len())
            }
            // Safe mode: one, taken alone.
            _ => 1,
        }
    }

    /// Whether `machine_id`, waiting for `version`, leaves the free slots to
    /// the hosts before it instead of asking: it stands [`Turn::Far`] back
    /// and the queue moves ([`QUEUE_STALL`]). Without this, every far host
    /// whose own round comes while slots churn asks for one (at 10,000
    /// hosts on a 30 s round, hundreds of failed takes a second).
    pub fn yields(&self, machine_id: &str, version: &str) -> bool {
        self.turn(machine_id, version) == Turn::Far
            && self.last_take.is_some_and(|t| t.elapsed() < QUEUE_STALL)
    }

    /// The version `machine_id` waits for in the queue, if it is in it.
    pub fn queued(&self, machine_id: &str) -> Option<&str> {
        let (m, created) = self.queue.get_key_value(machine_id)?;
        self.queue_order.get(&(*created, m.clone())).map(|v| &**v)
    }

    /// How many hosts wait in the queue.
    pub fn queue_len(&self) -> usize {
        self.queue.len()
    }

    /// Indexes the front of the queue after changes to it or the policy:
    /// once per change of the view, not once per waiting host.
    fn reindex(&mut self) {
        if !std::mem::take(&mut self.stale) {
            return;
        }
        let max = self.policy.as_ref().map_or(1, |p| p.max_holders as usize);
        let len = max.min(MAX_FRONT) + BEHIND_LOOKAHEAD;
        self.front.clear();
        self.front_counts.clear();
        self.front_last = 0;
        for ((created, m), v) in self.queue_order.iter().take(len) {
            let count = self.front_counts.entry(v.clone()).or_default();
            self.front.insert(m.clone(), (v.clone(), *count));
            *count += 1;
            self.front_last = *created;
        }
        self.front_cut = self.queue_order.len() > len;
    }

    /// `machine_id`'s place among the hosts of the queue waiting for
    /// `version` (a host not in the queue for it comes after them all);
    /// `None` beyond the front.
    fn place(&self, machine_id: &str, version: &str) -> Option<usize> {
        match self.front.get(machine_id) {
            Some((v, place)) if **v == *version => Some(*place),
            _ if self.front_cut => None,
            _ => Some(self.front_counts.get(version).copied().unwrap_or(0)),
        }
    }

    /// Where `machine_id`, waiting for `version`, stands: the free slots
    /// are for the first hosts of the queue that wait for the same version.
    /// A host not in the queue (yet) stands behind all of them. Costs a
    /// lookup in the front of the queue ([`Self::reindex`]).
    pub fn turn(&self, machine_id: &str, version: &str) -> Turn {
        let Some(place) = self.place(machine_id, version) else {
            return Turn::Far;
        };
        // The most slots that could be free for it: beyond them, no change
        // but many takes brings its turn.
        let most = match &self.policy {
            Some(p) if self.proven.contains(version) => p.max_holders as usize,
            _ => 1,
        };
        if place >= most.saturating_add(BEHIND_LOOKAHEAD) {
            return Turn::Far;
        }
        let free = self.free_slots(version);
        if free == 0 {
            Turn::NoSlot
        } else if place < free {
            Turn::Now(place)
        } else if place - free < BEHIND_LOOKAHEAD {
            Turn::Behind(place + 1 - free)
        } else {
            Turn::Far
        }
    }
}

/// A host's keys in the lock as its view shows them, for a release
/// without a read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Held {
    /// The holder key's revision and lease.
    pub holder_rev: i64,
    pub lease: i64,
    /// Slot numbers with their keys' revisions.
    pub slots: Vec<(u32, i64)>,
}

/// The running watch; clones share it, and it stops with the last one.
#[derive(Debug, Clone)]
pub struct GroupWatch {
    rx: watch::Receiver<GroupView>,
    _task: Arc<AbortOnDrop>,
}

impl GroupWatch {
    /// Starts watching `group`; reconnects with backoff. Must be called
    /// inside a tokio runtime.
    pub fn start(client: Client, keys: Keys, group: String) -> GroupWatch {
        let (tx, rx) = watch::channel(GroupView::default());
        let task = tokio::spawn(async move {
            let mut backoff = Backoff::new(Duration::from_millis(500), Duration::from_secs(30));
            loop {
                let e = match watch_once(&client, &keys, &group, &tx, &mut backoff).await {
                    Ok(()) => anyhow::anyhow!("etcd ended the watch"),
                    Err(e) => e,
                };
                tx.send_modify(|v| v.synced = false);
                let wait = backoff.next_wait();
                tracing::warn!("watching group {group}: {e:#}; again in {wait:?}");
                tokio::time::sleep(wait).await;
            }
        });
        GroupWatch {
            rx,
            _task: Arc::new(AbortOnDrop(task)),
        }
    }

    /// A receiver of the view, for [`wait_for_slot`].
    pub fn subscribe(&self) -> watch::Receiver<GroupView> {
        self.rx.clone()
    }
}

async fn watch_once(
    client: &Client,
    keys: &Keys,
    group: &str,
    tx: &watch::Sender<GroupView>,
    backoff: &mut Backoff,
) -> Result<()> {
    let prefix = keys.group(group);
    let mut c = client.clone();
    let now = c
        .get(prefix.as_str(), Some(GetOptions::new().with_prefix()))
        .await
        .with_context(|| format!("cannot read {prefix}"))?;
    let rev = now.header().map_or(0, |h| h.revision());
    let view = GroupView::read(keys, group, now.kvs().iter().map(|kv| Entry::of(kv, false)));
    tx.send_replace(view);
    let (_watcher, mut stream) = super::watch_after(&mut c, &prefix, true, rev).await?;
    backoff.reset();
    while let Some(resp) = stream.message().await.context("the group watch failed")? {
        tx.send_modify(|v| {
            for ev in resp.events() {
                let Some(kv) = ev.kv() else { continue };
                let deleted = ev.event_type() != EventType::Put;
                v.apply_entry(keys, group, Entry::of(kv, deleted));
            }
            v.reindex();
        });
    }
    Ok(())
}

/// Returns when `machine_id`'s turn in the queue has come for a slot to
/// boot `version` ([`GroupView::turn`]): after a random part of
/// [`FRONT_SPREAD`] if it is among the first, else after [`BEHIND_WAIT`]
/// per place behind them without a change. Changes seen before the call do
/// not count: the caller has just asked etcd itself. Never returns if the
/// watch stopped; callers bound it with their own timeout.
pub async fn wait_for_slot(rx: &mut watch::Receiver<GroupView>, machine_id: &str, version: &str) {
    rx.borrow_and_update();
    loop {
        if rx.changed().await.is_err() {
            std::future::pending::<()>().await;
        }
        let turn = rx.borrow_and_update().turn(machine_id, version);
        let wait = match turn {
            Turn::NoSlot => continue,
            Turn::Far => {
                tokio::time::sleep(FAR_RECHECK).await;
                continue;
            }
            Turn::Now(_) => {
                // Not cut short by changes: while slots churn they come
                // faster than the spread.
                tokio::time::sleep(super::random_up_to(FRONT_SPREAD)).await;
                if rx.borrow().may_take(version) {
                    return;
                }
                continue;
            }
            Turn::Behind(n) => {
                let n = u32::try_from(n).unwrap_or(u32::MAX);
                BEHIND_WAIT.saturating_mul(n) + super::random_up_to(BEHIND_WAIT)
            }
        };
        // Behind: a change (the queue moving, most often) decides again.
        tokio::select! {
            () = tokio::time::sleep(wait) => {
                if rx.borrow().may_take(version) {
                    return;
                }
            }
            changed = rx.changed() => {
                if changed.is_err() {
                    std::future::pending::<()>().await;
                }
                // Seen again at the top of the loop.
                rx.mark_changed();
            }
        }
    }
}

/// The daemon's waiting: wakes the update loop when its turn for a slot
/// comes for the version the host has staged (from its registration
/// record), so a host waiting for a slot asks within about a second of one
/// being freed for it rather than at its next round (a minute or more). A
/// host that staged nothing any more leaves the queue. Runs until aborted.
pub async fn wake_for_staged(
    fleet: super::Fleet,
    view: GroupWatch,
    mut record: watch::Receiver<HostRecord>,
    wake: Arc<Notify>,
) {
    let mut rx = view.subscribe();
    loop {
        let staged = record.borrow_and_update().staged_version.clone();
        let Some(version) = staged else {
            if rx.borrow().queued(&fleet.machine_id).is_some() {
                if let Err(e) = fleet.leave_queue().await {
                    tracing::warn!("{e:#}");
                }
            }
            if record.changed().await.is_err() {
                return;
            }
            continue;
        };
        tokio::select! {
            () = wait_for_slot(&mut rx, &fleet.machine_id, &version) => {
                tracing::debug!("a reboot slot looks free for {version}");
                wake.notify_one();
            }
            changed = record.changed() => {
                if changed.is_err() {
                    return;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fleet::lock::{decide, Decision};

    #[test]
    fn view_follows_the_keys() {
        let keys = Keys::new("/b");
        let mut v = GroupView {
            policy: Some(Policy::default()),
            synced: true,
            ..GroupView::default()
        };
        let put = |v: &mut GroupView, k: &str, val: &str| {
            v.apply(
                &keys,
                "g",
                &format!("/b/groups/g/{k}"),
                Some(val.as_bytes()),
                9,
            )
        };
        let agrees = |v: &GroupView| {
            let st = v.state("z", "2.0").unwrap();
            let decided = !matches!(decide(&st, "2.0"), Decision::Answer(_));
            assert_eq!(v.may_take("2.0"), decided, "{v:?}");
        };
        put(&mut v, "policy", r#"{"max_holders": 2}"#);
        // Unproven: safe mode, free while nobody holds.
        assert!(v.may_take("2.0"));
        put(&mut v, "lock/slots/0", "a");
        assert!(!v.may_take("2.0"));
        put(&mut v, "proven/2.0", "a");
        assert!(v.may_take("2.0"));
        put(&mut v, "lock/slots/1", "b");
        assert!(!v.may_take("2.0"));
        agrees(&v);
        put(
            &mut v,
            "policy",
            r#"{"max_holders": 5, "pinned_version": "2.0"}"#,
        );
        agrees(&v);
        put(&mut v, "policy", r#"{"max_holders": 1}"#);
        agrees(&v);
        put(&mut v, "lock/slots/x", "c");
        put(&mut v, "policy", r#"{"max_holders": 5}"#);
        agrees(&v);
        v.apply(&keys, "g", "/b/groups/g/lock/slots/x", None, 10);
        agrees(&v);
        put(&mut v, "policy", r#"{"max_holders": 2}"#);
        v.apply(&keys, "g", "/b/groups/g/lock/slots/1", None, 10);
        assert!(v.may_take("2.0"));
        put(&mut v, "policy", "not json");
        assert!(!v.may_take("2.0"));
        v.apply(&keys, "g", "/b/groups/g/policy", None, 11);
        // Default max 1, slot 0 held.
        assert!(!v.may_take("2.0"));
        put(&mut v, "lock/holders/a", "{}");
        put(&mut v, "failures/2.0/a", "{}");
        let st = v.state("a", "2.0").unwrap();
        assert!(st.holding && st.slots.contains(&0) && st.policy_rev == 0);
        v.apply(&keys, "g", "/b/groups/g/lock/slots/0", None, 12);
        assert!(v.may_take("2.0"));
        assert!(v.state("a", "2.0").unwrap().holding, "its holder key");
        v.apply(&keys, "g", "/b/groups/g/lock/holders/a", None, 12);
        assert!(!v.state("a", "2.0").unwrap().holding);
        put(&mut v, "lock/slots/3", "a");
        assert_eq!(v.held_by("a"), None, "no holder key");
        put(&mut v, "lock/holders/a", "{}");
        let held = Held {
            holder_rev: 9,
            lease: 0,
            slots: vec![(3, 9)],
        };
        assert_eq!(v.held_by("a"), Some(held));
    }

    #[test]
    fn slots_held_at_a_read_are_not_takes_seen() {
        let keys = Keys::new("/b");
        let k = |s: &str| format!("/b/groups/g/{s}");
        let mut kvs = vec![
            (k("policy"), r#"{"max_holders": 2}"#, 1),
            (k("proven/2.0"), "x", 2),
            (k("lock/slots/0"), "a", 3),
        ];
        for i in 0..=BEHIND_LOOKAHEAD + 2 {
            kvs.push((k(&format!("queue/q{i}")), "2.0", 10 + i as i64));
        }
        let entries = kvs.iter().map(|(key, value, rev)| Entry {
            key,
            value: Some(value.as_bytes()),
            mod_rev: *rev,
            create_rev: *rev,
            lease: 0,
        });
        let mut v = GroupView::read(&keys, "g", entries);
        let last = format!("q{}", BEHIND_LOOKAHEAD + 2);
        assert_eq!(v.turn(&last, "2.0"), Turn::Far);
        // Slot 0 was held when the view was read, not taken while it
        // watched: the far host asks on its round.
        assert!(!v.yields(&last, "2.0"));
        // Slot 1 taken and slot 0 freed, seen in the watch: the queue moves.
        v.apply(&keys, "g", &k("lock/slots/1"), Some(b"b"), 40);
        v.apply(&keys, "g", &k("lock/slots/0"), None, 41);
        assert_eq!(v.turn(&last, "2.0"), Turn::Far);
        assert!(v.yields(&last, "2.0"), "a take seen in the watch");
    }

    #[test]
    fn the_free_slots_are_for_the_front_of_the_queue() {
        let keys = Keys::new("/b");
        let mut v = GroupView {
            policy: Some(Policy::default()),
            synced: true,
            ..GroupView::default()
        };
        let mut rev = 10;
        let mut put = |v: &mut GroupView, k: &str, val: &str| {
            rev += 1;
            v.apply(
                &keys,
                "g",
                &format!("/b/groups/g/{k}"),
                Some(val.as_bytes()),
                rev,
            )
        };
        put(&mut v, "policy", r#"{"max_holders": 2}"#);
        put(&mut v, "proven/2.0", "x");
        // Nobody queued: any host may ask.
        assert_eq!(v.turn("c", "2.0"), Turn::Now(0));
        for m in ["a", "b", "c", "d"] {
            put(&mut v, &format!("queue/{m}"), "2.0");
        }
        put(&mut v, "queue/o", "3.0");
        assert_eq!(v.queue_len(), 5);
        assert_eq!(v.turn("a", "2.0"), Turn::Now(0));
        assert_eq!(v.turn("b", "2.0"), Turn::Now(1));
        assert_eq!(v.turn("c", "2.0"), Turn::Behind(1));
        assert_eq!(v.turn("d", "2.0"), Turn::Behind(2));
        assert_eq!(v.turn("new", "2.0"), Turn::Behind(3), "not queued: last");
        // Hosts waiting for another version do not count.
        // 3.0 is not proven: one host, alone, and o is the first for it.
        assert_eq!(v.turn("o", "3.0"), Turn::Now(0));
        assert_eq!(v.turn("new", "3.0"), Turn::Behind(1));
        put(&mut v, "lock/slots/0", "a");
        v.apply(&keys, "g", "/b/groups/g/queue/a", None, 30);
        assert_eq!(
            v.turn("o", "3.0"),
            Turn::NoSlot,
            "safe mode: a slot is held"
        );
        assert_eq!(v.turn("b", "2.0"), Turn::Now(0));
        assert_eq!(v.turn("c", "2.0"), Turn::Behind(1), "one slot free");
        // A put on a queued host's key keeps its place (etcd keeps the
        // create revision); here the test's create revision is the put's.
        put(&mut v, "lock/slots/1", "b");
        assert_eq!(v.turn("c", "2.0"), Turn::NoSlot);
        v.apply(&keys, "g", "/b/groups/g/lock/slots/0", None, 40);
        assert_eq!(v.turn("b", "2.0"), Turn::Now(0), "still queued: first");
        assert_eq!(v.turn("c", "2.0"), Turn::Behind(1));
        v.apply(&keys, "g", "/b/groups/g/queue/b", None, 41);
        assert_eq!(v.turn("c", "2.0"), Turn::Now(0));
        assert_eq!(v.queued("c"), Some("2.0"));
        assert_eq!(v.queued("b"), None);
        for i in 0..BEHIND_LOOKAHEAD {
            put(&mut v, &format!("queue/q{i}"), "2.0");
        }
        assert_eq!(v.turn("q0", "2.0"), Turn::Behind(2), "c and d first");
        assert_eq!(v.turn("new", "2.0"), Turn::Far);
        let last = format!("q{}", BEHIND_LOOKAHEAD - 1);
        assert_eq!(v.turn(&last, "2.0"), Turn::Far);
        // A slot was taken just now: the queue moves, a far host leaves the
        // free slot to the hosts before it; a near one does not.
        assert!(v.yields(&last, "2.0"));
        assert!(!v.yields("c", "2.0") && !v.yields("q0", "2.0"));
        // No take for QUEUE_STALL: the front is not taking; anyone asks.
        v.last_take = Some(std::time::Instant::now() - QUEUE_STALL);
        assert!(!v.yields(&last, "2.0"));
        v.last_take = None;
        assert!(!v.yields(&last, "2.0"), "no take seen at all");
        put(&mut v, "policy", r#"{"max_holders": 2, "paused": true}"#);
        assert_eq!(v.turn("c", "2.0"), Turn::NoSlot);
    }
}
