//! fleet-sim: a real three-member etcd cluster on 127.0.0.1 and many
//! simulated hosts in one process (os_agent::fleet::sim). Registers them,
//! measures etcd's load in steady state, publishes a release and rolls it out
//! through the group's reboot semaphore, then rolls out the next release
//! while the cluster's leader is killed and restarted. Prints figures and
//! whether each target of docs/etcd.md was met; asserts nothing.
//!
//! Usage: fleet-sim [HOSTS] [MAX] [REBOOT_SECS]   (defaults 1000 50 2)
//!
//! `fleet-sim failing [HOSTS] [MAX] [REBOOT_SECS] [FAIL_PERCENT]` (FAIL_PERCENT
//! default 10) rolls out a release that fails its health check on that
//! share of the hosts: the group pauses itself at its failure threshold (1%
//! of the hosts, at least 3), the others stay on the old version, and an
//! operator's resume with a fixed release completes the rollout.

use anyhow::{bail, Context, Result};
use os_agent::fleet::members::Members;
use os_agent::fleet::server::{LocalCluster, LocalEtcd};
use os_agent::fleet::sim::{HolderStats, HolderWatch, SimEnd, SimHost, SimParams};
use os_agent::fleet::view::GroupWatch;
use os_agent::fleet::{admin, connect, register, Fleet, FleetSettings, Keys};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

const GROUP: &str = "bench";
const LEASE_TTL: Duration = Duration::from_secs(30);
/// At least this long; rounded up to whole keep-alive intervals, because the
/// simulated hosts register within a second of each other and so renew in
/// step: a window that is not a whole number of intervals counts one round
/// of renewals too many or too few.
const STEADY_WINDOW_MIN: Duration = Duration::from_secs(15);
/// Hosts per etcd client connection (a real host has one each). Each host
/// still makes its own requests and keeps its own lease and keep-alive
/// stream on it (bench/README.md says why the figures carry over).
const HOSTS_PER_CLIENT: usize = 50;

fn arg<T: std::str::FromStr>(n: usize, default: T) -> Result<T> {
    match std::env::args().nth(n) {
        None => Ok(default),
        Some(s) => s
            .parse()
            .map_err(|_| anyhow::anyhow!("argument {n}: {s:?} is not a number")),
    }
}

