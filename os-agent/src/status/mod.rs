//! What the host is running: slot, image, root hash, kernel, boot entry. The
//! daemon publishes it in /run/ballast/status.json; osctl shows it.

pub mod cli;

use crate::cmdline;
use crate::disk::{self, grow::DATA_LABEL, slot::Slot};
use crate::host::Host;
use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use std::path::Path;

pub const STATUS_FILE: &str = "/run/ballast/status.json";
pub const OS_RELEASE: &str = "/usr/lib/os-release";

/// The facts about the running host. This is the format of status.json.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostStatus {
    /// The root slot booted: "a" or "b".
    pub slot: Slot,
    /// IMAGE_ID from os-release.
    pub image_name: String,
    /// IMAGE_VERSION from os-release.
    pub image_version: String,
    /// The dm-verity root hash on the kernel command line (hex).
    pub root_hash: String,
    /// uname -r.
    pub kernel_release: String,
    /// The systemd-boot entry id booted (the UKI's file name), if any.
    pub boot_entry: Option<String>,
    /// The UKI's path on the ESP, if found.
    pub uki_path: Option<String>,
    /// The data partition's device, e.g. /dev/vda6.
    pub data_partition: String,
    pub data_partition_size_bytes: u64,
    /// The disk holding the slots and the data partition, e.g. /dev/vda.
    pub disk: String,
    /// The daemon's pid, when it wrote this.
    #[serde(default)]
    pub agent_pid: Option<u32>,
    /// When it was gathered, in seconds since the epoch.
    pub gathered_at_unix: u64,
    /// When the booted image was built (os-release BALLAST_BUILD_EPOCH);
    /// `None` for images from before it was recorded.
    #[serde(default)]
    pub image_built_at_unix: Option<u64>,
    /// Whether the firmware booted with Secure Boot enforcing.
    #[serde(default)]
    pub secure_boot: bool,
}

fn read(host: &dyn Host, path: &str) -> Result<String> {
    host.read_to_string(Path::new(path))
        .with_context(|| format!("cannot read {path}"))
}

/// Gathers the status from the host.
pub fn gather(host: &dyn Host) -> Result<HostStatus> {
    let root = cmdline::parse(&read(host, "/proc/cmdline")?)
        .context("cannot tell which root was booted from /proc/cmdline")?;
    let os = ballast_common::os_release::parse(&read(host, OS_RELEASE)?);
    let field = |k: &str| {
        os.get(k)
            .cloned()
            .with_context(|| format!("{OS_RELEASE} has no {k}= (not a Ballast image?)"))
    };
    let image_name = field("IMAGE_ID")?;
    let image_version = field("IMAGE_VERSION")?;
    let image_built_at_unix = match os.get("BALLAST_BUILD_EPOCH") {
        Some(v) => Some(v.parse::<u64>().with_context(|| {
            format!("{OS_RELEASE}: BALLAST_BUILD_EPOCH={v:?} is not a number of seconds")
        })?),
        None => None,
    };
    let kernel_release = read(host, "/proc/sys/kernel/osrelease")?.trim().to_string();
    let data = disk::locate_by_partlabel(host, DATA_LABEL)?;
    let slot = disk::slot::booted_slot(host, &data.disk, &root)?;
    let data_size = disk::size_bytes(host, &data.name)?;
    let boot_entry = crate::boot::selected_entry(host)?;
    let uki_path = match &boot_entry {
        Some(e) => crate::boot::entries::find_entry_file(host, e)?.map(|p| p.display().to_string()),
        None => None,
    };
    let secure_boot = crate::boot::secure_boot::enabled(host)?;
    let gathered_at_unix = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .context("the clock is before 1970")?
        .as_secs();
    Ok(HostStatus {
        slot,
        image_name,
        image_version,
        root_hash: root.root_hash,
        kernel_release,
        boot_entry,
        uki_path,
        data_partition: data.dev_path().display().to_string(),
        data_partition_size_bytes: data_size,
        disk: data.disk_dev_path().display().to_string(),
        agent_pid: None,
        gathered_at_unix,
        image_built_at_unix,
        secure_boot,
    })
}

/// Writes status.json atomically.
pub fn publish(host: &dyn Host, status: &HostStatus) -> Result<()> {
    let mut json = serde_json::to_vec_pretty(status).context("cannot serialize the status")?;
    json.push(b'\n');
    host.write_atomic(Path::new(STATUS_FILE), &json)
        .with_context(|| format!("cannot write {STATUS_FILE}"))
}

