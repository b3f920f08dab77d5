//! Pulling images from an OCI distribution (v2) registry: anonymous or
//! bearer-token auth from the registry's `WWW-Authenticate` challenge,
//! manifests and indexes resolved to this host's platform, every blob
//! verified against its digest as it streams into the [`Store`], layers
//! unpacked into a new image directory that appears only when complete.
//!
//! Registries on loopback addresses are spoken to over plain HTTP (as docker
//! does); any other over HTTPS unless named in `insecure`.

use super::oci::{self, Document, Manifest, OciError, Platform};
use super::reference::{Digest, Reference};
use super::store::{Image, ImageInfo, Store, StoreError};
use super::unpack::{self, UnpackError};
use crate::http;
use crate::update::io::LimitReader;
use std::collections::{BTreeMap, HashMap};
use std::io::Read;
use std::sync::Mutex;

#[derive(Debug, thiserror::Error)]
pub enum PullError {
    #[error("GET {url}: HTTP {status}: {body}")]
    Http {
        url: String,
        status: u16,
        body: String,
    },
    #[error("GET {url}: {message}")]
    Transport { url: String, message: String },
    #[error(transparent)]
    Client(#[from] http::Error),
    #[error("{registry}: authentication: {message}")]
    Auth { registry: String, message: String },
    #[error("{what}: served with digest {actual}, expected {expected}; refused")]
    ManifestDigest {
        what: String,
        expected: String,
        actual: String,
    },
    #[error(transparent)]
    Oci(#[from] OciError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("layer {digest}: {source}")]
    Unpack {
        digest: Digest,
        #[source]
        source: UnpackError,
    },
    #[error("layer {digest}: uncompressed, it has digest sha256:{actual}, but the image config's rootfs.diff_ids[{index}] is {expected}; refused")]
    DiffId {
        digest: Digest,
        index: usize,
        expected: Digest,
        actual: String,
    },
}

/// A user name and password for a registry (basic auth, or to get a token).
#[derive(Debug, Clone)]
pub struct Credentials {
    pub username: String,
    pub password: String,
}

/// A `WWW-Authenticate` challenge: its scheme and parameters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Challenge {
    pub scheme: String,
    pub params: BTreeMap<String, String>,
}

/// Parses `Bearer realm="https://auth",service="reg",scope="repository:a:pull"`.
pub fn parse_challenge(s: &str) -> Result<Challenge, String> {
    let s = s.trim();
    let (scheme, mut rest) = s.split_once(' ').unwrap_or((s, ""));
    if scheme.is_empty() || !scheme.bytes().all(|b| b.is_ascii_alphanumeric()) {
        return Err(format!("{s:?} is not an authentication challenge"));
    }
    let mut params = BTreeMap::new();
    loop {
        rest = rest.trim_start_matches([' ', ',']);
        if rest.is_empty() {
            break;
        }
        let Some((key, after)) = rest.split_once('=') else {
            return Err(format!("{s:?}: parameter without a value at {rest:?}"));
        };
        let key = key.trim().to_ascii_lowercase();
        let (value, after) = if let Some(q) = after.strip_prefix('"') {
            let mut value = String::new();
            let mut chars = q.char_indices();
            let end = loop {
                match chars.next() {
                    Some((_, '\\')) => match chars.next() {
                        Some((_, c)) => value.push(c),
                        None => return Err(format!("{s:?}: unterminated quoted value")),
                    },
                    Some((i, '"')) => break i,
                    Some((_, c)) => value.push(c),
                    None => return Err(format!("{s:?}: unterminated quoted value")),
                }
            };
            (value, &q[end + 1..])
        } else {
            let end = after.find(',').unwrap_or(after.len());
            (after[..end].trim().to_string(), &after[end..])
        };
        params.insert(key, value);
        rest = after;
    }
    Ok(Challenge {
        scheme: scheme.to_ascii_lowercase(),
        params,
    })
}

fn query_escape(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// The index (if any, with its bytes), the manifest's digest, bytes and content.
type Resolved = (Option<(Digest, Vec<u8>)>, Digest, Vec<u8>, Manifest);

/// A finished pull.
#[derive(Debug)]
pub struct Pulled {
    pub image: Image,
    /// Bytes fetched from the registry (0 when everything was in the store).
    pub downloaded: u64,
}

pub struct Puller<'a> {
    client: http::Client,
    store: &'a Store,
    platform: Platform,
    insecure: Vec<String>,
    credentials: HashMap<String, Credentials>,
    /// Authorization header per (registry, repository), once obtained.
    auth: Mutex<HashMap<(String, String), String>>,
}

/// The host of `host[:port]` (brackets of an IPv6 address removed).
fn host_of(authority: &str) -> &str {
    let host = match authority.rsplit_once(':') {
        Some((h, p)) if p.bytes().all(|b| b.is_ascii_digit()) => h,
        _ => authority,
    };
    host.trim_start_matches('[').trim_end_matches(']')
}

/// A URL's scheme (`http` or `https`) and host; `None` for anything else,
/// user info included (`http://registry@evil/`).
fn url_scheme_host(url: &str) -> Option<(&str, &str)> {
    let (scheme, rest) = url.split_once("://")?;
    if !matches!(scheme, "http" | "https") {
        return None;
    }
    let authority = &rest[..rest.find(['/', '?', '#']).unwrap_or(rest.len())];
    if authority.is_empty() || authority.contains('@') {
        return None;
    }
    Some((scheme, host_of(authority)))
}

fn is_loopback(registry: &str) -> bool {
    let host = host_of(registry);
    host == "localhost"
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

impl<'a> Puller<'a> {
    /// A puller with the agent's HTTP client: the system trust store and
    /// extra roots, proxies from the environment, redirects to any host
    /// (registries hand blobs to CDNs; every byte is checked against its
    /// digest) but never from https to http, and paced transfers.
    pub fn new(store: &'a Store) -> Result<Puller<'a>, PullError> {
        let client = http::Client::new(&http::Options::new(http::Redirects::AnyHost))?;
        Ok(Puller::with_client(store, client))
    }

    pub fn with_client(store: &'a Store, client: http::Client) -> Puller<'a> {
        Puller {
            client,
            store,
            platform: Platform::host(),
            insecure: Vec::new(),
            credentials: HashMap::new(),
            auth: Mutex::new(HashMap::new()),
        }
    }

    /// Registries (host:port) to speak plain HTTP to.
    pub fn insecure(mut self, registries: Vec<String>) -> Self {
        self.insecure = registries;
        self
    }

    pub fn credentials(mut self, registry: &str, c: Credentials) -> Self {
        self.credentials.insert(registry.to_string(), c);
        self
    }

    pub fn platform(mut self, p: Platform) -> Self {
        self.platform = p;
        self
    }

    fn base(&self, registry: &str) -> String {
        if is_loopback(registry) || self.insecure.iter().any(|i| i == registry) {
            format!("http://{registry}")
        } else {
            format!("https://{registry}")
        }
    }

    fn auth_header(&self, r: &Reference) -> Option<String> {
        let key = (r.registry.clone(), r.repository.clone());
        match self.auth.lock() {
            Ok(m) => m.get(&key).cloned(),
            Err(poisoned) => poisoned.into_inner().get(&key).cloned(),
        }
    }

    fn set_auth_header(&self, r: &Reference, value: String) {
        let key = (r.registry.clone(), r.repository.clone());
        match self.auth.lock() {
            Ok(mut m) => m.insert(key, value),
            Err(poisoned) => poisoned.into_inner().insert(key, value),
        };
    }

    /// Answers a 401's challenge: a bearer token from the realm (with
    /// credentials if we have them), or basic auth.
    fn authenticate(&self, r: &Reference, header: Option<&str>) -> Result<(), PullError> {
        let auth_err = |message: String| PullError::Auth {
            registry: r.registry.clone(),
            message,
        };
        let header =
            header.ok_or_else(|| auth_err("401 without a WWW-Authenticate challenge".into()))?;
        let ch = parse_challenge(header).map_err(auth_err)?;
        let creds = self.credentials.get(&r.registry);
        let basic = |c: &Credentials| {
            use base64::Engine;
            let raw = format!("{}:{}", c.username, c.password);
            format!(
                "Basic {}",
                base64::engine::general_purpose::STANDARD.encode(raw)
            )
        };
        match ch.scheme.as_str() {
            "basic" => {
                let c = creds.ok_or_else(|| {
                    auth_err(
                        "the registry wants a user name and password and none is configured".into(),
                    )
                })?;
                self.set_auth_header(r, basic(c));
                Ok(())
            }
            "bearer" => {
                let realm = ch
                    .params
                    .get("realm")
                    .ok_or_else(|| auth_err(format!("challenge {header:?} has no realm")))?;
                let (scheme, realm_host) = url_scheme_host(realm).ok_or_else(|| {
                    auth_err(format!("token realm {realm:?} is not an http(s) URL"))
                })?;
                // The credentials are the registry's: they go to a realm over
                // HTTPS, or over plain HTTP only to the registry's own host
                // when the registry itself is spoken to that way (loopback,
                // `insecure`). Anything else would hand them to whoever the
                // registry, or a man in the middle, names.
                let plain_registry = self.base(&r.registry).starts_with("http://");
                let same_host = realm_host.eq_ignore_ascii_case(host_of(&r.registry));
                if creds.is_some() && scheme != "https" && !(same_host && plain_registry) {
                    let where_ = if same_host {
                        "is plain HTTP while the registry is HTTPS"
                    } else {
                        "is on another host than the registry and is not HTTPS"
                    };
                    return Err(auth_err(format!(
                        "token realm {realm:?} {where_}: the registry's credentials are not sent there; refused"
                    )));
                }
                let scope = ch
                    .params
                    .get("scope")
                    .cloned()
                    .unwrap_or_else(|| format!("repository:{}:pull", r.repository));
                let mut url = format!("{realm}?scope={}", query_escape(&scope));
                if let Some(s) = ch.params.get("service") {
                    url.push_str(&format!("&service={}", query_escape(s)));
                }
                let mut req = self.client.get(&url).expect_size(1 << 20);
                if let Some(c) = creds {
                    req = req.header("Authorization", &basic(c));
                }
                let resp = req
                    .send()
                    .and_then(http::Response::ok)
                    .map_err(|e| auth_err(format!("token: {e}")))?;
                let mut body = Vec::new();
                LimitReader::new(resp.into_body(), 1 << 20)
                    .read_to_end(&mut body)
                    .map_err(|e| auth_err(format!("token from {url}: {e}")))?;
                #[derive(serde::Deserialize)]
                struct Token {
                    token: Option<String>,
                    access_token: Option<String>,
                }
                let t: Token = serde_json::from_slice(&body)
                    .map_err(|e| auth_err(format!("token from {url} is not JSON: {e}")))?;
                let token = t
                    .token
                    .or(t.access_token)
                    .filter(|t| !t.is_empty())
                    .ok_or_else(|| auth_err(format!("{url} gave no token")))?;
                self.set_auth_header(r, format!("Bearer {token}"));
                Ok(())
            }
            other => Err(auth_err(format!(
                "unsupported authentication scheme {other:?}"
            ))),
        }
    }

    /// GETs `/v2/<repo>/<path>` (whose body should be about `size` bytes:
    /// the transfer's deadline follows from it), answering one auth
    /// challenge.
    fn get(
        &self,
        r: &Reference,
        path: &str,
        accept: Option<&str>,
        size: u64,
    ) -> Result<http::Response, PullError> {
        let url = format!("{}/v2/{}/{path}", self.base(&r.registry), r.repository);
        let mut challenged = false;
        loop {
            let mut req = self.client.get(&url).expect_size(size);
            if let Some(a) = accept {
                req = req.header("Accept", a);
            }
            if let Some(h) = self.auth_header(r) {
                req = req.header("Authorization", &h);
            }
            let resp = req.send().map_err(|e| match e {
                http::Error::Transport { url, message }
                | http::Error::Redirect { url, message } => PullError::Transport { url, message },
                other => PullError::Client(other),
            })?;
            match resp.status() {
                200..=299 => return Ok(resp),
                401 if !challenged => {
                    challenged = true;
                    self.authenticate(r, resp.header("www-authenticate"))?;
                }
                _ => {
                    return Err(match resp.into_status_error() {
                        http::Error::Status { url, status, body } => {
                            PullError::Http { url, status, body }
                        }
                        other => PullError::Client(other),
                    })
                }
            }
        }
    }

    /// Fetches a manifest or index by tag or digest; its bytes are checked
    /// against the digest asked for, and against the one the registry claims.
    fn fetch_manifest(
        &self,
        r: &Reference,
        what: &str,
    ) -> Result<(Digest, Vec<u8>, Document), PullError> {
        let resp = self.get(
            r,
            &format!("manifests/{what}"),
            Some(oci::MANIFEST_ACCEPT),
            oci::MAX_MANIFEST,
        )?;
        let content_type = resp.header("content-type").map(str::to_string);
        let claimed = resp.header("docker-content-digest").map(str::to_string);
        let mut bytes = Vec::new();
        let desc = format!("manifest {r} ({what})");
        LimitReader::new(resp.into_body(), oci::MAX_MANIFEST)
            .read_to_end(&mut bytes)
            .map_err(|e| PullError::Transport {
                url: desc.clone(),
                message: e.to_string(),
            })?;
        let actual = format!(
            "sha256:{}",
            hex::encode(<sha2::Sha256 as sha2::Digest>::digest(&bytes))
        );
        for expected in [
            what.starts_with("sha256:").then(|| what.to_string()),
            claimed,
        ]
        .into_iter()
        .flatten()
        {
            if expected != actual {
                return Err(PullError::ManifestDigest {
                    what: desc,
                    expected,
                    actual,
                });
            }
        }
        let digest = Digest::parse(&actual).map_err(|why| PullError::ManifestDigest {
            what: desc.clone(),
            expected: why,
            actual: actual.clone(),
        })?;
        let doc = oci::parse_document(&bytes, content_type.as_deref(), &desc)?;
        Ok((digest, bytes, doc))
    }

    fn fetch_blob(&self, r: &Reference, d: &Digest, size: u64) -> Result<u64, PullError> {
        if self.store.has_blob(d) {
            return Ok(0);
        }
        let resp = self.get(r, &format!("blobs/{d}"), None, size)?;
        self.store.put_blob(d, size, resp.into_body())?;
        Ok(size)
    }

    /// Pulls `r` (resolving a tag to a manifest digest), stores and unpacks it.
    pub fn pull(&self, r: &Reference) -> Result<Pulled, PullError> {
        let (top, top_bytes, doc) = self.fetch_manifest(r, r.manifest_ref())?;
        let (index, manifest_digest, manifest_bytes, manifest): Resolved = match doc {
            Document::Manifest(m) => (None, top, top_bytes, m),
            Document::Index(entries) => {
                let what = format!("index of {r}");
                let chosen = oci::select_platform(&entries, &self.platform, &what)?.clone();
                let (d, bytes, doc) = self.fetch_manifest(r, chosen.digest.as_str())?;
                if bytes.len() as u64 != chosen.size {
                    return Err(StoreError::SizeMismatch {
                        digest: d,
                        expected: chosen.size,
                        actual: bytes.len() as u64,
                    }
                    .into());
                }
                let Document::Manifest(m) = doc else {
                    return Err(OciError::Invalid {
                        what,
                        why: format!(
                            "entry {} for {} is another index",
                            chosen.digest, self.platform
                        ),
                    }
                    .into());
                };
                (Some((top, top_bytes)), d, bytes, m)
            }
        };
        let key = reference_key(r);
        if let Some(image) = self.store.image(&manifest_digest)? {
            self.store.set_ref(&key, &manifest_digest)?;
            return Ok(Pulled {
                image,
                downloaded: 0,
            });
        }
        let mut downloaded = (manifest_bytes.len()) as u64;
        self.store.put_blob(
            &manifest_digest,
            manifest_bytes.len() as u64,
            &manifest_bytes[..],
        )?;
        if let Some((d, bytes)) = &index {
            downloaded += bytes.len() as u64;
            self.store.put_blob(d, bytes.len() as u64, &bytes[..])?;
        }
        downloaded += self.fetch_blob(r, &manifest.config.digest, manifest.config.size)?;
        let config_bytes = self.store.read_blob(&manifest.config.digest)?;
        let config = oci::parse_config(
            &config_bytes,
            manifest.layers.len(),
            &self.platform,
            &format!("config {} of {r}", manifest.config.digest),
        )?;
        let to_fetch: u64 = manifest
            .layers
            .iter()
            .filter(|l| !self.store.has_blob(&l.digest))
            .map(|l| l.size)
            .sum();
        self.store
            .check_room(&format!("image {manifest_digest} ({r})"), to_fetch)?;
        for l in &manifest.layers {
            downloaded += self.fetch_blob(r, &l.digest, l.size)?;
        }
        let info = ImageInfo {
            reference: key.clone(),
            manifest: manifest_digest.clone(),
            index: index.map(|(d, _)| d),
            config_digest: manifest.config.digest.clone(),
            layers: manifest.layers.iter().map(|l| l.digest.clone()).collect(),
            config: config.run,
        };
        let opts = unpack::Options::for_this_process();
        let store = self.store;
        let image = store.commit_image(info, |rootfs, room| -> Result<(), PullError> {
            let mut left = room.bytes;
            for (index, (l, expected)) in manifest.layers.iter().zip(&config.diff_ids).enumerate() {
                let path = store.blob_path(&l.digest);
                let f = std::fs::File::open(&path).map_err(|source| StoreError::Io {
                    what: format!("cannot open {}", path.display()),
                    source,
                })?;
                // Verified on the way in; unpacking reads the stored copy.
                let got = unpack::unpack_layer(f, rootfs, opts, left).map_err(|e| match e {
                    UnpackError::Quota { entry, .. } => PullError::Store(StoreError::Quota {
                        what: format!(
                            "image {manifest_digest} ({r}): layer {} entry {entry:?} takes it past {} bytes ({})",
                            l.digest, room.bytes, room.why
                        ),
                    }),
                    source => PullError::Unpack {
                        digest: l.digest.clone(),
                        source,
                    },
                })?;
                if got.diff_id != expected.hex() {
                    return Err(PullError::DiffId {
                        digest: l.digest.clone(),
                        index,
                        expected: expected.clone(),
                        actual: got.diff_id,
                    });
                }
                left -= got.bytes;
            }
            Ok(())
        })?;
        self.store.set_ref(&key, &manifest_digest)?;
        Ok(Pulled { image, downloaded })
    }
}

/// The key a reference's last resolution is kept under: registry/repo:tag,
/// or the digest when pinned.
pub fn reference_key(r: &Reference) -> String {
    format!("{}/{}:{}", r.registry, r.repository, r.manifest_ref())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn challenges_table() {
        type Want<'a> = Result<(&'a str, Vec<(&'a str, &'a str)>), &'a str>;
        let cases: Vec<(&str, Want)> = vec![
            (
                r#"Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:library/nginx:pull""#,
                Ok((
                    "bearer",
                    vec![
                        ("realm", "https://auth.docker.io/token"),
                        ("scope", "repository:library/nginx:pull"),
                        ("service", "registry.docker.io"),
                    ],
                )),
            ),
            (
                r#"Bearer realm="r",scope="repository:a:pull,push""#,
                Ok((
                    "bearer",
                    vec![("realm", "r"), ("scope", "repository:a:pull,push")],
                )),
            ),
            (
                r#"Basic realm="Registry Realm""#,
                Ok(("basic", vec![("realm", "Registry Realm")])),
            ),
            (
                "Bearer realm=plain, service=s",
                Ok(("bearer", vec![("realm", "plain"), ("service", "s")])),
            ),
            (
                r#"Bearer realm="a\"b""#,
                Ok(("bearer", vec![("realm", "a\"b")])),
            ),
            ("", Err("is not an authentication challenge")),
            ("Bea rer", Err("parameter without a value")),
            (r#"Bearer realm="open"#, Err("unterminated quoted value")),
            ("B@d realm=x", Err("is not an authentication challenge")),
        ];
        for (input, want) in cases {
            match (parse_challenge(input), want) {
                (Ok(c), Ok((scheme, params))) => {
                    let params: BTreeMap<String, String> = params
                        .into_iter()
                        .map(|(k, v)| (k.to_string(), v.to_string()))
                        .collect();
                    assert_eq!((c.scheme.as_str(), c.params), (scheme, params), "{input}");
                }
                (Err(e), Err(w)) => assert!(e.contains(w), "{input}: {e}"),
                (got, want) => panic!("{input}: got {got:?}, want {want:?}"),
            }
        }
    }

    #[test]
    fn loopback_is_plain_http() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path()).expect("store");
        let p = Puller::new(&store)
            .expect("puller")
            .insecure(vec!["reg.lan:5000".into()]);
        assert_eq!(p.base("127.0.0.1:5000"), "http://127.0.0.1:5000");
        assert_eq!(p.base("localhost"), "http://localhost");
        assert_eq!(p.base("reg.lan:5000"), "http://reg.lan:5000");
        assert_eq!(
            p.base("registry-1.docker.io"),
            "https://registry-1.docker.io"
        );
        assert_eq!(p.base("127.example.com"), "https://127.example.com");
    }

    #[test]
    fn realm_urls() {
        for (url, want) in [
            (
                "https://auth.docker.io/token",
                Some(("https", "auth.docker.io")),
            ),
            (
                "http://127.0.0.2:5001/token?x=1",
                Some(("http", "127.0.0.2")),
            ),
            ("http://[::1]:80/t", Some(("http", "::1"))),
            ("https://reg.lan", Some(("https", "reg.lan"))),
            ("http://reg.lan@evil.example/t", None),
            ("ftp://reg.lan/t", None),
            ("https:///t", None),
            ("reg.lan/t", None),
        ] {
            assert_eq!(url_scheme_host(url), want, "{url}");
        }
    }

    #[test]
    fn query_escaping() {
        assert_eq!(
            query_escape("repository:a/b:pull,push"),
            "repository%3Aa%2Fb%3Apull%2Cpush"
        );
    }
}
