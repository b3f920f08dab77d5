//! Which root slot (A or B) the running system booted from.

use crate::cmdline::VerityRoot;
use crate::host::Host;
use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Slot {
    A,
    B,
}

impl Slot {
    pub fn label(self) -> &'static str {
        match self {
            Slot::A => "root-a",
            Slot::B => "root-b",
        }
    }
    pub fn other(self) -> Slot {
        match self {
            Slot::A => Slot::B,
            Slot::B => Slot::A,
        }
    }
}

impl std::fmt::Display for Slot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Slot::A => "A",
            Slot::B => "B",
        })
    }
}

/// The slot whose root partition has the PARTUUID the command line booted,
/// looked up in the GPT of `disk` (the disk that also holds the data partition).
pub fn booted_slot(host: &dyn Host, disk: &str, root: &VerityRoot) -> Result<Slot> {
    let gpt = super::read_gpt(host, disk)?;
    let Some(part) = gpt.partitions.iter().find(|p| p.uuid == root.data_partuuid) else {
        bail!(
            "no partition on /dev/{disk} has the booted root's PARTUUID {}",
            root.data_partuuid
        );
    };
    match part.label.as_str() {
        "root-a" => Ok(Slot::A),
        "root-b" => Ok(Slot::B),
        other => bail!(
            "the booted root's PARTUUID {} is partition {other:?} on /dev/{disk}, not root-a or root-b",
            root.data_partuuid
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::disk::fixture::{ballast_disk, HASH_A, HASH_B, MIB};
    use ballast_common::slot_partuuids;
    use uuid::Uuid;

    fn root(data: Uuid) -> VerityRoot {
        VerityRoot {
            root_hash: String::new(),
            data_partuuid: data,
            hash_partuuid: Uuid::nil(),
        }
    }

    #[test]
    fn table() {
        let dir = tempfile::tempdir().unwrap();
        let (host, gpt) = ballast_disk(dir.path(), 32 * MIB);
        let esp = gpt.find("esp").unwrap().uuid;
        let cases: Vec<(Uuid, Result<Slot, &str>)> = vec![
            (slot_partuuids(&HASH_A).0, Ok(Slot::A)),
            (slot_partuuids(&HASH_B).0, Ok(Slot::B)),
            (
                slot_partuuids(&[0x11; 32]).0,
                Err("no partition on /dev/vda has"),
            ),
            (
                esp,
                Err("is partition \"esp\" on /dev/vda, not root-a or root-b"),
            ),
        ];
        for (uuid, want) in cases {
            match (booted_slot(&host, "vda", &root(uuid)), want) {
                (Ok(got), Ok(want)) => assert_eq!(got, want),
                (Err(e), Err(want)) => assert!(e.to_string().contains(want), "{e}"),
                (got, want) => panic!("{uuid}: got {got:?}, want {want:?}"),
            }
        }
    }

    #[test]
    fn a_damaged_table_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let (host, _) = ballast_disk(dir.path(), 32 * MIB);
        std::fs::write(dir.path().join("dev/vda"), vec![0u8; 4096]).unwrap();
        let e = booted_slot(&host, "vda", &root(slot_partuuids(&HASH_A).0)).unwrap_err();
        assert!(
            format!("{e:#}").contains("cannot read the GPT of /dev/vda"),
            "{e:#}"
        );
    }
}
