//! virtiofsd-fast: a vhost-user virtio-fs backend. See the library docs.

use std::process::ExitCode;

use clap::Parser;
use virtiofsd_fast::{args, Args, Config};

fn main() -> ExitCode {
    let mut a = Args::parse();
    if a.print_capabilities {
        println!("{}", args::capabilities_json());
        return ExitCode::SUCCESS;
    }
    // -d and -o loglevel decide the log level.
    if let Err(e) = a.apply_compat() {
        eprintln!("virtiofsd-fast: {e}");
        return ExitCode::from(2);
    }
    let logging = if a.syslog {
        backend_common::init_syslog("virtiofsd-fast", &a.log_level)
    } else {
        backend_common::init_logging(&a.log_level)
    };
    if let Err(e) = logging {
        eprintln!("virtiofsd-fast: {e}");
        return ExitCode::from(2);
    }
    let cfg = match Config::try_from(a) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("virtiofsd-fast: {e}");
            return ExitCode::from(2);
        }
    };
    match virtiofsd_fast::run(&cfg) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("virtiofsd-fast: {:#}", anyhow::Error::from(e));
            ExitCode::FAILURE
        }
    }
}
