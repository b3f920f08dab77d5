//! A `Write` adapter that hands its bytes to a worker thread, so the stages of
//! the update pipeline (download, sha256 and zstd on one side; the slot write
//! and the verity tree on the other) run on different cores, as the stages of
//! `curl | zstd -d | dd` do.

use std::io::{self, Write};
use std::sync::mpsc::{sync_channel, SyncSender};
use std::thread::JoinHandle;

const CHUNK: usize = 1 << 20;
/// Chunks in flight: bounds the memory the pipeline holds to a few MiB.
const DEPTH: usize = 4;

pub struct Offload<W: Write + Send + 'static> {
    buf: Vec<u8>,
    tx: Option<SyncSender<Vec<u8>>>,
    worker: Option<JoinHandle<(W, io::Result<()>)>>,
}

impl<W: Write + Send + 'static> Offload<W> {
    pub fn new(mut inner: W) -> Offload<W> {
        let (tx, rx) = sync_channel::<Vec<u8>>(DEPTH);
        let worker = std::thread::spawn(move || {
            let mut result = Ok(());
            for chunk in rx {
                // After an error, keep draining so the sender never blocks.
                if result.is_ok() {
                    result = inner.write_all(&chunk);
                }
            }
            if result.is_ok() {
                result = inner.flush();
            }
            (inner, result)
        });
        Offload {
            buf: Vec::with_capacity(CHUNK),
            tx: Some(tx),
            worker: Some(worker),
        }
    }

    fn send(&mut self) -> io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let chunk = std::mem::replace(&mut self.buf, Vec::with_capacity(CHUNK));
        match &self.tx {
            Some(tx) => tx.send(chunk).map_err(|_| worker_gone()),
            None => Err(worker_gone()),
        }
    }

    /// Waits for the worker to write everything; returns the inner writer,
    /// or the first error the worker met.
    pub fn finish(mut self) -> io::Result<W> {
        self.send()?;
        self.tx = None;
        let worker = self.worker.take().ok_or_else(worker_gone)?;
        let (inner, result) = worker
            .join()
            .map_err(|_| io::Error::other("pipeline worker panicked"))?;
        result.map(|()| inner)
    }
}

fn worker_gone() -> io::Error {
    io::Error::other("the pipeline's writer thread stopped")
}

impl<W: Write + Send + 'static> Write for Offload<W> {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        let take = (CHUNK - self.buf.len()).min(data.len());
        self.buf.extend_from_slice(&data[..take]);
        if self.buf.len() == CHUNK {
            self.send()?;
        }
        Ok(take)
    }

    /// Hands the buffered bytes over; it does not wait for them: `finish` does.
    fn flush(&mut self) -> io::Result<()> {
        self.send()
    }
}

impl<W: Write + Send + 'static> Drop for Offload<W> {
    fn drop(&mut self) {
        self.tx = None;
        if let Some(w) = self.worker.take() {
            // The result was wanted only through `finish`.
            drop(w.join());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn everything_arrives_in_order() {
        let mut w = Offload::new(Vec::new());
        let data: Vec<u8> = (0..5_000_000u32).map(|i| (i % 251) as u8).collect();
        for c in data.chunks(777) {
            w.write_all(c).unwrap();
        }
        assert_eq!(w.finish().unwrap(), data);
    }

    struct Failing;
    impl Write for Failing {
        fn write(&mut self, _: &[u8]) -> io::Result<usize> {
            Err(io::Error::other("disk on fire"))
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn the_workers_error_comes_back() {
        let mut w = Offload::new(Failing);
        for _ in 0..20 {
            w.write_all(&[0u8; CHUNK]).unwrap();
        }
        let err = w.finish().err().unwrap();
        assert!(err.to_string().contains("disk on fire"), "{err}");
    }
}
