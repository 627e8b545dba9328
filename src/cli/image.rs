//! `fcdev image build NAME [--out DIR]` and `fcdev image snapshot NAME [--out DIR]`.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::Context;

use crate::cli::output::print_json;
use crate::image::build::{build, BuildOptions};
use crate::image::snapshot::snapshot_image;
use crate::server::backend::qemu::{Accel, QemuBackend, QemuConfig};

#[derive(Debug, clap::Args)]
pub struct ImageArgs {
    #[command(subcommand)]
    pub command: ImageCommand,
}

#[derive(Debug, clap::Subcommand)]
pub enum ImageCommand {
    /// Build an image from Debian packages (recipes: tiny, press). press is skipped when already built from the
    /// same recipe (use --force).
    Build {
        name: String,
        /// Output folder (default: <data dir>/images/NAME).
        #[arg(long)]
        out: Option<PathBuf>,
        /// Guest kernel version under /boot (default: the newest *-cloud-amd64).
        #[arg(long)]
        kernel_version: Option<String>,
        /// Leave dropbear (ssh) out.
        #[arg(long)]
        no_ssh: bool,
        /// press: a shell script run in the guest's root filesystem after the recipe (operator's extra steps).
        #[arg(long, env = "FCDEV_PRESS_HOOK")]
        hook: Option<PathBuf>,
        /// Build even when the output holds an image of the same recipe.
        #[arg(long)]
        force: bool,
        /// Print the result as JSON (progress stays on stderr).
        #[arg(long)]
        json: bool,
    },
    /// Boot the image's VMs on an isolated NIC and save the onboarding snapshot restored by `fcdev up`.
    Snapshot {
        name: String,
        /// Image folder (default: <data dir>/images/NAME).
        #[arg(long)]
        out: Option<PathBuf>,
        /// Accelerator: auto (KVM only where the CPU shows vmx/svm), kvm or tcg.
        #[arg(long, default_value = "auto", env = "FCDEV_ACCEL")]
        accel: Accel,
        /// Print the result as JSON (progress stays on stderr).
        #[arg(long)]
        json: bool,
    },
}

#[derive(serde::Serialize)]
struct Built<'a> {
    image: &'a str,
    dir: &'a Path,
    /// false: already built from the same recipe (press), nothing done.
    built: bool,
    seconds: f64,
}

#[derive(serde::Serialize)]
struct Snapshotted<'a> {
    image: &'a str,
    dir: &'a Path,
    accelerator: String,
    snapshots: Vec<SnapshotEntry>,
    seconds: f64,
}

#[derive(serde::Serialize)]
struct SnapshotEntry {
    key: String,
    vms: Vec<String>,
    saved_ms: u128,
}

fn image_dir(data_dir: &Path, name: &str, out: Option<PathBuf>) -> anyhow::Result<PathBuf> {
    if !crate::names::is_dns_label(name) {
        anyhow::bail!("`{name}` is not a valid image name (a-z, 0-9, -)");
    }
    Ok(out.unwrap_or_else(|| data_dir.join("images").join(name)))
}

pub fn run(args: ImageArgs, data_dir: &Path) -> anyhow::Result<()> {
    match args.command {
        ImageCommand::Build {
            name,
            out,
            kernel_version,
            no_ssh,
            hook,
            force,
            json,
        } => {
            let dir = image_dir(data_dir, &name, out)?;
            let t0 = Instant::now();
            let opts = BuildOptions {
                kernel_version,
                no_ssh,
                hook,
                force,
                progress: true,
            };
            if name == "press" {
                let built = crate::image::press::build_press(&dir, &opts)
                    .with_context(|| format!("building image `{name}`"))?;
                if !built {
                    if json {
                        print_json(&Built {
                            image: &name,
                            dir: &dir,
                            built: false,
                            seconds: t0.elapsed().as_secs_f64(),
                        });
                    } else {
                        println!(
                            "image {name} in {} is up to date (same recipe; --force rebuilds)",
                            dir.display()
                        );
                    }
                    return Ok(());
                }
            } else {
                build(&name, &dir, &opts).with_context(|| format!("building image `{name}`"))?;
            }
            if json {
                print_json(&Built {
                    image: &name,
                    dir: &dir,
                    built: true,
                    seconds: t0.elapsed().as_secs_f64(),
                });
                return Ok(());
            }
            println!(
                "built image {name} in {} ({:.1} s)",
                dir.display(),
                t0.elapsed().as_secs_f64()
            );
            println!("next: fcdev image snapshot {name}");
        }
        ImageCommand::Snapshot {
            name,
            out,
            accel,
            json,
        } => {
            let dir = image_dir(data_dir, &name, out)?;
            let backend = QemuBackend::new(QemuConfig {
                accel,
                qemu_binary: None,
            })
            .context("qemu")?;
            if !json {
                println!("accelerator: {}", backend.accel());
            }
            let t0 = Instant::now();
            let report = snapshot_image(&dir, &backend)
                .with_context(|| format!("snapshotting image `{name}`"))?;
            if json {
                print_json(&Snapshotted {
                    image: &name,
                    dir: &dir,
                    accelerator: backend.accel().to_string(),
                    snapshots: report
                        .snapshots
                        .iter()
                        .map(|(key, vms, ms)| SnapshotEntry {
                            key: key.to_string(),
                            vms: vms.iter().map(|v| v.to_string()).collect(),
                            saved_ms: u128::from(*ms),
                        })
                        .collect(),
                    seconds: t0.elapsed().as_secs_f64(),
                });
                return Ok(());
            }
            for (key, vms, ms) in &report.snapshots {
                println!("snapshot {key} for {} (saved in {ms} ms)", vms.join(", "));
            }
            println!(
                "snapshot of {name} done in {:.1} s ({})",
                t0.elapsed().as_secs_f64(),
                dir.display()
            );
        }
    }
    Ok(())
}

/// Make sure the default image (`tiny`, with its onboarding snapshot) exists under `data_dir/images` (used by
/// `fcdev up --local`). A snapshot that cannot be taken is a warning: the VMs then boot instead of restoring.
pub fn ensure_default_image(data_dir: &Path, progress: bool) -> anyhow::Result<()> {
    let dir = data_dir.join("images").join("tiny");
    if !dir.join(crate::server::images::IMAGE_FILE).is_file() {
        if progress {
            eprintln!("Building the tiny image in {} ...", dir.display());
        }
        build("tiny", &dir, &BuildOptions::default()).context("building the tiny image")?;
    }
    let image = crate::server::images::Image::load(&dir)?;
    if image.snapshot_dir().is_some() {
        return Ok(());
    }
    let accel: Accel = std::env::var("FCDEV_ACCEL")
        .ok()
        .and_then(|a| a.parse().ok())
        .unwrap_or(Accel::Auto);
    let backend = match QemuBackend::new(QemuConfig {
        accel,
        qemu_binary: None,
    }) {
        Ok(b) => b,
        Err(e) => {
            eprintln!("warning: no onboarding snapshot for tiny ({e}); VMs will boot");
            return Ok(());
        }
    };
    if progress {
        eprintln!(
            "Taking the onboarding snapshot of tiny ({}) ...",
            backend.accel()
        );
    }
    if let Err(e) = snapshot_image(&dir, &backend) {
        eprintln!("warning: no onboarding snapshot for tiny ({e}); VMs will boot");
    }
    Ok(())
}
