//! Boot time of a built image against a plain Debian boot of the same kernel,
//! side by side: the same QEMU machine, firmware (OVMF), loader
//! (systemd-boot), CPU count and memory, the two booted in turns.
//!
//! `boot [OUT_DIR] [PAIRS]` (defaults `out` and 3). The plain Debian disk is
//! made once per kernel and cached under `cache/boot-bench/`: mmdebstrap
//! minbase + systemd, udev, networkd (DHCP) and openssh-server, the image's
//! kernel package with Debian's own initramfs-tools initrd, on ext4,
//! booted by systemd-boot from a Boot Loader Specification entry.
//!
//! Every boot is a first boot on a fresh overlay. Printed per boot, from the
//! guest once it has finished booting: systemd-analyze's kernel, initrd and
//! userspace times, and the monotonic time (from the kernel's start) at
//! which the measured unit became active: `os-agent.service` for the image
//! (the agent is Type=notify, so that is its READY=1), `multi-user.target`
//! for Debian (and the image's too, for reference). The ratio is the median
//! of the image's agent-ready times over the median of Debian's multi-user
//! times. The critical chain of each kind's last boot is printed at the end.
//!
//! TCG unless BALLAST_QEMU_ACCEL=kvm (qemu-tests' switch); under TCG the
//! ratio is what carries over, not the seconds.

use anyhow::{bail, Context, Result};
use qemu_tests::{read_build_info, Vm, VmOptions, DEFAULT_SSH_TIMEOUT};
use std::path::{Path, PathBuf};
use std::process::Command;

const ESP_MIB: u64 = 128;
const ROOT_MIB: u64 = 1536;

/// One boot's figures, in seconds.
#[derive(Debug, Clone, Default)]
struct Boot {
    kernel: f64,
    initrd: f64,
    userspace: f64,
    /// The measured unit's activation, from the kernel's start.
    ready: f64,
    /// multi-user.target's activation, from the kernel's start.
    multi_user: f64,
}

/// Parses systemd-analyze's `Startup finished in 1.2s (firmware) + ... +
/// 22.6s (userspace) = 31.0s` line (units ms, s, min).
fn parse_startup(line: &str) -> Result<(f64, f64, f64)> {
    let body = line
        .split_once("Startup finished in ")
        .map(|(_, b)| b)
        .with_context(|| format!("not a systemd-analyze startup line: {line:?}"))?;
    let body = body.split('=').next().unwrap_or(body);
    let (mut kernel, mut initrd, mut userspace) = (None, 0.0, None);
    for part in body.split('+') {
        let part = part.trim();
        let (value, what) = part
            .split_once(" (")
            .with_context(|| format!("unexpected part {part:?} in {line:?}"))?;
        let secs = parse_duration(value)?;
        match what.trim_end_matches(')') {
            "kernel" => kernel = Some(secs),
            "initrd" => initrd = secs,
            "userspace" => userspace = Some(secs),
            _ => {}
        }
    }
    Ok((
        kernel.with_context(|| format!("no kernel time in {line:?}"))?,
        initrd,
        userspace.with_context(|| format!("no userspace time in {line:?}"))?,
    ))
}

/// `1min 2.345s`, `2.345s`, `845ms` → seconds.
fn parse_duration(text: &str) -> Result<f64> {
    let mut total = 0.0;
    for word in text.split_whitespace() {
        let (num, scale) = if let Some(n) = word.strip_suffix("min") {
            (n, 60.0)
        } else if let Some(n) = word.strip_suffix("ms") {
            (n, 0.001)
        } else if let Some(n) = word.strip_suffix("us") {
            (n, 0.000_001)
        } else if let Some(n) = word.strip_suffix('s') {
            (n, 1.0)
        } else {
            bail!("bad duration {text:?}");
        };
        total += num
            .parse::<f64>()
            .with_context(|| format!("bad duration {text:?}"))?
            * scale;
    }
    Ok(total)
}

