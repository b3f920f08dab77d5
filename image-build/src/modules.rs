//! The kernel-module diet: the modules of the image's kernel that its module
//! set does not keep are removed from the root, except those a kept module
//! needs (modules.dep, and the soft dependencies of modules.softdep). What was
//! removed is listed in build.json, by directory.
//!
//! The initrd is built before the diet, from the whole module tree, with its
//! own driver list (initrd.rs).

use crate::spec::{KernelFlavour, KernelModules, ModuleSet};
use crate::stage::Stage;
use anyhow::{bail, Context, Result};
use ballast_common::build_info::DroppedModules;
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::process::Command;

/// The `cloud` set: paths under /usr/lib/modules/<kver>/kernel that a
/// container host in a VM needs. Virtio, Xen, Hyper-V, VMware and NVMe/SCSI/
/// ATA storage, every network driver of the cloud kernel, device-mapper
/// (verity), netfilter/nftables, bridges, veth, VLANs, VXLAN, WireGuard and
/// traffic control for containers, and the filesystems the host mounts: erofs,
/// overlay, FAT with its code pages (the ESP), autofs (the ESP's automount),
/// efivarfs, FUSE, and ISO 9660 (NoCloud and config-drive seeds). Left out:
/// KVM, network filesystems (NFS, SMB, Ceph), btrfs and XFS, InfiniBand,
/// SCSI targets, HID, media and data-acquisition drivers, and the rarer
/// protocol families (TIPC, RDS, SMC, DCCP, L2TP).
pub const CLOUD_SET: &[&str] = &[
    "arch/x86/crypto",
    "arch/x86/events",
    "arch/x86/kernel",
    "arch/x86/platform",
    "block",
    "crypto",
    "lib",
    "mm",
    "drivers/acpi",
    "drivers/ata",
    "drivers/block",
    "drivers/char",
    "drivers/cpufreq",
    "drivers/firmware",
    "drivers/hv",
    "drivers/input",
    "drivers/md",
    "drivers/misc",
    "drivers/net",
    "drivers/nvme",
    "drivers/pci",
    "drivers/platform",
    "drivers/powercap",
    "drivers/ptp",
    "drivers/pps",
    "drivers/scsi",
    "drivers/thermal",
    "drivers/tty",
    "drivers/virtio",
    "drivers/watchdog",
    "drivers/xen",
    "fs/autofs",
    "fs/binfmt_misc.ko",
    "fs/configfs",
    "fs/efivarfs",
    "fs/erofs",
    "fs/fat",
    "fs/fuse",
    "fs/isofs",
    "fs/nls",
    "fs/overlayfs",
    "fs/pstore",
    "net/802",
    "net/8021q",
    "net/bridge",
    "net/core",
    "net/ife",
    "net/ipv4",
    "net/ipv6",
    "net/key",
    "net/llc",
    "net/mpls",
    "net/mptcp",
    "net/netfilter",
    "net/netlink",
    "net/nsh",
    "net/openvswitch",
    "net/packet",
    "net/psample",
    "net/sched",
    "net/sctp",
    "net/tls",
    "net/unix",
    "net/vmw_vsock",
    "net/xfrm",
];

/// What the `cloud` set leaves out of the directories it keeps, unless a kept
/// module needs it: the roles of a storage server or a Xen dom0, not of a
/// guest (NVMe over Fabrics targets and the RDMA transports that bring the
/// whole InfiniBand core, DRBD, bcache, Xen's backend drivers, of which
/// xen-scsiback brings the SCSI target core), and test devices, tapes and
/// cellular modems.
pub const CLOUD_EXCEPT: &[&str] = &[
    "drivers/nvme/target",
    "drivers/nvme/host/nvme-rdma.ko",
    "drivers/block/drbd",
    "drivers/md/bcache",
    "drivers/xen/xen-scsiback.ko",
    "drivers/xen/xen-pciback",
    "drivers/block/xen-blkback",
    "drivers/net/xen-netback",
    // Test and debugging devices, tape drives, cellular modems.
    "drivers/scsi/scsi_debug.ko",
    "drivers/block/null_blk",
    "drivers/scsi/st.ko",
    "drivers/net/wwan",
    "drivers/net/mhi_net.ko",
];

/// The set a spec keeps: its own, or its kernel flavour's default (`cloud`
/// for the cloud kernel; `all` for the generic one, whose bare-metal driver
/// set is kept whole).
pub fn effective_set(spec: &KernelModules, kernel: KernelFlavour) -> ModuleSet {
    spec.set.unwrap_or(match kernel {
        KernelFlavour::Cloud => ModuleSet::Cloud,
        KernelFlavour::Generic => ModuleSet::All,
    })
}

