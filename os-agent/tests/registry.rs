//! The puller against a real registry: an image built here as an OCI layout, pushed
//! with skopeo to Debian's docker-registry on 127.0.0.1, pulled, verified and
//! unpacked by os-agent; a corrupted blob in the registry's storage is refused.

use anyhow::{Context, Result};
use os_agent::containers::local_registry::{
    init_layout, layer_tar, push, push_as, put_blob, put_image, tagged, write_layout, Entry,
    Registry,
};
use os_agent::containers::oci::Platform;
use os_agent::containers::reference::Reference;
use os_agent::containers::registry::{PullError, Puller};
use os_agent::containers::store::{Quota, Store, StoreError};
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

fn sha256_hex(b: &[u8]) -> String {
    hex::encode(<sha2::Sha256 as sha2::Digest>::digest(b))
}

/// Builds an OCI layout by hand with tag `v1` (four layers exercising links,
/// a whiteout and an opaque directory; gzip, plain and zstd) and tag `multi`
/// (an image index whose linux/<this arch> entry, and a made-up linux/arm64
/// one, is the `v1` manifest). umoci 0.4.7 (bookworm) writes truncated layer
/// tars on `insert`, so the layers come from the tar crate.
fn build_image(dir: &Path) -> Result<std::path::PathBuf> {
    use Entry::*;
    let layout = dir.join("layout");
    init_layout(&layout)?;
    let big = b"0123456789abcdef".repeat(4096);
    let layers = [
        layer_tar(&[
            Dir("./"),
            Dir("etc/"),
            Dir("bin/"),
            Dir("usr/"),
            Dir("usr/share/"),
            Dir("usr/share/doc/"),
            File("etc/greeting", b"hello from the registry\n".to_vec()),
            File("usr/share/doc/keep", b"kept\n".to_vec()),
            File("usr/share/doc/big", big),
            Symlink("bin/link", "../etc/greeting"),
            Hardlink("etc/hard", "etc/greeting"),
            Hardlink("etc/hard2", "etc/greeting"),
        ])?,
        layer_tar(&[File("etc/.wh.hard", Vec::new())])?,
        layer_tar(&[Dir("opt/"), File("opt/old", b"old\n".to_vec())])?,
        layer_tar(&[
            Dir("opt/"),
            File("opt/.wh..wh..opq", Vec::new()),
            File("opt/new", b"new\n".to_vec()),
        ])?,
    ];
    let mut blobs = Vec::new();
    for (i, l) in layers.iter().enumerate() {
        let diff_id = format!("sha256:{}", sha256_hex(l));
        let (media_type, bytes) = match i {
            1 => ("application/vnd.oci.image.layer.v1.tar", l.clone()),
            3 => (
                "application/vnd.oci.image.layer.v1.tar+zstd",
                zstd::encode_all(&l[..], 3)?,
            ),
            _ => {
                let mut gz =
                    flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
                std::io::Write::write_all(&mut gz, l)?;
                ("application/vnd.oci.image.layer.v1.tar+gzip", gz.finish()?)
            }
        };
        blobs.push((media_type, bytes, diff_id));
    }
    let manifest = put_image(
        &layout,
        &blobs,
        serde_json::json!({"Entrypoint": ["/bin/sh"], "Cmd": ["-c"], "Env": ["GREETING=hi"], "WorkingDir": "/opt"}),
    )?;
    let arch = Platform::host().architecture;
    let entry = |arch: &str| {
        let mut e = manifest.clone();
        e["platform"] = serde_json::json!({"os": "linux", "architecture": arch});
        e
    };
    let index = serde_json::json!({
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [entry("arm64"), entry(&arch)],
    });
    let index = put_blob(
        &layout,
        "application/vnd.oci.image.index.v1+json",
        &serde_json::to_vec(&index)?,
    )?;
    let top = serde_json::json!({"schemaVersion": 2, "manifests": [tagged(&manifest, "v1"), tagged(&index, "multi")]});
    fs::write(layout.join("index.json"), serde_json::to_vec(&top)?)?;
    Ok(layout)
}

fn read(root: &Path, p: &str) -> String {
    fs::read_to_string(root.join(p)).unwrap_or_else(|e| panic!("{p}: {e}"))
}

