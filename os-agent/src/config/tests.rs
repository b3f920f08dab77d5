use super::*;
use crate::disk::fixture::write;
use crate::host::DirHost;

fn host(files: &[(&str, &str)]) -> (tempfile::TempDir, DirHost) {
    let dir = tempfile::tempdir().unwrap();
    for (path, text) in files {
        write(dir.path(), path.trim_start_matches('/'), text);
    }
    let host = DirHost::new(dir.path()).unwrap();
    (dir, host)
}

fn err(files: &[(&str, &str)]) -> String {
    let (_d, h) = host(files);
    format!("{:#}", load(&h).unwrap_err())
}

#[test]
fn no_files_give_the_defaults() {
    let (_d, h) = host(&[]);
    let l = load(&h).unwrap();
    assert_eq!(l.settings, Settings::default());
    assert!(l.files.is_empty());
    assert_eq!(l.settings.health.status_timeout, Duration::from_secs(60));
}

#[test]
fn later_files_override_earlier_ones() {
    let (_d, h) = host(&[
        (
            "/usr/lib/ballast/agent.toml",
            "[health]\nrequired_units = [\"ssh.service\"]\ncommands = [\"true\"]\nstatus_timeout_secs = 30\n",
        ),
        ("/usr/lib/ballast/agent.d/10-units.toml", "[health]\nrequired_units = [\"a.service\", \"b.socket\"]\n"),
        ("/etc/ballast/agent.d/20-cmds.toml", "[health]\ncommands = []\n"),
        ("/run/ballast/agent.d/30-marker.toml", "[health]\nfail_marker = \"/run/fail\"\n"),
        ("/etc/ballast/agent.d/ignored.conf", "not toml at all ["),
    ]);
    let l = load(&h).unwrap();
    assert_eq!(
        l.files,
        vec![
            PathBuf::from("/usr/lib/ballast/agent.toml"),
            PathBuf::from("/usr/lib/ballast/agent.d/10-units.toml"),
            PathBuf::from("/etc/ballast/agent.d/20-cmds.toml"),
            PathBuf::from("/run/ballast/agent.d/30-marker.toml"),
        ]
    );
    let hs = l.settings.health;
    assert_eq!(hs.required_units, vec!["a.service", "b.socket"]);
    assert!(hs.commands.is_empty());
    assert_eq!(hs.fail_marker, Some(PathBuf::from("/run/fail")));
    assert_eq!(hs.status_timeout, Duration::from_secs(30));
    assert!(l.unknown_keys.is_empty());
}

#[test]
fn same_name_in_a_later_dir_masks_and_order_is_by_name() {
    let (_d, h) = host(&[
        (
            "/usr/lib/ballast/agent.d/50-x.toml",
            "[health]\nstatus_timeout_secs = 1\n",
        ),
        (
            "/etc/ballast/agent.d/50-x.toml",
            "[health]\ncommands = [\"true\"]\n",
        ),
        // By name, 40-y applies before 50-x even though it is in /run.
        (
            "/run/ballast/agent.d/40-y.toml",
            "[health]\nstatus_timeout_secs = 7\ncommands = [\"false\"]\n",
        ),
    ]);
    let l = load(&h).unwrap();
    assert_eq!(
        l.files,
        vec![
            PathBuf::from("/run/ballast/agent.d/40-y.toml"),
            PathBuf::from("/etc/ballast/agent.d/50-x.toml"),
        ]
    );
    // /usr/lib's 50-x (timeout 1) is masked entirely.
    assert_eq!(l.settings.health.status_timeout, Duration::from_secs(7));
    assert_eq!(l.settings.health.commands, vec!["true"]);
}

#[test]
fn unknown_keys_are_reported_with_their_file() {
    let (_d, h) = host(&[
        (
            "/usr/lib/ballast/agent.toml",
            "color = 1\n[health]\nrequired_unit = []\n[updates]\nchannel = \"x\"\n",
        ),
        ("/etc/ballast/agent.d/a.toml", "[health.extra]\nx = 1\n"),
    ]);
    let l = load(&h).unwrap();
    let got: Vec<String> = l.unknown_keys.iter().map(ToString::to_string).collect();
    assert_eq!(
        got,
        vec![
            "/usr/lib/ballast/agent.toml: unknown key \"color\" ignored",
            "/usr/lib/ballast/agent.toml: unknown key \"health.required_unit\" ignored",
            "/usr/lib/ballast/agent.toml: unknown key \"updates\" ignored",
            "/etc/ballast/agent.d/a.toml: unknown key \"health.extra\" ignored",
        ]
    );
    assert_eq!(l.settings, Settings::default());
}

