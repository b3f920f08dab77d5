use super::*;
use std::os::unix::fs::MetadataExt;

/// One tar entry as a test writes it.
#[derive(Clone, Copy)]
enum E {
    Dir(&'static str),
    File(&'static str, &'static str),
    Mode(&'static str, &'static str, u32),
    Sym(&'static str, &'static str),
    Hard(&'static str, &'static str),
    Fifo(&'static str),
}

/// Writes a name without the tar crate's own checks, so bad paths get in.
fn set_raw(field: &mut [u8], value: &str) {
    field.fill(0);
    field[..value.len()].copy_from_slice(value.as_bytes());
}

fn tar(entries: &[E]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for e in entries {
        let mut h = tar::Header::new_old();
        let (path, data, kind, mode, link): (&str, &[u8], tar::EntryType, u32, Option<&str>) =
            match *e {
                E::Dir(p) => (p, b"", tar::EntryType::Directory, 0o755, None),
                E::File(p, c) => (p, c.as_bytes(), tar::EntryType::Regular, 0o644, None),
                E::Mode(p, c, m) => (p, c.as_bytes(), tar::EntryType::Regular, m, None),
                E::Sym(p, t) => (p, b"", tar::EntryType::Symlink, 0o777, Some(t)),
                E::Hard(p, t) => (p, b"", tar::EntryType::Link, 0o644, Some(t)),
                E::Fifo(p) => (p, b"", tar::EntryType::Fifo, 0o644, None),
            };
        set_raw(&mut h.as_old_mut().name, path);
        if let Some(t) = link {
            set_raw(&mut h.as_old_mut().linkname, t);
        }
        h.set_entry_type(kind);
        h.set_mode(mode);
        // uid and gid left empty, as some image tools write them: read as 0.
        h.set_mtime(0);
        h.set_size(data.len() as u64);
        h.set_cksum();
        b.append(&h, data).expect("append");
    }
    b.into_inner().expect("tar")
}

/// The tree under `root` as sorted lines: `d /x`, `f /x content`, `l /x -> t`.
fn tree(root: &Path) -> Vec<String> {
    fn walk(root: &Path, dir: &Path, out: &mut Vec<String>) {
        for e in fs::read_dir(dir).expect("read_dir") {
            let p = e.expect("entry").path();
            let rel = format!("/{}", p.strip_prefix(root).expect("prefix").display());
            let m = fs::symlink_metadata(&p).expect("stat");
            if m.file_type().is_symlink() {
                out.push(format!(
                    "l {rel} -> {}",
                    fs::read_link(&p).expect("readlink").display()
                ));
            } else if m.is_dir() {
                out.push(format!("d {rel}"));
                walk(root, &p, out);
            } else {
                let c = fs::read_to_string(&p).expect("read");
                let links = if m.nlink() > 1 {
                    format!(" (links {})", m.nlink())
                } else {
                    String::new()
                };
                out.push(format!("f {rel} {c}{links}"));
            }
        }
    }
    let mut out = Vec::new();
    walk(root, root, &mut out);
    out.sort();
    out
}

const NO_CHOWN: Options = Options { chown: false };
/// Tests of what a layer does, not of how much it may write.
const NO_LIMIT: u64 = u64::MAX;

fn run(layers: &[&[E]]) -> Result<Vec<String>, String> {
    let dir = tempfile::tempdir().expect("tempdir");
    for l in layers {
        unpack_layer(&tar(l)[..], dir.path(), NO_CHOWN, NO_LIMIT).map_err(|e| e.to_string())?;
    }
    Ok(tree(dir.path()))
}

#[test]
fn layers_table() {
    use E::*;
    type Case = (
        &'static str,
        Vec<&'static [E]>,
        Result<Vec<&'static str>, &'static str>,
    );
    let cases: Vec<Case> = vec![
        (
            "files, dirs, implicit parents, ./ prefix, / and ./ for the root",
            vec![&[
                Dir("./"),
                Dir("./etc"),
                File("./etc/os-release", "x"),
                File("usr/bin/sh", "sh"),
            ]],
            Ok(vec![
                "d /etc",
                "d /usr",
                "d /usr/bin",
                "f /etc/os-release x",
                "f /usr/bin/sh sh",
            ]),
        ),
        (
            "a later layer replaces a file and merges a directory",
            vec![
                &[Dir("a"), File("a/x", "1"), File("a/y", "1")],
                &[Dir("a"), File("a/x", "2")],
            ],
            Ok(vec!["d /a", "f /a/x 2", "f /a/y 1"]),
        ),
        (
            "whiteout removes a lower file and a lower directory",
            vec![
                &[
                    Dir("a"),
                    File("a/x", "1"),
                    File("a/y", "1"),
                    Dir("b"),
                    File("b/z", "1"),
                ],
                &[File("a/.wh.x", ""), File(".wh.b", "")],
            ],
            Ok(vec!["d /a", "f /a/y 1"]),
        ),
        (
            "whiteout of something absent is fine",
            vec![&[File(".wh.nothing", "")]],
            Ok(vec![]),
        ),
        (
            "opaque directory hides the lower contents, keeps this layer's",
            vec![
                &[
                    Dir("a"),
                    File("a/old", "1"),
                    Dir("a/sub"),
                    File("a/sub/f", "1"),
                    File("keep", "k"),
                ],
                &[Dir("a"), File("a/new", "2"), File("a/.wh..wh..opq", "")],
            ],
            Ok(vec!["d /a", "f /a/new 2", "f /keep k"]),
        ),
        (
            "a file replaces a lower directory, a directory a lower file",
            vec![
                &[Dir("a"), File("a/x", "1"), File("b", "1")],
                &[File("a", "f"), Dir("b")],
            ],
            Ok(vec!["d /b", "f /a f"]),
        ),
        (
            "symbolic links, absolute and relative, kept as written",
            vec![&[
                Dir("usr"),
                Dir("usr/bin"),
                Sym("bin", "usr/bin"),
                Sym("usr/bin/sh", "/usr/bin/dash"),
                Sym("usr/bin/up", "../../x"),
            ]],
            Ok(vec![
                "d /usr",
                "d /usr/bin",
                "l /bin -> usr/bin",
                "l /usr/bin/sh -> /usr/bin/dash",
                "l /usr/bin/up -> ../../x",
            ]),
        ),
        (
            "hard link to a file of this and of a lower layer",
            vec![
                &[File("a", "A")],
                &[File("b", "B"), Hard("c", "b"), Hard("d", "./a")],
            ],
            Ok(vec![
                "f /a A (links 2)",
                "f /b B (links 2)",
                "f /c B (links 2)",
                "f /d A (links 2)",
            ]),
        ),
        (
            "a FIFO is skipped",
            vec![&[Fifo("p"), File("f", "1")]],
            Ok(vec!["f /f 1"]),
        ),
        (
            "absolute path",
            vec![&[File("/etc/passwd", "x")]],
            Err("layer entry \"/etc/passwd\": absolute path"),
        ),
        (
            "dot-dot",
            vec![&[File("a/../../x", "x")]],
            Err("layer entry \"a/../../x\": path contains `..`"),
        ),
        (
            "dot-dot that stays inside is refused too",
            vec![&[Dir("a"), File("a/../x", "x")]],
            Err("path contains `..`"),
        ),
        (
            "writing through a symlink in this layer",
            vec![&[Sym("etc", "/etc"), File("etc/passwd", "x")]],
            Err("layer entry \"etc/passwd\": writes through the symbolic link /etc"),
        ),
        (
            "writing through a symlink from a lower layer",
            vec![&[Sym("d", "../../../tmp")] as &[E], &[File("d/x", "x")]],
            Err("points outside the root"),
        ),
        (
            "writing through a relative symlink inside the root",
            vec![
                &[Dir("real"), Sym("d", "real")] as &[E],
                &[File("d/x", "x")],
            ],
            Err("writes through the symbolic link /d"),
        ),
        (
            "relative symlink climbing out",
            vec![&[Dir("a"), Sym("a/l", "../../etc/shadow")]],
            Err("layer entry \"a/l\": symbolic link to ../../etc/shadow points outside the root"),
        ),
        (
            "absolute symlink climbing above /",
            vec![&[Sym("l", "/../../etc")]],
            Err("points outside the root"),
        ),
        (
            "hard link outside",
            vec![&[Hard("h", "../../etc/passwd")]],
            Err("layer entry \"h\": hard link to ../../etc/passwd points outside the root"),
        ),
        (
            "hard link absolute",
            vec![&[Hard("h", "/etc/passwd")]],
            Err("points outside the root"),
        ),
        (
            "hard link to nothing",
            vec![&[Hard("h", "missing")]],
            Err("layer entry \"h\": hard link to missing:"),
        ),
        (
            "hard link to a directory",
            vec![&[Dir("d"), Hard("h", "d")]],
            Err("hard link to d, not a file"),
        ),
        (
            "hard link through a symlink",
            vec![&[
                Dir("real"),
                File("real/f", "1"),
                Sym("s", "real"),
                Hard("h", "s/f"),
            ]],
            Err("writes through the symbolic link /s"),
        ),
        (
            "a file as a parent",
            vec![&[File("f", "1"), File("f/x", "2")]],
            Err("layer entry \"f/x\": /f is not a directory"),
        ),
        (
            "whiteout of ..",
            vec![&[File("a/.wh...", "")]],
            Err("whiteout of nothing"),
        ),
    ];
    for (what, layers, want) in cases {
        let got = run(&layers);
        match (got, want) {
            (Ok(t), Ok(w)) => assert_eq!(t, w, "{what}"),
            (Err(e), Err(w)) => assert!(e.contains(w), "{what}: {e:?} does not contain {w:?}"),
            (got, want) => panic!("{what}: got {got:?}, want {want:?}"),
        }
    }
}

#[test]
fn escaping_layers_leave_the_outside_alone() {
    let outer = tempfile::tempdir().expect("tempdir");
    let root = outer.path().join("root");
    fs::create_dir(&root).expect("mkdir");
    let layer = tar(&[E::Sym("out", ".."), E::File("out/escaped", "x")]);
    assert!(unpack_layer(&layer[..], &root, NO_CHOWN, NO_LIMIT).is_err());
    assert!(!outer.path().join("escaped").exists());
}

#[test]
fn directory_modes_never_follow_a_later_symlink() {
    let outer = tempfile::tempdir().expect("tempdir");
    let root = outer.path().join("root");
    let victim = outer.path().join("victim");
    fs::create_dir(&root).expect("mkdir");
    fs::create_dir(&victim).expect("mkdir");
    fs::set_permissions(&victim, fs::Permissions::from_mode(0o755)).expect("chmod");
    let victim_s: &'static str = Box::leak(victim.display().to_string().into_boxed_str());
    // "a/" (mode 0777) then "a" becomes a symlink to the victim: its deferred
    // mode must not land on the victim. Absolute targets are allowed (they
    // resolve inside the container), so only the chmod could escape.
    let layer = tar(&[
        E::Dir("a"),
        E::Dir("b"),
        E::Dir("b/c"),
        E::Sym("a", victim_s),
        E::Sym("b", victim_s),
    ]);
    let mut bytes = layer;
    // Give the directory entries mode 0777 (tar() writes 0755).
    for off in [0usize, 512, 1024] {
        bytes[off + 100..off + 108].copy_from_slice(b"0000777\0");
        bytes[off + 148..off + 156].fill(b' ');
        let sum: u32 = bytes[off..off + 512].iter().map(|b| u32::from(*b)).sum();
        bytes[off + 148..off + 156].copy_from_slice(format!("{sum:06o}\0 ").as_bytes());
    }
    unpack_layer(&bytes[..], &root, NO_CHOWN, NO_LIMIT).expect("unpack");
    assert_eq!(fs::metadata(&victim).expect("stat").mode() & 0o7777, 0o755);
    assert!(fs::symlink_metadata(root.join("a"))
        .expect("stat")
        .file_type()
        .is_symlink());
}

/// As root, owners are applied and setuid bits survive them.
#[test]
fn owners_and_setuid_as_root() {
    if !rustix::process::geteuid().is_root() {
        eprintln!("skipped: needs root to chown");
        return;
    }
    let mut b = tar::Builder::new(Vec::new());
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(tar::EntryType::Regular);
    h.set_mode(0o4755);
    h.set_uid(1234);
    h.set_gid(5678);
    h.set_mtime(1_600_000_000);
    h.set_size(2);
    b.append_data(&mut h, "su", &b"#!"[..]).expect("append");
    let mut l = tar::Header::new_gnu();
    l.set_entry_type(tar::EntryType::Link);
    l.set_mode(0o4755);
    l.set_uid(1234);
    l.set_gid(5678);
    l.set_size(0);
    b.append_link(&mut l, "su-again", "su").expect("append");
    let layer = b.into_inner().expect("tar");
    let dir = tempfile::tempdir().expect("tempdir");
    unpack_layer(&layer[..], dir.path(), Options { chown: true }, NO_LIMIT).expect("unpack");
    let m = fs::metadata(dir.path().join("su")).expect("stat");
    assert_eq!(m.mtime(), 1_600_000_000, "mtime kept");
    assert_eq!((m.uid(), m.gid(), m.mode() & 0o7777), (1234, 5678, 0o4755));
    assert_eq!(m.nlink(), 2);
}

#[test]
fn compressed_layers_and_modes() {
    let plain = tar(&[
        E::Dir("d"),
        E::Mode("d/run", "#!", 0o4755),
        E::Mode("secret", "s", 0o600),
    ]);
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    io::Write::write_all(&mut gz, &plain).expect("gzip");
    let gz = gz.finish().expect("gzip");
    let zst = zstd::encode_all(&plain[..], 1).expect("zstd");
    let diff_id = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(&plain));
    for (what, bytes) in [("plain", &plain), ("gzip", &gz), ("zstd", &zst)] {
        let dir = tempfile::tempdir().expect("tempdir");
        let got = unpack_layer(&bytes[..], dir.path(), NO_CHOWN, NO_LIMIT).expect(what);
        // The diff_id is the uncompressed tar's, end-of-archive blocks included.
        assert_eq!(got.diff_id, diff_id, "{what}");
        let mode = |p: &str| fs::metadata(dir.path().join(p)).expect("stat").mode() & 0o7777;
        assert_eq!((mode("d/run"), mode("secret")), (0o4755, 0o600), "{what}");
    }
}

#[test]
fn truncated_and_garbage_layers_are_errors() {
    let full = tar(&[E::File("a", "0123456789")]);
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("truncated", full[..600].to_vec()),
        ("gzip garbage", vec![0x1f, 0x8b, 1, 2, 3, 4, 5, 6, 7]),
        ("zstd garbage", vec![0x28, 0xb5, 0x2f, 0xfd, 9, 9, 9, 9]),
        ("garbage owner id", {
            let mut t = full.clone();
            // uid is bytes 108..116 of the header, the checksum 148..156.
            set_raw(&mut t[108..116], "zz");
            t[148..156].fill(b' ');
            let sum: u32 = t[..512].iter().map(|b| u32::from(*b)).sum();
            t[148..156].copy_from_slice(format!("{sum:06o}\0 ").as_bytes());
            t
        }),
        ("bad header checksum", {
            let mut t = full.clone();
            t[0] ^= 0xff;
            t
        }),
    ];
    for (what, bytes) in cases {
        let dir = tempfile::tempdir().expect("tempdir");
        let e = unpack_layer(&bytes[..], dir.path(), NO_CHOWN, NO_LIMIT);
        assert!(e.is_err(), "{what}: {e:?}");
    }
}

