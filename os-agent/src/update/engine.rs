//! The update engine: check a channel, apply a release to the inactive slot,
//! decide when to reboot, and make sense of the boot that follows. The daemon
//! and osctl both call in here; every step goes through the state machine
//! and is saved in state.json.
//!
//! Applying keeps this order (docs/update.md):
//! 1. refuse the booted version;
//! 2. remove every UKI but the booted one: any of them may point at the slot
//!    about to be overwritten;
//! 3. stream the root into the slot and through the verity tree builder;
//! 4. compare sizes, sha256 and the root hash with the signed manifest, write
//!    the hash area, fsync;
//! 5. name the slot's partitions after the root hash (GPT, fsync);
//! 6. install the UKI (temporary file, fsync, rename): only now is it bootable;
//! 7. record it as staged.
//!
//! A failure before 6 leaves the running slot untouched and nothing bootable
//! pointing at the half-written one. An interrupted download starts again
//! from zero on the next attempt.

use super::apply::{self, Rejection};
use super::channel::{self, Channel};
use super::fleet_lock::{RebootLock, Released};
use super::state::{Event, State};
use super::store::{self, now_unix, Rollback, Staged, UpdateState};
use crate::boot::{entries, secure_boot};
use crate::config::{Strategy, UpdateSettings};
use crate::host::Host;
use crate::status::{self, HostStatus};
use anyhow::{bail, Context, Result};
use ballast_common::manifest::{self, HostFacts, Manifest, Skip};
use ballast_common::version;
use std::cmp::Ordering;
use std::path::Path;
use std::time::Duration;

/// The architecture name manifests use for this build of the agent.
pub fn architecture() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "x86-64",
        "aarch64" => "arm64",
        other => other,
    }
}

/// What the engine needs to know about the running system.
#[derive(Debug, Clone)]
pub struct Booted {
    pub status: HostStatus,
    pub machine_id: String,
    pub boot_id: String,
}

pub fn booted(host: &dyn Host) -> Result<Booted> {
    let status = status::gather(host).context("cannot gather the host's status")?;
    let read = |p: &str| -> Result<String> {
        Ok(host
            .read_to_string(Path::new(p))
            .with_context(|| format!("cannot read {p}"))?
            .trim()
            .to_string())
    };
    Ok(Booted {
        status,
        machine_id: read("/etc/machine-id")?,
        boot_id: read("/proc/sys/kernel/random/boot_id")?,
    })
}

/// What became of a staged update, seen from the running boot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Assessment {
    /// Nothing is staged.
    Nothing,
    /// Staged in this very boot: waiting for the reboot.
    AwaitingReboot,
    /// Booted the staged version; boot assessment has not blessed it yet.
    Pending,
    /// Booted the staged version and it was blessed.
    Succeeded,
    /// Rebooted, but into an older version: the staged one used up its
    /// tries and systemd-boot fell back.
    RolledBack { version: String },
    /// Rebooted into an older version without systemd-boot having tried
    /// the staged one: its entry did not survive (a power cut), or the boot
    /// loader chose another entry. Not a verdict on the release.
    NotTried {
        version: String,
        evidence: entries::EntryEvidence,
    },
    /// The staged version never booted and could not be staged again: it is
    /// dropped without being marked failed, and the next check applies it anew.
    NeverBooted { version: String, why: String },
    /// Rebooted into something else (newer, or the operator's doing).
    Superseded,
}

/// Whether the booted entry has been blessed (its file lost its counter).
/// Without boot counting (no systemd-boot, or an entry never counted) there
/// is nothing to wait for.
fn booted_entry_blessed(host: &dyn Host) -> Result<bool> {
    match entries::booted_file(host) {
        Ok(file) => Ok(entries::counter(&file).is_none()),
        Err(e) => {
            tracing::warn!("cannot tell whether this boot was blessed, assuming it was: {e:#}");
            Ok(true)
        }
    }
}

