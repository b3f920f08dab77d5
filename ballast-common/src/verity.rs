//! dm-verity hash tree, format version 1 with a superblock, as `veritysetup
//! format` writes it (sha256, 4096-byte data and hash blocks).
//!
//! The tree is built from a stream: [`TreeBuilder`] is a `Write` that hashes
//! each data block as it passes, so an updater can hash a payload while it
//! writes it to a slot, and an image builder can hash a filesystem image
//! without reading it twice.

use sha2::{Digest, Sha256};
use std::io::{self, Write};
use uuid::Uuid;

pub const BLOCK: usize = 4096;
const DIGEST: usize = 32;
const PER_BLOCK: usize = BLOCK / DIGEST;

#[derive(Debug, Clone)]
pub struct Params {
    /// Salt, at most 256 bytes; image-build derives it so rebuilds are identical.
    pub salt: Vec<u8>,
    /// UUID stored in the superblock.
    pub uuid: Uuid,
}

/// A finished tree: what goes on the hash partition, and the root hash.
pub struct Tree {
    /// Superblock block followed by the hash levels, top level first.
    pub hash_area: Vec<u8>,
    pub root_hash: [u8; 32],
    pub data_blocks: u64,
}

impl Tree {
    pub fn root_hash_hex(&self) -> String {
        hex::encode(self.root_hash)
    }
}

/// Hashes data blocks as they are written; `finish` builds the upper levels.
pub struct TreeBuilder {
    params: Params,
    partial: Vec<u8>,
    level0: Vec<u8>,
    blocks: u64,
}

fn salted(salt: &[u8], block: &[u8]) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(salt);
    h.update(block);
    h.finalize().into()
}

impl TreeBuilder {
    pub fn new(params: Params) -> io::Result<TreeBuilder> {
        if params.salt.len() > 256 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "verity salt longer than 256 bytes",
            ));
        }
        Ok(TreeBuilder {
            params,
            partial: Vec::with_capacity(BLOCK),
            level0: Vec::new(),
            blocks: 0,
        })
    }

    fn push_block(&mut self, block: &[u8]) {
        let d = salted(&self.params.salt, block);
        self.level0.extend_from_slice(&d);
        self.blocks += 1;
    }

    /// Data blocks hashed so far.
    pub fn blocks(&self) -> u64 {
        self.blocks
    }

    pub fn finish(self) -> io::Result<Tree> {
        if !self.partial.is_empty() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "verity data is not a multiple of {BLOCK} bytes ({} bytes left over)",
                    self.partial.len()
                ),
            ));
        }
        if self.blocks < 2 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "verity data must have at least two blocks",
            ));
        }
        // Levels from the bottom (hashes of data blocks) up to one block.
        let mut levels: Vec<Vec<u8>> = Vec::new();
        let mut current = pad_to_blocks(self.level0);
        loop {
            let nblocks = current.len() / BLOCK;
            levels.push(current);
            if nblocks == 1 {
                break;
            }
            let below = levels.last().map(Vec::as_slice).unwrap_or_default();
            let mut next = Vec::with_capacity(nblocks.div_ceil(PER_BLOCK) * BLOCK);
            for b in below.chunks(BLOCK) {
                next.extend_from_slice(&salted(&self.params.salt, b));
            }
            current = pad_to_blocks(next);
        }
        let top = levels.last().map(Vec::as_slice).unwrap_or_default();
        let root_hash = salted(&self.params.salt, top);
        let mut hash_area = superblock(&self.params, self.blocks);
        for level in levels.iter().rev() {
            hash_area.extend_from_slice(level);
        }
        Ok(Tree {
            hash_area,
            root_hash,
            data_blocks: self.blocks,
        })
    }
}

