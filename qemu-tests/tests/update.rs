//! Updates on the real image: A→B→A through a channel served from the host,
//! a release that fails its health check and rolls back by itself, and
//! releases the host must refuse.
//!
//! Needs the update test images next to the test image (`make test-image`
//! builds them: out/test-v2, out/test-v3, out/test-bad). Each boot costs
//! about a minute under TCG, an update a few more.

use std::time::{Duration, Instant};

use qemu_tests::{
    image_build, update_build, ChannelServer, TestImage, Vm, VmOptions, DEFAULT_SSH_TIMEOUT,
    GUEST_CHANNEL_URL, TEST_KEY,
};
use serde_json::Value;

const SETTLE: Duration = Duration::from_secs(180);
/// Download, verify and reboot under TCG.
const APPLY_TIMEOUT: Duration = Duration::from_secs(900);
/// Three failing boots of a bad release and the boot of the good one.
const ROLLBACK_TIMEOUT: Duration = Duration::from_secs(900);

fn boot(ch: &ChannelServer) -> Vm {
    let vm = Vm::boot(VmOptions {
        guest_forwards: vec![ch.guest_forward()],
        ..VmOptions::default()
    });
    vm.wait_ssh(DEFAULT_SSH_TIMEOUT);
    vm
}

/// Calls `ready` every 3 s until it returns true or `timeout` passes.
fn poll(timeout: Duration, mut ready: impl FnMut() -> bool) -> bool {
    let started = Instant::now();
    loop {
        if ready() {
            return true;
        }
        if started.elapsed() >= timeout {
            return false;
        }
        std::thread::sleep(Duration::from_secs(3));
    }
}

fn json(vm: &Vm, cmd: &str) -> Value {
    let text = vm.ssh_ok(cmd);
    serde_json::from_str(&text)
        .unwrap_or_else(|e| vm.fail(format!("`{cmd}`: not JSON ({e}): {text}")))
}

fn esp(vm: &Vm) -> Vec<String> {
    vm.ssh_ok("ls /efi/EFI/Linux/")
        .lines()
        .map(str::to_string)
        .collect()
}

/// Waits until the entry of `version` is blessed (no boot counter).
fn wait_blessed(vm: &Vm, version: &str) {
    let want = format!("ballast-{version}.efi");
    let mut seen = Vec::new();
    if !poll(SETTLE, || {
        seen = esp(vm);
        seen.contains(&want)
    }) {
        vm.fail(format!(
            "{want} not blessed within {SETTLE:?}: /efi/EFI/Linux has {seen:?}\n{}",
            vm.ssh_ok("systemctl status --no-pager ballast-health systemd-bless-boot; true")
        ));
    }
}

/// Points the agent at the test channel. The daemon checks once at start
/// (jitter 0) and then not for a day, so the test decides when updates happen.
fn configure(vm: &Vm) {
    vm.ssh_ok(&format!(
        "printf '[update]\\nchannel_url = \"{GUEST_CHANNEL_URL}\"\\ninterval_secs = 86400\\njitter_secs = 0\\n' \
           > /etc/ballast/agent.d/50-test.toml && systemctl restart os-agent"
    ));
    wait_checked(vm, |_| true);
}

/// Waits until the daemon has checked the channel and `ok` likes the state.
fn wait_checked(vm: &Vm, ok: impl Fn(&Value) -> bool) -> Value {
    let mut st = Value::Null;
    if !poll(SETTLE, || {
        st = json(vm, "osctl update status --json");
        !st["last_check"].is_null() && st["staged"].is_null() && ok(&st)
    }) {
        vm.fail(format!("the daemon did not settle on a check: {st:#}"));
    }
    st
}

fn boot_id(vm: &Vm) -> Option<String> {
    let out = vm.ssh("cat /proc/sys/kernel/random/boot_id");
    let id = String::from_utf8_lossy(&out.stdout).trim().to_string();
    (out.status.success() && !id.is_empty()).then_some(id)
}

