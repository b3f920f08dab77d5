use super::*;
use crate::host::DirHost;
use std::sync::Mutex;

/// Records every call; fails the calls named in `fail` ("start web").
#[derive(Default)]
struct Recorder {
    calls: Mutex<Vec<String>>,
    fail: Vec<String>,
}

impl Recorder {
    fn call(&self, what: &str, unit: &str) -> Result<()> {
        let c = format!("{what} {}", unit::container_of(unit).unwrap_or(unit));
        self.calls.lock().expect("lock").push(c.clone());
        if self.fail.contains(&c) {
            anyhow::bail!("{c} failed");
        }
        Ok(())
    }
    fn calls(&self) -> Vec<String> {
        self.calls.lock().expect("lock").clone()
    }
}

impl UnitManager for Recorder {
    async fn reload(&self) -> Result<()> {
        self.call("reload", "-")
    }
    async fn start(&self, u: &str) -> Result<()> {
        self.call("start", u)
    }
    async fn restart(&self, u: &str) -> Result<()> {
        self.call("restart", u)
    }
    async fn stop(&self, u: &str) -> Result<()> {
        self.call("stop", u)
    }
    async fn enable(&self, u: &str) -> Result<()> {
        self.call("enable", u)
    }
    async fn disable(&self, u: &str) -> Result<()> {
        self.call("disable", u)
    }
    async fn state(&self, u: &str) -> Result<(String, String)> {
        self.call("state", u)?;
        Ok(("active".into(), "running".into()))
    }
}

fn rendered(name: &str) -> Rendered {
    Rendered {
        unit: unit::unit_name(name),
        text: format!("[Unit]\nX-BallastSpec={name}-spec\n"),
        spec: format!("{name}-spec"),
    }
}

#[test]
fn execute_table() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("rt");
    type Case = (
        &'static str,
        Vec<Action>,
        Vec<&'static str>,
        Vec<&'static str>,
        Vec<&'static str>,
    );
    let a = |s: &str| s.to_string();
    // (what, actions, failing calls, want calls, want problems)
    let cases: Vec<Case> = vec![
        ("nothing: not even a reload", vec![], vec![], vec![], vec![]),
        (
            "create, replace, start, remove",
            vec![
                Action::Remove(a("old")),
                Action::Create(a("new")),
                Action::Replace(a("chg")),
                Action::Start(a("idle")),
            ],
            vec![],
            vec![
                "stop old",
                "disable old",
                "reload -",
                "enable new",
                "start new",
                "enable chg",
                "restart chg",
                "start idle",
            ],
            vec![],
        ),
        (
            "a failed stop keeps the unit file and is reported",
            vec![Action::Remove(a("old")), Action::Create(a("new"))],
            vec!["stop old"],
            vec!["stop old", "reload -", "enable new", "start new"],
            vec!["container old: stop old failed"],
        ),
        (
            "a failed start is reported, the rest goes on",
            vec![Action::Create(a("new")), Action::Start(a("idle"))],
            vec!["start new"],
            vec!["reload -", "enable new", "start new", "start idle"],
            vec!["container new: start new failed"],
        ),
        (
            "a failed reload starts nothing",
            vec![Action::Create(a("new"))],
            vec!["reload -"],
            vec!["reload -"],
            vec!["reload - failed"],
        ),
    ];
    for (what, actions, fail, want_calls, want_problems) in cases {
        let dir = tempfile::tempdir().expect("tempdir");
        let host = DirHost::new(dir.path()).expect("host");
        let unit_dir = Path::new(unit::UNIT_DIR);
        for name in ["old", "chg", "idle"] {
            host.write_atomic(&unit_dir.join(unit::unit_name(name)), b"[Unit]\n")
                .expect("write");
        }
        let rendered: BTreeMap<String, Rendered> = ["new", "chg"]
            .iter()
            .map(|n| (n.to_string(), rendered(n)))
            .collect();
        let rec = Recorder {
            fail: fail.iter().map(|s| s.to_string()).collect(),
            ..Recorder::default()
        };
        let problems = rt.block_on(execute(&host, &rec, unit_dir, &actions, &rendered));
        assert_eq!(rec.calls(), want_calls, "{what}");
        assert_eq!(problems.len(), want_problems.len(), "{what}: {problems:?}");
        for (p, w) in problems.iter().zip(&want_problems) {
            assert!(p.contains(w), "{what}: {p:?} does not contain {w:?}");
        }
        let units = current_units(&host, unit_dir).expect("units");
        let removed_ok = !fail.contains(&"stop old");
        if actions.contains(&Action::Remove(a("old"))) {
            assert_eq!(
                !units.contains_key("old"),
                removed_ok,
                "{what}: old unit file"
            );
        }
        if actions.contains(&Action::Create(a("new"))) {
            assert_eq!(
                units.get("new"),
                Some(&Some("new-spec".to_string())),
                "{what}: new unit file"
            );
        }
        if actions.contains(&Action::Replace(a("chg"))) {
            assert_eq!(
                units.get("chg"),
                Some(&Some("chg-spec".to_string())),
                "{what}: rewritten"
            );
        }
    }
}
