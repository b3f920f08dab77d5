//! The daemon's side of the fleet: the host's record, built from what the
//! host says about itself (through [`Host`], so it runs against a DirHost
//! too), and a watch on the group's policy that wakes the update loop when
//! an operator changes it.

use super::model::{Containers, HostRecord, Policy};
use super::{Backoff, Fleet};
use crate::host::Host;
use crate::status;
use crate::update::store;
use anyhow::{Context, Result};
use etcd_client::EventType;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Notify;

/// The machine id the host registers under.
pub fn machine_id(host: &dyn Host) -> Result<String> {
    let id = host
        .read_to_string(Path::new("/etc/machine-id"))
        .context("cannot read /etc/machine-id")?
        .trim()
        .to_string();
    if id.len() != 32 || !id.chars().all(|c| c.is_ascii_hexdigit()) {
        anyhow::bail!("/etc/machine-id: {id:?} is not a machine id (32 hex digits)");
    }
    Ok(id)
}

/// Global addresses from `ip -j addr`; none if iproute2 is not there.
fn addresses(host: &dyn Host) -> Vec<String> {
    let out = match host.run("ip", &["-j", "addr", "show", "scope", "global"]) {
        Ok(o) if o.success() => o,
        Ok(o) => {
            tracing::debug!("ip addr: {}", o.describe());
            return Vec::new();
        }
        Err(e) => {
            tracing::debug!("cannot run ip: {e}");
            return Vec::new();
        }
    };
    parse_ip_json(&out.stdout)
}

fn parse_ip_json(text: &str) -> Vec<String> {
    let v: serde_json::Value = match serde_json::from_str(text) {
        Ok(v) => v,
        Err(e) => {
            tracing::debug!("ip -j addr printed something else: {e}");
            return Vec::new();
        }
    };
    let mut out = Vec::new();
    for iface in v.as_array().into_iter().flatten() {
        for a in iface["addr_info"].as_array().into_iter().flatten() {
            if let Some(local) = a["local"].as_str() {
                out.push(local.to_string());
            }
        }
    }
    out
}

/// What the host registers: status, update state, hostname, addresses.
pub fn record(host: &dyn Host, group: &str, machine_id: &str) -> Result<HostRecord> {
    let s = status::gather(host).context("cannot gather the host's status")?;
    let u = store::load(host)?;
    let hostname = host
        .read_to_string(Path::new("/proc/sys/kernel/hostname"))
        .context("cannot read /proc/sys/kernel/hostname")?
        .trim()
        .to_string();
    Ok(HostRecord {
        machine_id: machine_id.to_string(),
        hostname,
        addresses: addresses(host),
        group: group.to_string(),
        booted_version: s.image_version,
        booted_slot: s.slot.to_string().to_lowercase(),
        staged_version: u.staged.map(|st| st.version),
        update_state: u.state.name().to_string(),
        last_error: u.last_error,
        containers: Containers::default(),
        agent_version: env!("CARGO_PKG_VERSION").to_string(),
    })
}

/// Watches the group's policy; logs each change and wakes `wake`. Runs
/// until aborted; reconnects with backoff.
pub async fn watch_policy(fleet: Fleet, wake: Arc<Notify>) {
    let mut backoff = Backoff::new(Duration::from_millis(500), Duration::from_secs(30));
    loop {
        let e = match watch_policy_once(&fleet, &wake, &mut backoff).await {
            Ok(()) => anyhow::anyhow!("etcd ended the watch"),
            Err(e) => e,
        };
        fleet.suspect();
        let wait = backoff.next_wait();
        tracing::warn!("watching the group policy: {e:#}; again in {wait:?}");
        tokio::time::sleep(wait).await;
    }
}

async fn watch_policy_once(fleet: &Fleet, wake: &Notify, backoff: &mut Backoff) -> Result<()> {
    let key = fleet.keys.policy(&fleet.group);
    let mut c = fleet.client.clone();
    let now = c
        .get(key.as_str(), None)
        .await
        .with_context(|| format!("cannot read {key}"))?;
    let rev = now.header().map_or(0, |h| h.revision());
    let (_watcher, mut stream) = super::watch_after(&mut c, &key, false, rev).await?;
    backoff.reset();
    while let Some(resp) = stream.message().await.context("the policy watch failed")? {
        for ev in resp.events() {
            let policy = match (ev.event_type(), ev.kv()) {
                (EventType::Put, Some(kv)) => match Policy::parse(&key, kv.value()) {
                    Ok(p) => p,
                    Err(e) => {
                        tracing::error!("{e} (no reboots until it is fixed)");
                        continue;
                    }
                },
                _ => Policy::default(),
            };
            tracing::info!("group {} policy is now {}", fleet.group, policy.to_json());
            wake.notify_one();
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::disk::fixture::{write, HASH_A};
    use crate::status::tests::booted_host;

    #[test]
    fn record_from_a_dir_host() {
        let dir = tempfile::tempdir().unwrap();
        let host = booted_host(dir.path(), &HASH_A);
        write(dir.path(), "proc/sys/kernel/hostname", "web-1\n");
        write(
            dir.path(),
            "etc/machine-id",
            &format!("{}\n", "ab".repeat(16)),
        );
        let id = machine_id(&host).unwrap();
        let r = record(&host, "web", &id).unwrap();
        assert_eq!(r.machine_id, "ab".repeat(16));
        assert_eq!((r.hostname.as_str(), r.group.as_str()), ("web-1", "web"));
        assert_eq!(
            (r.booted_version.as_str(), r.booted_slot.as_str()),
            ("1.2.3", "a")
        );
        assert_eq!(r.update_state, "idle");
        assert_eq!(r.staged_version, None);
        write(dir.path(), "etc/machine-id", "not-an-id\n");
        assert!(format!("{:#}", machine_id(&host).unwrap_err()).contains("not a machine id"));
    }

    #[test]
    fn addresses_from_ip_json() {
        let text = r#"[{"ifname":"eth0","addr_info":[{"family":"inet","local":"10.0.0.21"},{"family":"inet6","local":"fd00::21"}]},{"ifname":"eth1"}]"#;
        assert_eq!(parse_ip_json(text), ["10.0.0.21", "fd00::21"]);
        assert!(parse_ip_json("garbage").is_empty());
    }
}
