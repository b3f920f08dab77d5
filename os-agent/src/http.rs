//! The agent's one HTTP client, for the update channel, container registries
//! and the provisioning config URL (reqwest over rustls).
//!
//! What every transfer gets from here, so no caller has to remember it:
//! - the system trust store (`/etc/ssl/certs`), plus the PEM certificates in
//!   [`EXTRA_ROOTS_DIR`] (cloud-config `ca_certs:`);
//! - proxies from the environment (`https_proxy`, `http_proxy`, `no_proxy`);
//! - a redirect policy ([`redirect_allowed`]): at most [`MAX_REDIRECTS`],
//!   never from https to http, and for [`Redirects::SameHost`] never to
//!   another host;
//! - a pace: a transfer that sends nothing for [`Pace::stall`], or less than
//!   [`Pace::min_rate`] bytes a second over any [`Pace::window`], or that runs
//!   past a deadline proportional to its expected size, fails with an error
//!   that says which, so a trickling server cannot hold the update lock
//!   forever.
//!
//! Callers are blocking code (the update engine and the container puller run
//! in `spawn_blocking`, the CLIs are synchronous): each request is driven on
//! the daemon's tokio runtime through its handle, or on a runtime of the
//! client's own where there is none. Never call these from async code.

use std::future::Future;
use std::io::{self, Read};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// PEM files of extra trusted roots, one or more certificates each.
pub const EXTRA_ROOTS_DIR: &str = "/etc/ballast/ca-certificates";
/// Redirects one request may follow.
pub const MAX_REDIRECTS: usize = 5;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);
/// How much of an error response's body goes into the message.
const ERROR_BODY_BYTES: usize = 512;

/// Where a redirect may lead.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Redirects {
    /// Any host (registries hand blobs to a CDN; channel files and payloads
    /// are verified by signature and hash whoever serves them).
    AnyHost,
    /// Only the same host (the port may change): the config URL, whose body
    /// is trusted as it comes. Another host would be a source the operator
    /// did not name, and with https the certificate checked is the one of the
    /// host the redirect names.
    SameHost,
}

/// Why a redirect is not followed.
#[derive(thiserror::Error, Debug, Clone, PartialEq, Eq)]
pub enum RedirectRefused {
    #[error("more than {MAX_REDIRECTS} redirects")]
    TooMany,
    #[error("redirect to {to}: only http:// and https:// URLs are supported")]
    Scheme { to: String },
    #[error("redirect from https to plain http ({to}) refused")]
    Downgrade { to: String },
    #[error("redirect from host {from:?} to another host {to:?} refused")]
    OtherHost { from: String, to: String },
}

/// Whether a request at `from`, having followed `followed` redirects
/// already, may follow one to `to`: at most [`MAX_REDIRECTS`], to http(s)
/// only, never from https to http, and under [`Redirects::SameHost`] only
/// to the same host.
pub fn redirect_allowed(
    policy: Redirects,
    from: &url::Url,
    to: &url::Url,
    followed: usize,
) -> Result<(), RedirectRefused> {
    if followed >= MAX_REDIRECTS {
        return Err(RedirectRefused::TooMany);
    }
    if !matches!(to.scheme(), "http" | "https") {
        return Err(RedirectRefused::Scheme { to: to.to_string() });
    }
    if from.scheme() == "https" && to.scheme() == "http" {
        return Err(RedirectRefused::Downgrade { to: to.to_string() });
    }
    // `Url` lower-cases host names and normalises IP addresses.
    if policy == Redirects::SameHost && from.host() != to.host() {
        let host = |u: &url::Url| u.host_str().unwrap_or_default().to_string();
        return Err(RedirectRefused::OtherHost {
            from: host(from),
            to: host(to),
        });
    }
    Ok(())
}

/// How slow a transfer may be before it is given up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pace {
    /// Least average rate over every `window`, in bytes per second.
    pub min_rate: u64,
    pub window: Duration,
    /// Longest wait for the response or the next bytes.
    pub stall: Duration,
}

impl Pace {
    /// 8 KiB/s (64 kbit/s) over each minute; a minute without a byte.
    pub const DEFAULT: Pace = Pace {
        min_rate: 8 * 1024,
        window: Duration::from_secs(60),
        stall: Duration::from_secs(60),
    };

