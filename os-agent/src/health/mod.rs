//! `os-agent health-check`: is this boot good enough to keep? Run before
//! boot-complete.target, so a failure leaves the boot entry unblessed and
//! systemd-boot falls back to the other slot once its tries are used up.

pub mod mounts;
pub mod operator;

use crate::config::HealthSettings;
use crate::host::Host;
use crate::mountinfo;
use crate::status::STATUS_FILE;
use std::path::Path;
use std::time::Duration;

/// The outcome of one check: what was seen, or why it failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckResult {
    pub name: String,
    pub outcome: Result<String, String>,
}

impl CheckResult {
    fn new(name: impl Into<String>, outcome: Result<String, String>) -> Self {
        CheckResult {
            name: name.into(),
            outcome,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report(pub Vec<CheckResult>);

impl Report {
    pub fn healthy(&self) -> bool {
        self.0.iter().all(|c| c.outcome.is_ok())
    }
    pub fn failures(&self) -> impl Iterator<Item = (&str, &str)> {
        self.0.iter().filter_map(|c| match &c.outcome {
            Err(e) => Some((c.name.as_str(), e.as_str())),
            Ok(_) => None,
        })
    }
}

/// How often to look for the daemon's status file.
pub const POLL_INTERVAL: Duration = Duration::from_millis(500);

/// Runs every check; none stops the others, so one run shows all problems.
pub fn run(host: &dyn Host, settings: &HealthSettings, poll: Duration) -> Report {
    let mut results = Vec::new();
    let mounts = host
        .read_to_string(Path::new("/proc/self/mountinfo"))
        .map_err(|e| format!("cannot read /proc/self/mountinfo: {e}"))
        .and_then(|text| mountinfo::parse(&text).map_err(|e| e.to_string()));
    match &mounts {
        Ok(t) => {
            results.push(CheckResult::new("root", mounts::root(t)));
            results.push(CheckResult::new("var", mounts::var(t)));
            results.push(CheckResult::new("etc", mounts::etc(t)));
        }
        Err(e) => results.push(CheckResult::new("mounts", Err(e.clone()))),
    }
    results.push(CheckResult::new(
        "agent",
        operator::wait_for_file(host, Path::new(STATUS_FILE), settings.status_timeout, poll),
    ));
    for unit in &settings.required_units {
        results.push(CheckResult::new(
            format!("unit {unit}"),
            operator::unit_active(host, unit),
        ));
    }
    for command in &settings.commands {
        results.push(CheckResult::new(
            format!("command {command:?}"),
            operator::command_passes(host, command),
        ));
    }
    if let Some(marker) = &settings.fail_marker {
        results.push(CheckResult::new(
            "fail-marker",
            operator::no_fail_marker(host, marker),
        ));
    }
    Report(results)
}

#[cfg(test)]
mod tests;

/// What a failed health check does to the boot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OnFailure {
    /// The boot is counted: rebooted, so systemd-boot takes the next try and
    /// falls back to the other slot once the tries are used up.
    Rebooting,
    /// Not rebooting, and why: the entry is blessed or not counted, or it has
    /// no tries left and there is no other entry to fall back to (rebooting
    /// would only loop).
    Stay(String),
}

/// After a failed check: reboot if this boot is on trial, so a bad update
/// rolls back by itself instead of waiting for someone to power-cycle it.
pub fn after_failure(host: &dyn Host) -> anyhow::Result<OnFailure> {
    use crate::boot::entries;
    use anyhow::Context;
    let Some(file) = crate::boot::boot_count_entry(host)? else {
        return Ok(OnFailure::Stay(
            "the boot entry is not on trial (blessed, or boot counting is off)".into(),
        ));
    };
    let tries_left = entries::counter(&file).map(|(left, _)| left).unwrap_or(0);
    if tries_left == 0 {
        // systemd-boot falls back only to an entry that still has tries.
        let fallback = entries::list(host)?.into_iter().any(|f| {
            !f.eq_ignore_ascii_case(&file) && entries::counter(&f).is_none_or(|(left, _)| left > 0)
        });
        if !fallback {
            return Ok(OnFailure::Stay(format!(
                "{file} has no tries left and there is no other entry to fall back to"
            )));
        }
    }
    let out = host
        .run("systemctl", &["reboot", "--no-block"])
        .context("cannot run systemctl reboot")?;
    if !out.success() {
        anyhow::bail!("systemctl reboot --no-block failed: {}", out.describe());
    }
    Ok(OnFailure::Rebooting)
}
