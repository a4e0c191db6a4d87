//! `orchestrator`: for now, builds the guest image of the test bed.

mod cli;

use clap::Parser;
use cli::{Cli, Command, ImageCommand};
use orchestrator::image;

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Image(ImageCommand::Build(args)) => {
            let img = image::build(&args.into())?;
            println!("kernel={}", img.kernel.display());
            println!("initrd={}", img.initramfs.display());
        }
    }
    Ok(())
}
