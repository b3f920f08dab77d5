//! A fleet on the real image, set up as an operator would: one user-data
//! document (etcd endpoints, group, the `fleet-lock` strategy, the channel
//! URL, a registry and a container) handed to two VMs over fw_cfg, a real
//! etcd and a real OCI registry on the host (reached through QEMU user
//! networking), one reboot slot for their group. The hosts join etcd and run
//! the container; a release published to their channel must reach both,
//! one reboot at a time, which the test reads back from etcd's own history of
//! the lock, and each host's record must show the new version and the running
//! container.
//!
//! Two TCG guests share two cores here, so everything takes about twice as
//! long as in the single-VM tests.

use std::collections::BTreeSet;
use std::process::Command;
use std::time::Duration;

use base64::Engine as _;
use os_agent::fleet::server::LocalEtcd;
use qemu_tests::containers::{WebImage, GUEST_REGISTRY};
use qemu_tests::{
    poll, root_fixture_key, sibling_build, ChannelServer, FwCfg, TestImage, UserData, Vm,
    VmOptions, GUEST_CHANNEL_URL, TEST_KEY,
};
use serde_json::Value;

/// Where the guests find etcd.
const GUEST_ETCD: &str = "10.0.2.101:2379";
const PREFIX: &str = "/ballast";
const GROUP: &str = "qemu";
/// Enough to show one reboot at a time: the second waits for the first.
const HOSTS: usize = 2;
/// A guest booting while two others run.
const BOOT_TIMEOUT: Duration = Duration::from_secs(600);
/// Two downloads at once, then two reboots one after the other.
const ROLLOUT_TIMEOUT: Duration = Duration::from_secs(2400);

/// `etcdctl` (v3 API) against the test's etcd.
fn etcdctl(etcd: &LocalEtcd, args: &[&str]) -> String {
    etcd.etcdctl(args).unwrap_or_else(|e| panic!("{e:#}"))
}

/// The host records registered in etcd, by machine id.
fn hosts(etcd: &LocalEtcd) -> Vec<Value> {
    let out = etcdctl(
        etcd,
        &[
            "get",
            "--prefix",
            &format!("{PREFIX}/hosts/"),
            "--print-value-only",
        ],
    );
    out.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("host record {l:?}: {e}")))
        .collect()
}

/// One change to a lock holder key, from etcd's history.
#[derive(Debug)]
struct HolderEvent {
    revision: u64,
    machine_id: String,
    taken: bool,
}

/// Every put and delete of the group's lock holders since etcd started,
/// read with a watch from revision 1 (the test's etcd never compacts).
fn holder_history(etcd: &LocalEtcd) -> Vec<HolderEvent> {
    let holders = format!("{PREFIX}/groups/{GROUP}/lock/holders/");
    // A watch never ends by itself: it prints the history at once, then
    // waits for more, so it is stopped after a few seconds.
    let out = Command::new("timeout")
        .args(["5", "etcdctl", "-w", "json", "watch", "--prefix", "--rev=1"])
        .arg(&holders)
        .env("ETCDCTL_API", "3")
        .env("ETCDCTL_ENDPOINTS", etcd.endpoint())
        .output()
        .expect("running etcdctl watch");
    let b64 = base64::engine::general_purpose::STANDARD;
    let mut events = Vec::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let resp: Value = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("etcdctl watch printed {line:?}: {e}"));
        for ev in resp["Events"].as_array().into_iter().flatten() {
            let key = ev["kv"]["key"].as_str().unwrap_or_default();
            let key = String::from_utf8(b64.decode(key).expect("base64 key")).expect("utf-8 key");
            events.push(HolderEvent {
                revision: ev["kv"]["mod_revision"].as_u64().unwrap_or(0),
                machine_id: key.trim_start_matches(&holders).to_string(),
                // PUT is type 0, which the JSON leaves out; DELETE is 1.
                taken: ev["type"].as_u64().unwrap_or(0) == 0,
            });
        }
    }
    events.sort_by_key(|e| e.revision);
    events
}