pub fn assess(host: &dyn Host, st: &UpdateState, b: &Booted) -> Result<Assessment> {
    let Some(staged) = &st.staged else {
        return Ok(Assessment::Nothing);
    };
    if staged.boot_id == b.boot_id {
        return Ok(Assessment::AwaitingReboot);
    }
    Ok(
        match version::compare(&b.status.image_version, &staged.version) {
            Ordering::Equal if booted_entry_blessed(host)? => Assessment::Succeeded,
            Ordering::Equal => Assessment::Pending,
            // Only the entry's counter proves systemd-boot tried the staged
            // version; without it this is not a failure of the release.
            Ordering::Less => match entries::evidence(
                host,
                &b.status.image_name,
                &staged.version,
                staged.uki_sha256.as_deref(),
            )? {
                entries::EntryEvidence::Tried { .. } => Assessment::RolledBack {
                    version: staged.version.clone(),
                },
                evidence => Assessment::NotTried {
                    version: staged.version.clone(),
                    evidence,
                },
            },
            Ordering::Greater => Assessment::Superseded,
        },
    )
}

/// Back to rest, from whichever state the staged update had reached.
fn settle(st: &mut UpdateState) -> Result<()> {
    if st.state.clone().next(Event::Settled).is_ok() {
        st.apply(Event::Settled)?;
    }
    Ok(())
}

/// Makes the state match the boot: an operation that died half-way is marked
/// failed; a staged update that booted and was blessed is done; one the host
/// fell back from is marked failed for good and its UKI removed. Call with
/// the update lock held. Returns the assessment.
pub fn reconcile(
    host: &dyn Host,
    st: &mut UpdateState,
    b: &Booted,
    fleet: &dyn RebootLock,
) -> Result<Assessment> {
    let before = st.clone();
    if st.state.in_flight() {
        let what = st.state.name();
        st.apply(Event::Fail(format!(
            "interrupted while {what} (the process stopped or the host went down); \
             the next attempt starts from the beginning"
        )))?;
    }
    let mut a = assess(host, st, b)?;
    if let Assessment::NotTried { version, evidence } = &a {
        a = match restage(host, st, b, evidence) {
            Ok(()) => assess(host, st, b)?,
            Err(e) => Assessment::NeverBooted {
                version: version.clone(),
                why: format!("{e:#}"),
            },
        };
    }
    match &a {
        Assessment::Nothing | Assessment::AwaitingReboot => {}
        Assessment::Pending => {
            if matches!(st.state, State::Staged | State::Rebooting) {
                st.apply(Event::BootedNew)?;
            }
        }
        Assessment::Succeeded => {
            let v = b.status.image_version.clone();
            tracing::info!(
                "update to {v} succeeded: booted slot {} and blessed",
                b.status.slot
            );
            st.last_result = Some(format!("updated to {v}"));
            unstage(host, st, fleet, Some(Released::Blessed { version: v }))?;
        }
        Assessment::RolledBack { version } => {
            let name = &b.status.image_name;
            let removed = entries::remove_version(host, name, version)?;
            tracing::error!(
                "version {version} failed its boot assessment: the host fell back to {} (slot {}); \
                 it is never tried again; removed {removed:?}",
                b.status.image_version,
                b.status.slot
            );
            st.mark_failed(version);
            let reason = "it did not pass boot assessment within its tries";
            st.last_rollback = Some(Rollback {
                version: version.clone(),
                to_version: b.status.image_version.clone(),
                at: now_unix(),
                reason: reason.into(),
            });
            let released = Released::RolledBack {
                version: version.clone(),
                reason: format!("fell back to {}: {reason}", b.status.image_version),
            };
            unstage(host, st, fleet, Some(released))?;
        }
        Assessment::NeverBooted { version, why } => {
            tracing::error!(
                "the staged {version} never booted and cannot be staged again: {why}; \
                 it is not marked failed, the next check applies it again"
            );
            st.last_result = Some(format!("{version} never booted: {why}"));
            let released = Released::NeverBooted {
                version: version.clone(),
            };
            unstage(host, st, fleet, Some(released))?;
        }
        // Settled into AwaitingReboot by `restage`, or failed into NeverBooted.
        Assessment::NotTried { .. } => {}
        Assessment::Superseded => {
            tracing::info!(
                "booted {} instead of the staged {}: dropping the staged update",
                b.status.image_version,
                st.staged
                    .as_ref()
                    .map(|s| s.version.as_str())
                    .unwrap_or("?")
            );
            unstage(host, st, fleet, None)?;
        }
    }
    if *st != before {
        store::save(host, st)?;
    }
    Ok(a)
}

