use super::*;
use std::os::unix::fs::symlink;

#[test]
fn host_paths_a_container_may_bind() {
    // (host path, Ok(plain form) or Err(part of the reason)), for container "web".
    let cases: &[(&str, Result<&str, &str>)] = &[
        (
            "/var/lib/ballast-volumes/web",
            Ok("/var/lib/ballast-volumes/web"),
        ),
        (
            "/var/lib/ballast-volumes/web/data",
            Ok("/var/lib/ballast-volumes/web/data"),
        ),
        (
            "/var/lib/ballast-volumes/web/a/b",
            Ok("/var/lib/ballast-volumes/web/a/b"),
        ),
        (
            "/var/lib/ballast-volumes/web/",
            Ok("/var/lib/ballast-volumes/web"),
        ),
        (
            "/var/lib//ballast-volumes/./web/x",
            Ok("/var/lib/ballast-volumes/web/x"),
        ),
        // The agent's state: the /etc overlay, the image store, the update state.
        (
            "/var/lib/ballast/etc/upper",
            Err("/var/lib/ballast is the agent's own state"),
        ),
        (
            "/var/lib/ballast/images",
            Err("/var/lib/ballast is the agent's own state"),
        ),
        (
            "/var/lib/ballast/update",
            Err("/var/lib/ballast is the agent's own state"),
        ),
        (
            "/var/lib/ballast",
            Err("/var/lib/ballast is the agent's own state"),
        ),
        ("/var/lib//ballast/etc/upper", Err("the agent's own state")),
        // Names that only start like an allowed one.
        ("/var/lib/ballast-x", Err("the rest of the host")),
        (
            "/var/lib/ballast-volumes-x/web",
            Err("the rest of the host"),
        ),
        (
            "/var/lib/ballast-volumes/webx",
            Err("not this container's data directory"),
        ),
        (
            "/var/lib/ballast-volumes/web-2/data",
            Err("not this container's data directory"),
        ),
        // Another container's directory, and the directory of them all.
        (
            "/var/lib/ballast-volumes/api",
            Err("not this container's data directory"),
        ),
        (
            "/var/lib/ballast-volumes",
            Err("not this container's data directory"),
        ),
        // Climbing out, whatever it would land on.
        ("/var/../etc", Err("contains `..`")),
        ("/var/lib/ballast-volumes/web/../api", Err("contains `..`")),
        (
            "/var/lib/ballast-volumes/web/../../ballast/etc",
            Err("contains `..`"),
        ),
        // nspawn would read `\.\.` as `..`.
        (
            r"/var/lib/ballast-volumes/web/\.\./\.\./ballast/etc",
            Err("contains a backslash"),
        ),
        // The rest of the host.
        ("/var/lib/machines/web", Err("the rest of the host")),
        ("/var/lib/web", Err("the rest of the host")),
        ("/var/log/journal", Err("the rest of the host")),
        ("/etc", Err("the rest of the host")),
        ("/", Err("the rest of the host")),
        (
            "var/lib/ballast-volumes/web",
            Err("is not an absolute path"),
        ),
        ("", Err("is not an absolute path")),
    ];
    for (host, want) in cases {
        let got = check_host_path("web", host);
        match (&got, want) {
            (Ok(p), Ok(w)) => assert_eq!(p, w, "{host}"),
            (Err(e), Err(w)) => {
                assert!(e.contains(w), "{host}: {e}");
                assert!(e.contains(&format!("{host:?}")), "{host}: {e}");
            }
            _ => panic!("{host}: got {got:?}, want {want:?}"),
        }
    }
}

#[test]
fn makes_the_missing_directories() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let base = tmp.path().join("ballast-volumes");
    let made = create(&base, "web", "/var/lib/ballast-volumes/web/data/db").expect("create");
    assert_eq!(made, base.join("web/data/db"));
    assert!(made.is_dir());
    let mode = |p: &Path| std::fs::metadata(p).expect("stat").permissions().mode() & 0o777;
    assert_eq!(
        mode(&base),
        0o700,
        "no host user reaches the containers' data"
    );
    assert_eq!(mode(&base.join("web")), 0o755);
    // Again: everything is there.
    assert_eq!(
        create(&base, "web", "/var/lib/ballast-volumes/web/data/db").expect("again"),
        made
    );
}

#[test]
fn refuses_planted_links_and_files() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let base = tmp.path().join("ballast-volumes");
    let outside = tmp.path().join("agent-state");
    std::fs::create_dir_all(base.join("web/data")).expect("mkdir");
    std::fs::create_dir(&outside).expect("mkdir");
    // What a container could leave in its own volume for its next start.
    symlink(&outside, base.join("web/data/etc")).expect("symlink");
    symlink("../../agent-state", base.join("web/rel")).expect("symlink");
    std::fs::write(base.join("web/file"), "x").expect("write");
    for (host, bad) in [
        ("/var/lib/ballast-volumes/web/data/etc", "web/data/etc"),
        (
            "/var/lib/ballast-volumes/web/data/etc/upper",
            "web/data/etc",
        ),
        ("/var/lib/ballast-volumes/web/rel", "web/rel"),
        ("/var/lib/ballast-volumes/web/file", "web/file"),
        ("/var/lib/ballast-volumes/web/file/x", "web/file"),
    ] {
        let e = create(&base, "web", host).expect_err(host).to_string();
        assert!(
            e.starts_with(&format!("container web: volume {host}: "))
                && e.contains(&base.join(bad).display().to_string()),
            "{host}: {e}"
        );
        assert!(
            e.contains("symbolic link") || e.contains("not a directory"),
            "{host}: {e}"
        );
    }
    assert_eq!(
        std::fs::read_dir(&outside).expect("ls").count(),
        0,
        "nothing was made through a link"
    );
    // A path the spec could not have had is refused here too.
    let e = create(&base, "web", "/var/lib/ballast/etc/upper")
        .expect_err("agent state")
        .to_string();
    assert!(e.contains("the agent's own state"), "{e}");
    // The base itself may not be a link either.
    let linked = tmp.path().join("linked-base");
    symlink(&outside, &linked).expect("symlink");
    let e = create(&linked, "web", "/var/lib/ballast-volumes/web")
        .expect_err("linked base")
        .to_string();
    assert!(e.contains("symbolic link"), "{e}");
}
