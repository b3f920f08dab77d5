//! Turns a copy of the base rootfs into this image's root: the agent, the
//! units, the spec's files, the image identity, and no per-machine state.

use crate::spec::{parse_mode, LoadedSpec};
use crate::stage::Stage;
use anyhow::{bail, Context, Result};
use ballast_common::os_release;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

pub struct Inputs<'a> {
    pub spec: &'a LoadedSpec,
    /// Directory holding the release build of `os-agent`.
    pub agent_dir: &'a Path,
    /// The repository's `units/` tree, copied to the image's /usr/lib.
    pub units_dir: &'a Path,
    /// SOURCE_DATE_EPOCH: when the image was built, for os-release.
    pub epoch: u64,
}

/// What customizing takes out of the tree for other stages.
pub struct Extracted {
    pub kernel_version: String,
    /// The kernel image, moved out of /boot.
    pub vmlinuz: PathBuf,
    /// The image's /var, moved out of the root: it seeds the data partition.
    pub var_seed: PathBuf,
    /// The packages purged from the bootstrap (`purge::UNUSED_PACKAGES` and
    /// the libraries only they used).
    pub purged: Vec<String>,
}

pub fn customize(stage: &Stage, root: &Path, work: &Path, inp: &Inputs) -> Result<Extracted> {
    install_agent(root, inp.agent_dir)?;
    stage.cmd(
        Command::new("cp")
            .args(["-a", "--no-preserve=ownership"])
            .arg(inp.units_dir.join("."))
            .arg(root.join("usr/lib")),
    )?;
    write_os_release(root, &inp.spec.spec.name, &inp.spec.spec.version, inp.epoch)?;
    install_files(root, inp.spec)?;
    install_trusted_keys(root, inp.spec)?;
    forget_machine(root)?;
    for unit in OFF_SYSINIT {
        take_off_sysinit(&root.join("usr/lib/systemd/system").join(unit))?;
    }
    enable_units(stage, root, inp.units_dir)?;
    let purged = crate::purge::purge(
        stage,
        root,
        crate::purge::UNUSED_PACKAGES,
        &inp.spec.spec.debian.packages,
    )?;
    let missing = crate::elf::missing_libraries(root)?;
    if !missing.is_empty() {
        bail!(
            "programs in the root need libraries it does not have (list the package that has one in debian.packages to keep it):\n  {}",
            missing.join("\n  ")
        );
    }
    std::fs::create_dir_all(root.join("efi"))?;
    let (kernel_version, vmlinuz) = take_kernel(root, work)?;
    let var_seed = work.join("var-seed");
    if var_seed.exists() {
        std::fs::remove_dir_all(&var_seed)?;
    }
    move_homes_to_var(root)?;
    std::fs::create_dir_all(root.join("var/lib/ballast/etc/upper"))?;
    std::fs::create_dir_all(root.join("var/lib/ballast/etc/work"))?;
    std::fs::rename(root.join("var"), &var_seed)
        .with_context(|| format!("cannot move {}/var aside", root.display()))?;
    std::fs::create_dir(root.join("var"))?;
    Ok(Extracted {
        kernel_version,
        vmlinuz,
        var_seed,
        purged,
    })
}

/// /root and /home must be writable (users, SSH keys), and the root is not:
/// they become links into /var, as on Fedora CoreOS. What the image puts there
/// seeds the data partition of a fresh disk.
fn move_homes_to_var(root: &Path) -> Result<()> {
    for (dir, target, mode) in [("root", "var/roothome", 0o700), ("home", "var/home", 0o755)] {
        let src = root.join(dir);
        let dst = root.join(target);
        if src.is_symlink() {
            continue;
        }
        if dst.exists() {
            std::fs::remove_dir_all(&dst)?;
        }
        if src.is_dir() {
            std::fs::rename(&src, &dst)
                .with_context(|| format!("cannot move /{dir} to /{target}"))?;
        } else {
            std::fs::create_dir_all(&dst)?;
        }
        std::fs::set_permissions(&dst, std::fs::Permissions::from_mode(mode))?;
        std::os::unix::fs::symlink(target, &src)?;
    }
    Ok(())
}

