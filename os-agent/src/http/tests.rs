use super::*;
use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::mpsc;
use std::thread;

/// A server on 127.0.0.1 that answers each connection with `respond`,
/// after reading the request head (whose request line it hands over).
fn serve(
    respond: impl Fn(String, TcpStream) + Send + Sync + 'static,
) -> (u16, mpsc::Receiver<String>) {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let (tx, rx) = mpsc::channel();
    let respond = Arc::new(respond);
    thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(stream) = stream else { return };
            let (tx, respond) = (tx.clone(), respond.clone());
            thread::spawn(move || {
                let mut reader = BufReader::new(stream.try_clone().expect("clone"));
                let mut first = String::new();
                if reader.read_line(&mut first).is_err() {
                    return;
                }
                let mut line = String::new();
                while reader.read_line(&mut line).is_ok_and(|n| n > 2) {
                    line.clear();
                }
                // The test may be gone already; nothing to tell then.
                if tx.send(first.trim().to_string()).is_ok() {
                    respond(first, stream);
                }
            });
        }
    });
    (port, rx)
}

/// Runs `f` on a thread and fails the test if it has not returned within
/// `limit` (what these tests guard against is a transfer that never ends).
fn within<T: Send + 'static>(limit: Duration, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        // The receiver outlives this unless the test already failed.
        if tx.send(f()).is_err() {
            eprintln!("result after the test gave up");
        }
    });
    rx.recv_timeout(limit)
        .expect("the transfer did not end: it would hold its caller forever")
}

fn quick() -> Pace {
    Pace {
        min_rate: 1000,
        window: Duration::from_secs(1),
        stall: Duration::from_secs(2),
    }
}

fn client(redirects: Redirects, pace: Pace) -> Client {
    let mut opts = Options::new(redirects).pace(pace);
    opts.extra_roots = None;
    Client::new(&opts).expect("client")
}

#[test]
fn meter_table() {
    let t0 = Instant::now();
    let s = |n: u64| t0 + Duration::from_secs(n);
    let pace = Pace {
        min_rate: 100,
        window: Duration::from_secs(10),
        stall: Duration::from_secs(5),
    };
    // Fast enough in every window.
    let mut m = Meter::new(pace, None, t0);
    for i in 1..=30 {
        assert_eq!(m.record(200, s(i)), Ok(()), "second {i}");
    }
    // A trickle: one byte a second fails at the end of the first window.
    let mut m = Meter::new(pace, None, t0);
    let mut failed = None;
    for i in 1..=30 {
        if let Err(why) = m.record(1, s(i)) {
            failed = Some((i, why));
            break;
        }
    }
    let (at, why) = failed.expect("a trickle must fail");
    assert_eq!(at, 10);
    assert!(why.contains("too slow"), "{why}");
    // A burst then silence is bounded by the stall limit, and the deadline
    // (window + size / rate = 10 + 1000/100 s) ends even a steady transfer.
    let m = Meter::new(pace, Some(1000), t0);
    assert_eq!(m.next_wait(t0), Duration::from_secs(5));
    assert_eq!(m.next_wait(s(18)), Duration::from_secs(2));
    assert_eq!(m.next_wait(s(25)), Duration::ZERO);
    let mut m = Meter::new(pace, Some(1000), t0);
    assert!(m.record(5000, s(21)).unwrap_err().contains("deadline"));
    // Numbers from a manifest cannot overflow the deadline.
    assert_eq!(
        Pace {
            min_rate: 0,
            ..pace
        }
        .deadline(u64::MAX),
        Duration::from_secs(10).saturating_add(Duration::from_secs(u64::MAX))
    );
}

