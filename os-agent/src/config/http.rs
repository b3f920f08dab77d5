//! `[http]`: how the agent reaches HTTP servers (the update channel,
//! registries, the config URL). Without it, the environment's
//! `https_proxy`/`http_proxy`/`no_proxy` apply.

use anyhow::{bail, Result};
use serde::Deserialize;

pub const KNOWN_KEYS: &[&str] = &["http", "http.proxy", "http.no_proxy"];

#[derive(Debug, Default, Deserialize)]
pub struct PartialHttp {
    proxy: Option<String>,
    no_proxy: Option<Vec<String>>,
}

/// The proxy for every request of the agent, and the hosts it does not
/// apply to.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HttpSettings {
    pub proxy: Option<String>,
    /// Host names, domains (`.example.com` or `example.com`: with
    /// subdomains), IP addresses or CIDR blocks, as curl's `no_proxy`.
    pub no_proxy: Vec<String>,
}

impl HttpSettings {
    /// Client options for these settings.
    pub fn options(&self, redirects: crate::http::Redirects) -> crate::http::Options {
        let mut opts = crate::http::Options::new(redirects);
        opts.proxy = self.proxy.clone().map(|url| crate::http::ProxySettings {
            url,
            no_proxy: self.no_proxy.join(","),
        });
        opts
    }
}

pub fn merge(into: &mut PartialHttp, from: PartialHttp) {
    if from.proxy.is_some() {
        into.proxy = from.proxy;
    }
    if from.no_proxy.is_some() {
        into.no_proxy = from.no_proxy;
    }
}

pub fn validate(p: PartialHttp) -> Result<HttpSettings> {
    if let Some(proxy) = &p.proxy {
        let url = url::Url::parse(proxy)
            .map_err(|e| anyhow::anyhow!("http.proxy: {proxy:?} is not a URL: {e}"))?;
        if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none() {
            bail!("http.proxy: {proxy:?} must be an http:// or https:// URL with a host");
        }
        if !matches!(url.path(), "" | "/") || url.query().is_some() {
            bail!("http.proxy: {proxy:?} must name a proxy (scheme, host, port), not a path");
        }
    }
    let no_proxy = p.no_proxy.unwrap_or_default();
    for (i, h) in no_proxy.iter().enumerate() {
        if h.is_empty() || h.chars().any(|c| c.is_whitespace() || c == ',') {
            bail!("http.no_proxy[{i}]: {h:?} is not a host name, domain, address or CIDR block");
        }
    }
    if p.proxy.is_none() && !no_proxy.is_empty() {
        bail!("http.no_proxy is set without http.proxy");
    }
    Ok(HttpSettings {
        proxy: p.proxy,
        no_proxy,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(proxy: Option<&str>, no_proxy: Option<&[&str]>) -> Result<HttpSettings, String> {
        validate(PartialHttp {
            proxy: proxy.map(str::to_string),
            no_proxy: no_proxy.map(|l| l.iter().map(|s| s.to_string()).collect()),
        })
        .map_err(|e| e.to_string())
    }

    #[test]
    fn table() {
        assert_eq!(v(None, None), Ok(HttpSettings::default()));
        let ok = v(
            Some("http://proxy.lan:3128"),
            Some(&["10.0.0.0/8", ".corp.example", "registry.lan"]),
        )
        .unwrap();
        assert_eq!(ok.no_proxy.len(), 3);
        for (proxy, no_proxy, want) in [
            (
                Some("socks5://p:1080"),
                None,
                "http.proxy: \"socks5://p:1080\" must be an http:// or https:// URL",
            ),
            (
                Some("proxy.lan:3128"),
                None,
                "http.proxy: \"proxy.lan:3128\" must be an http",
            ),
            (
                Some("not a url"),
                None,
                "http.proxy: \"not a url\" is not a URL",
            ),
            (Some("http://p:3128/path"), None, "not a path"),
            (
                Some("http://p:3128"),
                Some(&["a b"][..]),
                "http.no_proxy[0]",
            ),
            (
                Some("http://p:3128"),
                Some(&["a,b"][..]),
                "http.no_proxy[0]",
            ),
            (
                None,
                Some(&["a"][..]),
                "http.no_proxy is set without http.proxy",
            ),
        ] {
            let err = v(proxy, no_proxy).expect_err(want);
            assert!(err.contains(want), "{proxy:?} {no_proxy:?}: {err}");
        }
    }
}
