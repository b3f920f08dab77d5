//! `image-build build`: the stages from spec to disk image, payloads and build.json.

use crate::customize::{self, Inputs};
use crate::spec::LoadedSpec;
use crate::stage::Stages;
use crate::{disk, esp, initrd, modules, rootfs, secure_boot, tools, uki};
use anyhow::{Context, Result};
use ballast_common::build_info::{
    self, BuildInfo, Images, Package, PartitionInfo, Payload, Payloads,
};
use ballast_common::{derived_uuid, verity};
use sha2::{Digest, Sha256};
use std::fs::File;
use std::io::{BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;

pub struct BuildOptions {
    pub spec: LoadedSpec,
    pub output: PathBuf,
    pub cache_dir: PathBuf,
    pub agent_dir: PathBuf,
    pub units_dir: PathBuf,
    pub epoch: u64,
}

const STAGES: usize = 12;

pub fn build(opts: &BuildOptions) -> Result<BuildInfo> {
    let spec = &opts.spec.spec;
    let out = &opts.output;
    std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
    let out = out.canonicalize()?;
    let work = out.join(".work");
    std::fs::create_dir_all(&work)?;
    let mut stages = Stages::new(&out.join("logs"), STAGES)?;
    let base_name = format!("{}-{}", spec.name, spec.version);
    let seed = format!("{}/{}/{}", spec.name, spec.version, opts.epoch);

    let sb_keys = opts.spec.secure_boot_keys()?;
    stages.run("check-host-tools", |_| {
        tools::check()?;
        if sb_keys.is_some() {
            tools::check_list(secure_boot::TOOLS)?;
        }
        Ok(())
    })?;
    let base = stages.run("bootstrap-rootfs", |s| {
        rootfs::base(s, spec, &opts.cache_dir, opts.epoch)
    })?;

    let root = work.join("root");
    let extracted = stages.run("customize-root", |s| {
        rootfs::copy_base(s, &base, &root)?;
        customize::customize(
            s,
            &root,
            &work,
            &Inputs {
                spec: &opts.spec,
                agent_dir: &opts.agent_dir,
                units_dir: &opts.units_dir,
                epoch: opts.epoch,
            },
        )
    })?;
    let kver = extracted.kernel_version.clone();

    let initrd_path = work.join("initrd.img");
    let purged_after_initrd = stages.run("initrd", |s| {
        initrd::build(
            s,
            &initrd::InitrdInputs {
                root: &root,
                kver: &kver,
                rootfs_key: &rootfs::cache_key(spec),
                units_dir: &opts.units_dir,
                epoch: opts.epoch,
                cache_dir: &opts.cache_dir,
            },
            &initrd_path,
        )?;
        crate::purge::purge_with_var(
            s,
            &root,
            &extracted.var_seed,
            crate::purge::BUILD_PACKAGES,
            &spec.debian.packages,
        )
    })?;

    let dropped_modules = stages.run("kernel-modules", |s| {
        modules::diet(s, &root, &kver, &spec.kernel_modules, spec.debian.kernel)
    })?;

    let packages = stages.run("bill-of-materials", |s| {
        bill_of_materials(s, &extracted.var_seed)
    })?;

    let root_file = out.join(format!("{base_name}.root.erofs"));
    let verity_file = out.join(format!("{base_name}.root.verity"));
    let tree = stages.run("root-filesystem", |s| {
        // Uncompressed: the payload's zstd compresses the plain blocks far
        // better than erofs's lz4hc ones (the default image's root: 61.6 MB
        // against 79.6 MB at the same zstd level; docs/image.md), the slot
        // has room for it, and reads need no decompression.
        s.cmd(
            Command::new("mkfs.erofs")
                .arg(format!("-T{}", opts.epoch))
                .arg(format!("-U{}", derived_uuid(&format!("{seed}/erofs"))))
                .arg("--quiet")
                .arg(&root_file)
                .arg(&root),
        )?;
        let tree = hash_file(&root_file, &seed)?;
        std::fs::write(&verity_file, &tree.hash_area)?;
        s.log(&format!("root hash {}", tree.root_hash_hex()))?;
        Ok(tree)
    })?;
    let slot_bytes = spec.partitions.slot_mib << 20;
    let root_size = std::fs::metadata(&root_file)?.len();
    if root_size > slot_bytes {
        anyhow::bail!(
            "the root filesystem is {} MiB but a slot is {} MiB: raise partitions.slot_mib (it is fixed for the life of a fleet, so leave headroom)",
            root_size >> 20,
            spec.partitions.slot_mib
        );
    }

    let cmdline = uki::cmdline(&tree.root_hash, &spec.kernel_cmdline);
    let uki_file = out.join(format!("{base_name}.efi"));
    stages.run("unified-kernel-image", |s| {
        uki::assemble(
            s,
            &uki::UkiParts {
                stub: &root.join("usr/lib/systemd/boot/efi/linuxx64.efi.stub"),
                os_release: &root.join("usr/lib/os-release"),
                cmdline: &cmdline,
                kernel: &extracted.vmlinuz,
                initrd: &initrd_path,
                epoch: opts.epoch,
            },
            &uki_file,
            &work,
        )?;
        if let Some(keys) = &sb_keys {
            secure_boot::sign(s, keys, &uki_file, &uki_file, opts.epoch)?;
        }
        Ok(())
    })?;

    let uki_entry = esp::uki_entry_name(&spec.name, &spec.version);
    let esp_img = work.join("esp.img");
    stages.run("esp", |s| {
        let stock_boot = root.join("usr/lib/systemd/boot/efi/systemd-bootx64.efi");
        let systemd_boot = match &sb_keys {
            Some(keys) => {
                let signed = work.join("systemd-bootx64.efi.signed");
                secure_boot::sign(s, keys, &stock_boot, &signed, opts.epoch)?;
                signed
            }
            None => stock_boot,
        };
        let enroll = spec.secure_boot.as_ref().map(|sb| sb.enroll);
        let enroll_keys: Vec<PathBuf> = match (&sb_keys, enroll) {
            (Some(keys), Some(e)) if e != crate::spec::Enroll::Off => secure_boot::ENROLL_FILES
                .iter()
                .map(|f| keys.file(f))
                .collect(),
            _ => Vec::new(),
        };
        let vol_uuid = derived_uuid(&format!("{seed}/esp-volume"));
        let vol = vol_uuid.as_bytes();
        esp::build(
            s,
            &esp::EspInputs {
                size_mib: spec.partitions.esp_mib,
                volume_id: u32::from_le_bytes([vol[0], vol[1], vol[2], vol[3]]),
                systemd_boot: &systemd_boot,
                uki: &uki_file,
                uki_entry: &uki_entry,
                loader_conf: &esp::loader_conf(
                    &spec.name,
                    enroll.map(crate::spec::Enroll::loader_value),
                ),
                enroll_keys: &enroll_keys,
                epoch: opts.epoch,
            },
            &esp_img,
            &work,
        )
    })?;

    let gpt = disk::plan(
        &disk::Layout {
            esp_mib: spec.partitions.esp_mib,
            slot_mib: spec.partitions.slot_mib,
            data_mib: spec.partitions.data_mib,
        },
        &tree.root_hash,
        &seed,
    )?;
    let data_img = work.join("data.img");
    stages.run("data-partition", |s| {
        if data_img.exists() {
            std::fs::remove_file(&data_img)?;
        }
        File::create(&data_img)?.set_len(gpt.find("data")?.size())?;
        s.cmd(
            Command::new("mkfs.ext4")
                .args(["-q", "-F", "-L", "data", "-U"])
                .arg(derived_uuid(&format!("{seed}/data-fs")).to_string())
                .arg("-E")
                .arg(format!(
                    "root_owner=0:0,hash_seed={}",
                    derived_uuid(&format!("{seed}/data-hash"))
                ))
                .arg("-d")
                .arg(&extracted.var_seed)
                .arg(&data_img)
                .env("E2FSPROGS_FAKE_TIME", opts.epoch.to_string()),
        )
    })?;

    let raw = out.join(format!("{base_name}.raw"));
    let qcow2 = out.join(format!("{base_name}.qcow2"));
    stages.run("disk-image", |s| {
        disk::write_raw(
            &gpt,
            &disk::Contents {
                esp: &esp_img,
                root: &root_file,
                verity: &verity_file,
                data: &data_img,
            },
            &raw,
        )?;
        disk::to_qcow2(s, &raw, &qcow2)
    })?;

    let zst = out.join(format!("{base_name}.root.erofs.zst"));
    stages.run("compress-payload", |_| {
        compress_payload(&root_file, &zst, spec.payload_zstd_level)
    })?;

    let payload = |p: &Path| -> Result<Payload> {
        Ok(Payload {
            file: file_name(p),
            size: std::fs::metadata(p)?.len(),
            sha256: sha256_file(p)?,
        })
    };
    let info = BuildInfo {
        format_version: build_info::FORMAT_VERSION,
        name: spec.name.clone(),
        version: spec.version.clone(),
        architecture: spec.architecture.clone(),
        kernel_version: kver,
        source_date_epoch: opts.epoch,
        root_hash: tree.root_hash_hex(),
        cmdline,
        uki_entry,
        disk: build_info::Disk {
            size: gpt.disk_size,
            guid: gpt.disk_guid.to_string(),
        },
        partitions: gpt
            .partitions
            .iter()
            .enumerate()
            .map(|(i, p)| PartitionInfo {
                number: i as u32 + 1,
                label: p.label.clone(),
                type_guid: p.type_guid.to_string(),
                partuuid: p.uuid.to_string(),
                offset: p.offset(),
                size: p.size(),
            })
            .collect(),
        payloads: Payloads {
            root: payload(&root_file)?,
            root_zst: payload(&zst)?,
            verity: payload(&verity_file)?,
            uki: payload(&uki_file)?,
        },
        images: Images {
            raw: file_name(&raw),
            qcow2: file_name(&qcow2),
        },
        packages,
        dropped_modules,
        purged_packages: [extracted.purged.clone(), purged_after_initrd].concat(),
    };
    let json = serde_json::to_string_pretty(&info)?;
    let tmp = out.join("build.json.tmp");
    std::fs::write(&tmp, format!("{json}\n"))?;
    std::fs::rename(&tmp, out.join("build.json"))?;
    // The work tree is a full copy of the root: do not leave it behind.
    std::fs::remove_dir_all(&work)
        .with_context(|| format!("cannot clean up {}", work.display()))?;
    Ok(info)
}

fn file_name(p: &Path) -> String {
    p.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// The verity tree of a root filesystem image. Salt and superblock UUID are
/// derived from the build's seed so two builds of the same input agree.
fn hash_file(path: &Path, seed: &str) -> Result<verity::Tree> {
    let salt = Sha256::digest(format!("{seed}/verity-salt").as_bytes()).to_vec();
    let mut builder = verity::TreeBuilder::new(verity::Params {
        salt,
        uuid: derived_uuid(&format!("{seed}/verity")),
    })?;
    let mut f = BufReader::with_capacity(1 << 20, File::open(path)?);
    std::io::copy(&mut f, &mut builder)?;
    Ok(builder.finish()?)
}

/// The root payload's zstd window: 2^24 bytes.
const PAYLOAD_WINDOW_LOG: u32 = 24;

/// Compresses a root payload as a release serves it: zstd at `level`,
/// checksummed, long-distance matching over a [`PAYLOAD_WINDOW_LOG`] window.
/// The update bench compresses its payload with this too.
pub fn compress_payload(src: &Path, dst: &Path, level: i32) -> Result<()> {
    let tmp = dst.with_extension("tmp");
    let mut input = BufReader::new(File::open(src)?);
    let mut enc = zstd::Encoder::new(BufWriter::new(File::create(&tmp)?), level)?;
    enc.include_checksum(true)?;
    // Long-distance matching over a 16 MiB window finds what repeats far
    // apart in the root (4% smaller at level 12), and a 16 MiB window is
    // all the host's decoder holds in memory.
    enc.long_distance_matching(true)?;
    enc.window_log(PAYLOAD_WINDOW_LOG)?;
    enc.multithread(
        std::thread::available_parallelism()
            .map(|n| n.get() as u32)
            .unwrap_or(1),
    )?;
    std::io::copy(&mut input, &mut enc)?;
    let mut w = enc.finish()?;
    w.flush()?;
    drop(w);
    std::fs::rename(&tmp, dst)?;
    Ok(())
}

pub fn sha256_file(p: &Path) -> Result<String> {
    let mut f = File::open(p).with_context(|| format!("cannot open {}", p.display()))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(hex::encode(h.finalize()))
}

fn bill_of_materials(stage: &crate::stage::Stage, var: &Path) -> Result<Vec<Package>> {
    let text = stage.output(
        Command::new("dpkg-query")
            .arg(format!("--admindir={}", var.join("lib/dpkg").display()))
            .arg("-W")
            .arg("-f=${Package}\t${Version}\t${Architecture}\n"),
    )?;
    let mut pkgs: Vec<Package> = text
        .lines()
        .filter_map(|l| {
            let mut it = l.split('\t');
            Some(Package {
                name: it.next()?.to_string(),
                version: it.next()?.to_string(),
                architecture: it.next()?.to_string(),
            })
        })
        .collect();
    pkgs.sort_by(|a, b| a.name.cmp(&b.name));
    if pkgs.is_empty() {
        anyhow::bail!("dpkg-query listed no packages");
    }
    Ok(pkgs)
}
