//! Boot the test image: Secure Boot enrolment and enforcement, verity root,
//! data partition, /etc overlay, agent, boot assessment, and persistence
//! across a reboot.
//!
//! Each VM boot costs about a minute under TCG, so one VM (with a disk
//! larger than the image, for the data partition to grow into) goes through
//! all of it: the first boot, a reboot, failing health checks, then a UKI
//! the firmware refuses.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use qemu_tests::{TestImage, Vm, VmOptions, DEFAULT_SSH_TIMEOUT, GIB};
use serde_json::Value;

/// How long first-boot work (agent start-up, health check, blessing, growing
/// the data partition) may take after SSH is up.
const SETTLE_TIMEOUT: Duration = Duration::from_secs(120);

#[test]
fn boots_grows_survives_a_reboot_and_assesses_its_boots() {
    let image = TestImage::get();
    let built_data = image.partition("data").size;
    let vm = Vm::boot(VmOptions {
        disk_size: Some(image.info.disk.size + 2 * GIB),
        ..VmOptions::default()
    });
    vm.wait_ssh(DEFAULT_SSH_TIMEOUT);
    enrolled_its_keys_and_boots_with_secure_boot_on(&vm);
    boots_to_agent_ready_with_verity_root_and_blessed_entry(&vm, image);
    data_partition_grows_and_var_and_etc_survive_reboot(&vm, built_data);
    failed_health_check_leaves_the_entry_unblessed(&vm, image);
    an_altered_uki_is_refused_by_the_firmware(&vm, image);
}

/// The VM's firmware variables start empty (OVMF in setup mode): on the first
/// boot systemd-boot enrolled the keys the image carries on its ESP and reset
/// the machine, which has booted with Secure Boot enforcing since: the
/// firmware checked systemd-boot's and the UKI's signatures.
fn enrolled_its_keys_and_boots_with_secure_boot_on(vm: &Vm) {
    vm.wait_console(
        "Enrolling secure boot keys from directory",
        Duration::from_secs(1),
    );
    vm.require_secure_boot();
}

/// An altered UKI on the ESP: a copy of the good one whose os-release says
/// a newer version, so systemd-boot prefers it, but whose bytes no longer
/// match their signature. The firmware refuses to start it. systemd-boot
/// counted the entry's one try before, so from the next reset on the entry
/// sorts last and the good entry boots again.
fn an_altered_uki_is_refused_by_the_firmware(vm: &Vm, image: &TestImage) {
    let blessed = image.blessed_uki_entry();
    let v = &image.info.version;
    let newer: String = v
        .chars()
        .map(|c| if c.is_ascii_digit() { '9' } else { c })
        .collect();
    let bad = format!("{}-{newer}+1.efi", image.info.name);
    vm.ssh_ok(&format!(
        "set -e; cd /efi/EFI/Linux; \
         off=$(grep -obUa 'IMAGE_VERSION=\"{v}\"' {blessed} | head -n 1 | cut -d: -f1); \
         test -n \"$off\"; cp {blessed} .altered.tmp; \
         printf '%s' 'IMAGE_VERSION=\"{newer}\"' | dd of=.altered.tmp bs=1 seek=$off conv=notrunc status=none; \
         mv .altered.tmp {bad}; sync"
    ));
    let mark = vm.console_mark();
    let out = vm.ssh("systemctl reboot");
    if !out.status.success() && out.status.code() != Some(255) {
        vm.fail(format!("systemctl reboot: {}", out.status));
    }
    let line = vm.wait_console_since(mark, "Error loading", Duration::from_secs(300));
    if !line.contains(&newer)
        || !(line.contains("Security Violation") || line.contains("Access Denied"))
    {
        vm.fail(format!(
            "systemd-boot should fail to load the altered {bad} for a security violation: {line:?}"
        ));
    }
    // systemd-boot 252 hands the failure back to the firmware, which has
    // nothing else to boot: the reset button (or a watchdog) starts again.
    std::thread::sleep(Duration::from_secs(5));
    vm.reset_hard();
    vm.wait_ssh(DEFAULT_SSH_TIMEOUT);
    let text = vm.ssh_ok("osctl status --json");
    let status: Value = serde_json::from_str(&text)
        .unwrap_or_else(|e| vm.fail(format!("osctl status --json is not JSON ({e}): {text}")));
    if status["boot_entry"] != blessed.as_str() {
        vm.fail(format!(
            "after the refused entry the host booted {}, want {blessed}; efivars: {}",
            status["boot_entry"],
            vm.ssh_ok("ls /sys/firmware/efi/efivars/ | grep -i loader; true")
        ));
    }
    let spent = bad.replace("+1.efi", "+0-1.efi");
    wait_listing_has(vm, &[&blessed, &spent]);
    vm.ssh_ok(&format!("rm /efi/EFI/Linux/{spent} && sync"));
}