#[test]
fn pull_verify_unpack_and_refuse_corruption() -> Result<()> {
    let reg = Registry::start()?;
    let work = tempfile::tempdir()?;
    let layout = build_image(work.path())?;
    push(&layout, "v1", &reg, "test/app", false)?;
    push(&layout, "multi", &reg, "test/app", true)?;

    let store_dir = tempfile::tempdir()?;
    let store = Store::open(store_dir.path())?;
    let puller = Puller::new(&store)?;
    let r = Reference::parse(&format!("{}/test/app:v1", reg.addr)).map_err(anyhow::Error::msg)?;
    let pulled = puller
        .pull(&r)
        .with_context(|| format!("pull {r}: registry log: {}", reg.log()))?;
    assert!(pulled.downloaded > 0);
    let root = &pulled.image.rootfs;
    assert_eq!(read(root, "etc/greeting"), "hello from the registry\n");
    assert_eq!(read(root, "usr/share/doc/keep"), "kept\n");
    assert_eq!(
        fs::metadata(root.join("usr/share/doc/keep"))?.mtime(),
        1_700_000_000
    );
    assert_eq!(
        fs::metadata(root.join("usr/share/doc"))?.mtime(),
        1_700_000_000
    );
    assert_eq!(
        fs::read_link(root.join("bin/link"))?,
        Path::new("../etc/greeting")
    );
    assert!(
        !root.join("etc/hard").exists(),
        "whiteout of /etc/hard not applied"
    );
    assert_eq!(read(root, "etc/hard2"), "hello from the registry\n");
    assert_eq!(
        fs::metadata(root.join("etc/hard2"))?.ino(),
        fs::metadata(root.join("etc/greeting"))?.ino()
    );
    assert_eq!(read(root, "opt/new"), "new\n");
    assert!(
        !root.join("opt/old").exists(),
        "opaque /opt kept the lower layer's file"
    );
    let cfg = &pulled.image.info.config;
    assert_eq!(
        (cfg.entrypoint.as_slice(), cfg.cmd.as_slice()),
        (&["/bin/sh".to_string()][..], &["-c".to_string()][..])
    );
    assert!(
        cfg.env.contains(&"GREETING=hi".to_string()),
        "{:?}",
        cfg.env
    );
    assert_eq!(cfg.working_dir.as_deref(), Some("/opt"));
    assert_eq!(pulled.image.info.layers.len(), 4);
    assert_eq!(
        store.refs()?.get(&format!("{}/test/app:v1", reg.addr)),
        Some(&pulled.image.info.manifest)
    );

    // Again: nothing to download.
    let again = puller.pull(&r)?;
    assert_eq!(
        (again.downloaded, &again.image.info.manifest),
        (0, &pulled.image.info.manifest)
    );

    // By digest, and through the multi-arch index: the same manifest.
    let by_digest = Reference::parse(&format!(
        "{}/test/app@{}",
        reg.addr, pulled.image.info.manifest
    ))
    .map_err(anyhow::Error::msg)?;
    assert_eq!(
        puller.pull(&by_digest)?.image.info.manifest,
        pulled.image.info.manifest
    );
    let multi =
        Reference::parse(&format!("{}/test/app:multi", reg.addr)).map_err(anyhow::Error::msg)?;
    let multi_dir = tempfile::tempdir()?;
    let multi_store = Store::open(multi_dir.path())?;
    let m = Puller::new(&multi_store)?.pull(&multi)?;
    assert_eq!(m.image.info.manifest, pulled.image.info.manifest);
    assert!(m.image.info.index.is_some());
    assert_eq!(read(&m.image.rootfs, "opt/new"), "new\n");
    let s390x = Platform {
        architecture: "s390x".into(),
        os: "linux".into(),
        variant: None,
    };
    let e = Puller::new(&store)?
        .platform(s390x)
        .pull(&multi)
        .expect_err("no s390x image");
    assert!(e.to_string().contains("no image for linux/s390x"), "{e}");

    // A tag that does not exist.
    let missing =
        Reference::parse(&format!("{}/test/app:nope", reg.addr)).map_err(anyhow::Error::msg)?;
    let e = puller.pull(&missing).expect_err("missing tag");
    assert!(matches!(e, PullError::Http { status: 404, .. }), "{e}");

    // Corrupt the biggest blob (a layer) in the registry's storage, same
    // length: a fresh store must refuse it and keep nothing of it.
    let biggest = pulled
        .image
        .info
        .layers
        .iter()
        .max_by_key(|d| {
            fs::metadata(reg.blob_data(d.hex()))
                .map(|m| m.len())
                .unwrap_or(0)
        })
        .context("a layer")?
        .clone();
    let data = reg.blob_data(biggest.hex());
    let mut bytes = fs::read(&data)?;
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x55;
    fs::write(&data, &bytes)?;
    let fresh_dir = tempfile::tempdir()?;
    let fresh = Store::open(fresh_dir.path())?;
    let e = Puller::new(&fresh)?
        .pull(&r)
        .expect_err("corrupt blob must be refused");
    match &e {
        PullError::Store(StoreError::DigestMismatch { expected, .. }) => {
            assert_eq!(expected, &biggest)
        }
        other => panic!("want a digest mismatch, got {other}"),
    }
    assert!(e.to_string().contains("refused"), "{e}");
    assert!(!fresh.has_blob(&biggest));
    assert_eq!(fresh.image(&pulled.image.info.manifest)?, None);
    Ok(())
}