/// How many boots may pass over an intact, untried staged entry before the
/// agent stops rebooting for it (the boot loader keeps choosing another).
const UNTRIED_BOOTS: u32 = 2;

/// Stages again an update whose boot did not happen: over a slot that still
/// verifies against the staged root hash, the entry is written back from the
/// copy on /var if the power cut took it, and the update waits for its
/// reboot as if staged in this boot.
fn restage(
    host: &dyn Host,
    st: &mut UpdateState,
    b: &Booted,
    evidence: &entries::EntryEvidence,
) -> Result<()> {
    let staged = st
        .staged
        .clone()
        .context("nothing is staged (state.json changed under the agent)")?;
    let mut restaged = staged.clone();
    match evidence {
        entries::EntryEvidence::Broken { why } => {
            tracing::warn!(
                "the boot entry of the staged {} did not survive ({why}): \
                 checking slot {} and writing the entry again",
                staged.version,
                staged.slot
            );
            let want = staged
                .uki_sha256
                .as_deref()
                .context("the staged UKI's sha256 was not recorded")?;
            let uki = host
                .read(Path::new(store::STAGED_UKI))
                .with_context(|| format!("cannot read {}", store::STAGED_UKI))?;
            let got = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(&uki));
            if got != want {
                bail!(
                    "{} has sha256 {got}, the staged UKI {want}",
                    store::STAGED_UKI
                );
            }
            if b.status.slot == staged.slot {
                bail!("slot {} is the booted one", staged.slot);
            }
            let target = apply::target(host, b.status.slot)?;
            apply::reverify_slot(host, &target, &staged.root_hash)?;
            apply::set_partuuids(host, &target, &staged.root_hash)?;
            entries::remove_version(host, &b.status.image_name, &staged.version)?;
            restaged.uki_file =
                entries::install(host, &b.status.image_name, &staged.version, &uki)?;
        }
        entries::EntryEvidence::Untried { file } => {
            let boots = staged.untried_boots.saturating_add(1);
            if boots >= UNTRIED_BOOTS {
                bail!("systemd-boot chose another entry over {file} in {boots} boots");
            }
            tracing::warn!(
                "the boot loader did not try the staged {} ({file} is whole and untried): \
                 it waits for a reboot again",
                staged.version
            );
            restaged.untried_boots = boots;
        }
        entries::EntryEvidence::Tried { .. } => bail!("the staged entry was tried"),
    }
    restaged.boot_id = b.boot_id.clone();
    tracing::info!(
        "staged {} in slot {} again as {}; it boots next",
        restaged.version,
        restaged.slot,
        restaged.uki_file
    );
    st.staged = Some(restaged);
    st.apply(Event::Restaged)?;
    Ok(())
}

/// The end of a staged update, however it went: nothing staged, back to
/// rest, the kept copy of its UKI removed, and the fleet's reboot slot given
/// back with what became of the version.
fn unstage(
    host: &dyn Host,
    st: &mut UpdateState,
    fleet: &dyn RebootLock,
    released: Option<Released>,
) -> Result<()> {
    st.staged = None;
    settle(st)?;
    host.remove_file(Path::new(store::STAGED_UKI))
        .with_context(|| format!("cannot remove {}", store::STAGED_UKI))?;
    if let Some(r) = released {
        fleet
            .release(&r)
            .context("cannot release the fleet reboot lock")?;
    }
    Ok(())
}

