//! Desired state: layers from several sources, merged by container name in a
//! fixed order (docs/containers.md), with each layer's last good version kept
//! on /var so a source that is unreachable or broken does not stop or change
//! the containers it declared.
//!
//! A source is anything that implements [`Source`]; the local ones are here
//! ([`FilesSource`], [`AgentConfigSource`]), the etcd ones live with the
//! fleet code and plug in the same way.

use super::spec::{Container, RawContainer, SpecError};
use crate::host::Host;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::Path;

/// Operator files, one or more containers each, highest precedence.
pub const FILES_DIR: &str = "/etc/ballast/containers.d";
/// The last good layers, so containers start at boot without their sources.
pub const STATE_FILE: &str = "/var/lib/ballast/containers/desired.json";

/// Layer names in merge order, lowest precedence first. A later layer's
/// definition of a name replaces an earlier one's whole.
pub const LAYER_ORDER: [&str; 4] = ["user-data", "etcd-group", "etcd-host", "files"];

/// Why a source gave no layer this time.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    /// Cannot be reached now (etcd down): its last good layer stays.
    #[error("{0} is unavailable: {1}")]
    Unavailable(String, String),
    /// Reached, but what it holds does not validate: its last good layer stays.
    #[error("{} container definition(s) do not validate:\n  {}", .0.len(), .0.iter().map(ToString::to_string).collect::<Vec<_>>().join("\n  "))]
    Invalid(Vec<SpecError>),
    /// Not parseable at all (bad TOML/JSON), naming where.
    #[error("{0}")]
    Parse(String),
    #[error("{0}: {1}")]
    Io(String, #[source] std::io::Error),
}

/// One source of desired containers.
pub trait Source {
    /// One of [`LAYER_ORDER`]: where its layer goes in the merge, and the key
    /// its last good layer is kept under.
    fn layer(&self) -> &'static str;
    /// The containers it declares now, validated.
    fn load(&self) -> Result<Vec<Container>, SourceError>;
}

/// What a TOML file of containers holds.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ContainersFile {
    #[serde(default)]
    containers: Vec<RawContainer>,
}

/// Validates a list of raw containers from `origin`: every one valid, no
/// name twice.
pub fn validate_list(
    raw: &[RawContainer],
    origin: &str,
    out: &mut Vec<Container>,
    errors: &mut Vec<SpecError>,
) {
    for (i, r) in raw.iter().enumerate() {
        match r.validate(origin, i) {
            Ok(c) => {
                if out.iter().any(|o| o.name == c.name) {
                    errors.push(SpecError {
                        origin: origin.to_string(),
                        container: c.name.clone(),
                        field: "name".into(),
                        message: "is declared twice in this layer".into(),
                    });
                } else {
                    out.push(c);
                }
            }
            Err(e) => errors.extend(e),
        }
    }
}

/// Parses one operator file of `[[containers]]` tables (not yet validated).
pub fn parse_toml(text: &str, origin: &Path) -> Result<Vec<RawContainer>, SourceError> {
    let file: ContainersFile = toml::from_str(text)
        .map_err(|e| SourceError::Parse(format!("{}: {e}", origin.display())))?;
    Ok(file.containers)
}

/// `/etc/ballast/containers.d/*.toml`, in file name order, each holding
/// `[[containers]]` tables.
pub struct FilesSource<'a> {
    pub host: &'a dyn Host,
}

impl Source for FilesSource<'_> {
    fn layer(&self) -> &'static str {
        "files"
    }

    fn load(&self) -> Result<Vec<Container>, SourceError> {
        let dir = Path::new(FILES_DIR);
        let names = self
            .host
            .list_dir(dir)
            .map_err(|e| SourceError::Io(format!("cannot list {FILES_DIR}"), e))?;
        let mut out = Vec::new();
        let mut errors = Vec::new();
        for name in names.iter().filter(|n| n.ends_with(".toml")) {
            let path = dir.join(name);
            let text = self
                .host
                .read_to_string(&path)
                .map_err(|e| SourceError::Io(format!("cannot read {}", path.display()), e))?;
            let raw = parse_toml(&text, &path)?;
            validate_list(&raw, &path.display().to_string(), &mut out, &mut errors);
        }
        if errors.is_empty() {
            Ok(out)
        } else {
            Err(SourceError::Invalid(errors))
        }
    }
}

/// The `containers` list of the agent configuration: provisioning writes user
/// data's `ballast.containers` there (`/etc/ballast/agent.d/50-user-data.toml`).
/// As for every list in the agent config, the last file that sets it wins.
pub struct AgentConfigSource<'a> {
    pub host: &'a dyn Host,
}

