//! `os-agent daemon`: publish the host's status, tell systemd we are ready,
//! then run the update loop until asked to stop.

use crate::host::Host;
use crate::status::{self, HostStatus};
use crate::update::{agent, fleet_lock::NoopLock};
use anyhow::{Context, Result};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
use tokio::signal::unix::{signal, SignalKind};
use tokio::time::Instant;

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

/// Polls the update channel on the configured interval with jitter; in
/// between, wakes up now and then to follow the boot's assessment and the
/// reboot strategy. The first check comes a random part of the jitter after
/// start, so a fleet booted together does not poll together.
async fn update_loop(host: Arc<dyn Host + Send + Sync>) {
    let settings = crate::config::load_and_warn(&*host).map(|s| s.update);
    let first = settings
        .as_ref()
        .map(|s| agent::random_up_to(s.jitter))
        .unwrap_or(agent::IDLE_POLL);
    let mut next_check = Instant::now() + first;
    loop {
        let due = Instant::now() >= next_check;
        let h = host.clone();
        let result = tokio::task::spawn_blocking(move || agent::tick(&*h, &NoopLock, due)).await;
        let wake_in = match result {
            Ok(Ok(t)) => {
                if t.checked {
                    next_check = Instant::now() + t.interval + agent::random_up_to(t.jitter);
                }
                t.wake_in
            }
            Ok(Err(e)) => {
                tracing::error!("update loop: {e:#}");
                if due {
                    next_check = Instant::now() + agent::IDLE_POLL * 10;
                }
                agent::IDLE_POLL
            }
            Err(e) => {
                tracing::error!("update loop: the blocking task failed: {e}");
                agent::IDLE_POLL
            }
        };
        let until_check = next_check.saturating_duration_since(Instant::now());
        tokio::time::sleep(wake_in.min(until_check).max(Duration::from_secs(1))).await;
    }
}

/// How often the containers are reconciled after the first pass at start.
const RECONCILE_EVERY: Duration = Duration::from_secs(60);

/// Reconciles the containers at start and then every [`RECONCILE_EVERY`].
/// A failed pass is logged and retried; the units keep running meanwhile.
async fn containers_loop(host: Arc<dyn Host + Send + Sync>) {
    use crate::containers::agent::{self, Tags};
    let paths = agent::Paths::default();
    for n in 0u64.. {
        let tags = if n % agent::TAG_REFRESH_PASSES == 0 {
            Tags::Refresh
        } else {
            Tags::Cached
        };
        let pass = async {
            let sd = crate::containers::systemd::Systemd::connect().await?;
            agent::reconcile_once(host.clone(), &sd, &paths, tags).await
        };
        match pass.await {
            Ok(r) if r.actions.is_empty() && r.problems.is_empty() => {}
            Ok(r) => tracing::info!(
                "containers: {} action(s), {} problem(s)",
                r.actions.len(),
                r.problems.len()
            ),
            Err(e) => tracing::error!("containers: reconcile failed: {e:#}"),
        }
        tokio::time::sleep(RECONCILE_EVERY).await;
    }
}

/// Runs the daemon until SIGTERM or SIGINT.
pub fn run(host: Arc<dyn Host + Send + Sync>) -> Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the tokio runtime")?;
    let s = start(&*host)?;
    sd_notify::notify(
        false,
        &[
            sd_notify::NotifyState::Ready,
            sd_notify::NotifyState::Status(&format!("slot {} version {}", s.slot, s.image_version)),
        ],
    )
    .context("cannot notify systemd that the agent is ready")?;
    let updates = rt.spawn(update_loop(host.clone()));
    // Container units are not the agent's children: they keep running when
    // it stops, and the next start reconciles them.
    let containers = rt.spawn(containers_loop(host.clone()));
    let why = rt.block_on(wait_for_stop())?;
    updates.abort();
    containers.abort();
    tracing::info!("stopping on {why}");
    sd_notify::notify(false, &[sd_notify::NotifyState::Stopping])
        .context("cannot notify systemd that the agent is stopping")?;
    // A status file without a running daemon would tell osctl a stale story.
    host.remove_file(Path::new(status::STATUS_FILE))
        .with_context(|| format!("cannot remove {}", status::STATUS_FILE))?;
    // An update being written is abandoned: the slot is not bootable until it
    // verified, and the next start sees it was interrupted.
    rt.shutdown_timeout(Duration::from_secs(5));
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
