//! Documents → plans or errors (a table), and applying through a
//! directory-backed host: outcomes, records, once per instance.

use super::apply::StepOutcome;
use super::plan::Action;
use super::record::{self, AttemptResult};
use super::source::{SourceKind, UserDataDoc};
use super::*;
use crate::host::{CmdOutput, DirHost};
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

const KEY: &str =
    "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGJhbGxhc3QtdGVzdC1rZXktbm90LXJlYWw test@example";
/// `printf 'hello gzip\n' | gzip -n | base64`
const GZ_B64: &str = "H4sIAAAAAAAAA8tIzcnJV0ivyizgAgA5fGNWCwAAAA==";

fn facts() -> Facts {
    Facts {
        groups: ["root", "adm", "users", "sudo", "staff", "systemd-journal"]
            .iter()
            .map(|s| s.to_string())
            .collect(),
        users: BTreeMap::from([("root".to_string(), PathBuf::from("/root"))]),
        sudoers_d: Some(true),
        groups_from: "the test groups".to_string(),
    }
}

/// A host tree with a couple of time zones.
fn tz_host() -> (tempfile::TempDir, DirHost) {
    let dir = tempfile::tempdir().unwrap();
    let host = DirHost::new(dir.path()).unwrap();
    for z in ["UTC", "Europe/Berlin"] {
        put(&host, &format!("/usr/share/zoneinfo/{z}"), b"TZif");
    }
    (dir, host)
}

fn put(host: &DirHost, path: &str, contents: &[u8]) {
    let p = host.path(Path::new(path));
    std::fs::create_dir_all(p.parent().unwrap()).unwrap();
    std::fs::write(p, contents).unwrap();
}

fn get(host: &DirHost, path: &str) -> String {
    std::fs::read_to_string(host.path(Path::new(path))).unwrap_or_else(|e| panic!("{path}: {e}"))
}

fn plan_of(doc: &str) -> Result<Plan, String> {
    let (_d, host) = tz_host();
    plan(doc.as_bytes(), None, &facts(), &host).map_err(|e| e.to_string())
}

fn steps_of(doc: &str) -> Result<Vec<String>, String> {
    plan_of(doc).map(|p| p.steps.iter().map(|s| s.to_string()).collect())
}

enum Expect {
    Steps(&'static [&'static str]),
    Err(&'static str),
}

