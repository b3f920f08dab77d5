//! Hands a stream to two writers (the slot and the verity tree), each on a
//! worker thread of its own, so the stages of the update pipeline (download,
//! sha256 and zstd on one side; the slot write and the verity tree on the
//! other) run on different cores, as the stages of `curl | zstd -d | dd` do.
//!
//! On a small host the cores are the budget, so the stream is not copied on
//! its way: [`Split::copy_from`] reads straight into a 1 MiB chunk, and both
//! workers get the same chunk behind an `Arc`. Chunks come back to a pool
//! once both are done with them, so the pipeline allocates (and the kernel
//! zero-fills) a handful of chunks, not one per MiB of the payload. Chunks
//! start on a page boundary, so the slot writer can hand them to the disk
//! without the page cache (`O_DIRECT`, see `update::device`).

use super::io::exceeded;
use std::io::{self, Read, Write};
use std::ops::Range;
use std::sync::mpsc::{sync_channel, SyncSender};
use std::sync::Arc;
use std::thread::JoinHandle;

const CHUNK: usize = 1 << 20;
/// Where chunks start: a page, as `O_DIRECT` asks of a buffer's address.
const ALIGN: usize = 4096;
/// Chunks queued per worker: bounds the memory the pipeline holds to a few MiB.
const DEPTH: usize = 4;

/// A full chunk (or the last, partial one): a buffer and where its data is.
type Chunk = (Arc<Vec<u8>>, Range<usize>);

/// One writer on its own thread, fed chunks through a bounded channel.
struct Worker<W: Write + Send + 'static> {
    tx: Option<SyncSender<Chunk>>,
    handle: Option<JoinHandle<(W, io::Result<()>)>>,
}

impl<W: Write + Send + 'static> Worker<W> {
    fn spawn(mut inner: W) -> Worker<W> {
        let (tx, rx) = sync_channel::<Chunk>(DEPTH);
        let handle = std::thread::spawn(move || {
            let mut result = Ok(());
            for (chunk, data) in rx {
                // After an error, keep draining so the sender never blocks.
                if result.is_ok() {
                    result = inner.write_all(&chunk[data]);
                }
            }
            if result.is_ok() {
                result = inner.flush();
            }
            (inner, result)
        });
        Worker {
            tx: Some(tx),
            handle: Some(handle),
        }
    }

    fn send(&self, chunk: Chunk) -> io::Result<()> {
        match &self.tx {
            Some(tx) => tx.send(chunk).map_err(|_| worker_gone()),
            None => Err(worker_gone()),
        }
    }

    /// Waits for the worker to write everything; returns the inner writer,
    /// or the first error the worker met.
    fn finish(mut self) -> io::Result<W> {
        self.tx = None;
        let handle = self.handle.take().ok_or_else(worker_gone)?;
        let (inner, result) = handle
            .join()
            .map_err(|_| io::Error::other("pipeline worker panicked"))?;
        result.map(|()| inner)
    }
}

impl<W: Write + Send + 'static> Drop for Worker<W> {
    fn drop(&mut self) {
        self.tx = None;
        if let Some(h) = self.handle.take() {
            // The result was wanted only through `finish`.
            drop(h.join());
        }
    }
}

fn worker_gone() -> io::Error {
    io::Error::other("the pipeline's writer thread stopped")
}

/// Everything read through it goes to both `A` and `B`, in order, each
/// written by a thread of its own.
pub struct Split<A: Write + Send + 'static, B: Write + Send + 'static> {
    a: Worker<A>,
    b: Worker<B>,
    /// The chunk being filled: its buffer, where the aligned chunk starts in
    /// it, and how much of the chunk is filled.
    buf: Vec<u8>,
    start: usize,
    filled: usize,
    /// Chunks handed to the workers; those only the pool still holds are free.
    pool: Vec<Arc<Vec<u8>>>,
    count: u64,
}

impl<A: Write + Send + 'static, B: Write + Send + 'static> Split<A, B> {
    pub fn new(a: A, b: B) -> Split<A, B> {
        let buf = new_chunk();
        Split {
            a: Worker::spawn(a),
            b: Worker::spawn(b),
            start: aligned_start(&buf),
            buf,
            filled: 0,
            pool: Vec::new(),
            count: 0,
        }
    }

    /// Bytes handed over so far.
    pub fn count(&self) -> u64 {
        self.count
    }

    /// Reads `r` to its end and hands everything to both writers. At most
    /// `limit` bytes in all: one more is a [`LimitExceeded`] error (with
    /// `writing` set), and neither writer gets it, so a payload can never
    /// spill past its partition. The workers' own errors come from `finish`.
    ///
    /// [`LimitExceeded`]: super::io::LimitExceeded
    pub fn copy_from<R: Read + ?Sized>(&mut self, r: &mut R, limit: u64) -> io::Result<u64> {
        let start = self.count;
        loop {
            if self.filled == CHUNK {
                self.send()?;
            }
            // Ask for one byte past the limit, to tell "ends at the limit" from "goes on".
            let room = (limit.saturating_sub(self.count)).saturating_add(1);
            let want = (CHUNK - self.filled).min(usize::try_from(room).unwrap_or(usize::MAX));
            let at = self.start + self.filled;
            let n = match r.read(&mut self.buf[at..at + want]) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            match self.count.checked_add(n as u64) {
                Some(count) if count <= limit => self.count = count,
                _ => return Err(exceeded(limit, true)),
            }
            self.filled += n;
        }
        self.send()?;
        Ok(self.count - start)
    }

