use super::*;
use crate::host::{CmdOutput, DirHost};
use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

/// A host tree with a kernel command line and nothing else.
fn host(cmdline: &str) -> (tempfile::TempDir, DirHost) {
    let dir = tempfile::tempdir().unwrap();
    let host = DirHost::new(dir.path()).unwrap();
    put(&host, "/proc/cmdline", cmdline.as_bytes());
    (dir, host)
}

fn put(host: &DirHost, path: &str, contents: &[u8]) {
    let p = host.path(Path::new(path));
    std::fs::create_dir_all(p.parent().unwrap()).unwrap();
    std::fs::write(p, contents).unwrap();
}

fn ok_output(stdout: &str) -> CmdOutput {
    CmdOutput {
        code: Some(0),
        stdout: stdout.into(),
        stderr: String::new(),
    }
}

fn failed_output(code: i32, stderr: &str) -> CmdOutput {
    CmdOutput {
        code: Some(code),
        stdout: String::new(),
        stderr: stderr.into(),
    }
}

fn opts() -> DiscoverOptions {
    DiscoverOptions {
        url_timeout: Duration::from_secs(5),
        seed_wait: Duration::from_millis(0),
    }
}

fn programs(host: &DirHost) -> Vec<String> {
    host.commands().iter().map(|c| c.join(" ")).collect()
}

#[test]
fn source_kind_display() {
    for (kind, want) in [
        (
            SourceKind::KernelCmdlineUrl("http://x/u".into()),
            "url http://x/u",
        ),
        (SourceKind::FwCfg, "fw_cfg"),
        (
            SourceKind::NoCloud {
                device: "/dev/vdb".into(),
            },
            "nocloud /dev/vdb",
        ),
    ] {
        assert_eq!(kind.to_string(), want);
    }
}

#[test]
fn config_url_from_cmdline() {
    for (cmdline, want) in [
        ("quiet ro", None),
        ("ballast.config_url=http://a/b ro", Some("http://a/b")),
        // The last one wins, as for the kernel's own parameters.
        (
            "ballast.config_url=http://a ballast.config_url=https://b/c?x=1&y=2\n",
            Some("https://b/c?x=1&y=2"),
        ),
        (
            "a \"ballast.config_url=http://h/with space\" b",
            Some("http://h/with space"),
        ),
        ("ballast.config_url_other=http://no", None),
        ("xballast.config_url=http://no", None),
        ("ballast.config_url=", Some("")),
    ] {
        assert_eq!(config_url(cmdline).as_deref(), want, "{cmdline:?}");
    }
}

#[test]
fn nothing_anywhere_is_none_after_trying_modprobe_and_blkid() {
    let (_d, host) = host("ro quiet\n");
    host.set_output("blkid", failed_output(2, ""));
    assert_eq!(discover_with(&host, &opts()).unwrap(), None);
    let ran = programs(&host);
    assert_eq!(
        ran,
        [
            "modprobe qemu_fw_cfg",
            "blkid -c /dev/null -o device -t LABEL=cidata",
            "blkid -c /dev/null -o device -t LABEL=CIDATA",
        ]
    );
}

#[test]
fn missing_fw_cfg_module_is_not_an_error() {
    let (_d, host) = host("ro\n");
    host.set_output(
        "modprobe",
        failed_output(1, "modprobe: FATAL: Module qemu_fw_cfg not found"),
    );
    host.set_output("blkid", failed_output(2, ""));
    assert_eq!(discover_with(&host, &opts()).unwrap(), None);
}

#[test]
fn missing_proc_cmdline_is_an_error_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let host = DirHost::new(dir.path()).unwrap();
    let err = discover_with(&host, &opts()).unwrap_err();
    assert!(err.to_string().contains("/proc/cmdline"), "{err}");
}

#[test]
fn fw_cfg_paths() {
    assert_eq!(
        fw_cfg_path(FW_CFG_USER_DATA),
        Path::new("/sys/firmware/qemu_fw_cfg/by_name/opt/org.ballast/user-data/raw")
    );
    assert_eq!(
        fw_cfg_path(FW_CFG_META_DATA),
        Path::new("/sys/firmware/qemu_fw_cfg/by_name/opt/org.ballast/meta-data/raw")
    );
}

