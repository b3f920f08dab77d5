//! Applies a release of at least 256 MiB from a local HTTP server into a
//! file-backed slot with the agent's own pipeline (download, sha256, zstd,
//! write, verity tree, fsync), and runs beside it, on the same payload, the
//! baseline `curl | zstd -d | dd conv=fsync` into another file. Prints both
//! throughputs (of uncompressed bytes) and their ratio. Target: >= 0.9.
//!
//! Usage: update-throughput [MiB] (default 256)

use anyhow::{bail, Context, Result};
use ballast_common::manifest::{Manifest, Payload, Rollout, RootPayload, VerityParams};
use ballast_common::verity::{Params, TreeBuilder};
use os_agent::disk::slot::Slot;
use os_agent::disk::BlockPartition;
use os_agent::host::DirHost;
use os_agent::update::apply::{write_hash_area, write_root, Target};
use os_agent::update::channel::Channel;
use sha2::{Digest, Sha256};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

const MIB: u64 = 1 << 20;

/// Filesystem-like content: per 4 KiB block, some pseudo-random bytes and
/// some text, so it compresses about as well as a root filesystem (~2:1).
fn payload(mib: u64) -> Vec<u8> {
    let mut v = Vec::with_capacity((mib * MIB) as usize);
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    let text = b"systemd erofs verity ballast /usr/lib/x86_64-linux-gnu libc.so.6 ";
    while (v.len() as u64) < mib * MIB {
        for _ in 0..256 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            v.extend_from_slice(&x.to_le_bytes());
        }
        while v.len() % 4096 != 0 {
            let take = (4096 - v.len() % 4096).min(text.len());
            v.extend_from_slice(&text[..take]);
        }
    }
    v
}

/// A minimal static file server for one directory, on 127.0.0.1.
fn serve(dir: PathBuf) -> Result<u16> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let port = listener.local_addr()?.port();
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let dir = dir.clone();
            std::thread::spawn(move || {
                if let Err(e) = handle(stream, &dir) {
                    eprintln!("bench server: {e:#}");
                }
            });
        }
    });
    Ok(port)
}

fn handle(mut stream: TcpStream, dir: &Path) -> Result<()> {
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut line = String::new();
    reader.read_line(&mut line)?;
    loop {
        let mut h = String::new();
        if reader.read_line(&mut h)? == 0 || h == "\r\n" {
            break;
        }
    }
    let path = line
        .split_whitespace()
        .nth(1)
        .unwrap_or("/")
        .trim_start_matches('/');
    if path.contains("..") {
        bail!("bad path {path}");
    }
    match std::fs::File::open(dir.join(path)) {
        Ok(mut f) => {
            let len = f.metadata()?.len();
            write!(
                stream,
                "HTTP/1.1 200 OK\r\nContent-Length: {len}\r\nConnection: close\r\n\r\n"
            )?;
            std::io::copy(&mut f, &mut stream)?;
        }
        Err(_) => write!(
            stream,
            "HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        )?,
    }
    Ok(())
}

/// Creates `path`, or empties it, as a sparse file of `size` bytes.
fn sparse_file(path: &Path, size: u64) -> Result<()> {
    std::fs::File::create(path)?.set_len(size)?;
    Ok(())
}

/// CPU seconds (user + system) of this process and of its waited-for
/// children, from /proc/self/stat in clock ticks (100 per second on Linux).
/// Both runs include the bench's HTTP server thread. On a shared machine
/// this moves much less than the wall times do.
fn cpu_secs() -> Result<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat")?;
    let after_name = stat.rsplit_once(')').map(|(_, s)| s).unwrap_or_default();
    // Fields 14 to 17 of stat(5) (utime stime cutime cstime); the first
    // after the name is field 3.
    let ticks: Vec<u64> = after_name
        .split_whitespace()
        .skip(11)
        .take(4)
        .map(str::parse)
        .collect::<Result<_, _>>()
        .context("cannot parse /proc/self/stat")?;
    Ok(ticks.iter().sum::<u64>() as f64 / 100.0)
}

