//! User data for the guest, the ways a real cloud or hypervisor gives it: a
//! NoCloud seed volume made by `cloud-localds` (Debian's cloud-image-utils),
//! attached as a read-only virtio disk, or QEMU fw_cfg files.
//!
//! Each holds its files in a temporary directory that QEMU reads at every
//! power-on: keep it alive as long as the VM may boot with it.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};
use tempfile::TempDir;

/// The public half of the fixture key the harness logs in with.
const FIXTURE_PUBLIC_KEY: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/fixtures/id_ed25519.pub");

/// The fw_cfg names the agent reads (`os-agent/src/provision/source.rs`).
pub const FW_CFG_USER_DATA: &str = "opt/org.ballast/user-data";
pub const FW_CFG_META_DATA: &str = "opt/org.ballast/meta-data";
pub const FW_CFG_NETWORK_CONFIG: &str = "opt/org.ballast/network-config";

/// The documents one source delivers.
#[derive(Debug, Clone, Default)]
pub struct UserData {
    /// `user-data`, usually a `#cloud-config` document.
    pub user_data: String,
    /// `meta-data` (YAML with `instance-id`, `local-hostname`).
    pub meta_data: String,
    /// `network-config` (version 2), if any.
    pub network_config: Option<String>,
}

impl UserData {
    /// `user_data` with a meta-data naming `instance_id`.
    pub fn new(user_data: impl Into<String>, instance_id: &str) -> UserData {
        UserData {
            user_data: user_data.into(),
            meta_data: format!("instance-id: {instance_id}\n"),
            network_config: None,
        }
    }
}

/// The fixture public key, one line, for `ssh_authorized_keys`.
pub fn fixture_public_key() -> String {
    match std::fs::read_to_string(FIXTURE_PUBLIC_KEY) {
        Ok(k) => k.trim().to_string(),
        Err(e) => panic!("reading {FIXTURE_PUBLIC_KEY}: {e}"),
    }
}

/// A top-level `ssh_authorized_keys:` (cloud-config YAML) with the fixture
/// key, which Ballast gives to root: how the harness logs in.
pub fn root_fixture_key() -> String {
    format!("ssh_authorized_keys:\n  - {}\n", fixture_public_key())
}

/// The user data every VM gets unless its test brings its own
/// ([`crate::VmOptions::own_user_data`]): root trusts the fixture key.
pub fn harness_user_data() -> UserData {
    UserData::new(
        format!("#cloud-config\n{}", root_fixture_key()),
        "iid-qemu-tests-harness",
    )
}

/// A `users:` entry (cloud-config YAML, indented for a top-level `users:`
/// list) for `name` that trusts the fixture key, so the harness can log in
/// as `name` with [`crate::Vm::ssh_as`].
pub fn user_with_fixture_key(name: &str, groups: &[&str], shell: &str) -> String {
    format!(
        "  - name: {name}\n    groups: [{}]\n    shell: {shell}\n    lock_passwd: true\n    ssh_authorized_keys:\n      - {}\n",
        groups.join(", "),
        fixture_public_key()
    )
}

/// A NoCloud seed: an iso9660 volume labelled `cidata`.
#[derive(Debug)]
pub struct Seed {
    _dir: TempDir,
    image: PathBuf,
}

impl Seed {
    /// Writes the documents and runs `cloud-localds [-N network-config]
    /// seed.iso user-data meta-data`. Panics with its output on failure.
    pub fn nocloud(data: &UserData) -> Seed {
        match Self::try_nocloud(data) {
            Ok(seed) => seed,
            Err(e) => panic!("making a NoCloud seed: {e:#}"),
        }
    }

    fn try_nocloud(data: &UserData) -> Result<Seed> {
        let dir = tempfile::Builder::new()
            .prefix("ballast-seed-")
            .tempdir()
            .context("creating a directory for the seed")?;
        let user_data = write(dir.path(), "user-data", &data.user_data)?;
        let meta_data = write(dir.path(), "meta-data", &data.meta_data)?;
        let image = dir.path().join("seed.iso");
        let mut cmd = Command::new("cloud-localds");
        if let Some(net) = &data.network_config {
            let net = write(dir.path(), "network-config", net)?;
            cmd.arg(format!("--network-config={}", net.display()));
        }
        cmd.arg(&image).arg(&user_data).arg(&meta_data);
        let out = cmd
            .output()
            .context("running cloud-localds (is cloud-image-utils installed? `make deps`)")?;
        if !out.status.success() {
            bail!(
                "cloud-localds failed ({}): {}{}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim(),
                String::from_utf8_lossy(&out.stdout).trim()
            );
        }
        Ok(Seed { _dir: dir, image })
    }