#[test]
fn fw_cfg_user_and_meta_data() {
    let (_d, host) = host("ro\n");
    put(
        &host,
        "/sys/firmware/qemu_fw_cfg/by_name/opt/org.ballast/user-data/raw",
        b"#cloud-config\nhostname: a\n",
    );
    put(
        &host,
        "/sys/firmware/qemu_fw_cfg/by_name/opt/org.ballast/meta-data/raw",
        b"instance-id: i-1\n",
    );
    let doc = discover_with(&host, &opts()).unwrap().unwrap();
    assert_eq!(
        doc,
        UserDataDoc {
            source: SourceKind::FwCfg,
            user_data: b"#cloud-config\nhostname: a\n".to_vec(),
            meta_data: Some(b"instance-id: i-1\n".to_vec()),
            network_config: None,
            warnings: Vec::new(),
        }
    );
    // The driver was there already: no modprobe, and no seed lookup.
    assert!(host.commands().is_empty(), "{:?}", host.commands());
}

#[test]
fn fw_cfg_without_our_file_falls_through_to_the_seed() {
    let (_d, host) = host("ro\n");
    put(
        &host,
        "/sys/firmware/qemu_fw_cfg/by_name/etc/boot-menu-wait/raw",
        b"x",
    );
    host.set_output("blkid", failed_output(2, ""));
    assert_eq!(discover_with(&host, &opts()).unwrap(), None);
    assert!(programs(&host).iter().any(|c| c.starts_with("blkid")));
}

#[test]
fn unreadable_fw_cfg_file_is_an_error_naming_it() {
    let (_d, host) = host("ro\n");
    // A directory where the file should be: reading it fails (EISDIR).
    std::fs::create_dir_all(host.path(Path::new(
        "/sys/firmware/qemu_fw_cfg/by_name/opt/org.ballast/user-data/raw",
    )))
    .unwrap();
    let err = discover_with(&host, &opts()).unwrap_err().to_string();
    assert!(
        err.contains("fw_cfg /sys/firmware/qemu_fw_cfg/by_name/opt/org.ballast/user-data/raw"),
        "{err}"
    );
}

/// A seed volume: a by-label link to a device node, and the files the
/// (recorded, not run) mount would show on the mktemp directory.
fn seed_host(label: &str, files: &[(&str, &[u8])]) -> (tempfile::TempDir, DirHost) {
    let (d, host) = host("ro\n");
    put(&host, "/dev/vdb", b"");
    let link = host.path(Path::new("/dev/disk/by-label")).join(label);
    std::fs::create_dir_all(link.parent().unwrap()).unwrap();
    std::os::unix::fs::symlink("../../vdb", &link).unwrap();
    host.set_output("mktemp", ok_output("/run/ballast-seed.abc123\n"));
    for (name, contents) in files {
        put(&host, &format!("/run/ballast-seed.abc123/{name}"), contents);
    }
    (d, host)
}

#[test]
fn nocloud_seed_by_label_mounts_reads_and_unmounts() {
    for label in SEED_LABELS {
        let (_d, host) = seed_host(
            label,
            &[
                ("user-data", b"#cloud-config\n"),
                ("meta-data", b"instance-id: i-2\n"),
                ("network-config", b"version: 2\n"),
            ],
        );
        let doc = discover_with(&host, &opts()).unwrap().unwrap();
        assert_eq!(
            doc,
            UserDataDoc {
                source: SourceKind::NoCloud {
                    device: "/dev/vdb".into()
                },
                user_data: b"#cloud-config\n".to_vec(),
                meta_data: Some(b"instance-id: i-2\n".to_vec()),
                network_config: Some(b"version: 2\n".to_vec()),
                warnings: Vec::new(),
            },
            "{label}"
        );
        assert_eq!(
            programs(&host),
            [
                "modprobe qemu_fw_cfg",
                "mktemp -d /run/ballast-seed.XXXXXX",
                "mount -t iso9660,vfat -o ro,nodev,nosuid,noexec /dev/vdb /run/ballast-seed.abc123",
                "umount /run/ballast-seed.abc123",
                "rmdir /run/ballast-seed.abc123",
            ],
            "{label}"
        );
    }
}

