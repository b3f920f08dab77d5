//! Where user data comes from: a URL on the kernel command line, QEMU
//! fw_cfg, or a NoCloud seed volume, tried in that order; the first that has
//! data wins. A source that is there but cannot be read is an error, not a
//! reason to try the next one: the operator meant that source.

use crate::host::Host;
use crate::http;
use std::fmt;
use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use url::Url;

/// The kernel command-line parameter naming a user-data URL.
pub const CMDLINE_URL_KEY: &str = "ballast.config_url";
/// Where the fw_cfg driver shows its files; missing until `qemu_fw_cfg` loads.
pub const FW_CFG_DIR: &str = "/sys/firmware/qemu_fw_cfg";
/// fw_cfg file names (`-fw_cfg name=opt/org.ballast/user-data,file=...`).
pub const FW_CFG_USER_DATA: &str = "opt/org.ballast/user-data";
pub const FW_CFG_META_DATA: &str = "opt/org.ballast/meta-data";
pub const FW_CFG_NETWORK_CONFIG: &str = "opt/org.ballast/network-config";
/// The labels cloud-init's NoCloud source accepts (`cloud-localds` writes the
/// lowercase one on iso9660, vfat tools the uppercase one).
pub const SEED_LABELS: [&str; 2] = ["cidata", "CIDATA"];
const BY_LABEL: &str = "/dev/disk/by-label";
/// Exists while udev still has events queued (systemd 252).
const UDEV_QUEUE: &str = "/run/udev/queue";
/// Largest document any source may deliver; user data is text, and this
/// bounds what a broken server or seed can make us hold.
pub const MAX_DOC_BYTES: u64 = 16 << 20;

/// Which source a document came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SourceKind {
    /// `ballast.config_url=<url>` on the kernel command line.
    KernelCmdlineUrl(String),
    /// QEMU fw_cfg `opt/org.ballast/user-data`.
    FwCfg,
    /// A `cidata` volume on this block device.
    NoCloud { device: String },
}

impl fmt::Display for SourceKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SourceKind::KernelCmdlineUrl(u) => write!(f, "url {u}"),
            SourceKind::FwCfg => write!(f, "fw_cfg"),
            SourceKind::NoCloud { device } => write!(f, "nocloud {device}"),
        }
    }
}

/// The raw documents one source delivered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserDataDoc {
    pub source: SourceKind,
    pub user_data: Vec<u8>,
    pub meta_data: Option<Vec<u8>>,
    pub network_config: Option<Vec<u8>>,
    /// What the source found worth saying (user data over plain http); kept
    /// in the provisioning record with the document's own warnings.
    pub warnings: Vec<String>,
}

/// Why a source that is there could not be read.
#[derive(thiserror::Error, Debug)]
pub enum SourceError {
    #[error("reading the kernel command line {path}: {source}")]
    Cmdline {
        path: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("{CMDLINE_URL_KEY}={url:?} on the kernel command line: {why}")]
    BadUrl { url: String, why: String },
    #[error(
        "fetching user data from {url} failed after {attempts} attempt(s) over {:.1} s; last: {last}",
        elapsed.as_secs_f64()
    )]
    Url {
        url: String,
        attempts: u32,
        elapsed: Duration,
        last: String,
    },
    #[error("reading fw_cfg {path}: {source}")]
    FwCfg {
        path: String,
        #[source]
        source: io::Error,
    },
    #[error("looking for a NoCloud seed ({what}): {why}")]
    SeedLookup { what: String, why: String },
    #[error("NoCloud seed {device}: {what}")]
    Seed { device: String, what: String },
    #[error("NoCloud seed {device}: reading {file}: {source}")]
    SeedFile {
        device: String,
        file: String,
        #[source]
        source: io::Error,
    },
}

/// Knobs of [`discover_with`]; [`discover`] uses the defaults.
#[derive(Debug, Clone)]
pub struct DiscoverOptions {
    /// How long to keep retrying a URL, in total.
    pub url_timeout: Duration,
    /// How long to wait for udev to finish (so a seed device's by-label link
    /// exists) before concluding there is no seed.
    pub seed_wait: Duration,
}