/// Waits until /efi/EFI/Linux holds exactly the files `want` (any order).
fn wait_listing_has(vm: &Vm, want: &[&str]) {
    let mut listing = String::new();
    poll(SETTLE_TIMEOUT, || {
        listing = vm.ssh_ok("ls /efi/EFI/Linux/");
        let mut got: Vec<&str> = listing.lines().collect();
        let mut w = want.to_vec();
        got.sort();
        w.sort();
        got == w
    })
    .unwrap_or_else(|| vm.fail(format!("/efi/EFI/Linux has {listing:?}, want {want:?}")));
}

fn boots_to_agent_ready_with_verity_root_and_blessed_entry(vm: &Vm, image: &TestImage) {
    wait_unit_active(vm, "os-agent.service");

    // The agent is up and reports the booted slot and version from the
    // image (osctl's StatusView: HostStatus flattened plus agent_state).
    let mut status = Value::Null;
    // The daemon publishes its status shortly after it reports ready.
    poll(SETTLE_TIMEOUT, || {
        let text = vm.ssh_ok("osctl status --json");
        status = serde_json::from_str(&text)
            .unwrap_or_else(|e| vm.fail(format!("osctl status --json is not JSON ({e}): {text}")));
        status.get("agent_state").and_then(Value::as_str) == Some("running")
    });
    for (keys, want) in [
        (&["agent_state"][..], "running"),
        (&["slot"][..], "a"),
        (
            &["image_version", "version"][..],
            image.info.version.as_str(),
        ),
        (&["root_hash"][..], image.info.root_hash.as_str()),
    ] {
        let got = keys
            .iter()
            .find_map(|k| status.get(k))
            .and_then(Value::as_str);
        if got != Some(want) {
            vm.fail(format!(
                "osctl status: {} is {got:?}, want {want:?}; status: {status:#}",
                keys[0]
            ));
        }
    }

    if status.get("secure_boot") != Some(&Value::Bool(true)) {
        vm.fail(format!(
            "osctl status does not report Secure Boot on: {status:#}"
        ));
    }

    // / is the erofs behind dm-verity, read-only.
    let root = vm.ssh_ok("findmnt -no SOURCE,FSTYPE,OPTIONS /");
    let fields: Vec<&str> = root.split_whitespace().collect();
    let [source, fstype, options] = fields[..] else {
        vm.fail(format!("findmnt / printed {root:?}"));
    };
    if source != "/dev/mapper/root" || fstype != "erofs" || !options.split(',').any(|o| o == "ro") {
        vm.fail(format!("/ is {root:?}, want /dev/mapper/root erofs ro"));
    }
    let dm = vm.ssh_ok(
        "dev=$(basename $(readlink -f /dev/mapper/root)) && \
         cat /sys/block/$dev/dm/name /sys/block/$dev/dm/uuid",
    );
    let mut dm = dm.lines();
    let (name, uuid) = (dm.next().unwrap_or(""), dm.next().unwrap_or(""));
    if name != "root" || !uuid.starts_with("CRYPT-VERITY-") {
        vm.fail(format!(
            "/dev/mapper/root is dm {name:?} with uuid {uuid:?}; want a verity device named root"
        ));
    }
    // veritysetup is optional in the image; when it is there, ask it too.
    let verity = vm.ssh_ok(
        "if command -v veritysetup >/dev/null; then veritysetup status root; else echo absent; fi",
    );
    if verity.trim() != "absent" && !verity.contains("verified") {
        vm.fail(format!("veritysetup status root:\n{verity}"));
    }
    let cmdline = vm.ssh_ok("cat /proc/cmdline");
    let want_hash = format!("roothash={}", image.info.root_hash);
    if !cmdline.split_whitespace().any(|arg| arg == want_hash) {
        vm.fail(format!("kernel command line lacks {want_hash}: {cmdline}"));
    }
    let touch = vm.ssh("touch /");
    let touch_err = String::from_utf8_lossy(&touch.stderr);
    if touch.status.success() || !touch_err.contains("Read-only file system") {
        vm.fail(format!(
            "`touch /` should fail with EROFS: {} {touch_err}",
            touch.status
        ));
    }

    // /var is the ext4 data partition, /etc an overlay.
    let var = vm.ssh_ok(
        "echo $(readlink -f $(findmnt -no SOURCE /var)) $(findmnt -no FSTYPE /var) \
         $(readlink -f /dev/disk/by-partlabel/data)",
    );
    let fields: Vec<&str> = var.split_whitespace().collect();
    match fields[..] {
        [source, "ext4", data] if source == data => {}
        _ => vm.fail(format!(
            "/var is {var:?}; want `<dev> ext4 <dev>` (ext4 on partlabel data)"
        )),
    }
    let etc = vm.ssh_ok("findmnt -no FSTYPE /etc");
    if etc.trim() != "overlay" {
        vm.fail(format!("/etc is {etc:?}, want overlay"));
    }
    // The root is read-only, /tmp is not: systemd's namespaced services
    // (PrivateTmp=) and systemd-nspawn need it.
    let tmp = vm.ssh_ok("findmnt -no FSTYPE /tmp");
    if tmp.trim() != "tmpfs" {
        vm.fail(format!("/tmp is {tmp:?}, want tmpfs"));
    }
    wait_unit_active(vm, "systemd-resolved.service");

    // Boot assessment: the health check passes and systemd-bless-boot
    // renames the entry to drop its counter.
    wait_unit_active(vm, "ballast-health.service");
    let blessed = image.blessed_uki_entry();
    let mut listing = String::new();
    poll(SETTLE_TIMEOUT, || {
        listing = vm.ssh_ok("ls /efi/EFI/Linux/");
        listing.lines().any(|f| f == blessed)
    })
    .unwrap_or_else(|| {
        vm.fail(format!(
            "entry not blessed within {SETTLE_TIMEOUT:?}: /efi/EFI/Linux has {listing:?}, \
             want {blessed}; systemd-bless-boot:\n{}",
            unit_report(vm, "systemd-bless-boot.service")
        ))
    });
    if listing.lines().any(|f| f != blessed && f.contains('+')) {
        vm.fail(format!(
            "counted entries left beside {blessed}: {listing:?}"
        ));
    }
    let failed = vm.ssh_ok("systemctl list-units --failed --no-legend --plain");
    if !failed.trim().is_empty() {
        vm.fail(format!("units failed on a clean boot:\n{failed}"));
    }
}