#[test]
fn nocloud_seed_meta_data_and_network_config_are_optional() {
    let (_d, host) = seed_host("cidata", &[("user-data", b"#cloud-config\n")]);
    let doc = discover_with(&host, &opts()).unwrap().unwrap();
    assert_eq!(doc.meta_data, None);
    assert_eq!(doc.network_config, None);
}

#[test]
fn nocloud_seed_without_user_data_is_an_error_and_still_unmounts() {
    let (_d, host) = seed_host("cidata", &[("meta-data", b"instance-id: x\n")]);
    let err = discover_with(&host, &opts()).unwrap_err().to_string();
    assert!(err.contains("NoCloud seed /dev/vdb"), "{err}");
    assert!(err.contains("reading user-data"), "{err}");
    let ran = programs(&host);
    assert!(
        ran.contains(&"umount /run/ballast-seed.abc123".to_string()),
        "{ran:?}"
    );
    assert!(
        ran.contains(&"rmdir /run/ballast-seed.abc123".to_string()),
        "{ran:?}"
    );
}

#[test]
fn unreadable_seed_file_names_device_and_file() {
    let (_d, host) = seed_host("cidata", &[("user-data", b"#cloud-config\n")]);
    // A directory where meta-data should be: reading it fails.
    std::fs::create_dir_all(host.path(Path::new("/run/ballast-seed.abc123/meta-data"))).unwrap();
    let err = discover_with(&host, &opts()).unwrap_err().to_string();
    assert!(
        err.starts_with("NoCloud seed /dev/vdb: reading meta-data: "),
        "{err}"
    );
    assert!(programs(&host).iter().any(|c| c.starts_with("umount")));
}

#[test]
fn seed_that_does_not_mount_is_an_error_naming_the_device() {
    let (_d, host) = seed_host("cidata", &[("user-data", b"#cloud-config\n")]);
    host.set_output(
        "mount",
        failed_output(32, "mount: wrong fs type, bad option, bad superblock"),
    );
    let err = discover_with(&host, &opts()).unwrap_err().to_string();
    assert!(err.contains("NoCloud seed /dev/vdb: mounting"), "{err}");
    assert!(err.contains("bad superblock"), "{err}");
    let ran = programs(&host);
    assert!(!ran.iter().any(|c| c.starts_with("umount")), "{ran:?}");
    assert!(ran.iter().any(|c| c.starts_with("rmdir")), "{ran:?}");
}

#[test]
fn failed_umount_is_only_a_warning() {
    let (_d, host) = seed_host("cidata", &[("user-data", b"#cloud-config\n")]);
    host.set_output("umount", failed_output(32, "target is busy"));
    let doc = discover_with(&host, &opts()).unwrap().unwrap();
    assert_eq!(doc.user_data, b"#cloud-config\n");
}

#[test]
fn seed_found_by_blkid_when_udev_made_no_link() {
    let (_d, host) = host("ro\n");
    host.set_output(
        "blkid -c /dev/null -o device -t LABEL=cidata",
        failed_output(2, ""),
    );
    host.set_output(
        "blkid -c /dev/null -o device -t LABEL=CIDATA",
        ok_output("/dev/sr0\n"),
    );
    host.set_output("mktemp", ok_output("/run/ballast-seed.q\n"));
    put(&host, "/run/ballast-seed.q/user-data", b"#cloud-config\n");
    let doc = discover_with(&host, &opts()).unwrap().unwrap();
    assert_eq!(
        doc.source,
        SourceKind::NoCloud {
            device: "/dev/sr0".into()
        }
    );
}

#[test]
fn blkid_failure_is_an_error() {
    let (_d, host) = host("ro\n");
    host.set_output("blkid", failed_output(4, "blkid: bad usage"));
    let err = discover_with(&host, &opts()).unwrap_err().to_string();
    assert!(
        err.contains("blkid -c /dev/null -o device -t LABEL=cidata"),
        "{err}"
    );
    assert!(err.contains("exit code 4"), "{err}");
}