    /// Hands the filled part of the current chunk to both workers.
    fn send(&mut self) -> io::Result<()> {
        if self.filled == 0 {
            return Ok(());
        }
        let next = self.free_chunk();
        let data = self.start..self.start + std::mem::take(&mut self.filled);
        self.start = aligned_start(&next);
        let chunk = Arc::new(std::mem::replace(&mut self.buf, next));
        self.pool.push(Arc::clone(&chunk));
        self.a.send((Arc::clone(&chunk), data.clone()))?;
        self.b.send((chunk, data))
    }

    /// A chunk both workers are done with, else a new one.
    fn free_chunk(&mut self) -> Vec<u8> {
        if let Some(i) = self.pool.iter().position(|c| Arc::strong_count(c) == 1) {
            match Arc::try_unwrap(self.pool.swap_remove(i)) {
                Ok(free) => return free,
                // Not reached (only the pool held it), but keep it if it is.
                Err(shared) => self.pool.push(shared),
            }
        }
        new_chunk()
    }

    /// Waits for both workers to write everything; returns each inner
    /// writer, or the first error that worker met.
    pub fn finish(self) -> (io::Result<A>, io::Result<B>) {
        let Split { a, b, .. } = self;
        (a.finish(), b.finish())
    }
}

/// A buffer with room for a chunk at a page boundary.
fn new_chunk() -> Vec<u8> {
    vec![0; CHUNK + ALIGN]
}

/// Where in `buf` the page-aligned chunk starts.
fn aligned_start(buf: &[u8]) -> usize {
    (ALIGN - buf.as_ptr() as usize % ALIGN) % ALIGN
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::update::io::limit_exceeded;

    /// Hands out its data in reads of odd sizes, as a decoder does.
    struct Dribble<'a>(&'a [u8], usize);
    impl Read for Dribble<'_> {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            let n = self.1.min(buf.len()).min(self.0.len());
            buf[..n].copy_from_slice(&self.0[..n]);
            self.0 = &self.0[n..];
            Ok(n)
        }
    }

    fn data() -> Vec<u8> {
        (0..5_000_000u32).map(|i| (i % 251) as u8).collect()
    }

    #[test]
    fn everything_arrives_in_order_at_both() {
        let data = data();
        for read_size in [777, CHUNK + 3] {
            let mut s = Split::new(Vec::new(), Vec::new());
            let n = s
                .copy_from(&mut Dribble(&data, read_size), data.len() as u64)
                .unwrap();
            assert_eq!((n, s.count()), (data.len() as u64, data.len() as u64));
            let (a, b) = s.finish();
            assert!(a.unwrap() == data, "reads of {read_size}");
            assert!(b.unwrap() == data, "reads of {read_size}");
        }
    }

    #[test]
    fn chunks_are_reused() {
        let data = data();
        let mut s = Split::new(io::sink(), io::sink());
        for _ in 0..10 {
            s.copy_from(&mut &data[..], u64::MAX).unwrap();
        }
        // 50 MB went through; the pool is bounded by what can be in flight.
        assert!(s.pool.len() <= 2 * (DEPTH + 2), "{} chunks", s.pool.len());
    }

    #[test]
    fn one_byte_past_the_limit_reaches_neither() {
        let data = data();
        let limit = data.len() as u64 - 1;
        let mut s = Split::new(Vec::new(), Vec::new());
        let e = s.copy_from(&mut &data[..], limit).unwrap_err();
        assert_eq!(
            limit_exceeded(&e).map(|l| (l.limit, l.writing)),
            Some((limit, true))
        );
        let (a, b) = s.finish();
        assert!(a.unwrap().len() as u64 <= limit);
        assert!(b.unwrap().len() as u64 <= limit);

        let mut s = Split::new(Vec::new(), Vec::new());
        s.copy_from(&mut &data[..], data.len() as u64).unwrap();
    }

    /// Records where each write's bytes start, relative to a page.
    struct Offsets(Vec<usize>);
    impl Write for Offsets {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0.push(buf.as_ptr() as usize % ALIGN);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn chunks_start_on_a_page() {
        let data = data();
        let mut s = Split::new(Offsets(Vec::new()), io::sink());
        s.copy_from(&mut Dribble(&data, 777), u64::MAX).unwrap();
        let offsets = s.finish().0.unwrap().0;
        assert_eq!(offsets.len(), data.len().div_ceil(CHUNK));
        assert!(offsets.iter().all(|&o| o == 0), "{offsets:?}");
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
        let mut s = Split::new(Failing, Vec::new());
        s.copy_from(&mut &vec![0u8; 20 * CHUNK][..], u64::MAX)
            .unwrap();
        let (a, b) = s.finish();
        let err = a.err().unwrap();
        assert!(err.to_string().contains("disk on fire"), "{err}");
        assert_eq!(b.unwrap().len(), 20 * CHUNK);
    }
}