    /// The seed image file.
    pub fn image(&self) -> &Path {
        &self.image
    }

    /// QEMU arguments attaching the seed as a read-only virtio disk. (Not a
    /// CD-ROM: q35's is on AHCI, which Debian's cloud kernel leaves out.)
    pub fn qemu_args(&self) -> Vec<String> {
        vec![
            "-drive".into(),
            format!(
                "if=none,id=seed,format=raw,readonly=on,file={}",
                qemu_path(&self.image)
            ),
            "-device".into(),
            "virtio-blk-pci,drive=seed".into(),
        ]
    }
}

/// User data as QEMU fw_cfg files (`opt/org.ballast/...`).
#[derive(Debug)]
pub struct FwCfg {
    _dir: TempDir,
    files: Vec<(&'static str, PathBuf)>,
}

impl FwCfg {
    /// Writes the documents to files for `-fw_cfg name=...,file=...`.
    pub fn new(data: &UserData) -> FwCfg {
        let made = (|| -> Result<FwCfg> {
            let dir = tempfile::Builder::new()
                .prefix("ballast-fwcfg-")
                .tempdir()
                .context("creating a directory for fw_cfg files")?;
            let mut files = vec![
                (
                    FW_CFG_USER_DATA,
                    write(dir.path(), "user-data", &data.user_data)?,
                ),
                (
                    FW_CFG_META_DATA,
                    write(dir.path(), "meta-data", &data.meta_data)?,
                ),
            ];
            if let Some(net) = &data.network_config {
                files.push((
                    FW_CFG_NETWORK_CONFIG,
                    write(dir.path(), "network-config", net)?,
                ));
            }
            Ok(FwCfg { _dir: dir, files })
        })();
        match made {
            Ok(f) => f,
            Err(e) => panic!("writing fw_cfg files: {e:#}"),
        }
    }

    pub fn qemu_args(&self) -> Vec<String> {
        self.files
            .iter()
            .flat_map(|(name, path)| {
                [
                    "-fw_cfg".to_string(),
                    format!("name={name},file={}", qemu_path(path)),
                ]
            })
            .collect()
    }
}

fn write(dir: &Path, name: &str, contents: &str) -> Result<PathBuf> {
    let path = dir.join(name);
    std::fs::write(&path, contents).with_context(|| format!("writing {}", path.display()))?;
    Ok(path)
}

/// A path for a comma-separated QEMU option value.
fn qemu_path(path: &Path) -> String {
    let p = path.to_string_lossy().into_owned();
    // Temporary directories never hold commas; a TMPDIR that does would
    // make QEMU read another option.
    assert!(
        !p.contains(','),
        "{p} contains a comma, which QEMU options cannot take"
    );
    p
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fw_cfg_args_name_our_files() {
        let mut data = UserData::new("#cloud-config\n", "i-1");
        data.network_config = Some("version: 2\n".into());
        let f = FwCfg::new(&data);
        let args = f.qemu_args();
        assert_eq!(args.len(), 6);
        assert_eq!(args[0], "-fw_cfg");
        assert!(args[1].starts_with("name=opt/org.ballast/user-data,file=/"));
        assert!(args[3].starts_with("name=opt/org.ballast/meta-data,file=/"));
        assert!(args[5].starts_with("name=opt/org.ballast/network-config,file=/"));
        let path = args[1].split("file=").nth(1).unwrap();
        assert_eq!(std::fs::read_to_string(path).unwrap(), "#cloud-config\n");
    }

    #[test]
    fn user_entry_carries_the_fixture_key() {
        let entry = user_with_fixture_key("alice", &["systemd-journal"], "/bin/bash");
        assert!(entry.starts_with("  - name: alice\n"), "{entry}");
        assert!(entry.contains("groups: [systemd-journal]"), "{entry}");
        assert!(entry.contains("      - ssh-ed25519 "), "{entry}");
    }

    /// Needs cloud-localds (cloud-image-utils) and blkid on the build host.
    #[test]
    fn nocloud_seed_is_iso9660_labelled_cidata() {
        let mut data = UserData::new("#cloud-config\nhostname: x\n", "i-1");
        data.network_config = Some("version: 2\nethernets: {}\n".into());
        let seed = Seed::nocloud(&data);
        let out = Command::new("blkid")
            .args(["-p", "-o", "export"])
            .arg(seed.image())
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.contains("LABEL=cidata"), "{text}");
        assert!(text.contains("TYPE=iso9660"), "{text}");
        let args = seed.qemu_args().join(" ");
        assert!(args.contains("readonly=on"), "{args}");
        assert!(args.contains("virtio-blk-pci,drive=seed"), "{args}");
    }
}
