//! `image-build keygen` and `image-build release`: signing keys, and
//! publishing a build into a static channel directory (docs/channel.md).

use crate::build::sha256_file;
use anyhow::{bail, Context, Result};
use ballast_common::build_info::BuildInfo;
use ballast_common::keys::SecretKey;
use ballast_common::manifest::{
    self, Envelope, Manifest, Payload, Rollout, RootPayload, VerityParams,
};
use ballast_common::verity;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

/// Writes `<out>/release.secret` (mode 0600) and `<out>/release.pub`.
pub fn keygen(out: &Path, name: &str) -> Result<(PathBuf, PathBuf)> {
    std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
    let secret = out.join(format!("{name}.secret"));
    let public = out.join(format!("{name}.pub"));
    for p in [&secret, &public] {
        if p.exists() {
            bail!("{} exists: refusing to overwrite a key", p.display());
        }
    }
    let key = SecretKey::generate()?;
    let tmp = secret.with_extension("tmp");
    std::fs::write(&tmp, "")?;
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600))?;
    std::fs::write(&tmp, key.to_text())?;
    std::fs::rename(&tmp, &secret)?;
    std::fs::write(&public, key.public().to_text())?;
    Ok((secret, public))
}

pub struct ReleaseOptions<'a> {
    pub build_dir: &'a Path,
    pub channel_dir: &'a Path,
    pub channel: &'a str,
    pub keys: &'a [PathBuf],
    pub rollout_hours: f64,
    pub expires_days: u64,
    pub now: u64,
    /// A Secure Boot key directory: the published UKI is signed with its db
    /// key (unless the build signed it with that key already).
    pub secure_boot_keys: Option<&'a Path>,
}

pub fn channel_file(channel_dir: &Path, channel: &str) -> PathBuf {
    channel_dir.join("channels").join(format!("{channel}.json"))
}

fn check_channel_name(c: &str) -> Result<()> {
    if c.is_empty()
        || !c
            .chars()
            .all(|ch| ch.is_ascii_alphanumeric() || "-_.".contains(ch))
        || c.starts_with('.')
    {
        bail!("channel name {c:?}: use letters, digits, '-', '_' or '.'");
    }
    Ok(())
}

/// Copies `src` to `payloads/<sha256>` unless it is there already; returns
/// the URL relative to the channel directory.
fn publish_payload(channel_dir: &Path, src: &Path, sha256: &str) -> Result<String> {
    let rel = format!("payloads/{sha256}");
    let dst = channel_dir.join(&rel);
    if dst.exists() {
        if sha256_file(&dst)? != sha256 {
            bail!(
                "{} exists with other content: the channel directory is damaged",
                dst.display()
            );
        }
        return Ok(rel);
    }
    std::fs::create_dir_all(dst.parent().unwrap_or(channel_dir))?;
    let tmp = channel_dir.join(format!("payloads/.{sha256}.tmp"));
    std::fs::copy(src, &tmp).with_context(|| format!("cannot copy {}", src.display()))?;
    std::fs::File::open(&tmp)?.sync_all()?;
    std::fs::rename(&tmp, &dst)?;
    Ok(rel)
}

