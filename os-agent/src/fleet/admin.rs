//! What `osctl fleet` reads and changes: every host, every group's policy,
//! lock holders, failure reports and rollout progress; pause, resume, pin,
//! set-max and unlock. Policy changes are compare-and-swap, so two operators
//! (or an operator and a self-pausing group) never overwrite each other.

use super::model::{self, BadValue, FailureReport, Holder, HostRecord, Keys, Policy};
use crate::config::fleet::check_group;
use anyhow::{bail, Context, Result};
use etcd_client::{Client, Compare, CompareOp, GetOptions, Txn, TxnOp};
use serde::Serialize;
use std::collections::BTreeMap;

#[derive(Debug, Clone, Default, Serialize)]
pub struct GroupView {
    pub name: String,
    pub policy: Policy,
    pub holders: Vec<Holder>,
    /// Hosts in the group's queue, waiting for a reboot slot.
    pub waiting: usize,
    /// Failure reports per version.
    pub failures: BTreeMap<String, Vec<FailureReport>>,
    /// Versions a host of the group booted and blessed (safe mode is over).
    pub proven: Vec<String>,
    /// Registered hosts per booted version.
    pub versions: BTreeMap<String, usize>,
    pub hosts: usize,
    /// The holders that have held their slot longest (their reboot or
    /// health check is the slowest), oldest first, at most [`SLOWEST`].
    pub slowest: Vec<Slow>,
}

/// How many of the slowest holders a group's view names.
pub const SLOWEST: usize = 5;

/// A holder and how long it has held its slot.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Slow {
    pub machine_id: String,
    pub version: String,
    pub held_secs: u64,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct Overview {
    pub hosts: Vec<HostRecord>,
    pub groups: Vec<GroupView>,
    /// Values in etcd that could not be read, each naming its key.
    pub problems: Vec<String>,
    /// The etcd revision this was read at (a watch goes on from it).
    pub revision: i64,
}

fn key_str(kv: &etcd_client::KeyValue) -> String {
    String::from_utf8_lossy(kv.key()).into_owned()
}

fn view<'a>(by_name: &'a mut BTreeMap<String, GroupView>, name: &str) -> &'a mut GroupView {
    by_name
        .entry(name.to_string())
        .or_insert_with(|| GroupView {
            name: name.to_string(),
            ..GroupView::default()
        })
}

/// Reads the whole fleet under `keys`. A bad value is reported, not fatal.
pub async fn overview(client: &Client, keys: &Keys) -> Result<Overview> {
    let mut c = client.clone();
    let prefix = GetOptions::new().with_prefix();
    let hosts = c
        .get(keys.hosts(), Some(prefix.clone()))
        .await
        .context("cannot read the registered hosts")?;
    let groups = c
        .get(
            keys.groups(),
            Some(prefix.with_revision(hosts.header().map_or(0, |h| h.revision()))),
        )
        .await
        .context("cannot read the groups")?;
    let mut o = Overview {
        revision: hosts.header().map_or(0, |h| h.revision()),
        ..Overview::default()
    };
    let mut by_name: BTreeMap<String, GroupView> = BTreeMap::new();
    for kv in hosts.kvs() {
        match HostRecord::parse(&key_str(kv), kv.value()) {
            Ok(h) => {
                let g = view(&mut by_name, &h.group);
                g.hosts += 1;
                *g.versions.entry(h.booted_version.clone()).or_default() += 1;
                o.hosts.push(h);
            }
            Err(e) => o.problems.push(e.to_string()),
        }
    }
    let groups_prefix = keys.groups();
    for kv in groups.kvs() {
        let key = key_str(kv);
        let rest = key.strip_prefix(&groups_prefix).unwrap_or(&key);
        let parts: Vec<&str> = rest.split('/').collect();
        let result: Result<(), BadValue> = match parts.as_slice() {
            [g, "policy"] => {
                Policy::parse(&key, kv.value()).map(|p| view(&mut by_name, g).policy = p)
            }
            [g, "lock", "holders", _] => {
                Holder::parse(&key, kv.value()).map(|h| view(&mut by_name, g).holders.push(h))
            }
            // The slot keys name their holder's machine id; the holder keys
            // say the rest. The guard was the lock of agents before slot keys.
            [_, "lock", "slots", _] | [_, "lock", "guard"] => Ok(()),
            [g, "queue", _] => {
                view(&mut by_name, g).waiting += 1;
                Ok(())
            }
            [g, "failures", v, _] => FailureReport::parse(&key, kv.value()).map(|f| {
                view(&mut by_name, g)
                    .failures
                    .entry(v.to_string())
                    .or_default()
                    .push(f)
            }),
            [g, "proven", v] => {
                view(&mut by_name, g).proven.push(v.to_string());
                Ok(())
            }
            _ => Err(BadValue::Invalid {
                key: key.clone(),
                why: "not a key the fleet uses (see docs/etcd.md)".into(),
            }),
        };
        if let Err(e) = result {
            o.problems.push(e.to_string());
        }
    }
    let now = super::now_unix();
    for g in by_name.values_mut() {
        g.holders.sort_by_key(|h| h.since);
        g.slowest = g
            .holders
            .iter()
            .take(SLOWEST)
            .map(|h| Slow {
                machine_id: h.machine_id.clone(),
                version: h.version.clone(),
                held_secs: now.saturating_sub(h.since),
            })
            .collect();
    }
    o.groups = by_name.into_values().collect();
    Ok(o)
}

