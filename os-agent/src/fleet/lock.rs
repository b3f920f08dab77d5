//! The reboot lock: a counting semaphore per group in etcd.
//!
//! A holder is a key `groups/<g>/lock/holders/<machine-id>` on its own lease
//! of the lock TTL, taken before the reboot and deleted once the new boot is
//! blessed or the host fell back; the lease is not kept alive, so a host that
//! never comes back frees its slot when the lease runs out.
//!
//! Taking a slot is one read (policy, the number of holders, whether this
//! host is one, guard, proven marker, in one transaction) and one
//! compare-and-swap: put the holder key only if the
//! guard key has not changed since the read and the holder key does not
//! exist, and bump the guard in the same transaction. Two hosts that counted
//! the same free slot both compare against the same guard version; one wins,
//! the other reads again. Deletions (release, lease expiry, `osctl fleet
//! unlock`) only lower the count, so they need no guard.

use super::model::{self, FailureReport, Holder, Policy};
use super::{now_unix, Fleet};
use crate::update::fleet_lock::{RebootLock, Released};
use anyhow::{bail, Context, Result};
use etcd_client::{
    Compare, CompareOp, DeleteOptions, GetOptions, PutOptions, Txn, TxnOp, TxnOpResponse,
};
use std::time::Duration;

/// How many times a host retries a lost compare-and-swap before it waits for
/// its next turn.
const CAS_ATTEMPTS: u32 = 5;

/// The answer to a request for a reboot slot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Acquire {
    /// Taken now, or held already (across the reboot).
    Granted,
    /// Not now, and why.
    Wait(String),
}

/// What one read of the group's lock state found.
#[derive(Debug, Clone)]
pub struct LockState {
    pub policy: Policy,
    /// How many hosts hold a slot.
    pub holders: usize,
    /// Whether this host is one of them.
    pub holding: bool,
    /// The guard key's version (0: never taken).
    pub guard_version: i64,
    /// Whether a host of the group already proved the version.
    pub proven: bool,
}

fn range(r: TxnOpResponse) -> Result<etcd_client::GetResponse> {
    match r {
        TxnOpResponse::Get(g) => Ok(g),
        other => bail!("etcd answered a range request with {other:?}"),
    }
}

impl Fleet {
    /// The group's policy; every default if nobody wrote one.
    pub async fn policy(&self) -> Result<Policy> {
        let key = self.keys.policy(&self.group);
        let resp = self
            .client
            .clone()
            .get(key.as_str(), None)
            .await
            .with_context(|| format!("cannot read {key}"))?;
        match resp.kvs().first() {
            Some(kv) => Ok(Policy::parse(&key, kv.value())?),
            None => Ok(Policy::default()),
        }
    }

    /// Reads everything a decision needs in one transaction.
    pub async fn lock_state(&self, version: &str) -> Result<LockState> {
        let g = &self.group;
        let policy_key = self.keys.policy(g);
        let holders_key = self.keys.holders(g);
        let count = || GetOptions::new().with_count_only();
        let txn = Txn::new().and_then([
            TxnOp::get(policy_key.as_str(), None),
            TxnOp::get(holders_key.as_str(), Some(count().with_prefix())),
            TxnOp::get(self.keys.holder(g, &self.machine_id), Some(count())),
            TxnOp::get(self.keys.guard(g), None),
            TxnOp::get(self.keys.proven(g, version), Some(count())),
        ]);
        let resp = self
            .client
            .clone()
            .txn(txn)
            .await
            .with_context(|| format!("cannot read the reboot lock of group {g}"))?;
        let mut ops = resp.op_responses().into_iter();
        let mut next = || ops.next().context("etcd answered fewer reads than asked");
        let policy = match range(next()?)?.kvs().first() {
            Some(kv) => Policy::parse(&policy_key, kv.value())?,
            None => Policy::default(),
        };
        let holders = usize::try_from(range(next()?)?.count()).unwrap_or(usize::MAX);
        let holding = range(next()?)?.count() > 0;
        let guard_version = range(next()?)?.kvs().first().map_or(0, |kv| kv.version());
        let proven = range(next()?)?.count() > 0;
        Ok(LockState {
            policy,
            holders,
            holding,
            guard_version,
            proven,
        })
    }

