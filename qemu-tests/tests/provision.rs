//! Provisioning on the real image: user data from a NoCloud seed made by
//! `cloud-localds` and from QEMU fw_cfg, applied once per instance id, and a
//! bad document that leaves the host booted with a readable error.
//!
//! Each VM boot costs about a minute under TCG, so the tests check as much as
//! one boot can show.

use std::time::Duration;

use qemu_tests::{
    root_fixture_key, user_with_fixture_key, FwCfg, Seed, UserData, Vm, VmOptions,
    DEFAULT_SSH_TIMEOUT,
};
use serde_json::Value;

const UNIT: &str = "ballast-provision.service";

/// The document test (a) applies, with `hostname` filled in.
fn full_document(hostname: &str) -> String {
    format!(
        r#"#cloud-config
hostname: {hostname}
{root}users:
{alice}
write_files:
  - path: /etc/ballast-test/owned.conf
    content: "owned by alice\n"
    owner: alice:alice
    permissions: "0640"
  - path: /var/lib/ballast-test/secret
    encoding: b64
    content: c2VjcmV0Cg==
    permissions: "0600"
ballast:
  units:
    - name: ballast-test-hello.service
      enabled: true
      command: start
      content: |
        [Unit]
        Description=Provisioned by the qemu tests
        [Service]
        Type=oneshot
        RemainAfterExit=yes
        ExecStart=/bin/sh -c 'echo hello > /run/ballast-test-hello'
        [Install]
        WantedBy=multi-user.target
runcmd:
  - echo ran >> /var/lib/ballast-test/runcmd.log
packages: [htop]
"#,
        alice = user_with_fixture_key("alice", &["systemd-journal"], "/bin/bash").trim_end(),
        root = root_fixture_key(),
    )
}

#[test]
fn nocloud_seed_applies_once_per_instance_id() {
    let first = Seed::nocloud(&UserData::new(full_document("prov-a"), "iid-a-1"));
    let mut vm = Vm::boot(VmOptions {
        extra_args: first.qemu_args(),
        own_user_data: true,
        ..VmOptions::default()
    });
    vm.wait_ssh(DEFAULT_SSH_TIMEOUT);
    wait_boot_finished(&vm);
    expect_unit(&vm, UNIT, "active");

    expect_eq(&vm, "hostname", "prov-a");
    // alice logs in with the key the user data gave her.
    let id = vm.ssh_as_ok("alice", "id -un; id -Gn; getent passwd alice | cut -d: -f7");
    let lines: Vec<&str> = id.lines().collect();
    match lines[..] {
        ["alice", groups, "/bin/bash"] if groups.split(' ').any(|g| g == "systemd-journal") => {}
        _ => vm.fail(format!(
            "as alice, `id -un; id -Gn; shell` printed {id:?}; want alice, systemd-journal among the groups, /bin/bash"
        )),
    }
    // write_files: owner, mode and content (b64 decoded).
    expect_eq(
        &vm,
        "stat -c '%U:%G %a' /etc/ballast-test/owned.conf /var/lib/ballast-test/secret",
        "alice:alice 640\nroot:root 600",
    );
    expect_eq(&vm, "cat /etc/ballast-test/owned.conf", "owned by alice");
    expect_eq(&vm, "cat /var/lib/ballast-test/secret", "secret");
    // The unit was written, enabled and started.
    expect_unit(&vm, "ballast-test-hello.service", "active");
    expect_eq(&vm, "cat /run/ballast-test-hello", "hello");
    expect_eq(
        &vm,
        "systemctl is-enabled ballast-test-hello.service",
        "enabled",
    );
    expect_eq(&vm, "wc -l < /var/lib/ballast-test/runcmd.log", "1");
    let status = provision_status(&vm);
    expect_status(&vm, &status, "nocloud", "iid-a-1", "applied");
    // `packages` is cloud-init's, not ours: a warning that names it.
    if !status.to_string().contains("packages") {
        vm.fail(format!(
            "osctl provision status should warn about `packages`: {status:#}"
        ));
    }

    // Same instance id: nothing is applied again.
    vm.reboot();
    wait_boot_finished(&vm);
    expect_unit(&vm, UNIT, "active");
    expect_eq(&vm, "wc -l < /var/lib/ballast-test/runcmd.log", "1");
    expect_eq(&vm, "hostname", "prov-a");
    expect_unit(&vm, "ballast-test-hello.service", "active");
    expect_status(
        &vm,
        &provision_status(&vm),
        "nocloud",
        "iid-a-1",
        "already-applied",
    );

    // A new instance id applies again.
    vm.power_off();
    let second = Seed::nocloud(&UserData::new(full_document("prov-a2"), "iid-a-2"));
    vm.set_extra_args(second.qemu_args());
    vm.power_on();
    vm.wait_ssh(DEFAULT_SSH_TIMEOUT);
    wait_boot_finished(&vm);
    expect_unit(&vm, UNIT, "active");
    expect_eq(&vm, "hostname", "prov-a2");
    expect_eq(&vm, "wc -l < /var/lib/ballast-test/runcmd.log", "2");
    let who = vm.ssh_as_ok("alice", "id -un");
    if who.trim() != "alice" {
        vm.fail(format!("as alice, id -un printed {who:?}"));
    }
    expect_status(&vm, &provision_status(&vm), "nocloud", "iid-a-2", "applied");
    drop(first);
}

