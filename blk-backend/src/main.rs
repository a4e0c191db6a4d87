//! blk-backend: a vhost-user virtio-blk backend. See the library docs.

use std::process::ExitCode;

use blk_backend::{Args, Config};
use clap::Parser;

fn main() -> ExitCode {
    let a = Args::parse();
    if let Err(e) = backend_common::init_logging(&a.log_level) {
        eprintln!("blk-backend: {e}");
        return ExitCode::from(2);
    }
    let cfg = match Config::try_from(a) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("blk-backend: {e}");
            return ExitCode::from(2);
        }
    };
    match blk_backend::run(&cfg) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("blk-backend: {:#}", anyhow::Error::from(e));
            ExitCode::FAILURE
        }
    }
}