impl DiscoverOptions {
    pub fn new(url_timeout: Duration) -> DiscoverOptions {
        DiscoverOptions {
            url_timeout,
            seed_wait: Duration::from_secs(10),
        }
    }
}

/// Tries each source in order and returns the first that has data; `None`
/// when no source has any.
pub fn discover(
    host: &dyn Host,
    url_timeout: Duration,
) -> Result<Option<UserDataDoc>, SourceError> {
    discover_with(host, &DiscoverOptions::new(url_timeout))
}

/// [`discover`] with every knob.
pub fn discover_with(
    host: &dyn Host,
    opts: &DiscoverOptions,
) -> Result<Option<UserDataDoc>, SourceError> {
    let cmdline = host
        .read_to_string(Path::new("/proc/cmdline"))
        .map_err(|source| SourceError::Cmdline {
            path: "/proc/cmdline",
            source,
        })?;
    if let Some(url) = config_url(&cmdline) {
        tracing::info!("user data source: {CMDLINE_URL_KEY}={url}");
        // The image's own `[http]` (a proxy): user data cannot set the
        // proxy it is fetched through.
        let http = match crate::config::load(host) {
            Ok(loaded) => loaded.settings.http.options(http::Redirects::SameHost),
            Err(e) => {
                tracing::warn!("fetching user data without the agent's [http] settings: {e:#}");
                http::Options::new(http::Redirects::SameHost)
            }
        };
        let user_data = fetch_url_with(&url, &RetryPolicy::new(opts.url_timeout), http)?;
        let warnings = plain_http_warning(&url).into_iter().collect();
        return Ok(Some(UserDataDoc {
            source: SourceKind::KernelCmdlineUrl(url),
            user_data,
            meta_data: None,
            network_config: None,
            warnings,
        }));
    }
    if let Some(doc) = read_fw_cfg(host)? {
        tracing::info!("user data source: fw_cfg {FW_CFG_USER_DATA}");
        return Ok(Some(doc));
    }
    if let Some(device) = find_seed(host, opts.seed_wait)? {
        tracing::info!("user data source: NoCloud seed {device}");
        return read_seed(host, &device).map(Some);
    }
    tracing::info!("no user data: no {CMDLINE_URL_KEY}=, no fw_cfg {FW_CFG_USER_DATA}, no volume labelled cidata");
    Ok(None)
}

// ---------------------------------------------------------------------------
// 1. URL on the kernel command line

/// The last `ballast.config_url=` on a command line (a later one wins, as
/// for the kernel's own parameters).
pub fn config_url(cmdline: &str) -> Option<String> {
    crate::cmdline::value(&crate::cmdline::words(cmdline), CMDLINE_URL_KEY).map(str::to_string)
}

/// How [`fetch_url`] retries: exponential backoff from `first_backoff`,
/// capped at `max_backoff`, until `total` has passed.
#[derive(Debug, Clone)]
pub struct RetryPolicy {
    pub total: Duration,
    pub first_backoff: Duration,
    pub max_backoff: Duration,
    /// Longest single attempt (connect plus response).
    pub attempt_timeout: Duration,
}

impl RetryPolicy {
    pub fn new(total: Duration) -> RetryPolicy {
        RetryPolicy {
            total,
            first_backoff: Duration::from_millis(500),
            max_backoff: Duration::from_secs(8),
            attempt_timeout: Duration::from_secs(15),
        }
    }
}

/// The warning for user data fetched over plain http, if it is.
pub fn plain_http_warning(url: &str) -> Option<String> {
    url.to_ascii_lowercase().starts_with("http://").then(|| {
        format!(
            "{CMDLINE_URL_KEY}={url}: user data over plain http can be read and changed by anyone on the path; use https"
        )
    })
}

/// What one attempt at the URL came to.
enum Attempt {
    Done(Vec<u8>),
    /// Worth trying again (no answer yet, a 5xx, 408, 429).
    Retry(String),
    /// Trying again will not help (a 404, a body too large, a refused
    /// redirect).
    Fatal(String),
}

