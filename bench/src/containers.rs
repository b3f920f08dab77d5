//! Containers: pull throughput from a local registry (Debian's
//! docker-registry on 127.0.0.1, an image of synthetic layers pushed with
//! skopeo) through the agent's own puller (HTTP, sha256 of every blob while
//! it is stored, unpack). The time from desired state written to the
//! container running is not measured yet (it says so). Prints figures;
//! asserts nothing.
//!
//! Usage: containers [MiB] (default 128)

use os_agent::containers::local_registry as registry;

use anyhow::{Context, Result};
use os_agent::containers::reference::Reference;
use os_agent::containers::registry::Puller;
use os_agent::containers::store::Store;
use sha2::{Digest, Sha256};
use std::time::{Duration, Instant};

const MIB: u64 = 1 << 20;
const LAYERS: u64 = 4;

/// A plain tar layer of `files` files holding `mib` MiB of pseudo-random
/// bytes in total (incompressible: the registry, hashing and disk are what
/// is measured).
fn layer(n: u64, mib: u64) -> Result<Vec<u8>> {
    let mut b = tar::Builder::new(Vec::new());
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15 ^ n;
    let per_file = MIB;
    for f in 0..mib {
        let mut data = Vec::with_capacity(per_file as usize);
        while (data.len() as u64) < per_file {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            data.extend_from_slice(&x.to_le_bytes());
        }
        let mut h = tar::Header::new_gnu();
        h.set_mode(0o644);
        h.set_size(data.len() as u64);
        h.set_mtime(0);
        b.append_data(&mut h, format!("data/layer{n}/file{f}"), &data[..])?;
    }
    Ok(b.into_inner()?)
}

fn pull_throughput(mib: u64) -> Result<()> {
    let reg = registry::Registry::start()?;
    let work = tempfile::tempdir()?;
    let per_layer = (mib / LAYERS).max(1);
    let mut layers = Vec::new();
    for n in 0..LAYERS {
        let l = layer(n, per_layer)?;
        let diff = format!("sha256:{}", hex::encode(Sha256::digest(&l)));
        layers.push(("application/vnd.oci.image.layer.v1.tar", l, diff));
    }
    let total: u64 = layers.iter().map(|(_, l, _)| l.len() as u64).sum();
    let layout = work.path().join("layout");
    registry::write_layout(&layout, "bench", &layers, &["/bin/true"])?;
    drop(layers);
    let t = Instant::now();
    registry::push(&layout, "bench", &reg, "bench/app", false)?;
    let push = t.elapsed();

    let store_dir = tempfile::tempdir()?;
    let store = Store::open(store_dir.path())?;
    let r =
        Reference::parse(&format!("{}/bench/app:bench", reg.addr)).map_err(anyhow::Error::msg)?;
    let t = Instant::now();
    let pulled = Puller::new(&store).pull(&r).context("pull")?;
    let cold = t.elapsed();
    let t = Instant::now();
    let again = Puller::new(&store).pull(&r).context("second pull")?;
    let warm = t.elapsed();

    let mibs = |bytes: u64, d: Duration| bytes as f64 / MIB as f64 / d.as_secs_f64();
    println!(
        "containers: image of {LAYERS} plain tar layers, {:.1} MiB",
        total as f64 / MIB as f64
    );
    println!(
        "  skopeo push:            {:>8.2} s  {:>8.1} MiB/s",
        push.as_secs_f64(),
        mibs(total, push)
    );
    println!(
        "  agent pull (cold):      {:>8.2} s  {:>8.1} MiB/s  ({} bytes fetched, verified, unpacked)",
        cold.as_secs_f64(),
        mibs(pulled.downloaded, cold),
        pulled.downloaded
    );
    println!(
        "  agent pull (in store):  {:>8.3} s  ({} bytes fetched: manifest check only)",
        warm.as_secs_f64(),
        again.downloaded
    );
    Ok(())
}

/// Desired state → running needs systemd as PID 1, the system bus and an
/// image with a runnable payload; this bench does not measure it yet (see
/// bench/README.md), and says why here rather than print a made-up figure.
fn startup_latency() {
    let pid1 = std::fs::read_to_string("/proc/1/comm").unwrap_or_else(|e| format!("unknown ({e})"));
    let bus = std::path::Path::new("/run/dbus/system_bus_socket");
    println!(
        "  desired → running:      not measured (not implemented yet; this machine: PID 1 is {:?}, system bus {})",
        pid1.trim(),
        if bus.exists() { "present" } else { "absent" }
    );
}

fn main() -> std::process::ExitCode {
    let mib = match std::env::args().nth(1).map(|a| a.parse::<u64>()) {
        None => 128,
        Some(Ok(n)) if n >= LAYERS => n,
        Some(_) => {
            eprintln!("usage: containers [MiB >= {LAYERS}]");
            return std::process::ExitCode::FAILURE;
        }
    };
    let r = pull_throughput(mib);
    startup_latency();
    match r {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            os_agent::print_error_chain(&e);
            std::process::ExitCode::FAILURE
        }
    }
}
