//! What the containers test and bench share: a registry on the host with an
//! image whose process is busybox's httpd, reached by the guest through a
//! QEMU guest forward, and an HTTP probe of a guest port from the host.

use anyhow::{Context, Result};
use os_agent::containers::local_registry::{self, layer_tar, Entry, Registry};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::time::Duration;

/// Where the guest finds the registry.
pub const GUEST_REGISTRY: &str = "10.0.2.102:5000";
/// What the image's httpd serves at `/`.
pub const PAGE: &str = "hello from a ballast container\n";

/// A registry on 127.0.0.1 holding `test/web:1`: one layer with static
/// busybox (Debian's busybox-static) and [`PAGE`] in /www, its command
/// `httpd -f -p 8080 -h /www`.
pub struct WebImage {
    pub registry: Registry,
    /// The reference as the guest spells it.
    pub reference: String,
}

impl WebImage {
    pub fn push(work: &Path) -> Result<WebImage> {
        let registry = Registry::start()?;
        let busybox = std::fs::read("/bin/busybox")
            .context("reading /bin/busybox (is busybox-static installed? `make deps`)")?;
        let layer = layer_tar(&[
            Entry::Dir("bin/"),
            Entry::Executable("bin/busybox", busybox),
            Entry::Symlink("bin/sh", "busybox"),
            Entry::Dir("www/"),
            Entry::File("www/index.html", PAGE.as_bytes().to_vec()),
        ])?;
        let diff = {
            use sha2::Digest as _;
            format!("sha256:{}", hex::encode(sha2::Sha256::digest(&layer)))
        };
        let layout = work.join("layout");
        let cmd = ["/bin/busybox", "httpd", "-f", "-p", "8080", "-h", "/www"];
        local_registry::write_layout(
            &layout,
            "1",
            &[("application/vnd.oci.image.layer.v1.tar", layer, diff)],
            &cmd,
        )?;
        local_registry::push(&layout, "1", &registry, "test/web", false)?;
        Ok(WebImage {
            registry,
            reference: format!("{GUEST_REGISTRY}/test/web:1"),
        })
    }

    /// The guest forward that lets the guest reach the registry at
    /// [`GUEST_REGISTRY`] (for [`crate::VmOptions::guest_forwards`]).
    pub fn guest_forward(&self) -> String {
        let port = self.registry.addr.rsplit(':').next().unwrap_or_default();
        format!("tcp:{GUEST_REGISTRY}-cmd:nc 127.0.0.1 {port}")
    }

    /// The agent config that lets it speak plain HTTP to the registry.
    pub fn agent_config(&self) -> String {
        format!("[registries.\"{GUEST_REGISTRY}\"]\ninsecure = true\n")
    }

    /// A container of this image on the host network, listening on `port`,
    /// as the JSON an etcd key holds.
    pub fn container_json(&self, port: u16) -> String {
        format!(
            r#"{{"image": "{}", "network": "host", "command": ["/bin/busybox", "httpd", "-f", "-p", "{port}", "-h", "/www"], "memory": "64M"}}"#,
            self.reference
        )
    }

    /// A container of this image on a private network, its httpd's port
    /// 8080 published on the host's `port`.
    pub fn private_container_json(&self, port: u16) -> String {
        format!(
            r#"{{"image": "{}", "ports": ["{port}:8080"], "memory": "64M"}}"#,
            self.reference
        )
    }
}

/// One HTTP GET of `/` on 127.0.0.1:`port`; the body if the answer is 200.
pub fn http_get(port: u16) -> Option<String> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    s.write_all(b"GET / HTTP/1.0\r\nHost: test\r\n\r\n").ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    let (head, body) = out.split_once("\r\n\r\n")?;
    // "HTTP/1.0 200 OK" or "HTTP/1.1 200 OK", as the server likes.
    let status = head.lines().next()?.split_whitespace().nth(1)?;
    (status == "200").then(|| body.to_string())
}
