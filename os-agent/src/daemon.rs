//! `os-agent daemon`: publish the host's status, tell systemd we are ready,
//! join the fleet in etcd if the config names one, then run the update loop
//! until asked to stop.

use crate::fleet::{
    self, lock::EtcdLock, model::Containers, register::Registration, view::GroupWatch, Fleet,
};
use crate::host::Host;
use crate::status::{self, HostStatus};
use crate::update::{
    agent,
    fleet_lock::{NoopLock, RebootLock},
};
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
async fn update_loop(
    host: Arc<dyn Host + Send + Sync>,
    lock: Arc<dyn RebootLock + Send + Sync>,
    fleet: Option<Arc<FleetState>>,
) {
    let settings = crate::config::load_and_warn(&*host).map(|s| s.update);
    let first = settings
        .as_ref()
        .map(|s| agent::random_up_to(s.jitter))
        .unwrap_or(agent::IDLE_POLL);
    let mut next_check = Instant::now() + first;
    loop {
        let due = Instant::now() >= next_check;
        let (h, l) = (host.clone(), lock.clone());
        let result = tokio::task::spawn_blocking(move || agent::tick(&*h, &*l, due)).await;
        if let Some(f) = &fleet {
            f.refresh(host.clone()).await;
        }
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
        let sleep = tokio::time::sleep(wake_in.min(until_check).max(Duration::from_secs(1)));
        match &fleet {
            // A policy change (resume, pin, a higher max) is worth a look now.
            Some(f) => {
                tokio::select! {
                    _ = sleep => {}
                    _ = f.wake.notified() => {}
                }
            }
            None => sleep.await,
        }
    }
}

/// The daemon's membership in the fleet, shared by the update and the
/// containers loops.
struct FleetState {
    fleet: Fleet,
    registration: Registration,
    wake: Arc<tokio::sync::Notify>,
    policy_watch: tokio::task::JoinHandle<()>,
    /// The desired containers in etcd, as last read by `desired_watch`.
    desired: fleet::containers::Shared,
    desired_watch: tokio::task::JoinHandle<()>,
    /// The containers loop's last count, for the record.
    containers: std::sync::Mutex<Containers>,
    /// Wakes the update loop when a reboot slot looks free.
    slot_wake: tokio::task::JoinHandle<()>,
}

impl FleetState {
    /// Publishes the host's record if it changed (the registration writes
    /// only changes).
    async fn refresh(&self, host: Arc<dyn Host + Send + Sync>) {
        let (group, id) = (self.fleet.group.clone(), self.fleet.machine_id.clone());
        match tokio::task::spawn_blocking(move || fleet::agent::record(&*host, &group, &id)).await {
            Ok(Ok(mut r)) => {
                r.containers = self
                    .containers
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .clone();
                self.registration.update(r)
            }
            Ok(Err(e)) => tracing::warn!("cannot build the fleet record: {e:#}"),
            Err(e) => tracing::warn!("cannot build the fleet record: {e}"),
        }
    }
}

impl Drop for FleetState {
    fn drop(&mut self) {
        self.policy_watch.abort();
        self.desired_watch.abort();
        self.slot_wake.abort();
    }
}

/// Joins the fleet if the config has etcd endpoints. etcd being down is
/// not an error here: the registration retries, and the lock refuses.
async fn join_fleet(host: Arc<dyn Host + Send + Sync>) -> Result<Option<FleetState>> {
    let h = host.clone();
    let settings = tokio::task::spawn_blocking(move || crate::config::load_and_warn(&*h))
        .await
        .context("the config loader failed")??;
    let Some(fs) = settings.fleet else {
        return Ok(None);
    };
    let id = fleet::agent::machine_id(&*host)?;
    let client = fleet::connect(&fs).await?;
    // A hung member is taken out of the client when a request fails.
    let members = fleet::members::Members::start(&client, &fs).await?;
    let f = Fleet::new(client, &fs, &id).with_members(members.as_ref());
    let h = host.clone();
    let (group, mid) = (fs.group.clone(), id.clone());
    let record = tokio::task::spawn_blocking(move || fleet::agent::record(&*h, &group, &mid))
        .await
        .context("the record builder failed")??;
    tracing::info!(
        "joining the fleet at {} as {id} in group {}",
        fs.endpoints.join(", "),
        fs.group
    );
    let wake = Arc::new(tokio::sync::Notify::new());
    let desired = fleet::containers::Shared::default();
    // The lock takes a slot on what the view shows when it shows one free.
    let view = GroupWatch::start(f.client.clone(), f.keys.clone(), f.group.clone());
    let f = f.with_view(&view);
    let registration = Registration::start(f.clone(), record);
    let f = f.with_registration(&registration);
    Ok(Some(FleetState {
        slot_wake: tokio::spawn(fleet::view::wake_for_staged(
            f.clone(),
            view,
            registration.subscribe(),
            wake.clone(),
        )),
        registration,
        policy_watch: tokio::spawn(fleet::agent::watch_policy(f.clone(), wake.clone())),
        desired_watch: tokio::spawn(fleet::containers::watch_desired(f.clone(), desired.clone())),
        desired,
        containers: std::sync::Mutex::new(Containers::default()),
        fleet: f,
        wake,
    }))
}