impl Source for AgentConfigSource<'_> {
    fn layer(&self) -> &'static str {
        "user-data"
    }

    fn load(&self) -> Result<Vec<Container>, SourceError> {
        let loaded =
            crate::config::load(self.host).map_err(|e| SourceError::Parse(format!("{e:#}")))?;
        let Some(c) = loaded.settings.containers else {
            return Ok(Vec::new());
        };
        let origin = c.file.display().to_string();
        let raw: Vec<RawContainer> = c
            .value
            .try_into()
            .map_err(|e| SourceError::Parse(format!("{origin}: containers: {e}")))?;
        let mut out = Vec::new();
        let mut errors = Vec::new();
        validate_list(&raw, &origin, &mut out, &mut errors);
        if errors.is_empty() {
            Ok(out)
        } else {
            Err(SourceError::Invalid(errors))
        }
    }
}

/// A layer as the agent last applied it, for a reader that does not ask the
/// layer's own source (osctl does not watch etcd; the agent does).
pub struct SavedSource<'a> {
    pub layer: &'static str,
    pub saved: &'a SavedLayers,
}

impl Source for SavedSource<'_> {
    fn layer(&self) -> &'static str {
        self.layer
    }

    fn load(&self) -> Result<Vec<Container>, SourceError> {
        Ok(self
            .saved
            .layers
            .get(self.layer)
            .cloned()
            .unwrap_or_default())
    }
}

/// The layers last loaded without error, by layer name; kept on /var.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SavedLayers {
    pub layers: BTreeMap<String, Vec<Container>>,
}

impl SavedLayers {
    pub fn load(host: &dyn Host, path: &Path) -> anyhow::Result<SavedLayers> {
        use anyhow::Context;
        if !host
            .exists(path)
            .with_context(|| format!("cannot check {}", path.display()))?
        {
            return Ok(SavedLayers::default());
        }
        let text = host
            .read_to_string(path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        serde_json::from_str(&text)
            .with_context(|| format!("{} is not valid saved desired state", path.display()))
    }

    pub fn save(&self, host: &dyn Host, path: &Path) -> anyhow::Result<()> {
        use anyhow::Context;
        let json = serde_json::to_vec_pretty(self).context("cannot serialize desired state")?;
        host.write_atomic(path, &json)
            .with_context(|| format!("cannot write {}", path.display()))
    }
}

/// A container in the merged state and the layer that decided it.
#[derive(Debug, Clone, PartialEq)]
pub struct Desired {
    pub container: Container,
    pub layer: String,
}

/// Merges layers (name, containers) given in any order by [`LAYER_ORDER`]:
/// a container's definition comes whole from the highest layer that names it.
/// Unknown layer names sort last, so a misnamed source is not silently lost.
pub fn merge(layers: &BTreeMap<String, Vec<Container>>) -> BTreeMap<String, Desired> {
    let rank = |name: &str| {
        LAYER_ORDER
            .iter()
            .position(|l| *l == name)
            .unwrap_or(LAYER_ORDER.len())
    };
    let mut ordered: Vec<(&String, &Vec<Container>)> = layers.iter().collect();
    ordered.sort_by_key(|(name, _)| rank(name));
    let mut out = BTreeMap::new();
    for (layer, containers) in ordered {
        for c in containers {
            out.insert(
                c.name.clone(),
                Desired {
                    container: c.clone(),
                    layer: layer.clone(),
                },
            );
        }
    }
    out
}

/// The outcome of loading every source.
#[derive(Debug)]
pub struct Loaded {
    pub desired: BTreeMap<String, Desired>,
    /// Sources that failed (their last good layer was used), as messages.
    pub problems: Vec<String>,
    /// The layers used, to be saved once they were applied.
    pub layers: SavedLayers,
}

/// Loads every source; a source that fails keeps its last good layer from
/// `saved`, and the failure is reported in `problems`. A saved layer whose
/// source is gone (the host left its fleet) is dropped with its containers.
pub fn load_all(sources: &[&dyn Source], saved: &SavedLayers) -> Loaded {
    let mut layers = SavedLayers {
        layers: saved
            .layers
            .iter()
            .filter(|(name, _)| sources.iter().any(|s| s.layer() == name.as_str()))
            .map(|(name, cs)| (name.clone(), cs.clone()))
            .collect(),
    };
    let mut problems = Vec::new();
    for s in sources {
        match s.load() {
            Ok(cs) => {
                layers.layers.insert(s.layer().to_string(), cs);
            }
            Err(e) => {
                let kept = if saved.layers.contains_key(s.layer()) {
                    "its last good layer is kept"
                } else {
                    "it has no last good layer"
                };
                problems.push(format!("source {}: {e} ({kept})", s.layer()));
            }
        }
    }
    Loaded {
        desired: merge(&layers.layers),
        problems,
        layers,
    }
}

#[cfg(test)]
mod tests;
