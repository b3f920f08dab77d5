//! `os-agent daemon`: publish the host's status, tell systemd we are ready,
//! and stay up until asked to stop.

use crate::host::Host;
use crate::status::{self, HostStatus};
use anyhow::{Context, Result};
use std::path::Path;
use tokio::signal::unix::{signal, SignalKind};

/// The line the daemon logs once it knows what it booted.
pub fn booted_line(s: &HostStatus) -> String {
    format!(
        "booted slot {} version {} root hash {} (image {}, kernel {}, entry {})",
        s.slot,
        s.image_version,
        s.root_hash,
        s.image_name,
        s.kernel_release,
        s.boot_entry.as_deref().unwrap_or("unknown"),
    )
}

/// Gathers and publishes the status; returns it.
pub fn start(host: &dyn Host) -> Result<HostStatus> {
    let mut s = status::gather(host).context("cannot gather the host's status")?;
    s.agent_pid = Some(std::process::id());
    tracing::info!("{}", booted_line(&s));
    status::publish(host, &s)?;
    Ok(s)
}

async fn wait_for_stop() -> Result<&'static str> {
    let mut term = signal(SignalKind::terminate()).context("cannot handle SIGTERM")?;
    let mut int = signal(SignalKind::interrupt()).context("cannot handle SIGINT")?;
    Ok(tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
    })
}

/// Runs the daemon until SIGTERM or SIGINT.
pub fn run(host: &dyn Host) -> Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the tokio runtime")?;
    let s = start(host)?;
    sd_notify::notify(
        false,
        &[
            sd_notify::NotifyState::Ready,
            sd_notify::NotifyState::Status(&format!("slot {} version {}", s.slot, s.image_version)),
        ],
    )
    .context("cannot notify systemd that the agent is ready")?;
    let why = rt.block_on(wait_for_stop())?;
    tracing::info!("stopping on {why}");
    sd_notify::notify(false, &[sd_notify::NotifyState::Stopping])
        .context("cannot notify systemd that the agent is stopping")?;
    // A status file without a running daemon would tell osctl a stale story.
    host.remove_file(Path::new(status::STATUS_FILE))
        .with_context(|| format!("cannot remove {}", status::STATUS_FILE))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::disk::fixture::HASH_B;
    use crate::status::tests::booted_host;

    #[test]
    fn start_publishes_the_status_with_our_pid() {
        let dir = tempfile::tempdir().unwrap();
        let host = booted_host(dir.path(), &HASH_B);
        let s = start(&host).unwrap();
        assert_eq!(s.agent_pid, Some(std::process::id()));
        assert_eq!(status::read_published(&host).unwrap(), Some(s.clone()));
        let line = booted_line(&s);
        assert!(
            line.starts_with(&format!(
                "booted slot B version 1.2.3 root hash {}",
                "bb".repeat(32)
            )),
            "{line}"
        );
    }
}