/// Nothing of a refused image is complete: no image, no ref, no work left.
fn nothing_complete(store_dir: &Path, store: &Store) -> Result<()> {
    assert_eq!(fs::read_dir(store_dir.join("images"))?.count(), 0);
    assert_eq!(fs::read_dir(store_dir.join("tmp"))?.count(), 0);
    assert!(store.refs()?.is_empty());
    Ok(())
}

/// A config whose diff_ids are not its layers' (all zeros, as a registry or
/// a tool may serve them) is refused after unpacking the layer; an image
/// that unpacks to more than the store gives it is refused while unpacking.
#[test]
fn wrong_diff_ids_and_too_big_images_are_refused() -> Result<()> {
    let reg = Registry::start()?;
    let work = tempfile::tempdir()?;
    let plain = "application/vnd.oci.image.layer.v1.tar";
    let layer = layer_tar(&[Entry::File("etc/x", b"x\n".to_vec())])?;
    let zeros = format!("sha256:{}", "0".repeat(64));
    let layout = work.path().join("zeros");
    write_layout(
        &layout,
        "1",
        &[(plain, layer.clone(), zeros.clone())],
        &["/x"],
    )?;
    push(&layout, "1", &reg, "test/zeros", false)?;

    let store_dir = tempfile::tempdir()?;
    let store = Store::open(store_dir.path())?;
    let r = Reference::parse(&format!("{}/test/zeros:1", reg.addr)).map_err(anyhow::Error::msg)?;
    let e = Puller::new(&store)?
        .pull(&r)
        .expect_err("all-zero diff_ids");
    match &e {
        PullError::DiffId {
            index: 0,
            expected,
            actual,
            ..
        } => {
            assert_eq!(expected.as_str(), zeros);
            assert_eq!(*actual, sha256_hex(&layer));
        }
        other => panic!("want a diff_id mismatch, got {other}"),
    }
    assert!(e.to_string().contains("rootfs.diff_ids[0]"), "{e}");
    nothing_complete(store_dir.path(), &store)?;

    // 8 MiB of zeros, 8 KiB of gzip; the image may take 1 MiB.
    let big = layer_tar(&[Entry::File("big", vec![0u8; 8 << 20])])?;
    let diff = format!("sha256:{}", sha256_hex(&big));
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    std::io::Write::write_all(&mut gz, &big)?;
    let layout = work.path().join("big");
    write_layout(
        &layout,
        "1",
        &[(
            "application/vnd.oci.image.layer.v1.tar+gzip",
            gz.finish()?,
            diff,
        )],
        &["/x"],
    )?;
    push(&layout, "1", &reg, "test/big", false)?;
    let store_dir = tempfile::tempdir()?;
    let store = Store::open(store_dir.path())?.with_quota(Quota {
        image: 1 << 20,
        store: 1 << 30,
    });
    let r = Reference::parse(&format!("{}/test/big:1", reg.addr)).map_err(anyhow::Error::msg)?;
    let e = Puller::new(&store)?.pull(&r).expect_err("8 MiB in 1 MiB");
    assert!(
        matches!(&e, PullError::Store(StoreError::Quota { .. })),
        "want the quota, got {e}"
    );
    assert!(
        e.to_string().contains("entry \"big\" takes it past 1048576 bytes (the limit for one image is 1048576 bytes); refused"),
        "{e}"
    );
    nothing_complete(store_dir.path(), &store)?;
    Ok(())
}

