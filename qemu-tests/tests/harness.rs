//! The harness itself, on OVMF with an empty disk: no built image needed,
//! so these run even before image-build has made one.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use qemu_tests::{Vm, VmOptions};

const SHELL_BANNER: &str = "UEFI Interactive Shell";

fn empty_disk(dir: &Path) -> std::path::PathBuf {
    let path = dir.join("empty.qcow2");
    let status = Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&path)
        .arg("64M")
        .status()
        .expect("running qemu-img");
    assert!(status.success(), "qemu-img create: {status}");
    path
}

#[test]
fn drives_firmware_through_reset_and_power_cycle() {
    let scratch = tempfile::tempdir().unwrap();
    let mut vm = Vm::boot_disk(&empty_disk(scratch.path()), VmOptions::default());
    let vm_dir = vm.dir().to_path_buf();
    assert!(vm.dir().join("disk.qcow2").is_file());
    assert_ne!(vm.ssh_port(), 0);

    vm.wait_console(SHELL_BANNER, Duration::from_secs(120));

    let mark = vm.console_mark();
    vm.reset_hard();
    vm.wait_console_since(mark, SHELL_BANNER, Duration::from_secs(120));

    vm.power_off_hard();
    assert!(!vm.is_running());
    let mark = vm.console_mark();
    vm.power_on();
    assert!(vm.is_running());
    vm.wait_console_since(mark, SHELL_BANNER, Duration::from_secs(120));
    // The console log spans both power-ons.
    assert!(vm.console_tail(10_000).matches(SHELL_BANNER).count() >= 3);

    // Nothing listens on port 22: wait_ssh gives up, and says what the
    // guest printed.
    let failed = catch_unwind(AssertUnwindSafe(|| vm.wait_ssh(Duration::from_secs(3))));
    let msg = failed
        .expect_err("wait_ssh should fail without an OS")
        .downcast::<String>()
        .expect("panic message");
    assert!(msg.contains("not reachable over SSH"), "{msg}");
    assert!(msg.contains(SHELL_BANNER), "{msg}");

    drop(vm);
    if std::env::var("BALLAST_KEEP_VMS").as_deref() != Ok("1") {
        assert!(!vm_dir.exists(), "{} left behind", vm_dir.display());
    }
}
