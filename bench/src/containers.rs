//! Containers: pull throughput from a local registry (Debian's
//! docker-registry on 127.0.0.1, an image of synthetic layers pushed with
//! skopeo) through the agent's own puller (HTTP, sha256 of every blob while
//! it is stored, unpack); and, on the test image booted in QEMU, the time
//! from a container's desired state written to etcd to its process answering
//! on its port, with the image already on the host. Prints figures; asserts
//! nothing.
//!
//! Usage: containers [MiB] [ROUNDS] (defaults 128 and 5; ROUNDS 0 skips the
//! QEMU half)

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
    let pulled = Puller::new(&store)?.pull(&r).context("pull")?;
    let cold = t.elapsed();
    let t = Instant::now();
    let again = Puller::new(&store)?.pull(&r).context("second pull")?;
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

/// Desired state → running, on the real image in QEMU (TCG unless
/// BALLAST_QEMU_ACCEL=kvm): the guest's agent watches a real etcd on the
/// host and pulls from a real registry on the host. The container is
/// declared once (its image is pulled), then `rounds` times disabled (unit
/// stopped and removed, image kept) and enabled again, timing from the
/// etcdctl put to the first HTTP answer from the container, polled every
/// 10 ms from the host through a QEMU port forward.
fn startup_latency(rounds: usize) -> Result<()> {
    use os_agent::fleet::server::LocalEtcd;
    use qemu_tests::containers::{http_get, WebImage, PAGE};
    use qemu_tests::{Vm, VmOptions, DEFAULT_SSH_TIMEOUT};
    const GUEST_ETCD: &str = "10.0.2.101:2379";
    const PORT: u16 = 8080;
    let work = tempfile::tempdir()?;
    let image = WebImage::push(work.path())?;
    let etcd_dir = tempfile::tempdir()?;
    let etcd = LocalEtcd::start(etcd_dir.path(), None)?;
    let vm = Vm::boot(VmOptions {
        guest_forwards: vec![
            image.guest_forward(),
            format!("tcp:{GUEST_ETCD}-cmd:nc 127.0.0.1 {}", etcd.client_port),
        ],
        host_forwards: vec![PORT],
        ..VmOptions::default()
    });
    vm.wait_ssh(DEFAULT_SSH_TIMEOUT);
    let id = vm.ssh_ok("cat /etc/machine-id").trim().to_string();
    let key = format!("/ballast/containers/hosts/{id}/web");
    let put = |enabled: bool| -> Result<()> {
        let mut v: serde_json::Value = serde_json::from_str(&image.container_json(PORT))?;
        v["enabled"] = enabled.into();
        etcd.etcdctl(&["put", &key, &v.to_string()]).map(drop)
    };
    let host_port = vm.host_port(PORT);
    let wait = |answering: bool, limit: Duration| -> Result<Duration> {
        let t = Instant::now();
        loop {
            let up = http_get(host_port).as_deref() == Some(PAGE);
            if up == answering {
                return Ok(t.elapsed());
            }
            if t.elapsed() > limit {
                anyhow::bail!(
                    "the container did not {} within {limit:?}",
                    if answering { "answer" } else { "stop" }
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    };
    put(true)?;
    vm.ssh_ok(&format!(
        "cat > /etc/ballast/agent.d/50-bench.toml <<'EOF'\n[etcd]\nendpoints = [\"http://{GUEST_ETCD}\"]\n{}EOF\nsystemctl restart os-agent",
        image.agent_config()
    ));
    let first = wait(true, Duration::from_secs(600))?;
    println!(
        "  first start (agent start, etcd read, pull, unpack, unit): {:.2} s",
        first.as_secs_f64()
    );
    let mut times = Vec::new();
    for _ in 0..rounds {
        put(false)?;
        wait(false, Duration::from_secs(120))?;
        let t = Instant::now();
        put(true)?;
        wait(true, Duration::from_secs(120))?;
        times.push(t.elapsed().as_secs_f64());
    }
    times.sort_by(f64::total_cmp);
    if let (Some(min), Some(max)) = (times.first(), times.last()) {
        println!(
            "  desired → running (image present, {rounds} rounds): median {:.2} s, min {min:.2} s, max {max:.2} s",
            times[times.len() / 2]
        );
    }
    Ok(())
}

fn main() -> std::process::ExitCode {
    let mut args = std::env::args().skip(1);
    let mib = match args.next().map(|a| a.parse::<u64>()) {
        None => 128,
        Some(Ok(n)) if n >= LAYERS => n,
        Some(_) => {
            eprintln!("usage: containers [MiB >= {LAYERS}] [ROUNDS]");
            return std::process::ExitCode::FAILURE;
        }
    };
    let rounds = match args.next().map(|a| a.parse::<usize>()) {
        None => 5,
        Some(Ok(n)) => n,
        Some(Err(_)) => {
            eprintln!("usage: containers [MiB >= {LAYERS}] [ROUNDS]");
            return std::process::ExitCode::FAILURE;
        }
    };
    let mut r = pull_throughput(mib);
    if r.is_ok() && rounds > 0 {
        println!("containers on the test image in QEMU (guest agent, host etcd and registry):");
        r = startup_latency(rounds);
    }
    match r {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            os_agent::print_error_chain(&e);
            std::process::ExitCode::FAILURE
        }
    }
}