    /// The whole transfer's deadline for `size` bytes: one window to get
    /// going, then the size at the minimum rate.
    pub fn deadline(&self, size: u64) -> Duration {
        let secs = size / self.min_rate.max(1);
        self.window.saturating_add(Duration::from_secs(secs))
    }
}

/// A transfer measured against its [`Pace`].
#[derive(Debug)]
struct Meter {
    pace: Pace,
    deadline: Option<Instant>,
    window_start: Instant,
    window_bytes: u64,
    total: u64,
}

impl Meter {
    fn new(pace: Pace, expected: Option<u64>, now: Instant) -> Meter {
        Meter {
            pace,
            deadline: expected.and_then(|n| now.checked_add(pace.deadline(n))),
            window_start: now,
            window_bytes: 0,
            total: 0,
        }
    }

    /// Counts `n` bytes that arrived at `now`; an error once the transfer
    /// is too slow.
    fn record(&mut self, n: usize, now: Instant) -> Result<(), String> {
        self.total = self.total.saturating_add(n as u64);
        self.window_bytes = self.window_bytes.saturating_add(n as u64);
        if self.past_deadline(now) {
            return Err(self.deadline_message());
        }
        let elapsed = now.saturating_duration_since(self.window_start);
        if elapsed >= self.pace.window {
            let need = self.pace.min_rate.saturating_mul(elapsed.as_secs());
            if self.window_bytes < need {
                return Err(format!(
                    "too slow: {} bytes in {} s, below the minimum of {} B/s",
                    self.window_bytes,
                    elapsed.as_secs(),
                    self.pace.min_rate
                ));
            }
            self.window_start = now;
            self.window_bytes = 0;
        }
        Ok(())
    }

    fn past_deadline(&self, now: Instant) -> bool {
        self.deadline.is_some_and(|d| now >= d)
    }

    fn deadline_message(&self) -> String {
        format!(
            "not finished by its deadline ({} bytes so far; the deadline allows {} B/s)",
            self.total, self.pace.min_rate
        )
    }

    /// How long the next wait may be: the stall limit, or less if the
    /// deadline is nearer.
    fn next_wait(&self, now: Instant) -> Duration {
        match self.deadline {
            Some(d) => self.pace.stall.min(d.saturating_duration_since(now)),
            None => self.pace.stall,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("GET {url}: HTTP {status}{}", if body.is_empty() { String::new() } else { format!(": {body}") })]
    Status {
        url: String,
        status: u16,
        body: String,
    },
    #[error("GET {url}: {message}")]
    Transport { url: String, message: String },
    /// A redirect the policy refused: trying again will not help.
    #[error("GET {url}: {message}")]
    Redirect { url: String, message: String },
    #[error("cannot set up the HTTP client: {0}")]
    Setup(String),
}

/// The runtime requests are driven on.
#[derive(Clone)]
enum Exec {
    Shared(tokio::runtime::Handle),
    Own(Arc<tokio::runtime::Runtime>),
}

impl Exec {
    fn new() -> Result<Exec, Error> {
        match tokio::runtime::Handle::try_current() {
            Ok(h) => Ok(Exec::Shared(h)),
            Err(_) => tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map(|rt| Exec::Own(Arc::new(rt)))
                .map_err(|e| Error::Setup(format!("cannot start a tokio runtime: {e}"))),
        }
    }

    fn block_on<F: Future>(&self, f: F) -> F::Output {
        match self {
            Exec::Shared(h) => h.block_on(f),
            Exec::Own(rt) => rt.block_on(f),
        }
    }
}

/// What a client is for.
#[derive(Debug, Clone)]
pub struct Options {
    pub redirects: Redirects,
    pub pace: Pace,
    /// Also trust the certificates in the PEM files of this directory.
    pub extra_roots: Option<std::path::PathBuf>,
    /// The agent's `[http] proxy`: before the environment's.
    pub proxy: Option<ProxySettings>,
}

/// A proxy for every request, and the hosts it does not apply to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProxySettings {
    pub url: String,
    /// Comma-separated, as curl's `no_proxy`.
    pub no_proxy: String,
}

impl Options {
    pub fn new(redirects: Redirects) -> Options {
        Options {
            redirects,
            pace: Pace::DEFAULT,
            extra_roots: Some(EXTRA_ROOTS_DIR.into()),
            proxy: None,
        }
    }

    pub fn pace(mut self, pace: Pace) -> Options {
        self.pace = pace;
        self
    }
}