/// The result of weighing the channel's manifest.
#[derive(Debug)]
pub struct Checked {
    pub manifest: Manifest,
    /// `Ok` if this host takes it now.
    pub verdict: Result<(), Skip>,
    /// When this host is due in the staged rollout.
    pub due_at: u64,
}

/// Skips that are not a reason to worry: the channel just has nothing for us.
fn benign(s: &Skip) -> bool {
    matches!(
        s,
        Skip::NotNewer { .. } | Skip::KnownBad(_) | Skip::NotDue { .. }
    )
}

fn open_channel(settings: &UpdateSettings) -> Result<Channel> {
    let url = settings.channel_url.as_deref().context(
        "updates are off: no update.channel_url in the agent configuration \
         (/etc/ballast/agent.d/*.toml)",
    )?;
    // Redirects may lead anywhere (a CDN): what is fetched is verified by
    // signature and hash, not by where it came from.
    let opts = settings.http.options(crate::http::Redirects::AnyHost);
    Channel::with_options(url, &settings.channel, &opts)
}

/// Fetches, verifies and weighs the channel's manifest. Changes nothing.
pub fn check(
    host: &dyn Host,
    settings: &UpdateSettings,
    st: &UpdateState,
    b: &Booted,
    failed_extra: Option<&str>,
) -> Result<Checked> {
    let now = now_unix();
    clock_is_plausible(now, b.status.image_built_at_unix)?;
    let channel = open_channel(settings)?;
    let keys = channel::trusted_keys(host)?;
    let m = channel.fetch_manifest(&keys)?;
    let mut failed = st.failed_versions.clone();
    failed.extend(failed_extra.map(str::to_string));
    let facts = HostFacts {
        now,
        channel: &settings.channel,
        name: &b.status.image_name,
        architecture: architecture(),
        booted_version: &b.status.image_version,
        last_sequence: st.sequence_of(&settings.channel),
        failed_versions: &failed,
        machine_id: &b.machine_id,
    };
    let verdict = manifest::check(&m, &facts);
    let due_at = manifest::due_at(&m, &b.machine_id);
    Ok(Checked {
        manifest: m,
        verdict,
        due_at,
    })
}

/// A clock before the booted image was built is wrong (no RTC, no time
/// sync yet): expiry and rollout times, and TLS certificates, cannot be
/// judged by it, so the check waits for the time instead of failing on
/// whatever a wrong clock makes of them.
pub fn clock_is_plausible(now: u64, built: Option<u64>) -> Result<()> {
    match built {
        Some(built) if now < built => bail!(
            "the clock says {now} (unix), before this image was built ({built}): not checking \
             for updates until the time is set (systemd-timesyncd, docs/update.md)"
        ),
        _ => Ok(()),
    }
}

/// How an update run was started.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// The daemon's timer: everything, the rollout included, must allow it.
    Poll,
    /// `osctl update apply`: now, whatever the rollout says.
    Now,
}

#[derive(Debug, Clone)]
pub enum Outcome {
    /// Nothing to do, and why.
    NothingToDo(String),
    /// A release is staged (now, or before).
    Staged(Staged),
}

/// Progress of the payload download: (compressed bytes so far, total).
pub type ProgressFn<'a> = &'a mut dyn FnMut(u64, u64);

/// Checks the channel and, if it has a release for this host, applies it.
/// Takes the update lock; records every step in state.json.
pub fn run(
    host: &dyn Host,
    settings: &UpdateSettings,
    mode: Mode,
    fleet: &dyn RebootLock,
    progress: ProgressFn,
) -> Result<Outcome> {
    let _lock = match mode {
        Mode::Poll => store::lock(host)?,
        Mode::Now => store::lock_wait(host)?,
    };
    let mut st = store::load(host)?;
    let b = booted(host)?;
    let assessment = reconcile(host, &mut st, &b, fleet)?;
    if assessment == Assessment::Pending {
        bail!(
            "this boot of {} has not been blessed yet (boot assessment runs the health check first); \
             try again once it has",
            b.status.image_version
        );
    }
    if st.state == State::Rebooting {
        bail!("a reboot into the staged update was requested already");
    }
    st.apply(Event::Check)?;
    store::save(host, &mut st)?;
    let result = check_and_apply(host, settings, mode, &mut st, &b, progress);
    st.last_check = Some(now_unix());
    match &result {
        Ok(Outcome::NothingToDo(why)) => {
            st.last_result = Some(why.clone());
            st.last_error = None;
        }
        Ok(Outcome::Staged(s)) => {
            st.last_result = Some(format!("staged {} in slot {}", s.version, s.slot));
            st.last_error = None;
        }
        Err(e) => {
            let reason = format!("{e:#}");
            tracing::error!("update failed: {reason}");
            st.last_error = Some(reason.clone());
            st.apply(Event::Fail(reason))?;
        }
    }
    store::save(host, &mut st)?;
    result
}