#[test]
fn unreachable_registry_is_a_clear_error() -> Result<()> {
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let store_dir = tempfile::tempdir()?;
    let store = Store::open(store_dir.path())?;
    let r = Reference::parse(&format!("127.0.0.1:{port}/a:b")).map_err(anyhow::Error::msg)?;
    let e = Puller::new(&store)?.pull(&r).expect_err("nothing listens");
    assert!(
        matches!(&e, PullError::Transport { url, .. } if url.contains(&format!("127.0.0.1:{port}/v2/a/manifests/b"))),
        "{e}"
    );
    Ok(())
}

/// A reconcile pass up to the D-Bus calls, on a directory-backed host: a
/// desired-state file → image pulled from the real registry → unit rendered →
/// actions; then a changed env, a registry outage (the last pulled image is
/// used) and a deleted file.
#[test]
fn reconcile_pass_without_systemd() -> Result<()> {
    use os_agent::containers::agent::{prepare, Paths, Tags};
    use os_agent::containers::reconcile::Action;
    use os_agent::host::{DirHost, Host};
    use std::collections::BTreeMap;

    let reg = Registry::start()?;
    let work = tempfile::tempdir()?;
    let layout = build_image(work.path())?;
    push(&layout, "v1", &reg, "test/app", false)?;

    let root = tempfile::tempdir()?;
    let host = DirHost::new(root.path())?;
    let store_dir = tempfile::tempdir()?;
    let paths = Paths {
        store: store_dir.path().to_path_buf(),
        ..Paths::default()
    };
    let file = Path::new("/etc/ballast/containers.d/app.toml");
    let write_desired = |env: &str| -> Result<()> {
        let text = format!(
            "[[containers]]\nname = \"app\"\nimage = \"{}/test/app:v1\"\nenv = {{ MODE = \"{env}\" }}\nports = [\"8080:80\"]\nmemory = \"64M\"\n",
            reg.addr
        );
        host.write_atomic(file, text.as_bytes())?;
        Ok(())
    };
    let none = BTreeMap::new();
    let app_active: BTreeMap<String, bool> = [("app".to_string(), true)].into();

    // New container: pulled, rendered, created.
    write_desired("a")?;
    let p = prepare(&host, &paths, Tags::Refresh, &[])?;
    assert!(p.problems.is_empty(), "{:?}", p.problems);
    assert_eq!(p.plan(&none), vec![Action::Create("app".into())]);
    let unit = &p.rendered["app"];
    assert!(unit.text.contains("\"--setenv=MODE=a\""), "{}", unit.text);
    assert!(
        unit.text.contains("\"--setenv=GREETING=hi\""),
        "{}",
        unit.text
    );
    assert!(
        unit.text.contains("\"--\" \"/bin/sh\" \"-c\""),
        "{}",
        unit.text
    );
    assert!(
        unit.text.contains("\"--port=tcp:8080:80\""),
        "{}",
        unit.text
    );
    assert!(unit.text.contains("MemoryMax=67108864"), "{}", unit.text);
    assert_eq!(p.keep.len(), 1);
    // What the executor would do with the file: write it.
    let unit_path = paths.unit_dir.join(&unit.unit);
    host.write_atomic(&unit_path, unit.text.as_bytes())?;
    p.layers
        .as_ref()
        .context("first layers are new")?
        .save(&host, &paths.state_file)?;

    // Written and running: nothing to do; written but stopped: start.
    let p = prepare(&host, &paths, Tags::Refresh, &[])?;
    assert_eq!(p.plan(&app_active), vec![]);
    assert_eq!(p.plan(&none), vec![Action::Start("app".into())]);
    assert!(p.layers.is_none(), "unchanged layers are not saved again");

    // The env changes: replace.
    write_desired("b")?;
    let p = prepare(&host, &paths, Tags::Refresh, &[])?;
    assert_eq!(p.plan(&app_active), vec![Action::Replace("app".into())]);
    let changed = p.rendered["app"].clone();
    host.write_atomic(&unit_path, changed.text.as_bytes())?;

    // With cached tags, the registry is not asked: no problem even after it
    // goes away. Refreshing, the failed pull is reported and the last pulled
    // image keeps the container as is.
    drop(reg);
    let p = prepare(&host, &paths, Tags::Cached, &[])?;
    assert!(p.problems.is_empty(), "{:?}", p.problems);
    assert_eq!(p.plan(&app_active), vec![]);
    let p = prepare(&host, &paths, Tags::Refresh, &[])?;
    assert_eq!(p.problems.len(), 1, "{:?}", p.problems);
    assert!(
        p.problems[0].contains("container app: cannot pull")
            && p.problems[0].contains("running the last pulled sha256:"),
        "{:?}",
        p.problems
    );
    assert_eq!(p.plan(&app_active), vec![]);
    assert_eq!(p.rendered["app"].spec, changed.spec);

    // Deleted from the desired state: removed.
    host.remove_file(file)?;
    let p = prepare(&host, &paths, Tags::Refresh, &[])?;
    assert_eq!(p.plan(&app_active), vec![Action::Remove("app".into())]);
    assert!(p.keep.is_empty());
    Ok(())
}

