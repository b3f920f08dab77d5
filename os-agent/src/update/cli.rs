//! `osctl update ...`, `osctl rollback`, `osctl reboot`. osctl runs the engine
//! in its own process (there is no D-Bus interface yet); the update lock keeps
//! it and the daemon from writing a slot at the same time.

use super::engine::{self, Assessment, Mode, Outcome, RebootDecision};
use super::fleet_lock::NoopLock;
use super::state::State;
use super::store::{self, now_unix, Rollback, UpdateState};
use crate::boot::entries;
use crate::config::{self, Strategy};
use crate::host::Host;
use anyhow::{bail, Result};
use std::io::{IsTerminal, Write};

#[derive(Debug, clap::Subcommand)]
pub enum UpdateCommand {
    /// Fetch and verify the channel's manifest and say what would happen, and
    /// why. Changes nothing.
    Check,
    /// Apply the channel's release now: every check but the staged rollout's
    /// timing applies. Then reboot as the strategy says.
    Apply {
        /// Stage the update but do not reboot.
        #[arg(long)]
        no_reboot: bool,
    },
    /// Show the update state: what is staged, the last check, failures, rollbacks.
    Status {
        /// Print state.json's contents as JSON.
        #[arg(long)]
        json: bool,
    },
}

pub fn run(host: &dyn Host, cmd: UpdateCommand) -> Result<()> {
    match cmd {
        UpdateCommand::Check => check(host),
        UpdateCommand::Apply { no_reboot } => apply(host, no_reboot),
        UpdateCommand::Status { json } => {
            let st = store::load(host)?;
            crate::print_view(json, "the update state", &st, render_status)
        }
    }
}

fn time(t: u64) -> String {
    format!("{t} (unix; {}s ago)", now_unix().saturating_sub(t))
}

fn check(host: &dyn Host) -> Result<()> {
    let settings = config::load_and_warn(host)?.update;
    let st = store::load(host)?;
    let b = engine::booted(host)?;
    // A fallback the daemon has not recorded yet still counts.
    let pending_failure = match engine::assess(host, &st, &b)? {
        Assessment::RolledBack { version } => Some(version),
        _ => None,
    };
    let c = engine::check(host, &settings, &st, &b, pending_failure.as_deref())?;
    let m = &c.manifest;
    println!(
        "channel:  {} ({})",
        settings.channel,
        settings.channel_url.as_deref().unwrap_or_default()
    );
    println!(
        "booted:   {} {} in slot {}",
        b.status.image_name, b.status.image_version, b.status.slot
    );
    println!(
        "release:  {} {} (sequence {}, signed, expires {})",
        m.name, m.version, m.sequence, m.expires_at
    );
    println!("due at:   {} (staged rollout)", c.due_at);
    match &c.verdict {
        Ok(()) => println!(
            "would apply {} to slot {}, then reboot ({})",
            m.version,
            b.status.slot.other(),
            strategy_line(&settings.strategy)
        ),
        Err(ballast_common::manifest::Skip::NotDue { .. }) => println!(
            "not due yet: {}; `osctl update apply` would apply it now",
            c.verdict
                .as_ref()
                .err()
                .map(ToString::to_string)
                .unwrap_or_default()
        ),
        Err(skip) => println!("nothing to do: {skip}"),
    }
    Ok(())
}

fn strategy_line(s: &Strategy) -> String {
    match s {
        Strategy::Immediate => "immediate".into(),
        Strategy::Window(w) => format!("in the maintenance window {}", w.describe()),
        Strategy::FleetLock(None) => "once the fleet reboot lock is held".into(),
        Strategy::FleetLock(Some(w)) => format!(
            "once the fleet reboot lock is held, inside the maintenance window {}",
            w.describe()
        ),
    }
}