#[test]
fn fw_cfg_delivers_user_data() {
    let doc = format!(
        "#cloud-config\nhostname: prov-fw\n{}users:\n{}",
        root_fixture_key(),
        user_with_fixture_key("bob", &["systemd-journal"], "/bin/bash")
    );
    let fw = FwCfg::new(&UserData::new(doc, "iid-fw-1"));
    let vm = Vm::boot(VmOptions {
        extra_args: fw.qemu_args(),
        own_user_data: true,
        ..VmOptions::default()
    });
    vm.wait_ssh(DEFAULT_SSH_TIMEOUT);
    wait_boot_finished(&vm);
    expect_unit(&vm, UNIT, "active");
    expect_eq(&vm, "hostname", "prov-fw");
    let who = vm.ssh_as_ok("bob", "id -un");
    if who.trim() != "bob" {
        vm.fail(format!("as bob, id -un printed {who:?}"));
    }
    expect_status(&vm, &provision_status(&vm), "fw_cfg", "iid-fw-1", "applied");
}

#[test]
fn invalid_document_leaves_the_host_booted_with_a_readable_error() {
    // Line 6, column 13: groups must be a list or a string, not a mapping.
    // The document would also have given root the key: nothing of it may
    // apply, so nobody can log in over SSH; the console is the way in.
    let doc = format!(
        "#cloud-config\nhostname: prov-bad\nusers:\n  - name: carol\n    shell: /bin/sh\n    groups: {{wrong: type}}\n{}",
        root_fixture_key()
    );
    let seed = Seed::nocloud(&UserData::new(doc, "iid-bad-1"));
    let mut vm = Vm::boot(VmOptions {
        extra_args: seed.qemu_args(),
        own_user_data: true,
        ..VmOptions::default()
    });
    // The failed unit prints `osctl provision status` to the console, and
    // the host boots on to its login prompt.
    let console = vm.wait_console("result: invalid", DEFAULT_SSH_TIMEOUT);
    if !mentions_line_6(&console) {
        vm.fail("the console should name line 6 of the user data");
    }
    vm.wait_console("login:", Duration::from_secs(120));
    if vm.ssh("true").status.success() {
        vm.fail("root logged in with a key from an invalid document");
    }

    // Next boot: valid user data over fw_cfg (it comes first) lets the test
    // in to look at what the first boot left.
    vm.power_off_acpi();
    let fix = FwCfg::new(&UserData::new(
        format!("#cloud-config\n{}", root_fixture_key()),
        "iid-bad-2",
    ));
    vm.set_extra_args([seed.qemu_args(), fix.qemu_args()].concat());
    vm.power_on();
    vm.wait_ssh(DEFAULT_SSH_TIMEOUT);
    let state = wait_boot_finished(&vm);
    if state != "running" && state != "degraded" {
        vm.fail(format!("systemctl is-system-running: {state}"));
    }
    let hostname = vm.ssh_ok("hostname");
    if hostname.trim() == "prov-bad" {
        vm.fail("the hostname of an invalid document was applied");
    }
    let carol = vm.ssh("getent passwd carol");
    if carol.status.success() {
        vm.fail("user carol of an invalid document was created");
    }
    // The first boot's error, with where it is, is in the journal (kept on
    // /var across boots).
    let journal = vm.ssh_ok(&format!("journalctl -b -1 -u {UNIT} --no-pager"));
    if !mentions_line_6(&journal) {
        vm.fail(format!(
            "the journal of {UNIT} should name line 6 of the user data:\n{journal}"
        ));
    }
    expect_status(
        &vm,
        &provision_status(&vm),
        "fw_cfg",
        "iid-bad-2",
        "applied",
    );
    drop(seed);
}