/// `setcap cap_net_raw+ep` (a v2 `vfs_cap_data`), as Debian's /usr/bin/ping has.
const CAP_NET_RAW_EP: [u8; 20] = [
    0x01, 0x00, 0x00, 0x02, 0x00, 0x20, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
    0x00, 0x00, 0x00, 0x00,
];

/// A layer whose entries carry PAX `SCHILY.xattr.*` records, as docker and
/// containers/image write them.
fn layer_with_xattrs(owner: u64) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    let mut add =
        |path: &str, kind: tar::EntryType, link: Option<&str>, xattrs: &[(&str, &[u8])]| {
            b.append_pax_extensions(xattrs.iter().map(|(k, v)| (*k, *v)))
                .expect("pax");
            let mut h = tar::Header::new_ustar();
            h.set_entry_type(kind);
            h.set_mode(if kind.is_dir() { 0o755 } else { 0o4755 });
            h.set_uid(owner);
            h.set_gid(owner);
            h.set_mtime(0);
            let data: &[u8] = if kind == tar::EntryType::Regular {
                b"#!"
            } else {
                b""
            };
            h.set_size(data.len() as u64);
            match link {
                Some(t) => b.append_link(&mut h, path, t).expect("append"),
                None => b.append_data(&mut h, path, data).expect("append"),
            }
        };
    add(
        "usr/",
        tar::EntryType::Directory,
        None,
        &[("SCHILY.xattr.user.dir", b"on a directory")],
    );
    add(
        "usr/ping",
        tar::EntryType::Regular,
        None,
        &[
            ("SCHILY.xattr.security.capability", &CAP_NET_RAW_EP),
            ("SCHILY.xattr.user.test", b"kept"),
            // Neither is the image's to set on the host: ignored.
            ("SCHILY.xattr.trusted.overlay.opaque", b"y"),
            (
                "SCHILY.xattr.security.selinux",
                b"system_u:object_r:bin_t:s0",
            ),
        ],
    );
    add(
        "link",
        tar::EntryType::Symlink,
        Some("usr/ping"),
        // The kernel takes no user.* attribute on a symbolic link: skipped.
        &[("SCHILY.xattr.user.link", b"x")],
    );
    b.into_inner().expect("tar")
}

