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
        .commit_image::<StoreError>(info.clone(), |root| {
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
    let r = store.commit_image::<StoreError>(bad.clone(), |_| {
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
