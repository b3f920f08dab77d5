//! Talking to an update channel: a static directory over HTTP(S)
//! (docs/channel.md), and the keys the image trusts to sign it.

use crate::host::Host;
use anyhow::{bail, Context, Result};
use ballast_common::keys::PublicKey;
use ballast_common::manifest::{self, Manifest};
use std::io::Read;
use std::path::Path;
use std::time::Duration;

/// Public keys baked into the image, one `<key id>.pub` each.
pub const KEYS_DIR: &str = "/usr/lib/ballast/keys";
/// A channel file bigger than this is not a manifest.
const MAX_MANIFEST_BYTES: u64 = 1 << 20;

/// The trusted keys of this image.
pub fn trusted_keys(host: &dyn Host) -> Result<Vec<PublicKey>> {
    let dir = Path::new(KEYS_DIR);
    let mut keys = Vec::new();
    for name in host
        .list_dir(dir)
        .with_context(|| format!("cannot list {KEYS_DIR}"))?
    {
        if !name.ends_with(".pub") {
            continue;
        }
        let path = dir.join(&name);
        let text = host
            .read_to_string(&path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        keys.push(PublicKey::parse(&text).with_context(|| format!("{}", path.display()))?);
    }
    if keys.is_empty() {
        bail!("no trusted update keys in {KEYS_DIR}: this image cannot verify any update");
    }
    Ok(keys)
}

/// A channel directory at a base URL.
#[derive(Clone)]
pub struct Channel {
    base: String,
    name: String,
    agent: ureq::Agent,
}

impl Channel {
    pub fn new(base: &str, name: &str) -> Channel {
        let agent = ureq::AgentBuilder::new()
            .timeout_connect(Duration::from_secs(30))
            // Per read, not for the whole body: a large payload on a slow
            // link is fine as long as bytes keep coming.
            .timeout_read(Duration::from_secs(60))
            .build();
        Channel {
            base: base.trim_end_matches('/').to_string(),
            name: name.to_string(),
            agent,
        }
    }

    pub fn manifest_url(&self) -> String {
        format!("{}/channels/{}.json", self.base, self.name)
    }

    pub fn payload_url(&self, rel: &str) -> String {
        format!("{}/{}", self.base, rel)
    }

    fn get(&self, url: &str) -> Result<ureq::Response> {
        match self.agent.get(url).call() {
            Ok(r) => Ok(r),
            Err(ureq::Error::Status(code, r)) => {
                bail!("GET {url}: HTTP {code} {}", r.status_text())
            }
            Err(e) => Err(anyhow::Error::new(e).context(format!("GET {url}"))),
        }
    }

    /// Fetches the channel file (not yet verified).
    pub fn fetch_manifest_bytes(&self) -> Result<Vec<u8>> {
        let url = self.manifest_url();
        let resp = self.get(&url)?;
        let mut bytes = Vec::new();
        resp.into_reader()
            .take(MAX_MANIFEST_BYTES + 1)
            .read_to_end(&mut bytes)
            .with_context(|| format!("GET {url}: cannot read the body"))?;
        if bytes.len() as u64 > MAX_MANIFEST_BYTES {
            bail!("GET {url}: the channel file is larger than {MAX_MANIFEST_BYTES} bytes");
        }
        Ok(bytes)
    }

    /// Fetches the channel file and verifies it against the trusted keys.
    pub fn fetch_manifest(&self, trusted: &[PublicKey]) -> Result<Manifest> {
        let bytes = self.fetch_manifest_bytes()?;
        manifest::open(&bytes, trusted)
            .with_context(|| format!("rejected the channel file {}", self.manifest_url()))
    }

    /// Opens a payload for streaming.
    pub fn open_payload(&self, rel: &str) -> Result<Box<dyn Read + Send>> {
        let url = self.payload_url(rel);
        Ok(Box::new(self.get(&url)?.into_reader()))
    }
}
