use super::*;
use crate::config::fleet::FleetSettings;
use crate::fleet::server::LocalEtcd;

const PREFIX: &str = "/ballast/containers/hosts/m1/";

fn kv(name: &str, value: &str) -> (String, Vec<u8>) {
    (format!("{PREFIX}{name}"), value.as_bytes().to_vec())
}

#[test]
fn the_key_names_the_container() {
    let cs = parse_layer(
        PREFIX,
        &[
            kv("web", r#"{"image": "registry.lan:5000/web:1", "env": {"A": "1"}}"#),
            kv("db", r#"{"name": "db", "image": "db@sha256:0000000000000000000000000000000000000000000000000000000000000000"}"#),
        ],
    )
    .unwrap();
    let names: Vec<&str> = cs.iter().map(|c| c.name.as_str()).collect();
    assert_eq!(names, ["web", "db"]);
    assert_eq!(cs[0].env.get("A").map(String::as_str), Some("1"));
    assert_eq!(parse_layer(PREFIX, &[]).unwrap(), Vec::<Container>::new());
}

/// Every bad value is named by its key and field; one bad key fails the
/// whole layer (its last good version stays).
#[test]
fn bad_values_name_the_key_and_the_problem() {
    let cases: &[(&str, &str, &str, &str)] = &[
        ("web", "not json", "(value)", "is not JSON"),
        (
            "web",
            r#"["web"]"#,
            "(value)",
            "is an array, not a JSON object",
        ),
        (
            "web",
            r#""web""#,
            "(value)",
            "is a string, not a JSON object",
        ),
        ("web", "null", "(value)", "is null, not a JSON object"),
        (
            "web",
            r#"{"name": "api", "image": "web:1"}"#,
            "name",
            "the key names the container \"web\"",
        ),
        ("web", r#"{"name": 7, "image": "web:1"}"#, "name", "is 7"),
        (
            "web",
            r#"{"image": "web:1", "memmory": "1G"}"#,
            "(value)",
            "unknown field `memmory`",
        ),
        (
            "web",
            r#"{"image": "web:1", "cpus": "two"}"#,
            "(value)",
            "invalid type",
        ),
        ("web", r#"{}"#, "image", ""),
        ("web", r#"{"image": "Not A Reference"}"#, "image", ""),
        ("Web_1", r#"{"image": "web:1"}"#, "name", ""),
        (
            "web",
            r#"{"image": "web:1", "volumes": ["/etc:/etc"]}"#,
            "volumes[0]",
            "under /var/",
        ),
    ];
    for (name, value, field, message) in cases {
        let errors = parse_layer(PREFIX, &[kv("ok", r#"{"image": "ok:1"}"#), kv(name, value)])
            .expect_err(value);
        assert_eq!(errors.len(), 1, "{value}: {errors:?}");
        let e = &errors[0];
        assert_eq!(e.origin, format!("{PREFIX}{name}"), "{value}");
        assert_eq!(e.field, *field, "{value}: {e}");
        assert!(e.message.contains(message), "{value}: {e}");
    }
}

#[test]
fn sources_say_unread_and_invalid_layers_are_not_loaded() {
    let shared = Shared::default();
    let sources = shared.sources();
    let layers: Vec<&str> = sources.iter().map(|s| s.layer()).collect();
    assert_eq!(layers, ["etcd-group", "etcd-host"]);
    assert!(matches!(
        sources[0].load(),
        Err(SourceError::Unavailable(..))
    ));
    let bad = parse_layer(PREFIX, &[kv("web", "{}")]);
    *shared.desired.lock().unwrap() = EtcdDesired {
        group: Layer::Read(Ok(Vec::new())),
        host: Layer::Read(bad),
    };
    let sources = shared.sources();
    assert_eq!(sources[0].load().unwrap(), Vec::<Container>::new());
    assert!(matches!(sources[1].load(), Err(SourceError::Invalid(_))));
}

fn names(layer: &Layer) -> Option<Vec<String>> {
    match layer {
        Layer::Read(Ok(cs)) => Some(cs.iter().map(|c| c.name.clone()).collect()),
        _ => None,
    }
}

type Names = (Option<Vec<String>>, Option<Vec<String>>);

/// The container names of the group's and the host's layer, if read.
fn layer_names(d: &EtcdDesired) -> Names {
    (names(&d.group), names(&d.host))
}

fn names_of(group: &[&str], host: &[&str]) -> Names {
    let owned = |v: &[&str]| Some(v.iter().map(|s| s.to_string()).collect());
    (owned(group), owned(host))
}

/// Waits until the shared layers satisfy `done`; each change may take 10 s.
async fn wait_until(shared: &Shared, done: impl Fn(&EtcdDesired) -> bool) {
    loop {
        let d = shared.desired.lock().unwrap().clone();
        if done(&d) {
            return;
        }
        tokio::time::timeout(Duration::from_secs(10), shared.changed.notified())
            .await
            .unwrap_or_else(|_| panic!("no change from {d:?}"));
    }
}

/// Against a real etcd: the first read, a put and a delete under each
/// prefix wake the loop with the new layers; keys of other hosts and groups
/// are not this host's.
#[test]
fn the_watch_follows_both_prefixes() {
    let etcd_dir = tempfile::tempdir().unwrap();
    let etcd = LocalEtcd::start(etcd_dir.path(), None).unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let settings = FleetSettings {
            group: "web".into(),
            ..FleetSettings::new(vec![etcd.endpoint()])
        };
        let client = crate::fleet::connect(&settings).await.unwrap();
        let fleet = Fleet::new(client.clone(), &settings, "m1");
        let mut c = client;
        // The group's, another group's, another host's.
        for (key, value) in [
            ("/ballast/containers/groups/web/a", r#"{"image": "a:1"}"#),
            ("/ballast/containers/groups/db/x", r#"{"image": "x:1"}"#),
            ("/ballast/containers/hosts/m2/y", r#"{"image": "y:1"}"#),
        ] {
            c.put(key, value, None).await.unwrap();
        }
        let shared = Shared::default();
        let watch = tokio::spawn(watch_desired(fleet, shared.clone()));
        wait_until(&shared, |d| layer_names(d) == names_of(&["a"], &[])).await;
        c.put(
            "/ballast/containers/hosts/m1/b",
            r#"{"image": "b:1"}"#,
            None,
        )
        .await
        .unwrap();
        wait_until(&shared, |d| layer_names(d) == names_of(&["a"], &["b"])).await;
        c.delete("/ballast/containers/groups/web/a", None)
            .await
            .unwrap();
        wait_until(&shared, |d| layer_names(d) == names_of(&[], &["b"])).await;
        c.put("/ballast/containers/hosts/m1/c", "{", None)
            .await
            .unwrap();
        let bad_key = |d: &EtcdDesired| match &d.host {
            Layer::Read(Err(e)) => e[0].to_string().contains("/ballast/containers/hosts/m1/c"),
            _ => false,
        };
        wait_until(&shared, bad_key).await;
        watch.abort();
    });
}
