//! A real TLS server for tests: `openssl s_server` with a certificate from
//! a throwaway CA.

use super::{Options, Redirects};
use std::io::{BufRead, BufReader};
use std::net::TcpListener;

/// `openssl s_server -HTTP` on 127.0.0.1 with a certificate from a test CA,
/// answering every request with `response` as it is; stopped when dropped.
pub(crate) struct TlsServer {
    child: std::process::Child,
    pub(crate) port: u16,
    _dir: tempfile::TempDir,
}

impl TlsServer {
    pub(crate) fn start(response: &str) -> TlsServer {
        let dir = tempfile::tempdir().unwrap();
        crate::test_certs::make(dir.path());
        std::fs::create_dir(dir.path().join("roots")).unwrap();
        std::fs::copy(dir.path().join("ca.pem"), dir.path().join("roots/ca.pem")).unwrap();
        std::fs::write(dir.path().join("response"), response).unwrap();
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut child = std::process::Command::new("openssl")
            .args([
                "s_server",
                "-HTTP",
                "-cert",
                "server.pem",
                "-key",
                "server.key",
            ])
            .args(["-accept", &format!("127.0.0.1:{port}")])
            .current_dir(dir.path())
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        // s_server says ACCEPT once it listens.
        let stdout = child.stdout.take().unwrap();
        let mut lines = BufReader::new(stdout).lines();
        loop {
            match lines.next() {
                Some(Ok(line)) if line.starts_with("ACCEPT") => break,
                Some(Ok(_)) => {}
                other => panic!("openssl s_server did not start: {other:?}"),
            }
        }
        TlsServer {
            child,
            port,
            _dir: dir,
        }
    }

    /// Client options that trust the test CA (as an extra root, the way
    /// cloud-config `ca_certs` adds one), for same-host redirects.
    pub(crate) fn client(&self) -> Options {
        let mut opts = Options::new(Redirects::SameHost);
        opts.extra_roots = Some(self._dir.path().join("roots"));
        opts
    }
}

impl Drop for TlsServer {
    fn drop(&mut self) {
        if let Err(e) = self.child.kill().and_then(|()| self.child.wait().map(drop)) {
            eprintln!("stopping openssl s_server: {e}");
        }
    }
}
