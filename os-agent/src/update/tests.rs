//! The engine against a directory-backed host: file-backed partitions, an ESP
//! directory, and a real HTTP server on 127.0.0.1 serving a channel signed
//! with a test-only key.

use super::engine::{self, Assessment, Mode, Outcome, RebootDecision};
use super::fleet_lock::NoopLock;
use super::state::State;
use super::store::{self, UpdateState};
use crate::boot::LOADER_GUID;
use crate::config::{Strategy, UpdateSettings};
use crate::disk::fixture::{write, HASH_A};
use crate::host::DirHost;
use crate::status::tests::booted_host;
use ballast_common::keys::SecretKey;
use ballast_common::manifest::{self, Manifest, Payload, Rollout, RootPayload, VerityParams};
use ballast_common::verity::{self, TreeBuilder};
use ballast_common::{gpt::Gpt, slot_partuuids};
use sha2::{Digest, Sha256};
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

const MIB: u64 = 1 << 20;
const BOOTED_UKI: &str = "ballast-1.2.3.efi";

/// A static file server on 127.0.0.1, stopped when dropped.
pub(crate) struct Server {
    pub port: u16,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Server {
    pub fn start(root: &Path) -> Server {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let stop = Arc::new(AtomicBool::new(false));
        let (root, flag) = (root.to_path_buf(), stop.clone());
        let thread = std::thread::spawn(move || {
            for conn in listener.incoming() {
                if flag.load(Ordering::SeqCst) {
                    break;
                }
                if let Ok(c) = conn {
                    serve_one(&root, c);
                }
            }
        });
        Server {
            port,
            stop,
            thread: Some(thread),
        }
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the accept loop so it sees the flag.
        let _wake = TcpStream::connect(("127.0.0.1", self.port));
        if let Some(t) = self.thread.take() {
            t.join().unwrap();
        }
    }
}

fn serve_one(root: &Path, mut c: TcpStream) {
    let mut req = Vec::new();
    let mut buf = [0u8; 1024];
    while !req.windows(4).any(|w| w == b"\r\n\r\n") {
        match c.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => req.extend_from_slice(&buf[..n]),
        }
    }
    let text = String::from_utf8_lossy(&req);
    let path = text.split_whitespace().nth(1).unwrap_or("/").to_string();
    let file = root.join(path.trim_start_matches('/'));
    let (status, body) = match std::fs::read(&file) {
        Ok(b) if !path.contains("..") => ("200 OK", b),
        _ => ("404 Not Found", b"not found".to_vec()),
    };
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    // A client that hung up early is the client's problem.
    if c.write_all(head.as_bytes()).is_ok() {
        let _sent = c.write_all(&body);
    }
}

/// Pseudo-random bytes (so zstd cannot shrink them to nothing).
fn noise(len: usize, seed: u32) -> Vec<u8> {
    let mut x = seed.wrapping_mul(2_654_435_761).wrapping_add(1);
    (0..len)
        .map(|_| {
            x = x.wrapping_mul(1_103_515_245).wrapping_add(12345);
            (x >> 16) as u8
        })
        .collect()
}

struct Release {
    version: String,
    root: Vec<u8>,
    uki: Vec<u8>,
}

impl Release {
    fn new(version: &str, blocks: usize) -> Release {
        Release {
            version: version.into(),
            root: noise(blocks * 4096, version.len() as u32 * 7 + blocks as u32),
            uki: format!("uki of {version}").into_bytes(),
        }
    }
}

struct World {
    dir: tempfile::TempDir,
    host: DirHost,
    channel_dir: PathBuf,
    server: Server,
    key: SecretKey,
    sequence: std::cell::Cell<u64>,
}

fn efi_string(s: &str) -> Vec<u8> {
    let mut v = vec![6, 0, 0, 0];
    for u in s.encode_utf16().chain([0]) {
        v.extend(u.to_le_bytes());
    }
    v
}

fn sha(b: &[u8]) -> String {
    hex::encode(Sha256::digest(b))
}

/// A host booted from slot A (version 1.2.3, entry ballast-1.2.3.efi) with
/// an old entry left on the ESP, and a channel served over HTTP.
fn world() -> World {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("host");
    std::fs::create_dir_all(&root).unwrap();
    let host = booted_host(&root, &HASH_A);
    // File-backed partitions of the sizes sysfs gives: slot A full of a
    // pattern that must never change, slot B empty.
    for (dev, size, fill) in [
        ("vda2", 2 * MIB, 0x5a),
        ("vda3", MIB, 0xa5),
        ("vda4", 2 * MIB, 0),
        ("vda5", MIB, 0),
    ] {
        std::fs::write(root.join("dev").join(dev), vec![fill; size as usize]).unwrap();
    }
    write(
        &root,
        "etc/machine-id",
        "0123456789abcdef0123456789abcdef\n",
    );
    write(&root, "proc/sys/kernel/random/boot_id", "boot-1\n");
    let key = SecretKey::from_seed([9; 32]);
    write(
        &root,
        &format!("usr/lib/ballast/keys/{}.pub", key.public().key_id()),
        &key.public().to_text(),
    );
    let var = root.join(format!(
        "sys/firmware/efi/efivars/LoaderEntrySelected-{LOADER_GUID}"
    ));
    std::fs::create_dir_all(var.parent().unwrap()).unwrap();
    std::fs::write(&var, efi_string(BOOTED_UKI)).unwrap();
    write(
        &root,
        &format!("efi/EFI/Linux/{BOOTED_UKI}"),
        "uki of 1.2.3",
    );
    write(&root, "efi/EFI/Linux/ballast-1.1.0.efi", "old uki");
    let channel_dir = dir.path().join("channel");
    std::fs::create_dir_all(channel_dir.join("payloads")).unwrap();
    let server = Server::start(&channel_dir);
    write(
        &root,
        "etc/ballast/agent.d/50-test.toml",
        &format!("[update]\nchannel_url = \"{}\"\n", server.url()),
    );
    World {
        dir,
        host,
        channel_dir,
        server,
        key,
        sequence: std::cell::Cell::new(0),
    }
}

