use super::*;
use crate::containers::oci::RunConfig;
use crate::containers::reference::Digest;
use crate::containers::spec::RawContainer;
use crate::containers::store::ImageInfo;
use std::path::PathBuf;

fn image(entrypoint: &[&str], cmd: &[&str]) -> Image {
    let d =
        |c: char| Digest::parse(&format!("sha256:{}", c.to_string().repeat(64))).expect("digest");
    Image {
        info: ImageInfo {
            reference: "r.example/app:1".into(),
            manifest: d('a'),
            index: None,
            config_digest: d('b'),
            layers: vec![d('c')],
            config: RunConfig {
                entrypoint: entrypoint.iter().map(|s| s.to_string()).collect(),
                cmd: cmd.iter().map(|s| s.to_string()).collect(),
                env: vec!["PATH=/usr/bin".into(), "MODE=image".into()],
                working_dir: Some("/app".into()),
                user: Some("1000:1000".into()),
            },
        },
        rootfs: PathBuf::from("/var/lib/ballast/images/images/aaaa/rootfs"),
    }
}

fn container(toml_text: &str) -> Container {
    let raw: RawContainer = toml::from_str(&format!(
        "name = \"web\"\nimage = \"r.example/app:1\"\n{toml_text}"
    ))
    .expect("toml");
    raw.validate("test", 0).expect("valid")
}

#[test]
fn argv_table() {
    type Case<'a> = (
        &'a str,
        &'a [&'a str],
        &'a [&'a str],
        Result<Vec<&'a str>, &'a str>,
    );
    let cases: Vec<Case> = vec![
        ("", &["/e"], &["c1", "c2"], Ok(vec!["/e", "c1", "c2"])),
        ("", &[], &["/bin/sh"], Ok(vec!["/bin/sh"])),
        ("args = [\"x\"]", &["/e"], &["c"], Ok(vec!["/e", "x"])),
        ("command = [\"/mine\"]", &["/e"], &["c"], Ok(vec!["/mine"])),
        (
            "command = [\"/mine\"]\nargs = [\"y\"]",
            &["/e"],
            &["c"],
            Ok(vec!["/mine", "y"]),
        ),
        ("args = []", &[], &["c"], Err("nothing to run")),
        (
            "",
            &[],
            &[],
            Err("container web: nothing to run: image r.example/app:1 has no entrypoint or cmd"),
        ),
    ];
    for (extra, ep, cmd, want) in cases {
        let got = argv(&container(extra), &image(ep, cmd)).map_err(|e| e.to_string());
        match (got, want) {
            (Ok(a), Ok(w)) => assert_eq!(a, w, "{extra}"),
            (Err(e), Err(w)) => assert!(e.contains(w), "{extra}: {e}"),
            (got, want) => panic!("{extra}: got {got:?}, want {want:?}"),
        }
    }
}

#[test]
fn quoting() {
    for (arg, want) in [
        ("plain", "\"plain\""),
        ("a b", "\"a b\""),
        ("say \"hi\"", "\"say \\\"hi\\\"\""),
        ("back\\slash", "\"back\\\\slash\""),
        ("100%", "\"100%%\""),
        ("$HOME ${X}", "\"$$HOME $${X}\""),
        ("two\nlines", "\"two\\nlines\""),
        // systemd ends a unit line at CR too.
        ("carriage\rreturn", "\"carriage\\rreturn\""),
        ("tab\tbell\u{7}del\u{7f}", "\"tab\\tbell\\x07del\\x7f\""),
        (";", "\\;"),
        ("a;b", "\"a;b\""),
        ("", "\"\""),
    ] {
        assert_eq!(quote(arg), want, "{arg}");
    }
}

