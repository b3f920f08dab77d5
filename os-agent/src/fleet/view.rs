//! A host's view of its group's lock (policy, slot keys, proven versions),
//! kept from one etcd watch on the group's keys, so a host waiting for a
//! reboot slot learns that one was freed without asking etcd again and
//! again. Watches cost etcd no requests while nothing changes.
//!
//! The view is only a hint: the take itself is a transaction that checks
//! everything ([`super::lock`]). It decides *when* to ask: when a change
//! makes a slot look free, the host waits a random part of
//! [`WAKE_SPREAD`] and asks only if its view still says so. Of the hosts
//! woken by one freed slot the first to ask takes it; the others see the new
//! slot key in their view and keep waiting, so a freed slot costs about one
//! request instead of one per waiting host. The daemon runs
//! [`wake_for_staged`]; the simulated hosts wait on [`wait_for_slot`].

use super::lock::LockState;
use super::model::{HostRecord, Keys, Policy};
use super::{AbortOnDrop, Backoff};
use anyhow::{Context, Result};
use etcd_client::{Client, EventType, GetOptions};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{watch, Notify};

/// How long hosts woken by the same change spread their requests over.
pub const WAKE_SPREAD: Duration = Duration::from_secs(1);

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
    /// Whether the view was read from etcd at all.
    pub synced: bool,
}

impl GroupView {
    /// Applies a put (`value`, at `rev`) or a delete of `key`, on no lease.
    #[cfg(test)]
    fn apply(&mut self, keys: &Keys, group: &str, key: &str, value: Option<&[u8]>, rev: i64) {
        self.apply_leased(keys, group, key, value, rev, 0);
    }

    /// Applies a put (`value`, at `rev`, on `lease`) or a delete of `key`.
    fn apply_leased(
        &mut self,
        keys: &Keys,
        group: &str,
        key: &str,
        value: Option<&[u8]>,
        rev: i64,
        lease: i64,
    ) {
        let Some(rest) = key.strip_prefix(&keys.group(group)) else {
            return;
        };
        if rest == "policy" {
            (self.policy, self.policy_rev) = match value {
                None => (Some(Policy::default()), 0),
                Some(v) => (Policy::parse(key, v).ok(), rev),
            };
        } else if let Some(n) = rest.strip_prefix("lock/slots/") {
            let number = n.parse::<u32>().ok().filter(|i| i.to_string() == n);
            match (number, value) {
                (Some(i), Some(v)) => {
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
    let mut view = GroupView {
        policy: Some(Policy::default()),
        synced: true,
        ..GroupView::default()
    };
    for kv in now.kvs() {
        let key = String::from_utf8_lossy(kv.key());
        view.apply_leased(
            keys,
            group,
            &key,
            Some(kv.value()),
            kv.mod_revision(),
            kv.lease(),
        );
    }
    tx.send_replace(view);
    let (_watcher, mut stream) = super::watch_after(&mut c, &prefix, true, rev).await?;
    backoff.reset();
    while let Some(resp) = stream.message().await.context("the group watch failed")? {
        tx.send_modify(|v| {
            for ev in resp.events() {
                let Some(kv) = ev.kv() else { continue };
                let key = String::from_utf8_lossy(kv.key());
                let value = (ev.event_type() == EventType::Put).then(|| kv.value());
                v.apply_leased(keys, group, &key, value, kv.mod_revision(), kv.lease());
            }
        });
    }
    Ok(())
}

/// Returns once a change to the group makes a slot look free for `version`
/// and it still does a random part of `spread` later. Changes seen before
/// the call do not count: the caller has just asked etcd itself. Never
/// returns if the watch stopped; callers bound it with their own timeout.
pub async fn wait_for_slot(rx: &mut watch::Receiver<GroupView>, version: &str, spread: Duration) {
    rx.borrow_and_update();
    loop {
        if rx.changed().await.is_err() {
            std::future::pending::<()>().await;
        }
        if !rx.borrow_and_update().may_take(version) {
            continue;
        }
        tokio::time::sleep(super::random_up_to(spread)).await;
        if rx.borrow().may_take(version) {
            return;
        }
    }
}

/// The daemon's waiting: wakes the update loop when a slot looks free for
/// the version the host has staged (from its registration record), so a
/// host waiting for a slot asks within about a second of one being freed
/// rather than at its next round (a minute or more). Runs until aborted.
pub async fn wake_for_staged(
    view: GroupWatch,
    mut record: watch::Receiver<HostRecord>,
    wake: Arc<Notify>,
) {
    let mut rx = view.subscribe();
    loop {
        let staged = record.borrow_and_update().staged_version.clone();
        let Some(version) = staged else {
            if record.changed().await.is_err() {
                return;
            }
            continue;
        };
        tokio::select! {
            () = wait_for_slot(&mut rx, &version, WAKE_SPREAD) => {
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
}