impl Write for TreeBuilder {
    fn write(&mut self, mut buf: &[u8]) -> io::Result<usize> {
        let n = buf.len();
        if !self.partial.is_empty() {
            let take = (BLOCK - self.partial.len()).min(buf.len());
            self.partial.extend_from_slice(&buf[..take]);
            buf = &buf[take..];
            if self.partial.len() == BLOCK {
                let block = std::mem::take(&mut self.partial);
                self.push_block(&block);
                self.partial = block;
                self.partial.clear();
            }
        }
        while buf.len() >= BLOCK {
            let (block, rest) = buf.split_at(BLOCK);
            self.push_block(block);
            buf = rest;
        }
        self.partial.extend_from_slice(buf);
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

fn pad_to_blocks(mut v: Vec<u8>) -> Vec<u8> {
    let len = v.len().div_ceil(BLOCK).max(1) * BLOCK;
    v.resize(len, 0);
    v
}

fn superblock(params: &Params, data_blocks: u64) -> Vec<u8> {
    let mut sb = vec![0u8; BLOCK];
    sb[0..8].copy_from_slice(b"verity\0\0");
    sb[8..12].copy_from_slice(&1u32.to_le_bytes()); // superblock version
    sb[12..16].copy_from_slice(&1u32.to_le_bytes()); // hash type: normal
    sb[16..32].copy_from_slice(params.uuid.as_bytes());
    sb[32..38].copy_from_slice(b"sha256");
    sb[64..68].copy_from_slice(&(BLOCK as u32).to_le_bytes());
    sb[68..72].copy_from_slice(&(BLOCK as u32).to_le_bytes());
    sb[72..80].copy_from_slice(&data_blocks.to_le_bytes());
    sb[80..82].copy_from_slice(&(params.salt.len() as u16).to_le_bytes());
    sb[88..88 + params.salt.len()].copy_from_slice(&params.salt);
    sb
}

/// The parameters stored in a hash area's superblock.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Superblock {
    pub uuid: Uuid,
    pub salt: Vec<u8>,
    pub data_blocks: u64,
}

/// Reads the superblock at the start of a hash area written by [`TreeBuilder`]
/// or `veritysetup format`.
pub fn read_superblock(area: &[u8]) -> io::Result<Superblock> {
    let bad = |m: &str| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("verity superblock: {m}"),
        )
    };
    if area.len() < 512 || &area[0..8] != b"verity\0\0" {
        return Err(bad("no signature"));
    }
    let u32_at = |o: usize| u32::from_le_bytes([area[o], area[o + 1], area[o + 2], area[o + 3]]);
    if u32_at(8) != 1 || u32_at(12) != 1 {
        return Err(bad("unsupported version or hash type"));
    }
    if &area[32..39] != b"sha256\0" || u32_at(64) != BLOCK as u32 || u32_at(68) != BLOCK as u32 {
        return Err(bad("not sha256 with 4096-byte blocks"));
    }
    let mut blocks = [0u8; 8];
    blocks.copy_from_slice(&area[72..80]);
    let salt_len = u16::from_le_bytes([area[80], area[81]]) as usize;
    if salt_len > 256 {
        return Err(bad("salt longer than 256 bytes"));
    }
    let mut uuid = [0u8; 16];
    uuid.copy_from_slice(&area[16..32]);
    Ok(Superblock {
        uuid: Uuid::from_bytes(uuid),
        salt: area[88..88 + salt_len].to_vec(),
        data_blocks: u64::from_le_bytes(blocks),
    })
}