/// Basic auth against the real registry (htpasswd): refused without
/// credentials with a clear error, pulled with them.
#[test]
fn basic_auth() -> Result<()> {
    use os_agent::containers::registry::Credentials;
    let hash = bcrypt::hash("s3cret", 4)?;
    let reg = Registry::start_with_auth(Some(&format!("puller:{hash}\n")))?;
    let work = tempfile::tempdir()?;
    let layout = build_image(work.path())?;
    push_as(
        &layout,
        "v1",
        &reg,
        "private/app",
        false,
        Some("puller:s3cret"),
    )?;
    let r =
        Reference::parse(&format!("{}/private/app:v1", reg.addr)).map_err(anyhow::Error::msg)?;

    let store_dir = tempfile::tempdir()?;
    let store = Store::open(store_dir.path())?;
    let e = Puller::new(&store)?.pull(&r).expect_err("no credentials");
    assert!(
        e.to_string()
            .contains("wants a user name and password and none is configured"),
        "{e}"
    );
    let wrong = Credentials {
        username: "puller".into(),
        password: "nope".into(),
    };
    let e = Puller::new(&store)?
        .credentials(&reg.addr, wrong)
        .pull(&r)
        .expect_err("wrong password");
    assert!(matches!(e, PullError::Http { status: 401, .. }), "{e}");
    let right = Credentials {
        username: "puller".into(),
        password: "s3cret".into(),
    };
    let pulled = Puller::new(&store)?
        .credentials(&reg.addr, right)
        .pull(&r)?;
    assert_eq!(
        read(&pulled.image.rootfs, "etc/greeting"),
        "hello from the registry\n"
    );
    Ok(())
}

/// A token service for the registry's `auth: token` mode: it grants every
/// scope it is asked for, as a JWT signed (RS256, by `openssl dgst`) with a
/// key whose self-signed certificate is the registry's root, or, with
/// `forge`, with another key. Counts the scopes it was asked for and keeps
/// the `Authorization` headers it was sent.
struct TokenService {
    dir: tempfile::TempDir,
    host: &'static str,
    port: u16,
    scopes: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
    authorizations: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
    forge: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

const SERVICE: &str = "ballast-test-registry";
const ISSUER: &str = "ballast-test-tokens";

fn openssl(dir: &Path, args: &[&str]) -> Result<Vec<u8>> {
    let out = std::process::Command::new("openssl")
        .current_dir(dir)
        .args(args)
        .output()
        .context("cannot run openssl (make deps installs it)")?;
    anyhow::ensure!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(out.stdout)
}

impl TokenService {
    /// On `host` (a loopback address), port chosen at run time.
    fn start(host: &'static str) -> Result<TokenService> {
        let dir = tempfile::tempdir()?;
        for name in ["key", "forged"] {
            openssl(
                dir.path(),
                &["genrsa", "-out", &format!("{name}.pem"), "2048"],
            )?;
        }
        openssl(
            dir.path(),
            &[
                "req",
                "-new",
                "-x509",
                "-key",
                "key.pem",
                "-out",
                "cert.pem",
                "-days",
                "2",
                "-subj",
                "/CN=ballast-test-tokens",
            ],
        )?;
        let der = openssl(dir.path(), &["x509", "-in", "cert.pem", "-outform", "DER"])?;
        let listener = std::net::TcpListener::bind((host, 0))?;
        let port = listener.local_addr()?.port();
        let scopes = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let authorizations = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let forge = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (d, sc, au, fg) = (
            dir.path().to_path_buf(),
            scopes.clone(),
            authorizations.clone(),
            forge.clone(),
        );
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(conn) = conn else { continue };
                if let Err(e) = answer(conn, &d, &der, &sc, &au, &fg) {
                    eprintln!("token service: {e:#}");
                }
            }
        });
        Ok(TokenService {
            dir,
            host,
            port,
            scopes,
            authorizations,
            forge,
        })
    }

    fn realm(&self) -> String {
        format!("http://{}:{}/token", self.host, self.port)
    }

    fn authorizations(&self) -> Vec<String> {
        self.authorizations.lock().expect("authorizations").clone()
    }

    /// The registry in token mode with this service as its realm.
    fn registry(&self) -> Result<Registry> {
        let root = self.dir.path().join("cert.pem");
        Registry::start_with(os_agent::containers::local_registry::Auth::Token {
            realm: &self.realm(),
            service: SERVICE,
            issuer: ISSUER,
            root_cert: &root,
        })
    }
}

