//! The fleet against a real etcd (Debian's /usr/bin/etcd), started per test
//! on 127.0.0.1 with ports picked at run time and killed at the end.
//! Simulated hosts run as tasks of one runtime; the lock is checked from
//! etcd's own watch stream, not from what the hosts say.

// The helpers below are test code too (clippy only knows #[test] functions).
#![allow(clippy::unwrap_used)]

mod common;

use anyhow::Result;
use os_agent::config::fleet::Tls;
use os_agent::fleet::lock::Acquire;
use os_agent::fleet::server::{LocalEtcd, ServerTls};
use os_agent::fleet::sim::{HolderWatch, SimEnd, SimHost, SimParams};
use os_agent::fleet::view::GroupWatch;
use os_agent::fleet::{admin, connect, Fleet, FleetSettings, Keys};
use os_agent::update::fleet_lock::Released;
use std::time::Duration;
use tokio::time::Instant;

const GROUP: &str = "web";

fn settings(etcd: &LocalEtcd) -> FleetSettings {
    FleetSettings {
        group: GROUP.into(),
        lease_ttl: Duration::from_secs(2),
        lock_ttl: Duration::from_secs(3),
        ..FleetSettings::new(vec![etcd.endpoint()])
    }
}

fn machine_id(i: usize) -> String {
    format!("{i:08x}{}", "0".repeat(24))
}

async fn fleet(s: &FleetSettings, i: usize) -> Fleet {
    let client = connect(s).await.unwrap();
    Fleet::new(client, s, &machine_id(i))
}

fn params() -> SimParams {
    SimParams {
        reboot: Duration::from_millis(300),
        poll: Duration::from_millis(100),
        fails: false,
    }
}

/// Runs `hosts` towards `target`, each in its own task; returns them with their ends.
async fn roll_all(
    hosts: Vec<SimHost>,
    target: &str,
    p: &SimParams,
    within: Duration,
) -> Vec<(SimHost, SimEnd)> {
    let deadline = Instant::now() + within;
    let tasks: Vec<_> = hosts
        .into_iter()
        .map(|mut h| {
            let (t, p) = (target.to_string(), p.clone());
            tokio::spawn(async move {
                let end = h.roll(&t, &p, deadline).await.unwrap();
                (h, end)
            })
        })
        .collect();
    let mut out = Vec::new();
    for t in tasks {
        out.push(t.await.unwrap());
    }
    out
}

async fn start_hosts(s: &FleetSettings, n: usize, version: &str) -> Vec<SimHost> {
    let client = connect(s).await.unwrap();
    let hosts: Vec<SimHost> = (0..n)
        .map(|i| SimHost::start(Fleet::new(client.clone(), s, &machine_id(i)), version))
        .collect();
    for h in &hosts {
        tokio::time::timeout(Duration::from_secs(10), h.registration.wait_sessions(1))
            .await
            .expect("host registered");
    }
    hosts
}