/// Removes the modules the spec does not keep from `root`'s module tree of
/// `kver`, runs depmod in the root, and returns what was removed.
pub fn diet(
    stage: &Stage,
    root: &Path,
    kver: &str,
    spec: &KernelModules,
    kernel: KernelFlavour,
) -> Result<Vec<DroppedModules>> {
    let (set, except): (&[&str], &[&str]) = match effective_set(spec, kernel) {
        ModuleSet::All => {
            stage.log("module set `all`: every module stays")?;
            return Ok(Vec::new());
        }
        ModuleSet::Cloud => (CLOUD_SET, CLOUD_EXCEPT),
    };
    let dir = root.join("usr/lib/modules").join(kver);
    let tree = ModuleTree::load(&dir)?;
    let kept = tree
        .keep(set, except, &spec.keep)
        .with_context(|| format!("kernel_modules.keep, for kernel {kver}"))?;
    let mut dropped: BTreeMap<String, DroppedModules> = BTreeMap::new();
    for module in tree.deps.keys() {
        if kept.contains(module) || !module.starts_with("kernel/") {
            continue;
        }
        let path = dir.join(module);
        let bytes = std::fs::metadata(&path)
            .with_context(|| format!("modules.dep names {module}, which is missing"))?
            .len();
        std::fs::remove_file(&path).with_context(|| format!("cannot remove {}", path.display()))?;
        let parent = module.rsplit_once('/').map_or("", |(d, _)| d).to_string();
        let entry = dropped
            .entry(parent.clone())
            .or_insert_with(|| DroppedModules {
                dir: parent,
                modules: 0,
                bytes: 0,
            });
        entry.modules += 1;
        entry.bytes += bytes;
    }
    remove_empty_dirs(&dir.join("kernel"))?;
    stage.cmd(
        Command::new("chroot")
            .arg(root)
            .args(["depmod", "-a", kver]),
    )?;
    let (n, bytes) = dropped
        .values()
        .fold((0, 0), |(n, b), d| (n + d.modules, b + d.bytes));
    stage.log(&format!(
        "kept {} modules, dropped {n} ({:.1} MB)",
        kept.iter().filter(|m| m.starts_with("kernel/")).count(),
        bytes as f64 / 1e6
    ))?;
    Ok(dropped.into_values().collect())
}

/// The modules under `dir` (relative to `kernel/`) that none of `drivers`
/// (module names) needs, by name: what the initrd leaves out of a dracut
/// module that takes a whole directory.
pub fn unneeded_under(root: &Path, kver: &str, dir: &str, drivers: &[&str]) -> Result<Vec<String>> {
    let tree = ModuleTree::load(&root.join("usr/lib/modules").join(kver))?;
    let paths: Vec<&str> = drivers
        .iter()
        .filter_map(|d| tree.path_of(&d.replace('-', "_")))
        .filter_map(|p| p.strip_prefix("kernel/"))
        .collect();
    let kept = tree.keep(&paths, &[], &[])?;
    let prefix = format!("kernel/{}/", dir.trim_end_matches('/'));
    Ok(tree
        .deps
        .keys()
        .filter(|m| m.starts_with(&prefix) && !kept.contains(*m))
        .map(|m| module_name(m))
        .collect())
}

fn remove_empty_dirs(dir: &Path) -> Result<bool> {
    let mut empty = true;
    for entry in std::fs::read_dir(dir).with_context(|| format!("cannot read {}", dir.display()))? {
        let entry = entry?;
        if entry.file_type()?.is_dir() && remove_empty_dirs(&entry.path())? {
            std::fs::remove_dir(entry.path())?;
        } else {
            empty = false;
        }
    }
    Ok(empty)
}

/// A kernel's module tree as depmod describes it.
struct ModuleTree {
    /// Module path (relative to the kernel's module directory) → the paths it needs.
    deps: BTreeMap<String, Vec<String>>,
    /// Module name → the names or aliases it loads with (pre and post).
    softdeps: BTreeMap<String, Vec<String>>,
    /// Module name (with '_' for '-') → path.
    by_name: BTreeMap<String, String>,
    /// Alias → module name, for plain aliases (no wildcards).
    aliases: BTreeMap<String, String>,
}

/// A module's name from its path: file name without `.ko` (and compression
/// suffix), with '-' read as '_' as modprobe does.
pub(crate) fn module_name(path: &str) -> String {
    let file = path.rsplit('/').next().unwrap_or(path);
    let stem = file.split(".ko").next().unwrap_or(file);
    stem.replace('-', "_")
}

