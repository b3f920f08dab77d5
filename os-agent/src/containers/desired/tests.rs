use super::*;
use crate::host::DirHost;

fn container(name: &str, image: &str) -> Container {
    RawContainer {
        name: Some(name.into()),
        image: Some(image.into()),
        ..RawContainer::default()
    }
    .validate("test", 0)
    .expect("valid")
}

#[test]
fn merge_order_table() {
    // (layers as (layer, [(name, image)]), want [(name, image, layer)])
    type Case = (
        Vec<(&'static str, Vec<(&'static str, &'static str)>)>,
        Vec<(&'static str, &'static str, &'static str)>,
    );
    let cases: Vec<Case> = vec![
        (vec![], vec![]),
        (
            vec![("user-data", vec![("a", "r.example/a:1")])],
            vec![("a", "r.example/a:1", "user-data")],
        ),
        (
            // files beat etcd-host beat etcd-group beat user data, whatever the map order.
            vec![
                ("files", vec![("a", "r.example/a:4")]),
                (
                    "etcd-group",
                    vec![("a", "r.example/a:2"), ("b", "r.example/b:2")],
                ),
                (
                    "etcd-host",
                    vec![("a", "r.example/a:3"), ("b", "r.example/b:3")],
                ),
                (
                    "user-data",
                    vec![("a", "r.example/a:1"), ("c", "r.example/c:1")],
                ),
            ],
            vec![
                ("a", "r.example/a:4", "files"),
                ("b", "r.example/b:3", "etcd-host"),
                ("c", "r.example/c:1", "user-data"),
            ],
        ),
        (
            vec![
                ("etcd-group", vec![("a", "r.example/a:2")]),
                ("etcd-host", vec![]),
            ],
            vec![("a", "r.example/a:2", "etcd-group")],
        ),
        (
            // An unknown layer sorts after the known ones.
            vec![
                ("zzz-new", vec![("a", "r.example/a:9")]),
                ("files", vec![("a", "r.example/a:4")]),
            ],
            vec![("a", "r.example/a:9", "zzz-new")],
        ),
    ];
    for (layers, want) in cases {
        let map: BTreeMap<String, Vec<Container>> = layers
            .iter()
            .map(|(l, cs)| {
                (
                    l.to_string(),
                    cs.iter().map(|(n, i)| container(n, i)).collect(),
                )
            })
            .collect();
        let got: Vec<(String, String, String)> = merge(&map)
            .into_values()
            .map(|d| {
                (
                    d.container.name.clone(),
                    d.container.image.to_string(),
                    d.layer,
                )
            })
            .collect();
        let want: Vec<(String, String, String)> = want
            .iter()
            .map(|(n, i, l)| {
                (
                    n.to_string(),
                    Reference::parse(i).expect("ref").to_string(),
                    l.to_string(),
                )
            })
            .collect();
        assert_eq!(got, want, "{layers:?}");
    }
}

use super::super::reference::Reference;

fn write(host: &DirHost, path: &str, text: &str) {
    let p = host.path(Path::new(path));
    std::fs::create_dir_all(p.parent().expect("parent")).expect("mkdir");
    std::fs::write(p, text).expect("write");
}

#[test]
fn local_sources_and_last_good_layer() {
    let dir = tempfile::tempdir().expect("tempdir");
    let host = DirHost::new(dir.path()).expect("host");
    write(
        &host,
        "/etc/ballast/agent.d/50-user-data.toml",
        "[[containers]]\nname = \"web\"\nimage = \"r.example/web:1\"\n[[containers]]\nname = \"db\"\nimage = \"r.example/db:1\"\n",
    );
    write(
        &host,
        "/etc/ballast/containers.d/web.toml",
        "[[containers]]\nname = \"web\"\nimage = \"r.example/web:2\"\nmemory = \"64M\"\n",
    );
    let files = FilesSource { host: &host };
    let agent = AgentConfigSource { host: &host };
    let sources: [&dyn Source; 2] = [&agent, &files];
    let loaded = load_all(&sources, &SavedLayers::default());
    assert!(loaded.problems.is_empty(), "{:?}", loaded.problems);
    let images: Vec<(String, String)> = loaded
        .desired
        .values()
        .map(|d| (d.container.name.clone(), d.layer.clone()))
        .collect();
    assert_eq!(
        images,
        [
            ("db".into(), "user-data".into()),
            ("web".into(), "files".into())
        ]
    );
    assert_eq!(loaded.desired["web"].container.memory_max, Some(64 << 20));

    let state = Path::new(STATE_FILE);
    loaded.layers.save(&host, state).expect("save");
    let saved = SavedLayers::load(&host, state).expect("load");
    assert_eq!(saved, loaded.layers);

    // A broken file: the files layer's last good version stays, and the
    // problem names the file, container and field.
    write(
        &host,
        "/etc/ballast/containers.d/web.toml",
        "[[containers]]\nname = \"web\"\nimage = \"r.example/web:3\"\nvolumes = [\"/etc:/x\"]\n",
    );
    let loaded = load_all(&sources, &saved);
    assert_eq!(loaded.problems.len(), 1);
    let p = &loaded.problems[0];
    assert!(
        p.contains("source files:")
            && p.contains("web.toml: container web: volumes[0]")
            && p.contains("last good layer is kept"),
        "{p}"
    );
    assert_eq!(
        loaded.desired["web"].container.image.tag.as_deref(),
        Some("2")
    );

    // Not TOML at all.
    write(
        &host,
        "/etc/ballast/containers.d/web.toml",
        "[[containers]\n",
    );
    let loaded = load_all(&sources, &saved);
    assert!(
        loaded.problems[0].contains("containers.d/web.toml"),
        "{:?}",
        loaded.problems
    );

    // Twice in one layer.
    write(
        &host,
        "/etc/ballast/containers.d/web.toml",
        "[[containers]]\nname = \"web\"\nimage = \"r.example/web:3\"\n",
    );
    write(
        &host,
        "/etc/ballast/containers.d/web2.toml",
        "[[containers]]\nname = \"web\"\nimage = \"r.example/web:4\"\n",
    );
    let loaded = load_all(&sources, &saved);
    assert!(
        loaded.problems[0].contains("web2.toml: container web: name: is declared twice"),
        "{:?}",
        loaded.problems
    );

    // A container removed from every layer is gone from the merge.
    std::fs::remove_file(host.path(Path::new("/etc/ballast/containers.d/web.toml"))).expect("rm");
    std::fs::remove_file(host.path(Path::new("/etc/ballast/containers.d/web2.toml"))).expect("rm");
    write(
        &host,
        "/etc/ballast/agent.d/50-user-data.toml",
        "containers = []\n",
    );
    let loaded = load_all(&sources, &saved);
    assert!(loaded.problems.is_empty(), "{:?}", loaded.problems);
    assert!(loaded.desired.is_empty());
}

/// A source standing for etcd: unreachable, or holding `containers`.
struct Remote(&'static str, Option<Vec<Container>>);

impl Source for Remote {
    fn layer(&self) -> &'static str {
        self.0
    }

    fn load(&self) -> Result<Vec<Container>, SourceError> {
        self.1
            .clone()
            .ok_or_else(|| SourceError::Unavailable("etcd".into(), "connection refused".into()))
    }
}

#[test]
fn unreachable_layers_keep_their_saved_version_and_a_gone_source_its_nothing() {
    let saved = SavedLayers {
        layers: [
            (
                "etcd-host".to_string(),
                vec![container("web", "r.example/web:1")],
            ),
            (
                "etcd-group".to_string(),
                vec![container("db", "r.example/db:1")],
            ),
        ]
        .into(),
    };
    // etcd down: both saved layers run.
    let host = Remote("etcd-host", None);
    let group = Remote("etcd-group", None);
    let loaded = load_all(&[&host, &group], &saved);
    assert_eq!(loaded.desired.keys().collect::<Vec<_>>(), ["db", "web"]);
    assert_eq!(loaded.problems.len(), 2, "{:?}", loaded.problems);
    assert!(
        loaded.problems[0].contains("etcd is unavailable: connection refused")
            && loaded.problems[0].contains("its last good layer is kept"),
        "{:?}",
        loaded.problems
    );
    assert_eq!(loaded.layers, saved);
    // etcd back with the host's key deleted.
    let host = Remote("etcd-host", Some(Vec::new()));
    let loaded = load_all(&[&host, &group], &saved);
    assert_eq!(loaded.desired.keys().collect::<Vec<_>>(), ["db"]);
    // The host left the fleet: no etcd sources, so nothing of theirs runs.
    let loaded = load_all(&[], &saved);
    assert!(loaded.desired.is_empty() && loaded.problems.is_empty());
    assert!(loaded.layers.layers.is_empty());
}

#[test]
fn corrupt_saved_state_is_an_error() {
    let dir = tempfile::tempdir().expect("tempdir");
    let host = DirHost::new(dir.path()).expect("host");
    write(&host, STATE_FILE, "{\"layers\": 3}");
    let e = SavedLayers::load(&host, Path::new(STATE_FILE)).expect_err("corrupt");
    assert!(
        format!("{e:#}").contains("desired.json is not valid"),
        "{e:#}"
    );
}
