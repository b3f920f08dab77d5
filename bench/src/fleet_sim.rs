//! fleet-sim: a real etcd on 127.0.0.1 and many simulated hosts in one
//! process (os_agent::fleet::sim). Registers them, measures etcd's load in
//! steady state, publishes a release and rolls it out through the group's
//! reboot semaphore. Prints figures; asserts nothing.
//!
//! Usage: fleet-sim [HOSTS] [MAX] [REBOOT_SECS]   (defaults 1000 50 2)

use anyhow::{bail, Context, Result};
use os_agent::fleet::server::LocalEtcd;
use os_agent::fleet::sim::{HolderWatch, SimEnd, SimHost, SimParams};
use os_agent::fleet::view::GroupWatch;
use os_agent::fleet::{admin, connect, register, Fleet, FleetSettings, Keys};
use std::time::Duration;
use tokio::time::Instant;

const GROUP: &str = "bench";
const LEASE_TTL: Duration = Duration::from_secs(30);
/// At least this long; rounded up to whole keep-alive intervals, because the
/// simulated hosts register within a second of each other and so renew in
/// step: a window that is not a whole number of intervals counts one round
/// of renewals too many or too few.
const STEADY_WINDOW_MIN: Duration = Duration::from_secs(15);
/// Hosts per etcd client connection (a real host has one each).
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
}

