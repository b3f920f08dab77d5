//! Desired containers in etcd (docs/etcd.md, docs/containers.md): one key per
//! container, JSON with the keys of docs/containers.md, under
//! `<p>/containers/groups/<g>/<name>` for the host's group and
//! `<p>/containers/hosts/<m>/<name>` for the host alone. They are the
//! `etcd-group` and `etcd-host` layers of the merge.
//!
//! The daemon reads both prefixes once and then watches them; every change
//! reads them again (a whole layer is validated at once, as a file is), and
//! every read wakes the containers loop. What was last read is kept in memory here, and
//! the containers code keeps the last layers that applied on /var: before the
//! first read, and while etcd cannot be reached, the layers are
//! "unavailable" and their saved versions run.

use super::{Backoff, Fleet};
use crate::containers::desired::{validate_list, Source, SourceError};
use crate::containers::spec::{Container, RawContainer, SpecError};
use anyhow::{Context, Result};
use etcd_client::{GetOptions, Txn, TxnOp, TxnOpResponse};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;
use tokio::sync::Notify;

/// The merge layers etcd gives: the group's keys, then the host's own.
pub const LAYERS: [&str; 2] = ["etcd-group", "etcd-host"];

/// One layer as last read from etcd.
#[derive(Debug, Clone)]
pub enum Layer {
    /// Not read yet: the saved layer stands.
    Unread,
    /// Read; `Ok` if every key validated.
    Read(Result<Vec<Container>, Vec<SpecError>>),
}

/// Both layers, shared between the watch and the containers loop.
#[derive(Debug, Clone)]
pub struct EtcdDesired {
    pub group: Layer,
    pub host: Layer,
}

/// What the watch shares with the containers loop.
#[derive(Debug, Clone)]
pub struct Shared {
    pub desired: Arc<Mutex<EtcdDesired>>,
    /// Notified after each read (the first, and one per change seen).
    pub changed: Arc<Notify>,
}

impl Default for Shared {
    fn default() -> Self {
        Shared {
            desired: Arc::new(Mutex::new(EtcdDesired {
                group: Layer::Unread,
                host: Layer::Unread,
            })),
            changed: Arc::new(Notify::new()),
        }
    }
}

impl Shared {
    /// The two sources for one reconcile pass, as they are now.
    pub fn sources(&self) -> Vec<Box<dyn Source + Send>> {
        let d = self
            .desired
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        vec![
            Box::new(EtcdSource {
                layer: LAYERS[0],
                state: d.group,
            }),
            Box::new(EtcdSource {
                layer: LAYERS[1],
                state: d.host,
            }),
        ]
    }
}

/// One etcd layer as a [`Source`] of the merge.
#[derive(Debug)]
pub struct EtcdSource {
    pub layer: &'static str,
    pub state: Layer,
}

impl Source for EtcdSource {
    fn layer(&self) -> &'static str {
        self.layer
    }

    fn load(&self) -> Result<Vec<Container>, SourceError> {
        match &self.state {
            Layer::Unread => Err(SourceError::Unavailable(
                "etcd".into(),
                "not read yet (not reachable since the agent started)".into(),
            )),
            Layer::Read(Ok(cs)) => Ok(cs.clone()),
            Layer::Read(Err(errors)) => Err(SourceError::Invalid(errors.clone())),
        }
    }
}

/// Validates the keys under `prefix`: each key's last segment is the
/// container's name, which the value may repeat but not contradict.
pub fn parse_layer(
    prefix: &str,
    kvs: &[(String, Vec<u8>)],
) -> Result<Vec<Container>, Vec<SpecError>> {
    let mut out = Vec::new();
    let mut errors = Vec::new();
    for (key, value) in kvs {
        let name = key.strip_prefix(prefix).unwrap_or(key);
        let error = |field: &str, message: String| SpecError {
            origin: key.clone(),
            container: name.to_string(),
            field: field.into(),
            message,
        };
        let raw: RawContainer = match serde_json::from_slice::<serde_json::Value>(value) {
            Ok(serde_json::Value::Object(mut map)) => {
                match map.get("name") {
                    None => {
                        map.insert("name".into(), name.into());
                    }
                    Some(serde_json::Value::String(n)) if n == name => {}
                    Some(other) => {
                        errors.push(error(
                            "name",
                            format!("is {other}, but the key names the container {name:?}"),
                        ));
                        continue;
                    }
                }
                match serde_json::from_value(serde_json::Value::Object(map)) {
                    Ok(r) => r,
                    Err(e) => {
                        errors.push(error("(value)", e.to_string()));
                        continue;
                    }
                }
            }
            Ok(other) => {
                let kind = match other {
                    serde_json::Value::Array(_) => "an array",
                    serde_json::Value::String(_) => "a string",
                    serde_json::Value::Number(_) => "a number",
                    serde_json::Value::Bool(_) => "a boolean",
                    _ => "null",
                };
                errors.push(error("(value)", format!("is {kind}, not a JSON object")));
                continue;
            }
            Err(e) => {
                errors.push(error("(value)", format!("is not JSON: {e}")));
                continue;
            }
        };
        validate_list(&[raw], key, &mut out, &mut errors);
    }
    if errors.is_empty() {
        Ok(out)
    } else {
        Err(errors)
    }
}

