//! net-backend: a vhost-user virtio-net backend. See the library docs.

use std::process::ExitCode;

use clap::Parser;
use net_backend::{Args, Config};

fn main() -> ExitCode {
    let a = Args::parse();
    if let Err(e) = backend_common::init_logging(&a.log_level) {
        eprintln!("net-backend: {e}");
        return ExitCode::from(2);
    }
    let cfg = match Config::try_from(a) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("net-backend: {e}");
            return ExitCode::from(2);
        }
    };
    match net_backend::run(&cfg) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("net-backend: {:#}", anyhow::Error::from(e));
            ExitCode::FAILURE
        }
    }
}