/// One binary: os-agent, with /usr/bin/osctl a link to it (os-agent runs
/// osctl when called by that name): two binaries of the same code cost
/// 10 MB more root.
fn install_agent(root: &Path, agent_dir: &Path) -> Result<()> {
    let src = agent_dir.join("os-agent");
    if !src.is_file() {
        bail!(
            "{} not found: build the agent first (cargo build --release -p os-agent) or pass --agent-dir",
            src.display()
        );
    }
    let dst = root.join("usr/bin/os-agent");
    std::fs::copy(&src, &dst)
        .with_context(|| format!("cannot copy {} into the image", src.display()))?;
    std::fs::set_permissions(&dst, std::fs::Permissions::from_mode(0o755))?;
    let link = root.join("usr/bin/osctl");
    if link.symlink_metadata().is_ok() {
        std::fs::remove_file(&link)?;
    }
    std::os::unix::fs::symlink("os-agent", &link)?;
    Ok(())
}

/// Adds the image's identity to Debian's os-release (IMAGE_ID/IMAGE_VERSION
/// are what systemd-boot and the agent read), and BALLAST_BUILD_EPOCH: a
/// clock before it is certainly wrong (docs/update.md).
pub fn write_os_release(root: &Path, name: &str, version: &str, epoch: u64) -> Result<()> {
    let path = root.join("usr/lib/os-release");
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("cannot read {}", path.display()))?;
    let vars = os_release::parse(&text);
    let debian = vars
        .get("PRETTY_NAME")
        .cloned()
        .unwrap_or_else(|| "Debian".into());
    let mut out = String::new();
    for line in text.lines() {
        let key = line.split('=').next().unwrap_or_default();
        if !matches!(
            key,
            "PRETTY_NAME"
                | "IMAGE_ID"
                | "IMAGE_VERSION"
                | "VARIANT"
                | "VARIANT_ID"
                | "BALLAST_BUILD_EPOCH"
        ) {
            out.push_str(line);
            out.push('\n');
        }
    }
    out.push_str(&format!(
        "PRETTY_NAME={}\n",
        os_release::quote(&format!("Ballast {version} ({debian})"))
    ));
    out.push_str("VARIANT=Ballast\nVARIANT_ID=ballast\n");
    out.push_str(&format!("IMAGE_ID={}\n", os_release::quote(name)));
    out.push_str(&format!("BALLAST_BUILD_EPOCH={epoch}\n"));
    out.push_str(&format!("IMAGE_VERSION={}\n", os_release::quote(version)));
    std::fs::write(&path, out)?;
    Ok(())
}

fn install_files(root: &Path, spec: &LoadedSpec) -> Result<()> {
    let base = spec.path.parent().unwrap_or(Path::new("."));
    for (i, f) in spec.spec.files.iter().enumerate() {
        let data = match (&f.content, &f.source) {
            (Some(c), _) => c.clone().into_bytes(),
            (None, Some(src)) => {
                let p = base.join(src);
                std::fs::read(&p)
                    .with_context(|| format!("files[{i}].source: cannot read {}", p.display()))?
            }
            (None, None) => bail!("files[{i}]: needs content or source"),
        };
        let dst = root.join(f.path.trim_start_matches('/'));
        if let Some(parent) = dst.parent() {
            std::fs::create_dir_all(parent)?;
        }
        if dst.is_symlink() {
            std::fs::remove_file(&dst)?;
        }
        std::fs::write(&dst, data)
            .with_context(|| format!("files[{i}]: cannot write {}", f.path))?;
        std::fs::set_permissions(&dst, std::fs::Permissions::from_mode(parse_mode(&f.mode)?))?;
    }
    Ok(())
}

