//! The fleet against a real three-member etcd cluster (Debian's
//! /usr/bin/etcd, [`LocalCluster`]) under faults: the leader killed during
//! a rollout, a member paused (SIGSTOP) for longer than a lease TTL, a
//! member restarted on its data, quorum lost and regained.
//!
//! Each test rolls simulated hosts, each with its own client over all three
//! endpoints (as the agent connects), from 1.0 to 2.0 while the fault
//! happens, and checks from outside the hosts:
//! - an independent client watching the holder keys never sees more than
//!   `max_holders` holders at once (the watch resumes from its last revision
//!   when its member fails, so it misses no event);
//! - every host ends on 2.0, rebooted once, registered once (one lease for
//!   the boot, however its members fared);
//! - a host that took a slot and is gone loses it once its lease runs out;
//! - the group's policy and its failure reports survive.

// The helpers below are test code too (clippy only knows #[test] functions).
#![allow(clippy::unwrap_used)]

use os_agent::fleet::lock::Acquire;
use os_agent::fleet::members::Members;
use os_agent::fleet::model::Policy;
use os_agent::fleet::server::LocalCluster;
use os_agent::fleet::sim::{HolderWatch, SimEnd, SimHost, SimParams};
use os_agent::fleet::{admin, connect, Fleet, FleetSettings, Keys};
use std::future::Future;
use std::time::Duration;
use tokio::time::Instant;

const GROUP: &str = "web";
const HOSTS: usize = 6;
/// Hosts already on 2.0, registered through every fault: their streams are
/// spread over the members at random, so some are on the member that fails.
const BYSTANDERS: usize = 8;
const MAX_HOLDERS: u32 = 2;
/// Short, so faults outlast them, but long enough that a renewal has room
/// for a few retries (a quarter of the 4 s margin each: 1 s).
const LEASE_TTL: Duration = Duration::from_secs(8);
const LOCK_TTL: Duration = Duration::from_secs(8);
/// A version that failed on one host before the tests: its report must
/// survive every fault.
const FAILED: &str = "1.5";

fn settings(cluster: &LocalCluster) -> FleetSettings {
    FleetSettings {
        group: GROUP.into(),
        lease_ttl: LEASE_TTL,
        lock_ttl: LOCK_TTL,
        ..FleetSettings::new(cluster.endpoints())
    }
}

fn machine_id(i: usize) -> String {
    format!("{i:08x}{}", "c".repeat(24))
}

/// Reboots long enough that the rollout (six hosts through one free slot
/// while the gone host holds the other) outlasts the faults.
fn params() -> SimParams {
    SimParams {
        reboot: Duration::from_millis(1500),
        poll: Duration::from_millis(100),
        fails: false,
    }
}

/// A host as the agent connects: its own client over every endpoint, with
/// failover between the members.
async fn fleet(s: &FleetSettings, i: usize) -> Fleet {
    let client = connect(s).await.unwrap();
    let members = Members::start(&client, s).await.unwrap();
    assert!(members.is_some(), "three endpoints, and no failover");
    Fleet::new(client, s, &machine_id(i)).with_members(members.as_ref())
}

/// The agent's logs, on stdout, at the level `RUST_LOG` asks for (only
/// errors without it): `RUST_LOG=os_agent=info` shows what the hosts did.
fn logs() {
    let filter = tracing_subscriber::EnvFilter::from_default_env();
    // Each test of the binary tries; the first one sets it.
    if tracing_subscriber::fmt()
        .with_env_filter(filter)
        .try_init()
        .is_err()
    {
        tracing::debug!("the log subscriber is set already");
    }
}

