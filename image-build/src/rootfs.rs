//! The base root filesystem: Debian packages installed by mmdebstrap, cached
//! under a key of everything that determines it, so a rebuild that changes
//! only the agent or the units skips the minute-long bootstrap.

use crate::spec::Spec;
use crate::stage::Stage;
use anyhow::{Context, Result};
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use std::process::Command;

/// Bump when the way the base rootfs is made changes.
const RECIPE: &str = "rootfs-v2";

/// mmdebstrap's hook that makes /bin, /lib and /sbin links into /usr before
/// anything is unpacked, so apt satisfies `usrmerge | usr-is-merged` with
/// the empty usr-is-merged. Without it bookworm pulls usrmerge, which
/// depends on perl: 28 MB of the root that nothing on the host runs.
const MERGED_USR_HOOK: &str = "/usr/share/mmdebstrap/hooks/merged-usr";

/// Paths dpkg leaves out of the image: documentation, manuals, translations;
/// glibc's iconv modules for legacy character sets (glibc converts between
/// UTF-8, UTF-16/32, ASCII and Latin-1 without them); and udev's hardware
/// name databases (vendor and model names of PCI, USB, ACPI, Bluetooth and
/// SDIO devices, and MAC address owners), which only label devices for
/// people. udev's postinst compiles hwdb.bin from the hwdb files that
/// remain, as would a `systemd-hwdb update` on the host. (Patterns match
/// the paths in the package: bookworm's udev ships under /lib.)
const DPKG_EXCLUDES: &[&str] = &[
    "path-exclude=/usr/share/man/*",
    "path-exclude=/usr/share/doc/*",
    "path-include=/usr/share/doc/*/copyright",
    "path-exclude=/usr/share/info/*",
    "path-exclude=/usr/share/locale/*",
    "path-include=/usr/share/locale/locale.alias",
    "path-exclude=/usr/share/lintian/*",
    "path-exclude=/usr/lib/x86_64-linux-gnu/gconv/*",
    "path-include=/usr/lib/x86_64-linux-gnu/gconv/gconv-modules*",
    "path-exclude=*/udev/hwdb.d/20-pci-vendor-model.hwdb",
    "path-exclude=*/udev/hwdb.d/20-usb-vendor-model.hwdb",
    "path-exclude=*/udev/hwdb.d/20-OUI.hwdb",
    "path-exclude=*/udev/hwdb.d/20-acpi-vendor.hwdb",
    "path-exclude=*/udev/hwdb.d/20-bluetooth-vendor-product.hwdb",
    "path-exclude=*/udev/hwdb.d/20-sdio-vendor-model.hwdb",
    // machined's image downloads (importd, systemd-pull): the one user of
    // libcurl and, through it, gnutls, LDAP, SSH and RTMP (5 MB of
    // libraries, purged: purge::UNUSED_PACKAGES). Containers come through
    // the agent's OCI client.
    "path-exclude=*/lib/systemd/systemd-importd",
    "path-exclude=*/lib/systemd/systemd-pull",
    "path-exclude=*/lib/systemd/systemd-import",
    "path-exclude=*/lib/systemd/systemd-import-fs",
    "path-exclude=*/lib/systemd/systemd-export",
    "path-exclude=*/lib/systemd/import-pubring.gpg",
    "path-exclude=*/lib/systemd/system/systemd-importd.service",
    "path-exclude=*/lib/systemd/system/dbus-org.freedesktop.import1.service",
    "path-exclude=/usr/share/dbus-1/system-services/org.freedesktop.import1.service",
    "path-exclude=/usr/share/dbus-1/system.d/org.freedesktop.import1.conf",
    "path-exclude=/usr/share/polkit-1/actions/org.freedesktop.import1.policy",
    // glibc's vector math library, for code built with -fopenmp-simd or
    // -ffast-math vectorization: nothing in the root links it.
    "path-exclude=*/x86_64-linux-gnu/libmvec.so.1",
    // tc's ATM qdisc, which needs libatm (not installed: iproute2 only
    // recommends it).
    "path-exclude=*/x86_64-linux-gnu/tc/q_atm.so",
    // systemd generators for what the image never has: SysV init scripts
    // and rc.local, crypttab and integritytab, hibernation, offline system
    // updates, systemd.run= on the command line. PID 1 runs every generator
    // at the switch to the root and at each daemon-reload (the agent
    // reloads for every container change); without these seven, the
    // generator phase at the switch to the root took 0.8 s instead of
    // 1.8 s in a TCG boot. The veritysetup, fstab,
    // gpt-auto (the ESP's automount), bless-boot, getty and debug
    // generators stay.
    "path-exclude=*/lib/systemd/system-generators/systemd-sysv-generator",
    "path-exclude=*/lib/systemd/system-generators/systemd-rc-local-generator",
    "path-exclude=*/lib/systemd/system-generators/systemd-cryptsetup-generator",
    "path-exclude=*/lib/systemd/system-generators/systemd-integritysetup-generator",
    "path-exclude=*/lib/systemd/system-generators/systemd-hibernate-resume-generator",
    "path-exclude=*/lib/systemd/system-generators/systemd-system-update-generator",
    "path-exclude=*/lib/systemd/system-generators/systemd-run-generator",
];