#[derive(Clone)]
pub struct Client {
    inner: reqwest::Client,
    exec: Exec,
    pace: Pace,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client").field("pace", &self.pace).finish()
    }
}

/// The certificates of every `*.pem`/`*.crt` file in `dir` (none if it does
/// not exist); a file that does not parse is an error naming it.
fn extra_roots(dir: &Path) -> Result<Vec<reqwest::Certificate>, Error> {
    let entries = match std::fs::read_dir(dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(Error::Setup(format!("cannot list {}: {e}", dir.display()))),
    };
    let mut paths = Vec::new();
    for entry in entries {
        let entry =
            entry.map_err(|e| Error::Setup(format!("cannot list {}: {e}", dir.display())))?;
        let path = entry.path();
        if matches!(
            path.extension().and_then(|e| e.to_str()),
            Some("pem" | "crt")
        ) {
            paths.push(path);
        }
    }
    paths.sort();
    let mut certs = Vec::new();
    for path in paths {
        let pem = std::fs::read(&path)
            .map_err(|e| Error::Setup(format!("cannot read {}: {e}", path.display())))?;
        check_roots_pem(&pem).map_err(|why| Error::Setup(format!("{}: {why}", path.display())))?;
        let found = reqwest::Certificate::from_pem_bundle(&pem)
            .map_err(|e| Error::Setup(format!("{}: not PEM certificates: {e}", path.display())))?;
        certs.extend(found);
    }
    Ok(certs)
}

/// Whether `pem` holds certificates a client can trust as roots: PEM
/// framing, at least one certificate, and each one a certificate the TLS
/// stack accepts as a trust anchor (what [`Client::new`] will need of a file
/// in [`EXTRA_ROOTS_DIR`]).
pub fn check_roots_pem(pem: &[u8]) -> Result<(), String> {
    let certs = reqwest::Certificate::from_pem_bundle(pem)
        .map_err(|e| format!("not PEM certificates: {e}"))?;
    if certs.is_empty() || !pem.windows(27).any(|w| w == b"-----BEGIN CERTIFICATE-----") {
        return Err("holds no PEM certificate (-----BEGIN CERTIFICATE-----)".into());
    }
    let mut builder = reqwest::Client::builder();
    for cert in certs {
        builder = builder.add_root_certificate(cert);
    }
    builder
        .build()
        .map(drop)
        .map_err(|e| format!("not a certificate that can be trusted: {}", chain(&e)))
}

impl Client {
    pub fn new(opts: &Options) -> Result<Client, Error> {
        let policy = opts.redirects;
        let redirect = reqwest::redirect::Policy::custom(move |attempt| {
            // `previous` holds the URLs asked so far, the first included.
            let followed = attempt.previous().len().saturating_sub(1);
            let checked = match attempt.previous().last() {
                Some(from) => redirect_allowed(policy, from, attempt.url(), followed),
                None => Ok(()),
            };
            match checked {
                Ok(()) => attempt.follow(),
                Err(why) => attempt.error(why),
            }
        });
        let mut builder = reqwest::Client::builder()
            .connect_timeout(CONNECT_TIMEOUT)
            .redirect(redirect)
            .user_agent(concat!("ballast-os-agent/", env!("CARGO_PKG_VERSION")));
        if let Some(p) = &opts.proxy {
            let proxy = reqwest::Proxy::all(&p.url)
                .map_err(|e| Error::Setup(format!("proxy {}: {}", p.url, chain(&e))))?
                .no_proxy(reqwest::NoProxy::from_string(&p.no_proxy));
            builder = builder.proxy(proxy);
        }
        if let Some(dir) = &opts.extra_roots {
            for cert in extra_roots(dir)? {
                builder = builder.add_root_certificate(cert);
            }
        }
        let inner = builder.build().map_err(|e| Error::Setup(chain(&e)))?;
        Ok(Client {
            inner,
            exec: Exec::new()?,
            pace: opts.pace,
        })
    }

    pub fn get(&self, url: &str) -> Request<'_> {
        Request {
            client: self,
            url: url.to_string(),
            headers: Vec::new(),
            expected: None,
        }
    }
}

/// An error and its causes on one line (reqwest's own text names only the
/// outermost: "error sending request").
fn chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        text.push_str(": ");
        text.push_str(&c.to_string());
        cause = c.source();
    }
    text
}

pub struct Request<'c> {
    client: &'c Client,
    url: String,
    headers: Vec<(String, String)>,
    expected: Option<u64>,
}