impl World {
    fn root(&self) -> PathBuf {
        self.dir.path().join("host")
    }

    fn settings(&self) -> UpdateSettings {
        crate::config::load(&self.host).unwrap().settings.update
    }

    /// The manifest for a release, payloads written to the channel.
    fn manifest(&self, r: &Release) -> Manifest {
        let salt = vec![7u8; 32];
        let uuid = uuid::Uuid::from_bytes([3; 16]);
        let mut b = TreeBuilder::new(verity::Params {
            salt: salt.clone(),
            uuid,
        })
        .unwrap();
        b.write_all(&r.root).unwrap();
        let tree = b.finish().unwrap();
        let zst = zstd::encode_all(&r.root[..], 3).unwrap();
        for bytes in [&zst, &r.uki] {
            std::fs::write(self.channel_dir.join("payloads").join(sha(bytes)), bytes).unwrap();
        }
        self.sequence.set(self.sequence.get() + 1);
        let now = store::now_unix();
        Manifest {
            channel: "stable".into(),
            name: "ballast".into(),
            version: r.version.clone(),
            sequence: self.sequence.get(),
            issued_at: now - 60,
            expires_at: now + 86400,
            architecture: engine::architecture().into(),
            root_hash: tree.root_hash_hex(),
            verity: VerityParams {
                salt: hex::encode(&salt),
                uuid: uuid.to_string(),
                data_blocks: tree.data_blocks,
            },
            root: RootPayload {
                url: format!("payloads/{}", sha(&zst)),
                size: zst.len() as u64,
                sha256: sha(&zst),
                uncompressed_size: r.root.len() as u64,
                compression: "zstd".into(),
            },
            uki: Payload {
                url: format!("payloads/{}", sha(&r.uki)),
                size: r.uki.len() as u64,
                sha256: sha(&r.uki),
            },
            rollout: Rollout {
                start: now - 60,
                duration_secs: 0,
            },
        }
    }

    fn publish_with(&self, m: &Manifest, keys: &[&SecretKey]) {
        let env = manifest::sign(m, keys).unwrap();
        std::fs::create_dir_all(self.channel_dir.join("channels")).unwrap();
        std::fs::write(
            self.channel_dir.join("channels/stable.json"),
            serde_json::to_vec(&env).unwrap(),
        )
        .unwrap();
    }

    fn publish(&self, m: &Manifest) {
        self.publish_with(m, &[&self.key]);
    }

    fn apply(&self, mode: Mode) -> anyhow::Result<Outcome> {
        engine::run(
            &self.host,
            &self.settings(),
            mode,
            &NoopLock,
            &mut |_, _| {},
        )
    }

    fn state(&self) -> UpdateState {
        store::load(&self.host).unwrap()
    }