#[test]
fn hosts_provisioned_by_user_data_update_one_reboot_at_a_time() {
    let etcd_dir = tempfile::tempdir().expect("tempdir");
    let etcd = LocalEtcd::start(etcd_dir.path(), None).expect("starting etcd");
    let ch = ChannelServer::start().expect("channel server");
    let v1 = TestImage::get().info.version.clone();

    let work = tempfile::tempdir().expect("tempdir");
    let image = WebImage::push(work.path()).expect("pushing the test image");
    etcdctl(
        &etcd,
        &[
            "put",
            &format!("{PREFIX}/groups/{GROUP}/policy"),
            r#"{"max_holders": 1, "failure_threshold": 1}"#,
        ],
    );
    // What an operator writes (docs/user-data.md, docs/etcd.md): the daemon
    // checks every minute so the test need not wait an hour.
    let user_data = format!(
        r#"#cloud-config
{root}ballast:
  group: {GROUP}
  update:
    channel_url: "{GUEST_CHANNEL_URL}"
    channel: stable
    interval_secs: 60
    jitter_secs: 0
    strategy: fleet-lock
  etcd:
    endpoints: ["http://{GUEST_ETCD}"]
    prefix: {PREFIX}
    lease_ttl_secs: 30
  registries:
    "{GUEST_REGISTRY}": {{insecure: true}}
  containers:
    - name: web
      image: "{reference}"
      network: host
      command: [/bin/busybox, httpd, -f, -p, "8080", -h, /www]
      memory: 64M
"#,
        root = root_fixture_key(),
        reference = image.reference,
    );
    let fw = FwCfg::new(&UserData::new(user_data, "iid-fleet-journey"));
    let etcd_forward = format!("tcp:{GUEST_ETCD}-cmd:nc 127.0.0.1 {}", etcd.client_port);
    let vms = Vm::boot_several(
        HOSTS,
        VmOptions {
            memory_mib: Some(1024),
            cpus: Some(1),
            guest_forwards: vec![ch.guest_forward(), etcd_forward, image.guest_forward()],
            extra_args: fw.qemu_args(),
            own_user_data: true,
            ..VmOptions::default()
        },
        BOOT_TIMEOUT,
    );
    let mut seen = Vec::new();
    if !poll(BOOT_TIMEOUT, || {
        seen = hosts(&etcd);
        seen.len() == HOSTS
            && seen
                .iter()
                .all(|h| h["booted_version"] == v1.as_str() && h["containers"]["running"] == 1)
    }) {
        let journal = vms[0]
            .ssh_ok("osctl provision status; journalctl -b -u os-agent --no-pager | tail -30");
        vms[0].fail(format!(
            "the hosts did not register on {v1} with their container running: {seen:#?}\n{journal}"
        ));
    }

    ch.publish(&sibling_build("v2"), TEST_KEY.as_ref())
        .unwrap_or_else(|e| vms[0].fail(format!("{e:#}")));
    if !poll(ROLLOUT_TIMEOUT, || {
        seen = hosts(&etcd);
        seen.len() == HOSTS
            && seen
                .iter()
                .all(|h| h["booted_version"] == "0.2.0" && h["containers"]["running"] == 1)
    }) {
        let status = vms[0].ssh_ok("osctl fleet status; osctl update status; true");
        vms[0].fail(format!(
            "the rollout did not reach every host: {seen:#?}\n{status}"
        ));
    }
    for vm in &vms {
        let s: Value = serde_json::from_str(&vm.ssh_ok("osctl status --json"))
            .unwrap_or_else(|e| vm.fail(format!("osctl status --json: {e}")));
        if s["slot"] != "b" || s["image_version"] != "0.2.0" {
            vm.fail(format!("want slot b, 0.2.0: {s:#}"));
        }
    }

    // The last host gives its slot back once its new boot is blessed.
    let holders = format!("{PREFIX}/groups/{GROUP}/lock/holders/");
    let mut held = String::new();
    if !poll(BOOT_TIMEOUT, || {
        held = etcdctl(&etcd, &["get", "--prefix", "--keys-only", &holders]);
        held.trim().is_empty()
    }) {
        vms[0].fail(format!(
            "the reboot lock is still held after the rollout: {held}"
        ));
    }

    // etcd's history of the lock: each host held it, never two at once.
    let history = holder_history(&etcd);
    let mut holding = BTreeSet::new();
    let mut took = BTreeSet::new();
    for ev in &history {
        if ev.taken {
            holding.insert(ev.machine_id.clone());
            took.insert(ev.machine_id.clone());
        } else {
            holding.remove(&ev.machine_id);
        }
        if holding.len() > 1 {
            vms[0].fail(format!(
                "two hosts held the reboot lock at once at revision {}: {holding:?}; history: {history:#?}",
                ev.revision
            ));
        }
    }
    let machines: BTreeSet<String> = seen
        .iter()
        .filter_map(|h| h["machine_id"].as_str().map(str::to_string))
        .collect();
    if took != machines || !holding.is_empty() {
        vms[0].fail(format!(
            "every host should have taken and given back the lock: took {took:?}, still held {holding:?}, hosts {machines:?}"
        ));
    }
}