#[test]
fn redirect_policy() {
    let u = |s: &str| url::Url::parse(s).unwrap();
    let cases: &[(&str, &str, usize, Result<(), &str>)] = &[
        ("http://a/x", "http://a/y", 0, Ok(())),
        ("http://a/x", "https://a/y", 0, Ok(())),
        ("https://a/x", "https://a:8443/y", 0, Ok(())),
        ("http://A/x", "http://a/y", 0, Ok(())),
        ("http://a/x", "http://a/y", MAX_REDIRECTS - 1, Ok(())),
        (
            "http://a/x",
            "http://a/y",
            MAX_REDIRECTS,
            Err("more than 5 redirects"),
        ),
        (
            "https://a/x",
            "http://a/y",
            0,
            Err("redirect from https to plain http (http://a/y) refused"),
        ),
        (
            "http://127.0.0.1:1/x",
            "http://localhost:1/x",
            0,
            Err("redirect from host \"127.0.0.1\" to another host \"localhost\" refused"),
        ),
        (
            "https://a.example/x",
            "https://b.example/x",
            0,
            Err("redirect from host \"a.example\" to another host \"b.example\" refused"),
        ),
        (
            "http://a/x",
            "file:///etc/shadow",
            0,
            Err("redirect to file:///etc/shadow: only http:// and https:// URLs are supported"),
        ),
    ];
    for (from, to, followed, want) in cases {
        let got = redirect_allowed(Redirects::SameHost, &u(from), &u(to), *followed)
            .map_err(|e| e.to_string());
        assert_eq!(
            got,
            want.map_err(str::to_string),
            "{from} -> {to} after {followed}"
        );
    }
}

#[test]
fn any_host_redirects_still_refuse_downgrades() {
    let u = |s: &str| url::Url::parse(s).unwrap();
    let any = Redirects::AnyHost;
    assert_eq!(
        redirect_allowed(
            any,
            &u("https://r.example/v2/x"),
            &u("https://cdn.example/b"),
            0
        ),
        Ok(())
    );
    assert_eq!(
        redirect_allowed(
            any,
            &u("http://127.0.0.1:5000/v2"),
            &u("http://localhost:5001/b"),
            0
        ),
        Ok(())
    );
    assert!(matches!(
        redirect_allowed(any, &u("https://r.example/"), &u("http://cdn.example/b"), 0),
        Err(RedirectRefused::Downgrade { .. })
    ));
    assert!(matches!(
        redirect_allowed(any, &u("https://r.example/"), &u("file:///etc/shadow"), 0),
        Err(RedirectRefused::Scheme { .. })
    ));
    assert_eq!(
        redirect_allowed(
            any,
            &u("https://r.example/"),
            &u("https://r.example/"),
            MAX_REDIRECTS
        ),
        Err(RedirectRefused::TooMany)
    );
}

#[test]
fn a_certificate_from_an_extra_root_is_trusted_and_not_without_it() {
    let tls = tls_server::TlsServer::start("HTTP/1.0 200 OK\r\n\r\ntrusted");
    let url = format!("https://127.0.0.1:{}/response", tls.port);
    let mut body = String::new();
    Client::new(&tls.client())
        .expect("client")
        .get(&url)
        .send()
        .and_then(Response::ok)
        .expect("trusted through the extra root")
        .into_body()
        .read_to_string(&mut body)
        .expect("body");
    assert_eq!(body, "trusted");
    // The system store alone does not know the test CA.
    let err = client(Redirects::SameHost, quick())
        .get(&url)
        .send()
        .map(|r| r.status())
        .expect_err("unknown CA");
    assert!(
        err.to_string().to_lowercase().contains("certificate"),
        "{err}"
    );
}

#[test]
fn a_trickling_server_is_given_up() {
    let (port, _rx) = serve(|_, mut s| {
        let head = "HTTP/1.1 200 OK\r\nContent-Length: 1000000\r\n\r\n";
        if s.write_all(head.as_bytes()).is_err() {
            return;
        }
        // One byte every 100 ms: alive, never done.
        for _ in 0..600 {
            if s.write_all(b"x").is_err() || s.flush().is_err() {
                return;
            }
            thread::sleep(Duration::from_millis(100));
        }
    });
    let err = within(Duration::from_secs(30), move || {
        let c = client(Redirects::AnyHost, quick());
        let resp = c.get(&format!("http://127.0.0.1:{port}/payload")).send()?;
        let mut body = Vec::new();
        resp.ok()?
            .into_body()
            .read_to_end(&mut body)
            .map_err(|e| Error::Transport {
                url: "payload".into(),
                message: e.to_string(),
            })
    })
    .expect_err("a trickle must not succeed");
    assert!(err.to_string().contains("too slow"), "{err}");
}

