use super::*;
use crate::config::Settings;
use crate::disk::fixture::write;
use crate::host::{CmdOutput, DirHost};
use crate::mountinfo::tests::HEALTHY;
use std::path::PathBuf;

fn healthy_host() -> (tempfile::TempDir, DirHost) {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "proc/self/mountinfo", HEALTHY);
    write(dir.path(), "run/ballast/status.json", "{}");
    let host = DirHost::new(dir.path()).unwrap();
    (dir, host)
}

fn settings() -> HealthSettings {
    let mut s = Settings::default().health;
    s.status_timeout = Duration::ZERO;
    s
}

fn failures(r: &Report) -> Vec<(String, String)> {
    r.failures()
        .map(|(n, e)| (n.to_string(), e.to_string()))
        .collect()
}

#[test]
fn a_healthy_host_passes_every_check() {
    let (_d, host) = healthy_host();
    let mut s = settings();
    s.required_units = vec!["ssh.service".into()];
    s.commands = vec!["test -d /var/lib".into()];
    s.fail_marker = Some(PathBuf::from("/run/ballast/fail-health"));
    let r = run(&host, &s, Duration::ZERO);
    assert!(r.healthy(), "{r:?}");
    let names: Vec<&str> = r.0.iter().map(|c| c.name.as_str()).collect();
    assert_eq!(
        names,
        vec![
            "root",
            "var",
            "etc",
            "agent",
            "unit ssh.service",
            "command \"test -d /var/lib\"",
            "fail-marker"
        ]
    );
    assert_eq!(
        host.commands(),
        vec![
            vec![
                "systemctl".to_string(),
                "is-active".into(),
                "ssh.service".into()
            ],
            vec![
                "/bin/sh".to_string(),
                "-c".into(),
                "test -d /var/lib".into()
            ],
        ]
    );
}

#[test]
fn each_failure_is_reported_with_its_reason() {
    let (dir, host) = healthy_host();
    write(
        dir.path(),
        "proc/self/mountinfo",
        &HEALTHY.replace("/ / ro,relatime", "/ / rw,relatime"),
    );
    std::fs::remove_file(dir.path().join("run/ballast/status.json")).unwrap();
    write(dir.path(), "run/fail", "");
    host.set_output(
        "systemctl is-active foo.service",
        CmdOutput {
            code: Some(3),
            stdout: "failed\n".into(),
            ..CmdOutput::default()
        },
    );
    host.set_output(
        "/bin/sh -c exit 4",
        CmdOutput {
            code: Some(4),
            stderr: "oops\n".into(),
            ..CmdOutput::default()
        },
    );
    let mut s = settings();
    s.required_units = vec!["foo.service".into(), "bar.service".into()];
    s.commands = vec!["exit 4".into(), "true".into()];
    s.fail_marker = Some(PathBuf::from("/run/fail"));
    let r = run(&host, &s, Duration::ZERO);
    assert!(!r.healthy());
    assert_eq!(
        failures(&r),
        vec![
            ("root".to_string(), "/ is mounted read-write".to_string()),
            (
                "agent".to_string(),
                "/run/ballast/status.json did not appear within 0s (is os-agent.service running?)"
                    .to_string()
            ),
            (
                "unit foo.service".to_string(),
                "foo.service is failed, not active".to_string()
            ),
            (
                "command \"exit 4\"".to_string(),
                "\"exit 4\" failed: exit code 4: oops".to_string()
            ),
            (
                "fail-marker".to_string(),
                "fail marker /run/fail exists".to_string()
            ),
        ]
    );
}

#[test]
fn unreadable_or_garbled_mountinfo_fails_the_mount_checks() {
    let (dir, host) = healthy_host();
    write(dir.path(), "proc/self/mountinfo", "garbage\n");
    let r = run(&host, &settings(), Duration::ZERO);
    assert_eq!(failures(&r).len(), 1);
    assert_eq!(r.0[0].name, "mounts");
    assert!(r.0[0]
        .outcome
        .as_ref()
        .unwrap_err()
        .contains("mountinfo line 1"));

    std::fs::remove_file(dir.path().join("proc/self/mountinfo")).unwrap();
    let r = run(&host, &settings(), Duration::ZERO);
    assert!(r.0[0]
        .outcome
        .as_ref()
        .unwrap_err()
        .starts_with("cannot read /proc/self/mountinfo"));
}

#[test]
fn waits_for_the_status_file_to_appear() {
    let (dir, host) = healthy_host();
    let status = dir.path().join("run/ballast/status.json");
    std::fs::remove_file(&status).unwrap();
    let writer = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(150));
        std::fs::write(status, "{}").unwrap();
    });
    let got = operator::wait_for_file(
        &host,
        Path::new(STATUS_FILE),
        Duration::from_secs(10),
        Duration::from_millis(20),
    );
    writer.join().unwrap();
    assert_eq!(got, Ok("/run/ballast/status.json present".to_string()));
}

#[test]
fn a_failed_check_reboots_only_a_counted_boot_with_somewhere_to_go() {
    let dir = tempfile::tempdir().unwrap();
    let host = crate::host::DirHost::new(dir.path()).unwrap();
    assert!(matches!(after_failure(&host).unwrap(), OnFailure::Stay(_)));
    assert!(host.commands().is_empty());
    let var = dir.path().join(format!(
        "sys/firmware/efi/efivars/LoaderBootCountPath-{}",
        crate::boot::LOADER_GUID
    ));
    std::fs::create_dir_all(var.parent().unwrap()).unwrap();
    let efi = |s: &str| {
        let mut v = vec![6u8, 0, 0, 0];
        for u in s.encode_utf16().chain([0]) {
            v.extend(u.to_le_bytes());
        }
        v
    };
    let reboot = vec![vec![
        "systemctl".to_string(),
        "reboot".into(),
        "--no-block".into(),
    ]];
    // Tries left: reboot.
    std::fs::write(&var, efi("\\EFI\\Linux\\ballast-2.0+1-2.efi")).unwrap();
    assert_eq!(after_failure(&host).unwrap(), OnFailure::Rebooting);
    assert_eq!(host.commands(), reboot);
    // The last try, and nothing to fall back to: stay (no reboot loop).
    std::fs::write(&var, efi("\\EFI\\Linux\\ballast-2.0+0-3.efi")).unwrap();
    write(dir.path(), "efi/EFI/Linux/ballast-2.0+0-3.efi", "");
    let stay = after_failure(&host).unwrap();
    assert!(
        matches!(&stay, OnFailure::Stay(why) if why.contains("no other entry")),
        "{stay:?}"
    );
    assert_eq!(host.commands(), reboot);
    // The last try, with a good entry to fall back to: reboot into it.
    write(dir.path(), "efi/EFI/Linux/ballast-1.0.efi", "");
    assert_eq!(after_failure(&host).unwrap(), OnFailure::Rebooting);
    assert_eq!(host.commands().len(), 2);
}
