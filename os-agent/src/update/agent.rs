//! One round of the daemon's update loop: make sense of the boot, reboot into
//! a staged update when the strategy allows, and check the channel when due.
//! Blocking: the daemon runs it in `spawn_blocking`.

use super::engine::{self, Assessment, Mode, Outcome, RebootDecision};
use super::fleet_lock::RebootLock;
use super::store::{self, now_unix};
use crate::config;
use crate::host::Host;
use anyhow::Result;
use std::time::Duration;

/// How soon to look again while a boot waits for its assessment.
pub const ASSESSING_POLL: Duration = Duration::from_secs(10);
/// How soon to look again otherwise (reboot windows, the lock, config changes).
pub const IDLE_POLL: Duration = Duration::from_secs(60);

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tick {
    /// Whether the channel was checked (the next check is an interval away).
    pub checked: bool,
    /// Wake up again after at most this long.
    pub wake_in: Duration,
    pub interval: Duration,
    pub jitter: Duration,
}

pub use crate::fleet::random_up_to;

pub fn tick(host: &dyn Host, fleet: &dyn RebootLock, check_due: bool) -> Result<Tick> {
    let settings = config::load_and_warn(host)?.update;
    let mut t = Tick {
        checked: false,
        wake_in: IDLE_POLL,
        interval: settings.interval,
        jitter: settings.jitter,
    };
    let assessment = {
        let _lock = match store::lock(host) {
            Ok(l) => l,
            Err(e) => {
                // osctl is applying an update: leave it be.
                tracing::debug!("{e:#}");
                return Ok(t);
            }
        };
        let mut st = store::load(host)?;
        let b = engine::booted(host)?;
        engine::reconcile(host, &mut st, &b, fleet)?
    };
    match assessment {
        // Never update from a boot that has not proven itself yet.
        Assessment::Pending => {
            t.wake_in = ASSESSING_POLL;
            return Ok(t);
        }
        Assessment::AwaitingReboot => {
            decide_reboot(host, &settings, fleet, &mut t)?;
            return Ok(t);
        }
        _ => {}
    }
    // An update that never booted is applied again now, not an interval later.
    let check_due = check_due || matches!(assessment, Assessment::NeverBooted { .. });
    if settings.channel_url.is_none() || !check_due {
        return Ok(t);
    }
    t.checked = true;
    let last_log = std::cell::Cell::new(0u128);
    let outcome = engine::run(host, &settings, Mode::Poll, fleet, &mut |bytes, total| {
        // A line per 10% in the journal.
        let tenth = (u128::from(bytes) * 10)
            .checked_div(u128::from(total))
            .unwrap_or(0);
        if tenth > last_log.get() {
            last_log.set(tenth);
            tracing::info!("downloading: {bytes} of {total} bytes");
        }
    });
    match outcome {
        Ok(Outcome::NothingToDo(why)) => tracing::info!("no update: {why}"),
        Ok(Outcome::Staged(_)) => decide_reboot(host, &settings, fleet, &mut t)?,
        // Recorded in state.json and logged by the engine; try again next interval.
        Err(e) => tracing::debug!("update attempt failed: {e:#}"),
    }
    Ok(t)
}

fn decide_reboot(
    host: &dyn Host,
    settings: &config::UpdateSettings,
    fleet: &dyn RebootLock,
    t: &mut Tick,
) -> Result<()> {
    match engine::maybe_reboot(host, settings, fleet, now_unix())? {
        RebootDecision::Wait { why, until } => {
            tracing::info!("staged update waits for its reboot: {why}");
            if let Some(until) = until {
                let secs = until.saturating_sub(now_unix()).max(1);
                t.wake_in = t.wake_in.min(Duration::from_secs(secs));
            }
        }
        RebootDecision::Rebooting | RebootDecision::NothingStaged => {}
    }
    Ok(())
}
