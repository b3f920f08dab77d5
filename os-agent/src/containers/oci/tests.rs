use super::*;

const D1: &str = "sha256:1111111111111111111111111111111111111111111111111111111111111111";
const D2: &str = "sha256:2222222222222222222222222222222222222222222222222222222222222222";

fn amd64() -> Platform {
    Platform {
        architecture: "amd64".into(),
        os: "linux".into(),
        variant: None,
    }
}

fn manifest_json(extra: &str, layer_type: &str) -> String {
    format!(
        r#"{{"schemaVersion":2{extra},"config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"{D1}","size":10}},"layers":[{{"mediaType":"{layer_type}","digest":"{D2}","size":20}}]}}"#
    )
}

fn index_json(platforms: &[(&str, &str, Option<&str>)]) -> String {
    let entries: Vec<String> = platforms
        .iter()
        .enumerate()
        .map(|(i, (os, arch, variant))| {
            let v = variant.map(|v| format!(r#","variant":"{v}""#)).unwrap_or_default();
            format!(
                r#"{{"mediaType":"{OCI_MANIFEST}","digest":"sha256:{}","size":5,"platform":{{"os":"{os}","architecture":"{arch}"{v}}}}}"#,
                format!("{i}").repeat(64)
            )
        })
        .collect();
    format!(
        r#"{{"schemaVersion":2,"mediaType":"{OCI_INDEX}","manifests":[{}]}}"#,
        entries.join(",")
    )
}

#[test]
fn documents_table() {
    let gz = "application/vnd.oci.image.layer.v1.tar+gzip";
    type Case<'a> = (&'a str, String, Option<&'a str>, Result<&'a str, &'a str>);
    let cases: Vec<Case> = vec![
        ("oci manifest", manifest_json("", gz), None, Ok("manifest")),
        ("by content type", manifest_json("", gz), Some(DOCKER_MANIFEST), Ok("manifest")),
        ("with mediaType", manifest_json(&format!(r#","mediaType":"{OCI_MANIFEST}""#), gz), Some(OCI_MANIFEST), Ok("manifest")),
        ("index", index_json(&[("linux", "amd64", None)]), None, Ok("index")),
        ("not json", "{".into(), None, Err("m is not valid JSON")),
        ("schema 1", r#"{"schemaVersion":1}"#.into(), None, Err("schemaVersion Some(1) is not 2")),
        ("no schema", r#"{"layers":[]}"#.into(), None, Err("schemaVersion None")),
        ("disagrees", manifest_json(&format!(r#","mediaType":"{OCI_MANIFEST}""#), gz), Some(OCI_INDEX), Err("served as")),
        // containers/image writes uncompressed docker layers with this type.
        ("docker plain layer", manifest_json("", "application/vnd.docker.image.rootfs.diff.tar"), Some(DOCKER_MANIFEST), Ok("manifest")),
        ("foreign layer", manifest_json("", "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip"), None, Err("layers[0]: media type")),
        ("no config", r#"{"schemaVersion":2,"layers":[]}"#.into(), None, Err("manifest without config")),
        ("bad digest", manifest_json("", gz).replace(D2, "sha256:xyz"), None, Err("not a sha256 digest")),
        ("negative size", manifest_json("", gz).replace("\"size\":20", "\"size\":-1"), None, Err("not valid JSON")),
        (
            "config not a config",
            manifest_json("", gz).replace("application/vnd.oci.image.config.v1+json", "text/plain"),
            None,
            Err("config media type text/plain"),
        ),
        ("huge config", manifest_json("", gz).replace("\"size\":10", "\"size\":999999999"), None, Err("is more than")),
        ("unknown type", r#"{"schemaVersion":2,"mediaType":"text/html","layers":[]}"#.into(), None, Err("neither a manifest nor an index")),
        ("index with layers", r#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json","manifests":[],"layers":[]}"#.into(), None, Err("an index with config or layers")),
    ];
    for (what, json, ct, want) in cases {
        let got = parse_document(json.as_bytes(), ct, "m");
        match (got, want) {
            (Ok(Document::Manifest(m)), Ok("manifest")) => assert_eq!(m.layers.len(), 1, "{what}"),
            (Ok(Document::Index(_)), Ok("index")) => {}
            (Err(e), Err(w)) => assert!(e.to_string().contains(w), "{what}: {e}"),
            (got, want) => panic!("{what}: got {got:?}, want {want:?}"),
        }
    }
}

#[test]
fn platform_selection() {
    let host = amd64();
    let arm = Platform {
        architecture: "arm64".into(),
        os: "linux".into(),
        variant: Some("v8".into()),
    };
    type Entries<'a> = Vec<(&'a str, &'a str, Option<&'a str>)>;
    let cases: Vec<(Entries, &Platform, Result<usize, &str>)> = vec![
        (
            vec![("linux", "arm64", Some("v8")), ("linux", "amd64", None)],
            &host,
            Ok(1),
        ),
        (vec![("linux", "arm64", None)], &arm, Ok(0)),
        (
            vec![("linux", "arm64", Some("v7"))],
            &arm,
            Err("no image for linux/arm64/v8 (the index has: linux/arm64/v7)"),
        ),
        (
            vec![("windows", "amd64", None), ("linux", "s390x", None)],
            &host,
            Err("the index has: windows/amd64, linux/s390x"),
        ),
        (vec![], &host, Err("no image for linux/amd64")),
    ];
    for (platforms, p, want) in cases {
        let json = index_json(&platforms);
        let Ok(Document::Index(ms)) = parse_document(json.as_bytes(), None, "idx") else {
            panic!("index parses")
        };
        match (select_platform(&ms, p, "idx"), want) {
            (Ok(d), Ok(i)) => assert_eq!(d, &ms[i], "{platforms:?}"),
            (Err(e), Err(w)) => assert!(e.to_string().contains(w), "{platforms:?}: {e}"),
            (got, want) => panic!("{platforms:?}: got {got:?}, want {want:?}"),
        }
    }
}

#[test]
fn configs_table() {
    let cases: Vec<(&str, usize, Result<RunConfig, &str>)> = vec![
        (
            r#"{"architecture":"amd64","os":"linux","config":{"Entrypoint":["/e"],"Cmd":["c"],"Env":["A=1"],"WorkingDir":"/w","User":"u"},"rootfs":{"type":"layers","diff_ids":["sha256:1111111111111111111111111111111111111111111111111111111111111111"]}}"#,
            1,
            Ok(RunConfig {
                entrypoint: vec!["/e".into()],
                cmd: vec!["c".into()],
                env: vec!["A=1".into()],
                working_dir: Some("/w".into()),
                user: Some("u".into()),
            }),
        ),
        (
            r#"{"config":{"WorkingDir":"","User":""}}"#,
            0,
            Ok(RunConfig::default()),
        ),
        (
            r#"{"config":{}}"#,
            1,
            Err("rootfs has 0 diff_ids but the manifest 1 layers"),
        ),
        (
            r#"{"rootfs":{"diff_ids":["sha256:0"]}}"#,
            1,
            Err("rootfs.diff_ids[0]: \"sha256:0\" is not a sha256 digest"),
        ),
        ("{}", 0, Ok(RunConfig::default())),
        (
            r#"{"architecture":"arm64","os":"linux"}"#,
            0,
            Err("image is for linux/arm64, this host is linux/amd64"),
        ),
        (
            r#"{"rootfs":{"diff_ids":["a","b"]}}"#,
            1,
            Err("rootfs has 2 diff_ids but the manifest 1 layers"),
        ),
        (
            r#"{"config":{"Env":["NOEQUALS"]}}"#,
            0,
            Err("config.Env[0]: \"NOEQUALS\" is not NAME=value"),
        ),
        (
            r#"{"config":{"Env":["A=1\r\nExecStartPre=/bin/evil"]}}"#,
            0,
            Err("config.Env[0]: \"A=1\\r\\nExecStartPre=/bin/evil\" has a control character"),
        ),
        (
            r#"{"config":{"Env":["OK=1","A=\r"]}}"#,
            0,
            Err("config.Env[1]"),
        ),
        (
            r#"{"config":{"Env":["1A=x"]}}"#,
            0,
            Err("config.Env[0]: \"1A\" is not a variable name"),
        ),
        (
            r#"{"config":{"Env":["=x"]}}"#,
            0,
            Err("config.Env[0]: \"\" is not a variable name"),
        ),
        (
            r#"{"config":{"Env":["A B=x"]}}"#,
            0,
            Err("is not a variable name"),
        ),
        (
            r#"{"config":{"WorkingDir":"srv"}}"#,
            0,
            Err("config.WorkingDir: \"srv\" is not an absolute path"),
        ),
        (
            r#"{"config":{"WorkingDir":"/srv\r"}}"#,
            0,
            Err("config.WorkingDir: \"/srv\\r\" has a control character"),
        ),
        (
            r#"{"config":{"User":"app\n"}}"#,
            0,
            Err("config.User: \"app\\n\" has a control character"),
        ),
        (
            r#"{"config":{"User":"nobody\u0000"}}"#,
            0,
            Err("config.User"),
        ),
        (
            r#"{"config":{"User":"1000:1000","WorkingDir":"/srv/app/","Env":["PATH=/usr/bin:/bin","lower_case=a=b"]}}"#,
            0,
            Ok(RunConfig {
                env: vec!["PATH=/usr/bin:/bin".into(), "lower_case=a=b".into()],
                working_dir: Some("/srv/app/".into()),
                user: Some("1000:1000".into()),
                ..RunConfig::default()
            }),
        ),
        (
            r#"{"config":{"Cmd":"not a list"}}"#,
            0,
            Err("is not valid JSON"),
        ),
        ("[]", 0, Err("is not valid JSON")),
    ];
    for (json, layers, want) in cases {
        match (parse_config(json.as_bytes(), layers, &amd64(), "cfg"), want) {
            (Ok(c), Ok(w)) => {
                assert_eq!(c.run, w, "{json}");
                assert_eq!(c.diff_ids.len(), layers, "{json}");
            }
            (Err(e), Err(w)) => assert!(e.to_string().contains(w), "{json}: {e}"),
            (got, want) => panic!("{json}: got {got:?}, want {want:?}"),
        }
    }
}