#[test]
fn rendered_unit() {
    let c = container(
        "env = { MODE = \"prod\" }\nvolumes = [\"/var/lib/ballast-volumes/web/conf:/data:ro\", \"/var/lib/ballast-volumes/web/db:/db\"]\nports = [\"8080:80\"]\nmemory = \"64M\"\ncpus = 1.5\nrestart = \"on-failure\"",
    );
    let r = render(&c, &image(&["/e"], &["c"])).expect("render");
    assert_eq!(r.unit, "ballast-container-web.service");
    assert_eq!(container_of(&r.unit), Some("web"));
    assert_eq!(container_of("ssh.service"), None);
    for want in [
        "\"--machine=web\"",
        "\"--keep-unit\"",
        "\"--register=yes\"",
        "\"--as-pid2\"",
        "\"--directory=/var/lib/ballast/images/images/aaaa/rootfs\"",
        "\"--chdir=/app\"",
        "\"--user=1000\"",
        "\"--setenv=MODE=prod\"",
        "\"--setenv=PATH=/usr/bin\"",
        "\"--bind-ro=/var/lib/ballast-volumes/web/conf:/data:idmap\"",
        "\"--bind=/var/lib/ballast-volumes/web/db:/db:idmap\"",
        "\"--private-users=pick\" \"--private-users-ownership=auto\"",
        "\nExecStartPre=/usr/bin/os-agent container-volume web \"/var/lib/ballast-volumes/web/conf\"\n",
        "\nExecStartPre=/usr/bin/os-agent container-volume web \"/var/lib/ballast-volumes/web/db\"\n",
        "\"--network-veth\" \"--port=tcp:8080:80\"",
        "\"--\" \"/e\" \"c\"",
        "\nMemoryMax=67108864\n",
        "\nCPUQuota=150%\n",
        "\nRestart=on-failure\n",
        "\nWantedBy=machines.target\n",
        "X-BallastImage=sha256:aaaa",
    ] {
        assert!(r.text.contains(want), "{want:?} not in:\n{}", r.text);
    }
    assert!(!r.text.contains("MODE=image"), "the container's env wins");
    assert_eq!(
        recorded(&r.text),
        (
            Some(r.spec.clone()),
            Some(format!("sha256:{}", "a".repeat(64)))
        )
    );
    assert_eq!(recorded("[Unit]\nDescription=x\n"), (None, None));

    // Same input, same spec; any change that matters, another spec.
    let again = render(&c, &image(&["/e"], &["c"])).expect("render");
    assert_eq!(again, r);
    let changed = render(
        &container("env = { MODE = \"dev\" }"),
        &image(&["/e"], &["c"]),
    )
    .expect("render");
    assert_ne!(changed.spec, r.spec);
    let mut other_image = image(&["/e"], &["c"]);
    other_image.info.manifest =
        Digest::parse(&format!("sha256:{}", "f".repeat(64))).expect("digest");
    let base = container("");
    assert_ne!(
        render(&base, &image(&["/e"], &["c"])).expect("render").spec,
        render(&base, &other_image).expect("render").spec
    );
    // The host's network only when asked for.
    assert!(render(&base, &image(&["/e"], &["c"]))
        .expect("render")
        .text
        .contains("\"--network-veth\""));
    assert!(
        !render(&container("network = \"host\""), &image(&["/e"], &["c"]))
            .expect("render")
            .text
            .contains("--network-veth")
    );
}

/// Every container runs in a user namespace of its own, whatever else it
/// sets; the image root is never chowned in place: nspawn's `auto` ownership
/// can only fall back to chown through the volatile overlay (whose writes
/// go to a tmpfs), so the two always go together.
#[test]
fn every_unit_runs_in_a_user_namespace_over_an_overlay() {
    let img = image(&["/e"], &["c"]);
    for extra in [
        "",
        "network = \"host\"",
        "user = \"0\"",
        "volumes = [\"/var/lib/ballast-volumes/web:/data\"]",
    ] {
        let text = render(&container(extra), &img).expect("render").text;
        let exec = text
            .lines()
            .find(|l| l.starts_with("ExecStart="))
            .expect("ExecStart=");
        for want in [
            "\"--private-users=pick\"",
            "\"--private-users-ownership=auto\"",
            "\"--volatile=overlay\"",
        ] {
            assert_eq!(exec.matches(want).count(), 1, "{extra}: {want} in {exec}");
        }
        assert!(
            !exec.contains("--bind") || exec.contains(":idmap\""),
            "{extra}: {exec}"
        );
        assert!(!text.contains("/bin/mkdir"), "{extra}: {text}");
    }
}

/// No value, from the container or from the image, can end a unit line
/// (systemd ends one at LF, CR or NUL) and so add a directive of its own.
#[test]
fn no_value_breaks_a_unit_line() {
    let mut img = image(&["/e"], &[]);
    // An image.json written before image configs were checked.
    img.info.config.env = vec!["FROM_IMAGE=x\rExecStartPre=/bin/evil".into()];
    let c = container("env = { FROM_SPEC = \"y\\rExecStartPost=/bin/evil\" }");
    let r = render(&c, &img).expect("render");
    assert!(!r.text.contains('\r'), "{:?}", r.text);
    assert!(
        r.text
            .contains(r#""--setenv=FROM_IMAGE=x\rExecStartPre=/bin/evil""#),
        "{}",
        r.text
    );
    assert!(
        r.text
            .contains(r#""--setenv=FROM_SPEC=y\rExecStartPost=/bin/evil""#),
        "{}",
        r.text
    );
    for l in r.text.lines() {
        assert!(!l.starts_with("ExecStartPre=/bin/evil"), "{l}");
    }

    // A NUL cannot be passed to a program at all: refused, naming the value.
    img.info.config.env = vec!["NUL=a\0b".into()];
    let e = render(&container(""), &img).expect_err("NUL in the image's env");
    assert!(e.to_string().contains("NUL"), "{e}");
}