    /// Takes a reboot slot to boot `version`, if the group's policy and the
    /// number of holders allow it.
    pub async fn try_acquire(&self, version: &str) -> Result<Acquire> {
        model::check_version(version).map_err(anyhow::Error::msg)?;
        for _ in 0..CAS_ATTEMPTS {
            let st = self.lock_state(version).await?;
            if let Some(verdict) = decide(&st, version) {
                return Ok(verdict);
            }
            if self.cas_take(version, st.guard_version).await? {
                tracing::info!(
                    "took a reboot slot of group {} for {version} ({} of {} held before)",
                    self.group,
                    st.holders,
                    st.policy.max_holders
                );
                return Ok(Acquire::Granted);
            }
            // Someone else took a slot between our read and our write.
            tokio::time::sleep(super::random_up_to(Duration::from_millis(50))).await;
        }
        Ok(Acquire::Wait(
            "other hosts took the free slots first (contention)".into(),
        ))
    }

    async fn cas_take(&self, version: &str, guard_version: i64) -> Result<bool> {
        let mut c = self.client.clone();
        let (lease, granted) = match self.take_spare_lease() {
            Some(spare) => spare,
            None => {
                let ttl = self.lock_ttl.as_secs() as i64;
                let id = c
                    .lease_grant(ttl, None)
                    .await
                    .context("cannot grant the lock lease")?
                    .id();
                (id, std::time::Instant::now())
            }
        };
        let holder_key = self.keys.holder(&self.group, &self.machine_id);
        let holder = Holder {
            machine_id: self.machine_id.clone(),
            version: version.to_string(),
            since: now_unix(),
        };
        let guard = self.keys.guard(&self.group);
        let txn = Txn::new()
            .when([
                Compare::version(guard.as_str(), CompareOp::Equal, guard_version),
                Compare::create_revision(holder_key.as_str(), CompareOp::Equal, 0),
            ])
            .and_then([
                TxnOp::put(
                    holder_key.as_str(),
                    model::to_json(&holder),
                    Some(PutOptions::new().with_lease(lease)),
                ),
                TxnOp::put(guard.as_str(), self.machine_id.as_str(), None),
            ]);
        let won = c
            .txn(txn)
            .await
            .with_context(|| format!("cannot write {holder_key}"))?
            .succeeded();
        if !won {
            *lock_spare(&self.spare_lease) = Some((lease, granted));
        }
        Ok(won)
    }

    /// The spare lease, if it still has nearly all of its TTL. An older one
    /// is left to expire: it holds no keys.
    fn take_spare_lease(&self) -> Option<(i64, std::time::Instant)> {
        let (id, granted) = lock_spare(&self.spare_lease).take()?;
        if granted.elapsed() < self.lock_ttl / 20 {
            Some((id, granted))
        } else {
            tracing::debug!("letting the unused lock lease {id:x} expire");
            None
        }
    }

    /// Gives the slot back and tells the group how the version did: a
    /// blessed boot proves it (ending safe mode), a rollback files a failure
    /// report and may pause the group.
    pub async fn release(&self, outcome: &Released) -> Result<()> {
        let holder = self.keys.holder(&self.group, &self.machine_id);
        let delete = TxnOp::delete(holder.as_str(), Some(DeleteOptions::new().with_prev_key()));
        let resp = match outcome {
            // One transaction frees the slot and proves the version, so the
            // slot is free after a single round trip.
            Released::Blessed { version } => {
                let proven = self.keys.proven(&self.group, version);
                let txn = Txn::new()
                    .when([Compare::create_revision(
                        proven.as_str(),
                        CompareOp::Equal,
                        0,
                    )])
                    .and_then([
                        TxnOp::put(proven.as_str(), self.machine_id.as_str(), None),
                        delete.clone(),
                    ])
                    .or_else([delete]);
                self.client
                    .clone()
                    .txn(txn)
                    .await
                    .with_context(|| format!("cannot release {holder}"))?
            }
            // The report (and the pause it may cause) goes first, so no
            // other host takes the freed slot to a version that just paused
            // its group.
            Released::RolledBack { version, reason } => {
                self.report_failure(version, reason).await?;
                self.client
                    .clone()
                    .txn(Txn::new().and_then([delete]))
                    .await
                    .with_context(|| format!("cannot release {holder}"))?
            }
        };
        let lease = resp.op_responses().into_iter().find_map(|op| match op {
            TxnOpResponse::Delete(d) => d.prev_kvs().first().map(|kv| kv.lease()),
            _ => None,
        });
        if let Some(lease) = lease {
            tracing::info!("released the reboot slot {holder}");
            self.revoke_quietly(lease, &holder).await;
        }
        Ok(())
    }