/// Runs `cmd` in the guest as a transient unit (it may outlive the SSH
/// session, or reboot the guest). Returns its output and exit code once it
/// ends, or `None` if the guest rebooted first.
fn run_detached(vm: &Vm, cmd: &str, timeout: Duration) -> Option<(String, i32)> {
    let before = boot_id(vm).unwrap_or_else(|| vm.fail("no boot id"));
    let unit = format!("ballast-test-{}", std::process::id());
    let log = format!("/var/log/{unit}.log");
    vm.ssh_ok(&format!(
        "rm -f {log}; systemd-run --quiet --unit={unit}-$RANDOM sh -c '{cmd} > {log} 2>&1; echo \"exit=$?\" >> {log}'"
    ));
    let mut result = None;
    let mut rebooted = false;
    let done = poll(timeout, || {
        match boot_id(vm) {
            None => return false,
            Some(id) if id != before => {
                rebooted = true;
                return true;
            }
            Some(_) => {}
        }
        let text = String::from_utf8_lossy(&vm.ssh(&format!("cat {log}")).stdout).into_owned();
        if let Some(code) = text.lines().find_map(|l| l.strip_prefix("exit=")) {
            result = Some((text.clone(), code.trim().parse().unwrap_or(-1)));
            return true;
        }
        false
    });
    if !done {
        vm.fail(format!(
            "`{cmd}` neither finished nor rebooted within {timeout:?}"
        ));
    }
    if rebooted {
        vm.wait_ssh(DEFAULT_SSH_TIMEOUT);
        return None;
    }
    result
}

/// `osctl update apply`, which reboots into the update.
fn apply_and_reboot(vm: &Vm) {
    if let Some((log, code)) = run_detached(vm, "osctl update apply", APPLY_TIMEOUT) {
        vm.fail(format!(
            "osctl update apply exited {code} without rebooting:\n{log}"
        ));
    }
}

fn expect_running(vm: &Vm, slot: &str, version: &str) -> Value {
    let mut s = Value::Null;
    if !poll(SETTLE, || {
        s = json(vm, "osctl status --json");
        s["slot"] == slot && s["image_version"] == version
    }) {
        vm.fail(format!(
            "want slot {slot} version {version}; osctl status: {s:#}"
        ));
    }
    s
}

#[test]
fn updates_a_to_b_and_back_to_a() {
    let ch = ChannelServer::start().expect("channel server");
    let vm = boot(&ch);
    let v1 = TestImage::get().info.version.clone();
    wait_blessed(&vm, &v1);
    configure(&vm);

    ch.publish(&update_build("v2"), TEST_KEY.as_ref())
        .unwrap_or_else(|e| vm.fail(format!("{e:#}")));
    let check = vm.ssh_ok("osctl update check");
    if !check.contains("would apply 0.2.0 to slot B") {
        vm.fail(format!("osctl update check:\n{check}"));
    }
    apply_and_reboot(&vm);
    let s = expect_running(&vm, "b", "0.2.0");
    wait_blessed(&vm, "0.2.0");
    // The daemon saw the blessing, recorded the success and checked again.
    wait_checked(&vm, |st| {
        st["state"]["name"] == "idle"
            && st["last_result"]
                .as_str()
                .is_some_and(|r| r.contains("not newer than the booted 0.2.0"))
    });
    let text = vm.ssh_ok("osctl status");
    if !text.contains("Slot: B") || !text.contains("Update: idle") {
        vm.fail(format!("osctl status:\n{text}\n{s:#}"));
    }

    ch.publish(&update_build("v3"), TEST_KEY.as_ref())
        .unwrap_or_else(|e| vm.fail(format!("{e:#}")));
    apply_and_reboot(&vm);
    expect_running(&vm, "a", "0.3.0");
    wait_blessed(&vm, "0.3.0");
    // The previous version stays as the other slot's entry: a way back.
    let entries = esp(&vm);
    if entries != ["ballast-0.2.0.efi", "ballast-0.3.0.efi"] {
        vm.fail(format!("/efi/EFI/Linux has {entries:?}"));
    }
}

