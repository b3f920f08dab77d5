use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use std::path::PathBuf;

/// Build Ballast disk images and release payloads.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Build the disk image (raw and qcow2), the release payloads and build.json.
    Build {
        /// The image spec (YAML, see docs/image.md).
        #[arg(long, default_value = "configs/image.yaml")]
        config: PathBuf,
        /// Output directory.
        #[arg(long, default_value = "out")]
        output: PathBuf,
        /// Cache of bootstrapped root filesystems and initrds.
        #[arg(long, default_value = "cache")]
        cache_dir: PathBuf,
        /// Directory with the release build of os-agent (osctl is a link to it).
        #[arg(long, default_value = "target/release")]
        agent_dir: PathBuf,
        /// The units tree copied to the image's /usr/lib.
        #[arg(long, default_value = "units")]
        units_dir: PathBuf,
    },
    /// Make an ed25519 key pair for signing releases: <out>/<name>.secret and
    /// <out>/<name>.pub. With --secure-boot: a Secure Boot key set (PK, KEK,
    /// db and their enrolment files) in the new directory <out>.
    Keygen {
        #[arg(long)]
        out: PathBuf,
        /// File name of a release key; common name of Secure Boot certificates.
        #[arg(long)]
        name: Option<String>,
        #[arg(long)]
        secure_boot: bool,
    },
    /// Publish a build into a channel directory: content-addressed payloads and the signed manifest.
    Release {
        /// Output directory of `image-build build` (holds build.json).
        #[arg(long)]
        build: PathBuf,
        /// The channel directory (served as static files).
        #[arg(long)]
        channel_dir: PathBuf,
        /// Channel name, e.g. stable.
        #[arg(long)]
        channel: String,
        /// Secret key to sign with; repeat to sign with several (key rotation).
        #[arg(long = "key", required = true)]
        keys: Vec<PathBuf>,
        /// Spread the rollout over this many hours (0: every host at once).
        #[arg(long, default_value_t = 0.0)]
        rollout_hours: f64,
        /// Days until the manifest expires; republish before then.
        #[arg(long, default_value_t = 30)]
        expires_days: u64,
        /// Sign the published UKI with this Secure Boot key directory's db
        /// key, unless the build signed it with that key already.
        #[arg(long)]
        secure_boot_keys: Option<PathBuf>,
    },
    /// Check a spec and print it with defaults filled in.
    Validate {
        #[arg(long, default_value = "configs/image.yaml")]
        config: PathBuf,
    },
}

fn epoch() -> Result<u64> {
    match std::env::var("SOURCE_DATE_EPOCH") {
        Ok(v) => v
            .trim()
            .parse()
            .with_context(|| format!("SOURCE_DATE_EPOCH={v:?} is not a number of seconds")),
        Err(_) => Ok(std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_secs()),
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Cmd::Build {
            config,
            output,
            cache_dir,
            agent_dir,
            units_dir,
        } => {
            let spec = image_build::spec::load(&config)?;
            if !nix_is_root() {
                anyhow::bail!(
                    "image-build build must run as root (mmdebstrap --mode=root and chroot)"
                );
            }
            let info = image_build::build::build(&image_build::build::BuildOptions {
                spec,
                output: output.clone(),
                cache_dir,
                agent_dir,
                units_dir,
                epoch: epoch()?,
            })?;
            println!(
                "built {} {}: {} (root hash {})",
                info.name,
                info.version,
                output.join(&info.images.raw).display(),
                info.root_hash
            );
            Ok(())
        }
        Cmd::Keygen {
            out,
            name,
            secure_boot: true,
        } => {
            image_build::secure_boot::keygen(&out, name.as_deref().unwrap_or("Ballast"))?;
            println!(
                "Secure Boot keys in {}: put PK.key and KEK.key offline; builds need db.key, db.crt and the .auth files",
                out.display()
            );
            Ok(())
        }
        Cmd::Keygen {
            out,
            name,
            secure_boot: false,
        } => {
            let (secret, public) =
                image_build::release::keygen(&out, name.as_deref().unwrap_or("release"))?;
            println!(
                "secret key: {}\npublic key: {}",
                secret.display(),
                public.display()
            );
            Ok(())
        }
        Cmd::Release {
            build,
            channel_dir,
            channel,
            keys,
            rollout_hours,
            expires_days,
            secure_boot_keys,
        } => {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)?
                .as_secs();
            let m = image_build::release::release(&image_build::release::ReleaseOptions {
                build_dir: &build,
                channel_dir: &channel_dir,
                channel: &channel,
                keys: &keys,
                rollout_hours,
                expires_days,
                now,
                secure_boot_keys: secure_boot_keys.as_deref(),
            })?;
            println!(
                "published {} {} to channel {} (sequence {}) in {}",
                m.name,
                m.version,
                m.channel,
                m.sequence,
                channel_dir.display()
            );
            Ok(())
        }
        Cmd::Validate { config } => {
            let spec = image_build::spec::load(&config)?;
            println!("{:#?}", spec.spec);
            Ok(())
        }
    }
}

fn nix_is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .map(|s| {
            s.lines()
                .any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(1) == Some("0"))
        })
        .unwrap_or(false)
}

fn main() {
    let cli = Cli::parse();
    if let Err(e) = run(cli) {
        eprintln!("error: {e}");
        for cause in e.chain().skip(1) {
            eprintln!("  caused by: {cause}");
        }
        std::process::exit(1);
    }
}