#[test]
fn bad_input_is_an_error_naming_the_file() {
    let main = "/usr/lib/ballast/agent.toml";
    let dropin = "/etc/ballast/agent.d/10-x.toml";
    let cases: &[(&str, &str, &[&str])] = &[
        (
            dropin,
            "[health\n",
            &["invalid TOML in /etc/ballast/agent.d/10-x.toml", "line 1"],
        ),
        (
            main,
            "[health]\ncommands = [\"a\",\n  3]\n",
            &["invalid settings in /usr/lib/ballast/agent.toml"],
        ),
        (
            dropin,
            "[health]\n\nstatus_timeout_secs = \"5\"\n",
            &[
                "invalid settings in /etc/ballast/agent.d/10-x.toml",
                "status_timeout_secs",
            ],
        ),
        (
            dropin,
            "health = 3\n",
            &["invalid settings in /etc/ballast/agent.d/10-x.toml"],
        ),
        (
            dropin,
            "[health]\nstatus_timeout_secs = -1\n",
            &["invalid settings", "10-x.toml"],
        ),
        (
            dropin,
            "[health]\nstatus_timeout_secs = 99999\n",
            &[
                "invalid agent configuration (from /etc/ballast/agent.d/10-x.toml)",
                "99999 is more than 3600",
            ],
        ),
        (
            main,
            "[health]\nrequired_units = [\"ssh\"]\n",
            &["\"ssh\" is not a unit name"],
        ),
        (
            main,
            "[health]\nrequired_units = [\"a b.service\"]\n",
            &["is not a unit name"],
        ),
        (
            main,
            "[health]\ncommands = [\" \"]\n",
            &["a command is empty"],
        ),
        (
            main,
            "[health]\nfail_marker = \"run/x\"\n",
            &["run/x is not an absolute path"],
        ),
    ];
    for (file, text, wants) in cases {
        let e = err(&[(file, text)]);
        for want in *wants {
            assert!(e.contains(want), "{text:?}: {e:?} lacks {want:?}");
        }
    }
}

#[test]
fn the_shipped_default_config_loads_cleanly() {
    let shipped = include_str!("../../../units/ballast/agent.toml");
    let (_d, h) = host(&[("/usr/lib/ballast/agent.toml", shipped)]);
    let l = load(&h).unwrap();
    assert!(l.unknown_keys.is_empty(), "{:?}", l.unknown_keys);
    assert_eq!(l.settings.health.status_timeout, DEFAULT_STATUS_TIMEOUT);
}

#[test]
fn update_section_defaults_and_overrides() {
    let (_d, h) = host(&[]);
    let u = load(&h).unwrap().settings.update;
    assert_eq!(u, UpdateSettings::default());
    assert_eq!(u.channel_url, None);
    assert_eq!(u.channel, "stable");
    assert_eq!(u.interval, Duration::from_secs(3600));
    assert_eq!(u.jitter, Duration::from_secs(300));
    assert_eq!(u.strategy, Strategy::Immediate);

    let (_d, h) = host(&[
        (
            "/usr/lib/ballast/agent.toml",
            "[update]\nchannel_url = \"https://updates.example/ballast/\"\ninterval_secs = 600\n",
        ),
        (
            "/etc/ballast/agent.d/50-window.toml",
            "[update]\nchannel = \"beta\"\nstrategy = \"window\"\n\
             [update.window]\ndays = [\"sat\", \"sunday\"]\nstart = \"03:30\"\n\
             length_minutes = 90\ntimezone = \"+02:00\"\n",
        ),
    ]);
    let u = load(&h).unwrap().settings.update;
    assert_eq!(
        u.channel_url.as_deref(),
        Some("https://updates.example/ballast")
    );
    assert_eq!(u.channel, "beta");
    assert_eq!(u.interval, Duration::from_secs(600));
    let Strategy::Window(w) = u.strategy else {
        panic!("{:?}", u.strategy)
    };
    assert_eq!(w.days, vec![5, 6]);
    assert_eq!(w.start_minute, 210);
    assert_eq!(w.zone.name, "+02:00");

    // Under fleet-lock a window is kept, not ignored.
    let (_d, h) = host(&[(
        "/etc/ballast/agent.d/50-fleet.toml",
        "[update]\nstrategy = \"fleet-lock\"\n[update.window]\ndays = [\"mon\"]\nstart = \"01:00\"\nlength_minutes = 60\n",
    )]);
    let u = load(&h).unwrap().settings.update;
    let Strategy::FleetLock(Some(w)) = u.strategy else {
        panic!("{:?}", u.strategy)
    };
    assert_eq!((w.days, w.start_minute), (vec![0], 60));
    let (_d, h) = host(&[(
        "/etc/ballast/agent.d/50-fleet.toml",
        "[update]\nstrategy = \"fleet-lock\"\n",
    )]);
    assert_eq!(
        load(&h).unwrap().settings.update.strategy,
        Strategy::FleetLock(None)
    );

    // An empty URL in a later drop-in turns updates off again.
    let (_d, h) = host(&[
        (
            "/usr/lib/ballast/agent.toml",
            "[update]\nchannel_url = \"http://x\"\n",
        ),
        (
            "/etc/ballast/agent.d/99-off.toml",
            "[update]\nchannel_url = \"\"\n",
        ),
    ]);
    assert_eq!(load(&h).unwrap().settings.update.channel_url, None);
}

