//! Reconcile: what the host runs now against what it should run → a list of
//! actions. [`plan`] is pure (tested as a table); [`super::systemd`] carries
//! the actions out over D-Bus.

use std::collections::BTreeMap;

/// A container unit the host has now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Current {
    /// The spec hash recorded in the unit (`None`: not written by us, or edited).
    pub spec: Option<String>,
    /// Whether its service is active (or activating).
    pub active: bool,
}

/// What a desired container needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Want {
    /// Run with this spec hash (the rendered unit's).
    Run { spec: String },
    /// Declared with `enabled = false`: not running, no unit.
    Disabled,
    /// Declared, but its unit cannot be rendered now (image not pullable):
    /// leave whatever runs alone rather than stop a working container.
    Unresolved,
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum Action {
    /// Write the unit, enable and start it.
    Create(String),
    /// Rewrite the unit and restart it: image, command, env, limits or
    /// anything else in the unit changed.
    Replace(String),
    /// The unit is current but not running: start it.
    Start(String),
    /// Stop, disable and delete the unit (the image stays until GC).
    Remove(String),
}

impl Action {
    pub fn container(&self) -> &str {
        match self {
            Action::Create(n) | Action::Replace(n) | Action::Start(n) | Action::Remove(n) => n,
        }
    }
}

/// The actions that turn `current` into `desired`, removals first (they free
/// ports and memory for what comes next), then by container name.
pub fn plan(current: &BTreeMap<String, Current>, desired: &BTreeMap<String, Want>) -> Vec<Action> {
    let mut removals = Vec::new();
    let mut others = Vec::new();
    for name in current.keys() {
        if matches!(desired.get(name), None | Some(Want::Disabled)) {
            removals.push(Action::Remove(name.clone()));
        }
    }
    for (name, want) in desired {
        let Want::Run { spec } = want else { continue };
        match current.get(name) {
            None => others.push(Action::Create(name.clone())),
            Some(c) if c.spec.as_deref() != Some(spec.as_str()) => {
                others.push(Action::Replace(name.clone()))
            }
            Some(c) if !c.active => others.push(Action::Start(name.clone())),
            Some(_) => {}
        }
    }
    removals.extend(others);
    removals
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cur(spec: Option<&str>, active: bool) -> Current {
        Current {
            spec: spec.map(str::to_string),
            active,
        }
    }

    fn run(spec: &str) -> Want {
        Want::Run { spec: spec.into() }
    }

    #[test]
    fn plan_table() {
        type Case = (
            &'static str,
            Vec<(&'static str, Current)>,
            Vec<(&'static str, Want)>,
            Vec<Action>,
        );
        let a = |s: &str| s.to_string();
        let cases: Vec<Case> = vec![
            ("nothing", vec![], vec![], vec![]),
            (
                "new container",
                vec![],
                vec![("web", run("s1"))],
                vec![Action::Create(a("web"))],
            ),
            (
                "unchanged and running",
                vec![("web", cur(Some("s1"), true))],
                vec![("web", run("s1"))],
                vec![],
            ),
            (
                "unchanged, stopped",
                vec![("web", cur(Some("s1"), false))],
                vec![("web", run("s1"))],
                vec![Action::Start(a("web"))],
            ),
            (
                "changed (digest, command, env, limits: all in the spec)",
                vec![("web", cur(Some("s1"), true))],
                vec![("web", run("s2"))],
                vec![Action::Replace(a("web"))],
            ),
            (
                "changed while stopped",
                vec![("web", cur(Some("s1"), false))],
                vec![("web", run("s2"))],
                vec![Action::Replace(a("web"))],
            ),
            (
                "unit without a spec (edited by hand)",
                vec![("web", cur(None, true))],
                vec![("web", run("s1"))],
                vec![Action::Replace(a("web"))],
            ),
            (
                "deleted",
                vec![("web", cur(Some("s1"), true))],
                vec![],
                vec![Action::Remove(a("web"))],
            ),
            (
                "disabled",
                vec![("web", cur(Some("s1"), true))],
                vec![("web", Want::Disabled)],
                vec![Action::Remove(a("web"))],
            ),
            (
                "disabled and absent",
                vec![],
                vec![("web", Want::Disabled)],
                vec![],
            ),
            (
                "unresolved image keeps the running one",
                vec![("web", cur(Some("s1"), true))],
                vec![("web", Want::Unresolved)],
                vec![],
            ),
            (
                "unresolved and absent",
                vec![],
                vec![("web", Want::Unresolved)],
                vec![],
            ),
            (
                "mixed: removals first, then by name",
                vec![
                    ("a", cur(Some("1"), true)),
                    ("b", cur(Some("1"), true)),
                    ("z", cur(Some("1"), true)),
                ],
                vec![("a", run("2")), ("c", run("1")), ("b", run("1"))],
                vec![
                    Action::Remove(a("z")),
                    Action::Replace(a("a")),
                    Action::Create(a("c")),
                ],
            ),
        ];
        for (what, current, desired, want) in cases {
            let current: BTreeMap<String, Current> = current
                .into_iter()
                .map(|(n, c)| (n.to_string(), c))
                .collect();
            let desired: BTreeMap<String, Want> = desired
                .into_iter()
                .map(|(n, w)| (n.to_string(), w))
                .collect();
            assert_eq!(plan(&current, &desired), want, "{what}");
        }
    }
}