/// Fetches `url` (http or https), retrying while the network or the server is
/// not ready, for at most `policy.total`. Redirects are followed only to the
/// same host ([`http::Redirects::SameHost`]).
pub fn fetch_url(url: &str, policy: &RetryPolicy) -> Result<Vec<u8>, SourceError> {
    fetch_url_with(url, policy, http::Options::new(http::Redirects::SameHost))
}

/// [`fetch_url`] with a client built from `opts` (tests give theirs a CA).
pub(crate) fn fetch_url_with(
    url: &str,
    policy: &RetryPolicy,
    opts: http::Options,
) -> Result<Vec<u8>, SourceError> {
    let bad_url = |why: String| SourceError::BadUrl {
        url: url.to_string(),
        why,
    };
    let parsed =
        Url::parse(url).map_err(|e| bad_url(format!("not an http:// or https:// URL: {e}")))?;
    if !matches!(parsed.scheme(), "http" | "https") {
        return Err(bad_url(
            "only http:// and https:// URLs are supported".into(),
        ));
    }
    if let Some(warning) = plain_http_warning(url) {
        tracing::warn!("{warning}");
    }
    let started = Instant::now();
    let mut backoff = policy.first_backoff;
    let mut attempts = 0u32;
    let mut last_client: Option<(Duration, http::Client)> = None;
    loop {
        attempts += 1;
        let left = policy.total.saturating_sub(started.elapsed());
        let timeout = left
            .min(policy.attempt_timeout)
            .max(Duration::from_millis(100));
        // One client per attempt length: the last attempts may be shorter.
        let client = match &last_client {
            Some((t, c)) if *t == timeout => c.clone(),
            _ => {
                let pace = http::Pace {
                    stall: timeout,
                    ..http::Pace::DEFAULT
                };
                let c =
                    http::Client::new(&opts.clone().pace(pace)).map_err(|e| SourceError::Url {
                        url: url.to_string(),
                        attempts,
                        elapsed: started.elapsed(),
                        last: e.to_string(),
                    })?;
                last_client = Some((timeout, c.clone()));
                c
            }
        };
        let (last, fatal) = match attempt(&client, url) {
            Attempt::Done(body) => {
                tracing::info!(
                    "fetched {} bytes of user data from {url} (attempt {attempts})",
                    body.len()
                );
                return Ok(body);
            }
            Attempt::Retry(why) => (why, false),
            Attempt::Fatal(why) => (why, true),
        };
        let elapsed = started.elapsed();
        if fatal || elapsed + backoff >= policy.total {
            return Err(SourceError::Url {
                url: url.to_string(),
                attempts,
                elapsed,
                last,
            });
        }
        tracing::warn!("fetching {url} (attempt {attempts}): {last}; retrying in {backoff:?}");
        std::thread::sleep(backoff);
        backoff = (backoff * 2).min(policy.max_backoff);
    }
}

/// One GET of `url`, following the redirects the client's policy allows.
fn attempt(client: &http::Client, url: &str) -> Attempt {
    // The caller's error names the URL: these say only what happened.
    let resp = match client.get(url).expect_size(MAX_DOC_BYTES).send() {
        Ok(resp) => resp,
        Err(http::Error::Redirect { message, .. }) => return Attempt::Fatal(message),
        Err(http::Error::Transport { message, .. }) => return Attempt::Retry(message),
        Err(e) => return Attempt::Fatal(e.to_string()),
    };
    let code = resp.status();
    if !(200..300).contains(&code) {
        let why = match resp.into_status_error() {
            http::Error::Status { status, body, .. } if body.is_empty() => {
                format!("HTTP {status}")
            }
            http::Error::Status { status, body, .. } => format!("HTTP {status}: {body}"),
            other => other.to_string(),
        };
        return if code >= 500 || code == 408 || code == 429 {
            Attempt::Retry(why)
        } else {
            Attempt::Fatal(why)
        };
    }
    let mut body = Vec::new();
    let read = resp
        .into_body()
        .take(MAX_DOC_BYTES + 1)
        .read_to_end(&mut body);
    match read {
        Err(e) => Attempt::Retry(format!("reading the response body: {e}")),
        Ok(_) if body.len() as u64 > MAX_DOC_BYTES => {
            Attempt::Fatal(format!("the response is larger than {MAX_DOC_BYTES} bytes"))
        }
        Ok(_) => Attempt::Done(body),
    }
}