#[test]
fn waits_for_udev_queue_only_while_it_exists() {
    let (_d, host) = host("ro\n");
    host.set_output("blkid", failed_output(2, ""));
    put(&host, "/run/udev/queue", b"");
    let o = DiscoverOptions {
        url_timeout: Duration::from_secs(1),
        seed_wait: Duration::from_millis(600),
    };
    let started = Instant::now();
    assert_eq!(discover_with(&host, &o).unwrap(), None);
    assert!(started.elapsed() >= Duration::from_millis(600));

    std::fs::remove_file(host.path(Path::new("/run/udev/queue"))).unwrap();
    let started = Instant::now();
    assert_eq!(discover_with(&host, &o).unwrap(), None);
    assert!(started.elapsed() < Duration::from_millis(500));
}

#[test]
fn url_wins_over_fw_cfg_and_seed() {
    let server = Server::start(0, b"#cloud-config\nhostname: fromurl\n");
    let (_d, host) = seed_host("cidata", &[("user-data", b"#cloud-config\n")]);
    put(
        &host,
        "/proc/cmdline",
        format!("ro {CMDLINE_URL_KEY}={} quiet\n", server.url()).as_bytes(),
    );
    put(
        &host,
        "/sys/firmware/qemu_fw_cfg/by_name/opt/org.ballast/user-data/raw",
        b"x",
    );
    let doc = discover_with(&host, &opts()).unwrap().unwrap();
    assert_eq!(doc.source, SourceKind::KernelCmdlineUrl(server.url()));
    assert_eq!(doc.user_data, b"#cloud-config\nhostname: fromurl\n");
    assert_eq!(doc.meta_data, None);
    assert!(host.commands().is_empty(), "{:?}", host.commands());
}

#[test]
fn bad_url_scheme_is_an_error_naming_the_url() {
    for url in ["ftp://h/x", "", "/etc/passwd"] {
        let (_d, host) = host(&format!("{CMDLINE_URL_KEY}={url}"));
        let err = discover_with(&host, &opts()).unwrap_err().to_string();
        assert!(
            err.starts_with(&format!("{CMDLINE_URL_KEY}={url:?}")),
            "{err}"
        );
        assert!(err.contains("http"), "{err}");
    }
}

#[test]
fn same_host_redirects_are_followed() {
    let target = Server::serve(|_| Reply::ok(b"#cloud-config\n"));
    let to = format!("http://127.0.0.1:{}/user-data", target.port());
    // An absolute Location to another port, then a relative one.
    let first = Server::serve(move |n| match n {
        0 => Reply::redirect("/moved"),
        _ => Reply::redirect(&to),
    });
    let body = fetch_url(&first.url(), &fast_policy(Duration::from_secs(10))).unwrap();
    assert_eq!(body, b"#cloud-config\n");
    assert_eq!((first.requests(), target.requests()), (2, 1));
}

#[test]
fn redirect_to_another_host_is_refused_and_not_fetched() {
    let target = Server::serve(|_| Reply::ok(b"#cloud-config\nruncmd: [evil]\n"));
    let to = format!("http://localhost:{}/user-data", target.port());
    let first = Server::serve(move |_| Reply::redirect(&to));
    let err = fetch_url(&first.url(), &fast_policy(Duration::from_secs(10)))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("redirect from host \"127.0.0.1\" to another host \"localhost\" refused"),
        "{err}"
    );
    assert!(err.contains(&first.url()), "{err}");
    assert!(err.contains("after 1 attempt(s)"), "{err}");
    assert_eq!((first.requests(), target.requests()), (1, 0));
}

#[test]
fn endless_redirects_stop() {
    let server = Server::serve(|_| Reply::redirect("/again"));
    let err = fetch_url(&server.url(), &fast_policy(Duration::from_secs(10)))
        .unwrap_err()
        .to_string();
    assert!(err.contains("more than 5 redirects"), "{err}");
    assert_eq!(server.requests(), crate::http::MAX_REDIRECTS + 1);
}