    fn esp(&self) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(self.root().join("efi/EFI/Linux"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }

    fn gpt(&self) -> Gpt {
        let mut f = std::fs::File::open(self.root().join("dev/vda")).unwrap();
        Gpt::read_from(&mut f, 32 * MIB).unwrap()
    }

    fn dev(&self, name: &str) -> Vec<u8> {
        std::fs::read(self.root().join("dev").join(name)).unwrap()
    }

    /// The running slot, its verity partition and its PARTUUIDs are as they were.
    fn assert_running_slot_untouched(&self) {
        assert!(
            self.dev("vda2").iter().all(|&b| b == 0x5a),
            "slot A data changed"
        );
        assert!(
            self.dev("vda3").iter().all(|&b| b == 0xa5),
            "slot A verity changed"
        );
        let (a, av) = slot_partuuids(&HASH_A);
        let gpt = self.gpt();
        assert_eq!(gpt.find("root-a").unwrap().uuid, a);
        assert_eq!(gpt.find("root-a-verity").unwrap().uuid, av);
        assert!(
            self.esp().contains(&BOOTED_UKI.to_string()),
            "{:?}",
            self.esp()
        );
    }

    /// As if the host rebooted into `version` with root hash `hash`, entry `entry`.
    fn reboot_into(&self, hash_hex: &str, version: &str, entry: &str, boot: &str) {
        let h: [u8; 32] = hex::decode(hash_hex).unwrap().try_into().unwrap();
        let (d, v) = slot_partuuids(&h);
        let root = self.root();
        write(
            &root,
            "proc/cmdline",
            &format!(
                "roothash={hash_hex} systemd.verity_root_data=PARTUUID={d} \
                 systemd.verity_root_hash=PARTUUID={v} ro\n"
            ),
        );
        write(
            &root,
            "usr/lib/os-release",
            &format!("ID=debian\nIMAGE_ID=ballast\nIMAGE_VERSION={version}\n"),
        );
        write(
            &root,
            "proc/sys/kernel/random/boot_id",
            &format!("{boot}\n"),
        );
        std::fs::write(
            root.join(format!(
                "sys/firmware/efi/efivars/LoaderEntrySelected-{LOADER_GUID}"
            )),
            efi_string(entry),
        )
        .unwrap();
    }

    fn rename_uki(&self, from: &str, to: &str) {
        let d = self.root().join("efi/EFI/Linux");
        std::fs::rename(d.join(from), d.join(to)).unwrap();
    }
}

#[test]
fn applies_a_release_to_the_other_slot_and_makes_it_bootable_last() {
    let w = world();
    let r = Release::new("1.3.0", 64);
    let m = w.manifest(&r);
    w.publish(&m);
    let mut seen = Vec::new();
    let out = engine::run(
        &w.host,
        &w.settings(),
        Mode::Poll,
        &NoopLock,
        &mut |b, t| seen.push((b, t)),
    )
    .unwrap();
    let Outcome::Staged(staged) = out else {
        panic!("not staged: {out:?}")
    };
    assert_eq!(staged.version, "1.3.0");
    assert_eq!(staged.uki_file, "ballast-1.3.0+3.efi");
    assert_eq!(seen.last(), Some(&(m.root.size, m.root.size)));
    // Slot B holds the root, its verity partition the tree.
    assert_eq!(&w.dev("vda4")[..r.root.len()], &r.root[..]);
    let sb = verity::read_superblock(&w.dev("vda5")).unwrap();
    assert_eq!(sb.data_blocks, 64);
    // Its PARTUUIDs are the halves of the new root hash.
    let h: [u8; 32] = hex::decode(&m.root_hash).unwrap().try_into().unwrap();
    let (d, v) = slot_partuuids(&h);
    assert_eq!(w.gpt().find("root-b").unwrap().uuid, d);
    assert_eq!(w.gpt().find("root-b-verity").unwrap().uuid, v);
    // The old entry is gone, the booted one kept, the new one counted.
    assert_eq!(w.esp(), vec![BOOTED_UKI, "ballast-1.3.0+3.efi"]);
    assert_eq!(
        std::fs::read(w.root().join("efi/EFI/Linux/ballast-1.3.0+3.efi")).unwrap(),
        r.uki
    );
    w.assert_running_slot_untouched();
    let st = w.state();
    assert_eq!(st.state, State::Staged);
    assert_eq!(st.staged.as_ref().unwrap().version, "1.3.0");
    assert_eq!(st.sequence_of("stable"), Some(m.sequence));

    // Polled again in the same boot: already staged, nothing rewritten.
    let out = w.apply(Mode::Now).unwrap();
    assert!(matches!(out, Outcome::Staged(_)), "{out:?}");

    // The reboot strategy: immediate reboots at once.
    let d = engine::maybe_reboot(&w.host, &w.settings(), &NoopLock, store::now_unix()).unwrap();
    assert_eq!(d, RebootDecision::Rebooting);
    assert!(w
        .host
        .commands()
        .contains(&vec!["systemctl".into(), "reboot".into()]));
    assert_eq!(w.state().state, State::Rebooting);

    // The new version boots with a counted entry: pending until blessed.
    w.rename_uki("ballast-1.3.0+3.efi", "ballast-1.3.0+2-1.efi");
    w.reboot_into(&m.root_hash, "1.3.0", "ballast-1.3.0+3.efi", "boot-2");
    let b = engine::booted(&w.host).unwrap();
    assert_eq!(b.status.slot, crate::disk::slot::Slot::B);
    let mut st = w.state();
    let a = engine::reconcile(&w.host, &mut st, &b, &NoopLock).unwrap();
    assert_eq!(a, Assessment::Pending);
    assert_eq!(w.state().state, State::Assessing);
    let e = w.apply(Mode::Now).unwrap_err().to_string();
    assert!(e.contains("has not been blessed yet"), "{e}");
    // Blessed: done, and the channel has nothing newer.
    w.rename_uki("ballast-1.3.0+2-1.efi", "ballast-1.3.0.efi");
    let out = w.apply(Mode::Poll).unwrap();
    let Outcome::NothingToDo(why) = out else {
        panic!("{out:?}")
    };
    assert!(why.contains("not newer than the booted 1.3.0"), "{why}");
    let st = w.state();
    assert_eq!((st.state, st.staged), (State::Idle, None));
    assert_eq!(st.last_result.as_deref(), Some(why.as_str()));
}

#[test]
fn a_fallback_marks_the_version_failed_for_good() {
    let w = world();
    let m = w.manifest(&Release::new("1.3.0", 32));
    w.publish(&m);
    w.apply(Mode::Now).unwrap();
    // The new entry used its tries; systemd-boot booted slot A again.
    w.rename_uki("ballast-1.3.0+3.efi", "ballast-1.3.0+0-3.efi");
    w.reboot_into(&hex::encode(HASH_A), "1.2.3", BOOTED_UKI, "boot-3");
    let b = engine::booted(&w.host).unwrap();
    // osctl update check sees the pending rollback before anything recorded it.
    let st = w.state();
    let c = engine::check(&w.host, &w.settings(), &st, &b, Some("1.3.0")).unwrap();
    assert!(c.verdict.unwrap_err().to_string().contains("never retried"));

    let out = w.apply(Mode::Now).unwrap();
    let Outcome::NothingToDo(why) = out else {
        panic!("{out:?}")
    };
    assert!(
        why.contains("1.3.0 failed on this host before and is never retried"),
        "{why}"
    );
    let st = w.state();
    assert_eq!(st.failed_versions, vec!["1.3.0"]);
    let rb = st.last_rollback.unwrap();
    assert_eq!(
        (rb.version.as_str(), rb.to_version.as_str()),
        ("1.3.0", "1.2.3")
    );
    assert_eq!(w.esp(), vec![BOOTED_UKI]);
    w.assert_running_slot_untouched();
}

#[test]
fn an_interrupted_update_starts_over() {
    let w = world();
    let m = w.manifest(&Release::new("1.3.0", 16));
    w.publish(&m);
    let mut st = UpdateState {
        state: State::Downloading {
            bytes: 10,
            total: 100,
        },
        ..UpdateState::default()
    };
    store::save(&w.host, &mut st).unwrap();
    assert!(matches!(w.apply(Mode::Now).unwrap(), Outcome::Staged(_)));
}

#[test]
fn window_and_fleet_lock_strategies() {
    let w = world();
    let m = w.manifest(&Release::new("1.3.0", 16));
    w.publish(&m);
    w.apply(Mode::Now).unwrap();
    let now = 1_704_067_200; // a Monday, 00:00 UTC
    let window = crate::update::window::Window {
        days: vec![0],
        start_minute: 120,
        length_minutes: 60,
        zone: crate::update::window::Zone::utc(),
    };
    let s = UpdateSettings {
        strategy: Strategy::Window(window.clone()),
        ..w.settings()
    };
    let d = engine::maybe_reboot(&w.host, &s, &NoopLock, now).unwrap();
    assert_eq!(
        d,
        RebootDecision::Wait {
            why: "outside the maintenance window mon 02:00 for 60 min (UTC)".into(),
            until: Some(now + 7200)
        }
    );
    assert!(w.host.commands().is_empty());

    /// Refuses, and remembers which version was asked for.
    struct Busy(std::cell::RefCell<Vec<String>>);
    impl super::fleet_lock::RebootLock for Busy {
        fn acquire(&self, version: &str) -> anyhow::Result<bool> {
            self.0.borrow_mut().push(version.to_string());
            Ok(false)
        }
        fn release(&self, _outcome: &super::fleet_lock::Released) -> anyhow::Result<()> {
            Ok(())
        }
    }
    let s = UpdateSettings {
        strategy: Strategy::FleetLock(None),
        ..w.settings()
    };
    let busy = Busy(Default::default());
    assert!(matches!(
        engine::maybe_reboot(&w.host, &s, &busy, now).unwrap(),
        RebootDecision::Wait { .. }
    ));
    assert_eq!(*busy.0.borrow(), ["1.3.0"]);
    // Under fleet-lock a window still applies, and outside it the lock is not even asked for.
    let s_window = UpdateSettings {
        strategy: Strategy::FleetLock(Some(window.clone())),
        ..w.settings()
    };
    let d = engine::maybe_reboot(&w.host, &s_window, &busy, now).unwrap();
    assert!(
        matches!(&d, RebootDecision::Wait { why, until: Some(u) } if why.contains("outside the maintenance window") && *u == now + 7200),
        "{d:?}"
    );
    assert_eq!(busy.0.borrow().len(), 1);
    let d = engine::maybe_reboot(&w.host, &s_window, &busy, now + 7200).unwrap();
    assert!(
        matches!(&d, RebootDecision::Wait { why, .. } if why.contains("held by other hosts")),
        "{d:?}"
    );
    assert_eq!(busy.0.borrow().len(), 2);
    assert_eq!(
        engine::maybe_reboot(&w.host, &s, &NoopLock, now).unwrap(),
        RebootDecision::Rebooting
    );
}

/// Every way a channel can be bad: a clear reason, the running slot
/// untouched, nothing new bootable, the state says failed.
#[test]
fn table_of_rejections() {
    type Tweak = Box<dyn Fn(&World, &mut Manifest, &mut Vec<u8>)>;
    let other = SecretKey::from_seed([10; 32]);
    let cases: Vec<(&str, usize, Tweak, &str)> = vec![
        (
            "bad signature",
            16,
            Box::new(|_, _, env| {
                let mut e: manifest::Envelope = serde_json::from_slice(env).unwrap();
                e.manifest = e.manifest.replace("1.3.0", "1.3.1");
                *env = serde_json::to_vec(&e).unwrap();
            }),
            "does not verify",
        ),
        (
            "unknown key",
            16,
            Box::new(move |_, m, env| {
                *env = serde_json::to_vec(&manifest::sign(m, &[&other]).unwrap()).unwrap();
            }),
            "no signature by a trusted key",
        ),
        (
            "expired",
            16,
            Box::new(|w, m, env| {
                m.issued_at = 1000;
                m.expires_at = 2000;
                m.rollout.start = 1000;
                *env = w.sign(m);
            }),
            "expired at 2000",
        ),
        (
            "wrong architecture",
            16,
            Box::new(|w, m, env| {
                m.architecture = "riscv64".into();
                *env = w.sign(m);
            }),
            "for architecture riscv64",
        ),
        (
            "other image",
            16,
            Box::new(|w, m, env| {
                m.name = "other".into();
                *env = w.sign(m);
            }),
            "for image \"other\"",
        ),
        (
            "compressed size",
            16,
            Box::new(|w, m, env| {
                m.root.size -= 1;
                *env = w.sign(m);
            }),
            "the compressed root payload is larger than",
        ),
        (
            "sha256",
            16,
            Box::new(|w, m, env| {
                m.root.sha256 = "00".repeat(32);
                *env = w.sign(m);
            }),
            "sha256 of the root payload is",
        ),
        (
            "root hash",
            16,
            Box::new(|w, m, env| {
                m.root_hash = "11".repeat(32);
                *env = w.sign(m);
            }),
            "verity root hash of the written slot is",
        ),
        (
            "truncated download",
            16,
            Box::new(|w, m, env| {
                let p = w.channel_dir.join(&m.root.url);
                let b = std::fs::read(&p).unwrap();
                std::fs::write(&p, &b[..b.len() / 2]).unwrap();
                *env = w.sign(m);
            }),
            "truncated download of the root payload",
        ),
        (
            "tampered payload",
            16,
            Box::new(|w, m, env| {
                let p = w.channel_dir.join(&m.root.url);
                let mut b = std::fs::read(&p).unwrap();
                let i = b.len() / 2;
                b[i] ^= 0x40;
                std::fs::write(&p, &b).unwrap();
                *env = w.sign(m);
            }),
            "root payload",
        ),
        (
            "bigger than the slot",
            768,
            Box::new(|w, m, env| *env = w.sign(m)),
            "root payload of 3145728 bytes does not fit slot B (root-b: 2097152 bytes)",
        ),
        (
            "decompresses to more",
            16,
            Box::new(|w, m, env| {
                m.root.uncompressed_size -= 4096;
                m.verity.data_blocks -= 1;
                *env = w.sign(m);
            }),
            "the decompressed root payload is larger than",
        ),
        (
            "decompresses to less",
            16,
            Box::new(|w, m, env| {
                m.root.uncompressed_size += 4096;
                m.verity.data_blocks += 1;
                *env = w.sign(m);
            }),
            "root payload decompressed to 65536 bytes, the manifest says 69632",
        ),
        (
            "uki hash",
            16,
            Box::new(|w, m, env| {
                m.uki.sha256 = "22".repeat(32);
                *env = w.sign(m);
            }),
            "sha256 of the UKI is",
        ),
        (
            "uki truncated",
            16,
            Box::new(|w, m, env| {
                m.uki.size += 10;
                *env = w.sign(m);
            }),
            "truncated download of the UKI",
        ),
    ];
    for (name, blocks, tweak, want) in cases {
        let w = world();
        let mut m = w.manifest(&Release::new("1.3.0", blocks));
        let mut env = w.sign(&m);
        tweak(&w, &mut m, &mut env);
        std::fs::create_dir_all(w.channel_dir.join("channels")).unwrap();
        std::fs::write(w.channel_dir.join("channels/stable.json"), &env).unwrap();
        let e = match w.apply(Mode::Now) {
            Ok(o) => panic!("{name}: accepted: {o:?}"),
            Err(e) => format!("{e:#}"),
        };
        assert!(e.contains(want), "{name}: {e:?} lacks {want:?}");
        w.assert_running_slot_untouched();
        assert!(
            !w.esp().iter().any(|f| f.contains("1.3.0")),
            "{name}: {:?}",
            w.esp()
        );
        let st = w.state();
        assert_eq!(st.staged, None, "{name}");
        assert!(
            matches!(&st.state, State::Failed { reason } if reason.contains(want)),
            "{name}: {:?}",
            st.state
        );
        assert_eq!(
            st.last_error.as_deref().map(|r| r.contains(want)),
            Some(true)
        );
    }
}

/// One key signs several channels: a manifest signed for `beta` (and one
/// for `nightly` with a huge sequence) served as `stable.json` is refused
/// and moves no sequence, so the real `stable` release still applies.
#[test]
fn a_manifest_of_another_channel_is_refused_and_freezes_nothing() {
    let w = world();
    for (channel, sequence) in [("beta", 500), ("nightly", 9999)] {
        let mut m = w.manifest(&Release::new("1.4.0", 16));
        m.channel = channel.into();
        m.sequence = sequence;
        w.publish(&m);
        let e = format!("{:#}", w.apply(Mode::Now).unwrap_err());
        assert!(
            e.contains(&format!(
                "for channel \"{channel}\", this host follows \"stable\""
            )),
            "{e}"
        );
        let st = w.state();
        assert!(st.sequences.is_empty() && st.staged.is_none(), "{st:?}");
        w.assert_running_slot_untouched();
    }
    let m = w.manifest(&Release::new("1.3.0", 16));
    w.publish(&m);
    assert!(matches!(w.apply(Mode::Now).unwrap(), Outcome::Staged(_)));
    assert_eq!(w.state().sequences.get("stable"), Some(&m.sequence));
}

#[test]
fn lower_sequences_and_downgrades_are_refused() {
    let w = world();
    let m = w.manifest(&Release::new("1.3.0", 16));
    w.publish(&m);
    // State as written before sequences were kept per channel.
    let mut st: UpdateState =
        serde_json::from_str(&format!("{{\"state\": {{\"name\": \"idle\"}}, \"last_sequence\": {}, \"staged\": null, \"last_check\": null, \"last_result\": null, \"last_error\": null, \"last_rollback\": null}}", m.sequence + 5)).unwrap();
    store::save(&w.host, &mut st).unwrap();
    let e = format!("{:#}", w.apply(Mode::Now).unwrap_err());
    assert!(e.contains(&format!("lower than {}", m.sequence + 5)), "{e}");
    w.assert_running_slot_untouched();

    // Kept per channel sequences were kept per channel still counts.
    let w = world();
    let m = w.manifest(&Release::new("1.3.0", 16));
    w.publish(&m);
    let mut st = UpdateState::default();
    st.accept_sequence("stable", m.sequence + 5);
    store::save(&w.host, &mut st).unwrap();
    let e = format!("{:#}", w.apply(Mode::Now).unwrap_err());
    assert!(e.contains(&format!("lower than {}", m.sequence + 5)), "{e}");

    let w = world();
    let m = w.manifest(&Release::new("1.0.0", 16));
    w.publish(&m);
    let out = w.apply(Mode::Now).unwrap();
    let Outcome::NothingToDo(why) = out else {
        panic!("{out:?}")
    };
    assert!(
        why.contains("version 1.0.0 is not newer than the booted 1.2.3"),
        "{why}"
    );
    assert_eq!(w.esp(), vec!["ballast-1.1.0.efi", BOOTED_UKI]);
    w.assert_running_slot_untouched();

    // Not due yet: a poll waits, `apply` goes ahead.
    let w = world();
    let mut m = w.manifest(&Release::new("1.3.0", 16));
    m.rollout.start = store::now_unix() + 3600;
    w.publish(&m);
    let Outcome::NothingToDo(why) = w.apply(Mode::Poll).unwrap() else {
        panic!("applied before due")
    };
    assert!(why.contains("staged rollout"), "{why}");
    assert!(matches!(w.apply(Mode::Now).unwrap(), Outcome::Staged(_)));
}

#[test]
fn updates_off_and_no_keys_are_clear_errors() {
    let w = world();
    std::fs::remove_file(w.root().join("etc/ballast/agent.d/50-test.toml")).unwrap();
    let e = format!("{:#}", w.apply(Mode::Now).unwrap_err());
    assert!(e.contains("updates are off"), "{e}");
    let w = world();
    std::fs::remove_dir_all(w.root().join("usr/lib/ballast/keys")).unwrap();
    let e = format!("{:#}", w.apply(Mode::Now).unwrap_err());
    assert!(e.contains("no trusted update keys"), "{e}");
    let _port = w.server.port;
}

impl World {
    fn sign(&self, m: &Manifest) -> Vec<u8> {
        serde_json::to_vec(&manifest::sign(m, &[&self.key]).unwrap()).unwrap()
    }

