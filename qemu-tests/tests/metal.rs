//! The metal image (configs/image-metal.yaml, as qemu-tests/test-image-metal.yaml
//! builds it into `<test image dir>-metal`) on a machine without virtio: its
//! disk on SATA (AHCI), its NIC an Intel e1000e. The generic kernel's
//! initrd must find the root through ahci, the root must find the NIC, and
//! the host must come up as a cloud VM does: Secure Boot enforcing (and the
//! kernel locked down), verity root, the agent running, no failed unit.

use std::time::Duration;

use qemu_tests::{
    poll, read_build_info, sibling_build, MachineShape, Vm, VmOptions, DEFAULT_SSH_TIMEOUT, GIB,
};
use serde_json::Value;

/// First-boot work after SSH is up (agent start, health check, blessing).
const SETTLE_TIMEOUT: Duration = Duration::from_secs(180);

#[test]
fn metal_image_boots_on_ahci_and_e1000e() {
    let dir = sibling_build("metal");
    let info = read_build_info(&dir).unwrap_or_else(|e| panic!("{}: {e:#}", dir.display()));
    let qcow2 = dir.join(&info.images.qcow2);
    let vm = Vm::boot_disk(
        &qcow2,
        VmOptions {
            shape: MachineShape::Metal,
            disk_size: Some(info.disk.size + GIB),
            ..VmOptions::default()
        },
    );
    // SSH answering at all means the e1000e is up with a DHCP lease: the
    // guest has no other NIC.
    vm.wait_ssh(DEFAULT_SSH_TIMEOUT);

    let kernel = vm.ssh_ok("uname -r");
    if kernel.contains("cloud") || !kernel.trim().ends_with("-amd64") {
        vm.fail(format!(
            "booted kernel {kernel:?}, want Debian's generic -amd64"
        ));
    }
    let drivers = vm.ssh_ok(
        "d=$(readlink -f /sys/block/sda/device); while [ \"$d\" != / ]; do \
           test -e $d/driver && echo disk $(basename $(readlink $d/driver)); d=$(dirname $d); done; \
         for n in /sys/class/net/*; do test -e $n/device/driver && \
           echo nic $(basename $n) $(basename $(readlink $n/device/driver)); done; \
         echo virtio $(ls /sys/bus/virtio/devices 2>/dev/null | wc -l)",
    );
    for want in ["disk ahci", "virtio 0"] {
        if !drivers.lines().any(|l| l.trim() == want) {
            vm.fail(format!("want `{want}` in the guest's devices:\n{drivers}"));
        }
    }
    if !drivers
        .lines()
        .any(|l| l.starts_with("nic ") && l.trim_end().ends_with(" e1000e"))
    {
        vm.fail(format!("no NIC driven by e1000e:\n{drivers}"));
    }

    vm.require_secure_boot();
    let root = vm.ssh_ok("findmnt -no SOURCE,FSTYPE /");
    if root.split_whitespace().collect::<Vec<_>>() != ["/dev/mapper/root", "erofs"] {
        vm.fail(format!("/ is {root:?}, want the erofs on /dev/mapper/root"));
    }

    // Every unit of the boot came up: `is-system-running --wait` returns
    // once the boot has finished, `running` only if nothing failed.
    let state = vm.ssh(&format!(
        "timeout {} systemctl is-system-running --wait",
        SETTLE_TIMEOUT.as_secs()
    ));
    let state = String::from_utf8_lossy(&state.stdout).trim().to_string();
    if state != "running" {
        vm.fail(format!(
            "system is {state:?}, want running; failed units:\n{}",
            vm.ssh_ok("systemctl --failed --no-pager --no-legend; journalctl -b -p err --no-pager | tail -n 40")
        ));
    }
    let mut status = Value::Null;
    let ready = poll(SETTLE_TIMEOUT, || {
        let text = vm.ssh_ok("osctl status --json");
        status = serde_json::from_str(&text)
            .unwrap_or_else(|e| vm.fail(format!("osctl status --json is not JSON ({e}): {text}")));
        status["agent_state"] == "running"
    });
    if !ready || status["root_hash"] != info.root_hash.as_str() {
        vm.fail(format!(
            "osctl status should show a running agent on root hash {}: {status:#}",
            info.root_hash
        ));
    }
}