    /// Revokes a holder's lease once its key is gone; an expired lease is
    /// the common case and not an error.
    async fn revoke_quietly(&self, lease: i64, key: &str) {
        if lease == 0 {
            return;
        }
        if let Err(e) = self.client.clone().lease_revoke(lease).await {
            tracing::debug!("revoking the lease of {key}: {e}");
        }
    }

    /// Deletes a holder key and revokes its lease (`osctl fleet unlock`).
    pub async fn delete_holder(&self, machine_id: &str) -> Result<()> {
        let key = self.keys.holder(&self.group, machine_id);
        let resp = self
            .client
            .clone()
            .delete(key.as_str(), Some(DeleteOptions::new().with_prev_key()))
            .await
            .with_context(|| format!("cannot delete {key}"))?;
        if let Some(kv) = resp.prev_kvs().first() {
            tracing::info!("released the reboot slot {key}");
            self.revoke_quietly(kv.lease(), &key).await;
        }
        Ok(())
    }

    /// Files a failure report for `version`; pauses the group when the
    /// reports reach its failure threshold.
    pub async fn report_failure(&self, version: &str, reason: &str) -> Result<()> {
        let g = &self.group;
        let key = self.keys.failure(g, version, &self.machine_id);
        let report = FailureReport {
            machine_id: self.machine_id.clone(),
            version: version.to_string(),
            reason: reason.to_string(),
            at: now_unix(),
        };
        let mut c = self.client.clone();
        c.put(key.as_str(), model::to_json(&report), None)
            .await
            .with_context(|| format!("cannot write {key}"))?;
        tracing::warn!("reported the failure of {version} to group {g}");
        // Compare-and-swap on the policy, so an operator's concurrent change
        // is not overwritten with stale values.
        for _ in 0..CAS_ATTEMPTS {
            let failures_key = self.keys.failures_of(g, version);
            let policy_key = self.keys.policy(g);
            let txn = Txn::new().and_then([
                TxnOp::get(
                    failures_key.as_str(),
                    Some(GetOptions::new().with_prefix().with_count_only()),
                ),
                TxnOp::get(policy_key.as_str(), None),
            ]);
            let resp = c.txn(txn).await.context("cannot count failure reports")?;
            let mut ops = resp.op_responses().into_iter();
            let count = range(ops.next().context("no count")?)?.count();
            let pol = range(ops.next().context("no policy")?)?;
            let (mut policy, cmp) = match pol.kvs().first() {
                Some(kv) => (
                    Policy::parse(&policy_key, kv.value())?,
                    Compare::mod_revision(policy_key.as_str(), CompareOp::Equal, kv.mod_revision()),
                ),
                None => (
                    Policy::default(),
                    Compare::create_revision(policy_key.as_str(), CompareOp::Equal, 0),
                ),
            };
            if policy.paused || count < i64::from(policy.failure_threshold) {
                return Ok(());
            }
            policy.paused = true;
            policy.paused_reason = Some(format!(
                "{count} hosts failed version {version} (threshold {})",
                policy.failure_threshold
            ));
            let txn = Txn::new().when([cmp]).and_then([TxnOp::put(
                policy_key.as_str(),
                policy.to_json(),
                None,
            )]);
            if c.txn(txn)
                .await
                .with_context(|| format!("cannot write {policy_key}"))?
                .succeeded()
            {
                tracing::error!(
                    "paused group {g}: {}",
                    policy.paused_reason.unwrap_or_default()
                );
                return Ok(());
            }
        }
        bail!("cannot pause group {g}: its policy kept changing under us")
    }
}