/// What a URL serves may change (or be changed on the way): the host was
/// provisioned from that URL, and a new body there only brings its
/// `bootcmd`, not a second provisioning.
#[test]
fn changed_document_under_the_same_url_is_not_a_new_instance() {
    let body = Arc::new(std::sync::Mutex::new(
        b"#cloud-config\nruncmd: [\"echo first\"]\n".to_vec(),
    ));
    let served = Arc::clone(&body);
    let server = Server::serve(move |_| Reply::ok(&served.lock().unwrap()));
    let (_d, host) = host(&format!("{CMDLINE_URL_KEY}={}\n", server.url()));
    put(&host, "/etc/group", b"root:x:0:\n");
    put(&host, "/etc/passwd", b"root:x:0:0:root:/root:/bin/sh\n");
    let boot = |secs| {
        let now = std::time::SystemTime::UNIX_EPOCH + Duration::from_secs(secs);
        crate::provision::run_with(&host, now, discover_with(&host, &opts())).unwrap()
    };
    let id = format!("url:{}", server.url());
    assert_eq!(
        boot(1),
        crate::provision::Outcome::Applied {
            instance_id: id.clone()
        }
    );
    *body.lock().unwrap() = b"#cloud-config\nruncmd: [\"echo second\"]\n".to_vec();
    assert_eq!(
        boot(2),
        crate::provision::Outcome::AlreadyApplied {
            instance_id: id,
            error: None
        }
    );
    let ran = programs(&host);
    assert!(
        ran.contains(&"/bin/sh -c echo first".to_string()),
        "{ran:?}"
    );
    assert!(!ran.iter().any(|c| c.contains("echo second")), "{ran:?}");
    // Plain http is worth a warning in the record.
    let last = crate::provision::record::status(&host)
        .unwrap()
        .last
        .unwrap();
    assert!(
        last.warnings.iter().any(|w| w.contains("plain http")),
        "{:?}",
        last.warnings
    );
}

/// Over https, a redirect to plain http is refused, and the http server is
/// not asked.
#[test]
fn redirect_from_https_to_http_is_refused() {
    let plain = Server::serve(|_| Reply::ok(b"#cloud-config\nruncmd: [evil]\n"));
    let tls = crate::http::tls_server::TlsServer::start(&format!(
        "HTTP/1.0 302 Found\r\nLocation: http://127.0.0.1:{}/user-data\r\n\r\n",
        plain.port()
    ));
    let url = format!("https://127.0.0.1:{}/response", tls.port);
    let err = fetch_url_with(&url, &fast_policy(Duration::from_secs(10)), tls.client())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains(&format!(
            "redirect from https to plain http (http://127.0.0.1:{}/user-data) refused",
            plain.port()
        )),
        "{err}"
    );
    assert_eq!(plain.requests(), 0);
}

fn fast_policy(total: Duration) -> RetryPolicy {
    RetryPolicy {
        total,
        first_backoff: Duration::from_millis(50),
        max_backoff: Duration::from_millis(200),
        attempt_timeout: Duration::from_secs(2),
    }
}

#[test]
fn url_retries_503_then_succeeds() {
    let server = Server::start(3, b"#cloud-config\n");
    let body = fetch_url(&server.url(), &fast_policy(Duration::from_secs(10))).unwrap();
    assert_eq!(body, b"#cloud-config\n");
    assert_eq!(server.requests(), 4);
}

#[test]
fn url_that_keeps_failing_names_the_url_and_last_status() {
    let server = Server::start(usize::MAX, b"");
    let err = fetch_url(&server.url(), &fast_policy(Duration::from_millis(800))).unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains(&server.url()), "{msg}");
    assert!(msg.contains("HTTP 503"), "{msg}");
    assert!(server.requests() >= 2, "{msg}");
}

#[test]
fn url_404_is_not_retried() {
    let server = Server::start_with(0, b"", "404 Not Found");
    let err = fetch_url(&server.url(), &fast_policy(Duration::from_secs(10))).unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains("HTTP 404"), "{msg}");
    assert!(msg.contains("after 1 attempt(s)"), "{msg}");
    assert_eq!(server.requests(), 1);
}

