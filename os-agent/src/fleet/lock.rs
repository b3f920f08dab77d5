//! The reboot lock: a counting semaphore per group in etcd.
//!
//! A host holds a slot through two keys written in one transaction on one
//! lease of the lock TTL: its holder key `groups/<g>/lock/holders/<m>` (who,
//! for which version, since when: what operators read) and a numbered slot
//! key `groups/<g>/lock/slots/<i>`, `i` in `0..max_holders`, whose value is
//! the machine id. The lease is not kept alive, so a host that never comes
//! back frees its slot when the lease runs out.
//!
//! Taking a slot: read the policy, the slot keys, whether this host holds
//! one and whether the version is proven (one transaction); then, in one
//! transaction that holds only if the host's holder key does not exist and
//! the policy is the one read, try up to [`MAX_TRIED`] free slot numbers
//! below `max_holders` (from a random one on), each in a transaction nested
//! in the failure branch of the one before, creating the first slot key
//! that does not exist. Slots freed together are refilled in parallel
//! rather than one compare-and-swap at a time (which a single guard key
//! compared by every taker did), and hosts that ask at once for the same
//! slots are applied one after the other by etcd, each getting a different
//! one. A host with a watched view of the group ([`super::view`]) skips the
//! first read when its view shows a free slot (the view is an older
//! snapshot than a read, but the argument below holds for any snapshot,
//! since the take compares the policy's revision), and when its take gets
//! no slot it waits in the group's queue for its turn to come again. A host
//! without a view decides again on the fresh lock state the failed take
//! returns (or reads it), up to [`CAS_ATTEMPTS`] times.
//!
//! Why this never lets more than `max_holders` hosts hold: every successful
//! take was made under the current policy (the transaction compares the
//! policy's revision) and so used a slot below the current maximum, and slot
//! keys are unique. Only hosts that took their slot before the maximum was
//! lowered can hold slots at or above it; while any does, nobody takes a
//! new slot (they keep theirs until they release it). Safe mode (the first
//! host of a version takes it alone) takes slot 0 only if no slot key exists
//! at all, compared over the whole slot range in the same transaction.
//!
//! Releasing deletes both keys, compared against the revisions read, so a
//! host whose lease ran out never deletes a slot another host has taken
//! since; `osctl fleet unlock` does the same.

use super::model::{self, FailureReport, Holder, Policy};
use super::{now_unix, Fleet, Keys};
use crate::update::fleet_lock::{RebootLock, Released};
use anyhow::{bail, Context, Result};
use etcd_client::{
    Client, Compare, CompareOp, DeleteOptions, GetOptions, PutOptions, Txn, TxnOp, TxnOpResponse,
    TxnResponse,
};
use std::collections::BTreeSet;

/// How many times a host without a view tries to take a slot (or any host
/// to write the policy) before it waits for its next turn.
const CAS_ATTEMPTS: u32 = 5;

/// Why a host that lost the slots it tried waits.
const CONTENTION: &str = "other hosts took the free slots first (contention)";

/// How long a release is retried before the error goes to the caller.
pub const RELEASE_RETRIES_FOR: std::time::Duration = std::time::Duration::from_secs(15);

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
    /// The policy key's revision (0: none written). A take is conditional on
    /// it, so no host takes a slot under a policy that changed since it read.
    pub policy_rev: i64,
    /// The slot numbers held.
    pub slots: BTreeSet<u32>,
    /// Slot keys that are not a slot number (written by hand): counted as
    /// held, and, as slots above the maximum, they stop new takes.
    pub odd_slots: usize,
    /// Whether this host holds a slot.
    pub holding: bool,
    /// Whether a host of the group already proved the version.
    pub proven: bool,
}

impl LockState {
    /// How many hosts hold a slot.
    pub fn holders(&self) -> usize {
        self.slots.len() + self.odd_slots
    }
}

/// What to do about a request for a slot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Answer now, without a write.
    Answer(Acquire),
    /// Take slot 0, on condition that no slot is held (safe mode).
    Alone,
    /// Take one of these free slots.
    AnyOf(Vec<u32>),
}

