//! The writer of the inactive slot's partition, and the error that tells its
//! failures apart from those of the stream.
//!
//! It writes around the page cache (`O_DIRECT`) where it can. Through the
//! cache, every byte is copied once more by the kernel, a whole slot of dirty
//! pages waits in memory, and the final fsync writes it all after the
//! download; on a two-core host that copy takes CPU the hashing needs, and
//! the wait comes on top of the download (bench/README.md). Direct writes
//! go from the pipeline's chunks (page-aligned, see `offload`) to the disk
//! while the payload still streams, and leave the running system's page
//! cache alone. Where the file or device refuses `O_DIRECT`, or a write is
//! not aligned (only a malformed payload's last bytes can be), it writes
//! through the cache and starts the write-back every few MiB instead.

use rustix::fs::{fadvise, fcntl_getfl, fcntl_setfl, Advice, OFlags};
use std::fs::File;
use std::io::{self, Write};
use std::num::NonZeroU64;

/// A write error on the slot's device, told apart from errors of the stream.
#[derive(Debug, thiserror::Error)]
#[error("cannot write {path}: {source}")]
pub struct DeviceError {
    path: String,
    source: io::Error,
}

/// Direct writes need address, length and offset on this boundary (the
/// largest logical block size of the disks we write).
const ALIGN: usize = 4096;
/// Through the cache: every this many bytes, start their write-back.
const WRITEBACK_EVERY: u64 = 8 << 20;

pub struct DeviceWriter {
    file: File,
    path: String,
    direct: bool,
    written: u64,
    /// Through the cache: everything before this offset is being written back.
    kicked: u64,
}

impl DeviceWriter {
    /// `file` is open for writing at offset 0.
    pub fn new(file: File, path: String) -> DeviceWriter {
        // Refused by some file systems (and older tmpfs): then the cache it is.
        let direct = fcntl_getfl(&file)
            .and_then(|flags| fcntl_setfl(&file, flags | OFlags::DIRECT))
            .is_ok();
        DeviceWriter {
            file,
            path,
            direct,
            written: 0,
            kicked: 0,
        }
    }

    /// Whether writes still go around the page cache.
    pub fn is_direct(&self) -> bool {
        self.direct
    }

    fn aligned(&self, buf: &[u8]) -> bool {
        // ALIGN is a power of two (and `is_multiple_of` newer than our MSRV).
        let mask = ALIGN - 1;
        buf.as_ptr() as usize & mask == 0
            && buf.len() & mask == 0
            && self.written & mask as u64 == 0
    }

    /// From here on through the page cache.
    fn leave_direct(&mut self) -> io::Result<()> {
        let flags = fcntl_getfl(&self.file)?;
        fcntl_setfl(&self.file, flags - OFlags::DIRECT)?;
        self.direct = false;
        self.kicked = self.written;
        Ok(())
    }

    /// Starts the write-back of what went through the cache since the last
    /// kick. `POSIX_FADV_DONTNEED` does it on Linux (it starts write-back of
    /// the range, then drops the pages that are clean) without unsafe code.
    fn kick(&mut self) -> io::Result<()> {
        let Some(len) = NonZeroU64::new(self.written - self.kicked) else {
            return Ok(());
        };
        fadvise(&self.file, self.kicked, Some(len), Advice::DontNeed)?;
        self.kicked = self.written;
        Ok(())
    }

    fn write_inner(&mut self, buf: &[u8]) -> io::Result<usize> {
        if self.direct && !self.aligned(buf) {
            self.leave_direct()?;
        }
        let n = self.file.write(buf)?;
        self.written += n as u64;
        if !self.direct && self.written - self.kicked >= WRITEBACK_EVERY {
            self.kick()?;
        }
        Ok(n)
    }

    /// Waits for everything written to be on the disk.
    pub fn sync(mut self) -> io::Result<()> {
        if !self.direct {
            self.kick()?;
        }
        self.file.sync_all()
    }

    fn tag(&self, e: io::Error) -> io::Error {
        io::Error::new(
            e.kind(),
            DeviceError {
                path: self.path.clone(),
                source: e,
            },
        )
    }
}

impl Write for DeviceWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.write_inner(buf).map_err(|e| self.tag(e))
    }

    fn flush(&mut self) -> io::Result<()> {
        self.file.flush().map_err(|e| self.tag(e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `len` bytes at a page boundary inside a larger buffer.
    fn aligned_buf(len: usize) -> (Vec<u8>, usize) {
        let mut v = vec![0u8; len + ALIGN];
        let start = (ALIGN - v.as_ptr() as usize % ALIGN) % ALIGN;
        for (i, b) in v[start..start + len].iter_mut().enumerate() {
            *b = (i % 251) as u8;
        }
        (v, start)
    }

    #[test]
    fn aligned_then_unaligned_writes_land_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("slot");
        std::fs::write(&path, vec![0xffu8; 5 * ALIGN]).unwrap();
        let file = File::options().write(true).open(&path).unwrap();
        let mut w = DeviceWriter::new(file, path.display().to_string());
        let (buf, start) = aligned_buf(2 * ALIGN);
        let aligned = &buf[start..start + 2 * ALIGN];
        w.write_all(aligned).unwrap();
        // The unaligned tail sends it through the cache; both land.
        w.write_all(&aligned[..100]).unwrap();
        assert!(!w.is_direct());
        w.write_all(aligned).unwrap();
        w.sync().unwrap();
        let got = std::fs::read(&path).unwrap();
        let mut want = aligned.to_vec();
        want.extend_from_slice(&aligned[..100]);
        want.extend_from_slice(aligned);
        assert!(got[..want.len()] == want[..]);
        assert!(got[want.len()..].iter().all(|&b| b == 0xff));
    }

    #[test]
    fn errors_name_the_device() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("slot");
        std::fs::write(&path, b"").unwrap();
        // Read-only: every write fails.
        let file = File::open(&path).unwrap();
        let mut w = DeviceWriter::new(file, "/dev/vdz4".into());
        let e = w.write_all(b"x").unwrap_err();
        assert!(e.get_ref().is_some_and(|i| i.is::<DeviceError>()), "{e}");
        assert!(e.to_string().contains("/dev/vdz4"), "{e}");
    }
}