/// `ActiveEnterTimestampMonotonic=12345678` → seconds; 0 means never active.
fn parse_monotonic(text: &str) -> Result<f64> {
    let v = text
        .trim()
        .strip_prefix("ActiveEnterTimestampMonotonic=")
        .with_context(|| format!("unexpected systemctl show output {text:?}"))?;
    let us: u64 = v.parse().with_context(|| format!("bad timestamp {v:?}"))?;
    if us == 0 {
        bail!("the unit never became active");
    }
    Ok(us as f64 / 1e6)
}

fn run(cmd: &mut Command) -> Result<()> {
    let status = cmd
        .status()
        .with_context(|| format!("cannot run {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} exited with {status}");
    }
    Ok(())
}

/// The plain Debian disk for `kver`, made if not cached.
fn debian_disk(cache: &Path, kver: &str, suite: &str, mirror: &str) -> Result<PathBuf> {
    let qcow2 = cache.join(format!("debian-{suite}-{kver}.qcow2"));
    if qcow2.is_file() {
        println!("plain Debian disk: {} (cached)", qcow2.display());
        return Ok(qcow2);
    }
    std::fs::create_dir_all(cache)?;
    let work = tempfile::Builder::new()
        .prefix("boot-bench-")
        .tempdir_in(cache)?;
    let root = work.path().join("root");
    let key = qemu_tests::fixture_public_key();
    let network = "[Match]\\nName=en* eth*\\n\\n[Network]\\nDHCP=yes\\n";
    println!("plain Debian disk: bootstrapping {suite} with linux-image-{kver} ...");
    run(Command::new("mmdebstrap")
        .args(["--variant=minbase", "--mode=root", "--format=directory", "--quiet"])
        .arg(format!(
            "--include=systemd,systemd-sysv,udev,dbus,openssh-server,initramfs-tools,systemd-boot-efi,linux-image-{kver}"
        ))
        .arg(format!(
            "--customize-hook=mkdir -p \"$1/root/.ssh\" && echo '{key}' > \"$1/root/.ssh/authorized_keys\" && chmod 700 \"$1/root/.ssh\""
        ))
        .arg(format!(
            "--customize-hook=printf '{network}' > \"$1/etc/systemd/network/80-dhcp.network\" && chroot \"$1\" systemctl enable systemd-networkd"
        ))
        .arg("--customize-hook=echo debian > \"$1/etc/hostname\" && echo 'LABEL=root / ext4 defaults 0 1' > \"$1/etc/fstab\"")
        // A first boot, as the image's: no machine id yet. (Debian's sshd
        // keeps the host keys its package made: it makes none at boot.)
        .arg("--customize-hook=: > \"$1/etc/machine-id\"")
        .arg(suite)
        .arg(&root)
        .arg(mirror))?;
    // The ESP: systemd-boot, a Boot Loader Specification entry, the kernel
    // and Debian's initrd.
    let esp = work.path().join("esp.img");
    run(Command::new("mkfs.vfat")
        .args(["-F", "32", "-n", "ESP", "-C"])
        .arg(&esp)
        .arg((ESP_MIB * 1024).to_string()))?;
    let img = |p: &str| format!("::{p}");
    for dir in ["/EFI", "/EFI/BOOT", "/loader", "/loader/entries"] {
        run(Command::new("mmd").arg("-i").arg(&esp).arg(img(dir)))?;
    }
    let files = work.path().join("esp-files");
    std::fs::create_dir_all(&files)?;
    std::fs::write(
        files.join("loader.conf"),
        "timeout 0\ndefault debian\neditor no\n",
    )?;
    std::fs::write(
        files.join("debian.conf"),
        "title Debian\nlinux /vmlinuz\ninitrd /initrd.img\noptions root=LABEL=root ro console=ttyS0\n",
    )?;
    for (src, dst) in [
        (
            root.join("usr/lib/systemd/boot/efi/systemd-bootx64.efi"),
            "/EFI/BOOT/BOOTX64.EFI",
        ),
        (files.join("loader.conf"), "/loader/loader.conf"),
        (files.join("debian.conf"), "/loader/entries/debian.conf"),
        (root.join(format!("boot/vmlinuz-{kver}")), "/vmlinuz"),
        (root.join(format!("boot/initrd.img-{kver}")), "/initrd.img"),
    ] {
        run(Command::new("mcopy")
            .arg("-i")
            .arg(&esp)
            .arg(&src)
            .arg(img(dst)))?;
    }
    let ext4 = work.path().join("root.img");
    run(Command::new("mkfs.ext4")
        .args(["-q", "-L", "root", "-d"])
        .arg(&root)
        .arg(&ext4)
        .arg(format!("{ROOT_MIB}M")))?;
    // GPT: the ESP at 1 MiB, the root after it.
    let raw = work.path().join("disk.raw");
    let total_mib = 1 + ESP_MIB + ROOT_MIB + 1;
    std::fs::File::create(&raw)?.set_len(total_mib << 20)?;
    let mut sfdisk = Command::new("sfdisk")
        .arg("--quiet")
        .arg(&raw)
        .stdin(std::process::Stdio::piped())
        .spawn()?;
    use std::io::Write;
    sfdisk.stdin.take().context("sfdisk stdin")?.write_all(
        format!(
            "label: gpt\nstart=2048, size={}, type=C12A7328-F81F-11D2-BA4B-00A0C93EC93B\nsize={}, type=4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709\n",
            ESP_MIB * 2048,
            ROOT_MIB * 2048
        )
        .as_bytes(),
    )?;
    if !sfdisk.wait()?.success() {
        bail!("sfdisk failed on {}", raw.display());
    }
    for (part, offset_mib) in [(&esp, 1), (&ext4, 1 + ESP_MIB)] {
        run(Command::new("dd")
            .arg(format!("if={}", part.display()))
            .arg(format!("of={}", raw.display()))
            .args(["bs=1M", "conv=notrunc,sparse", "status=none"])
            .arg(format!("seek={offset_mib}")))?;
    }
    let tmp = qcow2.with_extension("tmp");
    run(Command::new("qemu-img")
        .args(["convert", "-q", "-O", "qcow2"])
        .arg(&raw)
        .arg(&tmp))?;
    std::fs::rename(&tmp, &qcow2)?;
    println!("plain Debian disk: {}", qcow2.display());
    Ok(qcow2)
}

