use super::*;

fn parse(toml_text: &str) -> Result<Container, Vec<SpecError>> {
    let raw: RawContainer = toml::from_str(toml_text).expect("test TOML parses");
    raw.validate("test.toml", 0)
}

#[test]
fn full_definition() {
    let c = parse(
        r#"
        name = "web"
        image = "127.0.0.1:5000/web:1"
        command = ["/bin/httpd"]
        args = ["-f", "-p", "80"]
        env = { MODE = "prod", _X1 = "" }
        working_dir = "/srv"
        user = "www-data"
        volumes = ["/var/lib/ballast-volumes/web/data:/data", "/var/lib/ballast-volumes/web/logs/:/logs:ro"]
        ports = ["8080:80", "53/udp"]
        restart = "on-failure"
        memory = "256M"
        cpus = 0.5
        enabled = false
        "#,
    )
    .expect("valid");
    assert_eq!(c.name, "web");
    assert_eq!(c.image.registry, "127.0.0.1:5000");
    assert_eq!(c.memory_max, Some(256 << 20));
    assert_eq!(c.cpu_quota_percent, Some(50));
    assert_eq!(c.restart, Restart::OnFailure);
    assert!(!c.enabled);
    assert_eq!(
        c.network,
        Network::Private {
            ports: vec![
                Port {
                    host: 8080,
                    container: 80,
                    udp: false
                },
                Port {
                    host: 53,
                    container: 53,
                    udp: true
                },
            ]
        }
    );
    assert_eq!(
        c.volumes[1],
        Volume {
            host: "/var/lib/ballast-volumes/web/logs".into(),
            container: "/logs".into(),
            read_only: true
        }
    );
}

#[test]
fn defaults() {
    let c = parse("name = \"a\"\nimage = \"r.example/a\"").expect("valid");
    // The host's network only when asked for.
    assert_eq!(c.network, Network::Private { ports: vec![] });
    assert_eq!(c.restart, Restart::Always);
    assert!(c.enabled);
    assert_eq!(
        (c.command, c.args, c.memory_max, c.cpu_quota_percent),
        (None, None, None, None)
    );
}

#[test]
fn bad_input_names_container_and_field() {
    let base = "image = \"r.example/a\"\n";
    let cases: &[(&str, &str)] = &[
        ("image = \"r.example/a\"", "test.toml: container #0: name: missing"),
        ("name = \"Web\"\nimage = \"r.example/a\"", "container Web: name: \"Web\" must be"),
        ("name = \"-a\"\nimage = \"r.example/a\"", "name: \"-a\" must be"),
        ("!name = \"a\"", "container a: image: missing"),
        ("name = \"a\"\nimage = \"R/x\"", "container a: image:"),
        ("name = \"a\"\ncommand = []", "command: is empty"),
        ("name = \"a\"\nenv = { \"1A\" = \"x\" }", "env: \"1A\" is not a variable name"),
        ("name = \"a\"\nenv = { \"A-B\" = \"x\" }", "env: \"A-B\""),
        ("name = \"a\"\nworking_dir = \"srv\"", "working_dir: \"srv\" is not a clean absolute path"),
        ("name = \"a\"\nworking_dir = \"/a/../b\"", "working_dir:"),
        ("name = \"a\"\nuser = \"a b\"", "user: \"a b\" is not a user name"),
        ("name = \"a\"\nvolumes = [\"/etc:/etc\"]", "container a: volumes[0]: \"/etc:/etc\": host path \"/etc\" must be under /var/lib/ballast-volumes/a/"),
        ("name = \"a\"\nvolumes = [\"/var/../etc:/x\"]", "volumes[0]: \"/var/../etc:/x\": host path \"/var/../etc\" contains `..`"),
        ("name = \"a\"\nvolumes = [\"/var/lib/ballast-volumes/a:/\"]", "container path \"/\""),
        ("name = \"a\"\nvolumes = [\"/var/lib/ballast-volumes/a:y\"]", "container path \"y\""),
        ("name = \"a\"\nvolumes = ['/var/lib/ballast-volumes/a:/x/\\.\\./y']", "container path \"/x/\\\\.\\\\./y\""),
        ("name = \"a\"\nvolumes = [\"/var/lib/ballast-volumes/a:/y:rx\"]", "is not HOST:CONTAINER[:ro|rw]"),
        ("name = \"a\"\nvolumes = [\"/var/lib/ballast-volumes/a\"]", "is not HOST:CONTAINER"),
        ("name = \"a\"\nnetwork = \"none\"", "network: \"none\" is not host or private"),
        ("name = \"a\"\nports = [\"0:80\"]", "ports[0]: \"0:80\": \"0\" is not a port number"),
        ("name = \"a\"\nports = [\"80:70000\"]", "ports[0]:"),
        ("name = \"a\"\nports = [\"80/sctp\"]", "protocol must be tcp or udp"),
        ("name = \"a\"\nnetwork = \"host\"\nports = [\"80\"]", "ports: published ports need network = \"private\""),
        ("name = \"a\"\nnetwork = \"bridge\"", "network: \"bridge\" is not host or private"),
        ("name = \"a\"\nrestart = \"sometimes\"", "restart: \"sometimes\""),
        ("name = \"a\"\nmemory = \"12Q\"", "memory: Text(\"12Q\") is not a size"),
        ("name = \"a\"\nmemory = 1000", "memory: 1000 bytes is less than the 1M minimum"),
        ("name = \"a\"\nmemory = \"99999999999T\"", "memory:"),
        ("name = \"a\"\ncpus = 0.0", "cpus: 0 is not between"),
        ("name = \"a\"\ncpus = 2000.0", "cpus: 2000 is not between"),
    ];
    for (text, want) in cases {
        // "!" or an image of its own: no image added.
        let text = match text.strip_prefix('!') {
            Some(t) => t.to_string(),
            None if text.contains("image") => text.to_string(),
            None => format!("{base}{text}"),
        };
        let errs = parse(&text).expect_err(&text);
        let all: Vec<String> = errs.iter().map(ToString::to_string).collect();
        assert!(
            all.iter().any(|e| e.contains(want)),
            "{text}: want {want:?} in {all:?}"
        );
    }
}