fn xattr(p: &Path, name: &str) -> Option<Vec<u8>> {
    let mut buf = vec![0u8; 256];
    match rustix::fs::lgetxattr(p, name, &mut buf[..]) {
        Ok(n) => Some(buf[..n].to_vec()),
        Err(rustix::io::Errno::NODATA) => None,
        Err(e) => panic!("getxattr {} {name}: {e}", p.display()),
    }
}

/// Debian's ping loses its capability if `security.capability` is dropped;
/// `user.*` attributes are the image's own. Others are not applied.
#[test]
fn extended_attributes_as_root() {
    if !rustix::process::geteuid().is_root() {
        eprintln!("skipped: needs root to set security.capability");
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path();
    // Owners applied: the capability must be set after the chown, which clears it.
    unpack_layer(
        &layer_with_xattrs(0)[..],
        root,
        Options { chown: true },
        NO_LIMIT,
    )
    .expect("unpack");
    let ping = root.join("usr/ping");
    assert_eq!(
        xattr(&ping, "security.capability").as_deref(),
        Some(&CAP_NET_RAW_EP[..])
    );
    assert_eq!(xattr(&ping, "user.test").as_deref(), Some(&b"kept"[..]));
    assert_eq!(xattr(&ping, "trusted.overlay.opaque"), None);
    assert_eq!(
        xattr(&root.join("usr"), "user.dir").as_deref(),
        Some(&b"on a directory"[..])
    );
    assert_eq!(xattr(&root.join("link"), "user.link"), None);
    // The capability does not cost the setuid bit either.
    assert_eq!(fs::metadata(&ping).expect("stat").mode() & 0o7777, 0o4755);
}

/// Without owners (not root), `user.*` attributes are still applied and
/// capabilities are not (only root may set them).
#[test]
fn user_extended_attributes_without_owners() {
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path();
    unpack_layer(&layer_with_xattrs(1000)[..], root, NO_CHOWN, NO_LIMIT).expect("unpack");
    let ping = root.join("usr/ping");
    assert_eq!(xattr(&ping, "user.test").as_deref(), Some(&b"kept"[..]));
    assert_eq!(xattr(&ping, "security.capability"), None);
}

/// A layer that decompresses to far more than it weighs: refused as soon as
/// an entry would pass the limit, before that entry is written.
#[test]
fn unpacking_stops_at_the_limit() {
    // 64 MiB of zeros: a gzip layer of about 64 KiB.
    let big = vec![0u8; 64 << 20];
    let mut b = tar::Builder::new(Vec::new());
    let mut h = tar::Header::new_gnu();
    h.set_mode(0o644);
    h.set_size(5);
    b.append_data(&mut h, "small", &b"small"[..])
        .expect("append");
    h.set_size(big.len() as u64);
    b.append_data(&mut h, "big", &big[..]).expect("append");
    let plain = b.into_inner().expect("tar");
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    io::Write::write_all(&mut gz, &plain).expect("gzip");
    let gz = gz.finish().expect("gzip");
    assert!(gz.len() < 1 << 20, "{} bytes", gz.len());

    let dir = tempfile::tempdir().expect("tempdir");
    let e = unpack_layer(&gz[..], dir.path(), NO_CHOWN, 1 << 20).expect_err("64 MiB in 1 MiB");
    assert!(
        matches!(&e, UnpackError::Quota { entry, limit: 1048576 } if entry == "big"),
        "{e}"
    );
    assert!(e.to_string().contains("more than the 1048576 bytes"), "{e}");
    assert_eq!(
        tree(dir.path()),
        ["f /small small"],
        "the big file was written"
    );

    // The uncompressed stream is what counts: exactly its size is enough.
    let one = tar(&[E::File("a", "0123456789")]);
    let size = one.len() as u64;
    let dir = tempfile::tempdir().expect("tempdir");
    let got = unpack_layer(&one[..], dir.path(), NO_CHOWN, size).expect("at the limit");
    assert_eq!(got.bytes, size);
    let dir = tempfile::tempdir().expect("tempdir");
    let e = unpack_layer(&one[..], dir.path(), NO_CHOWN, size - 1).expect_err("a byte short");
    assert!(matches!(e, UnpackError::Quota { .. }), "{e}");
}

/// Whatever follows the end of the archive is part of the diff_id and of
/// the cost: zeros after it cannot make the unpacker hash without end.
#[test]
fn data_after_the_archive_counts() {
    let mut plain = tar(&[E::File("a", "x")]);
    plain.extend(vec![0u8; 4 << 20]);
    let dir = tempfile::tempdir().expect("tempdir");
    let e = unpack_layer(&plain[..], dir.path(), NO_CHOWN, 1 << 20).expect_err("4 MiB of zeros");
    assert!(matches!(e, UnpackError::Quota { .. }), "{e}");
    let dir = tempfile::tempdir().expect("tempdir");
    let got = unpack_layer(&plain[..], dir.path(), NO_CHOWN, NO_LIMIT).expect("unpack");
    assert_eq!(
        got.diff_id,
        hex::encode(<sha2::Sha256 as sha2::Digest>::digest(&plain))
    );
}
