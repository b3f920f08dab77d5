//! A failing release, end to end against a real etcd (Debian's
//! /usr/bin/etcd on 127.0.0.1, ports picked at run time): some hosts fail
//! the new version's health check, the group pauses itself at its failure
//! threshold, the other hosts stay on the old version, `osctl fleet status`
//! says why, and an operator's resume with a fixed release completes the
//! rollout. fleet-sim's `failing` mode does the same with thousands of hosts.

#![allow(clippy::unwrap_used)]

mod common;

use os_agent::fleet::server::LocalEtcd;
use os_agent::fleet::sim::{HolderWatch, SimEnd, SimHost, SimParams};
use os_agent::fleet::{admin, connect, Fleet, FleetSettings, Keys};
use std::process::Command;
use std::time::Duration;
use tokio::time::Instant;

const GROUP: &str = "web";
const HOSTS: usize = 8;
/// Hosts 0, 1 and 2 fail the bad release.
const FAILING: usize = 3;
const THRESHOLD: u32 = 2;
const MAX: u32 = 2;

fn machine_id(i: usize) -> String {
    format!("{i:08x}{}", "f".repeat(24))
}

fn params(fails: bool) -> SimParams {
    SimParams {
        reboot: Duration::from_millis(300),
        poll: Duration::from_millis(100),
        fails,
    }
}

fn osctl(etcd: &LocalEtcd, args: &[&str]) -> String {
    let (ok, text) = common::osctl_fleet(etcd, args);
    assert!(ok, "osctl fleet {args:?}: {text}");
    text
}

/// Rolls `hosts` (index, host) towards `target` until `deadline`, each in a task.
fn roll(
    hosts: Vec<(usize, SimHost)>,
    target: &str,
    fails: bool,
    deadline: Instant,
) -> Vec<tokio::task::JoinHandle<(usize, SimHost, SimEnd)>> {
    hosts
        .into_iter()
        .map(|(i, mut h)| {
            let t = target.to_string();
            tokio::spawn(async move {
                let end = h.roll(&t, &params(fails), deadline).await.unwrap();
                (i, h, end)
            })
        })
        .collect()
}

async fn join(
    tasks: Vec<tokio::task::JoinHandle<(usize, SimHost, SimEnd)>>,
) -> Vec<(usize, SimHost, SimEnd)> {
    let mut out = Vec::new();
    for t in tasks {
        out.push(t.await.unwrap());
    }
    out
}