pub(crate) fn range(r: TxnOpResponse) -> Result<etcd_client::GetResponse> {
    match r {
        TxnOpResponse::Get(g) => Ok(g),
        other => bail!("etcd answered a range request with {other:?}"),
    }
}

/// At most this many free slots are tried by one take ([`Fleet::take`]).
const MAX_TRIED: usize = 8;

/// What a take did.
#[derive(Debug)]
enum Taken {
    /// This slot is the host's now.
    Slot(u32),
    /// Nothing taken: the lock state now, when the take failed on the
    /// policy or the holder key (etcd answered it in the same round trip);
    /// `None` when every slot tried was taken.
    Lost(Option<LockState>),
}

/// Which of `tried` the chain of nested transactions of a take created:
/// the first level whose condition held.
fn taken_in_chain(resp: TxnResponse, tried: &[u32]) -> Result<Option<u32>> {
    let mut ops = resp.op_responses();
    for &i in tried {
        let Some(TxnOpResponse::Txn(level)) = ops.into_iter().next() else {
            bail!("etcd answered a nested take without its transaction");
        };
        if level.succeeded() {
            return Ok(Some(i));
        }
        ops = level.op_responses();
    }
    Ok(None)
}

/// The slot number of a slot key, if it is one.
fn slot_number(key: &[u8], prefix: &str) -> Option<u32> {
    let n = std::str::from_utf8(key).ok()?.strip_prefix(prefix)?;
    // Exactly how `Keys::slot` writes it, so "07" is not taken for 7.
    n.parse::<u32>().ok().filter(|i| i.to_string() == n)
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

    /// The reads that make a [`LockState`], as transaction operations: on
    /// their own, and as the failure branch of a take.
    fn state_reads(&self, version: &str) -> Vec<TxnOp> {
        let g = &self.group;
        let count = || GetOptions::new().with_count_only();
        vec![
            TxnOp::get(self.keys.policy(g), None),
            TxnOp::get(
                self.keys.slots(g),
                Some(GetOptions::new().with_prefix().with_keys_only()),
            ),
            TxnOp::get(self.keys.holder(g, &self.machine_id), Some(count())),
            TxnOp::get(self.keys.proven(g, version), Some(count())),
        ]
    }

    fn parse_state(&self, resp: TxnResponse) -> Result<LockState> {
        let policy_key = self.keys.policy(&self.group);
        let slots_prefix = self.keys.slots(&self.group);
        let mut ops = resp.op_responses().into_iter();
        let mut next = || ops.next().context("etcd answered fewer reads than asked");
        let (policy, policy_rev) = match range(next()?)?.kvs().first() {
            Some(kv) => (Policy::parse(&policy_key, kv.value())?, kv.mod_revision()),
            None => (Policy::default(), 0),
        };
        let mut slots = BTreeSet::new();
        let mut odd_slots = 0;
        for kv in range(next()?)?.kvs() {
            match slot_number(kv.key(), &slots_prefix) {
                Some(i) => {
                    slots.insert(i);
                }
                None => odd_slots += 1,
            }
        }
        let holding = range(next()?)?.count() > 0;
        let proven = range(next()?)?.count() > 0;
        Ok(LockState {
            policy,
            policy_rev,
            slots,
            odd_slots,
            holding,
            proven,
        })
    }

    /// Reads everything a decision needs in one transaction.
    pub async fn lock_state(&self, version: &str) -> Result<LockState> {
        let resp = self
            .client
            .clone()
            .txn(Txn::new().and_then(self.state_reads(version)))
            .await
            .with_context(|| format!("cannot read the reboot lock of group {}", self.group))?;
        self.parse_state(resp)
    }

    /// Takes a reboot slot to boot `version`, if the group's policy and the
    /// number of holders allow it. An error (etcd unreachable, no quorum)
    /// is never a grant: the host does not reboot on it.
    pub async fn try_acquire(&self, version: &str) -> Result<Acquire> {
        let answer = self.decide_and_take(version).await;
        if answer.is_err() {
            self.suspect();
        }
        answer
    }

    async fn decide_and_take(&self, version: &str) -> Result<Acquire> {
        model::check_version(version).map_err(anyhow::Error::msg)?;
        // A view that shows a free slot is as good a start as a read: the
        // take checks in etcd everything that makes it safe, and a failed
        // one returns the fresh state. A host in the queue whose view shows
        // no slot for it, or that stands far back in a moving queue, waits
        // without asking: the view wakes it when its turn comes. Any other
        // answer is read from etcd.
        let viewed = self.view.as_ref().and_then(|v| {
            let v = v.borrow();
            let st = v.state(&self.machine_id, version)?;
            let queued = v.queued(&self.machine_id) == Some(version);
            let yields = queued && v.yields(&self.machine_id, version);
            Some((st, queued, yields))
        });
        let mut st = match viewed {
            Some((st, queued, yields)) if !st.holding => match decide(&st, version) {
                Decision::Answer(Acquire::Wait(why)) if queued => return Ok(Acquire::Wait(why)),
                Decision::Answer(_) => self.lock_state(version).await?,
                _ if yields => {
                    let why = "the free slots are for the hosts before it in the queue";
                    return Ok(Acquire::Wait(why.into()));
                }
                _ => st,
            },
            _ => self.lock_state(version).await?,
        };
        for _ in 0..CAS_ATTEMPTS {
            let slots: Option<Vec<u32>> = match decide(&st, version) {
                Decision::Answer(Acquire::Wait(why)) => {
                    return Ok(self.wait_in_queue(version, why).await)
                }
                Decision::Answer(a) => return Ok(a),
                Decision::Alone => None,
                // Several free slots, from a random one on, tried in
                // order by one request: hosts that ask at once each get one.
                Decision::AnyOf(free) => {
                    let from = random_below(free.len());
                    let n = free.len().min(MAX_TRIED);
                    Some(free.iter().cycle().skip(from).take(n).copied().collect())
                }
            };
            match self.take(version, &st, slots.as_deref()).await? {
                Taken::Slot(i) => {
                    tracing::info!(
                        "took reboot slot {i} of group {} for {version} ({} of {} held before)",
                        self.group,
                        st.holders(),
                        st.policy.max_holders
                    );
                    return Ok(Acquire::Granted);
                }
                // A host with a view waits for its turn again: its view
                // wakes it when it is at the front of the queue. Deciding
                // again on a fresh read instead would race the hosts before
                // it for the slots it just lost (at 10,000 hosts, views
                // behind under load, five failed takes and reads a host).
                Taken::Lost(fresh) if self.view.is_some() => {
                    return Ok(match fresh.map(|st| decide(&st, version)) {
                        // It holds a slot already (an answer lost on the way).
                        Some(Decision::Answer(a @ Acquire::Granted)) => a,
                        Some(Decision::Answer(Acquire::Wait(why))) => {
                            self.wait_in_queue(version, why).await
                        }
                        _ => self.wait_in_queue(version, CONTENTION.into()).await,
                    });
                }
                // Other hosts took those slots first, or the policy changed:
                // decide again on what etcd answered, or on a fresh read.
                Taken::Lost(Some(fresh)) => st = fresh,
                Taken::Lost(None) => st = self.lock_state(version).await?,
            }
        }
        Ok(self.wait_in_queue(version, CONTENTION.into()).await)
    }

    /// Puts this host in the group's queue of hosts waiting for a slot for
    /// `version` ([`super::view`]), unless its view shows it there already,
    /// and answers Wait. The queue only orders who asks first, so a failed
    /// put is logged, not returned: the host asks again at its next round.
    async fn wait_in_queue(&self, version: &str, why: String) -> Acquire {
        let (Some(view), Some(registered)) = (&self.view, &self.registered) else {
            return Acquire::Wait(why);
        };
        let Some(lease) = registered.borrow().lease else {
            return Acquire::Wait(why);
        };
        if view.borrow().queued(&self.machine_id) == Some(version) {
            return Acquire::Wait(why);
        }
        let key = self.keys.queued(&self.group, &self.machine_id);
        let put = self
            .client
            .clone()
            .put(
                key.as_str(),
                version,
                Some(PutOptions::new().with_lease(lease)),
            )
            .await;
        if let Err(e) = put {
            self.suspect();
            tracing::warn!("cannot queue for a reboot slot at {key}: {e}");
        }
        Acquire::Wait(why)
    }

    /// Takes this host out of the group's queue (it staged nothing any more).
    pub async fn leave_queue(&self) -> Result<()> {
        let key = self.keys.queued(&self.group, &self.machine_id);
        self.client
            .clone()
            .delete(key.as_str(), None)
            .await
            .with_context(|| format!("cannot delete {key}"))?;
        Ok(())
    }

    /// Creates the holder key and the key of the first of `slots` that is
    /// free (`None`: slot 0, on condition that no slot is held), in one
    /// transaction: each slot is a transaction nested in the failure branch
    /// of the one before, so hosts that ask at once for the same free slots
    /// are served one after the other by etcd and each gets a different
    /// one, instead of all but one losing and asking again.
    async fn take(&self, version: &str, st: &LockState, slots: Option<&[u32]>) -> Result<Taken> {
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
        let g = &self.group;
        let holder_key = self.keys.holder(g, &self.machine_id);
        let holder = Holder {
            machine_id: self.machine_id.clone(),
            version: version.to_string(),
            since: now_unix(),
        };
        let on_lease = || Some(PutOptions::new().with_lease(lease));
        let grant = |i: u32| {
            vec![
                TxnOp::put(self.keys.slot(g, i), self.machine_id.as_str(), on_lease()),
                TxnOp::put(holder_key.as_str(), model::to_json(&holder), on_lease()),
                // Out of the queue in the same revision the slot is taken.
                TxnOp::delete(self.keys.queued(g, &self.machine_id), None),
            ]
        };
        let mut when = vec![
            Compare::create_revision(holder_key.as_str(), CompareOp::Equal, 0),
            Compare::mod_revision(self.keys.policy(g), CompareOp::Equal, st.policy_rev),
        ];
        let tried: Vec<u32> = match slots {
            // Every key in the slot range must not exist: none held.
            None => {
                when.push(
                    Compare::create_revision(self.keys.slots(g), CompareOp::Equal, 0).with_prefix(),
                );
                vec![0]
            }
            Some(slots) => slots.to_vec(),
        };
        let then = match slots {
            None => grant(0),
            Some(_) => {
                // The last slot innermost.
                let mut chain: Option<Txn> = None;
                for &i in tried.iter().rev() {
                    let free = Compare::create_revision(self.keys.slot(g, i), CompareOp::Equal, 0);
                    let mut t = Txn::new().when([free]).and_then(grant(i));
                    if let Some(inner) = chain.take() {
                        t = t.or_else([TxnOp::txn(inner)]);
                    }
                    chain = Some(t);
                }
                chain.map(TxnOp::txn).into_iter().collect()
            }
        };
        let txn = Txn::new()
            .when(when)
            .and_then(then)
            .or_else(self.state_reads(version));
        let what = format!("a slot of {} and {holder_key}", self.keys.slots(g));
        let resp = c
            .txn(txn)
            .await
            .with_context(|| format!("cannot write {what}"))?;
        let fresh = if !resp.succeeded() {
            Some(self.parse_state(resp)?)
        } else if slots.is_none() {
            return Ok(Taken::Slot(0));
        } else {
            match taken_in_chain(resp, &tried)? {
                Some(i) => return Ok(Taken::Slot(i)),
                None => None,
            }
        };
        *super::lock(&self.spare_lease) = Some((lease, granted));
        Ok(Taken::Lost(fresh))
    }

    /// The spare lease, if it still has nearly all of its TTL. An older one
    /// is left to expire: it holds no keys.
    fn take_spare_lease(&self) -> Option<(i64, std::time::Instant)> {
        let (id, granted) = super::lock(&self.spare_lease).take()?;
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
    ///
    /// A failed try is retried with backoff for up to [`RELEASE_RETRIES_FOR`]:
    /// a member killed or hung fails the request sent to it, and the next
    /// try goes to another. Without the retry the host would keep a slot the
    /// group needs until its next update round (minutes), and a leader
    /// change in a rollout strands every slot whose release it caught.
    /// Giving back is idempotent (the report is a put, the pause and the
    /// deletes compare-and-swap), so a try that was done but not answered
    /// does no harm when repeated.
    pub async fn release(&self, outcome: &Released) -> Result<()> {
        let deadline = std::time::Instant::now() + RELEASE_RETRIES_FOR;
        let mut backoff = super::Backoff::new(
            std::time::Duration::from_millis(100),
            std::time::Duration::from_secs(2),
        );
        loop {
            let e = match self.give_back(outcome).await {
                Ok(()) => return Ok(()),
                Err(e) => e,
            };
            self.suspect();
            let wait = backoff.next_wait();
            if std::time::Instant::now() + wait >= deadline {
                return Err(e);
            }
            tracing::warn!(
                "cannot release the reboot slot of group {}: {e:#}; again in {wait:?}",
                self.group
            );
            tokio::time::sleep(wait).await;
        }
    }

    async fn give_back(&self, outcome: &Released) -> Result<()> {
        let prove = match outcome {
            Released::Blessed { version } => Some(version.as_str()),
            Released::NeverBooted { .. } => None,
            // The report (and the pause it may cause) goes first, so no
            // other host takes the freed slot to a version that just paused
            // its group.
            Released::RolledBack { version, reason } => {
                self.report_failure(version, reason).await?;
                None
            }
        };
        // The view knows this host's keys and their revisions: a delete on
        // them frees the slot in one round trip instead of a read and a
        // delete; if the view was behind, the delete fails and the read
        // follows.
        let known = self.view.as_ref().and_then(|v| {
            let held = v.borrow().held_by(&self.machine_id)?;
            let g = &self.group;
            let holder = (self.keys.holder(g, &self.machine_id), held.holder_rev);
            let slots = held
                .slots
                .into_iter()
                .map(|(i, rev)| (self.keys.slot(g, i), rev));
            let keys = std::iter::once(holder)
                .chain(slots)
                .map(|(k, rev)| (k.into_bytes(), rev))
                .collect();
            Some(KnownKeys {
                keys,
                lease: held.lease,
            })
        });
        let freed = free_slot(
            &self.client,
            &self.keys,
            &self.group,
            &self.machine_id,
            prove,
            known,
        )
        .await?;
        if freed {
            tracing::info!("released the reboot slot of group {}", self.group);
        }
        Ok(())
    }

    /// Frees `machine_id`'s slot (as `osctl fleet unlock` does).
    pub async fn delete_holder(&self, machine_id: &str) -> Result<()> {
        free_slot(
            &self.client,
            &self.keys,
            &self.group,
            machine_id,
            None,
            None,
        )
        .await?;
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

/// A host's lock keys with their revisions, and their lease.
#[derive(Debug, Clone)]
pub struct KnownKeys {
    pub keys: Vec<(Vec<u8>, i64)>,
    pub lease: i64,
}

/// Frees `machine_id`'s slot in `group`: deletes its holder key and every
/// slot key naming it, each on condition that it did not change since read
/// (a slot whose lease ran out may already be another host's), then revokes
/// their leases, which hold nothing else. With `prove`, first marks that
/// version proven if nobody did, so the slot is not freed into safe mode.
/// `known`: the keys with their revisions and their lease, if the caller
/// knows them (from a view); tried first, without the read. Whether there was anything to free.
pub async fn free_slot(
    client: &Client,
    keys: &Keys,
    group: &str,
    machine_id: &str,
    prove: Option<&str>,
    known: Option<KnownKeys>,
) -> Result<bool> {
    let mut c = client.clone();
    let holder = keys.holder(group, machine_id);
    let slots = keys.slots(group);
    let proving = || {
        prove.map(|v| {
            let proven = keys.proven(group, v);
            TxnOp::txn(
                Txn::new()
                    .when([Compare::create_revision(
                        proven.as_str(),
                        CompareOp::Equal,
                        0,
                    )])
                    .and_then([TxnOp::put(proven.as_str(), machine_id, None)]),
            )
        })
    };
    if let Some(KnownKeys { keys: known, lease }) = known {
        let txn = Txn::new()
            .when(
                known
                    .iter()
                    .map(|(k, rev)| Compare::mod_revision(k.clone(), CompareOp::Equal, *rev))
                    .collect::<Vec<_>>(),
            )
            .and_then(
                proving()
                    .into_iter()
                    .chain(
                        known
                            .iter()
                            .map(|(k, _)| TxnOp::delete(k.clone(), Some(DeleteOptions::new()))),
                    )
                    .collect::<Vec<_>>(),
            );
        let resp = c
            .txn(txn)
            .await
            .with_context(|| format!("cannot delete {holder}"))?;
        if resp.succeeded() {
            if let Err(e) = c.lease_revoke(lease).await {
                tracing::debug!("revoking the lease {lease:x} of {holder}: {e}");
            }
            return Ok(true);
        }
    }
    for _ in 0..CAS_ATTEMPTS {
        let reads = [
            TxnOp::get(holder.as_str(), None),
            TxnOp::get(slots.as_str(), Some(GetOptions::new().with_prefix())),
        ];
        let txn = match prove {
            // In the same round trip as the read.
            Some(v) => {
                let proven = keys.proven(group, v);
                Txn::new()
                    .when([Compare::create_revision(
                        proven.as_str(),
                        CompareOp::Equal,
                        0,
                    )])
                    .and_then(
                        [TxnOp::put(proven.as_str(), machine_id, None)]
                            .into_iter()
                            .chain(reads.clone())
                            .collect::<Vec<_>>(),
                    )
                    .or_else(reads)
            }
            None => Txn::new().and_then(reads),
        };
        let resp = c
            .txn(txn)
            .await
            .with_context(|| format!("cannot read {holder}"))?;
        let mut mine = Vec::new();
        for op in resp.op_responses() {
            let TxnOpResponse::Get(g) = op else { continue };
            for kv in g.kvs() {
                if kv.key() == holder.as_bytes() || kv.value() == machine_id.as_bytes() {
                    mine.push((kv.key().to_vec(), kv.mod_revision(), kv.lease()));
                }
            }
        }
        if mine.is_empty() {
            return Ok(false);
        }
        let txn = Txn::new()
            .when(
                mine.iter()
                    .map(|(k, rev, _)| Compare::mod_revision(k.clone(), CompareOp::Equal, *rev))
                    .collect::<Vec<_>>(),
            )
            .and_then(
                mine.iter()
                    .map(|(k, _, _)| TxnOp::delete(k.clone(), Some(DeleteOptions::new())))
                    .collect::<Vec<_>>(),
            );
        if c.txn(txn)
            .await
            .with_context(|| format!("cannot delete {holder}"))?
            .succeeded()
        {
            let leases: BTreeSet<i64> = mine.iter().map(|(_, _, l)| *l).collect();
            for lease in leases.into_iter().filter(|l| *l != 0) {
                // An expired lease is the common case and not an error.
                if let Err(e) = c.lease_revoke(lease).await {
                    tracing::debug!("revoking the lease {lease:x} of {holder}: {e}");
                }
            }
            return Ok(true);
        }
    }
    bail!("cannot free the reboot slot of {machine_id} in group {group}: it kept changing")
}

/// A random number in `0..n` (`n` > 0).
fn random_below(n: usize) -> usize {
    (uuid::Uuid::new_v4().as_u128() % n.max(1) as u128) as usize
}

/// What to do about a request for a slot for `version`, given the lock
/// state: answer now, or which slot to try to take.
pub fn decide(st: &LockState, version: &str) -> Decision {
    let wait = |why: String| Decision::Answer(Acquire::Wait(why));
    if st.holding {
        return Decision::Answer(Acquire::Granted);
    }
    let p = &st.policy;
    if p.paused {
        let why = p.paused_reason.as_deref().unwrap_or("by an operator");
        return wait(format!("the group is paused ({why})"));
    }
    if let Some(pin) = &p.pinned_version {
        if pin != version {
            return wait(format!("the group is pinned to {pin}, not {version}"));
        }
    }
    let held = st.holders();
    // Safe mode: the first host to take a version takes it alone.
    if !st.proven {
        if held > 0 {
            return wait(format!(
                "{held} of 1 reboot slots are held (safe mode: the first host takes a new version alone)"
            ));
        }
        return Decision::Alone;
    }
    let max = p.max_holders;
    if held >= max as usize {
        return wait(format!("{held} of {max} reboot slots are held"));
    }
    let above = st.odd_slots + st.slots.range(max..).count();
    if above > 0 {
        return wait(format!(
            "{above} hosts hold slots above the maximum of {max} (it was lowered while they held \
             them); no new slot until they release theirs"
        ));
    }
    // The lowest free slots only: `max_holders` comes from etcd and may be
    // anything up to u32::MAX, which must not size a list. A few choices are
    // enough to spread hosts that ask at once over different slots.
    Decision::AnyOf(
        (0..max)
            .filter(|i| !st.slots.contains(i))
            .take(MAX_CHOICES)
            .collect(),
    )
}

/// At most this many free slots to start a take from, at random.
const MAX_CHOICES: usize = 64;

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
            policy_rev: 4,
            slots: [0, 2].into(),
            odd_slots: 0,
            holding: false,
            proven: true,
        };
        let with = |f: &dyn Fn(&mut LockState)| {
            let mut s = base.clone();
            f(&mut s);
            s
        };
        let wait = |s: &LockState, v: &str| match decide(s, v) {
            Decision::Answer(Acquire::Wait(why)) => why,
            other => panic!("{other:?}"),
        };
        assert_eq!(decide(&base, "2.0"), Decision::AnyOf(vec![1]));
        let mine = with(&|s| s.holding = true);
        assert_eq!(decide(&mine, "2.0"), Decision::Answer(Acquire::Granted));
        let full = with(&|s| s.slots = [0, 1, 2].into());
        assert!(wait(&full, "2.0").contains("3 of 3"));
        let paused = with(&|s| s.policy.paused = true);
        assert!(wait(&paused, "2.0").contains("paused"));
        // A holder keeps its slot even when the group pauses.
        let paused_mine = with(&|s| {
            s.policy.paused = true;
            s.holding = true;
        });
        assert_eq!(
            decide(&paused_mine, "2.0"),
            Decision::Answer(Acquire::Granted)
        );
        let pinned = with(&|s| s.policy.pinned_version = Some("1.5".into()));
        assert!(wait(&pinned, "2.0").contains("pinned to 1.5"));
        assert_eq!(decide(&pinned, "1.5"), Decision::AnyOf(vec![1]));
        let fresh = with(&|s| s.proven = false);
        assert!(wait(&fresh, "2.0").contains("safe mode"));
        let fresh_empty = with(&|s| {
            s.proven = false;
            s.slots.clear();
        });
        assert_eq!(decide(&fresh_empty, "2.0"), Decision::Alone);
        // The maximum went from 5 to 3 while slots 3 and 4 were held: one
        // host is below the new maximum, but nobody takes a slot until the
        // hosts above it release theirs.
        let lowered = with(&|s| s.slots = [1, 4].into());
        assert!(wait(&lowered, "2.0").contains("1 hosts hold slots above the maximum of 3"));
        let odd = with(&|s| {
            s.slots = [0].into();
            s.odd_slots = 1;
        });
        assert!(wait(&odd, "2.0").contains("above the maximum"));
        let empty = with(&|s| s.slots.clear());
        assert_eq!(decide(&empty, "2.0"), Decision::AnyOf(vec![0, 1, 2]));
        // A policy allowing u32::MAX holders (from etcd) does not make a list
        // of four billion free slots.
        let unlimited = with(&|s| {
            s.policy.max_holders = u32::MAX;
            s.slots = [0, 2].into();
        });
        let Decision::AnyOf(free) = decide(&unlimited, "2.0") else {
            panic!("{:?}", decide(&unlimited, "2.0"))
        };
        assert_eq!(free.len(), MAX_CHOICES);
        assert_eq!(&free[..3], &[1, 3, 4]);
    }

    #[test]
    fn slot_numbers() {
        let p = "/b/groups/g/lock/slots/";
        assert_eq!(slot_number(b"/b/groups/g/lock/slots/7", p), Some(7));
        assert_eq!(slot_number(b"/b/groups/g/lock/slots/0", p), Some(0));
        for odd in ["07", "x", "", "-1", "7/8"] {
            let key = format!("{p}{odd}");
            assert_eq!(slot_number(key.as_bytes(), p), None, "{odd:?}");
        }
    }
}
