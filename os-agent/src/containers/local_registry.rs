//! A real OCI registry (Debian's `docker-registry`) on 127.0.0.1 with a port
//! chosen at run time and storage in a temporary directory, killed on drop;
//! images written as OCI layouts (layers from [`layer_tar`]) and pushed to it
//! with skopeo. For the registry tests, the containers bench and the QEMU
//! tests, as [`crate::fleet::server`] is for etcd: the agent never runs it.

use anyhow::{bail, Context, Result};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub const REGISTRY_BIN: &str = "/usr/bin/docker-registry";

/// How the registry wants clients to authenticate.
pub enum Auth<'a> {
    None,
    /// Basic auth against this htpasswd file content (bcrypt hashes).
    Htpasswd(&'a str),
    /// Bearer tokens from a token service at `realm`: JWTs for `service`
    /// from `issuer`, signed by a key whose certificate chains to the PEM
    /// bundle `root_cert`.
    Token {
        realm: &'a str,
        service: &'a str,
        issuer: &'a str,
        root_cert: &'a Path,
    },
}

pub struct Registry {
    child: Child,
    pub addr: String,
    pub dir: tempfile::TempDir,
}

impl Registry {
    pub fn start() -> Result<Registry> {
        Registry::start_with_auth(None)
    }

    /// With `htpasswd` (file content, bcrypt hashes), the registry wants
    /// Basic auth for everything.
    pub fn start_with_auth(htpasswd: Option<&str>) -> Result<Registry> {
        Registry::start_with(match htpasswd {
            Some(content) => Auth::Htpasswd(content),
            None => Auth::None,
        })
    }