fn counters(etcd: &LocalEtcd) -> Result<Counters> {
    let client = os_agent::http::Client::new(&os_agent::http::Options::new(
        os_agent::http::Redirects::SameHost,
    ))?;
    let mut text = String::new();
    std::io::Read::read_to_string(
        &mut client
            .get(&etcd.metrics_url())
            .send()
            .and_then(os_agent::http::Response::ok)
            .context("cannot read etcd's metrics")?
            .into_body(),
        &mut text,
    )
    .context("cannot read etcd's metrics")?;
    let unary = text
        .lines()
        .filter(|l| {
            l.starts_with("grpc_server_handled_total{") && l.contains("grpc_type=\"unary\"")
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    Ok(Counters {
        unary,
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

async fn run() -> Result<()> {
    let hosts: usize = arg(1, 1000)?;
    let max: u32 = arg(2, 50)?;
    let reboot = Duration::from_secs_f64(arg(3, 2.0)?);
    if hosts == 0 || max == 0 {
        bail!("HOSTS and MAX must be at least 1");
    }
    let dir = tempfile::tempdir().context("cannot make a temporary directory")?;
    let etcd = LocalEtcd::start(dir.path(), None)?;
    let settings = FleetSettings {
        group: GROUP.into(),
        lease_ttl: LEASE_TTL,
        lock_ttl: Duration::from_secs(600),
        ..FleetSettings::new(vec![etcd.endpoint()])
    };
    let keys = Keys::new(&settings.prefix);
    let admin_client = connect(&settings).await?;
    admin::set_max(&admin_client, &keys, GROUP, max).await?;
    println!(
        "fleet-sim: {hosts} hosts, max {max} concurrent reboots, simulated reboot {:.1} s, lease TTL {} s",
        reboot.as_secs_f64(),
        LEASE_TTL.as_secs()
    );

    // Registration.
    let started = Instant::now();
    let mut clients = Vec::new();
    for _ in 0..hosts.div_ceil(HOSTS_PER_CLIENT) {
        clients.push(connect(&settings).await?);
    }
    // One watch of the group per connection, shared by its hosts: each host
    // waits on the same view its own watch would give it.
    let views: Vec<GroupWatch> = clients
        .iter()
        .map(|c| GroupWatch::start(c.clone(), keys.clone(), GROUP.into()))
        .collect();
    let sims: Vec<SimHost> = (0..hosts)
        .map(|i| {
            let client = clients[i / HOSTS_PER_CLIENT].clone();
            let id = format!("{:032x}", 0xba11_a570_0000_u128 + i as u128);
            SimHost::start(Fleet::new(client, &settings, &id), "1.0")
                .with_view(&views[i / HOSTS_PER_CLIENT])
        })
        .collect();
    for s in &sims {
        tokio::time::timeout(Duration::from_secs(120), s.registration.wait_sessions(1))
            .await
            .context("a host did not register within 120 s")?;
    }
    let registration = started.elapsed();
    println!(
        "registration: {hosts} hosts in {:.2} s ({:.0} hosts/s)",
        registration.as_secs_f64(),
        hosts as f64 / registration.as_secs_f64()
    );

    // Steady state: registered, nothing to do but keep leases alive.
    let every = register::keep_alive_interval(LEASE_TTL);
    let rounds = STEADY_WINDOW_MIN.as_secs_f64() / every.as_secs_f64();
    let window = every * rounds.ceil().max(1.0) as u32;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let before = counters(&etcd)?;
    tokio::time::sleep(window).await;
    let after = counters(&etcd)?;
    let secs = window.as_secs_f64();
    let unary = (after.unary - before.unary) / secs;
    let msgs = (after.stream_msgs - before.stream_msgs) / secs;
    let per_host_ttl = (unary + msgs) * LEASE_TTL.as_secs_f64() / hosts as f64;
    println!(
        "steady state over {secs:.0} s (keep-alive every {:.0} s): {unary:.1} unary requests/s + \
         {msgs:.1} stream messages/s (lease keep-alives) = {per_host_ttl:.2} per host per lease TTL \
         ({:.2} unary)",
        every.as_secs_f64(),
        unary * LEASE_TTL.as_secs_f64() / hosts as f64
    );

    // The rollout.
    let watch = HolderWatch::start(&admin_client, &keys, GROUP).await?;
    let params = SimParams {
        reboot,
        // Waiting hosts are woken by their view of the group; they ask
        // without a change only after 30-60 s, as the agent's idle poll.
        poll: Duration::from_secs(30),
        fails: false,
    };
    let before = counters(&etcd)?;
    let started = Instant::now();
    let deadline = started + Duration::from_secs(3600);
    let tasks: Vec<_> = sims
        .into_iter()
        .map(|mut h| {
            let p = params.clone();
            tokio::spawn(async move {
                let end = h.roll("2.0", &p, deadline).await;
                (h, end)
            })
        })
        .collect();
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
    let after = counters(&etcd)?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let stats = watch.snapshot();
    let busy = stats.holder_seconds / (f64::from(max) * took.as_secs_f64());
    let ideal = hosts as f64 / f64::from(max) * reboot.as_secs_f64();
    // Safe mode: the first host takes the new version alone.
    let ideal_safe =
        reboot.as_secs_f64() + (hosts - 1) as f64 / f64::from(max) * reboot.as_secs_f64();
    let rollout = took.as_secs_f64();
    println!("rollout: {updated} of {hosts} hosts on 2.0 in {rollout:.2} s");
    println!(
        "max simultaneous lock holders seen (etcd watch): {} (max {max}); {} hosts ever held a slot",
        stats.max_seen,
        stats.ever.len()
    );
    println!(
        "reboot slots in use during the rollout: {:.1}% (mean {:.1} holders)",
        busy * 100.0,
        stats.holder_seconds / took.as_secs_f64()
    );
    let mut refill = stats.refill_secs.clone();
    refill.sort_by(f64::total_cmp);
    if !refill.is_empty() {
        let pct = |q: f64| refill[((refill.len() - 1) as f64 * q).round() as usize] * 1000.0;
        println!(
            "release to next grant (etcd watch, {} pairs): mean {:.0} ms, median {:.0} ms, p90 {:.0} ms, max {:.0} ms",
            refill.len(),
            refill.iter().sum::<f64>() / refill.len() as f64 * 1000.0,
            pct(0.5),
            pct(0.9),
            pct(1.0)
        );
    }
    println!(
        "ideal (hosts / max x reboot): {ideal:.2} s; ratio {:.3}",
        rollout / ideal
    );
    println!(
        "ideal with safe mode (first host alone): {ideal_safe:.2} s; ratio {:.3}",
        rollout / ideal_safe
    );
    println!(
        "during the rollout: {:.1} unary requests/s + {:.1} stream messages/s",
        (after.unary - before.unary) / rollout,
        (after.stream_msgs - before.stream_msgs) / rollout
    );
    drop(kept);
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