async fn set_policy(s: &FleetSettings, f: impl Fn(&mut os_agent::fleet::model::Policy)) {
    let client = connect(s).await.unwrap();
    admin::modify_policy(&client, &Keys::new(&s.prefix), GROUP, |p| {
        f(p);
        Ok(())
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn fifty_hosts_never_more_than_three_holders() {
    let dir = tempfile::tempdir().unwrap();
    let etcd = LocalEtcd::start(dir.path(), None).unwrap();
    let s = settings(&etcd);
    set_policy(&s, |p| p.max_holders = 3).await;
    let client = connect(&s).await.unwrap();
    let keys = Keys::new(&s.prefix);
    let watch = HolderWatch::start(&client, &keys, GROUP).await.unwrap();
    // Half of them wait for a slot on a watched view of the group, as the
    // agent does, half poll.
    let view = GroupWatch::start(client.clone(), keys.clone(), GROUP.into());
    let hosts: Vec<SimHost> = start_hosts(&s, 50, "1.0")
        .await
        .into_iter()
        .enumerate()
        .map(|(i, h)| if i % 2 == 0 { h.with_view(&view) } else { h })
        .collect();
    let started = Instant::now();
    let ended = roll_all(hosts, "2.0", &params(), Duration::from_secs(60)).await;
    let took = started.elapsed();
    for (h, end) in &ended {
        assert_eq!(*end, SimEnd::Updated, "{}", h.fleet.machine_id);
        assert_eq!(h.booted_version(), "2.0");
        assert_eq!(h.reboots, 1);
    }
    // Let the watch see the last release.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let stats = watch.snapshot();
    assert!(!watch.is_finished(), "the holder watch stopped");
    assert!(stats.max_seen <= 3, "{} holders at once", stats.max_seen);
    // The semaphore was shared, not handed out one at a time.
    assert!(
        stats.max_seen >= 2,
        "never more than {} holder",
        stats.max_seen
    );
    assert_eq!(stats.ever.len(), 50, "every host held the lock once");
    assert!(
        stats.current.is_empty(),
        "left holding: {:?}",
        stats.current
    );
    // etcd's view: every host registered on 2.0, 2.0 proven in the group.
    let o = admin::overview(&client, &keys).await.unwrap();
    assert!(o.problems.is_empty(), "{:?}", o.problems);
    assert_eq!(o.hosts.len(), 50);
    assert!(o.hosts.iter().all(|h| h.booted_version == "2.0"));
    let g = o.groups.iter().find(|g| g.name == GROUP).unwrap();
    assert_eq!(g.proven, ["2.0"]);
    // 1 alone (safe mode), then 49 three at a time: 17 rounds of 0.3 s.
    eprintln!("50 hosts rolled out in {took:?}");
    assert!(took < Duration::from_secs(30), "{took:?}");
}

/// Waiting hosts queue on their registration leases and take the slots in
/// the queue's order; the queue is empty when the rollout is done. The
/// hosts' own rounds are 20 s apart, so only the queue can wake them.
#[tokio::test]
async fn waiting_hosts_take_slots_in_queue_order() {
    use etcd_client::{EventType, WatchOptions};
    const MAX: usize = 2;
    let dir = tempfile::tempdir().unwrap();
    let etcd = LocalEtcd::start(dir.path(), None).unwrap();
    let s = settings(&etcd);
    set_policy(&s, |p| p.max_holders = MAX as u32).await;
    let keys = Keys::new(&s.prefix);
    let mut client = connect(&s).await.unwrap();
    let (_w, mut stream) = client
        .watch(keys.group(GROUP), Some(WatchOptions::new().with_prefix()))
        .await
        .unwrap();
    // (queue create revision, lease) and holder create revision per host.
    let seen = tokio::spawn(async move {
        let mut queued = std::collections::BTreeMap::new();
        let mut took = std::collections::BTreeMap::new();
        while let Ok(Some(resp)) = stream.message().await {
            for ev in resp.events() {
                let kv = ev.kv().unwrap();
                let key = kv.key_str().unwrap().to_string();
                let Some(m) = key.rsplit('/').next().map(str::to_string) else {
                    continue;
                };
                if ev.event_type() != EventType::Put {
                    continue;
                }
                if key.contains("/queue/") {
                    queued
                        .entry(m)
                        .or_insert((kv.create_revision(), kv.lease()));
                } else if key.contains("/lock/holders/") {
                    took.insert(m, kv.create_revision());
                }
            }
            if took.len() == 12 {
                break;
            }
        }
        (queued, took)
    });
    let hosts = start_hosts(&s, 12, "1.0").await;
    prove(&hosts[0].fleet, "2.0").await;
    let view = GroupWatch::start(client.clone(), keys.clone(), GROUP.into());
    let leases: std::collections::BTreeMap<String, i64> = hosts
        .iter()
        .map(|h| {
            (
                h.fleet.machine_id.clone(),
                h.registration.registered().lease.unwrap(),
            )
        })
        .collect();
    let hosts: Vec<SimHost> = hosts.into_iter().map(|h| h.with_view(&view)).collect();
    let p = SimParams {
        poll: Duration::from_secs(20),
        ..params()
    };
    let ended = roll_all(hosts, "2.0", &p, Duration::from_secs(60)).await;
    assert!(ended.iter().all(|(_, e)| *e == SimEnd::Updated));
    let (queued, took) = tokio::time::timeout(Duration::from_secs(10), seen)
        .await
        .unwrap()
        .unwrap();
    // The first MAX took their slots at once; the rest queued, each on its
    // own registration lease.
    assert_eq!(queued.len(), 12 - MAX, "{queued:?}");
    for (m, (_, lease)) in &queued {
        assert_eq!(*lease, leases[m], "{m} queued on its registration lease");
    }
    let mut order: Vec<(&i64, &String)> = queued.iter().map(|(m, (rev, _))| (rev, m)).collect();
    order.sort();
    // Slots freed together go to the first MAX of the queue in any order;
    // nobody overtakes a host MAX places ahead of it.
    for (i, (_, a)) in order.iter().enumerate() {
        for (_, b) in order.iter().skip(i + MAX) {
            assert!(
                took[*a] < took[*b],
                "{b} took a slot before {a}, queued {MAX} or more before it"
            );
        }
    }
    // A take left the queue in its own transaction.
    let left = client
        .get(
            keys.queue(GROUP),
            Some(etcd_client::GetOptions::new().with_prefix()),
        )
        .await
        .unwrap();
    assert_eq!(left.kvs().len(), 0);
}

#[tokio::test]
async fn safe_mode_first_host_takes_a_new_version_alone() {
    let dir = tempfile::tempdir().unwrap();
    let etcd = LocalEtcd::start(dir.path(), None).unwrap();
    let s = settings(&etcd);
    set_policy(&s, |p| p.max_holders = 5).await;
    let (a, b) = (fleet(&s, 1).await, fleet(&s, 2).await);
    assert_eq!(a.try_acquire("2.0").await.unwrap(), Acquire::Granted);
    let Acquire::Wait(why) = b.try_acquire("2.0").await.unwrap() else {
        panic!("a second host took an unproven version")
    };
    assert!(why.contains("safe mode"), "{why}");
    a.release(&Released::Blessed {
        version: "2.0".into(),
    })
    .await
    .unwrap();
    let c = fleet(&s, 3).await;
    assert_eq!(b.try_acquire("2.0").await.unwrap(), Acquire::Granted);
    assert_eq!(c.try_acquire("2.0").await.unwrap(), Acquire::Granted);
    // Taking a slot already held is granted again (across the reboot).
    assert_eq!(b.try_acquire("2.0").await.unwrap(), Acquire::Granted);
}

/// The slot keys in etcd: (slot number, machine id), in slot order.
async fn slots_held(f: &Fleet) -> Vec<(u32, String)> {
    let prefix = f.keys.slots(GROUP);
    let resp = f
        .client
        .clone()
        .get(
            prefix.as_str(),
            Some(etcd_client::GetOptions::new().with_prefix()),
        )
        .await
        .unwrap();
    let mut out: Vec<(u32, String)> = resp
        .kvs()
        .iter()
        .map(|kv| {
            let key = kv.key_str().unwrap();
            let n = key.strip_prefix(&prefix).unwrap().parse().unwrap();
            (n, kv.value_str().unwrap().to_string())
        })
        .collect();
    out.sort();
    out
}

async fn prove(f: &Fleet, version: &str) {
    let mut c = f.client.clone();
    c.put(f.keys.proven(GROUP, version), "test", None)
        .await
        .unwrap();
}

fn waits(a: Acquire, why: &str) {
    match a {
        Acquire::Wait(w) => assert!(w.contains(why), "waits because {w:?}, not {why:?}"),
        Acquire::Granted => panic!("granted, expected to wait because {why:?}"),
    }
}

#[tokio::test]
async fn a_lowered_max_admits_nobody_until_the_holders_above_it_release() {
    let dir = tempfile::tempdir().unwrap();
    let etcd = LocalEtcd::start(dir.path(), None).unwrap();
    // Holders must not expire during the test.
    let s = FleetSettings {
        lock_ttl: Duration::from_secs(600),
        ..settings(&etcd)
    };
    set_policy(&s, |p| p.max_holders = 5).await;
    let mut hosts = Vec::new();
    for i in 0..8 {
        hosts.push(fleet(&s, i).await);
    }
    prove(&hosts[0], "2.0").await;
    for h in &hosts[..5] {
        assert_eq!(h.try_acquire("2.0").await.unwrap(), Acquire::Granted);
    }
    assert_eq!(
        slots_held(&hosts[0])
            .await
            .iter()
            .map(|s| s.0)
            .collect::<Vec<_>>(),
        [0, 1, 2, 3, 4]
    );
    set_policy(&s, |p| p.max_holders = 2).await;
    waits(hosts[5].try_acquire("2.0").await.unwrap(), "5 of 2");
    let by_id = |id: &str| hosts.iter().find(|h| h.machine_id == id).unwrap();
    let release = |h: &Fleet| {
        let h = h.clone();
        async move {
            h.release(&Released::Blessed {
                version: "2.0".into(),
            })
            .await
            .unwrap()
        }
    };
    // Free slots 0, 1 and 2: two holders left, both above the new maximum.
    for (_, id) in slots_held(&hosts[0]).await.into_iter().take(3) {
        release(by_id(&id)).await;
    }
    waits(hosts[5].try_acquire("2.0").await.unwrap(), "2 of 2");
    let left = slots_held(&hosts[0]).await;
    assert_eq!(left.iter().map(|s| s.0).collect::<Vec<_>>(), [3, 4]);
    release(by_id(&left[0].1)).await;
    // One holder, below the maximum in number, but in slot 4.
    waits(
        hosts[5].try_acquire("2.0").await.unwrap(),
        "1 hosts hold slots above the maximum of 2",
    );
    release(by_id(&left[1].1)).await;
    assert_eq!(hosts[5].try_acquire("2.0").await.unwrap(), Acquire::Granted);
    assert_eq!(hosts[6].try_acquire("2.0").await.unwrap(), Acquire::Granted);
    waits(hosts[7].try_acquire("2.0").await.unwrap(), "2 of 2");
    let now = slots_held(&hosts[0]).await;
    assert_eq!(now.iter().map(|s| s.0).collect::<Vec<_>>(), [0, 1]);
    // A released host comes back as the holder of nothing.
    let o = admin::overview(&hosts[0].client, &Keys::new(&s.prefix))
        .await
        .unwrap();
    let g = o.groups.iter().find(|g| g.name == GROUP).unwrap();
    let mut holders: Vec<&str> = g.holders.iter().map(|h| h.machine_id.as_str()).collect();
    holders.sort();
    let mut expected = [hosts[5].machine_id.as_str(), hosts[6].machine_id.as_str()];
    expected.sort();
    assert_eq!(holders, expected);
}

#[tokio::test]
async fn concurrent_takers_never_exceed_max() {
    let dir = tempfile::tempdir().unwrap();
    let etcd = LocalEtcd::start(dir.path(), None).unwrap();
    let s = FleetSettings {
        lock_ttl: Duration::from_secs(600),
        ..settings(&etcd)
    };
    set_policy(&s, |p| p.max_holders = 4).await;
    let client = connect(&s).await.unwrap();
    let keys = Keys::new(&s.prefix);
    let watch = HolderWatch::start(&client, &keys, GROUP).await.unwrap();
    // Four connections, ten hosts each, all asking at once.
    let mut hosts = Vec::new();
    for c in 0..4 {
        let client = connect(&s).await.unwrap();
        for i in 0..10 {
            hosts.push(Fleet::new(client.clone(), &s, &machine_id(c * 10 + i)));
        }
    }
    prove(&hosts[0], "2.0").await;
    let mut done = std::collections::BTreeSet::new();
    for round in 0..30 {
        // Everyone not done asks at once; the holders of the last round
        // release at the same time.
        let tasks: Vec<_> = hosts
            .iter()
            .filter(|h| !done.contains(&h.machine_id))
            .cloned()
            .map(|h| {
                tokio::spawn(async move {
                    let holding = h.lock_state("2.0").await.unwrap().holding;
                    if holding {
                        h.release(&Released::Blessed {
                            version: "2.0".into(),
                        })
                        .await
                        .unwrap();
                        return (h.machine_id.clone(), true);
                    }
                    h.try_acquire("2.0").await.unwrap();
                    (h.machine_id.clone(), false)
                })
            })
            .collect();
        for t in tasks {
            let (id, released) = t.await.unwrap();
            if released {
                done.insert(id);
            }
        }
        let held = slots_held(&hosts[0]).await;
        assert!(held.len() <= 4, "round {round}: {held:?}");
        assert!(held.iter().all(|(n, _)| *n < 4), "round {round}: {held:?}");
        if done.len() == hosts.len() {
            break;
        }
    }
    assert_eq!(
        done.len(),
        hosts.len(),
        "every host got a slot and released it"
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    let stats = watch.snapshot();
    assert!(stats.max_seen <= 4, "{} holders at once", stats.max_seen);
    assert_eq!(stats.ever.len(), 40);
}

#[tokio::test]
async fn a_dead_holder_is_released_by_its_lease() {
    let dir = tempfile::tempdir().unwrap();
    let etcd = LocalEtcd::start(dir.path(), None).unwrap();
    let s = settings(&etcd);
    let keys = Keys::new(&s.prefix);
    let dead = SimHost::start(fleet(&s, 1).await, "1.0");
    dead.registration.wait_sessions(1).await;
    assert_eq!(
        dead.fleet.try_acquire("2.0").await.unwrap(),
        Acquire::Granted
    );
    // It goes down and never comes back.
    dead.registration.stop();
    let other = fleet(&s, 2).await;
    assert!(matches!(
        other.try_acquire("2.0").await.unwrap(),
        Acquire::Wait(_)
    ));
    let started = Instant::now();
    loop {
        if other.try_acquire("2.0").await.unwrap() == Acquire::Granted {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "the dead holder kept its slot"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Lock TTL 3 s: not much earlier, not much later.
    let freed = started.elapsed();
    assert!(
        freed >= Duration::from_millis(1500),
        "freed after {freed:?}"
    );
    // Its registration went with its own (shorter) lease.
    let o = admin::overview(&other.client, &keys).await.unwrap();
    assert!(o.hosts.is_empty(), "{:?}", o.hosts);
}

#[tokio::test]
async fn a_paused_group_starts_no_reboots_until_resumed() {
    let dir = tempfile::tempdir().unwrap();
    let etcd = LocalEtcd::start(dir.path(), None).unwrap();
    let s = settings(&etcd);
    let client = connect(&s).await.unwrap();
    let keys = Keys::new(&s.prefix);
    admin::set_max(&client, &keys, GROUP, 3).await.unwrap();
    admin::pause(&client, &keys, GROUP).await.unwrap();
    let watch = HolderWatch::start(&client, &keys, GROUP).await.unwrap();
    let hosts = start_hosts(&s, 5, "1.0").await;
    let ended = roll_all(hosts, "2.0", &params(), Duration::from_secs(2)).await;
    for (h, end) in &ended {
        let SimEnd::GaveUp(why) = end else {
            panic!("{} rebooted in a paused group: {end:?}", h.fleet.machine_id)
        };
        assert!(why.contains("paused"), "{why}");
        assert_eq!(h.reboots, 0);
    }
    assert!(watch.snapshot().ever.is_empty());
    admin::resume(&client, &keys, GROUP).await.unwrap();
    let hosts = ended.into_iter().map(|(h, _)| h).collect();
    let ended = roll_all(hosts, "2.0", &params(), Duration::from_secs(20)).await;
    assert!(
        ended.iter().all(|(_, e)| *e == SimEnd::Updated),
        "{ended:?}",
        ended = ended.iter().map(|(_, e)| e).collect::<Vec<_>>()
    );
}

#[tokio::test]
async fn a_pinned_version_is_respected() {
    let dir = tempfile::tempdir().unwrap();
    let etcd = LocalEtcd::start(dir.path(), None).unwrap();
    let s = settings(&etcd);
    let client = connect(&s).await.unwrap();
    let keys = Keys::new(&s.prefix);
    admin::pin(&client, &keys, GROUP, Some("2.0"))
        .await
        .unwrap();
    let hosts = start_hosts(&s, 3, "1.0").await;
    let ended = roll_all(hosts, "3.0", &params(), Duration::from_secs(1)).await;
    for (h, end) in &ended {
        assert!(
            matches!(end, SimEnd::GaveUp(w) if w.contains("pinned to 2.0")),
            "{end:?}"
        );
        assert_eq!(h.booted_version(), "1.0");
    }
    let hosts = ended.into_iter().map(|(h, _)| h).collect();
    let ended = roll_all(hosts, "2.0", &params(), Duration::from_secs(20)).await;
    for (h, end) in &ended {
        assert_eq!(*end, SimEnd::Updated);
        assert_eq!(h.booted_version(), "2.0");
    }
}

#[tokio::test]
async fn failure_reports_pause_the_group_at_the_threshold() {
    let dir = tempfile::tempdir().unwrap();
    let etcd = LocalEtcd::start(dir.path(), None).unwrap();
    let s = settings(&etcd);
    let client = connect(&s).await.unwrap();
    let keys = Keys::new(&s.prefix);
    set_policy(&s, |p| {
        p.max_holders = 4;
        p.failure_threshold = 2;
    })
    .await;
    let failing = SimParams {
        fails: true,
        ..params()
    };
    let hosts = start_hosts(&s, 6, "1.0").await;
    let ended = roll_all(hosts, "2.0", &failing, Duration::from_secs(5)).await;
    let ends: Vec<&SimEnd> = ended.iter().map(|(_, e)| e).collect();
    // Safe mode lets one host try at a time; the second failure pauses.
    let rolled_back = ends.iter().filter(|e| ***e == SimEnd::RolledBack).count();
    assert_eq!(rolled_back, 2, "{ends:?}");
    for e in &ends {
        if let SimEnd::GaveUp(why) = e {
            assert!(why.contains("2 hosts failed version 2.0"), "{why}");
        }
    }
    let o = admin::overview(&client, &keys).await.unwrap();
    let g = o.groups.iter().find(|g| g.name == GROUP).unwrap();
    assert!(g.policy.paused);
    assert_eq!(g.failures["2.0"].len(), 2);
    assert!(g.proven.is_empty());
    assert!(o.hosts.iter().all(|h| h.booted_version == "1.0"));
}

#[tokio::test]
async fn hosts_survive_an_etcd_restart_and_never_reboot_without_the_lock() {
    let dir = tempfile::tempdir().unwrap();
    let mut etcd = LocalEtcd::start(dir.path(), None).unwrap();
    let s = settings(&etcd);
    let keys = Keys::new(&s.prefix);
    set_policy(&s, |p| p.max_holders = 3).await;
    let hosts = start_hosts(&s, 5, "1.0").await;
    etcd.stop().unwrap();
    // While etcd is away the hosts try to roll: errors, no reboot.
    let ended = roll_all(hosts, "2.0", &params(), Duration::from_secs(3)).await;
    for (h, end) in &ended {
        assert!(matches!(end, SimEnd::GaveUp(_)), "{end:?}");
        assert_eq!(h.reboots, 0);
        assert!(
            h.registration.registered().lease.is_none(),
            "still registered with etcd down"
        );
    }
    etcd.restart().unwrap();
    for (h, _) in &ended {
        tokio::time::timeout(Duration::from_secs(20), h.registration.wait_sessions(1))
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "{} is not registered again:\n{}",
                    h.fleet.machine_id,
                    etcd.log_tail()
                )
            });
        // etcd kept the lease across its restart (a leader renews every
        // lease when it takes over): the host renewed it rather than
        // registering a second time.
        assert_eq!(h.registration.registered().sessions, 1);
    }
    let client = connect(&s).await.unwrap();
    let o = admin::overview(&client, &keys).await.unwrap();
    assert_eq!(o.hosts.len(), 5, "{:?}", o.hosts);
    let hosts = ended.into_iter().map(|(h, _)| h).collect();
    let ended = roll_all(hosts, "2.0", &params(), Duration::from_secs(20)).await;
    assert!(ended
        .iter()
        .all(|(h, e)| *e == SimEnd::Updated && h.reboots == 1));
}

#[tokio::test]
async fn tls_with_client_certificates() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let certs = dir.path().join("certs");
    std::fs::create_dir(&certs)?;
    os_agent::test_certs::make(&certs);
    let etcd = LocalEtcd::start(
        dir.path(),
        Some(ServerTls {
            ca: certs.join("ca.pem"),
            cert: certs.join("server.pem"),
            key: certs.join("server.key"),
        }),
    )?;
    let with_cert = FleetSettings {
        tls: Some(Tls {
            ca_file: Some(certs.join("ca.pem")),
            client: Some((certs.join("client.pem"), certs.join("client.key"))),
        }),
        ..settings(&etcd)
    };
    let f = fleet(&with_cert, 7).await;
    let h = SimHost::start(f.clone(), "1.0");
    tokio::time::timeout(Duration::from_secs(10), h.registration.wait_sessions(1)).await?;
    let o = admin::overview(&f.client, &f.keys).await?;
    assert_eq!(o.hosts.len(), 1);
    assert_eq!(f.try_acquire("2.0").await?, Acquire::Granted);

    // The same CA but no client certificate: refused.
    let without = FleetSettings {
        tls: Some(Tls {
            ca_file: Some(certs.join("ca.pem")),
            client: None,
        }),
        ..settings(&etcd)
    };
    let refused = match connect(&without).await {
        Err(e) => format!("{e:#}"),
        Ok(c) => match admin::overview(&c, &f.keys).await {
            Err(e) => format!("{e:#}"),
            Ok(o) => panic!("etcd answered a client without a certificate: {o:?}"),
        },
    };
    eprintln!("refused without a certificate: {refused}");
    // And plain HTTP to the TLS port gets nowhere either.
    let plain = FleetSettings::new(vec![format!("http://127.0.0.1:{}", etcd.client_port)]);
    if let Ok(c) = connect(&plain).await {
        assert!(admin::overview(&c, &f.keys).await.is_err());
    }
    Ok(())
}

fn osctl(etcd: &LocalEtcd, args: &[&str]) -> (bool, String) {
    common::osctl_fleet(etcd, args)
}

#[tokio::test]
async fn osctl_fleet_reads_and_changes_the_fleet() {
    let dir = tempfile::tempdir().unwrap();
    let etcd = LocalEtcd::start(dir.path(), None).unwrap();
    let s = settings(&etcd);
    let hosts = start_hosts(&s, 2, "1.0").await;
    let f = &hosts[0].fleet;
    let ok = |args: &[&str]| {
        let (ok, text) = osctl(&etcd, args);
        assert!(ok, "osctl fleet {args:?}: {text}");
        text
    };
    assert!(ok(&["set-max", GROUP, "4"]).contains("\"max_holders\":4"));
    assert!(ok(&["pin", GROUP, "2.0"]).contains("\"pinned_version\":\"2.0\""));
    assert!(ok(&["pause", GROUP]).contains("\"paused\":true"));
    assert_eq!(f.policy().await.unwrap().max_holders, 4);
    assert!(
        matches!(f.try_acquire("2.0").await.unwrap(), Acquire::Wait(w) if w.contains("paused"))
    );
    ok(&["resume", GROUP]);
    assert!(!ok(&["pin", GROUP, "--none"]).contains("pinned_version"));
    assert_eq!(f.try_acquire("2.0").await.unwrap(), Acquire::Granted);
    let text = ok(&["status"]);
    assert!(
        text.contains("group web: active; 1 of max 4 reboot slots held"),
        "{text}"
    );
    assert!(
        text.contains(&format!("holder {} -> 2.0", f.machine_id)),
        "{text}"
    );
    let json: serde_json::Value = serde_json::from_str(&ok(&["status", "--json"])).unwrap();
    assert_eq!(json["hosts"].as_array().unwrap().len(), 2);
    ok(&["unlock", GROUP, &f.machine_id]);
    assert_eq!(slots_held(f).await, Vec::<(u32, String)>::new());
    let (failed, text) = osctl(&etcd, &["unlock", GROUP, &f.machine_id]);
    assert!(!failed && text.contains("holds no reboot slot"), "{text}");
    // An operator's bad JSON: the CLI names the key; the host refuses to reboot on it.
    let mut c = f.client.clone();
    c.put(f.keys.policy(GROUP), "{\"max\": 3}", None)
        .await
        .unwrap();
    let (failed, text) = osctl(&etcd, &["pause", GROUP]);
    assert!(
        !failed && text.contains("/ballast/groups/web/policy: invalid group policy"),
        "{text}"
    );
    assert!(ok(&["status"]).contains("problem: /ballast/groups/web/policy"));
    let e = format!("{:#}", f.try_acquire("2.0").await.unwrap_err());
    assert!(e.contains("unknown field `max`"), "{e}");
}
