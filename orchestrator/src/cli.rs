//! Command-line interface of the `orchestrator` binary.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};
use orchestrator::image::{self, ImageConfig};

/// Starts, wires and supervises the device processes and the VMM.
#[derive(Debug, Parser)]
#[command(version, about)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// The guest image used by the test bed.
    #[command(subcommand)]
    Image(ImageCommand),
}

#[derive(Debug, Subcommand)]
pub enum ImageCommand {
    /// Build (or refresh) the default guest image: Debian's cloud kernel + a busybox initramfs.
    Build(BuildArgs),
}

#[derive(Debug, Args)]
pub struct BuildArgs {
    /// Output directory [default: <workspace>/.cache/guest]
    #[arg(long, value_name = "DIR")]
    pub out: Option<PathBuf>,
    /// Kernel image to use instead of the newest /boot/vmlinuz-*-cloud-amd64.
    #[arg(long, value_name = "PATH")]
    pub kernel: Option<PathBuf>,
    /// Kernel version (selects /boot/vmlinuz-VER and /lib/modules/VER).
    #[arg(long, value_name = "VER")]
    pub kernel_version: Option<String>,
    /// Statically linked busybox to pack.
    #[arg(long, value_name = "PATH", default_value = "/usr/bin/busybox")]
    pub busybox: PathBuf,
}

impl From<BuildArgs> for ImageConfig {
    fn from(args: BuildArgs) -> Self {
        let mut cfg = ImageConfig::new(args.out.unwrap_or_else(image::default_out_dir));
        cfg.kernel = args.kernel;
        cfg.kernel_version = args.kernel_version;
        cfg.busybox = args.busybox;
        cfg
    }
}