#[test]
fn bad_update_settings_are_named() {
    let cases = [
        ("[update]\nchannel_url = \"ftp://x\"\n", "update.channel_url: \"ftp://x\""),
        ("[update]\ninterval_secs = 10\n", "update.interval_secs: 10 is less than 60"),
        // The daemon adds these to the clock: the largest TOML integer would
        // overflow it.
        (
            "[update]\ninterval_secs = 9223372036854775807\n",
            "update.interval_secs: 9223372036854775807 is more than 2592000",
        ),
        (
            "[update]\njitter_secs = 9223372036854775807\n",
            "update.jitter_secs: 9223372036854775807 is more than 2592000",
        ),
        ("[update]\nchannel = \"../x\"\n", "update.channel"),
        ("[update]\nstrategy = \"sometimes\"\n", "update.strategy: \"sometimes\""),
        ("[update]\nstrategy = \"window\"\n", "update.window.start is required"),
        (
            "[update]\nstrategy = \"window\"\n[update.window]\ndays = [\"mon\"]\nstart = \"2:00\"\nlength_minutes = 60\ntimezone = \"Europe/Nowhere\"\n",
            "update.window.timezone",
        ),
        (
            "[update]\nstrategy = \"window\"\n[update.window]\ndays = [\"noday\"]\nstart = \"2:00\"\nlength_minutes = 60\n",
            "update.window.days",
        ),
    ];
    for (text, want) in cases {
        let e = err(&[("/etc/ballast/agent.d/10.toml", text)]);
        assert!(e.contains(want), "{text}: {e}");
    }
    let (_d, h) = host(&[("/etc/ballast/agent.d/10.toml", "[update]\nchanel = \"x\"\n")]);
    let l = load(&h).unwrap();
    assert_eq!(l.unknown_keys[0].key, "update.chanel");
}

#[test]
fn fleet_section_merges_across_drop_ins() {
    let (_d, h) = host(&[
        (
            "/usr/lib/ballast/agent.toml",
            "group = \"web\"\n[etcd]\nendpoints = [\"http://10.0.0.1:2379\"]\n",
        ),
        (
            "/etc/ballast/agent.d/50-fleet.toml",
            "[etcd]\nlease_ttl_secs = 20\ngroupp = \"typo\"\n",
        ),
    ]);
    let l = load(&h).unwrap();
    let f = l.settings.fleet.unwrap();
    assert_eq!(f.endpoints, ["http://10.0.0.1:2379"]);
    assert_eq!(f.group, "web");
    assert_eq!(f.lease_ttl, Duration::from_secs(20));
    assert_eq!(l.unknown_keys.len(), 1);
    assert_eq!(l.unknown_keys[0].key, "etcd.groupp");
    // A drop-in turns the fleet off with an empty list.
    let (_d, h) = host(&[
        (
            "/usr/lib/ballast/agent.toml",
            "[etcd]\nendpoints = [\"http://h:2379\"]\n",
        ),
        ("/run/ballast/agent.d/off.toml", "[etcd]\nendpoints = []\n"),
    ]);
    assert_eq!(load(&h).unwrap().settings.fleet, None);
    let e = err(&[(
        "/etc/ballast/agent.d/f.toml",
        "[etcd]\nendpoints = [\"etcd:2379\"]\n",
    )]);
    assert!(
        e.contains("/etc/ballast/agent.d/f.toml") && e.contains("etcd.endpoints"),
        "{e}"
    );
}

/// etcd credentials never travel over plain http, and no endpoint is plain
/// http beside https ones; the error names each key with the file that set it.
#[test]
fn etcd_credentials_need_https_and_schemes_do_not_mix() {
    let e = err(&[
        (
            "/usr/lib/ballast/agent.toml",
            "[etcd]\nendpoints = [\"http://10.0.0.1:2379\"]\n",
        ),
        (
            "/etc/ballast/agent.d/50-user-data.toml",
            "[etcd]\nusername = \"host\"\npassword = \"secret\"\n",
        ),
    ]);
    assert!(
        e.contains(
            "etcd.username (in /etc/ballast/agent.d/50-user-data.toml) and \
             etcd.password (in /etc/ballast/agent.d/50-user-data.toml) are set but \
             etcd.endpoints (in /usr/lib/ballast/agent.toml) are plain http://"
        ),
        "{e}"
    );
    assert!(!e.contains("secret"), "{e}");
    let e = err(&[(
        "/etc/ballast/agent.d/f.toml",
        "[etcd]\nendpoints = [\"https://a:2379\", \"http://b:2379\"]\n",
    )]);
    assert!(
        e.contains("etcd.endpoints (in /etc/ballast/agent.d/f.toml): [\"https://a:2379\", \"http://b:2379\"] mixes http:// and https://"),
        "{e}"
    );
    // The same credentials with https endpoints are fine.
    let (_d, h) = host(&[(
        "/etc/ballast/agent.d/f.toml",
        "[etcd]\nendpoints = [\"https://a:2379\"]\nusername = \"u\"\npassword = \"p\"\n",
    )]);
    let f = load(&h).unwrap().settings.fleet.unwrap();
    assert_eq!(f.user, Some(("u".into(), "p".into())));
}
