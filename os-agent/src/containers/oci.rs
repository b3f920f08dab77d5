//! The OCI (and Docker v2) documents a pull reads: image index, image
//! manifest and image config. All untrusted: parsed strictly enough that the
//! rest of the puller can rely on digests, sizes and media types.

use super::reference::Digest;
use super::spec::valid_env_name;
use serde::{Deserialize, Serialize};

pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
const CONFIG_TYPES: &[&str] = &[
    "application/vnd.oci.image.config.v1+json",
    "application/vnd.docker.container.image.v1+json",
];
const LAYER_TYPES: &[&str] = &[
    "application/vnd.oci.image.layer.v1.tar",
    "application/vnd.oci.image.layer.v1.tar+gzip",
    "application/vnd.oci.image.layer.v1.tar+zstd",
    "application/vnd.docker.image.rootfs.diff.tar.gzip",
    // Uncompressed docker layers, as containers/image (skopeo, podman) writes them.
    "application/vnd.docker.image.rootfs.diff.tar",
];

/// What the manifest endpoint accepts from us, best first.
pub const MANIFEST_ACCEPT: &str = "application/vnd.oci.image.index.v1+json, application/vnd.oci.image.manifest.v1+json, application/vnd.docker.distribution.manifest.list.v2+json, application/vnd.docker.distribution.manifest.v2+json";

/// Largest manifest or index read (distribution's own limit is 4 MiB).
pub const MAX_MANIFEST: u64 = 4 << 20;
/// Largest image config read.
pub const MAX_CONFIG: u64 = 8 << 20;

#[derive(Debug, thiserror::Error)]
pub enum OciError {
    #[error("{what} is not valid JSON of its kind: {source}")]
    Json {
        what: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("{what}: {why}")]
    Invalid { what: String, why: String },
}

fn invalid(what: &str, why: impl Into<String>) -> OciError {
    OciError::Invalid {
        what: what.to_string(),
        why: why.into(),
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Platform {
    pub architecture: String,
    pub os: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub variant: Option<String>,
}

impl Platform {
    /// This host's platform, in OCI's names.
    pub fn host() -> Platform {
        let (architecture, variant) = match std::env::consts::ARCH {
            "x86_64" => ("amd64", None),
            "aarch64" => ("arm64", Some("v8")),
            "arm" => ("arm", Some("v7")),
            "x86" => ("386", None),
            "powerpc64" => ("ppc64le", None),
            other => (other, None),
        };
        Platform {
            architecture: architecture.to_string(),
            os: "linux".to_string(),
            variant: variant.map(str::to_string),
        }
    }

    /// Whether an index entry's platform runs here. A missing variant matches
    /// (arm64 images rarely name `v8`).
    pub fn accepts(&self, other: &Platform) -> bool {
        self.os == other.os
            && self.architecture == other.architecture
            && (other.variant.is_none() || self.variant == other.variant)
    }
}

impl std::fmt::Display for Platform {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.os, self.architecture)?;
        if let Some(v) = &self.variant {
            write!(f, "/{v}")?;
        }
        Ok(())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Descriptor {
    pub media_type: String,
    pub digest: Digest,
    pub size: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub platform: Option<Platform>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawDoc {
    schema_version: Option<u32>,
    media_type: Option<String>,
    manifests: Option<Vec<Descriptor>>,
    config: Option<Descriptor>,
    layers: Option<Vec<Descriptor>>,
}

/// A manifest endpoint's answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Document {
    Index(Vec<Descriptor>),
    Manifest(Manifest),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    pub config: Descriptor,
    pub layers: Vec<Descriptor>,
}

/// Parses a manifest or index. `content_type` is the HTTP Content-Type (or
/// the media type of the descriptor that pointed here); the document's own
/// `mediaType` wins when present, and they must not disagree.
pub fn parse_document(
    bytes: &[u8],
    content_type: Option<&str>,
    what: &str,
) -> Result<Document, OciError> {
    let raw: RawDoc = serde_json::from_slice(bytes).map_err(|source| OciError::Json {
        what: what.to_string(),
        source,
    })?;
    if raw.schema_version != Some(2) {
        return Err(invalid(
            what,
            format!("schemaVersion {:?} is not 2", raw.schema_version),
        ));
    }
    let header = content_type
        .map(|c| c.split(';').next().unwrap_or(c).trim())
        .filter(|c| [OCI_INDEX, OCI_MANIFEST, DOCKER_LIST, DOCKER_MANIFEST].contains(c));
    let kind = match (raw.media_type.as_deref(), header) {
        (Some(a), Some(b)) if a != b => {
            return Err(invalid(what, format!("mediaType {a} but served as {b}")));
        }
        (Some(t), _) | (None, Some(t)) => t.to_string(),
        (None, None) if raw.manifests.is_some() => OCI_INDEX.to_string(),
        (None, None) => OCI_MANIFEST.to_string(),
    };
    match kind.as_str() {
        OCI_INDEX | DOCKER_LIST => {
            if raw.config.is_some() || raw.layers.is_some() {
                return Err(invalid(what, "an index with config or layers"));
            }
            let manifests = raw
                .manifests
                .ok_or_else(|| invalid(what, "index without manifests"))?;
            Ok(Document::Index(manifests))
        }
        OCI_MANIFEST | DOCKER_MANIFEST => {
            if raw.manifests.is_some() {
                return Err(invalid(what, "a manifest with manifests (an index?)"));
            }
            let config = raw
                .config
                .ok_or_else(|| invalid(what, "manifest without config"))?;
            if !CONFIG_TYPES.contains(&config.media_type.as_str()) {
                return Err(invalid(
                    what,
                    format!(
                        "config media type {} is not an image config",
                        config.media_type
                    ),
                ));
            }
            if config.size > MAX_CONFIG {
                return Err(invalid(
                    what,
                    format!("config of {} bytes is more than {MAX_CONFIG}", config.size),
                ));
            }
            let layers = raw
                .layers
                .ok_or_else(|| invalid(what, "manifest without layers"))?;
            for (i, l) in layers.iter().enumerate() {
                if !LAYER_TYPES.contains(&l.media_type.as_str()) {
                    return Err(invalid(
                        what,
                        format!(
                            "layers[{i}]: media type {} is not a layer this agent unpacks",
                            l.media_type
                        ),
                    ));
                }
            }
            Ok(Document::Manifest(Manifest { config, layers }))
        }
        other => Err(invalid(
            what,
            format!("media type {other} is neither a manifest nor an index"),
        )),
    }
}

/// The index entry for `platform`, or an error listing what the index has.
pub fn select_platform<'a>(
    manifests: &'a [Descriptor],
    platform: &Platform,
    what: &str,
) -> Result<&'a Descriptor, OciError> {
    manifests
        .iter()
        .filter(|d| [OCI_MANIFEST, DOCKER_MANIFEST].contains(&d.media_type.as_str()))
        .find(|d| d.platform.as_ref().is_some_and(|p| platform.accepts(p)))
        .ok_or_else(|| {
            let have: Vec<String> = manifests
                .iter()
                .filter_map(|d| d.platform.as_ref().map(ToString::to_string))
                .collect();
            invalid(
                what,
                format!(
                    "no image for {platform} (the index has: {})",
                    have.join(", ")
                ),
            )
        })
}