fn check_and_apply(
    host: &dyn Host,
    settings: &UpdateSettings,
    mode: Mode,
    st: &mut UpdateState,
    b: &Booted,
    progress: ProgressFn,
) -> Result<Outcome> {
    let c = check(host, settings, st, b, None)?;
    let m = &c.manifest;
    match &c.verdict {
        Err(Skip::NotDue { .. }) if mode == Mode::Now => {}
        Err(skip) => {
            let why = format!("{} {} (sequence {}): {skip}", m.name, m.version, m.sequence);
            if !benign(skip) {
                bail!("rejected {why}");
            }
            // Authentic and current, just not for us now: remember its sequence.
            st.accept_sequence(&m.channel, m.sequence);
            st.apply(Event::NothingToDo)?;
            return Ok(Outcome::NothingToDo(why));
        }
        Ok(()) => {}
    }
    st.accept_sequence(&m.channel, m.sequence);
    if let Some(s) = st.staged.clone() {
        if s.version == m.version && s.boot_id == b.boot_id {
            st.apply(Event::AlreadyStaged)?;
            return Ok(Outcome::Staged(s));
        }
    }
    let channel = open_channel(settings)?;
    let staged = apply_release_from(host, st, b, m, &channel, progress)?;
    Ok(Outcome::Staged(staged))
}

/// Steps 1-7 of the module docs, for a manifest already verified and weighed.
pub fn apply_release_from(
    host: &dyn Host,
    st: &mut UpdateState,
    b: &Booted,
    m: &Manifest,
    channel: &Channel,
    progress: ProgressFn,
) -> Result<Staged> {
    // 1. The booted release: same root hash, same PARTUUIDs. Never.
    if m.version == b.status.image_version || m.root_hash == b.status.root_hash {
        return Err(Rejection::SameVersion {
            version: m.version.clone(),
            root_hash: m.root_hash.clone(),
        }
        .into());
    }
    let target = apply::target(host, b.status.slot)?;
    apply::check_fits(m, &target)?;
    let keep = entries::booted_file(host).context("cannot tell which UKI is running")?;
    tracing::info!(
        "applying {} {} (sequence {}) to slot {} ({})",
        m.name,
        m.version,
        m.sequence,
        target.slot,
        target.root.dev_path().display()
    );
    st.apply(Event::Found { total: m.root.size })?;
    st.staged = None;
    store::save(host, st)?;

    // 2. Nothing bootable may point at the slot we are about to overwrite.
    let removed = entries::remove_all_except(host, &keep)?;
    if !removed.is_empty() {
        tracing::info!("removed boot entries {removed:?} (kept the booted {keep})");
    }

    // 3-4. Stream, hash, compare.
    let total = m.root.size;
    let mut throttle = store::Throttle::new(Duration::from_secs(2));
    let mut save_error = None;
    let tree = {
        let mut report = |bytes: u64| {
            progress(bytes, total);
            if (throttle.due() || bytes == total)
                && st.apply(Event::Progress { bytes, total }).is_ok()
            {
                if let Err(e) = store::save(host, st) {
                    save_error.get_or_insert(e);
                }
            }
        };
        apply::write_root(host, channel, m, &target, &mut report)?
    };
    if let Some(e) = save_error {
        tracing::warn!("could not record download progress: {e:#}");
    }
    st.apply(Event::Downloaded)?;
    store::save(host, st)?;
    apply::write_hash_area(host, &target, &tree)?;

    // 5. The slot answers to its new root hash.
    apply::set_partuuids(host, &target, &m.root_hash)?;

    // 6. Only a verified slot gets a boot entry, and only for a UKI this
    // host's firmware will start. A copy stays on /var until the update
    // settles, to put the entry back if a power cut takes it.
    let uki = apply::fetch_uki(channel, m)?;
    secure_boot::check_uki(host, &uki, &format!("the UKI of {} {}", m.name, m.version))?;
    host.write_atomic(Path::new(store::STAGED_UKI), &uki)
        .with_context(|| format!("cannot write {}", store::STAGED_UKI))?;
    let uki_file = entries::install(host, &m.name, &m.version, &uki)?;

    // 7.
    let staged = Staged {
        version: m.version.clone(),
        root_hash: m.root_hash.clone(),
        slot: target.slot,
        uki_file,
        uki_sha256: Some(m.uki.sha256.clone()),
        untried_boots: 0,
        boot_id: b.boot_id.clone(),
        staged_at: now_unix(),
    };
    tracing::info!(
        "staged {} in slot {} as {}; it boots next",
        staged.version,
        staged.slot,
        staged.uki_file
    );
    st.staged = Some(staged.clone());
    st.apply(Event::Verified)?;
    store::save(host, st)?;
    Ok(staged)
}