// ---------------------------------------------------------------------------
// 2. QEMU fw_cfg

/// The sysfs file holding fw_cfg file `name`.
pub fn fw_cfg_path(name: &str) -> PathBuf {
    Path::new(FW_CFG_DIR).join("by_name").join(name).join("raw")
}

fn read_fw_cfg(host: &dyn Host) -> Result<Option<UserDataDoc>, SourceError> {
    let dir = Path::new(FW_CFG_DIR);
    let fw_err = |path: &Path| {
        let path = path.display().to_string();
        move |source| SourceError::FwCfg { path, source }
    };
    if !host.exists(dir).map_err(fw_err(dir))? {
        // Not every kernel loads the driver by itself; off QEMU there is no
        // device and modprobe may fail, which just means no fw_cfg.
        match host.run("modprobe", &["qemu_fw_cfg"]) {
            Ok(out) if out.success() => {}
            Ok(out) => tracing::debug!("modprobe qemu_fw_cfg: {}", out.describe()),
            Err(e) => tracing::debug!("modprobe qemu_fw_cfg: {e}"),
        }
        if !host.exists(dir).map_err(fw_err(dir))? {
            return Ok(None);
        }
    }
    let Some(user_data) = read_optional(host, &fw_cfg_path(FW_CFG_USER_DATA))
        .map_err(fw_err(&fw_cfg_path(FW_CFG_USER_DATA)))?
    else {
        return Ok(None);
    };
    let meta_data = read_optional(host, &fw_cfg_path(FW_CFG_META_DATA))
        .map_err(fw_err(&fw_cfg_path(FW_CFG_META_DATA)))?;
    let network_config = read_optional(host, &fw_cfg_path(FW_CFG_NETWORK_CONFIG))
        .map_err(fw_err(&fw_cfg_path(FW_CFG_NETWORK_CONFIG)))?;
    Ok(Some(UserDataDoc {
        source: SourceKind::FwCfg,
        user_data,
        meta_data,
        network_config,
        warnings: Vec::new(),
    }))
}