/// Reads and watches the host's two prefixes until aborted; reconnects with
/// backoff. Each read notifies `shared.changed`.
pub async fn watch_desired(fleet: Fleet, shared: Shared) {
    let mut backoff = Backoff::new(Duration::from_millis(500), Duration::from_secs(30));
    loop {
        match watch_once(&fleet, &shared, &mut backoff).await {
            // Something changed: read again at once.
            Ok(true) => continue,
            Ok(false) => {}
            Err(e) => {
                fleet.suspect();
                let wait = backoff.next_wait();
                tracing::warn!("watching the desired containers: {e:#}; again in {wait:?}");
                tokio::time::sleep(wait).await;
            }
        }
    }
}

/// The keys and values of a range answer in a transaction.
fn kvs(r: TxnOpResponse) -> Result<Vec<(String, Vec<u8>)>> {
    Ok(super::lock::range(r)?
        .kvs()
        .iter()
        .map(|kv| {
            (
                String::from_utf8_lossy(kv.key()).into_owned(),
                kv.value().to_vec(),
            )
        })
        .collect())
}

/// One read of both prefixes, then a watch on them; `Ok(true)` when the
/// watch saw a change, `Ok(false)` when etcd ended it.
async fn watch_once(fleet: &Fleet, shared: &Shared, backoff: &mut Backoff) -> Result<bool> {
    let group = fleet.keys.group_containers(&fleet.group);
    let host = fleet.keys.host_containers(&fleet.machine_id);
    let mut c = fleet.client.clone();
    let resp = c
        .txn(Txn::new().and_then([
            TxnOp::get(group.as_str(), Some(GetOptions::new().with_prefix())),
            TxnOp::get(host.as_str(), Some(GetOptions::new().with_prefix())),
        ]))
        .await
        .with_context(|| format!("cannot read {group} and {host}"))?;
    let rev = resp.header().map_or(0, |h| h.revision());
    let mut ops = resp.op_responses().into_iter();
    let (Some(g), Some(h)) = (ops.next(), ops.next()) else {
        anyhow::bail!("etcd answered two range requests with fewer responses");
    };
    let read = EtcdDesired {
        group: Layer::Read(parse_layer(&group, &kvs(g)?)),
        host: Layer::Read(parse_layer(&host, &kvs(h)?)),
    };
    for (prefix, layer) in [(&group, &read.group), (&host, &read.host)] {
        if let Layer::Read(Err(errors)) = layer {
            for e in errors {
                tracing::error!("{e} (the layer's last good version stays)");
            }
            tracing::debug!("{prefix}: {} bad key(s)", errors.len());
        }
    }
    *shared
        .desired
        .lock()
        .unwrap_or_else(PoisonError::into_inner) = read;
    shared.changed.notify_one();
    // Both prefixes on one watch stream.
    let (mut watcher, mut stream) = super::watch_after(&mut c, &group, true, rev).await?;
    watcher
        .watch(host.as_str(), Some(super::watch_options_after(rev, true)))
        .await
        .with_context(|| format!("cannot watch {host}"))?;
    backoff.reset();
    while let Some(resp) = stream
        .message()
        .await
        .context("the desired containers watch failed")?
    {
        if resp.canceled() {
            anyhow::bail!("etcd canceled the watch: {}", resp.cancel_reason());
        }
        if !resp.events().is_empty() {
            return Ok(true);
        }
    }
    Ok(false)
}

#[cfg(test)]
mod tests;