impl ModuleTree {
    /// Reads depmod's files in a kernel's module directory.
    fn load(dir: &Path) -> Result<ModuleTree> {
        let read = |name: &str| {
            let p = dir.join(name);
            std::fs::read_to_string(&p).with_context(|| format!("cannot read {}", p.display()))
        };
        ModuleTree::parse(
            &read("modules.dep")?,
            &read("modules.softdep").unwrap_or_default(),
            &read("modules.alias").unwrap_or_default(),
        )
    }

    fn parse(dep: &str, softdep: &str, alias: &str) -> Result<ModuleTree> {
        let mut deps = BTreeMap::new();
        let mut by_name = BTreeMap::new();
        for (i, line) in dep.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            let Some((module, needs)) = line.split_once(':') else {
                bail!("modules.dep line {}: no ':' in {line:?}", i + 1);
            };
            let module = module.trim();
            if module.is_empty() || module.starts_with('/') || module.contains("..") {
                bail!("modules.dep line {}: bad module path {module:?}", i + 1);
            }
            by_name.insert(module_name(module), module.to_string());
            deps.insert(
                module.to_string(),
                needs.split_whitespace().map(str::to_string).collect(),
            );
        }
        let mut softdeps: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for line in softdep.lines() {
            let mut words = line.split_whitespace();
            if words.next() != Some("softdep") {
                continue;
            }
            let Some(module) = words.next() else { continue };
            softdeps
                .entry(module.replace('-', "_"))
                .or_default()
                .extend(
                    words
                        .filter(|w| !w.ends_with(':'))
                        .map(|w| w.replace('-', "_")),
                );
        }
        let mut aliases = BTreeMap::new();
        for line in alias.lines() {
            let mut words = line.split_whitespace();
            if let (Some("alias"), Some(a), Some(m)) = (words.next(), words.next(), words.next()) {
                if !a.contains(['*', '?', '[']) {
                    aliases.insert(a.replace('-', "_"), m.replace('-', "_"));
                }
            }
        }
        Ok(ModuleTree {
            deps,
            softdeps,
            by_name,
            aliases,
        })
    }

    fn path_of(&self, name: &str) -> Option<&String> {
        self.by_name
            .get(name)
            .or_else(|| self.by_name.get(self.aliases.get(name)?))
    }

    /// The modules to keep: those under a path of `set` but not of `except`,
    /// or under a path of `extra` (paths relative to `kernel/`), and
    /// everything they need. A path of `extra` that matches no module is an
    /// error (a typo would otherwise drop what the user meant to keep); the
    /// set's paths may be missing from a kernel.
    fn keep(&self, set: &[&str], except: &[&str], extra: &[String]) -> Result<BTreeSet<String>> {
        let under = |module: &str, path: &str| {
            module
                .strip_prefix("kernel/")
                .and_then(|rel| rel.strip_prefix(path.trim_end_matches('/')))
                .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
        };
        let mut todo: Vec<&String> = Vec::new();
        for path in set.iter().copied().chain(extra.iter().map(String::as_str)) {
            let before = todo.len();
            // The spec's own paths are kept whole, exceptions or not.
            let from_spec = extra.iter().any(|e| e == path);
            let excepted = |m: &str| !from_spec && except.iter().any(|x| under(m, x));
            todo.extend(self.deps.keys().filter(|m| under(m, path) && !excepted(m)));
            if todo.len() == before && from_spec {
                bail!("{path:?} matches no module under kernel/");
            }
        }
        // Modules outside kernel/ (updates/, extra/: DKMS and the like) stay.
        todo.extend(self.deps.keys().filter(|m| !m.starts_with("kernel/")));
        let mut kept = BTreeSet::new();
        while let Some(module) = todo.pop() {
            if !kept.insert(module.clone()) {
                continue;
            }
            if let Some(needs) = self.deps.get(module) {
                todo.extend(needs.iter());
            }
            if let Some(soft) = self.softdeps.get(&module_name(module)) {
                todo.extend(soft.iter().filter_map(|n| self.path_of(n)));
            }
        }
        Ok(kept)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEP: &str = "\
kernel/fs/btrfs/btrfs.ko: kernel/lib/raid6/raid6_pq.ko kernel/crypto/xor.ko
kernel/lib/raid6/raid6_pq.ko:
kernel/crypto/xor.ko:
kernel/crypto/md5.ko:
kernel/fs/nfsd/nfsd.ko: kernel/net/sunrpc/sunrpc.ko
kernel/net/sunrpc/sunrpc.ko:
kernel/drivers/net/virtio_net.ko: kernel/drivers/net/net_failover.ko
kernel/drivers/net/net_failover.ko: kernel/net/core/failover.ko
kernel/net/core/failover.ko:
kernel/drivers/md/dm-verity.ko:
updates/dkms/zfs.ko:
";
    const SOFTDEP: &str = "# comment\nsoftdep nfsd pre: crypto-md5\nsoftdep dm_verity post: xor\n";
    const ALIAS: &str = "alias crypto-md5 md5\nalias pci:v00001AF4d* virtio_pci\n";

    fn tree() -> ModuleTree {
        ModuleTree::parse(DEP, SOFTDEP, ALIAS).unwrap()
    }

    #[test]
    fn a_kept_directory_brings_what_its_modules_need() {
        let kept = tree().keep(&["drivers/net"], &[], &[]).unwrap();
        assert!(kept.contains("kernel/drivers/net/virtio_net.ko"));
        assert!(kept.contains("kernel/drivers/net/net_failover.ko"));
        // Outside the set, needed through net_failover.
        assert!(kept.contains("kernel/net/core/failover.ko"));
        assert!(!kept.contains("kernel/fs/btrfs/btrfs.ko"));
        assert!(!kept.contains("kernel/crypto/xor.ko"));
        // Modules outside kernel/ are never dropped.
        assert!(kept.contains("updates/dkms/zfs.ko"));
    }

    #[test]
    fn an_exception_is_left_out_unless_needed_or_kept_by_the_spec() {
        let t = tree();
        let kept = t
            .keep(
                &["drivers/net", "net"],
                &["drivers/net/net_failover.ko", "net/sunrpc"],
                &[],
            )
            .unwrap();
        // virtio_net needs net_failover: it comes back.
        assert!(kept.contains("kernel/drivers/net/net_failover.ko"));
        assert!(!kept.contains("kernel/net/sunrpc/sunrpc.ko"));
        let kept = t
            .keep(&["net"], &["net/sunrpc"], &["net/sunrpc".into()])
            .unwrap();
        assert!(kept.contains("kernel/net/sunrpc/sunrpc.ko"));
    }

    #[test]
    fn soft_dependencies_are_kept_by_name_and_by_alias() {
        let kept = tree()
            .keep(&["drivers/md"], &[], &["fs/nfsd".into()])
            .unwrap();
        assert!(
            kept.contains("kernel/crypto/xor.ko"),
            "dm_verity's post softdep"
        );
        assert!(
            kept.contains("kernel/crypto/md5.ko"),
            "crypto-md5 is md5's alias"
        );
        assert!(kept.contains("kernel/net/sunrpc/sunrpc.ko"));
    }

    #[test]
    fn paths_match_whole_components_and_single_files() {
        let t = tree();
        // "fs/btr" is not "fs/btrfs".
        let err = t.keep(&[], &[], &["fs/btr".into()]).unwrap_err();
        assert!(
            format!("{err}").contains("\"fs/btr\" matches no module"),
            "{err}"
        );
        let kept = t.keep(&[], &[], &["crypto/md5.ko".into()]).unwrap();
        assert!(kept.contains("kernel/crypto/md5.ko"));
        assert!(!kept.contains("kernel/crypto/xor.ko"));
        // A set path missing from this kernel is not an error.
        assert!(t.keep(&["drivers/usb"], &[], &[]).is_ok());
    }

    #[test]
    fn a_bad_modules_dep_is_refused_with_its_line() {
        let err = ModuleTree::parse("kernel/a.ko:\nno colon here\n", "", "")
            .err()
            .unwrap();
        assert!(format!("{err}").contains("line 2"), "{err}");
        let err = ModuleTree::parse("../../etc/x.ko:\n", "", "")
            .err()
            .unwrap();
        assert!(format!("{err}").contains("bad module path"), "{err}");
    }

    #[test]
    fn a_directory_keeps_only_what_the_drivers_need() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("usr/lib/modules/6.1.0");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(
            dir.join("modules.dep"),
            "kernel/drivers/md/dm-verity.ko: kernel/drivers/md/dm-bufio.ko kernel/drivers/md/dm-mod.ko\n\
             kernel/drivers/md/dm-bufio.ko:\nkernel/drivers/md/dm-mod.ko:\n\
             kernel/drivers/md/raid456.ko: kernel/drivers/md/md-mod.ko\nkernel/drivers/md/md-mod.ko:\n\
             kernel/drivers/md/bcache/bcache.ko:\nkernel/fs/erofs/erofs.ko:\n",
        )
        .unwrap();
        let omit = unneeded_under(
            root.path(),
            "6.1.0",
            "drivers/md",
            &["dm-verity", "erofs", "nvme"],
        )
        .unwrap();
        assert_eq!(omit, ["bcache", "md_mod", "raid456"]);
    }

    #[test]
    fn names_follow_modprobe() {
        assert_eq!(module_name("kernel/drivers/md/dm-verity.ko"), "dm_verity");
        assert_eq!(module_name("kernel/fs/xfs/xfs.ko.zst"), "xfs");
    }
}
