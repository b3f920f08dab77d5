//! Formats both sides of Ballast speak: the GPT layout of a Ballast disk, the
//! dm-verity hash tree, the build metadata (`build.json`) and os-release.

pub mod build_info;
pub mod gpt;
pub mod keys;
pub mod manifest;
pub mod os_release;
pub mod pe;
pub mod verity;
pub mod version;

/// Partition type GUIDs from the Discoverable Partitions Specification.
pub mod part_type {
    use uuid::{uuid, Uuid};
    pub const ESP: Uuid = uuid!("c12a7328-f81f-11d2-ba4b-00a0c93ec93b");
    pub const ROOT_X86_64: Uuid = uuid!("4f68bce3-e8cd-4db1-96e7-fbcaf984b709");
    pub const ROOT_X86_64_VERITY: Uuid = uuid!("2c7357ed-ebd2-46d9-aec1-23d437ec2bf5");
    pub const VAR: Uuid = uuid!("4d21b016-b534-45c2-a9fb-5c16e091fd2d");
}

/// The PARTUUIDs a root slot takes for a given verity root hash.
///
/// As the Discoverable Partitions Specification suggests, the data partition's
/// UUID is the first 128 bits of the root hash and the hash partition's the last
/// 128 bits. That makes a UKI independent of the slot it is installed to: its
/// command line names the partitions by the hash it trusts, and whoever writes
/// a slot sets the slot's PARTUUIDs from the hash of what it wrote.
pub fn slot_partuuids(root_hash: &[u8; 32]) -> (uuid::Uuid, uuid::Uuid) {
    let mut data = [0u8; 16];
    let mut hash = [0u8; 16];
    data.copy_from_slice(&root_hash[..16]);
    hash.copy_from_slice(&root_hash[16..]);
    (uuid::Uuid::from_bytes(data), uuid::Uuid::from_bytes(hash))
}

/// A stable UUID derived from a seed, for reproducible builds.
pub fn derived_uuid(seed: &str) -> uuid::Uuid {
    use sha2::{Digest, Sha256};
    let digest = Sha256::digest(seed.as_bytes());
    let mut b = [0u8; 16];
    b.copy_from_slice(&digest[..16]);
    uuid::Builder::from_random_bytes(b).into_uuid()
}

/// Seconds since the epoch as `YYYY-MM-DDTHH:MM:SSZ` (UTC), for records
/// and for tools that take a date (image-build's signing time).
pub fn rfc3339(secs: u64) -> String {
    let days = secs / 86_400;
    let rem = secs % 86_400;
    // Howard Hinnant's civil_from_days.
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slot_uuids_split_the_root_hash() {
        let mut h = [0u8; 32];
        for (i, b) in h.iter_mut().enumerate() {
            *b = i as u8;
        }
        let (d, v) = slot_partuuids(&h);
        assert_eq!(d.to_string(), "00010203-0405-0607-0809-0a0b0c0d0e0f");
        assert_eq!(v.to_string(), "10111213-1415-1617-1819-1a1b1c1d1e1f");
    }

    #[test]
    fn derived_uuids_are_stable_and_distinct() {
        assert_eq!(derived_uuid("a"), derived_uuid("a"));
        assert_ne!(derived_uuid("a"), derived_uuid("b"));
        assert_eq!(derived_uuid("a").get_version_num(), 4);
    }
}
