//! Provisioning on the real image: user data from a NoCloud seed made by
//! `cloud-localds` and from QEMU fw_cfg, applied once per instance id, and a
//! bad document that leaves the host booted with a readable error.
//!
//! Each VM boot costs about a minute under TCG, so the tests check as much as
//! one boot can show.

use std::time::Duration;

use qemu_tests::{
    poll, root_fixture_key, user_with_fixture_key, FwCfg, Seed, UserData, Vm, VmOptions,
    DEFAULT_SSH_TIMEOUT,
};

/// Boot assessment and the bless after it, under TCG.
const SETTLE: Duration = Duration::from_secs(180);
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

/// The first `yaml` block under "## Example" in docs/user-data.md, read at
/// run time: the test boots what the reader is told to boot.
fn documented_example() -> String {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/user-data.md");
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{path}: {e}"));
    let section = text
        .split_once("\n## Example\n")
        .unwrap_or_else(|| panic!("{path} has no \"## Example\" section"))
        .1;
    let block = section
        .split_once("```yaml\n")
        .and_then(|(_, rest)| rest.split_once("\n```"))
        .unwrap_or_else(|| panic!("{path}: no yaml block under \"## Example\""))
        .0;
    format!("{block}\n")
}

/// The journey a reader of docs/user-data.md takes: its example, with their
/// SSH key for root put in, handed over fw_cfg as `make run USER_DATA=` does.
/// The host provisions, its agent runs, the health check passes, the boot
/// entry is blessed and no unit failed.
#[test]
fn the_documented_example_over_fw_cfg_gives_a_healthy_blessed_host() {
    // Beside the example: time from the host (the only address a guest may
    // reach) and an extra root for the agent.
    let certs = tempfile::tempdir().expect("tempdir");
    os_agent::test_certs::make(certs.path());
    let ca_pem = std::fs::read_to_string(certs.path().join("ca.pem")).expect("ca.pem");
    let ca: String = ca_pem.lines().map(|l| format!("      {l}\n")).collect();
    let extra = format!("ntp:\n  servers: [10.0.2.2]\nca_certs:\n  trusted:\n    - |\n{ca}");
    let doc = format!("{}{extra}{}", documented_example(), root_fixture_key());
    let fw = FwCfg::new(&UserData::new(doc, "iid-docs-example"));
    let vm = Vm::boot(VmOptions {
        extra_args: fw.qemu_args(),
        own_user_data: true,
        ..VmOptions::default()
    });
    vm.wait_ssh(DEFAULT_SSH_TIMEOUT);
    let state = wait_boot_finished(&vm);
    expect_status(
        &vm,
        &provision_status(&vm),
        "fw_cfg",
        "iid-docs-example",
        "applied",
    );
    expect_unit(&vm, UNIT, "active");
    expect_unit(&vm, "os-agent.service", "active");
    expect_unit(&vm, "ballast-health.service", "active");
    // What the example asks for.
    expect_eq(&vm, "hostname", "web1");
    expect_eq(
        &vm,
        "readlink /etc/localtime",
        "/usr/share/zoneinfo/Europe/Berlin",
    );
    expect_eq(
        &vm,
        "stat -c '%U:%G %a' /etc/app/config.toml",
        "alice:alice 640",
    );
    expect_eq(&vm, "systemctl is-active app.service", "active");
    expect_eq(&vm, "test -e /var/lib/app-provisioned && echo yes", "yes");
    // ntp: and ca_certs:.
    expect_unit(&vm, "systemd-timesyncd.service", "active");
    expect_eq(
        &vm,
        "grep -x 'NTP=10.0.2.2' /etc/systemd/timesyncd.conf.d/50-user-data.conf",
        "NTP=10.0.2.2",
    );
    expect_eq(
        &vm,
        "stat -c '%U %a' /etc/ballast/ca-certificates/user-data-0.pem",
        "root 644",
    );
    // The ballast: section became the agent's drop-in, and the agent runs
    // with it (it refused the same section before user data was checked by
    // the agent's own configuration code).
    let dropin = vm.ssh_ok("cat /etc/ballast/agent.d/50-user-data.toml");
    if !dropin.contains("channel_url = \"https://updates.example.com/ballast\"") {
        vm.fail(format!(
            "the agent drop-in lacks the example's channel:\n{dropin}"
        ));
    }
    let journal = vm.ssh_ok("journalctl -b -u os-agent --no-pager");
    if journal.contains("invalid agent configuration") {
        vm.fail(format!("os-agent refused its configuration:\n{journal}"));
    }
    // Blessed: the booted entry lost its boot counter.
    let mut entries = String::new();
    if !poll(SETTLE, || {
        entries = vm.ssh_ok("ls /efi/EFI/Linux/");
        entries
            .lines()
            .any(|l| l.ends_with(".efi") && !l.contains('+'))
    }) {
        vm.fail(format!(
            "the boot entry was not blessed: /efi/EFI/Linux has {entries:?}\n{}",
            vm.ssh_ok("systemctl status --no-pager ballast-health systemd-bless-boot; true")
        ));
    }
    let failed = vm.ssh_ok("systemctl --failed --no-legend --plain --no-pager");
    if state != "running" || !failed.trim().is_empty() {
        vm.fail(format!("the boot is {state}; failed units:\n{failed}"));
    }
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