/// The cache key of a spec's base rootfs. Timestamps do not matter: the root
/// filesystem is made with every file at SOURCE_DATE_EPOCH.
pub fn cache_key(spec: &Spec) -> String {
    let mut h = Sha256::new();
    for part in [
        RECIPE,
        &spec.debian.suite,
        &spec.debian.mirror,
        &spec.architecture,
    ] {
        h.update(part.as_bytes());
        h.update([0]);
    }
    for p in spec.packages() {
        h.update(p.as_bytes());
        h.update([0]);
    }
    for e in DPKG_EXCLUDES {
        h.update(e.as_bytes());
        h.update([0]);
    }
    hex::encode(&h.finalize()[..12])
}

/// Returns the cached base rootfs for `spec`, bootstrapping it if needed.
pub fn base(stage: &Stage, spec: &Spec, cache_dir: &Path, epoch: u64) -> Result<PathBuf> {
    let dir = cache_dir.join("rootfs").join(cache_key(spec));
    let root = dir.join("root");
    if dir.join("complete").exists() {
        stage.log(&format!("using cached base rootfs {}", root.display()))?;
        return Ok(root);
    }
    if dir.exists() {
        std::fs::remove_dir_all(&dir)
            .with_context(|| format!("cannot remove incomplete cache {}", dir.display()))?;
    }
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let mut cmd = Command::new("mmdebstrap");
    cmd.arg("--variant=minbase")
        .arg(format!("--hook-dir={MERGED_USR_HOOK}"))
        .arg("--mode=root")
        .arg("--format=directory")
        .arg("--arch=amd64")
        .arg(format!("--include={}", spec.packages().join(",")));
    for e in DPKG_EXCLUDES {
        cmd.arg(format!("--dpkgopt={e}"));
    }
    cmd.arg(&spec.debian.suite)
        .arg(&root)
        .arg(&spec.debian.mirror)
        .env("SOURCE_DATE_EPOCH", epoch.to_string());
    stage.cmd(&mut cmd)?;
    std::fs::write(dir.join("complete"), b"")?;
    Ok(root)
}

/// Copies the cached base into a fresh work tree (reflinks where the filesystem can).
pub fn copy_base(stage: &Stage, base: &Path, work: &Path) -> Result<()> {
    if work.exists() {
        std::fs::remove_dir_all(work)
            .with_context(|| format!("cannot remove {}", work.display()))?;
    }
    stage.cmd(
        Command::new("cp")
            .arg("-a")
            .arg("--reflink=auto")
            .arg(base)
            .arg(work),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cache_key_follows_what_determines_the_rootfs() {
        let a = Spec::parse("name: a\nversion: '1'\ndebian: {kernel: cloud}\n", "t").unwrap();
        let mut b = a.clone();
        b.name = "other".into();
        b.version = "2".into();
        assert_eq!(
            cache_key(&a),
            cache_key(&b),
            "name/version do not change the base"
        );
        let mut c = a.clone();
        c.debian.packages.push("curl".into());
        assert_ne!(cache_key(&a), cache_key(&c));
        let mut d = a.clone();
        d.debian.kernel = crate::spec::KernelFlavour::Generic;
        assert_ne!(cache_key(&a), cache_key(&d));
    }
}