fn data_partition_grows_and_var_and_etc_survive_reboot(vm: &Vm, built_data: u64) {
    // The partition and the filesystem on it grow on first boot.
    let want = built_data + GIB * 3 / 2;
    let mut sizes = (0, 0);
    poll(SETTLE_TIMEOUT, || {
        sizes = data_sizes(vm);
        sizes.0 >= want && sizes.1 >= want
    })
    .unwrap_or_else(|| {
        vm.fail(format!(
            "data did not grow: partition {} B, /var filesystem {} B; built {built_data} B, \
             want at least {want} B",
            sizes.0, sizes.1
        ))
    });

    let token = format!(
        "{}",
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or_default()
    );
    vm.ssh_ok(&format!(
        "mkdir -p /var/lib/ballast-test && echo var-{token} > /var/lib/ballast-test/marker && \
         echo etc-{token} > /etc/ballast-test.conf && sync"
    ));
    let machine_id = vm.ssh_ok("cat /etc/machine-id");
    if machine_id.trim().len() != 32 {
        vm.fail(format!("/etc/machine-id is {machine_id:?}"));
    }

    vm.reboot();

    let after =
        vm.ssh_ok("cat /var/lib/ballast-test/marker /etc/ballast-test.conf /etc/machine-id");
    let want_after = format!("var-{token}\netc-{token}\n{}", machine_id.trim());
    if after.trim() != want_after {
        vm.fail(format!(
            "state lost across reboot: got {after:?}, want {want_after:?}"
        ));
    }
    let (part, fs) = data_sizes(vm);
    if part < want || fs < want {
        vm.fail(format!(
            "data shrank after reboot: partition {part} B, filesystem {fs} B"
        ));
    }
}