#[test]
fn url_that_never_answers_times_out_with_a_clear_error() {
    // Accepts connections (the kernel does, from the backlog) but never
    // answers.
    let silent = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/user-data", silent.local_addr().unwrap());
    let started = Instant::now();
    let err = fetch_url(
        &url,
        &RetryPolicy {
            total: Duration::from_millis(1500),
            ..fast_policy(Duration::ZERO)
        },
    )
    .unwrap_err();
    let elapsed = started.elapsed();
    assert!(elapsed < Duration::from_secs(5), "took {elapsed:?}");
    let msg = err.to_string();
    assert!(
        msg.starts_with(&format!("fetching user data from {url} failed after")),
        "{msg}"
    );
    assert!(msg.to_lowercase().contains("timed out"), "{msg}");
    drop(silent);
}

#[test]
fn url_nobody_listens_on_is_retried_then_fails() {
    let port = {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let url = format!("http://127.0.0.1:{port}/x");
    let err = fetch_url(&url, &fast_policy(Duration::from_millis(500))).unwrap_err();
    match &err {
        SourceError::Url { attempts, .. } => assert!(*attempts >= 2, "{err}"),
        other => panic!("{other}"),
    }
    assert!(err.to_string().contains(&url), "{err}");
}

/// What the test server answers to one request.
struct Reply {
    status: &'static str,
    location: Option<String>,
    body: Vec<u8>,
}

impl Reply {
    fn ok(body: &[u8]) -> Reply {
        Reply {
            status: "200 OK",
            location: None,
            body: body.to_vec(),
        }
    }

    fn redirect(to: &str) -> Reply {
        Reply {
            status: "302 Found",
            location: Some(to.to_string()),
            body: Vec::new(),
        }
    }
}

/// An HTTP server on 127.0.0.1 with a run-time port, answering the n-th
/// request (from 0) with what its handler says.
struct Server {
    addr: std::net::SocketAddr,
    count: Arc<AtomicUsize>,
}

impl Server {
    /// The first `failures` requests get a 503, the rest a 200 with `body`.
    fn start(failures: usize, body: &'static [u8]) -> Server {
        Server::start_with(failures, body, "200 OK")
    }

    fn start_with(failures: usize, body: &'static [u8], status: &'static str) -> Server {
        Server::serve(move |n| {
            if n < failures {
                Reply {
                    status: "503 Service Unavailable",
                    location: None,
                    body: b"not yet".to_vec(),
                }
            } else {
                Reply {
                    status,
                    location: None,
                    body: body.to_vec(),
                }
            }
        })
    }

    fn serve(handler: impl Fn(usize) -> Reply + Send + 'static) -> Server {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let count = Arc::new(AtomicUsize::new(0));
        let seen = Arc::clone(&count);
        // The thread ends with the test process; each test has its own port.
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(stream) = stream else { return };
                let n = seen.fetch_add(1, Ordering::SeqCst);
                respond(stream, &handler(n));
            }
        });
        Server { addr, count }
    }

    fn url(&self) -> String {
        format!("http://{}/user-data", self.addr)
    }

    fn port(&self) -> u16 {
        self.addr.port()
    }

    fn requests(&self) -> usize {
        self.count.load(Ordering::SeqCst)
    }
}

fn respond(mut stream: TcpStream, reply: &Reply) {
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut line = String::new();
    // Read the request head up to the blank line.
    while reader.read_line(&mut line).unwrap_or(0) > 0 {
        if line == "\r\n" || line == "\n" {
            break;
        }
        line.clear();
    }
    let location = reply
        .location
        .as_ref()
        .map(|l| format!("Location: {l}\r\n"))
        .unwrap_or_default();
    let head = format!(
        "HTTP/1.1 {}\r\n{location}Content-Length: {}\r\nConnection: close\r\n\r\n",
        reply.status,
        reply.body.len()
    );
    // A client that gave up is the test's business, not the server's.
    if let Err(e) = stream
        .write_all(head.as_bytes())
        .and_then(|()| stream.write_all(&reply.body))
    {
        eprintln!("test server: writing the response: {e}");
    }
}