fn lock_spare<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Holding the lock never panics; a poisoned one still holds a valid value.
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The decision that needs no write: `Some` to answer now, `None` to try
/// to take a slot.
pub fn decide(st: &LockState, version: &str) -> Option<Acquire> {
    if st.holding {
        return Some(Acquire::Granted);
    }
    let p = &st.policy;
    if p.paused {
        let why = p.paused_reason.as_deref().unwrap_or("by an operator");
        return Some(Acquire::Wait(format!("the group is paused ({why})")));
    }
    if let Some(pin) = &p.pinned_version {
        if pin != version {
            return Some(Acquire::Wait(format!(
                "the group is pinned to {pin}, not {version}"
            )));
        }
    }
    // Safe mode: the first host to take a version takes it alone.
    let (limit, mode) = if st.proven {
        (p.max_holders as usize, "")
    } else {
        (1, " (safe mode: the first host takes a new version alone)")
    };
    if st.holders >= limit {
        return Some(Acquire::Wait(format!(
            "{} of {limit} reboot slots are held{mode}",
            st.holders
        )));
    }
    None
}

/// The engine's view of the semaphore. The engine is blocking code (it runs
/// in `spawn_blocking`), so each call is driven on the daemon's runtime
/// through its handle; never call these from async code.
#[derive(Debug, Clone)]
pub struct EtcdLock {
    pub fleet: Fleet,
    pub runtime: tokio::runtime::Handle,
}

impl RebootLock for EtcdLock {
    fn acquire(&self, version: &str) -> Result<bool> {
        match self.runtime.block_on(self.fleet.try_acquire(version))? {
            Acquire::Granted => Ok(true),
            Acquire::Wait(why) => {
                tracing::info!("no reboot slot yet: {why}");
                Ok(false)
            }
        }
    }

    fn release(&self, outcome: &Released) -> Result<()> {
        self.runtime.block_on(self.fleet.release(outcome))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decisions() {
        let base = LockState {
            policy: Policy {
                max_holders: 3,
                ..Policy::default()
            },
            holders: 2,
            holding: false,
            guard_version: 7,
            proven: true,
        };
        let with = |f: &dyn Fn(&mut LockState)| {
            let mut s = base.clone();
            f(&mut s);
            s
        };
        let wait = |s: &LockState, v: &str| match decide(s, v) {
            Some(Acquire::Wait(why)) => why,
            other => panic!("{other:?}"),
        };
        assert_eq!(decide(&base, "2.0"), None);
        let mine = with(&|s| s.holding = true);
        assert_eq!(decide(&mine, "2.0"), Some(Acquire::Granted));
        let full = with(&|s| s.holders = 3);
        assert!(wait(&full, "2.0").contains("3 of 3"));
        let paused = with(&|s| s.policy.paused = true);
        assert!(wait(&paused, "2.0").contains("paused"));
        // A holder keeps its slot even when the group pauses.
        let paused_mine = with(&|s| {
            s.policy.paused = true;
            s.holding = true;
        });
        assert_eq!(decide(&paused_mine, "2.0"), Some(Acquire::Granted));
        let pinned = with(&|s| s.policy.pinned_version = Some("1.5".into()));
        assert!(wait(&pinned, "2.0").contains("pinned to 1.5"));
        assert_eq!(decide(&pinned, "1.5"), None);
        let fresh = with(&|s| s.proven = false);
        assert!(wait(&fresh, "2.0").contains("safe mode"));
        let fresh_empty = with(&|s| {
            s.proven = false;
            s.holders = 0;
        });
        assert_eq!(decide(&fresh_empty, "2.0"), None);
    }
}