#[test]
fn unknown_keys_are_errors() {
    let r: Result<RawContainer, _> = toml::from_str("name = \"a\"\nimage = \"x\"\nmemroy = \"1G\"");
    let e = r.expect_err("unknown key").to_string();
    assert!(e.contains("memroy"), "{e}");
}

/// A volume's host side: only the container's own data directory, never the
/// agent's state (its /etc overlay, update state, image store).
#[test]
fn volume_host_paths_table() {
    let cases: &[(&str, Result<&str, &str>)] = &[
        (
            "/var/lib/ballast-volumes/web/data",
            Ok("/var/lib/ballast-volumes/web/data"),
        ),
        (
            "/var/lib/ballast-volumes/web",
            Ok("/var/lib/ballast-volumes/web"),
        ),
        ("/var/lib/ballast/etc/upper", Err("the agent's own state")),
        ("/var/lib/ballast/images", Err("the agent's own state")),
        ("/var/lib/ballast/update", Err("the agent's own state")),
        ("/var/lib/ballast/containers", Err("the agent's own state")),
        ("/var/../etc", Err("contains `..`")),
        (
            "/var/lib/ballast-x",
            Err("must be under /var/lib/ballast-volumes/web/"),
        ),
        (
            "/var/lib/ballast-volumes/api/data",
            Err("not this container's data directory"),
        ),
        (
            "/var/lib/ballast-volumes/webx",
            Err("not this container's data directory"),
        ),
        (
            "/var/lib/machines/api",
            Err("must be under /var/lib/ballast-volumes/web/"),
        ),
        (
            "/var/lib/web",
            Err("must be under /var/lib/ballast-volumes/web/"),
        ),
    ];
    for (host, want) in cases {
        let text = format!("name = \"web\"\nimage = \"r.example/a\"\nvolumes = [\"{host}:/data\"]");
        match (parse(&text), want) {
            (Ok(c), Ok(w)) => assert_eq!(c.volumes[0].host, *w, "{host}"),
            (Err(errs), Err(w)) => {
                let e = errs[0].to_string();
                assert!(
                    e.starts_with(&format!(
                        "test.toml: container web: volumes[0]: \"{host}:/data\": host path \"{host}\""
                    )) && e.contains(w),
                    "{host}: {e}"
                );
            }
            (got, want) => panic!("{host}: got {got:?}, want {want:?}"),
        }
    }
}

#[test]
fn network_is_private_unless_host_is_asked_for() {
    let net = |extra: &str| {
        parse(&format!("name = \"a\"\nimage = \"r.example/a\"\n{extra}"))
            .expect("valid")
            .network
    };
    assert_eq!(net(""), Network::Private { ports: vec![] });
    assert_eq!(
        net("network = \"private\""),
        Network::Private { ports: vec![] }
    );
    assert_eq!(net("network = \"host\""), Network::Host);
    let p = Port {
        host: 8080,
        container: 80,
        udp: false,
    };
    assert_eq!(
        net("ports = [\"8080:80\"]"),
        Network::Private { ports: vec![p] }
    );
}