/// Reads a file; `None` if it does not exist. Larger than [`MAX_DOC_BYTES`]
/// is an error.
fn read_optional(host: &dyn Host, path: &Path) -> io::Result<Option<Vec<u8>>> {
    match host.read(path) {
        Ok(bytes) if bytes.len() as u64 > MAX_DOC_BYTES => Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "{} bytes, more than the {MAX_DOC_BYTES} allowed",
                bytes.len()
            ),
        )),
        Ok(bytes) => Ok(Some(bytes)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

// ---------------------------------------------------------------------------
// 3. NoCloud seed

/// The block device labelled `cidata`/`CIDATA`, if any. Waits up to
/// `wait` while udev still has events queued, so a seed disk probed late in
/// boot is not missed; without a queue it does not wait at all.
pub fn find_seed(host: &dyn Host, wait: Duration) -> Result<Option<String>, SourceError> {
    let started = Instant::now();
    loop {
        if let Some(dev) = seed_by_label(host)? {
            return Ok(Some(dev));
        }
        let queued = host
            .exists(Path::new(UDEV_QUEUE))
            .map_err(|e| SourceError::SeedLookup {
                what: UDEV_QUEUE.into(),
                why: e.to_string(),
            })?;
        if !queued || started.elapsed() >= wait {
            break;
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    // udev may not have made the link (no udev rules for the filesystem,
    // a device that appeared without an event): ask blkid, which probes
    // the devices itself.
    seed_by_blkid(host)
}

fn seed_by_label(host: &dyn Host) -> Result<Option<String>, SourceError> {
    for label in SEED_LABELS {
        let link = Path::new(BY_LABEL).join(label);
        let lookup_err = |e: io::Error| SourceError::SeedLookup {
            what: link.display().to_string(),
            why: e.to_string(),
        };
        if !host.exists(&link).map_err(lookup_err)? {
            continue;
        }
        let dev = host.canonicalize(&link).map_err(lookup_err)?;
        return Ok(Some(dev.display().to_string()));
    }
    Ok(None)
}

fn seed_by_blkid(host: &dyn Host) -> Result<Option<String>, SourceError> {
    for label in SEED_LABELS {
        let token = format!("LABEL={label}");
        // -c /dev/null: probe afresh rather than trust a stale cache.
        let args = ["-c", "/dev/null", "-o", "device", "-t", token.as_str()];
        let what = format!("blkid {}", args.join(" "));
        let out = host
            .run("blkid", &args)
            .map_err(|e| SourceError::SeedLookup {
                what: what.clone(),
                why: e.to_string(),
            })?;
        match out.code {
            Some(0) => {}
            // blkid: 2 means no device matched.
            Some(2) => continue,
            _ => {
                return Err(SourceError::SeedLookup {
                    what,
                    why: out.describe(),
                })
            }
        }
        if let Some(dev) = out.stdout.lines().map(str::trim).find(|l| !l.is_empty()) {
            return Ok(Some(dev.to_string()));
        }
    }
    Ok(None)
}

/// Mounts the seed read-only on a fresh directory under /run, reads its
/// files, and unmounts it again whatever happened.
pub fn read_seed(host: &dyn Host, device: &str) -> Result<UserDataDoc, SourceError> {
    let seed_err = |what: String| SourceError::Seed {
        device: device.to_string(),
        what,
    };
    let mktemp = host
        .run("mktemp", &["-d", "/run/ballast-seed.XXXXXX"])
        .map_err(|e| seed_err(format!("making a mount point: {e}")))?;
    let dir = mktemp.stdout.trim().to_string();
    if !mktemp.success() || dir.is_empty() {
        return Err(seed_err(format!(
            "making a mount point with mktemp: {}",
            mktemp.describe()
        )));
    }
    let result = mount_and_read(host, device, &dir);
    match host.run("rmdir", &[dir.as_str()]) {
        Ok(out) if out.success() => {}
        Ok(out) => tracing::warn!("removing mount point {dir}: {}", out.describe()),
        Err(e) => tracing::warn!("removing mount point {dir}: {e}"),
    }
    result
}

fn mount_and_read(host: &dyn Host, device: &str, dir: &str) -> Result<UserDataDoc, SourceError> {
    let seed_err = |what: String| SourceError::Seed {
        device: device.to_string(),
        what,
    };
    let mount = host
        .run(
            "mount",
            &[
                "-t",
                "iso9660,vfat",
                "-o",
                "ro,nodev,nosuid,noexec",
                device,
                dir,
            ],
        )
        .map_err(|e| seed_err(format!("mounting on {dir}: {e}")))?;
    if !mount.success() {
        return Err(seed_err(format!(
            "mounting (iso9660 or vfat) on {dir}: {}",
            mount.describe()
        )));
    }
    let result = read_seed_files(host, device, Path::new(dir));
    let umount = host
        .run("umount", &[dir])
        .map_err(|e| e.to_string())
        .and_then(|out| {
            if out.success() {
                Ok(())
            } else {
                Err(out.describe())
            }
        });
    if let Err(why) = umount {
        // The documents are read; a seed left mounted read-only harms
        // nothing, so this is worth a warning, not a failed provisioning.
        tracing::warn!("NoCloud seed {device}: unmounting {dir}: {why}");
    }
    result
}

fn read_seed_files(host: &dyn Host, device: &str, dir: &Path) -> Result<UserDataDoc, SourceError> {
    let read = |file: &str| {
        read_optional(host, &dir.join(file)).map_err(|source| SourceError::SeedFile {
            device: device.to_string(),
            file: file.to_string(),
            source,
        })
    };
    let user_data = read("user-data")?.ok_or_else(|| SourceError::SeedFile {
        device: device.to_string(),
        file: "user-data".into(),
        source: io::Error::new(io::ErrorKind::NotFound, "the seed has no user-data file"),
    })?;
    Ok(UserDataDoc {
        source: SourceKind::NoCloud {
            device: device.to_string(),
        },
        user_data,
        meta_data: read("meta-data")?,
        network_config: read("network-config")?,
        warnings: Vec::new(),
    })
}

#[cfg(test)]
mod tests;