#[test]
fn documents() {
    use Expect::*;
    let cases: &[(&str, String, Expect)] = &[
        ("empty", "#cloud-config\n".into(), Steps(&[])),
        ("header with spaces", "#cloud-config  \n{}\n".into(), Steps(&[])),
        (
            "hostname",
            "#cloud-config\nhostname: web1\n".into(),
            Steps(&["hostname: set hostname web1"]),
        ),
        (
            "fqdn gives the hostname",
            "#cloud-config\nfqdn: web1.example.com\n".into(),
            Steps(&["fqdn: set hostname web1 (fqdn web1.example.com)"]),
        ),
        (
            "dotted hostname",
            "#cloud-config\nhostname: db.example.com\n".into(),
            Steps(&["hostname: set hostname db (fqdn db.example.com)"]),
        ),
        (
            "a user, in order",
            format!(
                "#cloud-config\nusers:\n  - default\n  - name: alice\n    gecos: Alice A\n    groups: adm, users\n    shell: /bin/bash\n    sudo: ALL=(ALL) NOPASSWD:ALL\n    ssh_authorized_keys: [\"{KEY}\"]\n"
            ),
            Steps(&[
                "users[1]: create user alice, groups adm,users, shell \"/bin/bash\", gecos \"Alice A\"",
                "users[1]: lock password of alice",
                "users[1]: add 1 ssh key(s) to /home/alice/.ssh/authorized_keys of alice",
                "users: write /etc/sudoers.d/90-ballast-users (90 bytes, mode 0440, owner root:root)",
            ]),
        ),
        (
            "hashed password unlocked, groups as a list",
            "#cloud-config\nusers:\n  - name: bob\n    groups: [staff]\n    lock_passwd: false\n    hashed_passwd: $6$salt$hash\n".into(),
            Steps(&[
                "users[0]: create user bob, groups staff",
                "users[0]: set password hash of bob",
            ]),
        ),
        (
            "yaml 1.1 booleans",
            "#cloud-config\nusers:\n  - name: bob\n    lock_passwd: no\n".into(),
            Steps(&["users[0]: create user bob"]),
        ),
        (
            "existing user root is modified",
            "#cloud-config\nusers:\n  - name: root\n    shell: /bin/bash\n    lock_passwd: false\n".into(),
            Steps(&["users[0]: modify existing user root, shell \"/bin/bash\""]),
        ),
        (
            "top-level keys go to root",
            format!("#cloud-config\nssh_authorized_keys:\n  - {KEY}\n"),
            Steps(&["ssh_authorized_keys: add 1 ssh key(s) to /root/.ssh/authorized_keys of root"]),
        ),
        (
            "top-level groups are created first, members added after users",
            "#cloud-config\ngroups:\n  - docker\n  - ops: [carol]\nusers:\n  - name: carol\n    groups: [docker]\n    lock_passwd: false\n".into(),
            Steps(&[
                "groups[0]: create group docker",
                "groups[1]: create group ops",
                "users[0]: create user carol, groups docker",
                "groups[1]: add carol to group ops",
            ]),
        ),
        (
            "write_files: every encoding",
            format!(
                "#cloud-config\nwrite_files:\n\
                 - {{path: /etc/a, content: \"hello\\n\"}}\n\
                 - {{path: /etc/b, content: aGVsbG8gYjY0Cg==, encoding: b64}}\n\
                 - {{path: /etc/c, content: aGVsbG8gYjY0Cg==, encoding: base64}}\n\
                 - {{path: /etc/d, content: {GZ_B64}, encoding: gz}}\n\
                 - {{path: /etc/e, content: {GZ_B64}, encoding: gzip}}\n\
                 - {{path: /etc/f, content: {GZ_B64}, encoding: gz+base64}}\n\
                 - {{path: /etc/g, content: {GZ_B64}, encoding: gzip+base64}}\n\
                 - {{path: /etc/h, content: {GZ_B64}, encoding: gz+b64}}\n\
                 - {{path: /etc/i, content: {GZ_B64}, encoding: gzip+b64}}\n\
                 - {{path: /etc/j, content: plain, encoding: text}}\n\
                 - path: /etc/k\n  encoding: gzip\n  content: !!binary |\n    {GZ_B64}\n"
            ),
            Steps(&[
                "write_files[0]: write /etc/a (6 bytes, mode 0644, owner root:root)",
                "write_files[1]: write /etc/b (10 bytes, mode 0644, owner root:root)",
                "write_files[2]: write /etc/c (10 bytes, mode 0644, owner root:root)",
                "write_files[3]: write /etc/d (11 bytes, mode 0644, owner root:root)",
                "write_files[4]: write /etc/e (11 bytes, mode 0644, owner root:root)",
                "write_files[5]: write /etc/f (11 bytes, mode 0644, owner root:root)",
                "write_files[6]: write /etc/g (11 bytes, mode 0644, owner root:root)",
                "write_files[7]: write /etc/h (11 bytes, mode 0644, owner root:root)",
                "write_files[8]: write /etc/i (11 bytes, mode 0644, owner root:root)",
                "write_files[9]: write /etc/j (5 bytes, mode 0644, owner root:root)",
                "write_files[10]: write /etc/k (11 bytes, mode 0644, owner root:root)",
            ]),
        ),
        (
            "deferred files come after users; owner, mode, append",
            "#cloud-config\nwrite_files:\n  - path: /home/dave/.profile\n    content: x\n    owner: dave:dave\n    permissions: '0600'\n    defer: true\n  - path: /var/log/x\n    content: y\n    append: true\nusers:\n  - name: dave\n    lock_passwd: false\n".into(),
            Steps(&[
                "write_files[1]: append to /var/log/x (1 bytes, mode 0644, owner root:root)",
                "users[0]: create user dave",
                "write_files[0]: write /home/dave/.profile (1 bytes, mode 0600, owner dave:dave)",
            ]),
        ),
        (
            "the whole order",
            "#cloud-config\nruncmd: [[touch, /var/done]]\nbootcmd: [echo hi]\ntimezone: Europe/Berlin\nhostname: h1\nwrite_files: [{path: /etc/x, content: x}]\n".into(),
            Steps(&[
                "bootcmd[0]: run sh -c \"echo hi\" (every boot)",
                "hostname: set hostname h1",
                "timezone: set timezone Europe/Berlin",
                "write_files[0]: write /etc/x (1 bytes, mode 0644, owner root:root)",
                "runcmd[0]: run [\"touch\", \"/var/done\"] (once)",
            ]),
        ),
        (
            "network in user data",
            "#cloud-config\nnetwork:\n  version: 2\n  ethernets:\n    eth0:\n      dhcp4: true\n".into(),
            Steps(&[
                "network.ethernets.eth0: write /etc/systemd/network/10-ballast-eth0.network (100 bytes, mode 0644, owner root:root)",
                "network: reload systemd-networkd",
            ]),
        ),
        (
            "ballast section and units",
            "#cloud-config\nballast:\n  group: web\n  update:\n    channel_url: https://updates.example.com/ballast\n    channel: stable\n    strategy: window\n    window: {days: [mon, Tuesday], start: \"02:00\", length: 1h30m, timezone: UTC}\n  units:\n    - name: hello.service\n      content: |\n        [Service]\n        ExecStart=/bin/true\n      dropins: [{name: 10-env.conf, content: \"[Service]\\n\"}]\n      enabled: true\n    - name: sshd.service\n      dropins: [{name: 50-x.conf, content: \"\"}]\n      command: restart\n".into(),
            Steps(&[
                "ballast: write /etc/ballast/agent.d/50-user-data.toml (360 bytes, mode 0644, owner root:root)",
                "ballast.units[0]: write /etc/systemd/system/hello.service (30 bytes, mode 0644, owner root:root)",
                "ballast.units[0].dropins[0]: write /etc/systemd/system/hello.service.d/10-env.conf (10 bytes, mode 0644, owner root:root)",
                "ballast.units[1].dropins[0]: write /etc/systemd/system/sshd.service.d/50-x.conf (0 bytes, mode 0644, owner root:root)",
                "ballast.units: reload systemd units",
                "ballast.units[0]: enable hello.service",
                "ballast.units[0]: start hello.service",
                "ballast.units[1]: restart sshd.service",
            ]),
        ),
        (
            "etcd material",
            "#cloud-config\nballast:\n  etcd:\n    endpoints: [https://10.0.0.1:2379]\n    ca: \"-----BEGIN CERTIFICATE-----\\nx\\n-----END CERTIFICATE-----\\n\"\n    cert: \"-----BEGIN CERTIFICATE-----\\ny\\n-----END CERTIFICATE-----\\n\"\n    key: \"-----BEGIN PRIVATE KEY-----\\nz\\n-----END PRIVATE KEY-----\\n\"\n    username: u\n    password: p\n".into(),
            Steps(&[
                "ballast.etcd.ca: write /etc/ballast/etcd/ca.pem (56 bytes, mode 0644, owner root:root)",
                "ballast.etcd.cert: write /etc/ballast/etcd/cert.pem (56 bytes, mode 0644, owner root:root)",
                "ballast.etcd.key: write /etc/ballast/etcd/key.pem (56 bytes, mode 0600, owner root:root)",
                "ballast: write /etc/ballast/agent.d/50-user-data.toml (341 bytes, mode 0600, owner root:root)",
            ]),
        ),
        // Invalid documents.
        ("no header", "hostname: x\n".into(), Err("must start with a \"#cloud-config\" line; got first line \"hostname: x\"")),
        ("a script", "#!/bin/sh\necho hi\n".into(), Err("got a script (\"#!/bin/sh\")")),
        ("mime", "Content-Type: multipart/mixed; boundary=x\n".into(), Err("a MIME multipart document")),
        ("empty data", "".into(), Err("user data is empty")),
        ("not yaml", "#cloud-config\nusers: [\n".into(), Err("user data is not valid YAML")),
        ("not a mapping", "#cloud-config\n- a\n".into(), Err("not a mapping")),
        (
            "wrong type, with path, line and column",
            "#cloud-config\nusers:\n  - name: a\n  - name: b\n    groups: 3\n".into(),
            Err("users[1].groups: invalid type: integer `3`, expected a list of names or a comma-separated string at line 5 column 13"),
        ),
        ("missing name", "#cloud-config\nusers:\n  - gecos: x\n".into(), Err("missing field `name`")),
        (
            "unknown group",
            "#cloud-config\nusers:\n  - name: erin\n    groups: [docker]\n".into(),
            Err("users[0].groups: user erin: group \"docker\" is not in the test groups"),
        ),
        ("bad user name", "#cloud-config\nusers: [{name: Eve}]\n".into(), Err("users[0].name: \"Eve\" is not a valid user name")),
        ("sudo true", "#cloud-config\nusers: [{name: a, sudo: true}]\n".into(), Err("users[0].sudo: invalid value: boolean `true`")),
        ("bad base64", "#cloud-config\nwrite_files: [{path: /etc/a, content: \"!!!\", encoding: b64}]\n".into(), Err("write_files[0].content: content is not valid base64")),
        ("bad gzip", "#cloud-config\nwrite_files: [{path: /etc/a, content: aGVsbG8=, encoding: gzip}]\n".into(), Err("write_files[0].content: content is not valid gzip data")),
        ("bad encoding", "#cloud-config\nwrite_files: [{path: /etc/a, encoding: rot13}]\n".into(), Err("unknown encoding \"rot13\"")),
        ("relative path", "#cloud-config\nwrite_files: [{path: etc/a}]\n".into(), Err("write_files[0].path: \"etc/a\" is not an absolute path")),
        ("path under /usr", "#cloud-config\nwrite_files: [{path: /usr/local/bin/x}]\n".into(), Err("is on the read-only root")),
        ("path under /lib64", "#cloud-config\nwrite_files: [{path: /lib64/x}]\n".into(), Err("is on the read-only root")),
        ("dotdot", "#cloud-config\nwrite_files: [{path: /etc/../usr/x}]\n".into(), Err("has . or .. in it")),
        ("bad permissions", "#cloud-config\nwrite_files: [{path: /etc/a, permissions: '0999'}]\n".into(), Err("write_files[0].permissions: \"0999\" is not an octal mode")),
        (
            "a leading zero reads as octal, as in cloud-init",
            "#cloud-config\nwrite_files: [{path: /etc/a, permissions: 0600}]\n".into(),
            Steps(&["write_files[0]: write /etc/a (0 bytes, mode 0600, owner root:root)"]),
        ),
        ("unquoted decimal permissions", "#cloud-config\nwrite_files: [{path: /etc/a, permissions: 644}]\n".into(), Err("unquoted number 644")),
        ("unknown owner", "#cloud-config\nwrite_files: [{path: /etc/a, owner: \"zed:root\"}]\n".into(), Err("write_files[0].owner: user \"zed\" does not exist")),
        (
            "a file owned by a new user waits for it",
            "#cloud-config\nusers: [{name: fay, lock_passwd: false}]\nwrite_files: [{path: /etc/a, owner: \"fay:fay\"}, {path: /etc/b}]\n".into(),
            Steps(&[
                "write_files[1]: write /etc/b (0 bytes, mode 0644, owner root:root)",
                "users[0]: create user fay",
                "write_files[0]: write /etc/a (0 bytes, mode 0644, owner fay:fay)",
            ]),
        ),
        ("url source", "#cloud-config\nwrite_files: [{path: /etc/a, source: {uri: \"http://x\"}}]\n".into(), Err("write_files[0].source: fetching content from a URL is not supported")),
        ("two writers", "#cloud-config\nwrite_files: [{path: /etc/a}, {path: /etc/a}]\n".into(), Err("write_files[1]: /etc/a is also written by write_files[0]")),
        ("bad hostname", "#cloud-config\nhostname: -bad_name\n".into(), Err("hostname: \"-bad_name\" is not a valid host name")),
        ("long hostname", format!("#cloud-config\nhostname: {}\n", "a".repeat(65)), Err("is not a valid host name")),
        ("bad timezone", "#cloud-config\ntimezone: Mars/Olympus\n".into(), Err("timezone: \"Mars/Olympus\" is not a time zone")),
        ("timezone traversal", "#cloud-config\ntimezone: ../../etc/passwd\n".into(), Err("is not a time zone")),
        ("bad unit name", "#cloud-config\nballast:\n  units: [{name: hello, content: x}]\n".into(), Err("ballast.units[0].name: \"hello\" is not a unit name")),
        ("bad dropin name", "#cloud-config\nballast:\n  units: [{name: a.service, dropins: [{name: x, content: y}]}]\n".into(), Err("is not a drop-in name")),
        ("bad strategy", "#cloud-config\nballast:\n  update: {strategy: sometimes}\n".into(), Err("update.strategy: \"sometimes\" is not one of \"immediate\", \"window\", \"fleet-lock\"")),
        ("window needs start", "#cloud-config\nballast:\n  update: {strategy: window, window: {length: 60}}\n".into(), Err("update.window.start is required")),
        ("bad window day", "#cloud-config\nballast:\n  update: {window: {days: [funday], start: \"01:00\", length: 1h}}\n".into(), Err("update.window.days: \"funday\" is not a day")),
        ("bad channel", "#cloud-config\nballast:\n  update: {channel: ftp://x}\n".into(), Err("update.channel: \"ftp://x\" is not a channel name")),
        ("bad channel URL", "#cloud-config\nballast:\n  update: {channel_url: ftp://x}\n".into(), Err("ballast.update.channel_url: \"ftp://x\" is not an http(s) URL")),
        ("container without image", "#cloud-config\nballast:\n  containers: [{name: web}]\n".into(), Err("ballast.containers[0].image: missing")),
        ("container volume outside its data directory", "#cloud-config\nballast:\n  containers: [{name: web, image: r.example/web, volumes: [\"/etc:/etc\"]}]\n".into(), Err("ballast.containers[0]: container web: volumes[0]: \"/etc:/etc\": host path \"/etc\" must be under /var/lib/ballast-volumes/web/")),
        ("container unknown key", "#cloud-config\nballast:\n  containers: [{name: web, image: r.example/web, memroy: 1G}]\n".into(), Err("ballast.containers[0]: unknown field `memroy`")),
        ("etcd key without cert", "#cloud-config\nballast:\n  etcd: {endpoints: [\"http://e:2379\"], key: \"-----BEGIN K-----\\n-----END K-----\"}\n".into(), Err("cert and key go together")),
        ("network v1", "#cloud-config\nnetwork: {version: 1, config: []}\n".into(), Err("network config version 1 is not supported")),
        ("bad address", "#cloud-config\nnetwork: {version: 2, ethernets: {eth0: {addresses: [10.0.0.300/24]}}}\n".into(), Err("network.ethernets.eth0.addresses[0]")),
        ("empty command", "#cloud-config\nruncmd: [[]]\n".into(), Err("runcmd[0]: empty argument list")),
    ];
    let mut failures = Vec::new();
    for (name, doc, expect) in cases {
        let got = steps_of(doc);
        match (expect, &got) {
            (Steps(want), Ok(have)) if have.iter().map(String::as_str).eq(want.iter().copied()) => {
            }
            (Err(want), Result::Err(have)) if have.contains(want) => {}
            _ => failures.push(format!("{name}:\n  got {got:#?}")),
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn all_errors_are_reported_at_once() {
    let e = steps_of("#cloud-config\nhostname: a_b\ntimezone: Nowhere\nwrite_files: [{path: x}]\n")
        .unwrap_err();
    assert!(
        e.starts_with("user data: ") || e.starts_with("3 error(s)"),
        "{e}"
    );
    for want in ["hostname:", "timezone:", "write_files[0].path"] {
        assert!(e.contains(want), "{want} missing from {e}");
    }
}

/// The `ballast:` section is checked by the agent's own configuration code:
/// what the agent would refuse at its next start is refused here, before
/// anything is written, naming the key.
#[test]
fn a_ballast_section_the_agent_would_refuse_is_refused() {
    let cases = [
        (
            "update: {channel: \"https://updates.example.com/stable\"}",
            "ballast.update.channel: \"https://updates.example.com/stable\" is a URL",
        ),
        (
            "update: {channel: \"../up\"}",
            "update.channel: \"../up\" is not a channel name",
        ),
        (
            "update: {strategy: window, window: {start: \"02:00\", length: 60, timezone: Mars/Olympus}}",
            "update.window.timezone: timezone \"Mars/Olympus\": not UTC",
        ),
    ];
    for (section, want) in cases {
        let doc = format!("#cloud-config\nballast:\n  {section}\n");
        let e = steps_of(&doc).unwrap_err();
        assert!(e.contains(want), "{section}: want {want:?} in {e}");
    }
    // The agent's own limits apply to the keys user data passes on.
    let e = steps_of("#cloud-config\nballast:\n  update: {interval_secs: 5}\n").unwrap_err();
    assert!(e.contains("update.interval_secs: 5 is less than 60"), "{e}");
    let e = steps_of(
        "#cloud-config\nballast:\n  etcd: {endpoints: [\"http://e:2379\"], lease_ttl_secs: 1}\n",
    )
    .unwrap_err();
    assert!(e.contains("lease_ttl_secs"), "{e}");
    // Registries go to the drop-in and are checked as the agent checks them.
    let e = steps_of("#cloud-config\nballast:\n  registries: {\"reg.lan:5000\": {username: u}}\n")
        .unwrap_err();
    assert!(e.contains("username and password go together"), "{e}");
    let e = steps_of("#cloud-config\nballast:\n  registries: [a]\n").unwrap_err();
    assert!(e.contains("ballast.registries: must be a mapping"), "{e}");
    steps_of("#cloud-config\nballast:\n  registries: {\"reg.lan:5000\": {insecure: true}}\n")
        .unwrap();
    // The proxy goes to the drop-in's [http], checked by config/http.rs.
    let e =
        steps_of("#cloud-config\nballast:\n  http: {proxy: \"socks5://p:1080\"}\n").unwrap_err();
    assert!(
        e.contains("http.proxy: \"socks5://p:1080\" must be an http"),
        "{e}"
    );
    let e = steps_of("#cloud-config\nballast:\n  http: [a]\n").unwrap_err();
    assert!(e.contains("ballast.http: must be a mapping"), "{e}");
    let s = steps_of(
        "#cloud-config\nballast:\n  http: {proxy: \"http://proxy.lan:3128\", no_proxy: [10.0.0.0/8, .lan]}\n",
    )
    .unwrap();
    assert!(s[0].contains("50-user-data.toml"), "{s:?}");
    // A registry password makes the drop-in the root's alone.
    let s = steps_of(
        "#cloud-config\nballast:\n  registries: {\"reg.lan:5000\": {username: u, password: p}}\n",
    )
    .unwrap();
    assert!(s[0].contains("mode 0600"), "{s:?}");
    // A window without days opens every day; zones by their IANA name.
    steps_of(
        "#cloud-config\nballast:\n  update: {strategy: window, window: {start: \"02:00\", length: 1h, timezone: Europe/Berlin}}\n",
    )
    .unwrap();
    steps_of(
        "#cloud-config\nballast:\n  update: {channel_url: \"http://10.0.2.2:8080\", strategy: window, window: {start: \"02:00\", length: 60, timezone: \"+01:00\"}}\n",
    )
    .unwrap();
}

#[test]
fn unknown_and_unsupported_keys_are_warnings() {
    let p = plan_of(
        "#cloud-config\npackages: [nginx]\npackage_update: true\nfrobnicate: 1\nusers:\n  - default\n  - name: a\n    uid: 1001\n    colour: blue\n    lock_passwd: false\nwrite_files: [{path: /etc/a, mode: x}]\nballast:\n  fleet: x\nnetwork: {version: 2, bonds: {}, ethernets: {eth0: {dhcp4: true, mtu: 9000}}}\n",
    )
    .unwrap();
    let want = [
        "packages: not supported by Ballast, ignored",
        "package_update: not supported by Ballast, ignored",
        "frobnicate: unknown key, ignored",
        "users[1].uid: not supported by Ballast, ignored",
        "users[1].colour: unknown key, ignored",
        "write_files[0].mode: unknown key, ignored",
        "ballast.fleet: unknown key, ignored",
        "network.bonds: not supported by Ballast, ignored",
        "network.ethernets.eth0.mtu: not supported by Ballast, ignored",
        "users[0]: \"default\": Ballast has no default user, ignored",
    ];
    let have: BTreeSet<&str> = p.warnings.iter().map(String::as_str).collect();
    for w in want {
        assert!(have.contains(w), "{w:?} not in {have:#?}");
    }
    assert!(p
        .render()
        .contains("warning: frobnicate: unknown key, ignored\n"));
}

#[test]
fn locked_hashed_password_warns() {
    let p = plan_of("#cloud-config\nusers: [{name: a, hashed_passwd: $6$x$y}]\n").unwrap();
    assert!(
        p.warnings
            .iter()
            .any(|w| w.contains("the password is set but locked")),
        "{:?}",
        p.warnings
    );
}

#[test]
fn sudo_without_sudoers_d_is_a_warning() {
    let (_d, host) = tz_host();
    let mut f = facts();
    f.sudoers_d = Some(false);
    let p = plan(
        b"#cloud-config\nusers: [{name: a, sudo: ALL=(ALL) ALL}]\n",
        None,
        &f,
        &host,
    )
    .unwrap();
    assert!(p.steps.iter().all(|s| !s.to_string().contains("sudoers")));
    assert!(p
        .warnings
        .iter()
        .any(|w| w.contains("sudo is not installed")));
}

#[test]
fn rendered_network_file() {
    let net = b"network:\n  version: 2\n  ethernets:\n    lan:\n      match: {macaddress: '52:54:00:AB:cd:01'}\n      addresses: [192.168.1.10/24, 'fd00::10/64']\n      gateway4: 192.168.1.1\n      routes: [{to: 10.9.0.0/16, via: 192.168.1.254, metric: 50}, {to: default, via: 'fd00::1'}]\n      nameservers: {addresses: [1.1.1.1], search: [example.com, lan]}\n";
    let (_d, host) = tz_host();
    let p = plan(b"#cloud-config\n", Some(net), &facts(), &host).unwrap();
    let Action::WriteFile(w) = &p.steps[0].action else {
        panic!("{:?}", p.steps)
    };
    assert_eq!(
        w.path,
        Path::new("/etc/systemd/network/10-ballast-lan.network")
    );
    assert_eq!(
        String::from_utf8(w.content.clone()).unwrap(),
        "# Written by os-agent provision from network.ethernets.lan.\n\
         [Match]\nMACAddress=52:54:00:ab:cd:01\n\n\
         [Network]\nDHCP=no\nAddress=192.168.1.10/24\nAddress=fd00::10/64\nGateway=192.168.1.1\nDNS=1.1.1.1\nDomains=example.com lan\n\n\
         [Route]\nDestination=10.9.0.0/16\nGateway=192.168.1.254\nMetric=50\n\n\
         [Route]\nDestination=::/0\nGateway=fd00::1\n"
    );
    // The bare form (no `network:` wrapper) works too.
    let bare = b"version: 2\nethernets: {eth0: {dhcp4: yes, dhcp6: true}}\n";
    let p = plan(b"#cloud-config\n", Some(bare), &facts(), &host).unwrap();
    let Action::WriteFile(w) = &p.steps[0].action else {
        panic!("{:?}", p.steps)
    };
    let text = String::from_utf8(w.content.clone()).unwrap();
    assert!(
        text.contains("[Match]\nName=eth0\n") && text.contains("DHCP=yes\n"),
        "{text}"
    );
    // A type error in the separate document names it and the line.
    let e = plan(
        b"#cloud-config\n",
        Some(b"version: 2\nethernets:\n  eth0:\n    addresses: 5\n"),
        &facts(),
        &host,
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.starts_with("network-config: ethernets.eth0.addresses: invalid type"),
        "{e}"
    );
    assert!(e.contains("at line 4 column 16"), "{e}");
}

#[test]
fn agent_dropin_contents() {
    let p = plan_of(
        "#cloud-config\nballast:\n  group: web\n  update: {channel_url: \"https://u.example/c\", channel: beta, strategy: fleet-lock, window: {start: \"03:30\", length: 90, days: [sat]}}\n  etcd: {endpoints: [\"https://e:2379\"], prefix: /ballast, ca: \"-----BEGIN C-----\\n-----END C-----\\n\"}\n  containers:\n    - {name: web, image: \"docker.io/nginx:1\", ports: [\"80:80\"], env: {A: \"1\"}}\n",
    )
    .unwrap();
    let w = p
        .steps
        .iter()
        .find_map(|s| match &s.action {
            Action::WriteFile(w) if w.path.ends_with("50-user-data.toml") => Some(w),
            _ => None,
        })
        .unwrap();
    let text = String::from_utf8(w.content.clone()).unwrap();
    let t: toml::Table = text.parse().unwrap();
    assert_eq!(t["group"].as_str(), Some("web"));
    assert_eq!(t["update"]["strategy"].as_str(), Some("fleet-lock"));
    assert_eq!(
        t["update"]["channel_url"].as_str(),
        Some("https://u.example/c")
    );
    assert_eq!(t["update"]["channel"].as_str(), Some("beta"));
    assert_eq!(
        t["update"]["window"]["length_minutes"].as_integer(),
        Some(90)
    );
    assert_eq!(t["update"]["window"]["days"][0].as_str(), Some("sat"));
    assert_eq!(
        t["etcd"]["ca_file"].as_str(),
        Some("/etc/ballast/etcd/ca.pem")
    );
    assert_eq!(t["etcd"]["prefix"].as_str(), Some("/ballast"));
    assert!(
        t["etcd"].get("ca").is_none(),
        "PEM text stays out of the drop-in"
    );
    assert_eq!(
        t["containers"][0]["image"].as_str(),
        Some("docker.io/nginx:1")
    );
    assert_eq!(t["containers"][0]["env"]["A"].as_str(), Some("1"));
}

// Applying.

fn host_tree() -> (tempfile::TempDir, DirHost) {
    let (d, host) = tz_host();
    put(&host, "/proc/cmdline", b"ro");
    put(&host, "/etc/group", b"root:x:0:\nadm:x:4:\nusers:x:100:\n");
    put(&host, "/etc/passwd", b"root:x:0:0:root:/root:/bin/sh\n");
    std::fs::create_dir_all(host.path(Path::new("/etc/sudoers.d"))).unwrap();
    (d, host)
}

fn doc(user_data: &str, meta: Option<&str>) -> UserDataDoc {
    UserDataDoc {
        source: SourceKind::FwCfg,
        user_data: user_data.as_bytes().to_vec(),
        meta_data: meta.map(|m| m.as_bytes().to_vec()),
        network_config: None,
        warnings: Vec::new(),
    }
}

fn t(secs: u64) -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_secs(secs)
}

fn commands(host: &DirHost) -> Vec<String> {
    host.commands().iter().map(|c| c.join(" ")).collect()
}

#[test]
fn applies_files_users_and_units() {
    let (_d, host) = host_tree();
    put(&host, "/var/log/app.log", b"old\n");
    put(
        &host,
        "/root/.ssh/authorized_keys",
        b"ssh-rsa AAAA existing\n",
    );
    let user_data = format!(
        "#cloud-config\nhostname: web1\ntimezone: Europe/Berlin\nssh_authorized_keys: [\"{KEY}\"]\nusers:\n  - name: alice\n    groups: adm\n    ssh_authorized_keys: [\"{KEY}\"]\n    sudo: ALL=(ALL) NOPASSWD:ALL\nwrite_files:\n  - {{path: /etc/motd, content: \"hi\\n\", permissions: '0640'}}\n  - {{path: /var/log/app.log, content: \"new\\n\", append: true}}\n  - {{path: /etc/gz, content: {GZ_B64}, encoding: gz+b64, owner: 'alice:alice', defer: true}}\nballast:\n  units: [{{name: hello.service, content: \"[Service]\\n\", enabled: true}}]\nruncmd: [\"echo done\"]\n"
    );
    let out = run_with(
        &host,
        t(1_700_000_000),
        Ok(Some(doc(&user_data, Some("instance-id: i-1\n")))),
    )
    .unwrap();
    assert_eq!(
        out,
        Outcome::Applied {
            instance_id: "i-1".into()
        }
    );

    assert_eq!(get(&host, "/etc/hostname"), "web1\n");
    assert_eq!(get(&host, "/etc/timezone"), "Europe/Berlin\n");
    assert_eq!(get(&host, "/etc/motd"), "hi\n");
    assert_eq!(get(&host, "/var/log/app.log"), "old\nnew\n");
    assert_eq!(get(&host, "/etc/gz"), "hello gzip\n");
    assert_eq!(
        get(&host, "/root/.ssh/authorized_keys"),
        format!("ssh-rsa AAAA existing\n{KEY}\n")
    );
    assert_eq!(
        get(&host, "/home/alice/.ssh/authorized_keys"),
        format!("{KEY}\n")
    );
    assert_eq!(get(&host, "/etc/sudoers.d/90-ballast-users"), "# Written by os-agent provision from the users' sudo: rules.\nalice ALL=(ALL) NOPASSWD:ALL\n");
    assert_eq!(
        get(&host, "/etc/systemd/system/hello.service"),
        "[Service]\n"
    );

    let cmds = commands(&host);
    for want in [
        "hostname web1",
        "ln -sfn /usr/share/zoneinfo/Europe/Berlin /etc/localtime",
        "chmod 0640 /etc/motd",
        "useradd -m --groups adm alice",
        "usermod --lock alice",
        "chmod 0700 /home/alice/.ssh",
        "chown alice: /home/alice/.ssh /home/alice/.ssh/authorized_keys",
        "chmod 0440 /etc/sudoers.d/90-ballast-users",
        "chown alice:alice /etc/gz",
        "systemctl daemon-reload",
        "systemctl enable hello.service",
        "systemctl start --no-block hello.service",
        "/bin/sh -c echo done",
    ] {
        assert!(cmds.iter().any(|c| c == want), "{want:?} not in {cmds:#?}");
    }
    let pos = |s: &str| cmds.iter().position(|c| c == s).unwrap();
    assert!(pos("useradd -m --groups adm alice") < pos("chown alice:alice /etc/gz"));
    assert!(pos("systemctl daemon-reload") < pos("systemctl enable hello.service"));
    assert_eq!(
        cmds.last().map(String::as_str),
        Some("/bin/sh -c echo done")
    );

    let st = record::status(&host).unwrap();
    let cur = st.current.clone().unwrap();
    assert_eq!(cur.instance_id.as_deref(), Some("i-1"));
    assert_eq!(cur.source.as_deref(), Some("fw_cfg"));
    assert_eq!(cur.result, AttemptResult::Applied);
    assert_eq!(cur.time, "2023-11-14T22:13:20Z");
    assert!(cur.steps.iter().all(|s| s.outcome == StepOutcome::Applied));
    assert_eq!(st.last.as_ref(), Some(&cur));
    let text = record::render(&st);
    assert!(text.contains("  result: applied\n"), "{text}");
    assert!(
        text.contains(" applied hostname: set hostname web1\n"),
        "{text}"
    );
}

#[test]
fn a_failing_step_stops_and_the_record_says_exactly_what_ran() {
    let (_d, host) = host_tree();
    host.set_output(
        "useradd -m bob",
        CmdOutput {
            code: Some(9),
            stdout: String::new(),
            stderr: "useradd: user 'bob' already exists".into(),
        },
    );
    let ud = "#cloud-config\nwrite_files: [{path: /etc/one, content: \"1\"}]\nusers: [{name: bob, lock_passwd: false}]\nruncmd: [\"touch /var/x\"]\n";
    let out = run_with(&host, t(100), Ok(Some(doc(ud, None)))).unwrap();
    let Outcome::Failed { instance_id, error } = &out else {
        panic!("{out:?}")
    };
    assert!(instance_id.starts_with("sha256:"));
    assert!(
        error.contains("useradd -m bob failed: exit code 9: useradd: user 'bob' already exists"),
        "{error}"
    );
    assert!(!out.success());
    assert_eq!(get(&host, "/etc/one"), "1");
    assert!(!commands(&host).iter().any(|c| c.contains("touch")));

    let rec = record::status(&host).unwrap().current.unwrap();
    let outcomes: Vec<(&str, &StepOutcome)> = rec
        .steps
        .iter()
        .map(|s| (s.step.as_str(), &s.outcome))
        .collect();
    assert_eq!(outcomes.len(), 3);
    assert_eq!(
        outcomes[0],
        (
            "write_files[0]: write /etc/one (1 bytes, mode 0644, owner root:root)",
            &StepOutcome::Applied
        )
    );
    assert_eq!(outcomes[1].0, "users[0]: create user bob");
    assert!(
        matches!(outcomes[1].1, StepOutcome::Failed { error } if error.contains("exit code 9"))
    );
    assert_eq!(
        outcomes[2],
        (
            "runcmd[0]: run sh -c \"touch /var/x\" (once)",
            &StepOutcome::Skipped
        )
    );
    assert!(matches!(rec.result, AttemptResult::Failed { .. }));

    // The JSON on disk has the documented shape.
    let file = record::file_name(instance_id);
    let json: serde_json::Value =
        serde_json::from_str(&get(&host, &format!("/var/lib/ballast/provision/{file}"))).unwrap();
    assert_eq!(json["result"], "failed");
    assert_eq!(json["steps"][1]["outcome"], "failed");
    assert_eq!(json["steps"][2]["outcome"], "skipped");
    assert_eq!(json["source"], "fw_cfg");
    let current: serde_json::Value =
        serde_json::from_str(&get(&host, "/var/lib/ballast/provision/current.json")).unwrap();
    assert_eq!(current["instance_id"], instance_id.as_str());

    // A failed instance is not applied again on the next boot.
    let again = run_with(&host, t(200), Ok(Some(doc(ud, None)))).unwrap();
    assert!(
        matches!(again, Outcome::AlreadyApplied { error: None, .. }),
        "{again:?}"
    );
}

#[test]
fn once_per_instance_and_bootcmd_every_boot() {
    let (_d, host) = host_tree();
    let ud = "#cloud-config\nbootcmd: [\"echo boot\"]\nruncmd: [\"echo once\"]\n";
    let count =
        |host: &DirHost, what: &str| commands(host).iter().filter(|c| c.ends_with(what)).count();

    let first = run_with(&host, t(1), Ok(Some(doc(ud, Some("instance-id: a\n"))))).unwrap();
    assert_eq!(
        first,
        Outcome::Applied {
            instance_id: "a".into()
        }
    );
    let second = run_with(&host, t(2), Ok(Some(doc(ud, Some("instance-id: a\n"))))).unwrap();
    assert_eq!(
        second,
        Outcome::AlreadyApplied {
            instance_id: "a".into(),
            error: None
        }
    );
    assert_eq!(
        (count(&host, "echo boot"), count(&host, "echo once")),
        (2, 1)
    );
    let st = record::status(&host).unwrap();
    assert_eq!(
        st.last.as_ref().unwrap().result,
        AttemptResult::AlreadyApplied
    );
    assert_eq!(st.last.as_ref().unwrap().steps.len(), 1);
    assert_eq!(st.current.as_ref().unwrap().time_unix, 1);

    let third = run_with(&host, t(3), Ok(Some(doc(ud, Some("instance-id: b\n"))))).unwrap();
    assert_eq!(
        third,
        Outcome::Applied {
            instance_id: "b".into()
        }
    );
    assert_eq!(
        (count(&host, "echo boot"), count(&host, "echo once")),
        (3, 2)
    );
    assert_eq!(
        record::status(&host)
            .unwrap()
            .current
            .unwrap()
            .instance_id
            .as_deref(),
        Some("b")
    );

    // Without meta-data the id is the data's hash: same data, same instance.
    let fourth = run_with(&host, t(4), Ok(Some(doc(ud, None)))).unwrap();
    let fifth = run_with(&host, t(5), Ok(Some(doc(ud, None)))).unwrap();
    assert!(matches!(fourth, Outcome::Applied { .. }));
    assert!(matches!(fifth, Outcome::AlreadyApplied { .. }));
}

#[test]
fn invalid_documents_and_source_errors_are_recorded_and_change_nothing() {
    let (_d, host) = host_tree();
    let ud = "#cloud-config\nwrite_files: [{path: /etc/a, content: x}]\nusers:\n  - name: a\n    groups: [nope]\n";
    let out = run_with(&host, t(10), Ok(Some(doc(ud, Some("instance-id: bad\n"))))).unwrap();
    let Outcome::Invalid { error, .. } = &out else {
        panic!("{out:?}")
    };
    assert!(error.contains("group \"nope\""), "{error}");
    assert!(commands(&host).is_empty());
    assert!(!host.path(Path::new("/etc/a")).exists());
    let st = record::status(&host).unwrap();
    assert!(st.current.is_none());
    assert!(
        matches!(&st.last.as_ref().unwrap().result, AttemptResult::Invalid { error } if error.contains("nope"))
    );
    // Fixed data under the same id applies: an invalid attempt is not "provisioned".
    let fixed = "#cloud-config\nwrite_files: [{path: /etc/a, content: x}]\n";
    let out = run_with(
        &host,
        t(11),
        Ok(Some(doc(fixed, Some("instance-id: bad\n")))),
    )
    .unwrap();
    assert_eq!(
        out,
        Outcome::Applied {
            instance_id: "bad".into()
        }
    );

    let yaml_err = run_with(
        &host,
        t(12),
        Ok(Some(doc("#cloud-config\nusers: {\n", None))),
    )
    .unwrap();
    let Outcome::Invalid { error, .. } = &yaml_err else {
        panic!("{yaml_err:?}")
    };
    assert!(error.contains("line"), "{error}");

    let src = super::source::SourceError::BadUrl {
        url: "x".into(),
        why: "no scheme".into(),
    };
    let out = run_with(&host, t(13), Err(src)).unwrap();
    assert!(matches!(out, Outcome::SourceError(ref e) if e.contains("no scheme")));
    let st = record::status(&host).unwrap();
    assert!(matches!(
        &st.last.as_ref().unwrap().result,
        AttemptResult::SourceError { .. }
    ));
    assert_eq!(
        st.current.unwrap().instance_id.as_deref(),
        Some("bad"),
        "current is untouched"
    );
    let text = record::render(&record::status(&host).unwrap());
    assert!(text.contains("result: source error:"), "{text}");

    assert_eq!(
        run_with(&host, t(14), Ok(None)).unwrap(),
        Outcome::NoUserData
    );
    let json: serde_json::Value =
        serde_json::from_str(&get(&host, "/var/lib/ballast/provision/last.json")).unwrap();
    assert_eq!(json["result"], "no-user-data");
}

#[test]
fn offline_facts_know_debian_groups() {
    let dir = tempfile::tempdir().unwrap();
    let host = DirHost::new(dir.path()).unwrap();
    put(&host, "/etc/group", b"docker:x:999:\n");
    let f = Facts::offline(&host).unwrap();
    for g in ["sudo", "adm", "systemd-journal", "docker"] {
        assert!(f.groups.contains(g), "{g}");
    }
    assert_eq!(f.sudoers_d, None);
    // Without zoneinfo a time zone cannot be checked: a warning, not an error.
    let p = plan(b"#cloud-config\ntimezone: Europe/Paris\n", None, &f, &host).unwrap();
    assert!(
        p.warnings.iter().any(|w| w.contains("cannot check")),
        "{:?}",
        p.warnings
    );
}

/// Documents built to make the YAML parser's time explode (nesting) are
/// refused before it sees them, naming the line; the same depth spread over
/// the document is fine.
#[test]
fn deeply_nested_documents_are_refused_before_parsing() {
    let nested = |open: &str, n: usize| format!("#cloud-config\nx: {}\n", open.repeat(n));
    for doc in [
        nested("[", 40_000),
        nested("{a: ", 40_000),
        format!("#cloud-config\nx:\n{}y: 1\n", " ".repeat(600)),
    ] {
        let e = steps_of(&doc).unwrap_err();
        assert!(
            e.contains("line 2: nested more than 64 levels deep")
                || e.contains("line 3: indented 600 columns"),
            "{}: {e}",
            &doc[..40]
        );
    }
    // Brackets in quotes and comments do not count.
    let quoted = format!(
        "#cloud-config\nwrite_files: [{{path: /etc/x, content: \"{}\"}}] # {}\n",
        "[".repeat(100),
        "{".repeat(100)
    );
    steps_of(&quoted).unwrap();
    // Many collections side by side are not nesting.
    let flat = format!(
        "#cloud-config\nruncmd: [{}]\n",
        vec!["[\"true\"]"; 1000].join(", ")
    );
    assert_eq!(steps_of(&flat).unwrap().len(), 1000);
}

/// Ids that differ only in characters a file name cannot hold each keep
/// their own record: `i/1` after `i_1` must not make `i_1` new again.
#[test]
fn ids_alike_in_a_file_name_are_separate_instances() {
    let (_d, host) = host_tree();
    let ud = "#cloud-config\nruncmd: [\"echo once\"]\n";
    let once = |host: &DirHost| {
        commands(host)
            .iter()
            .filter(|c| c.ends_with("echo once"))
            .count()
    };
    for (i, id) in ["i_1", "i/1", "i_1", "i/1"].iter().enumerate() {
        let meta = format!("instance-id: \"{id}\"\n");
        let out = run_with(&host, t(i as u64), Ok(Some(doc(ud, Some(&meta))))).unwrap();
        let want_applied = i < 2;
        assert_eq!(
            matches!(out, Outcome::Applied { .. }),
            want_applied,
            "boot {i}, instance {id}: {out:?}"
        );
    }
    assert_eq!(once(&host), 2);
}

/// A host that recorded an instance under the file name records had before
/// (the id with `/` and the like replaced by `_`) does not provision it again.
#[test]
fn records_under_the_old_file_name_still_count() {
    let (_d, host) = host_tree();
    let mut old = record::Attempt::new(t(1), AttemptResult::Applied);
    old.instance_id = Some("web/1".into());
    old.source = Some("fw_cfg".into());
    put(
        &host,
        "/var/lib/ballast/provision/web_1.json",
        &serde_json::to_vec(&old).unwrap(),
    );
    let ud = "#cloud-config\nruncmd: [\"echo once\"]\n";
    let out = run_with(&host, t(2), Ok(Some(doc(ud, Some("instance-id: web/1\n"))))).unwrap();
    assert_eq!(
        out,
        Outcome::AlreadyApplied {
            instance_id: "web/1".into(),
            error: None
        }
    );
    assert!(!commands(&host).iter().any(|c| c.ends_with("echo once")));
    // Another id that shared the old name is a new instance.
    let out = run_with(&host, t(3), Ok(Some(doc(ud, Some("instance-id: web_1\n"))))).unwrap();
    assert!(matches!(out, Outcome::Applied { .. }), "{out:?}");
}

/// A host provisioned from a URL by a version that named the instance by the
/// hash of the data is not provisioned again now that the id is the URL.
#[test]
fn url_instances_recorded_by_their_hash_still_count() {
    let (_d, host) = host_tree();
    let url = "https://config.example/web";
    let ud = "#cloud-config\nruncmd: [\"echo once\"]\n";
    let mut old = record::Attempt::new(t(1), AttemptResult::Applied);
    old.instance_id = Some("sha256:0123".into());
    old.source = Some(format!("url {url}"));
    put(
        &host,
        "/var/lib/ballast/provision/sha256_0123.json",
        &serde_json::to_vec(&old).unwrap(),
    );
    put(
        &host,
        "/var/lib/ballast/provision/current.json",
        br#"{"instance_id": "sha256:0123", "record": "sha256_0123.json"}"#,
    );
    let from = |url: &str| UserDataDoc {
        source: SourceKind::KernelCmdlineUrl(url.into()),
        ..doc(ud, None)
    };
    let out = run_with(&host, t(2), Ok(Some(from(url)))).unwrap();
    assert_eq!(
        out,
        Outcome::AlreadyApplied {
            instance_id: format!("url:{url}"),
            error: None
        }
    );
    assert!(!commands(&host).iter().any(|c| c.ends_with("echo once")));
    // Another URL is another instance.
    let out = run_with(&host, t(3), Ok(Some(from("https://config.example/db")))).unwrap();
    assert!(matches!(out, Outcome::Applied { .. }), "{out:?}");
}

/// `ca_certs.trusted` becomes the agent's extra roots, each entry checked
/// as PEM; `remove_defaults` is refused, not ignored.
#[test]
fn ca_certs_become_the_agents_extra_roots() {
    let certs = tempfile::tempdir().unwrap();
    crate::test_certs::make(certs.path());
    let test_ca = std::fs::read_to_string(certs.path().join("ca.pem")).unwrap();
    let indented: String = test_ca.lines().map(|l| format!("      {l}\n")).collect();
    let doc = format!("#cloud-config\nca_certs:\n  trusted:\n    - |\n{indented}");
    let plan = plan_of(&doc).expect("valid");
    let write = plan
        .steps
        .iter()
        .find_map(|s| match &s.action {
            Action::WriteFile(w) if s.origin == "ca_certs.trusted[0]" => Some(w.clone()),
            _ => None,
        })
        .expect("a write of the certificate");
    assert_eq!(
        write.path,
        Path::new(crate::http::EXTRA_ROOTS_DIR).join("user-data-0.pem")
    );
    assert_eq!(write.mode, 0o644);
    assert_eq!(String::from_utf8_lossy(&write.content), test_ca);

    for (doc, want) in [
        (
            "#cloud-config\nca_certs: {trusted: [\"not a certificate\"]}\n".to_string(),
            "ca_certs.trusted[0]: holds no PEM certificate",
        ),
        (
            "#cloud-config\nca_certs: {trusted: [\"-----BEGIN CERTIFICATE-----\\nAAAA\\n-----END CERTIFICATE-----\\n\"]}\n".to_string(),
            "ca_certs.trusted[0]:",
        ),
        (
            "#cloud-config\nca_certs: {remove_defaults: true}\n".to_string(),
            "ca_certs.remove_defaults: not supported",
        ),
        (
            "#cloud-config\nca_certs: {trusted: [], extra: 1}\n".to_string(),
            "unknown field `extra`",
        ),
    ] {
        let err = plan_of(&doc).expect_err(&doc);
        assert!(err.contains(want), "{doc}: {err}");
    }
}

/// `ntp:` becomes a timesyncd drop-in and a restart; bad names are errors
/// naming the entry.
#[test]
fn ntp_servers_go_to_timesyncd() {
    let steps =
        steps_of("#cloud-config\nntp: {servers: [10.0.0.1, ntp.lan], pools: [pool.ntp.org]}\n")
            .unwrap();
    assert_eq!(steps.len(), 2, "{steps:?}");
    assert!(
        steps[0].starts_with("ntp: write /etc/systemd/timesyncd.conf.d/50-user-data.conf"),
        "{steps:?}"
    );
    assert_eq!(steps[1], "ntp: restart systemd-timesyncd.service");
    let plan =
        plan_of("#cloud-config\nntp: {servers: [10.0.0.1], pools: [pool.ntp.org]}\n").unwrap();
    let Action::WriteFile(w) = &plan.steps[0].action else {
        panic!("{plan:?}")
    };
    assert!(String::from_utf8_lossy(&w.content).contains("\nNTP=10.0.0.1 pool.ntp.org\n"));
    assert!(plan_of("#cloud-config\nntp: {enabled: false}\n")
        .unwrap()
        .steps
        .is_empty());
    for (doc, want) in [
        (
            "#cloud-config\nntp: {servers: [\"a b\"]}\n",
            "ntp.servers[0]: \"a b\" is not a host name",
        ),
        ("#cloud-config\nntp: {pools: [\"x\\ny\"]}\n", "ntp.pools[0]"),
        ("#cloud-config\nntp: {}\n", "ntp: neither servers nor pools"),
        (
            "#cloud-config\nntp: {ntp_client: chrony, servers: [a]}\n",
            "unknown field `ntp_client`",
        ),
    ] {
        let err = plan_of(doc).expect_err(doc);
        assert!(err.contains(want), "{doc}: {err}");
    }
}
