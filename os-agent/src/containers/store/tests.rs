use super::*;

fn digest_of(b: &[u8]) -> Digest {
    Digest::from_sha256_hex(&hex::encode(<sha2::Sha256 as sha2::Digest>::digest(b)))
        .expect("digest")
}

#[test]
fn put_blob_table() {
    let good = b"hello blob".as_slice();
    let d = digest_of(good);
    let other = digest_of(b"something else");
    type Case<'a> = (&'a str, &'a Digest, u64, &'a [u8], Result<(), &'a str>);
    let cases: Vec<Case> = vec![
        ("good", &d, 10, good, Ok(())),
        ("wrong digest", &other, 10, good, Err("content has digest")),
        (
            "short",
            &d,
            11,
            good,
            Err("10 bytes where the descriptor says 11"),
        ),
        ("long", &d, 9, good, Err("where the descriptor says 9")),
        ("empty", &d, 0, b"", Err("content has digest")),
    ];
    for (what, digest, size, content, want) in cases {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path()).expect("open");
        match (store.put_blob(digest, size, content), want) {
            (Ok(p), Ok(())) => assert_eq!(fs::read(p).expect("read"), content, "{what}"),
            (Err(e), Err(w)) => {
                assert!(e.to_string().contains(w), "{what}: {e}");
                assert!(!store.has_blob(digest), "{what}: a refused blob was kept");
                assert_eq!(
                    fs::read_dir(dir.path().join("tmp")).expect("tmp").count(),
                    0,
                    "{what}: temp left"
                );
            }
            (got, want) => panic!("{what}: got {got:?}, want {want:?}"),
        }
    }
}

#[test]
fn read_blob_rechecks_the_disk() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Store::open(dir.path()).expect("open");
    let d = digest_of(b"abc");
    store.put_blob(&d, 3, &b"abc"[..]).expect("put");
    assert_eq!(store.read_blob(&d).expect("read"), b"abc");
    fs::write(store.blob_path(&d), b"abd").expect("corrupt");
    let e = store.read_blob(&d).expect_err("corrupt blob");
    assert!(e.to_string().contains("content has digest"), "{e}");
}

fn add_image(store: &Store, name: &str) -> ImageInfo {
    let blobs: Vec<Digest> = ["m", "c", "l"]
        .iter()
        .map(|k| {
            let content = format!("{name}-{k}");
            let d = digest_of(content.as_bytes());
            store
                .put_blob(&d, content.len() as u64, content.as_bytes())
                .expect("put");
            d
        })
        .collect();
    let info = ImageInfo {
        reference: format!("r.example/{name}:1"),
        manifest: blobs[0].clone(),
        index: None,
        config_digest: blobs[1].clone(),
        layers: vec![blobs[2].clone()],
        config: RunConfig::default(),
    };
    store
        .commit_image::<StoreError>(info.clone(), |root, _| {
            fs::write(root.join("f"), name).map_err(io_err("write"))
        })
        .expect("commit");
    store.set_ref(&info.reference, &info.manifest).expect("ref");
    info
}

#[test]
fn images_refs_and_gc() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Store::open(dir.path()).expect("open");
    let a = add_image(&store, "a");
    let b = add_image(&store, "b");
    let img = store.image(&a.manifest).expect("image").expect("present");
    assert_eq!(fs::read_to_string(img.rootfs.join("f")).expect("read"), "a");
    // nspawn wants a /usr; the image had none.
    assert!(img.rootfs.join("usr").is_dir());
    assert_eq!(store.refs().expect("refs").len(), 2);

    // A failed unpack leaves nothing behind.
    let bad = ImageInfo {
        manifest: digest_of(b"never"),
        ..a.clone()
    };
    let r = store.commit_image::<StoreError>(bad.clone(), |_, _| {
        Err(io_err("unpack")(io::Error::other("boom")))
    });
    assert!(r.is_err());
    assert_eq!(store.image(&bad.manifest).expect("image"), None);

    let keep: BTreeSet<Digest> = [a.manifest.clone()].into();
    let got = store.gc(&keep).expect("gc");
    assert_eq!(got.images, vec![b.manifest.clone()]);
    let mut want_blobs = vec![
        b.manifest.clone(),
        b.config_digest.clone(),
        b.layers[0].clone(),
    ];
    want_blobs.sort();
    let mut got_blobs = got.blobs.clone();
    got_blobs.sort();
    assert_eq!(got_blobs, want_blobs);
    assert!(store.image(&a.manifest).expect("image").is_some());
    assert!(store.has_blob(&a.layers[0]));
    assert_eq!(
        store.refs().expect("refs").keys().collect::<Vec<_>>(),
        [&a.reference]
    );

    // Nothing kept: everything goes.
    let got = store.gc(&BTreeSet::new()).expect("gc");
    assert_eq!(got.images, vec![a.manifest.clone()]);
    assert_eq!(
        fs::read_dir(dir.path().join("blobs/sha256"))
            .expect("ls")
            .count(),
        0
    );
}