/// Reads status.json; `None` if the daemon has not written one.
pub fn read_published(host: &dyn Host) -> Result<Option<HostStatus>> {
    let path = Path::new(STATUS_FILE);
    let bytes = match host.read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).with_context(|| format!("cannot read {STATUS_FILE}")),
    };
    serde_json::from_slice(&bytes)
        .with_context(|| format!("{STATUS_FILE} is not a valid status"))
        .map(Some)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::disk::fixture::{ballast_disk, write, HASH_A, HASH_B, MIB};
    use crate::host::DirHost;
    use ballast_common::slot_partuuids;

    /// A fake Ballast host booted from the slot whose root hash is `hash`.
    pub fn booted_host(dir: &Path, hash: &[u8; 32]) -> DirHost {
        let (host, _) = ballast_disk(dir, 32 * MIB);
        let (d, v) = slot_partuuids(hash);
        let hex: String = hash.iter().map(|b| format!("{b:02x}")).collect();
        write(
            dir,
            "proc/cmdline",
            &format!(
                "roothash={hex} systemd.verity_root_data=PARTUUID={d} \
                 systemd.verity_root_hash=PARTUUID={v} rootfstype=erofs ro console=ttyS0,115200\n"
            ),
        );
        write(
            dir,
            "usr/lib/os-release",
            "ID=debian\nIMAGE_ID=ballast\nIMAGE_VERSION=\"1.2.3\"\n",
        );
        write(dir, "proc/sys/kernel/osrelease", "6.1.0-28-cloud-amd64\n");
        host
    }

    #[test]
    fn gathers_the_slot_from_the_command_line_and_the_gpt() {
        for (hash, slot) in [(HASH_A, Slot::A), (HASH_B, Slot::B)] {
            let dir = tempfile::tempdir().unwrap();
            let host = booted_host(dir.path(), &hash);
            let s = gather(&host).unwrap();
            assert_eq!(s.slot, slot);
            assert_eq!(s.image_name, "ballast");
            assert_eq!(s.image_version, "1.2.3");
            assert_eq!(s.root_hash, hex_of(&hash));
            assert_eq!(s.kernel_release, "6.1.0-28-cloud-amd64");
            assert_eq!(s.data_partition, "/dev/vda6");
            assert_eq!(s.disk, "/dev/vda");
            assert_eq!(s.data_partition_size_bytes, 4 * MIB);
            assert_eq!(s.boot_entry, None);
            assert_eq!(s.agent_pid, None);
        }
    }

    fn hex_of(h: &[u8; 32]) -> String {
        h.iter().map(|b| format!("{b:02x}")).collect()
    }

    #[test]
    fn missing_facts_are_clear_errors() {
        let dir = tempfile::tempdir().unwrap();
        let host = booted_host(dir.path(), &HASH_A);
        write(
            dir.path(),
            "usr/lib/os-release",
            "ID=debian\nIMAGE_ID=ballast\n",
        );
        let e = format!("{:#}", gather(&host).unwrap_err());
        assert!(
            e.contains("/usr/lib/os-release has no IMAGE_VERSION="),
            "{e}"
        );
        write(
            dir.path(),
            "usr/lib/os-release",
            "ID=debian\nIMAGE_ID=ballast\nIMAGE_VERSION=1\nBALLAST_BUILD_EPOCH=soon\n",
        );
        let e = format!("{:#}", gather(&host).unwrap_err());
        assert!(
            e.contains("BALLAST_BUILD_EPOCH=\"soon\" is not a number"),
            "{e}"
        );
        write(
            dir.path(),
            "usr/lib/os-release",
            "ID=debian\nIMAGE_ID=ballast\nIMAGE_VERSION=1\nBALLAST_BUILD_EPOCH=1760000000\n",
        );
        assert_eq!(
            gather(&host).unwrap().image_built_at_unix,
            Some(1_760_000_000)
        );

        write(dir.path(), "proc/cmdline", "ro console=ttyS0\n");
        let e = format!("{:#}", gather(&host).unwrap_err());
        assert!(e.contains("kernel command line has no roothash="), "{e}");
    }

    #[test]
    fn publish_and_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let host = booted_host(dir.path(), &HASH_A);
        assert_eq!(read_published(&host).unwrap(), None);
        let mut s = gather(&host).unwrap();
        s.agent_pid = Some(42);
        publish(&host, &s).unwrap();
        assert_eq!(read_published(&host).unwrap(), Some(s.clone()));
        let v: serde_json::Value = serde_json::from_slice(
            &std::fs::read(dir.path().join("run/ballast/status.json")).unwrap(),
        )
        .unwrap();
        assert_eq!(v["slot"], "a");
        assert_eq!(v["agent_pid"], 42);
        // No temporary files are left beside it.
        assert_eq!(
            std::fs::read_dir(dir.path().join("run/ballast"))
                .unwrap()
                .count(),
            1
        );

        write(dir.path(), "run/ballast/status.json", "{");
        let e = format!("{:#}", read_published(&host).unwrap_err());
        assert!(
            e.contains("/run/ballast/status.json is not a valid status"),
            "{e}"
        );
    }
}