fn apply(host: &dyn Host, no_reboot: bool) -> Result<()> {
    let settings = config::load_and_warn(host)?.update;
    let tty = std::io::stderr().is_terminal();
    let mut last_pct = u64::MAX;
    let mut progress = |bytes: u64, total: u64| {
        let pct = (bytes * 100).checked_div(total).unwrap_or(0);
        if pct == last_pct {
            return;
        }
        // Without a terminal, a line per 10%.
        let new_tenth = last_pct == u64::MAX || pct / 10 != last_pct / 10;
        last_pct = pct;
        let mut err = std::io::stderr();
        // A failed progress line is not worth failing an update for.
        let _written = if tty {
            write!(
                err,
                "\rdownloading {:>6.1} / {:.1} MiB {pct:>3}%",
                bytes as f64 / 1048576.0,
                total as f64 / 1048576.0
            )
        } else if new_tenth {
            writeln!(err, "downloading: {pct}%")
        } else {
            Ok(())
        };
    };
    let outcome = engine::run(host, &settings, Mode::Now, &NoopLock, &mut progress);
    if tty && last_pct != u64::MAX {
        eprintln!();
    }
    match outcome? {
        Outcome::NothingToDo(why) => {
            println!("nothing to do: {why}");
            return Ok(());
        }
        Outcome::Staged(s) => println!(
            "staged {} in slot {} (boot entry {})",
            s.version, s.slot, s.uki_file
        ),
    }
    if no_reboot {
        println!("not rebooting (--no-reboot): the next boot starts the new version");
        return Ok(());
    }
    match engine::maybe_reboot(host, &settings, &NoopLock, now_unix())? {
        RebootDecision::Rebooting => println!("rebooting"),
        RebootDecision::Wait { why, until } => {
            let when = until
                .map(|u| format!(" (next chance at {u})"))
                .unwrap_or_default();
            println!("not rebooting now: {why}{when}; the daemon reboots when allowed");
        }
        RebootDecision::NothingStaged => {}
    }
    Ok(())
}

/// The human-readable update state (also part of `osctl status`).
pub fn render_status(st: &UpdateState) -> String {
    let mut out = String::new();
    let mut line = |k: &str, v: &str| out.push_str(&format!("{k:>12}: {v}\n"));
    line("Update", &st.state.describe());
    if let Some(s) = &st.staged {
        line(
            "Staged",
            &format!("{} in slot {} ({})", s.version, s.slot, s.uki_file),
        );
    }
    if let Some(t) = st.last_check {
        line("Last check", &time(t));
    }
    if let Some(r) = &st.last_result {
        line("Last result", r);
    }
    if let Some(e) = &st.last_error {
        if !matches!(st.state, State::Failed { .. }) {
            line("Last error", e);
        }
    }
    if !st.failed_versions.is_empty() {
        line("Failed", &st.failed_versions.join(", "));
    }
    if let Some(r) = &st.last_rollback {
        line(
            "Rollback",
            &format!(
                "{} -> {} at {}: {}",
                r.version,
                r.to_version,
                time(r.at),
                r.reason
            ),
        );
    }
    out
}

/// `osctl rollback`: makes the other slot's entry the default by marking the
/// booted entry as having used all its tries (`+0-1`), which systemd-boot
/// sorts after every entry with tries left. The booted version is recorded as
/// failed, so the agent does not update straight back to it.
pub fn rollback(host: &dyn Host) -> Result<()> {
    let _lock = store::lock(host)?;
    let mut st = store::load(host)?;
    let b = engine::booted(host)?;
    if let Assessment::AwaitingReboot = engine::assess(host, &st, &b)? {
        bail!(
            "an update to {} is staged: the other slot holds it, not an older version",
            st.staged
                .as_ref()
                .map(|s| s.version.as_str())
                .unwrap_or("?")
        );
    }
    let booted_file = entries::booted_file(host)?;
    let name = &b.status.image_name;
    let others: Vec<String> = entries::list(host)?
        .into_iter()
        .filter(|f| {
            entries::version_of(name, f).is_some_and(|v| v != b.status.image_version)
                && entries::counter(f).is_none_or(|(left, _)| left > 0)
        })
        .collect();
    let Some(target) = others.first() else {
        bail!(
            "no other boot entry of {name} to roll back to (an interrupted update may have removed it)"
        );
    };
    let new = entries::exhaust(host, &booted_file)?;
    st.mark_failed(&b.status.image_version);
    st.last_rollback = Some(Rollback {
        version: b.status.image_version.clone(),
        to_version: entries::version_of(name, target).unwrap_or_default(),
        at: now_unix(),
        reason: "rolled back by the operator (osctl rollback)".into(),
    });
    store::save(host, &mut st)?;
    println!(
        "{booted_file} renamed to {new}: the next boot starts {target}. \
         {} is marked failed and is not installed again. Reboot with `osctl reboot`.",
        b.status.image_version
    );
    Ok(())
}

/// `osctl reboot`.
pub fn reboot(host: &dyn Host) -> Result<()> {
    let mut st = store::load(host)?;
    engine::request_reboot(host, &mut st)
}