/// The attack: a pulled image with a setuid-root binary, run by a local
/// user from the store on the host. The store's root lets nobody but root
/// through, also when an older agent made it 0755.
#[test]
fn local_users_cannot_reach_the_images() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path().join("images");
    fs::create_dir_all(&root).expect("mkdir");
    fs::set_permissions(&root, fs::Permissions::from_mode(0o755)).expect("chmod");
    let store = Store::open(&root).expect("open");
    let mode = fs::metadata(store.root())
        .expect("stat")
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o700, "store root is {mode:o}");
}

fn info_for(name: &str) -> ImageInfo {
    ImageInfo {
        reference: format!("r.example/{name}:1"),
        manifest: digest_of(name.as_bytes()),
        index: None,
        config_digest: digest_of(b"c"),
        layers: vec![],
        config: RunConfig::default(),
    }
}

fn tmp_is_empty(store: &Store) -> bool {
    fs::read_dir(store.root().join("tmp")).expect("tmp").count() == 0
}

/// An image that unpacks to more than one image may, or to more than the
/// store has left, is refused and leaves nothing, even when what filled it
/// ignored the room it was given: the store measures what is there.
#[test]
fn quotas_per_image_and_store_wide() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Store::open(dir.path()).expect("open").with_quota(Quota {
        image: 16 << 10,
        store: 64 << 10,
    });
    let write = |n: usize| {
        move |root: &Path, _: &Room| -> Result<(), StoreError> {
            fs::write(root.join("f"), vec![0u8; n]).map_err(io_err("write"))
        }
    };
    let e = store
        .commit_image(info_for("big"), write(20 << 10))
        .expect_err("20 KiB in a 16 KiB image");
    assert!(matches!(e, StoreError::Quota { .. }), "{e}");
    assert!(
        e.to_string()
            .contains("the limit for one image is 16384 bytes"),
        "{e}"
    );
    assert_eq!(store.image(&info_for("big").manifest).expect("image"), None);
    assert!(tmp_is_empty(&store), "work left in tmp/");

    // 40 KiB of blobs: 24 KiB left, less 512 bytes per entry.
    let blob = vec![7u8; 40 << 10];
    store
        .put_blob(&digest_of(&blob), blob.len() as u64, &blob[..])
        .expect("put");
    let mut given = 0;
    store
        .commit_image(info_for("fits"), |root, room| {
            given = room.bytes;
            fs::write(root.join("f"), vec![0u8; 10 << 10]).map_err(io_err("write"))
        })
        .expect("10 KiB fits");
    assert_eq!(given, 16 << 10, "the image limit was the smaller");
    let e = store
        .commit_image(info_for("over"), |root, room| {
            given = room.bytes;
            fs::write(root.join("f"), vec![0u8; 12 << 10]).map_err(io_err("write"))
        })
        .expect_err("the store is full");
    assert!(given < 12 << 10, "room {given}");
    assert!(e.to_string().contains("of its 65536 bytes"), "{e}");
    assert_eq!(
        store.image(&info_for("over").manifest).expect("image"),
        None
    );
    assert!(tmp_is_empty(&store), "work left in tmp/");

    // Blobs are checked before they are fetched.
    let e = store
        .check_room("image x", 20 << 10)
        .expect_err("20 KiB more blobs");
    assert!(e.to_string().contains("image x"), "{e}");
    store
        .check_room("image x", 1 << 10)
        .expect("1 KiB more fits");
}

/// The default: one image up to 16 GiB, the store up to half its filesystem.
#[test]
fn default_quota() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Store::open(dir.path()).expect("open");
    let fs = rustix::fs::statvfs(dir.path()).expect("statvfs");
    assert_eq!(
        store.quota(),
        Quota {
            image: MAX_IMAGE_BYTES,
            store: fs.f_blocks * fs.f_frsize / 2,
        }
    );
}

/// Before an image counts as complete, every file and directory of its tree
/// is synced (hard links once), without following a symbolic link out.
#[test]
fn the_whole_tree_is_synced_and_measured() {
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path();
    fs::create_dir_all(root.join("a/b")).expect("mkdir");
    fs::write(root.join("a/one"), b"12345").expect("write");
    fs::write(root.join("a/b/two"), b"123").expect("write");
    fs::hard_link(root.join("a/one"), root.join("a/b/again")).expect("link");
    std::os::unix::fs::symlink("/etc/passwd", root.join("out")).expect("symlink");
    let t = sync_tree(root).expect("sync");
    assert_eq!(
        t,
        Tree {
            files: 2,
            dirs: 3,
            // 5 + 3 bytes of content, 512 for each of the six entries.
            bytes: 8 + 6 * 512,
        }
    );
}