/// One token request: `GET /token?scope=…&service=…`.
fn answer(
    mut conn: std::net::TcpStream,
    dir: &Path,
    cert_der: &[u8],
    scopes: &std::sync::Mutex<Vec<String>>,
    authorizations: &std::sync::Mutex<Vec<String>>,
    forge: &std::sync::atomic::AtomicBool,
) -> Result<()> {
    use base64::Engine as _;
    use std::io::{BufRead, Write};
    let mut reader = std::io::BufReader::new(&conn);
    let mut line = String::new();
    reader.read_line(&mut line)?;
    loop {
        let mut header = String::new();
        if reader.read_line(&mut header)? == 0 || header.trim().is_empty() {
            break;
        }
        if let Some((k, v)) = header.split_once(':') {
            if k.eq_ignore_ascii_case("authorization") {
                authorizations
                    .lock()
                    .expect("authorizations")
                    .push(v.trim().to_string());
            }
        }
    }
    let target = line.split_whitespace().nth(1).unwrap_or_default();
    let query = target.split_once('?').map(|(_, q)| q).unwrap_or_default();
    let mut access = Vec::new();
    for (k, v) in query.split('&').filter_map(|kv| kv.split_once('=')) {
        if k == "scope" {
            let v = v
                .replace("%3A", ":")
                .replace("%2F", "/")
                .replace("%2C", ",");
            scopes.lock().expect("scopes").push(v.clone());
            let parts: Vec<&str> = v.splitn(3, ':').collect();
            if let [kind, name, actions] = parts[..] {
                access.push(serde_json::json!({"type": kind, "name": name, "actions": actions.split(',').collect::<Vec<_>>()}));
            }
        }
    }
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs();
    let header = serde_json::json!({"typ": "JWT", "alg": "RS256",
        "x5c": [base64::engine::general_purpose::STANDARD.encode(cert_der)]});
    let claims = serde_json::json!({"iss": ISSUER, "sub": "", "aud": SERVICE,
        "exp": now + 300, "nbf": now - 10, "iat": now, "jti": format!("{now}-{}", access.len()),
        "access": access});
    let signing_input = format!(
        "{}.{}",
        b64.encode(header.to_string()),
        b64.encode(claims.to_string())
    );
    let input_file = tempfile::NamedTempFile::new_in(dir)?;
    std::fs::write(input_file.path(), &signing_input)?;
    let key = if forge.load(std::sync::atomic::Ordering::SeqCst) {
        "forged.pem"
    } else {
        "key.pem"
    };
    let sig = openssl(
        dir,
        &[
            "dgst",
            "-sha256",
            "-sign",
            key,
            &input_file.path().display().to_string(),
        ],
    )?;
    let token = format!("{signing_input}.{}", b64.encode(sig));
    let body = serde_json::json!({"token": token, "access_token": token}).to_string();
    write!(
        conn,
        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )?;
    Ok(())
}