/// Size of the hash area (superblock included) for `data_blocks` blocks;
/// `u64::MAX` when that does not fit in a u64 (more than any partition).
pub fn hash_area_size(data_blocks: u64) -> u64 {
    let mut total: u64 = 1; // superblock
    let mut n = data_blocks;
    loop {
        let blocks = n.div_ceil(PER_BLOCK as u64).max(1);
        total = total.saturating_add(blocks);
        if blocks == 1 {
            break;
        }
        n = blocks;
    }
    total.saturating_mul(BLOCK as u64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    fn data(blocks: usize) -> Vec<u8> {
        let mut v = vec![0u8; blocks * BLOCK];
        let mut x: u32 = 12345;
        for b in v.iter_mut() {
            x = x.wrapping_mul(1_103_515_245).wrapping_add(12345);
            *b = (x >> 16) as u8;
        }
        v
    }

    fn params() -> Params {
        Params {
            salt: (0..32).collect(),
            uuid: uuid::uuid!("0a6b0f2e-1f4c-4a3e-9b59-3a0d1e2f3a4b"),
        }
    }

    fn build(d: &[u8], chunk: usize) -> Tree {
        let mut b = TreeBuilder::new(params()).unwrap();
        for c in d.chunks(chunk) {
            b.write_all(c).unwrap();
        }
        b.finish().unwrap()
    }

    /// The reference: cryptsetup's own `veritysetup format` over the same data.
    fn veritysetup(d: &[u8]) -> (String, Vec<u8>) {
        let dir = tempfile::tempdir().unwrap();
        let dpath = dir.path().join("data");
        let hpath = dir.path().join("hash");
        std::fs::write(&dpath, d).unwrap();
        std::fs::write(&hpath, b"").unwrap();
        let out = Command::new("veritysetup")
            .arg("format")
            .arg(format!("--salt={}", hex::encode(&params().salt)))
            .arg(format!("--uuid={}", params().uuid))
            .arg(&dpath)
            .arg(&hpath)
            .output()
            .expect("veritysetup not found: install cryptsetup-bin");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let text = String::from_utf8_lossy(&out.stdout);
        let root = text
            .lines()
            .find_map(|l| l.strip_prefix("Root hash:"))
            .unwrap()
            .trim()
            .to_string();
        (root, std::fs::read(&hpath).unwrap())
    }

    #[test]
    fn matches_veritysetup_for_one_two_and_three_levels() {
        // 2 blocks: one level; 300 blocks: two; 20_000 blocks: three.
        for blocks in [2usize, 300, 20_000] {
            let d = data(blocks);
            let tree = build(&d, 1000);
            let (root, hash) = veritysetup(&d);
            assert_eq!(tree.root_hash_hex(), root, "{blocks} blocks");
            assert_eq!(tree.hash_area.len(), hash.len(), "{blocks} blocks");
            assert!(tree.hash_area == hash, "{blocks} blocks: hash areas differ");
            assert_eq!(hash_area_size(blocks as u64), hash.len() as u64);
        }
    }

    /// A block count from a manifest or a superblock on disk can be anything:
    /// the size saturates (and no partition is that large) instead of
    /// overflowing.
    #[test]
    fn hash_area_size_of_huge_counts_saturates() {
        assert_eq!(hash_area_size(u64::MAX), u64::MAX);
        assert_eq!(hash_area_size((1 << 52) + 16), 145_249_953_336_332_288);
    }

    #[test]
    fn superblock_reads_back() {
        let d = data(300);
        let (_, hash) = veritysetup(&d);
        let sb = read_superblock(&hash).unwrap();
        assert_eq!(
            sb,
            Superblock {
                uuid: params().uuid,
                salt: params().salt,
                data_blocks: 300
            }
        );
        assert!(read_superblock(&[0u8; 4096]).is_err());
        assert!(read_superblock(b"short").is_err());
    }

    #[test]
    fn chunking_of_the_input_does_not_matter() {
        let d = data(129);
        assert_eq!(build(&d, 1).root_hash, build(&d, BLOCK * 7).root_hash);
    }

    #[test]
    fn partial_blocks_and_tiny_inputs_are_errors() {
        let mut b = TreeBuilder::new(params()).unwrap();
        b.write_all(&[0u8; BLOCK * 2 + 1]).unwrap();
        assert!(b.finish().is_err());
        let mut b = TreeBuilder::new(params()).unwrap();
        b.write_all(&[0u8; BLOCK]).unwrap();
        assert!(b.finish().is_err());
        assert!(TreeBuilder::new(Params {
            salt: vec![0; 257],
            uuid: Uuid::nil()
        })
        .is_err());
    }
}