/// Publishes the build in `build_dir` to the channel; returns the manifest.
pub fn release(o: &ReleaseOptions) -> Result<Manifest> {
    check_channel_name(o.channel)?;
    if o.keys.is_empty() {
        bail!("no signing key given (--key)");
    }
    if !(0.0..=24.0 * 365.0).contains(&o.rollout_hours) {
        bail!(
            "--rollout-hours {} is out of range (0 to 8760)",
            o.rollout_hours
        );
    }
    let keys = o
        .keys
        .iter()
        .map(|p| {
            let text = std::fs::read_to_string(p)
                .with_context(|| format!("cannot read key {}", p.display()))?;
            SecretKey::parse(&text).with_context(|| format!("key {}", p.display()))
        })
        .collect::<Result<Vec<_>>>()?;
    let info_path = o.build_dir.join("build.json");
    let info: BuildInfo = serde_json::from_str(
        &std::fs::read_to_string(&info_path)
            .with_context(|| format!("cannot read {}", info_path.display()))?,
    )
    .with_context(|| format!("{} is not a build.json", info_path.display()))?;

    // Check what we publish is what the build recorded.
    for p in [
        &info.payloads.root_zst,
        &info.payloads.uki,
        &info.payloads.verity,
    ] {
        let got = sha256_file(&o.build_dir.join(&p.file))?;
        if got != p.sha256 {
            bail!(
                "{} does not match build.json (sha256 {got}, recorded {})",
                p.file,
                p.sha256
            );
        }
    }
    let area = std::fs::read(o.build_dir.join(&info.payloads.verity.file))?;
    let sb = verity::read_superblock(&area).context("verity payload")?;

    let file = channel_file(o.channel_dir, o.channel);
    let previous = match std::fs::read(&file) {
        Ok(bytes) => {
            let env: Envelope = serde_json::from_slice(&bytes)
                .with_context(|| format!("{} is not a channel file", file.display()))?;
            let m: Manifest = serde_json::from_str(&env.manifest)
                .with_context(|| format!("{}: manifest is not valid", file.display()))?;
            Some(m)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", file.display())),
    };
    if let Some(prev) = &previous {
        if prev.name != info.name {
            bail!(
                "channel {} carries image {:?}, this build is {:?}",
                o.channel,
                prev.name,
                info.name
            );
        }
    }
    let root_url = publish_payload(
        o.channel_dir,
        &o.build_dir.join(&info.payloads.root_zst.file),
        &info.payloads.root_zst.sha256,
    )?;
    let uki = uki_to_publish(o, &info)?;
    let uki_url = publish_payload(o.channel_dir, &uki.file, &uki.sha256);
    if let Some(tmp) = &uki.temporary {
        std::fs::remove_file(tmp)?;
    }
    let uki_url = uki_url?;
    let m = Manifest {
        channel: o.channel.to_string(),
        name: info.name.clone(),
        version: info.version.clone(),
        sequence: previous.as_ref().map(|p| p.sequence + 1).unwrap_or(1),
        issued_at: o.now,
        expires_at: o.now + o.expires_days * 86_400,
        architecture: info.architecture.clone(),
        root_hash: info.root_hash.clone(),
        verity: VerityParams {
            salt: hex::encode(&sb.salt),
            uuid: sb.uuid.to_string(),
            data_blocks: sb.data_blocks,
        },
        root: RootPayload {
            url: root_url,
            size: info.payloads.root_zst.size,
            sha256: info.payloads.root_zst.sha256.clone(),
            uncompressed_size: info.payloads.root.size,
            compression: "zstd".into(),
        },
        uki: Payload {
            url: uki_url,
            size: uki.size,
            sha256: uki.sha256.clone(),
        },
        rollout: Rollout {
            start: o.now,
            duration_secs: (o.rollout_hours * 3600.0) as u64,
        },
    };
    let env = manifest::sign(&m, &keys.iter().collect::<Vec<_>>())?;
    std::fs::create_dir_all(file.parent().unwrap_or(o.channel_dir))?;
    let tmp = file.with_extension("json.tmp");
    std::fs::write(&tmp, serde_json::to_string_pretty(&env)? + "\n")?;
    std::fs::File::open(&tmp)?.sync_all()?;
    // The manifest goes last: payloads are in place before anyone can see it.
    std::fs::rename(&tmp, &file)?;
    Ok(m)
}

/// The UKI a release publishes: the build's, or a copy signed for Secure Boot.
struct PublishedUki {
    file: PathBuf,
    size: u64,
    sha256: String,
    /// A signed copy to remove once it is published.
    temporary: Option<PathBuf>,
}

fn uki_to_publish(o: &ReleaseOptions, info: &BuildInfo) -> Result<PublishedUki> {
    let built = o.build_dir.join(&info.payloads.uki.file);
    let as_built = PublishedUki {
        file: built.clone(),
        size: info.payloads.uki.size,
        sha256: info.payloads.uki.sha256.clone(),
        temporary: None,
    };
    let Some(dir) = o.secure_boot_keys else {
        return Ok(as_built);
    };
    let keys = crate::secure_boot::Keys::open(dir).context("--secure-boot-keys")?;
    let bytes = std::fs::read(&built)?;
    let signed_already = ballast_common::pe::signed_with(&bytes, &keys.db_cert_der()?)
        .with_context(|| format!("{} is not an EFI binary", built.display()))?;
    if signed_already {
        return Ok(as_built);
    }
    let payloads = o.channel_dir.join("payloads");
    std::fs::create_dir_all(&payloads)?;
    let signed = payloads.join(format!(".{}.signed.efi", info.payloads.uki.sha256));
    let mut stages = crate::stage::Stages::new(&o.build_dir.join("logs/release"), 1)?;
    // Signed at the build's time, so two releases of one build agree.
    stages.run("sign-uki", |s| {
        crate::secure_boot::sign(s, &keys, &built, &signed, info.source_date_epoch)
    })?;
    Ok(PublishedUki {
        size: std::fs::metadata(&signed)?.len(),
        sha256: sha256_file(&signed)?,
        file: signed.clone(),
        temporary: Some(signed),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use ballast_common::build_info::*;
    use ballast_common::keys::PublicKey;

    /// A fake build directory: small payloads, a real verity area.
    fn fake_build(dir: &Path, version: &str) {
        let root = vec![3u8; 8 * 4096];
        std::fs::write(dir.join("r.erofs"), &root).unwrap();
        std::fs::write(dir.join("r.zst"), zstd::encode_all(&root[..], 3).unwrap()).unwrap();
        std::fs::write(dir.join("u.efi"), format!("uki {version}")).unwrap();
        let mut b = verity::TreeBuilder::new(verity::Params {
            salt: vec![1, 2],
            uuid: uuid::Uuid::nil(),
        })
        .unwrap();
        std::io::Write::write_all(&mut b, &root).unwrap();
        let tree = b.finish().unwrap();
        std::fs::write(dir.join("r.verity"), &tree.hash_area).unwrap();
        let p = |f: &str| ballast_common::build_info::Payload {
            file: f.into(),
            size: std::fs::metadata(dir.join(f)).unwrap().len(),
            sha256: sha256_file(&dir.join(f)).unwrap(),
        };
        let info = BuildInfo {
            format_version: 1,
            name: "ballast".into(),
            version: version.into(),
            architecture: "x86-64".into(),
            kernel_version: "6.1".into(),
            source_date_epoch: 1,
            root_hash: tree.root_hash_hex(),
            cmdline: String::new(),
            uki_entry: format!("ballast-{version}+3.efi"),
            disk: Disk {
                size: 0,
                guid: String::new(),
            },
            partitions: vec![],
            payloads: Payloads {
                root: p("r.erofs"),
                root_zst: p("r.zst"),
                verity: p("r.verity"),
                uki: p("u.efi"),
            },
            images: Images {
                raw: String::new(),
                qcow2: String::new(),
            },
            packages: vec![],
            dropped_modules: vec![],
            purged_packages: vec![],
        };
        std::fs::write(
            dir.join("build.json"),
            serde_json::to_string(&info).unwrap(),
        )
        .unwrap();
    }

    #[test]
    fn keygen_then_release_twice_grows_the_sequence() {
        let t = tempfile::tempdir().unwrap();
        let (secret, public) = keygen(&t.path().join("keys"), "release").unwrap();
        assert_eq!(
            std::fs::metadata(&secret).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert!(
            keygen(&t.path().join("keys"), "release").is_err(),
            "overwrote a key"
        );
        let pubkey = PublicKey::parse(&std::fs::read_to_string(&public).unwrap()).unwrap();
        let channel_dir = t.path().join("channel");
        for (i, v) in ["0.1.0", "0.2.0"].iter().enumerate() {
            let b = t.path().join(v);
            std::fs::create_dir(&b).unwrap();
            fake_build(&b, v);
            let m = release(&ReleaseOptions {
                build_dir: &b,
                channel_dir: &channel_dir,
                channel: "stable",
                keys: std::slice::from_ref(&secret),
                rollout_hours: 2.0,
                expires_days: 30,
                now: 1000,
                secure_boot_keys: None,
            })
            .unwrap();
            assert_eq!(m.sequence, i as u64 + 1);
            let bytes = std::fs::read(channel_file(&channel_dir, "stable")).unwrap();
            let opened = manifest::open(&bytes, std::slice::from_ref(&pubkey)).unwrap();
            assert_eq!(opened, m);
            assert_eq!(opened.rollout.duration_secs, 7200);
            assert_eq!(opened.verity.salt, "0102");
            assert_eq!(opened.verity.data_blocks, 8);
            let uki = std::fs::read(channel_dir.join(&opened.uki.url)).unwrap();
            assert_eq!(uki, format!("uki {v}").as_bytes());
        }
    }

    #[test]
    fn tampered_builds_and_bad_arguments_are_refused() {
        let t = tempfile::tempdir().unwrap();
        let (secret, _) = keygen(t.path(), "k").unwrap();
        fake_build(t.path(), "0.1.0");
        let ch = t.path().join("ch");
        let opts = |channel: &'static str| ReleaseOptions {
            build_dir: t.path(),
            channel_dir: &ch,
            channel,
            keys: std::slice::from_ref(&secret),
            rollout_hours: 0.0,
            expires_days: 1,
            now: 5,
            secure_boot_keys: None,
        };
        assert!(format!("{:#}", release(&opts("../x")).unwrap_err()).contains("channel name"));
        std::fs::write(t.path().join("u.efi"), "evil").unwrap();
        let err = format!("{:#}", release(&opts("stable")).unwrap_err());
        assert!(err.contains("does not match build.json"), "{err}");
        assert!(!channel_file(&t.path().join("ch"), "stable").exists());
    }

    fn publish_signed(b: &Path, ch: &Path, keys: &[PathBuf], sb: &Path) -> Result<Manifest> {
        release(&ReleaseOptions {
            build_dir: b,
            channel_dir: ch,
            channel: "stable",
            keys,
            rollout_hours: 0.0,
            expires_days: 1,
            now: 5,
            secure_boot_keys: Some(sb),
        })
    }

    /// `release --secure-boot-keys` publishes a signed UKI (the manifest
    /// names the signed file's hash), and twice the same bytes; a UKI the
    /// build signed with that key already is published as it is.
    #[test]
    fn release_signs_the_uki_for_secure_boot() {
        let t = tempfile::tempdir().unwrap();
        let (secret, public) = keygen(t.path(), "k").unwrap();
        let pubkey = PublicKey::parse(&std::fs::read_to_string(&public).unwrap()).unwrap();
        let sb = t.path().join("sb");
        crate::secure_boot::keygen(&sb, "release test").unwrap();
        let db = crate::secure_boot::Keys::open(&sb)
            .unwrap()
            .db_cert_der()
            .unwrap();
        let b = t.path().join("build");
        std::fs::create_dir(&b).unwrap();
        fake_build(&b, "0.1.0");
        let stub = std::fs::read("/usr/lib/systemd/boot/efi/linuxx64.efi.stub").unwrap();
        std::fs::write(b.join("u.efi"), &stub).unwrap();
        let mut info: BuildInfo =
            serde_json::from_str(&std::fs::read_to_string(b.join("build.json")).unwrap()).unwrap();
        info.payloads.uki.size = stub.len() as u64;
        info.payloads.uki.sha256 = sha256_file(&b.join("u.efi")).unwrap();
        std::fs::write(b.join("build.json"), serde_json::to_string(&info).unwrap()).unwrap();

        let ch = t.path().join("ch");
        let secrets = std::slice::from_ref(&secret);
        let opts = |sb| publish_signed(&b, &ch, secrets, sb);
        let mut published = Vec::new();
        for _ in 0..2 {
            let m = opts(&sb).unwrap();
            let bytes = std::fs::read(channel_file(&ch, "stable")).unwrap();
            assert_eq!(
                manifest::open(&bytes, std::slice::from_ref(&pubkey)).unwrap(),
                m
            );
            let uki = std::fs::read(ch.join(&m.uki.url)).unwrap();
            assert!(ballast_common::pe::signed_with(&uki, &db).unwrap());
            assert_eq!(m.uki.size, uki.len() as u64);
            assert_ne!(m.uki.sha256, info.payloads.uki.sha256);
            published.push(m.uki.sha256);
        }
        assert_eq!(
            published[0], published[1],
            "two signings of one build differ"
        );
        let leftovers: Vec<_> = std::fs::read_dir(ch.join("payloads"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with('.'))
            .collect();
        assert!(leftovers.is_empty(), "{leftovers:?}");

        // Signed by the build already: published as built.
        let signed = ch.join("payloads").join(&published[0]);
        std::fs::copy(&signed, b.join("u.efi")).unwrap();
        info.payloads.uki.size = std::fs::metadata(&signed).unwrap().len();
        info.payloads.uki.sha256 = published[0].clone();
        std::fs::write(b.join("build.json"), serde_json::to_string(&info).unwrap()).unwrap();
        let m = opts(&sb).unwrap();
        assert_eq!(m.uki.sha256, published[0]);
        let e = opts(&t.path().join("nokeys")).unwrap_err();
        assert!(format!("{e:#}").contains("--secure-boot-keys"), "{e:#}");
    }
}
