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
        volumes = ["/var/lib/web:/data", "/var/log/web:/logs:ro"]
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
            host: "/var/log/web".into(),
            container: "/logs".into(),
            read_only: true
        }
    );
}

#[test]
fn defaults() {
    let c = parse("name = \"a\"\nimage = \"r.example/a\"").expect("valid");
    assert_eq!(c.network, Network::Host);
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
        ("name = \"a\"\nvolumes = [\"/etc:/etc\"]", "volumes[0]: \"/etc:/etc\": host path \"/etc\" must be a clean absolute path under /var/"),
        ("name = \"a\"\nvolumes = [\"/var/../etc:/x\"]", "volumes[0]:"),
        ("name = \"a\"\nvolumes = [\"/var/x:/\"]", "container path \"/\""),
        ("name = \"a\"\nvolumes = [\"/var/x:y\"]", "container path \"y\""),
        ("name = \"a\"\nvolumes = [\"/var/x:/y:rx\"]", "is not HOST:CONTAINER[:ro|rw]"),
        ("name = \"a\"\nvolumes = [\"/var/x\"]", "is not HOST:CONTAINER"),
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