#[test]
fn a_release_failing_its_health_check_rolls_back_by_itself() {
    let ch = ChannelServer::start().expect("channel server");
    let vm = boot(&ch);
    let v1 = TestImage::get().info.version.clone();
    wait_blessed(&vm, &v1);
    configure(&vm);
    ch.publish(&update_build("bad"), TEST_KEY.as_ref())
        .unwrap_or_else(|e| vm.fail(format!("{e:#}")));
    apply_and_reboot(&vm);

    // The bad release fails its health check and reboots, three times; then
    // systemd-boot falls back and the agent records the failure.
    let mut st = Value::Null;
    let mut seen_bad = false;
    let ok = poll(ROLLBACK_TIMEOUT, || {
        let out = vm.ssh(". /usr/lib/os-release && echo IMAGE_VERSION=$IMAGE_VERSION && osctl update status --json");
        if !out.status.success() {
            return false; // rebooting
        }
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        seen_bad |= text.contains("IMAGE_VERSION=0.1.1");
        let json_text = text.split_once('\n').map(|(_, j)| j).unwrap_or_default();
        st = serde_json::from_str(json_text).unwrap_or(Value::Null);
        text.contains(&format!("IMAGE_VERSION={v1}"))
            && st["failed_versions"]
                .as_array()
                .is_some_and(|v| v.iter().any(|x| x == "0.1.1"))
    });
    if !ok {
        vm.fail(format!(
            "no rollback within {ROLLBACK_TIMEOUT:?} (saw the bad release running: {seen_bad}); \
             update status: {st:#}"
        ));
    }
    expect_running(&vm, "a", &v1);
    if st["last_rollback"]["version"] != "0.1.1" {
        vm.fail(format!("last_rollback: {st:#}"));
    }
    let entries = esp(&vm);
    if entries.iter().any(|e| e.contains("0.1.1")) {
        vm.fail(format!(
            "the failed release's entry is still there: {entries:?}"
        ));
    }
    let status = vm.ssh_ok("osctl status");
    if !status.contains("Rollback: 0.1.1 -> 0.1.0") || !status.contains("Failed: 0.1.1") {
        vm.fail(format!(
            "osctl status does not show the rollback:\n{status}"
        ));
    }
    let check = vm.ssh_ok("osctl update check");
    if !check.contains("0.1.1 failed on this host before and is never retried") {
        vm.fail(format!("osctl update check:\n{check}"));
    }
    let apply = vm.ssh_ok("osctl update apply");
    if !apply.contains("nothing to do") {
        vm.fail(format!(
            "osctl update apply retried the failed release:\n{apply}"
        ));
    }
}

#[test]
fn tampered_payloads_and_untrusted_keys_are_refused() {
    let ch = ChannelServer::start().expect("channel server");
    let vm = boot(&ch);
    let v1 = TestImage::get().info.version.clone();
    wait_blessed(&vm, &v1);
    configure(&vm);

    // Signed by a key the image does not trust.
    let keys = tempfile::tempdir().expect("tempdir");
    let out = std::process::Command::new(image_build())
        .args(["keygen", "--name", "untrusted", "--out"])
        .arg(keys.path())
        .output()
        .expect("image-build keygen");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    ch.publish(&update_build("v2"), &keys.path().join("untrusted.secret"))
        .unwrap_or_else(|e| vm.fail(format!("{e:#}")));
    for cmd in ["osctl update check", "osctl update apply"] {
        let out = vm.ssh(cmd);
        let err = String::from_utf8_lossy(&out.stderr);
        if out.status.success() || !err.contains("no signature by a trusted key") {
            vm.fail(format!(
                "`{cmd}` should refuse the untrusted key: {} {err}",
                out.status
            ));
        }
    }

    // Signed by the trusted key, but a byte of the payload flipped in transit.
    ch.publish(&update_build("v2"), TEST_KEY.as_ref())
        .unwrap_or_else(|e| vm.fail(format!("{e:#}")));
    let payload = ch
        .root_payload()
        .unwrap_or_else(|e| vm.fail(format!("{e:#}")));
    let mut bytes = std::fs::read(&payload).expect("payload");
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x01;
    std::fs::write(&payload, &bytes).expect("payload");
    let Some((log, code)) = run_detached(&vm, "osctl update apply", APPLY_TIMEOUT) else {
        vm.fail("the host rebooted into a tampered payload");
    };
    if code == 0 || !log.contains("root payload") {
        vm.fail(format!(
            "osctl update apply should refuse the payload (exit {code}):\n{log}"
        ));
    }
    let st = json(&vm, "osctl update status --json");
    if st["state"]["name"] != "failed" || !st["staged"].is_null() {
        vm.fail(format!("update status after the refusal: {st:#}"));
    }
    let entries = esp(&vm);
    if entries != [format!("ballast-{v1}.efi")] {
        vm.fail(format!("/efi/EFI/Linux has {entries:?}"));
    }
    // Still on its version, also after a reboot.
    vm.reboot();
    expect_running(&vm, "a", &v1);
    wait_blessed(&vm, &v1);
}