/// Sums a counter over all its label sets in etcd's Prometheus metrics.
fn metric_sum(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

struct Counters {
    unary: f64,
    stream_msgs: f64,
    /// Unary requests per gRPC method (Range, Txn, Put, LeaseGrant, ...).
    by_method: std::collections::BTreeMap<String, f64>,
}

impl Counters {
    /// The unary requests per host between `before` and `self`, per method,
    /// largest first: "Txn 6.01, Put 4.00, ...".
    fn per_host_by_method(&self, before: &Counters, hosts: usize) -> String {
        let mut v: Vec<(String, f64)> = self
            .by_method
            .iter()
            .map(|(m, n)| {
                (
                    m.clone(),
                    n - before.by_method.get(m).copied().unwrap_or(0.0),
                )
            })
            .filter(|(_, n)| *n > 0.0)
            .collect();
        v.sort_by(|a, b| b.1.total_cmp(&a.1));
        v.iter()
            .map(|(m, n)| format!("{m} {:.2}", n / hosts as f64))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// The counters of every member that runs, summed: the cluster's load.
/// The HTTP client blocks (it drives a runtime of its own), so the reads
/// run beside the hosts' runtime.
async fn cluster_counters(cluster: &LocalCluster) -> Result<Counters> {
    let urls: Vec<String> = cluster
        .members
        .iter()
        .filter(|m| m.is_running() && !m.is_paused())
        .map(LocalEtcd::metrics_url)
        .collect();
    tokio::task::spawn_blocking(move || {
        let mut sum = Counters {
            unary: 0.0,
            stream_msgs: 0.0,
            by_method: Default::default(),
        };
        for url in &urls {
            let c = counters(url)?;
            sum.unary += c.unary;
            sum.stream_msgs += c.stream_msgs;
            for (m, n) in c.by_method {
                *sum.by_method.entry(m).or_default() += n;
            }
        }
        Ok(sum)
    })
    .await
    .context("reading etcd's metrics panicked")?
}

fn counters(metrics_url: &str) -> Result<Counters> {
    let client = os_agent::http::Client::new(&os_agent::http::Options::new(
        os_agent::http::Redirects::SameHost,
    ))?;
    let mut text = String::new();
    std::io::Read::read_to_string(
        &mut client
            .get(metrics_url)
            .send()
            .and_then(os_agent::http::Response::ok)
            .context("cannot read etcd's metrics")?
            .into_body(),
        &mut text,
    )
    .context("cannot read etcd's metrics")?;
    let mut by_method = std::collections::BTreeMap::new();
    let handled = text.lines().filter(|l| {
        l.starts_with("grpc_server_handled_total{") && l.contains("grpc_type=\"unary\"")
    });
    for l in handled {
        let Some(n) = l.rsplit(' ').next().and_then(|n| n.parse::<f64>().ok()) else {
            continue;
        };
        let method = l
            .split("grpc_method=\"")
            .nth(1)
            .and_then(|r| r.split('"').next())
            .unwrap_or("?");
        *by_method.entry(method.to_string()).or_default() += n;
    }
    Ok(Counters {
        unary: by_method.values().sum(),
        by_method,
        stream_msgs: metric_sum(&text, "grpc_server_msg_received_total")
            - text
                .lines()
                .filter(|l| {
                    l.starts_with("grpc_server_msg_received_total{")
                        && l.contains("grpc_type=\"unary\"")
                })
                .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
                .sum::<f64>(),
    })
}

/// One rollout's outcome.
struct Rolled {
    took: Duration,
    updated: usize,
    stats: HolderStats,
    /// What the leader kill did, if there was one.
    fault: Option<String>,
}

/// Publishes `target` to every host at once and waits until each is done;
/// with `kill_leader`, kills the cluster's leader once half of the hosts
/// are through and starts it again on its data as soon as another member
/// leads. The hosts and the cluster are handed back.
async fn rollout(
    sims: Vec<SimHost>,
    mut cluster: LocalCluster,
    watch: &HolderWatch,
    target: &str,
    params: &SimParams,
    kill_leader: bool,
) -> Result<(Vec<SimHost>, LocalCluster, Rolled)> {
    let hosts = sims.len();
    let started = Instant::now();
    let deadline = started + Duration::from_secs(3600);
    let done = Arc::new(AtomicUsize::new(0));
    let tasks: Vec<_> = sims
        .into_iter()
        .map(|mut h| {
            let (p, target, done) = (params.clone(), target.to_string(), done.clone());
            tokio::spawn(async move {
                let end = h.roll(&target, &p, deadline).await;
                done.fetch_add(1, Ordering::Relaxed);
                (h, end)
            })
        })
        .collect();
    let mut fault = None;
    if kill_leader {
        while done.load(Ordering::Relaxed) < hosts / 2 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let old = cluster.wait_leader(Duration::from_secs(30)).await?;
        let at = started.elapsed();
        cluster.kill(old)?;
        let killed = Instant::now();
        let new = cluster.wait_leader(Duration::from_secs(60)).await?;
        let elected = killed.elapsed();
        // LocalCluster::restart waits for the member with std's sleep.
        cluster = tokio::task::spawn_blocking(move || -> Result<LocalCluster> {
            cluster.restart(&[old])?;
            Ok(cluster)
        })
        .await
        .context("the restart of the member panicked")??;
        fault = Some(format!(
            "leader m{old} killed at {:.1} s ({} of {hosts} hosts done); m{new} led {:.2} s later; \
             m{old} serving again {:.2} s after the kill",
            at.as_secs_f64(),
            done.load(Ordering::Relaxed),
            elected.as_secs_f64(),
            killed.elapsed().as_secs_f64()
        ));
    }
    let mut updated = 0;
    let mut kept = Vec::new();
    for t in tasks {
        let (h, end) = t.await.context("a simulated host panicked")?;
        match end? {
            SimEnd::Updated => updated += 1,
            other => println!("{}: {other:?}", h.fleet.machine_id),
        }
        kept.push(h);
    }
    let took = started.elapsed();
    // The watch's last events arrive after the hosts' answers.
    tokio::time::sleep(Duration::from_millis(500)).await;
    Ok((
        kept,
        cluster,
        Rolled {
            took,
            updated,
            stats: watch.snapshot(),
            fault,
        },
    ))
}

fn met(ok: bool) -> &'static str {
    if ok {
        "met"
    } else {
        "MISSED"
    }
}

/// Prints a rollout's figures; whether its targets were met.
fn report(r: &Rolled, hosts: usize, max: u32, reboot: Duration, target: &str, limit: f64) -> bool {
    let rollout = r.took.as_secs_f64();
    let rounds = hosts.div_ceil(max as usize) as f64;
    let ideal = rounds * reboot.as_secs_f64();
    // Safe mode: the first host takes the new version alone.
    let ideal_safe =
        reboot.as_secs_f64() + ((hosts - 1).div_ceil(max as usize)) as f64 * reboot.as_secs_f64();
    let s = &r.stats;
    println!(
        "  {} of {hosts} hosts on {target} in {rollout:.2} s",
        r.updated
    );
    if let Some(f) = &r.fault {
        println!("  fault: {f}");
    }
    println!(
        "  peak lock holders (independent etcd watch): {} (max {max}); {} hosts held a slot",
        s.max_seen,
        s.ever.len()
    );
    println!(
        "  reboot slots in use: {:.1}% (mean {:.1} holders)",
        s.holder_seconds / (f64::from(max) * rollout) * 100.0,
        s.holder_seconds / rollout
    );
    let mut refill = s.refill_secs.clone();
    refill.sort_by(f64::total_cmp);
    if !refill.is_empty() {
        let pct = |q: f64| refill[((refill.len() - 1) as f64 * q).round() as usize] * 1000.0;
        println!(
            "  release to next grant ({} pairs): mean {:.0} ms, median {:.0} ms, p90 {:.0} ms, max {:.0} ms",
            refill.len(),
            refill.iter().sum::<f64>() / refill.len() as f64 * 1000.0,
            pct(0.5),
            pct(0.9),
            pct(1.0)
        );
    }
    let ratio = rollout / ideal;
    println!(
        "  ideal ceil({hosts}/{max}) x {:.1} s = {ideal:.1} s; ratio {ratio:.3} (target <= {limit}: {}); \
         with safe mode's first host alone {ideal_safe:.1} s, ratio {:.3}",
        reboot.as_secs_f64(),
        met(ratio <= limit),
        rollout / ideal_safe
    );
    let never_over = s.max_seen <= max as usize;
    println!("  never over max: {}", met(never_over));
    ratio <= limit && never_over && r.updated == hosts
}

/// The cluster, the registered hosts and what keeps them going.
struct Fleetup {
    cluster: LocalCluster,
    settings: FleetSettings,
    keys: Keys,
    admin: etcd_client::Client,
    sims: Vec<SimHost>,
    /// The group watches the hosts wait on: they stop when dropped.
    _views: Vec<GroupWatch>,
    _dir: tempfile::TempDir,
}

/// Starts the cluster, sets the group's maximum, registers `hosts` hosts
/// on 1.0 and prints how long that took.
async fn setup(hosts: usize, max: u32, reboot: Duration) -> Result<Fleetup> {
    let dir = tempfile::tempdir().context("cannot make a temporary directory")?;
    let cluster = LocalCluster::start(dir.path())?;
    let settings = FleetSettings {
        group: GROUP.into(),
        lease_ttl: LEASE_TTL,
        lock_ttl: Duration::from_secs(600),
        ..FleetSettings::new(cluster.endpoints())
    };
    let keys = Keys::new(&settings.prefix);
    let admin_client = connect(&settings).await?;
    admin::set_max(&admin_client, &keys, GROUP, max).await?;
    let connections = hosts.div_ceil(HOSTS_PER_CLIENT);
    println!(
        "fleet-sim: {hosts} hosts on a 3-member etcd cluster, max {max} concurrent reboots, \
         simulated reboot {:.1} s, lease TTL {} s",
        reboot.as_secs_f64(),
        LEASE_TTL.as_secs()
    );
    println!(
        "  all hosts in one process; {HOSTS_PER_CLIENT} hosts per etcd client connection \
         ({connections} connections, each with one watch of the group); one lease, one \
         keep-alive stream and its own requests per host"
    );

    let started = Instant::now();
    let mut clients = Vec::new();
    for _ in 0..connections {
        let c = connect(&settings).await?;
        let m = Members::start(&c, &settings).await?;
        clients.push((c, m));
    }
    // One watch of the group per connection, shared by its hosts: each host
    // waits on the same view its own watch would give it.
    let views: Vec<GroupWatch> = clients
        .iter()
        .map(|(c, _)| GroupWatch::start(c.clone(), keys.clone(), GROUP.into()))
        .collect();
    let sims: Vec<SimHost> = (0..hosts)
        .map(|i| {
            let (client, members) = &clients[i / HOSTS_PER_CLIENT];
            let id = format!("{:032x}", 0xba11_a570_0000_u128 + i as u128);
            let fleet = Fleet::new(client.clone(), &settings, &id).with_members(members.as_ref());
            SimHost::start(fleet, "1.0").with_view(&views[i / HOSTS_PER_CLIENT])
        })
        .collect();
    let registered_by = started + Duration::from_secs(600);
    for s in &sims {
        tokio::time::timeout_at(registered_by, s.registration.wait_sessions(1))
            .await
            .context("the hosts did not register within 600 s")?;
    }
    let registration = started.elapsed();
    println!(
        "registration: {hosts} hosts in {:.2} s ({:.0} hosts/s)",
        registration.as_secs_f64(),
        hosts as f64 / registration.as_secs_f64()
    );
    Ok(Fleetup {
        cluster,
        settings,
        keys,
        admin: admin_client,
        sims,
        _views: views,
        _dir: dir,
    })
}

/// The arguments after the mode's name (`failing` shifts them by one).
fn args(shift: usize) -> Result<(usize, u32, Duration)> {
    let hosts: usize = arg(1 + shift, 1000)?;
    let max: u32 = arg(2 + shift, 50)?;
    let reboot = Duration::from_secs_f64(arg(3 + shift, 2.0)?);
    if hosts < 2 || max == 0 {
        bail!("HOSTS must be at least 2 and MAX at least 1");
    }
    Ok((hosts, max, reboot))
}

async fn run() -> Result<()> {
    if std::env::args().nth(1).as_deref() == Some("failing") {
        return failing().await;
    }
    let (hosts, max, reboot) = args(0)?;
    let Fleetup {
        cluster,
        keys,
        admin: admin_client,
        sims,
        _views,
        _dir,
        ..
    } = setup(hosts, max, reboot).await?;

    // Steady state: registered, nothing to do but keep leases alive.
    let every = register::keep_alive_interval(LEASE_TTL);
    let rounds = STEADY_WINDOW_MIN.as_secs_f64() / every.as_secs_f64();
    let window = every * rounds.ceil().max(1.0) as u32;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let before = cluster_counters(&cluster).await?;
    tokio::time::sleep(window).await;
    let after = cluster_counters(&cluster).await?;
    let secs = window.as_secs_f64();
    let per_host_ttl = LEASE_TTL.as_secs_f64() / secs / hosts as f64;
    let unary = (after.unary - before.unary) * per_host_ttl;
    let keep_alives = (after.stream_msgs - before.stream_msgs) * per_host_ttl;
    println!(
        "steady state over {secs:.0} s (keep-alive every {:.0} s), summed over the 3 members: \
         {:.1} unary requests/s, {:.1} stream messages/s (lease keep-alives)",
        every.as_secs_f64(),
        (after.unary - before.unary) / secs,
        (after.stream_msgs - before.stream_msgs) / secs,
    );
    println!(
        "  per host per lease TTL: {unary:.2} unary requests (target 0: {}), {keep_alives:.2} \
         keep-alives (target <= 1.5: {})",
        met(unary < 0.005),
        met(keep_alives <= 1.5)
    );

    let watch = HolderWatch::start(&admin_client, &keys, GROUP).await?;
    let params = SimParams {
        reboot,
        // Waiting hosts are woken by their view of the group; they ask
        // without a change only after 30-60 s, as the agent's idle poll.
        poll: Duration::from_secs(30),
        fails: false,
    };

    println!("rollout of 2.0, no faults:");
    let before = cluster_counters(&cluster).await?;
    let (sims, cluster, first) = rollout(sims, cluster, &watch, "2.0", &params, false).await?;
    let after = cluster_counters(&cluster).await?;
    let secs = first.took.as_secs_f64();
    println!(
        "  etcd load during the rollout: {:.1} unary requests/s + {:.1} stream messages/s \
         ({:.2} unary requests per host)",
        (after.unary - before.unary) / secs,
        (after.stream_msgs - before.stream_msgs) / secs,
        (after.unary - before.unary) / hosts as f64
    );
    println!(
        "  unary requests per host by method: {}",
        after.per_host_by_method(&before, hosts)
    );
    let ok_first = report(&first, hosts, max, reboot, "2.0", 1.2);

    // The second rollout's holders only: a fresh watch.
    drop(watch);
    let watch = HolderWatch::start(&admin_client, &keys, GROUP).await?;
    println!("rollout of 3.0, the leader killed half-way and restarted:");
    let (sims, cluster, second) = rollout(sims, cluster, &watch, "3.0", &params, true).await?;
    let ok_second = report(&second, hosts, max, reboot, "3.0", 1.3);
    println!(
        "targets: {}",
        if ok_first && ok_second {
            "all met"
        } else {
            "NOT all met (see above)"
        }
    );
    drop((sims, cluster));
    Ok(())
}

/// `fleet-sim failing`: see the module's doc.
async fn failing() -> Result<()> {
    let (hosts, max, reboot) = args(1)?;
    let pct: usize = arg(5, 10)?;
    if pct > 100 {
        bail!("FAIL_PERCENT is at most 100");
    }
    let f = setup(hosts, max, reboot).await?;
    let threshold = (hosts / 100).max(3) as u32;
    admin::modify_policy(&f.admin, &f.keys, GROUP, |p| {
        p.failure_threshold = threshold;
        Ok(())
    })
    .await?;
    let failing = (0..hosts).filter(|i| i % 100 < pct).count();
    println!(
        "release 2.0 fails its health check on {failing} of {hosts} hosts ({pct}%); failure \
         threshold {threshold}"
    );
    let operator = Fleet::new(f.admin.clone(), &f.settings, "operator");
    let watch = HolderWatch::start(&f.admin, &f.keys, GROUP).await?;
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let started = Instant::now();
    let deadline = started + Duration::from_secs(3600);
    let done = Arc::new(AtomicUsize::new(0));
    let tasks: Vec<_> = f
        .sims
        .into_iter()
        .enumerate()
        .map(|(i, mut h)| {
            let p = SimParams {
                reboot,
                poll: Duration::from_secs(30),
                fails: i % 100 < pct,
            };
            let (mut stopped, done) = (stopped.clone(), done.clone());
            tokio::spawn(async move {
                // A host still waiting when the fixed release comes stages
                // that instead: its wait for 2.0 ends.
                let end = tokio::select! {
                    end = h.roll("2.0", &p, deadline) => Some(end),
                    _ = stopped.wait_for(|s| *s) => None,
                };
                done.fetch_add(1, Ordering::Relaxed);
                (h, end)
            })
        })
        .collect();
    // Until the group pauses itself and the hosts that held a slot then
    // are back: from there on no host may take one.
    let mut paused_after = None;
    loop {
        if paused_after.is_none() && operator.policy().await?.paused {
            paused_after = Some(started.elapsed());
        }
        let drained = watch.snapshot().current.is_empty();
        if (paused_after.is_some() && drained) || done.load(Ordering::Relaxed) == hosts {
            break;
        }
        if Instant::now() > deadline {
            bail!("the group neither paused nor finished within an hour");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let Some(paused_after) = paused_after else {
        bail!("every host rolled without the group pausing: the threshold was never reached");
    };
    let settled = started.elapsed();
    let o = admin::overview(&f.admin, &f.keys).await?;
    println!(
        "the group paused itself {:.2} s into the rollout; the last holder was back {:.2} s in",
        paused_after.as_secs_f64(),
        settled.as_secs_f64()
    );
    println!("osctl fleet status (one line per group):");
    print!("  {}", os_agent::fleet::cli::render_lines(&o));
    if let Some(g) = o.groups.iter().find(|g| g.name == GROUP) {
        println!(
            "  hosts by version: {:?}; failure reports: {} (threshold {threshold}; the rest came \
             from hosts that held a slot when it paused)",
            g.versions,
            g.failures.get("2.0").map_or(0, Vec::len)
        );
    }
    let stats = watch.snapshot();
    println!(
        "  peak lock holders: {} (max {max}); {} hosts took 2.0",
        stats.max_seen,
        stats.ever.len()
    );
    // The fixed release: every host stages 2.1 (those still waiting for 2.0
    // drop it), then an operator resumes the group.
    stop.send_replace(true);
    let mut sims = Vec::new();
    let mut ends = std::collections::BTreeMap::<String, usize>::new();
    for t in tasks {
        let (h, end) = t.await.context("a simulated host panicked")?;
        let what = match end {
            Some(end) => format!("{:?}", end?),
            None => "waiting (paused)".into(),
        };
        *ends.entry(what).or_default() += 1;
        sims.push(h);
    }
    println!("  how the hosts' rollout of 2.0 ended: {ends:?}");
    drop(watch);
    let watch = HolderWatch::start(&f.admin, &f.keys, GROUP).await?;
    let params = SimParams {
        reboot,
        poll: Duration::from_secs(30),
        fails: false,
    };
    let tasks: Vec<_> = sims
        .into_iter()
        .map(|mut h| {
            let p = params.clone();
            tokio::spawn(async move {
                let end = h
                    .roll("2.1", &p, Instant::now() + Duration::from_secs(3600))
                    .await;
                (h, end)
            })
        })
        .collect();
    let resumed = Instant::now();
    admin::resume(&f.admin, &f.keys, GROUP).await?;
    let mut updated = 0;
    let mut sims = Vec::new();
    for t in tasks {
        let (h, end) = t.await.context("a simulated host panicked")?;
        if end? == SimEnd::Updated {
            updated += 1;
        }
        sims.push(h);
    }
    let took = resumed.elapsed().as_secs_f64();
    let ideal = hosts.div_ceil(max as usize) as f64 * reboot.as_secs_f64();
    let stats = watch.snapshot();
    println!(
        "resumed with the fixed release 2.1: {updated} of {hosts} hosts on 2.1 in {took:.2} s \
         (ideal {ideal:.1} s, ratio {:.3}); peak lock holders {} (max {max})",
        took / ideal,
        stats.max_seen
    );
    let o = admin::overview(&f.admin, &f.keys).await?;
    print!("  {}", os_agent::fleet::cli::render_lines(&o));
    drop((sims, f.cluster));
    Ok(())
}

fn main() -> std::process::ExitCode {
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the tokio runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match rt.block_on(run()) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            os_agent::print_error_chain(&e);
            std::process::ExitCode::FAILURE
        }
    }
}