/// What the reboot strategy says about a staged update.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RebootDecision {
    /// Nothing staged in this boot.
    NothingStaged,
    /// The reboot was requested.
    Rebooting,
    /// Not now: why, and when to ask again (Unix seconds), if known.
    Wait { why: String, until: Option<u64> },
}

/// Reboots into a staged update if the strategy allows it now.
pub fn maybe_reboot(
    host: &dyn Host,
    settings: &UpdateSettings,
    fleet: &dyn RebootLock,
    now: u64,
) -> Result<RebootDecision> {
    let _lock = store::lock(host)?;
    let mut st = store::load(host)?;
    if st.state != State::Staged {
        return Ok(RebootDecision::NothingStaged);
    }
    match &settings.strategy {
        Strategy::Immediate => {}
        Strategy::Window(w) if w.contains(now) => {}
        Strategy::Window(w) => {
            return Ok(RebootDecision::Wait {
                why: format!("outside the maintenance window {}", w.describe()),
                until: Some(w.next_opening(now)),
            })
        }
        Strategy::FleetLock(Some(w)) if !w.contains(now) => {
            return Ok(RebootDecision::Wait {
                why: format!("outside the maintenance window {}", w.describe()),
                until: Some(w.next_opening(now)),
            })
        }
        Strategy::FleetLock(_) => {
            let version = st
                .staged
                .as_ref()
                .map(|s| s.version.clone())
                .context("state is staged but no staged update is recorded")?;
            if !fleet
                .acquire(&version)
                .context("cannot take the fleet reboot lock")?
            {
                return Ok(RebootDecision::Wait {
                    why: "the fleet reboot lock is held by other hosts".into(),
                    until: None,
                });
            }
        }
    }
    request_reboot(host, &mut st)?;
    Ok(RebootDecision::Rebooting)
}

/// Records Rebooting (if an update is staged) and asks systemd to reboot.
pub fn request_reboot(host: &dyn Host, st: &mut UpdateState) -> Result<()> {
    if st.state == State::Staged {
        st.apply(Event::Reboot)?;
        store::save(host, st)?;
    }
    tracing::info!("rebooting");
    let out = host
        .run("systemctl", &["reboot"])
        .context("cannot run systemctl reboot")?;
    if !out.success() {
        let why = format!("systemctl reboot failed: {}", out.describe());
        if st.state == State::Rebooting {
            st.apply(Event::Fail(why.clone()))?;
            store::save(host, st)?;
        }
        bail!(why);
    }
    Ok(())
}