/// Reads, changes and writes back a group's policy; retried when someone
/// else changed it in between.
pub async fn modify_policy(
    client: &Client,
    keys: &Keys,
    group: &str,
    change: impl Fn(&mut Policy) -> Result<()>,
) -> Result<Policy> {
    check_group(group)?;
    let key = keys.policy(group);
    let mut c = client.clone();
    for _ in 0..10 {
        let resp = c
            .get(key.as_str(), None)
            .await
            .with_context(|| format!("cannot read {key}"))?;
        let (mut p, cmp) = match resp.kvs().first() {
            Some(kv) => (
                Policy::parse(&key, kv.value())?,
                Compare::mod_revision(key.as_str(), CompareOp::Equal, kv.mod_revision()),
            ),
            None => (
                Policy::default(),
                Compare::create_revision(key.as_str(), CompareOp::Equal, 0),
            ),
        };
        change(&mut p)?;
        let txn = Txn::new()
            .when([cmp])
            .and_then([TxnOp::put(key.as_str(), p.to_json(), None)]);
        if c.txn(txn)
            .await
            .with_context(|| format!("cannot write {key}"))?
            .succeeded()
        {
            return Ok(p);
        }
    }
    bail!("{key} kept changing while we tried to write it")
}

pub async fn pause(client: &Client, keys: &Keys, group: &str) -> Result<Policy> {
    modify_policy(client, keys, group, |p| {
        p.paused = true;
        p.paused_reason = Some("paused by an operator".into());
        Ok(())
    })
    .await
}

pub async fn resume(client: &Client, keys: &Keys, group: &str) -> Result<Policy> {
    modify_policy(client, keys, group, |p| {
        p.paused = false;
        p.paused_reason = None;
        Ok(())
    })
    .await
}

/// Pins the group to `version`; `None` unpins.
pub async fn pin(
    client: &Client,
    keys: &Keys,
    group: &str,
    version: Option<&str>,
) -> Result<Policy> {
    if let Some(v) = version {
        model::check_version(v).map_err(anyhow::Error::msg)?;
    }
    modify_policy(client, keys, group, |p| {
        p.pinned_version = version.map(str::to_string);
        Ok(())
    })
    .await
}

pub async fn set_max(client: &Client, keys: &Keys, group: &str, max: u32) -> Result<Policy> {
    if max == 0 {
        bail!("the maximum must be at least 1 (pause the group to stop reboots)");
    }
    modify_policy(client, keys, group, |p| {
        p.max_holders = max;
        Ok(())
    })
    .await
}

/// Frees a stuck holder's slot. Errors if it holds none, so a typo in the
/// machine id does not look like success.
pub async fn unlock(client: &Client, keys: &Keys, group: &str, machine_id: &str) -> Result<()> {
    check_group(group)?;
    if !super::lock::free_slot(client, keys, group, machine_id, None, None).await? {
        let key = keys.holder(group, machine_id);
        bail!("{machine_id} holds no reboot slot of group {group} ({key} does not exist)");
    }
    Ok(())
}