/// Installs the spec's trusted update keys as /usr/lib/ballast/keys/<key id>.pub.
fn install_trusted_keys(root: &Path, spec: &LoadedSpec) -> Result<()> {
    let base = spec.path.parent().unwrap_or(Path::new("."));
    let dir = root.join("usr/lib/ballast/keys");
    std::fs::create_dir_all(&dir)?;
    for (i, rel) in spec.spec.update.trusted_keys.iter().enumerate() {
        let p = base.join(rel);
        let text = std::fs::read_to_string(&p)
            .with_context(|| format!("update.trusted_keys[{i}]: cannot read {}", p.display()))?;
        let key = ballast_common::keys::PublicKey::parse(&text)
            .with_context(|| format!("update.trusted_keys[{i}]: {}", p.display()))?;
        std::fs::write(dir.join(format!("{}.pub", key.key_id())), key.to_text())?;
    }
    Ok(())
}

/// Removes what must differ between machines: made on first boot instead.
fn forget_machine(root: &Path) -> Result<()> {
    let ssh = root.join("etc/ssh");
    if ssh.is_dir() {
        for e in std::fs::read_dir(&ssh)? {
            let e = e?;
            if e.file_name().to_string_lossy().starts_with("ssh_host_") {
                std::fs::remove_file(e.path())?;
            }
        }
    }
    // Empty machine-id: systemd makes one on first boot, and the /etc overlay keeps it.
    std::fs::write(root.join("etc/machine-id"), b"")?;
    for f in ["var/lib/dbus/machine-id", "etc/hostname"] {
        let p = root.join(f);
        if p.exists() || p.is_symlink() {
            std::fs::remove_file(&p)?;
        }
    }
    let resolv = root.join("etc/resolv.conf");
    if resolv.exists() || resolv.is_symlink() {
        std::fs::remove_file(&resolv)?;
    }
    std::os::unix::fs::symlink("../run/systemd/resolve/stub-resolv.conf", &resolv)?;
    Ok(())
}

/// Debian's units that order themselves before sysinit.target, which the
/// image starts beside the rest of early boot instead. Under them,
/// everything after sysinit.target (D-Bus, ballast-provision, the agent,
/// ssh) waited for both: sandboxed services that took 6-8 s each to start
/// in a TCG boot, while Debian's own boot runs neither. Nothing in the
/// image needs names resolved or the clock set before sysinit.target:
/// network.target and nss-lookup.target still wait for resolved, and
/// time-set.target for timesyncd (the agent waits for neither: see
/// os-agent.service).
const OFF_SYSINIT: &[&str] = &["systemd-resolved.service", "systemd-timesyncd.service"];

/// Removes `sysinit.target` from the `Before=` lines of a packaged unit, in
/// place (the root is rebuilt from the package every build). Fails if the
/// unit has no such ordering, so a Debian update that changes it is noticed.
fn take_off_sysinit(unit: &Path) -> Result<()> {
    let text =
        std::fs::read_to_string(unit).with_context(|| format!("cannot read {}", unit.display()))?;
    let mut removed = false;
    let mut out = String::with_capacity(text.len());
    for line in text.lines() {
        match line.strip_prefix("Before=") {
            Some(targets) if targets.split_whitespace().any(|t| t == "sysinit.target") => {
                removed = true;
                let rest: Vec<&str> = targets
                    .split_whitespace()
                    .filter(|t| *t != "sysinit.target")
                    .collect();
                if !rest.is_empty() {
                    out.push_str("Before=");
                    out.push_str(&rest.join(" "));
                    out.push('\n');
                }
            }
            _ => {
                out.push_str(line);
                out.push('\n');
            }
        }
    }
    if !removed {
        bail!(
            "{} has no Before=sysinit.target to take off: has Debian's unit changed?",
            unit.display()
        );
    }
    std::fs::write(unit, out).with_context(|| format!("cannot write {}", unit.display()))
}

/// Enables what the units tree's presets enable, with systemctl --root.
fn enable_units(stage: &Stage, root: &Path, units_dir: &Path) -> Result<()> {
    let dir = units_dir.join("systemd/system-preset");
    let (mut enable, mut disable) = (Vec::new(), Vec::new());
    if dir.is_dir() {
        let mut files: Vec<_> = std::fs::read_dir(&dir)?.collect::<Result<_, _>>()?;
        files.sort_by_key(|e| e.file_name());
        for f in files {
            let text = std::fs::read_to_string(f.path())?;
            for line in text.lines() {
                if let Some(u) = line.trim().strip_prefix("enable ") {
                    enable.push(u.trim().to_string());
                } else if let Some(u) = line.trim().strip_prefix("disable ") {
                    disable.push(u.trim().to_string());
                }
            }
        }
    }
    for (verb, units) in [("enable", &enable), ("disable", &disable)] {
        if !units.is_empty() {
            stage.cmd(
                Command::new("systemctl")
                    .arg(format!("--root={}", root.display()))
                    .arg(verb)
                    .args(units),
            )?;
        }
    }
    Ok(())
}