#[test]
fn a_silent_server_is_given_up() {
    let (port, _rx) = serve(|_, mut s| {
        if s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nab")
            .is_ok()
        {
            thread::sleep(Duration::from_secs(20));
        }
    });
    let err = within(Duration::from_secs(30), move || {
        let c = client(Redirects::AnyHost, quick());
        let mut body = Vec::new();
        c.get(&format!("http://127.0.0.1:{port}/x"))
            .send()
            .expect("headers arrive")
            .into_body()
            .read_to_end(&mut body)
    })
    .expect_err("silence must not succeed");
    assert!(err.to_string().contains("no data for 2 s"), "{err}");

    // Silence before the headers too.
    let (port, _rx) = serve(|_, _s| thread::sleep(Duration::from_secs(20)));
    let err = within(Duration::from_secs(30), move || {
        client(Redirects::AnyHost, quick())
            .get(&format!("http://127.0.0.1:{port}/x"))
            .send()
            .map(|r| r.status())
    })
    .expect_err("no response must not succeed");
    assert!(
        err.to_string().contains("timed out: no response in 2 s"),
        "{err}"
    );
}

#[test]
fn redirects_follow_the_policy_and_status_errors_say_what() {
    let (target, target_rx) = serve(|_, mut s| {
        // Test server: the client may have gone already.
        let _sent = s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok");
    });
    let (port, _rx) = serve(move |line, mut s| {
        let reply = if line.contains("/missing") {
            "HTTP/1.1 404 Not Found\r\nContent-Length: 9\r\n\r\nno such x".to_string()
        } else {
            // Another host: "localhost" is not "127.0.0.1".
            format!("HTTP/1.1 302 Found\r\nLocation: http://localhost:{target}/data\r\nContent-Length: 0\r\n\r\n")
        };
        let _sent = s.write_all(reply.as_bytes());
    });
    let url = format!("http://127.0.0.1:{port}/start");
    let strict = client(Redirects::SameHost, quick());
    let err = strict
        .get(&url)
        .send()
        .map(|r| r.status())
        .expect_err("cross-host redirect");
    assert!(err.to_string().contains("another host"), "{err}");
    assert!(target_rx.try_recv().is_err(), "the other host was asked");

    let open = client(Redirects::AnyHost, quick());
    let mut body = String::new();
    open.get(&url)
        .send()
        .and_then(Response::ok)
        .expect("followed")
        .into_body()
        .read_to_string(&mut body)
        .expect("body");
    assert_eq!(body, "ok");

    let err = open
        .get(&format!("http://127.0.0.1:{port}/missing"))
        .send()
        .and_then(Response::ok)
        .map(|r| r.status())
        .expect_err("404");
    assert_eq!(
        err.to_string(),
        format!("GET http://127.0.0.1:{port}/missing: HTTP 404: no such x")
    );
}

#[test]
fn extra_roots_that_do_not_parse_are_named() {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("corp.pem"), "not a certificate").expect("write");
    std::fs::write(dir.path().join("README"), "ignored").expect("write");
    let mut opts = Options::new(Redirects::AnyHost);
    opts.extra_roots = Some(dir.path().to_path_buf());
    let err = Client::new(&opts).expect_err("bad PEM");
    assert!(err.to_string().contains("corp.pem"), "{err}");
}

#[test]
fn the_agents_proxy_is_used_except_for_no_proxy_hosts() {
    let (proxy, proxy_rx) = serve(|_, mut s| {
        let _sent = s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 7\r\n\r\nproxied");
    });
    let (direct, direct_rx) = serve(|_, mut s| {
        let _sent = s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\ndirect");
    });
    let body = |c: &Client, url: &str| {
        let mut text = String::new();
        c.get(url)
            .send()
            .and_then(Response::ok)
            .expect("response")
            .into_body()
            .read_to_string(&mut text)
            .expect("body");
        text
    };
    let mut opts = Options::new(Redirects::AnyHost).pace(quick());
    opts.extra_roots = None;
    opts.proxy = Some(ProxySettings {
        url: format!("http://127.0.0.1:{proxy}"),
        no_proxy: "localhost".into(),
    });
    let c = Client::new(&opts).expect("client");
    // Through the proxy: it sees the absolute URL; the target is not asked.
    assert_eq!(body(&c, &format!("http://127.0.0.1:{direct}/x")), "proxied");
    assert_eq!(
        proxy_rx.try_recv().expect("the proxy was asked"),
        format!("GET http://127.0.0.1:{direct}/x HTTP/1.1")
    );
    assert!(direct_rx.try_recv().is_err());
    // A no_proxy host goes direct.
    assert_eq!(body(&c, &format!("http://localhost:{direct}/y")), "direct");
    assert_eq!(
        direct_rx.try_recv().expect("asked directly"),
        "GET /y HTTP/1.1"
    );
    assert!(proxy_rx.try_recv().is_err());
}