/// Polls `cond` every 50 ms until it holds; fails with `what` after `within`.
async fn wait_until<F, Fut>(within: Duration, what: &str, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + within;
    while !cond().await {
        assert!(Instant::now() < deadline, "{what} (waited {within:?})");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `f`'s answer to a request for a slot for 2.0, asked again while it is
/// an error (the client may pick a member that is still catching up).
async fn ask(f: &Fleet) -> Acquire {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match f.try_acquire("2.0").await {
            Ok(a) => return a,
            Err(e) if Instant::now() < deadline => {
                eprintln!("{}: {e:#}; asking again", f.machine_id);
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("{}: {e:#}", f.machine_id),
        }
    }
}

/// What every test starts from and checks at its end.
struct Rollout {
    cluster: LocalCluster,
    s: FleetSettings,
    watch: HolderWatch,
    /// The host records as an independent client sees them: on which
    /// leases each host registered.
    registrations: HolderWatch,
    policy: Policy,
    /// A host that took a slot and went away for good: its slot must be
    /// freed by its lease.
    gone: SimHost,
    bystanders: Vec<SimHost>,
    rolling: tokio::task::JoinHandle<Vec<(SimHost, SimEnd)>>,
}

/// The machine ids holding a slot key; `None` if the read failed (on a
/// member that is dying, say).
async fn slot_owners(f: &Fleet) -> Option<Vec<String>> {
    let resp = f
        .client
        .clone()
        .get(
            f.keys.slots(GROUP),
            Some(etcd_client::GetOptions::new().with_prefix()),
        )
        .await;
    let r = resp.ok()?;
    Some(
        r.kvs()
            .iter()
            .map(|kv| kv.value_str().unwrap().to_string())
            .collect(),
    )
}

/// Starts a cluster, writes the policy and an old failure report, starts
/// the holder watch, lets one host take a slot and vanish, and starts the
/// rollout of the others; returns once it is under way (hosts beyond the
/// gone one hold slots).
async fn start(dir: &std::path::Path) -> Rollout {
    logs();
    let cluster = tokio::task::block_in_place(|| LocalCluster::start(dir)).unwrap();
    let s = settings(&cluster);
    let admin_client = connect(&s).await.unwrap();
    let keys = Keys::new(&s.prefix);
    admin::modify_policy(&admin_client, &keys, GROUP, |p| {
        p.max_holders = MAX_HOLDERS;
        p.failure_threshold = 5;
        Ok(())
    })
    .await
    .unwrap();
    let policy = fleet(&s, 90).await.policy().await.unwrap();
    // A canary proved 2.0, so the rollout goes `MAX_HOLDERS` wide; another
    // host failed 1.5 earlier.
    let mut c = admin_client.clone();
    c.put(keys.proven(GROUP, "2.0"), "canary", None)
        .await
        .unwrap();
    fleet(&s, 91)
        .await
        .report_failure(FAILED, "fell back to 1.4")
        .await
        .unwrap();
    // An independent client: not one of the hosts', no failover helper.
    let outside = connect(&s).await.unwrap();
    let watch = HolderWatch::start(&outside, &keys, GROUP).await.unwrap();
    let registrations = HolderWatch::registrations(&outside, &keys).await.unwrap();

    let gone = SimHost::start(fleet(&s, 99).await, "1.0");
    gone.registration.wait_sessions(1).await;
    assert_eq!(
        gone.fleet.try_acquire("2.0").await.unwrap(),
        Acquire::Granted
    );
    // It goes down for good, holding its slot.
    gone.registration.stop();

    let mut hosts = Vec::new();
    for i in 0..HOSTS {
        hosts.push(SimHost::start(fleet(&s, i).await, "1.0"));
    }
    let mut bystanders = Vec::new();
    for i in HOSTS..HOSTS + BYSTANDERS {
        bystanders.push(SimHost::start(fleet(&s, i).await, "2.0"));
    }
    for h in hosts.iter().chain(&bystanders) {
        tokio::time::timeout(Duration::from_secs(20), h.registration.wait_sessions(1))
            .await
            .expect("host registered");
    }
    let deadline = Instant::now() + Duration::from_secs(100);
    let tasks: Vec<_> = hosts
        .into_iter()
        .map(|mut h| {
            tokio::spawn(async move {
                let end = h.roll("2.0", &params(), deadline).await.unwrap();
                (h, end)
            })
        })
        .collect();
    let rolling = tokio::spawn(async move {
        let mut out = Vec::new();
        for t in tasks {
            out.push(t.await.unwrap());
        }
        out
    });
    let under_way = || async { watch.snapshot().ever.len() >= 2 };
    wait_until(Duration::from_secs(20), "no host took a slot", under_way).await;
    Rollout {
        cluster,
        s,
        watch,
        registrations,
        policy,
        gone,
        bystanders,
        rolling,
    }
}

impl Rollout {
    /// Waits for the rollout to end and checks everything the header
    /// lists. `faults_over`: when the last fault ended (a new leader
    /// renews every lease, so the gone host's slot lives on up to a lock
    /// TTL from then).
    async fn check(self, faults_over: Instant) {
        let Rollout {
            cluster,
            s,
            watch,
            registrations,
            policy,
            gone,
            bystanders,
            rolling,
        } = self;
        let ended = rolling.await.unwrap();
        let client = connect(&s).await.unwrap();
        let keys = Keys::new(&s.prefix);
        for (h, end) in &ended {
            let id = &h.fleet.machine_id;
            assert_eq!(*end, SimEnd::Updated, "{id}\n{}", cluster.log_tails());
            assert_eq!(h.reboots, 1, "{id}");
            assert_eq!(h.booted_version(), "2.0", "{id}");
        }
        // Registered once per boot: the hosts kept their leases through the
        // fault rather than registering again. From etcd's side: each host's
        // record was written on two leases, one per boot.
        for h in ended.iter().map(|(h, _)| h).chain(&bystanders) {
            tokio::time::timeout(Duration::from_secs(20), h.registration.wait_sessions(1))
                .await
                .unwrap_or_else(|_| panic!("{} is not registered", h.fleet.machine_id));
            let r = h.registration.registered();
            assert_eq!(r.sessions, 1, "{} registered again", h.fleet.machine_id);
        }
        let leases = |i: usize| {
            let key = keys.host(&machine_id(i));
            registrations
                .snapshot()
                .leases
                .get(&key)
                .map_or(0, |l| l.len())
        };
        wait_until(
            Duration::from_secs(30),
            "the registration watch did not see every host's second boot",
            || async { (0..HOSTS).all(|i| leases(i) >= 2) },
        )
        .await;
        for i in 0..HOSTS {
            assert_eq!(
                leases(i),
                2,
                "host {i} registered on more leases than it booted"
            );
        }
        for i in HOSTS..HOSTS + BYSTANDERS {
            assert_eq!(leases(i), 1, "host {i} registered again without a reboot");
        }
        assert_eq!(leases(99), 1, "the gone host registered again");

        // The gone host's slot, holder key and record go with their leases.
        let f = fleet(&s, 92).await;
        let gone_id = gone.fleet.machine_id.clone();
        let freed_by = faults_over + LOCK_TTL + Duration::from_secs(5);
        wait_until(
            freed_by.saturating_duration_since(Instant::now()),
            "the gone host still holds its slot after its lease ran out",
            || async { slot_owners(&f).await.is_some_and(|o| !o.contains(&gone_id)) },
        )
        .await;
        // Reads on a client that may pick a dead member: asked again.
        let done = |o: &admin::Overview| {
            o.groups
                .iter()
                .any(|g| g.name == GROUP && g.holders.is_empty())
                && o.hosts.len() == HOSTS + BYSTANDERS
                && o.hosts.iter().all(|h| h.booted_version == "2.0")
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        let o = loop {
            if let Ok(o) = admin::overview(&client, &keys).await {
                if done(&o) && slot_owners(&f).await.is_some_and(|o| o.is_empty()) {
                    break o;
                }
            }
            assert!(
                Instant::now() < deadline,
                "not every host registered on 2.0 with the slots free: {:?}",
                admin::overview(&client, &keys).await
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        assert!(o.problems.is_empty(), "{:?}", o.problems);
        let g = o.groups.iter().find(|g| g.name == GROUP).unwrap();
        assert_eq!(g.policy, policy, "the policy changed");
        let reports = &g.failures[FAILED];
        assert_eq!(reports.len(), 1, "{reports:?}");
        assert_eq!(reports[0].machine_id, machine_id(91));

        // The watch caught up with the releases: nobody holds, and never
        // more than the maximum did.
        wait_until(
            Duration::from_secs(30),
            "the holder watch still shows holders",
            || async { watch.snapshot().current.is_empty() },
        )
        .await;
        let stats = watch.snapshot();
        assert!(
            stats.max_seen <= MAX_HOLDERS as usize,
            "{} holders at once",
            stats.max_seen
        );
        assert_eq!(stats.ever.len(), HOSTS + 1, "{:?}", stats.ever);
        eprintln!(
            "peak {} holders of {MAX_HOLDERS}, {} holder events",
            stats.max_seen, stats.events
        );
    }
}

// Several workers: the cluster's start and restarts block one while they
// wait for etcd, and the hosts must go on meanwhile, as real ones would.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_leader_killed_during_a_rollout() {
    let dir = tempfile::tempdir().unwrap();
    let mut r = start(dir.path()).await;
    let leader = r
        .cluster
        .wait_leader(Duration::from_secs(10))
        .await
        .unwrap();
    let killed = Instant::now();
    r.cluster.kill(leader).unwrap();
    let next = r
        .cluster
        .wait_leader(Duration::from_secs(20))
        .await
        .unwrap();
    assert_ne!(next, leader);
    eprintln!(
        "member {leader} (leader) killed; member {next} leads after {:?}",
        killed.elapsed()
    );
    r.check(killed).await;
}

// Several workers: the cluster's start and restarts block one while they
// wait for etcd, and the hosts must go on meanwhile, as real ones would.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_paused_longer_than_a_lease() {
    let dir = tempfile::tempdir().unwrap();
    let mut r = start(dir.path()).await;
    let leader = r
        .cluster
        .wait_leader(Duration::from_secs(10))
        .await
        .unwrap();
    // A follower: the cluster keeps its leader, and a host whose requests
    // or streams went to that member gets no answer, not an error.
    let paused = (leader + 1) % 3;
    r.cluster.pause(paused).unwrap();
    let since = Instant::now();
    // A client that fails over as the hosts' do, told that a request
    // failed: the paused member is taken out of it, and then no request
    // waits on it (a third of them would, for their whole timeout,
    // otherwise).
    let client = connect(&r.s).await.unwrap();
    let members = Members::start(&client, &r.s).await.unwrap().unwrap();
    let hung = r.cluster.members[paused].endpoint();
    members.suspect();
    wait_until(
        Duration::from_secs(5),
        "the paused member is still in use",
        || async { members.out().contains(&hung) },
    )
    .await;
    eprintln!(
        "member {paused} taken out {:?} after the pause",
        since.elapsed()
    );
    assert_eq!(members.out().len(), 1, "{:?}", members.out());
    let mut c = client.clone();
    for i in 0..30 {
        let get = c.get(r.s.prefix.as_str(), None);
        // A request to the paused member would wait its 5 s timeout.
        let answered = tokio::time::timeout(Duration::from_millis(2500), get).await;
        assert!(answered.is_ok(), "request {i} went to the paused member");
        answered.unwrap().unwrap();
    }
    tokio::time::sleep(
        (since + LEASE_TTL + Duration::from_secs(2)).saturating_duration_since(Instant::now()),
    )
    .await;
    r.cluster.resume(paused).unwrap();
    let resumed = Instant::now();
    eprintln!("member {paused} paused for {:?}", since.elapsed());
    wait_until(
        Duration::from_secs(20),
        "the continued member is not used again",
        || async { members.out().is_empty() },
    )
    .await;
    eprintln!(
        "member {paused} in use again {:?} after it continued",
        resumed.elapsed()
    );
    r.check(resumed).await;
}

// Several workers: the cluster's start and restarts block one while they
// wait for etcd, and the hosts must go on meanwhile, as real ones would.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_restarted_on_its_data() {
    let dir = tempfile::tempdir().unwrap();
    let mut r = start(dir.path()).await;
    let leader = r
        .cluster
        .wait_leader(Duration::from_secs(10))
        .await
        .unwrap();
    r.cluster.kill(leader).unwrap();
    let down = Instant::now();
    // Long enough for leases granted meanwhile to run out on the others.
    tokio::time::sleep(LEASE_TTL).await;
    tokio::task::block_in_place(|| r.cluster.restart(&[leader])).unwrap();
    eprintln!(
        "member {leader} (leader) down for {:?}, serving again",
        down.elapsed()
    );
    r.check(Instant::now()).await;
}

// Several workers: the cluster's start and restarts block one while they
// wait for etcd, and the hosts must go on meanwhile, as real ones would.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quorum_lost_and_regained() {
    let dir = tempfile::tempdir().unwrap();
    let mut r = start(dir.path()).await;
    let leader = r
        .cluster
        .wait_leader(Duration::from_secs(10))
        .await
        .unwrap();
    let other = (leader + 1) % 3;
    // Another group on its own: one host holds its slot, one waits.
    let db = FleetSettings {
        group: "db".into(),
        ..r.s.clone()
    };
    let (holder, waiter) = (fleet(&db, 93).await, fleet(&db, 94).await);
    assert_eq!(holder.try_acquire("2.0").await.unwrap(), Acquire::Granted);
    assert!(matches!(
        waiter.try_acquire("2.0").await.unwrap(),
        Acquire::Wait(_)
    ));
    r.cluster.kill(leader).unwrap();
    r.cluster.kill(other).unwrap();
    let lost = Instant::now();
    // Without a quorum no question is answered, so none is a grant: not a
    // waiting host's, nor a holder's (which asks again before it reboots).
    for f in [&holder, &waiter] {
        let asked = f.try_acquire("2.0").await;
        assert!(
            asked.is_err(),
            "{}: {asked:?} without a quorum",
            f.machine_id
        );
    }
    tokio::time::sleep_until(lost + LEASE_TTL + Duration::from_secs(2)).await;
    tokio::task::block_in_place(|| r.cluster.restart(&[leader, other])).unwrap();
    let regained = Instant::now();
    let next = r
        .cluster
        .wait_leader(Duration::from_secs(20))
        .await
        .unwrap();
    eprintln!(
        "quorum lost for {:?}; member {next} leads {:?} after the restart",
        regained - lost,
        regained.elapsed()
    );
    // The holder's slot outlived the outage, longer than its lease's TTL:
    // without a leader no lease runs out, and a new leader gives each its
    // whole TTL again.
    assert_eq!(
        ask(&holder).await,
        Acquire::Granted,
        "the holder lost its slot"
    );
    assert!(matches!(ask(&waiter).await, Acquire::Wait(_)));
    r.check(regained).await;
}
