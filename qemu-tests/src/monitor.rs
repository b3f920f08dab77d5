//! QEMU's human monitor (HMP) on a unix socket: reset, quit, status.

use std::io::{ErrorKind, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

const PROMPT: &str = "(qemu) ";

pub(crate) struct Monitor {
    stream: UnixStream,
    path: PathBuf,
}

impl Monitor {
    /// Connects once QEMU listens and has printed its prompt, which happens
    /// only after all devices and backends (the host forwards too) are up.
    /// `alive` is polled meanwhile: an error from it ends the wait.
    pub(crate) fn connect(
        path: &Path,
        timeout: Duration,
        mut alive: impl FnMut() -> Result<()>,
    ) -> Result<Monitor> {
        let deadline = Instant::now() + timeout;
        let stream = loop {
            alive()?;
            match UnixStream::connect(path) {
                Ok(stream) => break stream,
                Err(e) if Instant::now() >= deadline => {
                    return Err(e)
                        .with_context(|| format!("connecting to QEMU monitor {}", path.display()))
                }
                Err(_) => std::thread::sleep(Duration::from_millis(100)),
            }
        };
        let mut monitor = Monitor {
            stream,
            path: path.to_path_buf(),
        };
        monitor.read_until_prompt(deadline.saturating_duration_since(Instant::now()))?;
        Ok(monitor)
    }

    /// Runs one HMP command and returns what QEMU printed before the next
    /// prompt.
    pub(crate) fn command(&mut self, cmd: &str, timeout: Duration) -> Result<String> {
        self.send(cmd)?;
        self.read_until_prompt(timeout)
    }

    /// `quit`: QEMU exits at once, like pulling the power cord.
    pub(crate) fn quit(mut self) -> Result<()> {
        self.send("quit")?;
        // QEMU closes the socket as it exits; wait for that, briefly.
        self.stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .context("setting monitor timeout")?;
        let mut sink = Vec::new();
        match self.stream.read_to_end(&mut sink) {
            Ok(_) => Ok(()),
            Err(e) if e.kind() == ErrorKind::ConnectionReset => Ok(()),
            Err(e) => Err(e).context("waiting for QEMU to quit"),
        }
    }

    fn send(&mut self, cmd: &str) -> Result<()> {
        self.stream
            .write_all(format!("{cmd}\n").as_bytes())
            .with_context(|| format!("sending {cmd:?} to QEMU monitor {}", self.path.display()))
    }

    fn read_until_prompt(&mut self, timeout: Duration) -> Result<String> {
        let deadline = Instant::now() + timeout;
        let mut buf = Vec::new();
        let mut chunk = [0u8; 4096];
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                bail!(
                    "QEMU monitor gave no prompt within {timeout:?}; got {:?}",
                    String::from_utf8_lossy(&buf)
                );
            }
            self.stream
                .set_read_timeout(Some(left))
                .context("setting monitor timeout")?;
            match self.stream.read(&mut chunk) {
                Ok(0) => bail!(
                    "QEMU monitor closed; got {:?}",
                    String::from_utf8_lossy(&buf)
                ),
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(e).context("reading QEMU monitor"),
            }
            let text = String::from_utf8_lossy(&buf);
            if let Some(body) = text.strip_suffix(PROMPT) {
                return Ok(crate::console::clean(body));
            }
        }
    }
}
