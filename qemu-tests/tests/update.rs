//! Updates on the real image, through a channel served from the host: a
//! release that fails its health check and rolls back by itself; and, on one
//! VM, releases the host must refuse, then A→B→A→B with power cuts across
//! the updates.
//!
//! Needs the update test images next to the test image (`make test-image`
//! builds them: out/test-v2, out/test-v3, out/test-bad). Each boot costs
//! about a minute under TCG, an update a few more.

use std::time::Duration;

use qemu_tests::{
    image_build, poll, read_build_info, sibling_build, ChannelServer, TestImage, Vm, VmOptions,
    DEFAULT_SSH_TIMEOUT, GUEST_CHANNEL_URL, TEST_KEY,
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
/// ends, or `None` if the boot it ran in is gone (the guest went down).
fn run_detached(vm: &Vm, cmd: &str, timeout: Duration) -> Option<(String, i32)> {
    let before = boot_id(vm).unwrap_or_else(|| vm.fail("no boot id"));
    let log = start_detached(vm, cmd);
    let mut result = None;
    let mut gone = false;
    let done = poll(timeout, || {
        if boot_id(vm).as_deref() != Some(before.as_str()) {
            gone = true;
            return true;
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
    if gone {
        return None;
    }
    result
}

/// Starts `cmd` in the guest as a transient unit and returns the file its
/// output goes to, ending with `exit=<code>`.
fn start_detached(vm: &Vm, cmd: &str) -> String {
    let unit = format!("ballast-test-{}", std::process::id());
    let log = format!("/var/log/{unit}.log");
    vm.ssh_ok(&format!(
        "rm -f {log}; systemd-run --quiet --unit={unit}-$RANDOM sh -c '{cmd} > {log} 2>&1; echo \"exit=$?\" >> {log}'"
    ));
    log
}

/// `osctl update apply`, which reboots into the update. Returns once the
/// boot it ran in is gone; the new one may still be starting (or, for a
/// bad release, never become reachable).
fn apply_and_reboot(vm: &Vm) {
    let before = boot_id(vm).unwrap_or_else(|| vm.fail("no boot id"));
    let Some((log, code)) = run_detached(vm, "osctl update apply", APPLY_TIMEOUT) else {
        return;
    };
    // osctl may finish (having asked for the reboot) while SSH still answers.
    if code != 0 || !log.lines().any(|l| l == "rebooting") {
        vm.fail(format!(
            "osctl update apply exited {code} without rebooting:\n{log}"
        ));
    }
    if !poll(DEFAULT_SSH_TIMEOUT, || {
        boot_id(vm).as_deref() != Some(before.as_str())
    }) {
        vm.fail(format!(
            "osctl update apply said it reboots, but the guest did not:\n{log}"
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
fn a_release_failing_its_health_check_rolls_back_by_itself() {
    let ch = ChannelServer::start().expect("channel server");
    let vm = boot(&ch);
    let v1 = TestImage::get().info.version.clone();
    wait_blessed(&vm, &v1);
    configure(&vm);
    ch.publish(&sibling_build("bad"), TEST_KEY.as_ref())
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

/// As [`configure`], but in /run, so the setting is gone after the next boot
/// and the daemon of that boot does not go on with the update by itself:
/// the test wants to look at the boot a power cut left.
fn configure_this_boot(vm: &Vm) {
    vm.ssh_ok(&format!(
        "mkdir -p /run/ballast/agent.d && printf '[update]\\nchannel_url = \"{GUEST_CHANNEL_URL}\"\\n' \
           > /run/ballast/agent.d/50-test.toml"
    ));
}

/// The booted root is the dm-verity device over the root hash of the build
/// of `version`, and /var kept what was written before the cut.
fn expect_verified_boot_and_var_intact(vm: &Vm, version: &str) {
    let build = match version {
        "0.2.0" => sibling_build("v2"),
        "0.3.0" => sibling_build("v3"),
        "0.4.0" => sibling_build("v4"),
        "0.5.0" => sibling_build("v5"),
        "0.6.0" => sibling_build("v6"),
        _ => TestImage::get().dir.clone(),
    };
    // The update builds have no disk image (the Makefile removes it).
    let info = read_build_info(&build).unwrap_or_else(|e| vm.fail(format!("{e:#}")));
    if info.version != version {
        vm.fail(format!(
            "{} holds {}, not {version}",
            build.display(),
            info.version
        ));
    }
    let out = vm.ssh_ok(
        "findmnt -no SOURCE /; dev=$(basename $(readlink -f /dev/mapper/root)); \
         cut -c1-13 /sys/block/$dev/dm/uuid; \
         tr ' ' '\\n' < /proc/cmdline | sed -n 's/^roothash=//p'; \
         cat /var/lib/ballast-test/marker",
    );
    let lines: Vec<&str> = out.lines().map(str::trim).collect();
    let want = [
        "/dev/mapper/root",
        "CRYPT-VERITY-",
        info.root_hash.as_str(),
        "written before the power cut",
    ];
    if lines != want {
        vm.fail(format!(
            "want the verity root of {version} and the /var marker: {want:?}; got {lines:?}"
        ));
    }
}

/// Releases the host must refuse: signed by a key it does not trust, and
/// signed by the trusted key with a byte of the payload flipped in transit.
/// Nothing is staged and the ESP keeps only the booted entry.
fn refuses_untrusted_and_tampered_releases(vm: &Vm, ch: &ChannelServer, v1: &str) {
    configure_this_boot(vm);
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
    ch.publish(&sibling_build("v2"), &keys.path().join("untrusted.secret"))
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

    ch.publish(&sibling_build("v2"), TEST_KEY.as_ref())
        .unwrap_or_else(|e| vm.fail(format!("{e:#}")));
    let payload = ch
        .root_payload()
        .unwrap_or_else(|e| vm.fail(format!("{e:#}")));
    let mut bytes = std::fs::read(&payload).expect("payload");
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x01;
    std::fs::write(&payload, &bytes).expect("payload");
    expect_apply_refused(vm, v1, "a tampered payload", "root payload");
    // The payload as published again, for what follows.
    bytes[mid] ^= 0x01;
    std::fs::write(&payload, &bytes).expect("payload");

    // Signed by the trusted channel key, but its UKI carries no Secure Boot
    // signature (a publisher who forgot to sign): this host's firmware would
    // refuse it, so the host refuses to make slot B bootable with it.
    let unsigned = unsigned_build(&sibling_build("v2"));
    ch.publish(unsigned.path(), TEST_KEY.as_ref())
        .unwrap_or_else(|e| vm.fail(format!("{e:#}")));
    expect_apply_refused(
        vm,
        v1,
        "a release with an unsigned UKI",
        "is not signed, and this host boots with Secure Boot on",
    );
    // The signed release again, for what follows.
    ch.publish(&sibling_build("v2"), TEST_KEY.as_ref())
        .unwrap_or_else(|e| vm.fail(format!("{e:#}")));
}

/// `osctl update apply` refuses `what` with an error containing `why`: the
/// update fails, nothing is staged, and the ESP keeps only the booted entry.
fn expect_apply_refused(vm: &Vm, v1: &str, what: &str, why: &str) {
    let Some((log, code)) = run_detached(vm, "osctl update apply", APPLY_TIMEOUT) else {
        vm.fail(format!("the host rebooted into {what}"));
    };
    if code == 0 || !log.contains(why) {
        vm.fail(format!(
            "osctl update apply should refuse {what} with {why:?} (exit {code}):\n{log}"
        ));
    }
    let st = settled_status(vm);
    if st["state"]["name"] != "failed" || !st["staged"].is_null() {
        vm.fail(format!("update status after refusing {what}: {st:#}"));
    }
    let entries = esp(vm);
    if entries != [format!("ballast-{v1}.efi")] {
        vm.fail(format!("/efi/EFI/Linux has {entries:?}"));
    }
}

/// `osctl update status --json` once no update is under way. The daemon
/// looks for a channel every minute while it has none, so after a step
/// configured one it may be checking the same release on its own (seen:
/// "downloading" right after osctl's refusal); it refuses it too.
fn settled_status(vm: &Vm) -> Value {
    let mut st = Value::Null;
    let settled = poll(APPLY_TIMEOUT, || {
        st = json(vm, "osctl update status --json");
        !matches!(
            st["state"]["name"].as_str(),
            Some("checking" | "downloading" | "verifying")
        )
    });
    if !settled {
        vm.fail(format!(
            "an update was still under way after {APPLY_TIMEOUT:?}: {st:#}"
        ));
    }
    st
}

/// A copy of the build in `dir` whose UKI has had its Secure Boot signature
/// removed (sbattach), with build.json saying so; the payloads a release
/// publishes are hard links (the Makefile removes the uncompressed root).
fn unsigned_build(dir: &std::path::Path) -> tempfile::TempDir {
    let copy = tempfile::tempdir_in(dir.parent().expect("build dir parent")).expect("tempdir");
    let mut info: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("build.json")).expect("build.json"))
            .expect("build.json");
    for key in ["root_zst", "verity"] {
        let f = info["payloads"][key]["file"]
            .as_str()
            .expect("payload file");
        std::fs::hard_link(dir.join(f), copy.path().join(f)).expect("hard link");
    }
    let uki = info["payloads"]["uki"]["file"]
        .as_str()
        .expect("uki file")
        .to_string();
    let dst = copy.path().join(&uki);
    std::fs::copy(dir.join(&uki), &dst).expect("copy the UKI");
    let out = std::process::Command::new("sbattach")
        .arg("--remove")
        .arg(&dst)
        .output()
        .expect("sbattach (sbsigntool)");
    assert!(
        out.status.success(),
        "sbattach --remove: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let bytes = std::fs::read(&dst).expect("the UKI");
    let sigs = ballast_common::pe::signatures(&bytes).expect("a PE file");
    assert!(sigs.is_empty(), "sbattach left {} signatures", sigs.len());
    info["payloads"]["uki"]["sha256"] =
        hex::encode(<sha2::Sha256 as sha2::Digest>::digest(&bytes)).into();
    info["payloads"]["uki"]["size"] = bytes.len().into();
    std::fs::write(copy.path().join("build.json"), info.to_string()).expect("build.json");
    copy
}

/// Updates on one VM, A → B → A → B, through refusals and power cuts: the
/// host refuses untrusted and tampered releases, then takes three releases
/// with the power cut at seven points across them (docs/update.md, "What is
/// durable when"), and says what it did in `osctl update check` and
/// `osctl status` on the way.
#[test]
fn power_cuts_during_an_update_leave_a_verified_boot() {
    let ch = ChannelServer::start().expect("channel server");
    let mut vm = boot(&ch);
    let v1 = TestImage::get().info.version.clone();
    wait_blessed(&vm, &v1);
    vm.ssh_ok(
        "mkdir -p /var/lib/ballast-test && echo 'written before the power cut' \
           > /var/lib/ballast-test/marker && sync",
    );
    refuses_untrusted_and_tampered_releases(&vm, &ch, &v1);

    // 1. The power goes while the root payload streams into slot B.
    configure_this_boot(&vm);
    let log = start_detached(&vm, "osctl update apply");
    let mut st = Value::Null;
    if !poll(APPLY_TIMEOUT, || {
        st = json(&vm, "osctl update status --json");
        let bytes = st["state"]["bytes"].as_u64().unwrap_or(0);
        st["state"]["name"] == "downloading" && bytes > 0
    }) {
        vm.fail(format!(
            "never saw the download under way: {st:#}\n{}",
            vm.ssh_ok(&format!("cat {log}; true"))
        ));
    }
    power_cut(&mut vm);
    expect_running(&vm, "a", &v1);
    expect_verified_boot_and_var_intact(&vm, &v1);
    let entries = esp(&vm);
    if entries.iter().any(|e| e.contains("0.2.0")) {
        vm.fail(format!(
            "the half-written slot has a boot entry: {entries:?}"
        ));
    }

    // 2. The next attempt starts over; the power goes after slot B and its
    // verity tree are written and the partition table names them, while the
    // agent waits for the UKI (the test's channel holds it back).
    configure_this_boot(&vm);
    let uki = ch
        .uki_payload()
        .unwrap_or_else(|e| vm.fail(format!("{e:#}")));
    let hold = ch.hold(&uki).unwrap_or_else(|e| vm.fail(format!("{e:#}")));
    let log = start_detached(&vm, "osctl update apply");
    if !poll(APPLY_TIMEOUT, || {
        st = json(&vm, "osctl update status --json");
        st["state"]["name"] == "verifying"
    }) {
        vm.fail(format!(
            "never saw the slot verified: {st:#}\n{}",
            vm.ssh_ok(&format!("cat {log}; true"))
        ));
    }
    // The hash area and the GPT take well under this after `verifying`.
    std::thread::sleep(Duration::from_secs(5));
    vm.power_off_hard();
    drop(hold);
    vm.power_on();
    vm.wait_ssh(DEFAULT_SSH_TIMEOUT);
    expect_running(&vm, "a", &v1);
    expect_verified_boot_and_var_intact(&vm, &v1);
    expect_nothing_failed(&vm);
    let entries = esp(&vm);
    if entries.iter().any(|e| e.contains("0.2.0")) {
        vm.fail(format!(
            "a slot without its UKI has a boot entry: {entries:?}"
        ));
    }

    // 3. Again; the power goes right after the agent says `staged`. Staged
    // means bootable: the next boot tries 0.2.0.
    configure_this_boot(&vm);
    let check = vm.ssh_ok("osctl update check");
    if !check.contains("would apply 0.2.0 to slot B") {
        vm.fail(format!("osctl update check:\n{check}"));
    }
    cut_after_staged(&mut vm, Duration::ZERO);
    expect_running(&vm, "b", "0.2.0");
    wait_blessed(&vm, "0.2.0");
    expect_verified_boot_and_var_intact(&vm, "0.2.0");
    expect_nothing_failed(&vm);
    // The agent saw the blessing and recorded the update as done.
    let mut text = String::new();
    if !poll(SETTLE, || {
        text = vm.ssh_ok("osctl status");
        text.contains("Slot: B") && text.contains("Update: idle")
    }) {
        vm.fail(format!("osctl status after the update:\n{text}"));
    }
    let st = json(&vm, "osctl update status --json");
    if st["last_result"] != "updated to 0.2.0" {
        vm.fail(format!("update status after the update: {st:#}"));
    }

    // 4. From slot B back to A, the power goes 5 s after `staged`: the
    // delay in which vfat lost the entry's size before it was synced under
    // its final name.
    ch.publish(&sibling_build("v3"), TEST_KEY.as_ref())
        .unwrap_or_else(|e| vm.fail(format!("{e:#}")));
    cut_after_staged(&mut vm, Duration::from_secs(5));
    expect_running(&vm, "a", "0.3.0");
    wait_blessed(&vm, "0.3.0");
    expect_verified_boot_and_var_intact(&vm, "0.3.0");
    expect_nothing_failed(&vm);
    // The previous version stays as the other slot's entry: a way back.
    let entries = esp(&vm);
    if entries != ["ballast-0.2.0.efi", "ballast-0.3.0.efi"] {
        vm.fail(format!("/efi/EFI/Linux has {entries:?}"));
    }

    // 5. The power goes while the host reboots into 0.4.0 (`osctl update
    // apply` reboots; SSH going away is the reboot under way) ...
    ch.publish(&sibling_build("v4"), TEST_KEY.as_ref())
        .unwrap_or_else(|e| vm.fail(format!("{e:#}")));
    configure_this_boot(&vm);
    let log = start_detached(&vm, "osctl update apply");
    if !poll(APPLY_TIMEOUT, || !vm.ssh("true").status.success()) {
        vm.fail(format!(
            "osctl update apply did not reboot:\n{}",
            vm.ssh_ok(&format!("cat {log}; true"))
        ));
    }
    vm.power_off_hard();
    vm.power_on();
    // 6. ... and again as soon as its first boot answers, before boot
    // assessment blessed it. Its next try is blessed.
    vm.wait_ssh(DEFAULT_SSH_TIMEOUT);
    power_cut(&mut vm);
    expect_running(&vm, "b", "0.4.0");
    wait_blessed(&vm, "0.4.0");
    expect_verified_boot_and_var_intact(&vm, "0.4.0");
    expect_nothing_failed(&vm);

    // 7. `osctl rollback` renames the booted entry to `+0-1`; the power goes
    // right after it returns. The next boot starts 0.3.0.
    vm.ssh_ok("osctl rollback");
    power_cut(&mut vm);
    expect_running(&vm, "a", "0.3.0");
    expect_verified_boot_and_var_intact(&vm, "0.3.0");
    wait_blessed(&vm, "0.3.0");

    // 8. and 9. The power goes 1 s, then 30 s after `staged` (the daemon may
    // reboot into the update by itself before the 30 s are up: the cut then
    // comes during that reboot). Only the operator's rollback of 0.4.0 is
    // recorded as a failure.
    for (build, version, slot, after) in [("v5", "0.5.0", "b", 1), ("v6", "0.6.0", "a", 30)] {
        ch.publish(&sibling_build(build), TEST_KEY.as_ref())
            .unwrap_or_else(|e| vm.fail(format!("{e:#}")));
        cut_after_staged(&mut vm, Duration::from_secs(after));
        expect_running(&vm, slot, version);
        wait_blessed(&vm, version);
        expect_verified_boot_and_var_intact(&vm, version);
        let st = json(&vm, "osctl update status --json");
        if st["failed_versions"] != serde_json::json!(["0.4.0"]) {
            vm.fail(format!(
                "want only the rolled-back 0.4.0 failed after a cut {after} s after staged: {st:#}"
            ));
        }
    }
}

/// `osctl update apply --no-reboot` in this boot; the power goes `after` it
/// printed `staged`; the guest is powered on again and reachable.
///
/// The daemon polls every minute while it has no channel, so it may find the
/// release in the moment between the channel being configured and osctl
/// taking the update lock: it then stages it itself and reboots into it
/// (strategy immediate), and osctl says a reboot was requested already. The
/// power then goes during or after that reboot: still after `staged`, which
/// is what this step is about.
fn cut_after_staged(vm: &mut Vm, after: Duration) {
    configure_this_boot(vm);
    let log = start_detached(vm, "osctl update apply --no-reboot");
    let mut text = String::new();
    let daemon_first = "a reboot into the staged update was requested already";
    if !poll(APPLY_TIMEOUT, || {
        let out = vm.ssh(&format!("cat {log}"));
        if out.status.success() {
            text = String::from_utf8_lossy(&out.stdout).into_owned();
        }
        text.lines().any(|l| l.starts_with("staged ")) || text.contains("exit=")
    }) || !(text.lines().any(|l| l.starts_with("staged ")) || text.contains(daemon_first))
    {
        vm.fail(format!(
            "osctl update apply --no-reboot did not stage:\n{text}"
        ));
    }
    if text.contains(daemon_first) {
        eprintln!("the daemon staged the release before osctl did and is rebooting into it");
    }
    std::thread::sleep(after);
    power_cut(vm);
}

/// The power goes (QEMU killed, firmware variables kept) and comes back;
/// returns once the guest answers SSH again.
fn power_cut(vm: &mut Vm) {
    vm.power_off_hard();
    vm.power_on();
    vm.wait_ssh(DEFAULT_SSH_TIMEOUT);
}

/// No version is recorded as failed: none was booted and found bad.
fn expect_nothing_failed(vm: &Vm) {
    let st = json(vm, "osctl update status --json");
    if st["failed_versions"]
        .as_array()
        .is_some_and(|v| !v.is_empty())
    {
        vm.fail(format!(
            "a power cut was recorded as a failed release: {st:#}"
        ));
    }
}
