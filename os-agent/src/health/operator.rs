//! Checks that depend on the running system and the operator's config: the
//! daemon came up, required units are active, custom commands pass.

use crate::host::Host;
use std::path::Path;
use std::time::{Duration, Instant};

/// Waits until `path` exists, polling every `interval`, for at most `timeout`.
pub fn wait_for_file(
    host: &dyn Host,
    path: &Path,
    timeout: Duration,
    interval: Duration,
) -> Result<String, String> {
    let start = Instant::now();
    loop {
        match host.exists(path) {
            Ok(true) => return Ok(format!("{} present", path.display())),
            Ok(false) => {}
            Err(e) => return Err(format!("cannot check {}: {e}", path.display())),
        }
        let waited = start.elapsed();
        if waited >= timeout {
            return Err(format!(
                "{} did not appear within {}s (is os-agent.service running?)",
                path.display(),
                timeout.as_secs()
            ));
        }
        std::thread::sleep(interval.min(timeout - waited));
    }
}

/// A unit is active, as `systemctl is-active` says.
pub fn unit_active(host: &dyn Host, unit: &str) -> Result<String, String> {
    let out = host
        .run("systemctl", &["is-active", unit])
        .map_err(|e| format!("cannot ask systemd about {unit}: {e}"))?;
    let state = out.stdout.trim();
    if out.success() {
        Ok(format!("{unit} is {state}"))
    } else if state.is_empty() {
        Err(format!("{unit} is not active ({})", out.describe()))
    } else {
        Err(format!("{unit} is {state}, not active"))
    }
}

/// An operator's command, run with /bin/sh -c, exits 0.
pub fn command_passes(host: &dyn Host, command: &str) -> Result<String, String> {
    let out = host
        .run("/bin/sh", &["-c", command])
        .map_err(|e| format!("cannot run {command:?}: {e}"))?;
    if out.success() {
        Ok(format!("{command:?} exited 0"))
    } else {
        Err(format!("{command:?} failed: {}", out.describe()))
    }
}

/// The test knob: the check fails while the marker file exists.
pub fn no_fail_marker(host: &dyn Host, marker: &Path) -> Result<String, String> {
    match host.exists(marker) {
        Ok(false) => Ok(format!("{} absent", marker.display())),
        Ok(true) => Err(format!("fail marker {} exists", marker.display())),
        Err(e) => Err(format!("cannot check {}: {e}", marker.display())),
    }
}