/// Boots `disk` once (a first boot) and reads its figures; `unit` is the
/// measured one. Returns them and the critical chain to `unit`.
fn boot_once(disk: &Path, unit: &str) -> Result<(Boot, String)> {
    let vm = Vm::boot_disk(
        disk,
        VmOptions {
            memory_mib: Some(2048),
            ..VmOptions::default()
        },
    );
    vm.wait_ssh(DEFAULT_SSH_TIMEOUT);
    // Wait for the boot to finish (the state is then running or degraded),
    // or systemd-analyze refuses.
    vm.ssh("timeout 300 systemctl is-system-running --wait");
    let analyze = vm.ssh_ok("systemd-analyze time");
    let line = analyze
        .lines()
        .find(|l| l.contains("Startup finished"))
        .with_context(|| format!("systemd-analyze printed {analyze:?}"))?;
    let (kernel, initrd, userspace) = parse_startup(line)?;
    let ready = parse_monotonic(&vm.ssh_ok(&format!(
        "systemctl show -p ActiveEnterTimestampMonotonic {unit}"
    )))?;
    let multi_user = parse_monotonic(
        &vm.ssh_ok("systemctl show -p ActiveEnterTimestampMonotonic multi-user.target"),
    )?;
    let chain = vm.ssh_ok(&format!("systemd-analyze critical-chain --no-pager {unit}"));
    Ok((
        Boot {
            kernel,
            initrd,
            userspace,
            ready,
            multi_user,
        },
        chain,
    ))
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    if v.is_empty() {
        return f64::NAN;
    }
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

fn print_boot(kind: &str, round: usize, b: &Boot, unit: &str) {
    println!(
        "  {kind:<8} #{round}: kernel {:5.1} s + initrd {:5.1} s + userspace {:5.1} s; {unit} at {:5.1} s, multi-user.target at {:5.1} s",
        b.kernel, b.initrd, b.userspace, b.ready, b.multi_user
    );
}

fn bench(out: &Path, pairs: usize) -> Result<()> {
    let info = read_build_info(out)?;
    let image = out
        .join(&info.images.qcow2)
        .canonicalize()
        .with_context(|| format!("{} has no {}", out.display(), info.images.qcow2))?;
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .context("bench has no parent directory")?
        .to_path_buf();
    let debian = debian_disk(
        &repo.join("cache/boot-bench"),
        &info.kernel_version,
        "bookworm",
        "http://deb.debian.org/debian",
    )?
    .canonicalize()?;
    println!(
        "boot: {} {} against plain Debian bookworm, kernel {}, {pairs} pairs, taking turns; every boot a first boot",
        info.name, info.version, info.kernel_version
    );
    let (mut ours, mut theirs) = (Vec::new(), Vec::new());
    let (mut our_chain, mut their_chain) = (String::new(), String::new());
    for round in 0..pairs {
        let order: [bool; 2] = if round % 2 == 0 {
            [true, false]
        } else {
            [false, true]
        };
        for is_ours in order {
            if is_ours {
                let (b, chain) = boot_once(&image, "os-agent.service")?;
                print_boot(&info.name, round + 1, &b, "os-agent ready");
                ours.push(b);
                our_chain = chain;
            } else {
                let (b, chain) = boot_once(&debian, "multi-user.target")?;
                print_boot("debian", round + 1, &b, "multi-user");
                theirs.push(b);
                their_chain = chain;
            }
        }
    }
    let m = |v: &[Boot], f: fn(&Boot) -> f64| median(v.iter().map(f).collect());
    for (kind, v) in [(info.name.as_str(), &ours), ("debian", &theirs)] {
        println!(
            "  median {kind:<8}: kernel {:.1} s, initrd {:.1} s, userspace {:.1} s, ready {:.1} s, multi-user {:.1} s",
            m(v, |b| b.kernel),
            m(v, |b| b.initrd),
            m(v, |b| b.userspace),
            m(v, |b| b.ready),
            m(v, |b| b.multi_user)
        );
    }
    let ratio = m(&ours, |b| b.ready) / m(&theirs, |b| b.ready);
    println!(
        "  ratio (os-agent ready / Debian multi-user, medians): {ratio:.2} (target 1.3: {})",
        if ratio <= 1.3 { "met" } else { "MISSED" }
    );
    println!("critical chain, last {} boot:\n{our_chain}", info.name);
    println!("critical chain, last Debian boot:\n{their_chain}");
    Ok(())
}

fn main() -> std::process::ExitCode {
    let mut args = std::env::args().skip(1);
    let out = PathBuf::from(args.next().unwrap_or_else(|| "out".into()));
    let pairs = match args.next().map(|a| a.parse::<usize>()) {
        None => 3,
        Some(Ok(n)) if n > 0 => n,
        Some(_) => {
            eprintln!("usage: boot [OUT_DIR] [PAIRS]");
            return std::process::ExitCode::from(2);
        }
    };
    match bench(&out, pairs) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("boot: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_systemd_analyze_lines() {
        let (k, i, u) = parse_startup(
            "Startup finished in 1.108s (firmware) + 503ms (loader) + 2.401s (kernel) + 6.012s (initrd) + 1min 2.601s (userspace) = 1min 12.625s",
        )
        .unwrap();
        assert!((k - 2.401).abs() < 1e-9 && (i - 6.012).abs() < 1e-9 && (u - 62.601).abs() < 1e-9);
        let (_, i, _) =
            parse_startup("Startup finished in 2.1s (kernel) + 4.9s (userspace) = 7.0s").unwrap();
        assert_eq!(i, 0.0);
        for bad in [
            "Bootup is not yet finished",
            "Startup finished in 2.1s (kernel) = 2.1s",
            "Startup finished in 2.1x (kernel) + 1s (userspace) = 3.1s",
        ] {
            assert!(parse_startup(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn reads_monotonic_timestamps() {
        assert_eq!(
            parse_monotonic("ActiveEnterTimestampMonotonic=12500000\n").unwrap(),
            12.5
        );
        assert!(parse_monotonic("ActiveEnterTimestampMonotonic=0").is_err());
        assert!(parse_monotonic("SomethingElse=1").is_err());
    }
}