#[tokio::test]
async fn a_failing_release_pauses_the_group_and_a_fixed_one_completes() {
    let dir = tempfile::tempdir().unwrap();
    let etcd = LocalEtcd::start(dir.path(), None).unwrap();
    let s = FleetSettings {
        group: GROUP.into(),
        lease_ttl: Duration::from_secs(2),
        lock_ttl: Duration::from_secs(10),
        ..FleetSettings::new(vec![etcd.endpoint()])
    };
    let keys = Keys::new(&s.prefix);
    let client = connect(&s).await.unwrap();
    admin::modify_policy(&client, &keys, GROUP, |p| {
        p.max_holders = MAX;
        p.failure_threshold = THRESHOLD;
        Ok(())
    })
    .await
    .unwrap();
    let holders = HolderWatch::start(&client, &keys, GROUP).await.unwrap();
    let mut hosts = Vec::new();
    for i in 0..HOSTS {
        let h = SimHost::start(Fleet::new(client.clone(), &s, &machine_id(i)), "1.0");
        tokio::time::timeout(Duration::from_secs(10), h.registration.wait_sessions(1))
            .await
            .expect("host registered");
        hosts.push((i, h));
    }
    let good = hosts.split_off(FAILING);

    // The failing hosts take 2.0 first (one at a time: it is not proven),
    // so the pause comes before any other host could have taken it.
    let failing = roll(hosts, "2.0", true, Instant::now() + Duration::from_secs(20));
    let paused_by = Instant::now() + Duration::from_secs(20);
    loop {
        let o = admin::overview(&client, &keys).await.unwrap();
        if o.groups.iter().any(|g| g.name == GROUP && g.policy.paused) {
            break;
        }
        assert!(Instant::now() < paused_by, "the group never paused: {o:#?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The rest are given 2.0 while paused: none may take it.
    let rest = roll(good, "2.0", false, Instant::now() + Duration::from_secs(2));
    let mut ended = join(rest).await;
    // The third failing host was left waiting too; its deadline ends it.
    ended.extend(join(failing).await);
    ended.sort_by_key(|(i, _, _)| *i);
    let rolled_back: Vec<usize> = ended
        .iter()
        .filter(|(_, _, e)| *e == SimEnd::RolledBack)
        .map(|(i, _, _)| *i)
        .collect();
    assert_eq!(rolled_back.len(), THRESHOLD as usize, "{rolled_back:?}");
    for (i, _, e) in &ended {
        if let SimEnd::GaveUp(why) = e {
            assert!(
                why.contains("paused") && why.contains("threshold 2"),
                "host {i}: {why}"
            );
        }
    }
    assert!(
        ended.iter().all(|(_, h, _)| h.booted_version() == "1.0"),
        "every host stays on 1.0 (the failed ones rolled back)"
    );
    assert_eq!(holders.snapshot().ever.len(), THRESHOLD as usize);

    // What the operator sees.
    let text = osctl(&etcd, &["status"]);
    for want in [
        "group web: paused (2 hosts failed version 2.0 (threshold 2))",
        "failures of 2.0: 2",
        "on 1.0: 8",
    ] {
        assert!(text.contains(want), "{want:?} not in\n{text}");
    }
    let json: serde_json::Value =
        serde_json::from_str(&osctl(&etcd, &["status", "--json"])).unwrap();
    let g = &json["groups"][0];
    assert_eq!(g["policy"]["paused"], true, "{json:#}");
    assert_eq!(g["policy"]["failure_threshold"], THRESHOLD, "{json:#}");
    assert_eq!(
        g["failures"]["2.0"].as_array().unwrap().len(),
        2,
        "{json:#}"
    );
    assert_eq!(g["versions"]["1.0"], HOSTS, "{json:#}");

    // The fixed release reaches the hosts (they stage it and wait, as the
    // group is paused); the operator resumes; every host ends on it.
    let hosts: Vec<(usize, SimHost)> = ended.into_iter().map(|(i, h, _)| (i, h)).collect();
    let fixed = roll(
        hosts,
        "2.1",
        false,
        Instant::now() + Duration::from_secs(30),
    );
    osctl(&etcd, &["resume", GROUP]);
    let ended = join(fixed).await;
    for (i, h, e) in &ended {
        assert_eq!(*e, SimEnd::Updated, "host {i}");
        assert_eq!(h.booted_version(), "2.1", "host {i}");
    }
    let stats = holders.snapshot();
    assert!(
        stats.max_seen <= MAX as usize,
        "{} holders at once",
        stats.max_seen
    );
    let o = admin::overview(&client, &keys).await.unwrap();
    let g = o.groups.iter().find(|g| g.name == GROUP).unwrap();
    assert!(!g.policy.paused);
    assert_eq!(g.versions.get("2.1"), Some(&HOSTS), "{:?}", g.versions);
}

/// `osctl fleet watch` with stdout a pipe prints a line per group each time
/// it changes, as a rollout goes; `status --json` names the slowest holder.
#[tokio::test]
async fn osctl_fleet_watch_follows_a_rollout() {
    use std::io::BufRead;
    let dir = tempfile::tempdir().unwrap();
    let etcd = LocalEtcd::start(dir.path(), None).unwrap();
    let s = FleetSettings {
        group: GROUP.into(),
        lease_ttl: Duration::from_secs(2),
        lock_ttl: Duration::from_secs(10),
        ..FleetSettings::new(vec![etcd.endpoint()])
    };
    let client = connect(&s).await.unwrap();
    let mut hosts = Vec::new();
    for i in 0..3 {
        let h = SimHost::start(Fleet::new(client.clone(), &s, &machine_id(i)), "1.0");
        tokio::time::timeout(Duration::from_secs(10), h.registration.wait_sessions(1))
            .await
            .expect("host registered");
        hosts.push((i, h));
    }
    // A holder that does not reboot: the slowest, in the JSON.
    let stuck = Fleet::new(client.clone(), &s, &machine_id(9));
    assert_eq!(
        stuck.try_acquire("2.0").await.unwrap(),
        os_agent::fleet::lock::Acquire::Granted
    );
    let json: serde_json::Value =
        serde_json::from_str(&osctl(&etcd, &["status", "--json"])).unwrap();
    assert_eq!(
        json["groups"][0]["slowest"][0]["machine_id"],
        machine_id(9),
        "{json:#}"
    );
    stuck
        .release(&os_agent::update::fleet_lock::Released::NeverBooted {
            version: "2.0".into(),
        })
        .await
        .unwrap();

    let mut child = Command::new(common::osctl())
        .args([
            "fleet",
            "--endpoints",
            &etcd.endpoint(),
            "watch",
            "--interval",
            "0.1",
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::inherit())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout).lines() {
            let Ok(line) = line else { return };
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    let rolled = roll(
        hosts,
        "2.0",
        false,
        Instant::now() + Duration::from_secs(30),
    );
    let want = "group web: 3 of 3 hosts on 2.0; 0 of max 1 slots held; failures none; active";
    // Read beside the runtime: the hosts roll on it meanwhile.
    let (found, seen) = tokio::task::spawn_blocking(move || {
        let deadline = std::time::Instant::now() + Duration::from_secs(40);
        let mut seen = Vec::new();
        let found = loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match rx.recv_timeout(left) {
                Ok(line) if line == want => break true,
                Ok(line) => seen.push(line),
                Err(_) => break false,
            }
        };
        (found, seen)
    })
    .await
    .unwrap();
    child.kill().unwrap();
    child.wait().unwrap();
    for (i, _, e) in join(rolled).await {
        assert_eq!(e, SimEnd::Updated, "host {i}");
    }
    assert!(
        found,
        "{want:?} never printed; printed:\n{}",
        seen.join("\n")
    );
    // It printed the rollout on its way, a line per change, not a line per read.
    assert!(
        seen.iter()
            .any(|l| l.contains("hosts on 2.0; 1 of max 1 slots held")),
        "{}",
        seen.join("\n")
    );
    let mut unique = seen.clone();
    unique.dedup();
    assert_eq!(
        unique.len(),
        seen.len(),
        "a line repeated:\n{}",
        seen.join("\n")
    );
}