/// The baseline into a fresh sparse file; returns its seconds.
fn baseline(base: &str, sha: &str, out: &Path, size: u64) -> Result<f64> {
    sparse_file(out, size)?;
    let t = Instant::now();
    let status = Command::new("bash")
        .arg("-c")
        .arg(format!(
            "set -o pipefail; curl -sf {base}/payloads/{sha} | zstd -dc | dd of={} bs=1M conv=notrunc,fsync status=none",
            out.display()
        ))
        .stdin(Stdio::null())
        .status()
        .context("cannot run the baseline (needs curl, zstd, dd)")?;
    let secs = t.elapsed().as_secs_f64();
    if !status.success() {
        bail!("baseline pipeline failed: {status}");
    }
    let mut check = vec![0u8; 4096];
    std::fs::File::open(out)?.read_exact(&mut check)?;
    Ok(secs)
}

fn main() -> Result<()> {
    let arg = |n: usize, default: u64| -> Result<u64> {
        Ok(std::env::args()
            .nth(n)
            .map(|a| a.parse())
            .transpose()?
            .unwrap_or(default))
    };
    let mib = arg(1, 256)?;
    let rounds = arg(2, 1)?.max(1);
    let work = tempfile::tempdir()?;
    let channel_dir = work.path().join("channel");
    std::fs::create_dir_all(channel_dir.join("payloads"))?;

    eprintln!("preparing a {mib} MiB root payload ...");
    let data = payload(mib);
    // Compressed as image-build compresses a release's root payload, at
    // the specs' default level.
    let compressed = {
        let plain = work.path().join("root.erofs");
        let zst = work.path().join("root.erofs.zst");
        std::fs::write(&plain, &data)?;
        image_build::build::compress_payload(
            &plain,
            &zst,
            image_build::spec::default_zstd_level(),
        )?;
        std::fs::remove_file(&plain)?;
        let compressed = std::fs::read(&zst)?;
        std::fs::remove_file(&zst)?;
        compressed
    };
    let sha = hex::encode(Sha256::digest(&compressed));
    let payload_path = channel_dir.join("payloads").join(&sha);
    std::fs::write(&payload_path, &compressed)?;
    // On the disk before anything is timed: else its write-back falls into
    // the first run, which is the agent's.
    std::fs::File::open(&payload_path)?.sync_all()?;
    let salt: Vec<u8> = Sha256::digest(b"bench salt").to_vec();
    let uuid = uuid::Uuid::new_v4();
    let mut tb = TreeBuilder::new(Params {
        salt: salt.clone(),
        uuid,
    })?;
    tb.write_all(&data)?;
    let tree = tb.finish()?;
    let m = Manifest {
        channel: "bench".into(),
        name: "ballast".into(),
        version: "9.9.9".into(),
        sequence: 1,
        issued_at: 0,
        expires_at: u64::MAX,
        architecture: "x86-64".into(),
        root_hash: tree.root_hash_hex(),
        verity: VerityParams {
            salt: hex::encode(&salt),
            uuid: uuid.to_string(),
            data_blocks: tree.data_blocks,
        },
        root: RootPayload {
            url: format!("payloads/{sha}"),
            size: compressed.len() as u64,
            sha256: sha.clone(),
            uncompressed_size: data.len() as u64,
            compression: "zstd".into(),
        },
        uki: Payload {
            url: "payloads/none".into(),
            size: 0,
            sha256: "0".repeat(64),
        },
        rollout: Rollout {
            start: 0,
            duration_secs: 0,
        },
    };
    drop(data);
    let port = serve(channel_dir.clone())?;
    let base = format!("http://127.0.0.1:{port}");

    // The agent's pipeline into file-backed partitions of a directory host.
    let host_root = work.path().join("host");
    std::fs::create_dir_all(host_root.join("dev"))?;
    let slot_size = (mib + 64) * MIB;
    sparse_file(&host_root.join("dev/slot-b"), slot_size)?;
    sparse_file(&host_root.join("dev/slot-b-verity"), 64 * MIB)?;
    let host = DirHost::new(&host_root)?;
    let part = |name: &str, number| BlockPartition {
        name: name.into(),
        number,
        disk: "bench".into(),
    };
    let target = Target {
        slot: Slot::B,
        root: part("slot-b", 4),
        root_label: "root-b".into(),
        root_capacity: slot_size,
        verity: part("slot-b-verity", 5),
        verity_label: "root-b-verity".into(),
        verity_capacity: 64 * MIB,
    };
    let channel = Channel::new(&base, "bench")?;
    let bytes = m.root.uncompressed_size as f64;

    // Warm the page cache of the served payload for both runs alike.
    std::fs::read(channel_dir.join("payloads").join(&sha))?;
    let baseline_out = work.path().join("baseline-slot");

    println!(
        "payload: {mib} MiB uncompressed, {:.1} MiB zstd",
        compressed.len() as f64 / MIB as f64
    );
    let run_agent = || -> Result<f64> {
        // A fresh sparse slot each time, as the baseline gets.
        sparse_file(&host_root.join("dev/slot-b"), slot_size)?;
        let t = Instant::now();
        let written =
            write_root(&host, &channel, &m, &target, &mut |_| {}).context("agent pipeline")?;
        write_hash_area(&host, &target, &written).context("writing the hash area")?;
        let secs = t.elapsed().as_secs_f64();
        if written.root_hash_hex() != m.root_hash {
            bail!("agent wrote a slot with the wrong root hash");
        }
        Ok(secs)
    };
    // One untimed run of each first. On this VM (Firecracker, free page
    // reporting to the host) memory the guest has not touched for a while is
    // slow to write the first time: the first run of a process paid about 3x
    // the copy cost into the page cache, and it always was the agent's.
    eprintln!("warming up: one untimed run of each ...");
    run_agent()?;
    baseline(&base, &sha, &baseline_out, slot_size)?;

    let mut ratios = Vec::new();
    for round in 0..rounds {
        // Alternate who goes first, so neither always meets the other's
        // write-back or a burst of load from elsewhere on the machine.
        let agent_first = round % 2 == 0;
        let (mut agent_secs, mut base_secs) = (0.0, 0.0);
        let (mut agent_cpu, mut base_cpu) = (0.0, 0.0);
        for agent_turn in [agent_first, !agent_first] {
            if agent_turn {
                let cpu = cpu_secs()?;
                agent_secs = run_agent()?;
                agent_cpu = cpu_secs()? - cpu;
            } else {
                let cpu = cpu_secs()?;
                base_secs = baseline(&base, &sha, &baseline_out, slot_size)?;
                base_cpu = cpu_secs()? - cpu;
            }
        }
        let agent_mbs = bytes / MIB as f64 / agent_secs;
        let base_mbs = bytes / MIB as f64 / base_secs;
        let ratio = agent_mbs / base_mbs;
        ratios.push(ratio);
        if rounds > 1 {
            println!(
                "round {} ({} first):",
                round + 1,
                if agent_first { "agent" } else { "baseline" }
            );
        }
        println!(
            "agent (download+sha256+zstd+write+verity+fsync): {agent_secs:.2} s, {agent_mbs:.1} MiB/s"
        );
        println!(
            "baseline (curl | zstd -d | dd conv=fsync):       {base_secs:.2} s, {base_mbs:.1} MiB/s"
        );
        println!("ratio agent/baseline: {ratio:.2} (target >= 0.90)");
        println!(
            "CPU time (user+sys, server included): agent {agent_cpu:.2} s, baseline {base_cpu:.2} s"
        );
    }
    if rounds > 1 {
        ratios.sort_by(f64::total_cmp);
        let list: Vec<String> = ratios.iter().map(|r| format!("{r:.2}")).collect();
        println!(
            "ratios of {rounds} rounds, sorted: {}; median {:.2} (target >= 0.90)",
            list.join(" "),
            ratios[ratios.len() / 2]
        );
    }
    Ok(())
}