    pub fn start_with(auth: Auth<'_>) -> Result<Registry> {
        if !Path::new(REGISTRY_BIN).exists() {
            bail!(
                "{REGISTRY_BIN} is missing: install the docker-registry package (make deps does)"
            );
        }
        let dir = tempfile::tempdir().context("tempdir")?;
        // A free port: bind to 0, note the port, let go, hand it to the registry.
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .context("cannot find a free port")?
            .port();
        let addr = format!("127.0.0.1:{port}");
        let storage = dir.path().join("storage");
        let config = dir.path().join("config.yml");
        let auth = match auth {
            Auth::Htpasswd(content) => {
                let file = dir.path().join("htpasswd");
                std::fs::write(&file, content).context("cannot write htpasswd")?;
                format!(
                    "auth:\n  htpasswd:\n    realm: ballast-test\n    path: {}\n",
                    file.display()
                )
            }
            Auth::Token {
                realm,
                service,
                issuer,
                root_cert,
            } => format!(
                "auth:\n  token:\n    realm: {realm}\n    service: {service}\n    issuer: {issuer}\n    rootcertbundle: {}\n",
                root_cert.display()
            ),
            Auth::None => String::new(),
        };
        std::fs::write(
            &config,
            format!(
                "version: 0.1\nlog:\n  level: error\n  accesslog:\n    disabled: true\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\nhttp:\n  addr: {addr}\n{auth}",
                storage.display()
            ),
        )
        .context("cannot write the registry config")?;
        let log = std::fs::File::create(dir.path().join("registry.log")).context("registry log")?;
        let child = Command::new(REGISTRY_BIN)
            .arg("serve")
            .arg(&config)
            .stdout(log.try_clone().context("registry log")?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("cannot start {REGISTRY_BIN}"))?;
        let mut reg = Registry { child, addr, dir };
        let deadline = Instant::now() + Duration::from_secs(20);
        let probe = crate::http::Client::new(
            &crate::http::Options::new(crate::http::Redirects::SameHost).pace(crate::http::Pace {
                stall: Duration::from_secs(2),
                ..crate::http::Pace::DEFAULT
            }),
        )?;
        loop {
            if let Some(status) = reg.child.try_wait().context("registry wait")? {
                bail!("the registry exited with {status}: {}", reg.log());
            }
            let url = format!("http://{}/v2/", reg.addr);
            // Any HTTP answer (401 with auth) means it is serving.
            if probe.get(&url).send().is_ok() {
                return Ok(reg);
            }
            if Instant::now() > deadline {
                bail!(
                    "the registry did not answer on {url} within 20 s: {}",
                    reg.log()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("registry.log"))
            .unwrap_or_else(|e| format!("(no log: {e})"))
    }

    /// Where the registry keeps a blob's bytes (distribution's filesystem layout).
    pub fn blob_data(&self, hex: &str) -> PathBuf {
        self.dir
            .path()
            .join("storage/docker/registry/v2/blobs/sha256")
            .join(&hex[..2])
            .join(hex)
            .join("data")
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        // Best effort in a destructor: a registry already gone is fine, and a
        // failure to kill is reported rather than hidden.
        if let Err(e) = self.child.kill() {
            eprintln!("cannot kill the registry: {e}");
        }
        if let Err(e) = self.child.wait() {
            eprintln!("cannot reap the registry: {e}");
        }
    }
}

/// One entry of a layer tar built by [`layer_tar`].
pub enum Entry<'a> {
    Dir(&'a str),
    /// A regular file, mode 0644.
    File(&'a str, Vec<u8>),
    /// A regular file, mode 0755.
    Executable(&'a str, Vec<u8>),
    Symlink(&'a str, &'a str),
    Hardlink(&'a str, &'a str),
}

/// A layer tar of `entries`, owned by root, with a fixed modification time.
pub fn layer_tar(entries: &[Entry<'_>]) -> Result<Vec<u8>> {
    let mut b = tar::Builder::new(Vec::new());
    for e in entries {
        let mut h = tar::Header::new_gnu();
        h.set_mtime(1_700_000_000);
        h.set_uid(0);
        h.set_gid(0);
        h.set_size(0);
        match e {
            Entry::Dir(p) => {
                h.set_entry_type(tar::EntryType::Directory);
                h.set_mode(0o755);
                b.append_data(&mut h, p, std::io::empty())?;
            }
            Entry::File(p, data) | Entry::Executable(p, data) => {
                h.set_entry_type(tar::EntryType::Regular);
                h.set_mode(if matches!(e, Entry::File(..)) {
                    0o644
                } else {
                    0o755
                });
                h.set_size(data.len() as u64);
                b.append_data(&mut h, p, &data[..])?;
            }
            Entry::Symlink(p, t) => {
                h.set_entry_type(tar::EntryType::Symlink);
                h.set_mode(0o777);
                b.append_link(&mut h, p, t)?;
            }
            Entry::Hardlink(p, t) => {
                h.set_entry_type(tar::EntryType::Link);
                h.set_mode(0o644);
                b.append_link(&mut h, p, t)?;
            }
        }
    }
    Ok(b.into_inner()?)
}

/// Runs `cmd`; its stdout, or an error with both outputs.
pub fn run(cmd: &mut Command) -> Result<String> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("cannot run {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Pushes `layout:tag` (an OCI layout) to the registry as `repo:tag`.
pub fn push(layout: &Path, tag: &str, reg: &Registry, repo: &str, all: bool) -> Result<()> {
    push_as(layout, tag, reg, repo, all, None)
}

/// As [`push`], with `user:password` credentials.
pub fn push_as(
    layout: &Path,
    tag: &str,
    reg: &Registry,
    repo: &str,
    all: bool,
    creds: Option<&str>,
) -> Result<()> {
    let mut cmd = Command::new("skopeo");
    cmd.args(["copy", "--quiet", "--dest-tls-verify=false"]);
    if let Some(c) = creds {
        cmd.arg(format!("--dest-creds={c}"));
    }
    if all {
        cmd.arg("--all");
    }
    cmd.arg(format!("oci:{}:{tag}", layout.display()))
        .arg(format!("docker://{}/{repo}:{tag}", reg.addr));
    run(&mut cmd).map(drop)
}

/// Starts an OCI layout at `layout`: its blob directory and `oci-layout`.
pub fn init_layout(layout: &Path) -> Result<()> {
    std::fs::create_dir_all(layout.join("blobs/sha256"))?;
    std::fs::write(
        layout.join("oci-layout"),
        r#"{"imageLayoutVersion":"1.0.0"}"#,
    )?;
    Ok(())
}

/// Writes `bytes` as a blob of the layout; returns its descriptor.
pub fn put_blob(layout: &Path, media_type: &str, bytes: &[u8]) -> Result<serde_json::Value> {
    use sha2::Digest as _;
    let hex = hex::encode(sha2::Sha256::digest(bytes));
    std::fs::write(layout.join("blobs/sha256").join(&hex), bytes)?;
    Ok(
        serde_json::json!({"mediaType": media_type, "digest": format!("sha256:{hex}"), "size": bytes.len()}),
    )
}

/// Writes one image into the layout: the layer blobs (media type, bytes)
/// with their uncompressed digests, an image config for this host's
/// platform whose `config` (Cmd, Entrypoint, Env, …) is `run`, and its
/// manifest. Returns the manifest's descriptor, for an index to name.
pub fn put_image(
    layout: &Path,
    layers: &[(&str, Vec<u8>, String)],
    run: serde_json::Value,
) -> Result<serde_json::Value> {
    let mut descs = Vec::new();
    for (media_type, bytes, _) in layers {
        descs.push(put_blob(layout, media_type, bytes)?);
    }
    let diff_ids: Vec<&String> = layers.iter().map(|(_, _, d)| d).collect();
    let config = serde_json::json!({
        "architecture": super::oci::Platform::host().architecture, "os": "linux",
        "config": run,
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
    });
    let config = put_blob(
        layout,
        "application/vnd.oci.image.config.v1+json",
        &serde_json::to_vec(&config)?,
    )?;
    let manifest = serde_json::json!({
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": config, "layers": descs,
    });
    put_blob(
        layout,
        "application/vnd.oci.image.manifest.v1+json",
        &serde_json::to_vec(&manifest)?,
    )
}

/// The descriptor `d` named `tag` in a layout's index.json.
pub fn tagged(d: &serde_json::Value, tag: &str) -> serde_json::Value {
    let mut e = d.clone();
    e["annotations"] = serde_json::json!({"org.opencontainers.image.ref.name": tag});
    e
}

/// Writes an OCI layout at `layout` with one image tagged `tag`: the given
/// layer blobs (media type, bytes) and their uncompressed digests, and an
/// image config for this host's platform running `cmd`.
pub fn write_layout(
    layout: &Path,
    tag: &str,
    layers: &[(&str, Vec<u8>, String)],
    cmd: &[&str],
) -> Result<()> {
    init_layout(layout)?;
    let manifest = put_image(layout, layers, serde_json::json!({"Cmd": cmd}))?;
    let index = serde_json::json!({"schemaVersion": 2, "manifests": [tagged(&manifest, tag)]});
    std::fs::write(layout.join("index.json"), serde_json::to_vec(&index)?)?;
    Ok(())
}