/// How often the containers are reconciled after the first pass at start.
const RECONCILE_EVERY: Duration = Duration::from_secs(60);

/// Reconciles the containers at start, then every [`RECONCILE_EVERY`] and
/// whenever the desired containers in etcd change. A failed pass is logged
/// and retried; the units keep running meanwhile. `in_fleet` without
/// `fleet` is a fleet configured but not joined: etcd's layers are then
/// unavailable, so their last good versions keep running.
async fn containers_loop(
    host: Arc<dyn Host + Send + Sync>,
    fleet: Option<Arc<FleetState>>,
    in_fleet: bool,
) {
    use crate::containers::agent::{self, Tags};
    let paths = agent::Paths::default();
    for n in 0u64.. {
        let tags = if n % agent::TAG_REFRESH_PASSES == 0 {
            Tags::Refresh
        } else {
            Tags::Cached
        };
        let remote = match &fleet {
            Some(f) => f.desired.sources(),
            None if in_fleet => fleet::containers::Shared::default().sources(),
            None => Vec::new(),
        };
        let pass = async {
            let sd = crate::containers::systemd::Systemd::connect().await?;
            agent::reconcile_once(host.clone(), &sd, &paths, tags, remote).await
        };
        match pass.await {
            Ok(r) => {
                if !(r.actions.is_empty() && r.problems.is_empty()) {
                    tracing::info!(
                        "containers: {} action(s), {} problem(s)",
                        r.actions.len(),
                        r.problems.len()
                    );
                }
                if let Some(f) = &fleet {
                    let changed = {
                        let mut c = f
                            .containers
                            .lock()
                            .unwrap_or_else(std::sync::PoisonError::into_inner);
                        std::mem::replace(&mut *c, r.summary.clone()) != r.summary
                    };
                    if changed {
                        f.refresh(host.clone()).await;
                    }
                }
            }
            Err(e) => tracing::error!("containers: reconcile failed: {e:#}"),
        }
        let sleep = tokio::time::sleep(RECONCILE_EVERY);
        match &fleet {
            Some(f) => {
                tokio::select! {
                    _ = sleep => {}
                    _ = f.desired.changed.notified() => {}
                }
            }
            None => sleep.await,
        }
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
    let joined = rt.block_on(join_fleet(host.clone()));
    let in_fleet = !matches!(joined, Ok(None));
    let (lock, fleet): (Arc<dyn RebootLock + Send + Sync>, _) = match joined {
        Ok(Some(f)) => (
            Arc::new(EtcdLock {
                fleet: f.fleet.clone(),
                runtime: rt.handle().clone(),
            }),
            Some(Arc::new(f)),
        ),
        Ok(None) => (Arc::new(NoopLock), None),
        Err(e) => {
            // Updates go on; under fleet-lock they wait, since no lock is granted.
            tracing::error!("cannot join the fleet: {e:#}");
            (Arc::new(RefuseLock(format!("{e:#}"))), None)
        }
    };
    let updates = rt.spawn(update_loop(host.clone(), lock, fleet.clone()));
    // Container units are not the agent's children: they keep running when
    // it stops, and the next start reconciles them.
    let containers = rt.spawn(containers_loop(host.clone(), fleet, in_fleet));
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

/// The lock when the fleet config is there but unusable: never granted, so
/// a `fleet-lock` host does not reboot without the lock.
struct RefuseLock(String);

impl RebootLock for RefuseLock {
    fn acquire(&self, _version: &str) -> Result<bool> {
        anyhow::bail!(
            "the fleet is configured but could not be joined: {}",
            self.0
        )
    }

    /// There is no fleet to tell: failing here would keep the engine from
    /// ever recording the end of the update, so this logs instead.
    fn release(&self, outcome: &crate::update::fleet_lock::Released) -> Result<()> {
        tracing::error!(
            "cannot tell the fleet {outcome:?}: it is configured but could not be joined: {}",
            self.0
        );
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::disk::fixture::HASH_B;
    use crate::status::tests::booted_host;

    /// The daemon's fleet wiring against a real etcd: the config's
    /// endpoints and group, the DirHost's record, a policy change that wakes
    /// the update loop, and so does a slot freed while an update is staged.
    #[test]
    fn joins_the_fleet_named_in_the_config() {
        use crate::disk::fixture::write;
        use crate::fleet::{admin, model::HostRecord, server::LocalEtcd};
        let etcd_dir = tempfile::tempdir().unwrap();
        let etcd = LocalEtcd::start(etcd_dir.path(), None).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let host: Arc<dyn Host + Send + Sync> = Arc::new(booted_host(dir.path(), &HASH_B));
        write(dir.path(), "proc/sys/kernel/hostname", "web-7\n");
        write(
            dir.path(),
            "etc/machine-id",
            &format!("{}\n", "7e".repeat(16)),
        );
        write(
            dir.path(),
            "etc/ballast/agent.d/fleet.toml",
            &format!(
                "group = \"web\"\n[etcd]\nendpoints = [\"{}\"]\nlease_ttl_secs = 2\nlock_ttl_secs = 4\n",
                etcd.endpoint()
            ),
        );
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let f = join_fleet(host.clone())
                .await
                .unwrap()
                .expect("a fleet is configured");
            tokio::time::timeout(Duration::from_secs(10), f.registration.wait_sessions(1))
                .await
                .unwrap();
            let mut c = f.fleet.client.clone();
            let key = f.fleet.keys.host(&"7e".repeat(16));
            let resp = c.get(key.as_str(), None).await.unwrap();
            let r = HostRecord::parse(&key, resp.kvs()[0].value()).unwrap();
            assert_eq!((r.hostname.as_str(), r.group.as_str()), ("web-7", "web"));
            assert_eq!(
                (r.booted_version.as_str(), r.booted_slot.as_str()),
                ("1.2.3", "b")
            );
            // The policy watch wakes the update loop.
            tokio::time::sleep(Duration::from_millis(300)).await;
            admin::pause(&f.fleet.client, &f.fleet.keys, "web")
                .await
                .unwrap();
            tokio::time::timeout(Duration::from_secs(5), f.wake.notified())
                .await
                .expect("a policy change wakes the update loop");
            admin::resume(&f.fleet.client, &f.fleet.keys, "web")
                .await
                .unwrap();
            tokio::time::timeout(Duration::from_secs(5), f.wake.notified())
                .await
                .expect("a policy change wakes the update loop");
            // Another host holds the only slot while this one staged 2.0:
            // freeing it wakes the update loop.
            let settings = crate::fleet::FleetSettings {
                group: "web".into(),
                ..crate::fleet::FleetSettings::new(vec![etcd.endpoint()])
            };
            let other = Fleet::new(f.fleet.client.clone(), &settings, &"0f".repeat(16));
            assert_eq!(
                other.try_acquire("2.0").await.unwrap(),
                crate::fleet::lock::Acquire::Granted
            );
            f.registration
                .modify(|r| r.staged_version = Some("2.0".into()));
            tokio::time::sleep(Duration::from_millis(300)).await;
            other.delete_holder(&other.machine_id).await.unwrap();
            tokio::time::timeout(Duration::from_secs(5), f.wake.notified())
                .await
                .expect("a freed slot wakes the update loop of a host that staged an update");
        });
    }

    #[test]
    fn an_unusable_fleet_config_never_grants_the_lock() {
        let l = RefuseLock("cannot read /etc/ballast/etcd/key.pem".into());
        let e = format!("{:#}", l.acquire("2.0").unwrap_err());
        assert!(e.contains("could not be joined: cannot read"), "{e}");
        let blessed = crate::update::fleet_lock::Released::Blessed {
            version: "2.0".into(),
        };
        l.release(&blessed).unwrap();
    }

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
