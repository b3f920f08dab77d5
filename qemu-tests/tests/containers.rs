//! Containers on the real image: an image built here (busybox's httpd),
//! pushed to a real registry on the host, declared for the host in a real
//! etcd on the host; the guest's agent pulls it, runs it as a
//! systemd-nspawn unit over D-Bus, and the test reaches it on its port from
//! outside the guest.

use std::time::Duration;

use os_agent::fleet::server::LocalEtcd;
use qemu_tests::containers::{http_get, WebImage, PAGE};
use qemu_tests::{poll, Vm, VmOptions, DEFAULT_SSH_TIMEOUT};

/// Where the guest finds etcd (a QEMU guest forward).
const GUEST_ETCD: &str = "10.0.2.101:2379";
const PREFIX: &str = "/ballast";
const GROUP: &str = "qemu";
/// The ports the group's and the host's container listen on (host network),
/// and the port the group's private-network container is published on.
const PORT: u16 = 8080;
const API_PORT: u16 = 8081;
const PRIVATE_PORT: u16 = 8082;
/// The host container's volume: its own data directory.
const API_VOLUME: &str = "/var/lib/ballast-volumes/api/data";
/// A local definition that binds the agent's state, which must be refused.
const EVIL_FILE: &str = "/etc/ballast/containers.d/evil.toml";
/// Pull, unpack and start under TCG.
const START_TIMEOUT: Duration = Duration::from_secs(300);

/// `etcdctl` (v3 API) against the test's etcd.
fn etcdctl(etcd: &LocalEtcd, args: &[&str]) -> String {
    etcd.etcdctl(args).unwrap_or_else(|e| panic!("{e:#}"))
}

/// What the guest's systemd and machined say about the containers.
fn diagnose(vm: &Vm) -> String {
    vm.ssh_ok(
        "systemctl status --no-pager 'ballast-container-*' 2>&1 | tail -30; \
         journalctl -b --no-pager -u os-agent | tail -30; machinectl list --no-pager; true",
    )
}

/// Waits until guest port `port` answers with the page (`true`) or does not
/// answer at all (`false`).
fn wait_for(vm: &Vm, port: u16, answering: bool, what: &str) {
    let host_port = vm.host_port(port);
    let mut last = None;
    if !poll(START_TIMEOUT, || {
        last = http_get(host_port);
        if answering {
            last.as_deref() == Some(PAGE)
        } else {
            last.is_none()
        }
    }) {
        vm.fail(format!(
            "{what}: guest port {port}: want {}, last answer {last:?}\n{}",
            if answering { "the page" } else { "no answer" },
            diagnose(vm)
        ));
    }
}

/// The unit's invocation id: the same after an agent restart means the
/// container was not restarted.
fn invocation(vm: &Vm, name: &str) -> String {
    vm.ssh_ok(&format!(
        "systemctl show -P InvocationID ballast-container-{name}.service"
    ))
    .trim()
    .to_string()
}

/// The host's record in etcd.
fn record(etcd: &LocalEtcd, machine_id: &str) -> Option<serde_json::Value> {
    let out = etcdctl(
        etcd,
        &[
            "get",
            "--print-value-only",
            &format!("{PREFIX}/hosts/{machine_id}"),
        ],
    );
    serde_json::from_str(out.trim()).ok()
}

/// The host uid that container `name`'s root runs as, from its leader's
/// uid map (`0 <base> 65536`), after checking that the leader runs as it.
fn root_uid_on_host(vm: &Vm, name: &str) -> u64 {
    let out = vm.ssh_ok(&format!(
        "l=$(machinectl show -p Leader --value {name}); cat /proc/$l/uid_map; stat -c %u /proc/$l"
    ));
    let fields: Vec<u64> = out
        .split_whitespace()
        .map(|f| f.parse().unwrap_or(u64::MAX))
        .collect();
    match fields.as_slice() {
        [0, base, 65536, owner] if base == owner => *base,
        _ => vm.fail(format!(
            "container {name}: want the uid map `0 <base> 65536` and its leader running as <base>, got:\n{out}"
        )),
    }
}

/// Waits until the host's record counts `n` containers, all running.
fn wait_record(vm: &Vm, etcd: &LocalEtcd, machine_id: &str, n: u32) {
    let want = serde_json::json!({"desired": n, "running": n, "failed": 0});
    let mut rec = None;
    if !poll(START_TIMEOUT, || {
        rec = record(etcd, machine_id);
        rec.as_ref().is_some_and(|r| r["containers"] == want)
    }) {
        vm.fail(format!(
            "the host record does not count {n} running containers: {rec:?}"
        ));
    }
}

