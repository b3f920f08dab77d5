//! An update channel for the guest: a directory of static files served on
//! 127.0.0.1 (port picked at run time), reached from the guest through a
//! QEMU `guestfwd` at [`GUEST_CHANNEL_URL`], and filled with
//! `image-build release` from the update test images the Makefile builds.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use anyhow::{bail, Context, Result};
use tempfile::TempDir;

/// Where the guest finds the channel (see [`ChannelServer::guest_forward`]).
pub const GUEST_CHANNEL_URL: &str = "http://10.0.2.100";
const GUEST_ADDR: &str = "10.0.2.100:80";

/// The test-only signing key the test image trusts.
pub const TEST_KEY: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/fixtures/channel-test.secret");

fn workspace() -> PathBuf {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest.parent().unwrap_or(manifest).to_path_buf()
}

/// `target/release/image-build`, which the Makefile builds before the images.
pub fn image_build() -> PathBuf {
    workspace().join("target/release/image-build")
}

/// The build directory of a test image built beside the main one (the
/// update tests' releases, the metal image): `<test image dir>-<suffix>`
/// (`out/test-v2` for `qemu-tests/test-image-v2.yaml`). Panics, saying how
/// to build it, if it is missing.
pub fn sibling_build(suffix: &str) -> PathBuf {
    let base = crate::TestImage::get().dir.clone();
    let mut name = base.file_name().unwrap_or_default().to_os_string();
    name.push(format!("-{suffix}"));
    let dir = base.with_file_name(name);
    if !dir.join("build.json").is_file() {
        panic!(
            "no test image in {}: build it with `make test-image`, or \
             `target/release/image-build build --config qemu-tests/test-image-{suffix}.yaml \
             --output {}`",
            dir.display(),
            dir.display()
        );
    }
    dir
}

/// A channel directory and the HTTP server serving it; both go when dropped.
pub struct ChannelServer {
    dir: TempDir,
    port: u16,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl ChannelServer {
    pub fn start() -> Result<ChannelServer> {
        let dir = tempfile::Builder::new()
            .prefix("ballast-channel-")
            .tempdir()
            .context("creating the channel directory")?;
        let listener = TcpListener::bind("127.0.0.1:0").context("binding the channel server")?;
        let port = listener.local_addr()?.port();
        let stop = Arc::new(AtomicBool::new(false));
        let (root, flag) = (dir.path().to_path_buf(), stop.clone());
        let thread = std::thread::spawn(move || {
            for conn in listener.incoming() {
                if flag.load(Ordering::SeqCst) {
                    break;
                }
                if let Ok(c) = conn {
                    let root = root.clone();
                    std::thread::spawn(move || serve(&root, c));
                }
            }
        });
        Ok(ChannelServer {
            dir,
            port,
            stop,
            thread: Some(thread),
        })
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The `guestfwd` rule for [`crate::VmOptions::guest_forwards`]. QEMU
    /// connects a `tcp:` chardev once, at start, so it carries one guest
    /// connection only; `cmd:` runs netcat for each connection instead
    /// (netcat-openbsd, in the Makefile's host packages).
    pub fn guest_forward(&self) -> String {
        format!("tcp:{GUEST_ADDR}-cmd:nc 127.0.0.1 {}", self.port)
    }

    /// Publishes a build to channel `stable`, signed with `key`.
    pub fn publish(&self, build: &Path, key: &Path) -> Result<()> {
        let out = Command::new(image_build())
            .arg("release")
            .arg("--build")
            .arg(build)
            .arg("--channel-dir")
            .arg(self.dir())
            .args(["--channel", "stable", "--key"])
            .arg(key)
            .output()
            .with_context(|| format!("running {}", image_build().display()))?;
        if !out.status.success() {
            bail!(
                "image-build release --build {} failed ({}): {}",
                build.display(),
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(())
    }

    /// Holds every answer for `path` (a file of the channel directory) until
    /// the returned guard is dropped, so a test can cut the power while the
    /// agent waits for it.
    pub fn hold(&self, path: &Path) -> Result<Hold> {
        let marker = hold_marker(path);
        std::fs::write(&marker, b"").with_context(|| format!("creating {}", marker.display()))?;
        Ok(Hold { marker })
    }

    /// The path in the channel directory of the UKI of the current manifest.
    pub fn uki_payload(&self) -> Result<PathBuf> {
        self.payload("uki")
    }

    /// The path in the channel directory of the root payload of the current
    /// manifest (for tampering with it).
    pub fn root_payload(&self) -> Result<PathBuf> {
        self.payload("root")
    }

    fn payload(&self, which: &str) -> Result<PathBuf> {
        let path = self.dir().join("channels/stable.json");
        let env: serde_json::Value = serde_json::from_slice(
            &std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?,
        )?;
        let text = env["manifest"]
            .as_str()
            .context("envelope has no manifest")?;
        let m: serde_json::Value = serde_json::from_str(text)?;
        let url = m[which]["url"]
            .as_str()
            .with_context(|| format!("manifest has no {which}.url"))?;
        Ok(self.dir().join(url))
    }
}

impl Drop for ChannelServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the accept loop so it sees the flag.
        drop(TcpStream::connect(("127.0.0.1", self.port)));
        if let Some(t) = self.thread.take() {
            if t.join().is_err() {
                eprintln!("the channel server thread panicked");
            }
        }
    }
}

/// While this lives, the channel server holds its answers for one file.
pub struct Hold {
    marker: PathBuf,
}

impl Drop for Hold {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_file(&self.marker) {
            eprintln!(
                "channel server: cannot remove {}: {e}",
                self.marker.display()
            );
        }
    }
}

fn hold_marker(file: &Path) -> PathBuf {
    let mut name = file.file_name().unwrap_or_default().to_os_string();
    name.push(".hold");
    file.with_file_name(name)
}

/// How long an answer is held at most (a test that forgot its hold still ends).
const MAX_HOLD: std::time::Duration = std::time::Duration::from_secs(900);

/// Answers one GET with the file, or 404.
fn serve(root: &Path, mut c: TcpStream) {
    let mut req = Vec::new();
    let mut buf = [0u8; 2048];
    while !req.windows(4).any(|w| w == b"\r\n\r\n") {
        match c.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => req.extend_from_slice(&buf[..n]),
        }
    }
    let text = String::from_utf8_lossy(&req);
    let path = text.split_whitespace().nth(1).unwrap_or("/").to_string();
    let file = root.join(path.trim_start_matches('/'));
    let held = std::time::Instant::now();
    while hold_marker(&file).exists() && held.elapsed() < MAX_HOLD {
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let opened = if path.contains("..") {
        None
    } else {
        std::fs::File::open(&file)
            .ok()
            .filter(|f| f.metadata().is_ok_and(|m| m.is_file()))
    };
    let result = match opened {
        Some(mut f) => {
            let len = f.metadata().map(|m| m.len()).unwrap_or(0);
            c.write_all(
                format!("HTTP/1.1 200 OK\r\nContent-Length: {len}\r\nConnection: close\r\n\r\n")
                    .as_bytes(),
            )
            .and_then(|()| std::io::copy(&mut f, &mut c).map(|_| ()))
        }
        None => {
            c.write_all(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
        }
    };
    if let Err(e) = result {
        eprintln!("channel server: {path}: {e}");
    }
}