impl Request<'_> {
    pub fn header(mut self, name: &str, value: &str) -> Self {
        self.headers.push((name.to_string(), value.to_string()));
        self
    }

    /// The body's expected size (a manifest's `size`, a descriptor's): the
    /// whole transfer must finish within [`Pace::deadline`] of it.
    pub fn expect_size(mut self, bytes: u64) -> Self {
        self.expected = Some(bytes);
        self
    }

    /// Sends the request; any HTTP status is a [`Response`] (see
    /// [`Response::ok`]).
    pub fn send(self) -> Result<Response, Error> {
        let client = self.client;
        let url = self.url;
        let transport = |message: String| Error::Transport {
            url: url.clone(),
            message,
        };
        let mut req = client.inner.get(&url);
        for (k, v) in &self.headers {
            req = req.header(k, v);
        }
        let meter = Meter::new(client.pace, self.expected, Instant::now());
        let wait = meter.next_wait(Instant::now());
        let resp = client
            .exec
            .block_on(async { tokio::time::timeout(wait, req.send()).await })
            .map_err(|_| transport(format!("timed out: no response in {} s", wait.as_secs())))?
            .map_err(|e| {
                if e.is_redirect() {
                    Error::Redirect {
                        url: url.clone(),
                        message: chain(&e),
                    }
                } else {
                    transport(chain(&e))
                }
            })?;
        Ok(Response {
            url: url.clone(),
            status: resp.status().as_u16(),
            headers: resp.headers().clone(),
            body: Body {
                exec: client.exec.clone(),
                resp,
                url,
                chunk: bytes::Bytes::new(),
                meter,
            },
        })
    }
}

pub struct Response {
    url: String,
    status: u16,
    headers: reqwest::header::HeaderMap,
    body: Body,
}

impl Response {
    pub fn status(&self) -> u16 {
        self.status
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    /// A header's value, if present and text.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// The response if it is a success (2xx), else an error with the status
    /// and the start of the body.
    pub fn ok(self) -> Result<Response, Error> {
        if (200..300).contains(&self.status) {
            return Ok(self);
        }
        Err(self.into_status_error())
    }

    /// This response as an error: its status and the start of its body.
    pub fn into_status_error(self) -> Error {
        let (url, status) = (self.url.clone(), self.status);
        let mut body = Vec::new();
        // The body is only for the message: a failure to read it shows as
        // its absence, not hidden.
        let text = match self
            .into_body()
            .take(ERROR_BODY_BYTES as u64)
            .read_to_end(&mut body)
        {
            Ok(_) => String::from_utf8_lossy(&body).trim().to_string(),
            Err(e) => format!("(body unreadable: {e})"),
        };
        Error::Status {
            url,
            status,
            body: text,
        }
    }

    pub fn into_body(self) -> Body {
        self.body
    }
}

/// A response body as a blocking reader, paced.
pub struct Body {
    exec: Exec,
    resp: reqwest::Response,
    url: String,
    chunk: bytes::Bytes,
    meter: Meter,
}

impl Read for Body {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.chunk.is_empty() {
            let wait = self.meter.next_wait(Instant::now());
            let next = self
                .exec
                .block_on(async { tokio::time::timeout(wait, self.resp.chunk()).await });
            let chunk = match next {
                Err(_) => {
                    let why = if self.meter.past_deadline(Instant::now()) {
                        self.meter.deadline_message()
                    } else {
                        format!(
                            "no data for {} s ({} bytes so far)",
                            wait.as_secs(),
                            self.meter.total
                        )
                    };
                    return Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        format!("GET {}: {why}", self.url),
                    ));
                }
                Ok(Err(e)) => {
                    return Err(io::Error::other(format!("GET {}: {}", self.url, chain(&e))))
                }
                Ok(Ok(None)) => return Ok(0),
                Ok(Ok(Some(c))) => c,
            };
            self.meter
                .record(chunk.len(), Instant::now())
                .map_err(|why| {
                    io::Error::new(io::ErrorKind::TimedOut, format!("GET {}: {why}", self.url))
                })?;
            self.chunk = chunk;
        }
        let n = buf.len().min(self.chunk.len());
        buf[..n].copy_from_slice(&self.chunk[..n]);
        self.chunk = self.chunk.slice(n..);
        Ok(n)
    }
}

#[cfg(test)]
mod tests;
#[cfg(test)]
pub(crate) mod tls_server;