/// Whether `text` points at line 6 ("line 6", "6:13").
fn mentions_line_6(text: &str) -> bool {
    text.contains("line 6") || text.contains(":6:") || text.contains(" 6:13")
}

/// Waits until the boot has finished (no jobs left) and returns the state
/// (`running`, or `degraded` if a unit failed).
fn wait_boot_finished(vm: &Vm) -> String {
    let out = vm.ssh("timeout 240 systemctl is-system-running --wait");
    let state = String::from_utf8_lossy(&out.stdout).trim().to_string();
    match state.as_str() {
        "running" | "degraded" => state,
        _ => vm.fail(format!(
            "boot did not finish: systemctl is-system-running says {state:?}; jobs:\n{}",
            vm.ssh_ok("systemctl list-jobs --no-pager; true")
        )),
    }
}

fn expect_unit(vm: &Vm, unit: &str, want: &str) {
    let state = vm.ssh_ok(&format!("systemctl is-active {unit}; true"));
    if state.trim() != want {
        vm.fail(format!(
            "{unit} is {}, want {want}:\n{}",
            state.trim(),
            vm.ssh_ok(&format!(
                "systemctl status --no-pager {unit}; journalctl -b -u {unit} --no-pager; true"
            ))
        ));
    }
}

/// Runs `cmd` and compares its trimmed output with `want`.
fn expect_eq(vm: &Vm, cmd: &str, want: &str) {
    let got = vm.ssh_ok(cmd);
    if got.trim() != want {
        vm.fail(format!("`{cmd}` printed {:?}, want {want:?}", got.trim()));
    }
}

fn provision_status(vm: &Vm) -> Value {
    let text = vm.ssh_ok("osctl provision status --json");
    serde_json::from_str(&text).unwrap_or_else(|e| {
        vm.fail(format!(
            "osctl provision status --json is not JSON ({e}): {text}"
        ))
    })
}

/// `osctl provision status --json` says the host is provisioned as
/// `instance_id` from a source whose name starts with `source`
/// ("nocloud /dev/vdb", "fw_cfg"), and the last attempt ended `last_result`
/// ("applied", or "already-applied" on a later boot).
fn expect_status(vm: &Vm, status: &Value, source: &str, instance_id: &str, last_result: &str) {
    let field = |attempt: &str, key: &str| {
        status
            .get(attempt)
            .and_then(|a| a.get(key))
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string()
    };
    let ok = field("current", "source").starts_with(source)
        && field("current", "instance_id") == instance_id
        && field("current", "result") == "applied"
        && field("last", "instance_id") == instance_id
        && field("last", "result") == last_result;
    if !ok {
        vm.fail(format!(
            "osctl provision status: want instance {instance_id} applied from {source}, \
             last attempt {last_result}; got {status:#}"
        ));
    }
}