/// What the agent uses from an image config.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunConfig {
    pub entrypoint: Vec<String>,
    pub cmd: Vec<String>,
    pub env: Vec<String>,
    pub working_dir: Option<String>,
    pub user: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct RawRun {
    entrypoint: Option<Vec<String>>,
    cmd: Option<Vec<String>>,
    env: Option<Vec<String>>,
    working_dir: Option<String>,
    user: Option<String>,
}

#[derive(Debug, Deserialize)]
struct RawConfig {
    architecture: Option<String>,
    os: Option<String>,
    config: Option<RawRun>,
    rootfs: Option<RawRootfs>,
}

#[derive(Debug, Deserialize)]
struct RawRootfs {
    diff_ids: Vec<String>,
}

/// An image config: what to run, and the digest of each layer's
/// uncompressed tar (`rootfs.diff_ids`), which unpacking verifies.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageConfig {
    pub run: RunConfig,
    pub diff_ids: Vec<Digest>,
}

/// Parses an image config, checking it matches the manifest's layer count
/// and `platform`.
pub fn parse_config(
    bytes: &[u8],
    layers: usize,
    platform: &Platform,
    what: &str,
) -> Result<ImageConfig, OciError> {
    let raw: RawConfig = serde_json::from_slice(bytes).map_err(|source| OciError::Json {
        what: what.to_string(),
        source,
    })?;
    if let (Some(os), Some(arch)) = (&raw.os, &raw.architecture) {
        if *os != platform.os || *arch != platform.architecture {
            return Err(invalid(
                what,
                format!("image is for {os}/{arch}, this host is {platform}"),
            ));
        }
    }
    // Without diff_ids nothing vouches for the unpacked layers: as containerd,
    // a config must name one per layer.
    let raw_ids = raw.rootfs.map(|r| r.diff_ids).unwrap_or_default();
    if raw_ids.len() != layers {
        return Err(invalid(
            what,
            format!(
                "rootfs has {} diff_ids but the manifest {layers} layers",
                raw_ids.len()
            ),
        ));
    }
    let diff_ids = raw_ids
        .iter()
        .enumerate()
        .map(|(i, d)| {
            Digest::parse(d).map_err(|why| invalid(what, format!("rootfs.diff_ids[{i}]: {why}")))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let run = raw.config;
    let (entrypoint, cmd, env, working_dir, user) = match run {
        Some(r) => (r.entrypoint, r.cmd, r.env, r.working_dir, r.user),
        None => (None, None, None, None, None),
    };
    let env = env.unwrap_or_default();
    for (i, e) in env.iter().enumerate() {
        let field = format!("config.Env[{i}]");
        no_control(what, &field, e)?;
        let (name, _) = e
            .split_once('=')
            .ok_or_else(|| invalid(what, format!("{field}: {e:?} is not NAME=value")))?;
        if !valid_env_name(name) {
            return Err(invalid(
                what,
                format!("{field}: {name:?} is not a variable name (letters, digits, _)"),
            ));
        }
    }
    let working_dir = working_dir.filter(|w| !w.is_empty());
    if let Some(w) = &working_dir {
        no_control(what, "config.WorkingDir", w)?;
        if !w.starts_with('/') {
            return Err(invalid(
                what,
                format!("config.WorkingDir: {w:?} is not an absolute path"),
            ));
        }
    }
    let user = user.filter(|u| !u.is_empty());
    if let Some(u) = &user {
        no_control(what, "config.User", u)?;
    }
    Ok(ImageConfig {
        run: RunConfig {
            entrypoint: entrypoint.unwrap_or_default(),
            cmd: cmd.unwrap_or_default(),
            env,
            working_dir,
            user,
        },
        diff_ids,
    })
}

/// Refuses a value with a control character (CR, LF, NUL, ...): these end
/// up on a unit's command line and in the container's environment.
fn no_control(what: &str, field: &str, value: &str) -> Result<(), OciError> {
    if value.chars().any(char::is_control) {
        return Err(invalid(
            what,
            format!("{field}: {value:?} has a control character"),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests;