/// Bearer tokens against the real registry in token mode: skopeo pushes
/// with a token; the agent answers the registry's challenge with an
/// anonymous token for the pull scope and pulls; a token the registry's root
/// does not vouch for is refused with an error that names the registry.
#[test]
fn bearer_token_auth() -> Result<()> {
    let tokens = TokenService::start("127.0.0.1")?;
    let reg = tokens.registry()?;
    let work = tempfile::tempdir()?;
    let layout = build_image(work.path())?;
    push(&layout, "v1", &reg, "test/app", false)
        .with_context(|| format!("push with a token: registry log: {}", reg.log()))?;

    let r = Reference::parse(&format!("{}/test/app:v1", reg.addr)).map_err(anyhow::Error::msg)?;
    let store_dir = tempfile::tempdir()?;
    let store = Store::open(store_dir.path())?;
    let pulled = Puller::new(&store)?
        .pull(&r)
        .with_context(|| format!("pull with a token: registry log: {}", reg.log()))?;
    assert_eq!(
        read(&pulled.image.rootfs, "etc/greeting"),
        "hello from the registry\n"
    );
    let asked = tokens.scopes.lock().expect("scopes").clone();
    assert!(
        asked.iter().any(|s| s == "repository:test/app:pull"),
        "the agent did not ask for the pull scope: {asked:?}"
    );

    // With credentials: the realm is on the registry's own host, which is
    // spoken to over plain HTTP anyway, so they go to it.
    let creds_dir = tempfile::tempdir()?;
    let creds_store = Store::open(creds_dir.path())?;
    Puller::new(&creds_store)?
        .credentials(&reg.addr, puller_credentials())
        .pull(&r)?;
    assert!(
        tokens.authorizations().contains(&PULLER_BASIC.to_string()),
        "{:?}",
        tokens.authorizations()
    );

    // A token signed by a key the registry does not trust.
    tokens
        .forge
        .store(true, std::sync::atomic::Ordering::SeqCst);
    let other_dir = tempfile::tempdir()?;
    let other = Store::open(other_dir.path())?;
    let e = Puller::new(&other)?
        .pull(&r)
        .expect_err("a forged token pulls");
    assert!(matches!(e, PullError::Http { status: 401, .. }), "{e}");
    assert!(e.to_string().contains(&reg.addr), "{e}");
    Ok(())
}

fn puller_credentials() -> os_agent::containers::registry::Credentials {
    os_agent::containers::registry::Credentials {
        username: "puller".into(),
        password: "s3cret".into(),
    }
}

/// `puller:s3cret` as a Basic authorization.
const PULLER_BASIC: &str = "Basic cHVsbGVyOnMzY3JldA==";

/// The attack: a registry names a token realm on another host over plain
/// HTTP, and the puller sends it the registry's credentials. They are not
/// sent; the pull is refused with an error naming the realm. Anonymous
/// pulls through such a realm still work.
#[test]
fn no_credentials_for_a_plain_http_realm_elsewhere() -> Result<()> {
    let tokens = TokenService::start("127.0.0.2")?;
    let reg = tokens.registry()?;
    let work = tempfile::tempdir()?;
    let layout = build_image(work.path())?;
    push(&layout, "v1", &reg, "test/app", false)
        .with_context(|| format!("push with a token: registry log: {}", reg.log()))?;
    let r = Reference::parse(&format!("{}/test/app:v1", reg.addr)).map_err(anyhow::Error::msg)?;
    let before = tokens.authorizations();

    let store_dir = tempfile::tempdir()?;
    let store = Store::open(store_dir.path())?;
    let e = Puller::new(&store)?
        .credentials(&reg.addr, puller_credentials())
        .pull(&r)
        .expect_err("credentials for a plain-HTTP realm on another host");
    assert_eq!(tokens.authorizations(), before, "credentials were sent");
    assert!(matches!(e, PullError::Auth { .. }), "{e}");
    assert!(
        e.to_string().contains(&format!(
            "token realm \"{}\" is on another host than the registry and is not HTTPS",
            tokens.realm()
        )),
        "{e}"
    );
    nothing_complete(store_dir.path(), &store)?;

    let pulled = Puller::new(&store)?.pull(&r)?;
    assert_eq!(
        read(&pulled.image.rootfs, "etc/greeting"),
        "hello from the registry\n"
    );
    assert_eq!(tokens.authorizations(), before, "credentials were sent");
    Ok(())
}