    /// Signs without the checks [`manifest::sign`] makes: what a broken or
    /// hostile publisher holding the key could put on the channel.
    fn sign_unchecked(&self, m: &Manifest) -> Vec<u8> {
        let text = serde_json::to_string(m).unwrap();
        let env = manifest::Envelope {
            format: manifest::FORMAT.into(),
            signatures: vec![manifest::SignatureEntry {
                key_id: self.key.public().key_id(),
                signature: self
                    .key
                    .sign(format!("{}\n{text}", manifest::FORMAT).as_bytes()),
            }],
            manifest: text,
        };
        serde_json::to_vec(&env).unwrap()
    }
}

/// A change to a good manifest.
type Change = dyn Fn(&mut Manifest);

/// Signed numbers a host would overflow on, or allocate by, are refused with
/// the field named: the engine fails the update, nothing panics or aborts.
#[test]
fn signed_huge_numbers_fail_the_update_cleanly() {
    let cases: &[(&str, &Change, &str)] = &[
        (
            "uki.size = 2^62",
            &|m| m.uki.size = 1 << 62,
            "uki.size 4611686018427387904 is more than",
        ),
        (
            "data_blocks = 2^52+16",
            &|m| {
                m.verity.data_blocks = (1 << 52) + 16;
                m.root.uncompressed_size = 65536;
            },
            "verity.data_blocks 4503599627370512 is more than",
        ),
        (
            "rollout.start near u64::MAX",
            &|m| m.rollout.start = u64::MAX - 1,
            "rollout.start 18446744073709551614 is after expires_at",
        ),
    ];
    for (name, change, want) in cases {
        let w = world();
        let mut m = w.manifest(&Release::new("1.3.0", 16));
        change(&mut m);
        std::fs::create_dir_all(w.channel_dir.join("channels")).unwrap();
        std::fs::write(
            w.channel_dir.join("channels/stable.json"),
            w.sign_unchecked(&m),
        )
        .unwrap();
        let e = match w.apply(Mode::Now) {
            Ok(o) => panic!("{name}: accepted: {o:?}"),
            Err(e) => format!("{e:#}"),
        };
        assert!(e.contains(want), "{name}: {e:?} lacks {want:?}");
        w.assert_running_slot_untouched();
    }
}

/// The UKI is read into memory as it arrives, never into a buffer sized by
/// the manifest beforehand (a 2^62 one aborted the agent).
#[test]
fn uki_buffer_is_not_sized_by_the_manifest() {
    let w = world();
    let mut m = w.manifest(&Release::new("1.3.0", 16));
    m.uki.size = 1 << 62;
    let e = format!(
        "{:#}",
        super::apply::fetch_uki_from(&b"short"[..], &m).unwrap_err()
    );
    assert!(e.contains("truncated download of the UKI"), "{e}");
}

#[test]
fn operator_rollback_makes_the_other_entry_the_default() {
    let w = world();
    // Only entries of the booted version: nowhere to go.
    std::fs::remove_file(w.root().join("efi/EFI/Linux/ballast-1.1.0.efi")).unwrap();
    let e = format!("{:#}", super::cli::rollback(&w.host).unwrap_err());
    assert!(e.contains("no other boot entry of ballast"), "{e}");

    write(&w.root(), "efi/EFI/Linux/ballast-1.1.0.efi", "old uki");
    super::cli::rollback(&w.host).unwrap();
    assert_eq!(w.esp(), vec!["ballast-1.1.0.efi", "ballast-1.2.3+0-1.efi"]);
    let st = w.state();
    assert_eq!(st.failed_versions, vec!["1.2.3"]);
    let rb = st.last_rollback.unwrap();
    assert_eq!(
        (rb.version.as_str(), rb.to_version.as_str()),
        ("1.2.3", "1.1.0")
    );
    assert!(super::cli::render_status(&w.state()).contains("Rollback: 1.2.3 -> 1.1.0"));
}

#[test]
fn the_daemon_tick_checks_when_due_and_reboots_per_strategy() {
    let w = world();
    let m = w.manifest(&Release::new("1.3.0", 16));
    w.publish(&m);
    // Not due: only the boot is looked at.
    let t = super::agent::tick(&w.host, &NoopLock, false).unwrap();
    assert!(!t.checked);
    assert_eq!(w.state().state, State::Idle);
    // Due: applies and, strategy immediate, reboots.
    let t = super::agent::tick(&w.host, &NoopLock, true).unwrap();
    assert!(t.checked);
    assert_eq!(t.interval, std::time::Duration::from_secs(3600));
    assert_eq!(w.state().state, State::Rebooting);
    assert!(w
        .host
        .commands()
        .contains(&vec!["systemctl".into(), "reboot".into()]));
    // Booted into it, not yet blessed: the next tick comes soon and does not check.
    w.rename_uki("ballast-1.3.0+3.efi", "ballast-1.3.0+2-1.efi");
    w.reboot_into(&m.root_hash, "1.3.0", "ballast-1.3.0+2-1.efi", "boot-2");
    let t = super::agent::tick(&w.host, &NoopLock, true).unwrap();
    assert_eq!(
        (t.checked, t.wake_in),
        (false, super::agent::ASSESSING_POLL)
    );
    assert_eq!(w.state().state, State::Assessing);
    assert!(super::agent::random_up_to(std::time::Duration::from_secs(5)).as_secs() <= 5);
}

/// The engine under `fleet-lock` with the real etcd semaphore: it waits while
/// the group's only slot is held, reboots once it holds it, and after the
/// blessed boot gives it back and proves the version for its group.
#[test]
fn fleet_lock_with_a_real_etcd() {
    use crate::fleet::lock::{Acquire, EtcdLock};
    use crate::fleet::{self, admin, server::LocalEtcd, Fleet, FleetSettings};

    let w = world();
    let m = w.manifest(&Release::new("1.3.0", 16));
    w.publish(&m);
    w.apply(Mode::Now).unwrap();

    let etcd_dir = tempfile::tempdir().unwrap();
    let etcd = LocalEtcd::start(etcd_dir.path(), None).unwrap();
    // As in the daemon: one runtime, driven by a thread of its own, and the
    // blocking engine calling into it through its handle.
    let rt = std::sync::Arc::new(
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap(),
    );
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let driver = {
        let rt = rt.clone();
        std::thread::spawn(move || rt.block_on(stopped))
    };
    let fs = FleetSettings {
        group: "web".into(),
        ..FleetSettings::new(vec![etcd.endpoint()])
    };
    let client = rt.handle().block_on(fleet::connect(&fs)).unwrap();
    let machine_id = engine::booted(&w.host).unwrap().machine_id;
    let me = Fleet::new(client.clone(), &fs, &machine_id);
    let other = Fleet::new(client.clone(), &fs, &"0f".repeat(16));
    let lock = EtcdLock {
        fleet: me.clone(),
        runtime: rt.handle().clone(),
    };
    let s = UpdateSettings {
        strategy: Strategy::FleetLock(None),
        ..w.settings()
    };
    let now = store::now_unix();

    // Another host holds the group's only slot: wait, no reboot.
    assert_eq!(
        rt.handle().block_on(other.try_acquire("1.3.0")).unwrap(),
        Acquire::Granted
    );
    let d = engine::maybe_reboot(&w.host, &s, &lock, now).unwrap();
    assert!(
        matches!(&d, RebootDecision::Wait { why, .. } if why.contains("held by other hosts")),
        "{d:?}"
    );
    assert!(w.host.commands().is_empty());
    // It is freed: this host takes it and reboots.
    rt.handle()
        .block_on(admin::unlock(&client, &me.keys, "web", &other.machine_id))
        .unwrap();
    assert_eq!(
        engine::maybe_reboot(&w.host, &s, &lock, now).unwrap(),
        RebootDecision::Rebooting
    );
    let o = rt
        .handle()
        .block_on(admin::overview(&client, &me.keys))
        .unwrap();
    let holders = &o.groups[0].holders;
    assert_eq!(holders.len(), 1);
    assert_eq!(holders[0].machine_id, machine_id);
    assert_eq!(holders[0].version, "1.3.0");

    // The new boot is blessed: the slot is released and 1.3.0 is proven.
    w.reboot_into(&m.root_hash, "1.3.0", "ballast-1.3.0.efi", "boot-2");
    w.rename_uki("ballast-1.3.0+3.efi", "ballast-1.3.0.efi");
    let b = engine::booted(&w.host).unwrap();
    let mut st = w.state();
    assert_eq!(
        engine::reconcile(&w.host, &mut st, &b, &lock).unwrap(),
        Assessment::Succeeded
    );
    let state = rt.handle().block_on(me.lock_state("1.3.0")).unwrap();
    assert_eq!((state.holders(), state.holding), (0, false));
    assert!(state.proven);
    stop.send(()).unwrap();
    driver.join().unwrap().unwrap();
}

/// The power cuts of docs/update.md, "What is durable when", as the next boot
/// finds them: an entry that is missing or empty, or whole but untried, is no
/// verdict on the release.
#[test]
fn a_staged_entry_lost_to_a_power_cut_is_put_back_not_marked_failed() {
    let entry = "ballast-1.3.0+3.efi";
    type Cut = fn(&World);
    let cases: [(&str, Cut); 3] = [
        ("emptied", |w| {
            std::fs::write(w.root().join("efi/EFI/Linux/ballast-1.3.0+3.efi"), b"").unwrap()
        }),
        ("removed", |w| {
            std::fs::remove_file(w.root().join("efi/EFI/Linux/ballast-1.3.0+3.efi")).unwrap()
        }),
        ("half written", |w| {
            std::fs::write(
                w.root().join("efi/EFI/Linux/ballast-1.3.0+3.efi"),
                b"uki of",
            )
            .unwrap()
        }),
    ];
    for (what, cut) in cases {
        let w = world();
        let r = Release::new("1.3.0", 32);
        let m = w.manifest(&r);
        w.publish(&m);
        w.apply(Mode::Now).unwrap();
        cut(&w);
        w.reboot_into(&hex::encode(HASH_A), "1.2.3", BOOTED_UKI, "boot-2");
        let b = engine::booted(&w.host).unwrap();
        let mut st = w.state();
        let a = engine::reconcile(&w.host, &mut st, &b, &NoopLock).unwrap();
        assert_eq!(a, Assessment::AwaitingReboot, "{what}");
        let st = w.state();
        assert!(st.failed_versions.is_empty(), "{what}: {st:?}");
        assert_eq!(st.state, State::Staged, "{what}");
        let staged = st.staged.unwrap();
        assert_eq!(
            (staged.uki_file.as_str(), staged.boot_id.as_str()),
            (entry, "boot-2")
        );
        assert_eq!(w.esp(), vec![BOOTED_UKI, entry], "{what}");
        assert_eq!(
            std::fs::read(w.root().join("efi/EFI/Linux").join(entry)).unwrap(),
            r.uki,
            "{what}"
        );
        w.assert_running_slot_untouched();
    }
}

/// A power cut during a later check (state `checking`, the earlier update
/// still staged) that also took the staged entry: still put back.
#[test]
fn a_lost_entry_after_a_cut_short_check_is_put_back() {
    let w = world();
    let r = Release::new("1.3.0", 32);
    let m = w.manifest(&r);
    w.publish(&m);
    w.apply(Mode::Now).unwrap();
    let mut st = w.state();
    st.state = State::Checking;
    store::save(&w.host, &mut st).unwrap();
    std::fs::write(w.root().join("efi/EFI/Linux/ballast-1.3.0+3.efi"), b"").unwrap();
    w.reboot_into(&hex::encode(HASH_A), "1.2.3", BOOTED_UKI, "boot-2");
    let b = engine::booted(&w.host).unwrap();
    let mut st = w.state();
    let a = engine::reconcile(&w.host, &mut st, &b, &NoopLock).unwrap();
    assert_eq!(a, Assessment::AwaitingReboot);
    let st = w.state();
    assert_eq!(st.state, State::Staged);
    assert!(st.failed_versions.is_empty());
    assert_eq!(
        std::fs::read(w.root().join("efi/EFI/Linux/ballast-1.3.0+3.efi")).unwrap(),
        r.uki
    );
}

#[test]
fn a_lost_entry_over_a_slot_that_no_longer_verifies_is_applied_again() {
    let w = world();
    let r = Release::new("1.3.0", 32);
    let m = w.manifest(&r);
    w.publish(&m);
    w.apply(Mode::Now).unwrap();
    std::fs::write(w.root().join("efi/EFI/Linux/ballast-1.3.0+3.efi"), b"").unwrap();
    let mut slot = w.dev("vda4");
    slot[5000] ^= 1;
    std::fs::write(w.root().join("dev/vda4"), slot).unwrap();
    w.reboot_into(&hex::encode(HASH_A), "1.2.3", BOOTED_UKI, "boot-2");
    let b = engine::booted(&w.host).unwrap();
    let mut st = w.state();
    let a = engine::reconcile(&w.host, &mut st, &b, &NoopLock).unwrap();
    let Assessment::NeverBooted { version, why } = a else {
        panic!("{a:?}")
    };
    assert_eq!(version, "1.3.0");
    assert!(why.contains("root hash"), "{why}");
    let st = w.state();
    assert!(st.failed_versions.is_empty(), "{st:?}");
    assert_eq!((st.state, st.staged), (State::Idle, None));
    assert!(!w.root().join("var/lib/ballast/update/staged.efi").exists());
    // The next check writes it anew.
    assert!(matches!(w.apply(Mode::Poll).unwrap(), Outcome::Staged(_)));
    assert_eq!(&w.dev("vda4")[..r.root.len()], &r.root[..]);
}

#[test]
fn an_untried_entry_gets_one_more_reboot_then_is_dropped_unfailed() {
    let w = world();
    let m = w.manifest(&Release::new("1.3.0", 32));
    w.publish(&m);
    w.apply(Mode::Now).unwrap();
    // The boot loader chose the old entry: the new one is whole and untried.
    w.reboot_into(&hex::encode(HASH_A), "1.2.3", BOOTED_UKI, "boot-2");
    let b = engine::booted(&w.host).unwrap();
    let mut st = w.state();
    let a = engine::reconcile(&w.host, &mut st, &b, &NoopLock).unwrap();
    assert_eq!(a, Assessment::AwaitingReboot);
    assert_eq!(w.state().staged.unwrap().untried_boots, 1);
    // Again: it stops rebooting for it, and fails nothing.
    w.reboot_into(&hex::encode(HASH_A), "1.2.3", BOOTED_UKI, "boot-3");
    let b = engine::booted(&w.host).unwrap();
    let mut st = w.state();
    let a = engine::reconcile(&w.host, &mut st, &b, &NoopLock).unwrap();
    assert!(
        matches!(&a, Assessment::NeverBooted { why, .. } if why.contains("chose another entry")),
        "{a:?}"
    );
    let st = w.state();
    assert!(st.failed_versions.is_empty(), "{st:?}");
    assert_eq!(st.state, State::Idle);
}

#[test]
fn install_reads_the_entry_back_from_the_disk() {
    let w = world();
    let file = crate::boot::entries::install(&w.host, "ballast", "2.0", b"a whole uki").unwrap();
    assert_eq!(file, "ballast-2.0+3.efi");
    assert_eq!(
        crate::boot::entries::sha256_on_disk(&w.host, &file).unwrap(),
        (11, sha(b"a whole uki"))
    );
    assert_eq!(
        crate::boot::entries::evidence(&w.host, "ballast", "2.0", Some(&sha(b"a whole uki")))
            .unwrap(),
        crate::boot::entries::EntryEvidence::Untried { file: file.clone() }
    );
    assert!(matches!(
        crate::boot::entries::evidence(&w.host, "ballast", "2.0", Some(&sha(b"another"))).unwrap(),
        crate::boot::entries::EntryEvidence::Broken { why } if why.contains("sha256")
    ));
    w.rename_uki(&file, "ballast-2.0+2-1.efi");
    assert!(matches!(
        crate::boot::entries::evidence(&w.host, "ballast", "2.0", Some(&sha(b"a whole uki")))
            .unwrap(),
        crate::boot::entries::EntryEvidence::Tried { .. }
    ));
}

/// Jitter of any size gives a duration, not an overflow (`secs + 1`).
#[test]
fn random_jitter_of_any_size() {
    let max = std::time::Duration::from_secs(u64::MAX);
    assert!(super::agent::random_up_to(max) <= max);
    assert_eq!(
        super::agent::random_up_to(std::time::Duration::ZERO),
        std::time::Duration::ZERO
    );
}

#[test]
fn a_clock_before_the_image_was_built_does_not_check() {
    let built = 1_760_000_000;
    let e = engine::clock_is_plausible(1_000, Some(built)).unwrap_err();
    assert!(
        e.to_string()
            .contains("before this image was built (1760000000)"),
        "{e}"
    );
    engine::clock_is_plausible(built, Some(built)).unwrap();
    engine::clock_is_plausible(built + 1, Some(built)).unwrap();
    engine::clock_is_plausible(1_000, None).unwrap();
}
