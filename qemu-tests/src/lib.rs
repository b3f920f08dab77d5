//! Harness for the QEMU tests: boots the image that `make test` built (see
//! `qemu-tests/test-image.yaml`) under QEMU + OVMF and drives it over SSH.
//!
//! ```no_run
//! use qemu_tests::{TestImage, Vm, VmOptions, DEFAULT_SSH_TIMEOUT};
//! let image = TestImage::get();
//! let vm = Vm::boot(VmOptions::default());
//! vm.wait_ssh(DEFAULT_SSH_TIMEOUT);
//! assert_eq!(vm.ssh_ok("uname -m").trim(), image.info.architecture);
//! ```
//!
//! Every failure panics with what went wrong and the tail of the guest's
//! serial console, because a VM test that only says "timed out" is useless.
//!
//! Environment:
//! - `BALLAST_TEST_IMAGE_DIR`: directory holding `build.json` (default
//!   `<workspace>/out/test`).
//! - `BALLAST_QEMU_ACCEL=kvm`: use KVM instead of TCG.
//! - `BALLAST_KEEP_VMS=1`: keep each VM's directory (overlay, console log).
//! - `BALLAST_OVMF_CODE`, `BALLAST_OVMF_VARS`: other firmware files.

mod channel;
mod console;
pub mod containers;
mod image;
mod monitor;
mod net;
mod process;
mod seed;
mod ssh;
mod vm;

pub use channel::{image_build, sibling_build, ChannelServer, GUEST_CHANNEL_URL, TEST_KEY};
pub use console::tail_lines;
pub use image::{read_build_info, TestImage};
pub use net::pick_free_port;
pub use seed::{
    fixture_public_key, harness_user_data, root_fixture_key, user_with_fixture_key, FwCfg, Seed,
    UserData,
};
pub use vm::{MachineShape, Vm, VmOptions, DEFAULT_SSH_TIMEOUT};

/// Calls `ready` every 3 s until it returns true (then `true`) or `timeout`
/// passes (then `false`): how the tests wait on a guest.
pub fn poll(timeout: std::time::Duration, mut ready: impl FnMut() -> bool) -> bool {
    let started = std::time::Instant::now();
    loop {
        if ready() {
            return true;
        }
        if started.elapsed() >= timeout {
            return false;
        }
        std::thread::sleep(std::time::Duration::from_secs(3));
    }
}

/// One GiB, for disk sizes in tests.
pub const GIB: u64 = 1 << 30;