/// Two containers for the group (`web` on the host network, port 8080;
/// `private` on its own network, published on port 8082) and one for this
/// host (`api`, port 8081), declared in etcd: pulled from the registry on the
/// host and answering from outside the guest. They keep running across an
/// agent restart, while etcd is down and through a reboot with etcd down;
/// deleting the host's key stops and removes its container only.
#[test]
fn containers_declared_in_etcd_run_and_follow_their_keys() {
    let work = tempfile::tempdir().expect("tempdir");
    let image = WebImage::push(work.path()).expect("pushing the test image");
    let etcd_dir = tempfile::tempdir().expect("tempdir");
    let mut etcd = LocalEtcd::start(etcd_dir.path(), None).expect("starting etcd");

    let vm = Vm::boot(VmOptions {
        guest_forwards: vec![
            image.guest_forward(),
            format!("tcp:{GUEST_ETCD}-cmd:nc 127.0.0.1 {}", etcd.client_port),
        ],
        host_forwards: vec![PORT, API_PORT, PRIVATE_PORT],
        ..VmOptions::default()
    });
    vm.wait_ssh(DEFAULT_SSH_TIMEOUT);
    let machine_id = vm.ssh_ok("cat /etc/machine-id").trim().to_string();
    let group_key = format!("{PREFIX}/containers/groups/{GROUP}/web");
    let host_key = format!("{PREFIX}/containers/hosts/{machine_id}/api");
    etcdctl(&etcd, &["put", &group_key, &image.container_json(PORT)]);
    let private_key = format!("{PREFIX}/containers/groups/{GROUP}/private");
    let private = image.private_container_json(PRIVATE_PORT);
    etcdctl(&etcd, &["put", &private_key, &private]);
    // The host's container writes who it is into its volume before serving.
    let mut api: serde_json::Value =
        serde_json::from_str(&image.container_json(API_PORT)).expect("container JSON");
    api["volumes"] = serde_json::json!([format!("{API_VOLUME}:/data")]);
    api["command"] = serde_json::json!([
        "/bin/sh",
        "-c",
        format!(
            "/bin/busybox id -u > /data/whoami && exec /bin/busybox httpd -f -p {API_PORT} -h /www"
        )
    ]);
    etcdctl(&etcd, &["put", &host_key, &api.to_string()]);
    let config = format!(
        "group = \"{GROUP}\"\n[etcd]\nendpoints = [\"http://{GUEST_ETCD}\"]\nlease_ttl_secs = 30\n{}",
        image.agent_config()
    );
    vm.ssh_ok(&format!(
        "cat > /etc/ballast/agent.d/50-test.toml <<'EOF'\n{config}EOF\nsystemctl restart os-agent"
    ));
    wait_for(&vm, PORT, true, "the group's container");
    wait_for(&vm, API_PORT, true, "the host's container");
    wait_for(
        &vm,
        PRIVATE_PORT,
        true,
        "the private container's published port",
    );
    let machines = vm.ssh_ok("machinectl list --no-legend --no-pager");
    if !["web", "api", "private"]
        .iter()
        .all(|m| machines.contains(m))
    {
        vm.fail(format!("machinectl does not list all three: {machines}"));
    }
    let limit = vm.ssh_ok("systemctl show -P MemoryMax ballast-container-web.service");
    if limit.trim() != (64u64 << 20).to_string() {
        vm.fail(format!("MemoryMax of web is {limit:?}, want 64M"));
    }
    wait_record(&vm, &etcd, &machine_id, 3);
    // A local user cannot reach the pulled images (nor any setuid binary in
    // them): the store is root's alone.
    let out = vm.ssh("runuser -u nobody -- ls /var/lib/ballast/images/");
    if out.status.success() {
        vm.fail(format!(
            "nobody can list the image store: {}",
            String::from_utf8_lossy(&out.stdout)
        ));
    }

    // Container root is not host root: each runs as the base of a uid range
    // of its own, at 524288 or above, on the host's network or not.
    let bases: Vec<u64> = ["web", "api", "private"]
        .iter()
        .map(|n| root_uid_on_host(&vm, n))
        .collect();
    let distinct: std::collections::BTreeSet<&u64> = bases.iter().collect();
    if bases.iter().any(|b| *b < 524_288) || distinct.len() != bases.len() {
        vm.fail(format!(
            "want three distinct uid ranges from 524288 up: {bases:?}"
        ));
    }
    // Its volume is writable by its root: the file is there, written as
    // uid 0 inside and, through the idmapped bind, owned by 0 on the disk.
    let seen = vm.ssh_ok(&format!(
        "cat {API_VOLUME}/whoami; stat -c %u {API_VOLUME}/whoami; stat -c '%u %a' /var/lib/ballast-volumes"
    ));
    if seen.split_whitespace().collect::<Vec<_>>() != ["0", "0", "0", "700"] {
        vm.fail(format!(
            "want whoami = 0, owned by 0, in a 0700 volumes directory: {seen}\n{}",
            diagnose(&vm)
        ));
    }
    // A definition that binds the agent's state (the host's /etc overlay)
    // is refused, naming the container and the volume; no unit is written.
    vm.ssh_ok(&format!(
        "mkdir -p /etc/ballast/containers.d && cat > {EVIL_FILE} <<'EOF'\n\
         [[containers]]\nname = \"evil\"\nimage = \"{}\"\nnetwork = \"host\"\n\
         volumes = [\"/var/lib/ballast/etc/upper:/hostetc\"]\nEOF",
        image.reference
    ));
    let list = vm.ssh_ok("osctl containers list");
    if !list.contains(&format!(
        "{EVIL_FILE}: container evil: volumes[0]: \"/var/lib/ballast/etc/upper:/hostetc\""
    )) || !list.contains("/var/lib/ballast is the agent's own state")
    {
        vm.fail(format!("osctl does not report the refused volume:\n{list}"));
    }

    // The agent stops and starts: the units are not its children.
    let (web, api) = (invocation(&vm, "web"), invocation(&vm, "api"));
    vm.ssh_ok("systemctl restart os-agent");
    wait_for(&vm, PORT, true, "after an agent restart");
    if (invocation(&vm, "web"), invocation(&vm, "api")) != (web.clone(), api.clone()) {
        vm.fail("an agent restart restarted the containers");
    }
    let mut journal = String::new();
    if !poll(START_TIMEOUT, || {
        journal = vm.ssh_ok("journalctl -b --no-pager -u os-agent --since '-3min' | tail -40");
        journal.contains("container evil: volumes[0]")
    }) {
        vm.fail(format!(
            "the agent did not report the evil volume:\n{journal}"
        ));
    }
    if vm
        .ssh("test -e /etc/systemd/system/ballast-container-evil.service")
        .status
        .success()
    {
        vm.fail("the agent wrote a unit for the refused container");
    }

    // etcd goes away; the agent restarts without it and keeps everything.
    etcd.stop().expect("stopping etcd");
    vm.ssh_ok("systemctl restart os-agent");
    let mut journal = String::new();
    if !poll(START_TIMEOUT, || {
        journal = vm.ssh_ok("journalctl -b --no-pager -u os-agent --since '-2min' | tail -40");
        journal.contains("etcd is unavailable")
    }) {
        vm.fail(format!("the agent did not notice etcd is down:\n{journal}"));
    }
    wait_for(&vm, PORT, true, "with etcd down");
    wait_for(&vm, API_PORT, true, "with etcd down");
    if (invocation(&vm, "web"), invocation(&vm, "api")) != (web, api) {
        vm.fail("etcd going down restarted the containers");
    }

    // A reboot with etcd still down: systemd starts the units from the
    // image on /var, the agent from its last good desired state.
    vm.reboot();
    wait_for(&vm, PORT, true, "after a reboot with etcd down");
    wait_for(&vm, API_PORT, true, "after a reboot with etcd down");
    wait_for(&vm, PRIVATE_PORT, true, "after a reboot with etcd down");

    // etcd is back; the host's key goes: its container stops and its unit
    // is removed, the group's stays.
    etcd.restart().expect("restarting etcd");
    etcdctl(&etcd, &["del", &host_key]);
    wait_for(&vm, API_PORT, false, "after its key was deleted");
    let units = vm.ssh_ok("ls /etc/systemd/system/ | grep ballast-container- || true");
    let left: Vec<&str> = units.split_whitespace().collect();
    if left
        != [
            "ballast-container-private.service",
            "ballast-container-web.service",
        ]
    {
        vm.fail(format!("want the group's two units left, found: {units}"));
    }
    wait_for(
        &vm,
        PORT,
        true,
        "the group's container after the host's key went",
    );
    wait_record(&vm, &etcd, &machine_id, 2);
}