fn take_kernel(root: &Path, work: &Path) -> Result<(String, PathBuf)> {
    let modules = root.join("usr/lib/modules");
    let mut kvers: Vec<String> = std::fs::read_dir(&modules)
        .with_context(|| format!("cannot list {}", modules.display()))?
        .map(|e| e.map(|e| e.file_name().to_string_lossy().into_owned()))
        .collect::<Result<_, _>>()?;
    kvers.sort();
    let Some(kver) = kvers.pop() else {
        bail!("no kernel installed in the root (is the kernel package in the spec?)");
    };
    if !kvers.is_empty() {
        bail!("more than one kernel installed in the root: {kvers:?} and {kver}");
    }
    let vmlinuz = work.join("vmlinuz");
    let src = root.join("boot").join(format!("vmlinuz-{kver}"));
    std::fs::copy(&src, &vmlinuz).with_context(|| format!("cannot copy {}", src.display()))?;
    // The kernel and initrd live in the UKI; /boot in the root would only be dead weight.
    for e in std::fs::read_dir(root.join("boot"))? {
        let p = e?.path();
        if p.is_dir() && !p.is_symlink() {
            std::fs::remove_dir_all(&p)?;
        } else {
            std::fs::remove_file(&p)?;
        }
    }
    for link in ["vmlinuz", "vmlinuz.old", "initrd.img", "initrd.img.old"] {
        let p = root.join(link);
        if p.is_symlink() {
            std::fs::remove_file(&p)?;
        }
    }
    Ok((kver, vmlinuz))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn os_release_gains_the_image_identity() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("usr/lib")).unwrap();
        std::fs::write(
            dir.path().join("usr/lib/os-release"),
            "PRETTY_NAME=\"Debian GNU/Linux 12 (bookworm)\"\nID=debian\nIMAGE_ID=old\n",
        )
        .unwrap();
        write_os_release(dir.path(), "ballast", "1.2.3", 1_700_000_000).unwrap();
        let m = os_release::parse(
            &std::fs::read_to_string(dir.path().join("usr/lib/os-release")).unwrap(),
        );
        assert_eq!(m["IMAGE_ID"], "ballast");
        assert_eq!(m["IMAGE_VERSION"], "1.2.3");
        assert_eq!(m["ID"], "debian");
        assert_eq!(
            m["PRETTY_NAME"],
            "Ballast 1.2.3 (Debian GNU/Linux 12 (bookworm))"
        );
    }

    #[test]
    fn sysinit_ordering_comes_off_and_nothing_else() {
        let dir = tempfile::tempdir().unwrap();
        let unit = dir.path().join("systemd-resolved.service");
        std::fs::write(
            &unit,
            "[Unit]\nDefaultDependencies=no\nBefore=sysinit.target network.target nss-lookup.target\n\
             Before=sysinit.target\nWants=nss-lookup.target\n\n[Install]\nWantedBy=sysinit.target\n",
        )
        .unwrap();
        take_off_sysinit(&unit).unwrap();
        assert_eq!(
            std::fs::read_to_string(&unit).unwrap(),
            "[Unit]\nDefaultDependencies=no\nBefore=network.target nss-lookup.target\n\
             Wants=nss-lookup.target\n\n[Install]\nWantedBy=sysinit.target\n"
        );
        // Done once, there is nothing left to take off: a changed unit is an error.
        let err = take_off_sysinit(&unit).unwrap_err().to_string();
        assert!(err.contains("no Before=sysinit.target"), "{err}");
        let err = take_off_sysinit(&dir.path().join("missing.service"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("cannot read"), "{err}");
    }
}
