//! Small Read adapters the payload stream is built from: each does one
//! thing (count and cap, hash, report progress), so the pipeline reads as
//! what it is. Splitting the stream in two is `offload::Split`.

use sha2::{Digest, Sha256};
use std::io::{self, Read};

/// The error a limit adapter returns: its payload can be told apart from
/// any other I/O error with [`limit_exceeded`].
#[derive(Debug, thiserror::Error)]
#[error("more than the {limit} bytes expected")]
pub struct LimitExceeded {
    pub limit: u64,
    /// From the writing side, [`Split::copy_from`] (else a [`LimitReader`]).
    ///
    /// [`Split::copy_from`]: super::offload::Split::copy_from
    pub writing: bool,
}

pub(crate) fn exceeded(limit: u64, writing: bool) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, LimitExceeded { limit, writing })
}

/// Whether `e` (or what it wraps) is a limit adapter refusing more bytes.
pub fn limit_exceeded(e: &io::Error) -> Option<&LimitExceeded> {
    e.get_ref()
        .and_then(|inner| inner.downcast_ref::<LimitExceeded>())
}

/// Reads at most `limit` bytes from `inner`; one byte more is an error, so a
/// server cannot make us read (or write) more than the signed manifest said.
pub struct LimitReader<R> {
    inner: R,
    limit: u64,
    count: u64,
}

impl<R: Read> LimitReader<R> {
    pub fn new(inner: R, limit: u64) -> Self {
        LimitReader {
            inner,
            limit,
            count: 0,
        }
    }

    /// Bytes read so far.
    pub fn count(&self) -> u64 {
        self.count
    }
}

impl<R: Read> Read for LimitReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        // Ask for one byte past the limit, to tell "ends at the limit" from "goes on".
        let room = (self.limit - self.count).saturating_add(1);
        let want = buf.len().min(usize::try_from(room).unwrap_or(usize::MAX));
        let n = self.inner.read(&mut buf[..want])?;
        match self.count.checked_add(n as u64) {
            Some(count) if count <= self.limit => self.count = count,
            _ => return Err(exceeded(self.limit, false)),
        }
        Ok(n)
    }
}

/// Hashes (SHA-256) every byte read through it.
pub struct HashingReader<R> {
    inner: R,
    hasher: Sha256,
}

impl<R: Read> HashingReader<R> {
    pub fn new(inner: R) -> Self {
        HashingReader {
            inner,
            hasher: Sha256::new(),
        }
    }

    pub fn get_ref(&self) -> &R {
        &self.inner
    }

    /// The hex digest of everything read, and the reader.
    pub fn finish(self) -> (String, R) {
        (hex::encode(self.hasher.finalize()), self.inner)
    }
}

impl<R: Read> Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        Ok(n)
    }
}

/// Calls `report(total_so_far)` as bytes pass.
pub struct ProgressReader<R, F> {
    inner: R,
    count: u64,
    report: F,
}

impl<R: Read, F: FnMut(u64)> ProgressReader<R, F> {
    pub fn new(inner: R, report: F) -> Self {
        ProgressReader {
            inner,
            count: 0,
            report,
        }
    }

    pub fn get_ref(&self) -> &R {
        &self.inner
    }

    pub fn into_inner(self) -> R {
        self.inner
    }
}

impl<R: Read, F: FnMut(u64)> Read for ProgressReader<R, F> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.count += n as u64;
        (self.report)(self.count);
        Ok(n)
    }
}

/// Reads what is left of `r` (so a hash covers every byte), capped by the
/// reader's own limit.
pub fn drain<R: Read>(r: &mut R) -> io::Result<u64> {
    io::copy(r, &mut io::sink())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limit_reader_allows_exactly_the_limit() {
        let mut out = Vec::new();
        let mut r = LimitReader::new(&b"hello"[..], 5);
        r.read_to_end(&mut out).unwrap();
        assert_eq!((out.as_slice(), r.count()), (&b"hello"[..], 5));

        let mut r = LimitReader::new(&b"hello!"[..], 5);
        let e = r.read_to_end(&mut Vec::new()).unwrap_err();
        assert!(e.to_string().contains("more than the 5 bytes"), "{e}");
        assert_eq!(limit_exceeded(&e).map(|l| l.limit), Some(5));
        assert!(limit_exceeded(&io::Error::other("x")).is_none());

        let mut r = LimitReader::new(&b"hel"[..], 5);
        r.read_to_end(&mut Vec::new()).unwrap();
        assert_eq!(r.count(), 3);
    }

    #[test]
    fn hashing_and_progress() {
        let mut seen = Vec::new();
        let r = HashingReader::new(&b"abc"[..]);
        let mut p = ProgressReader::new(r, |n| seen.push(n));
        let mut out = Vec::new();
        io::copy(&mut p, &mut out).unwrap();
        let (digest, _) = p.into_inner().finish();
        assert_eq!(
            digest,
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert_eq!(out, b"abc");
        assert_eq!(seen.last(), Some(&3));
    }
}
