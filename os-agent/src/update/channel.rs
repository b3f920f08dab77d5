//! Talking to an update channel: a static directory over HTTP(S)
//! (docs/channel.md), and the keys the image trusts to sign it.

use crate::host::Host;
use crate::http;
use anyhow::{bail, Context, Result};
use ballast_common::keys::PublicKey;
use ballast_common::manifest::{self, Manifest};
use std::io::Read;
use std::path::Path;

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
#[derive(Clone, Debug)]
pub struct Channel {
    base: String,
    name: String,
    client: http::Client,
}

impl Channel {
    /// Redirects may lead anywhere (a CDN): what is fetched is verified by
    /// signature and hash, not by where it came from.
    pub fn new(base: &str, name: &str) -> Result<Channel> {
        Channel::with_options(base, name, &http::Options::new(http::Redirects::AnyHost))
    }

    pub fn with_options(base: &str, name: &str, opts: &http::Options) -> Result<Channel> {
        let client = http::Client::new(opts)
            .with_context(|| format!("cannot set up a client for the channel at {base}"))?;
        Ok(Channel {
            base: base.trim_end_matches('/').to_string(),
            name: name.to_string(),
            client,
        })
    }

    pub fn manifest_url(&self) -> String {
        format!("{}/channels/{}.json", self.base, self.name)
    }

    pub fn payload_url(&self, rel: &str) -> String {
        format!("{}/{}", self.base, rel)
    }

    /// GETs `url`, whose body should be about `size` bytes (the deadline
    /// of the transfer follows from it).
    fn get(&self, url: &str, size: u64) -> Result<http::Body> {
        let resp = self.client.get(url).expect_size(size).send()?.ok()?;
        Ok(resp.into_body())
    }

    /// Fetches the channel file (not yet verified).
    pub fn fetch_manifest_bytes(&self) -> Result<Vec<u8>> {
        let url = self.manifest_url();
        let body = self.get(&url, MAX_MANIFEST_BYTES)?;
        let mut bytes = Vec::new();
        body.take(MAX_MANIFEST_BYTES + 1)
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

    /// Opens a payload of `size` bytes (as the signed manifest says) for
    /// streaming.
    pub fn open_payload(&self, rel: &str, size: u64) -> Result<Box<dyn Read + Send>> {
        let url = self.payload_url(rel);
        Ok(Box::new(self.get(&url, size)?))
    }
}