/// A boot whose health check fails is not blessed, and os-agent reboots it
/// so systemd-boot takes the next try. With no other entry to fall back to,
/// it stops at the last try instead of looping. Once the check passes
/// again, the next boot is blessed.
fn failed_health_check_leaves_the_entry_unblessed(vm: &Vm, image: &TestImage) {
    let blessed = image.blessed_uki_entry();
    let counted = image.info.uki_entry.clone();
    wait_listing(vm, &blessed, "the boot before was not blessed");

    // Give the entry its three tries back and make the health check fail.
    vm.ssh_ok(&format!(
        "mv /efi/EFI/Linux/{blessed} /efi/EFI/Linux/{counted} && \
         printf '[health]\\nfail_marker = \"/var/lib/ballast/fail-health\"\\n' \
           > /etc/ballast/agent.d/90-test-fail.toml && \
         touch /var/lib/ballast/fail-health && sync"
    ));
    vm.reboot();

    // Three tries, each failing and rebooting; the last stays up.
    let last = counted.replace("+3.efi", "+0-3.efi");
    let mut listing = String::new();
    poll(Duration::from_secs(600), || {
        let out = vm.ssh("ls /efi/EFI/Linux/ && systemctl is-failed ballast-health.service");
        listing = String::from_utf8_lossy(&out.stdout).into_owned();
        out.status.success() && listing.lines().next() == Some(last.as_str())
    })
    .unwrap_or_else(|| {
        vm.fail(format!(
            "the failing boots did not use up the tries and stop at {last}: {listing:?}"
        ))
    });
    wait_unit_failed(vm, "ballast-health.service");
    // It stays on the last try: no reboot loop.
    let boot = vm.boot_id();
    std::thread::sleep(Duration::from_secs(30));
    if vm.boot_id() != boot {
        vm.fail("the host rebooted on its last try with nowhere to fall back to");
    }
    let listing = vm.ssh_ok("ls /efi/EFI/Linux/");
    if listing.lines().any(|f| f == blessed) {
        vm.fail(format!(
            "entry blessed although the health check failed: {listing:?}"
        ));
    }
    let health = vm.ssh("os-agent health-check");
    let stderr = String::from_utf8_lossy(&health.stderr);
    if health.status.success() || !stderr.contains("fail-marker") {
        vm.fail(format!(
            "health-check should fail naming fail-marker: {stderr}"
        ));
    }

    vm.ssh_ok("rm /var/lib/ballast/fail-health /etc/ballast/agent.d/90-test-fail.toml && sync");
    vm.reboot();
    wait_unit_active(vm, "ballast-health.service");
    wait_listing(vm, &blessed, "the healthy boot was not blessed");
}

/// Waits until /efi/EFI/Linux holds exactly `want`.
fn wait_listing(vm: &Vm, want: &str, what: &str) {
    let mut listing = String::new();
    poll(SETTLE_TIMEOUT, || {
        listing = vm.ssh_ok("ls /efi/EFI/Linux/");
        listing.trim() == want
    })
    .unwrap_or_else(|| {
        vm.fail(format!(
            "{what}: /efi/EFI/Linux has {listing:?}, want {want:?}; systemd-bless-boot:\n{}",
            unit_report(vm, "systemd-bless-boot.service")
        ))
    });
}

/// (partition size, /var filesystem size) in bytes.
fn data_sizes(vm: &Vm) -> (u64, u64) {
    let out = vm.ssh_ok(
        "lsblk -bno SIZE /dev/disk/by-partlabel/data && df -B1 --output=size /var | tail -n 1",
    );
    let numbers: Vec<u64> = out
        .split_whitespace()
        .map(|n| {
            n.parse()
                .unwrap_or_else(|e| vm.fail(format!("size {n:?} in {out:?}: {e}")))
        })
        .collect();
    match numbers[..] {
        [part, fs] => (part, fs),
        _ => vm.fail(format!("expected two sizes, got {out:?}")),
    }
}

/// Waits until `unit` is active; a failure shows its status and journal.
fn wait_unit_active(vm: &Vm, unit: &str) {
    wait_unit_state(vm, unit, "active");
}

/// Waits until `unit` has failed.
fn wait_unit_failed(vm: &Vm, unit: &str) {
    wait_unit_state(vm, unit, "failed");
}

/// Waits until `unit` settles as active or failed, and requires `want`.
fn wait_unit_state(vm: &Vm, unit: &str, want: &str) {
    let mut state = String::new();
    poll(SETTLE_TIMEOUT, || {
        let out = vm.ssh(&format!("systemctl is-active {unit}"));
        state = String::from_utf8_lossy(&out.stdout).trim().to_string();
        // Neither state changes by waiting longer.
        state == "active" || state == "failed"
    });
    if state != want {
        vm.fail(format!(
            "{unit} is {state:?}, want {want}:\n{}",
            unit_report(vm, unit)
        ));
    }
}

fn unit_report(vm: &Vm, unit: &str) -> String {
    let out = vm.ssh(&format!(
        "systemctl status --no-pager -l {unit}; journalctl -b --no-pager -n 40 -u {unit}"
    ));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Calls `ready` every 2 s until it returns true (`Some`) or `timeout`
/// passes (`None`).
fn poll(timeout: Duration, ready: impl FnMut() -> bool) -> Option<()> {
    qemu_tests::poll(timeout, ready).then_some(())
}
