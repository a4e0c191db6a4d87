//! guest-blk-bench: fio inside a real Linux guest (QEMU, vhost-user-blk-pci)
//! against several vhost-user-blk backends in one run, printed as JSON.
//!
//! The host's fio and its libraries are copied into the guest. Each backend
//! serves the same raw image on the host disk and gets a fresh guest; the
//! jobs run on /dev/vda with O_DIRECT in the guest, so the guest's page
//! cache is not what is measured.
//!
//!   guest-blk-bench --backend blk-backend --backend qsd
//!   guest-blk-bench --backend 'mine=target/release/blk-backend --fd={fd} --image={image}'

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::Parser;
use serde::Serialize;

use tests::bench;
use tests::frontend::BackendProcess;
use tests::guest::{self, Qemu, TOOL_RUN};

#[derive(Parser, Debug)]
#[command(about = "fio in a real guest against vhost-user-blk backends, side by side")]
struct Args {
    /// A backend: blk-backend, blk-backend-buffered, qsd, qsd-buffered, or
    /// NAME=COMMAND with {fd} and {image}. Repeat to compare.
    #[arg(long = "backend", required = true)]
    backends: Vec<String>,
    /// Seconds per fio job.
    #[arg(long, default_value_t = 5)]
    seconds: u64,
    /// Image size in MiB (written once, so reads find data).
    #[arg(long, default_value_t = 1024)]
    image_mib: u64,
    /// Guest vCPUs, and queues of the disk (QEMU asks for one per vCPU).
    #[arg(long, default_value_t = 2)]
    cpus: u32,
    /// Where the image lives (a real disk, not tmpfs).
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Rounds: one guest per backend each, the order reversed every other
    /// round; the medians are reported, every round is kept.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    rounds: u32,
}

/// (name, fio arguments)
const JOBS: &[(&str, &str)] = &[
    ("randread-4k-qd1", "--rw=randread --bs=4k --iodepth=1"),
    ("randwrite-4k-qd1", "--rw=randwrite --bs=4k --iodepth=1"),
    ("randread-4k-qd32", "--rw=randread --bs=4k --iodepth=32"),
    ("seqread-1m-qd4", "--rw=read --bs=1m --iodepth=4"),
    ("seqwrite-1m-qd4", "--rw=write --bs=1m --iodepth=4"),
];

#[derive(Serialize, Clone)]
struct Job {
    iops: f64,
    mb_per_s: f64,
    clat_p50_us: f64,
}

#[derive(Serialize)]
struct Row {
    name: String,
    cmd: String,
    /// Medians over the rounds.
    jobs: BTreeMap<String, Job>,
    rounds: Vec<BTreeMap<String, Job>>,
}

fn preset(name: &str) -> Option<String> {
    let bin = |n: &str| {
        let here = std::env::current_exe().ok()?;
        let beside = here.parent()?.join(n);
        beside
            .is_file()
            .then_some(beside)
            .or_else(|| tests::find_program(n))
            .map(|p| p.to_string_lossy().into_owned())
    };
    let qsd = |direct: &str| {
        Some(format!(
            "{} --blockdev driver=file,node-name=f,filename={{image}},aio=io_uring,cache.direct={direct} \
             --export type=vhost-user-blk,id=e,node-name=f,addr.type=fd,addr.str={{fd}},writable=on,num-queues={{queues}}",
            bin("qemu-storage-daemon")?
        ))
    };
    match name {
        "blk-backend" => Some(format!(
            "{} --fd={{fd}} --image={{image}} --num-queues={{queues}} --direct",
            bin("blk-backend")?
        )),
        "blk-backend-buffered" => Some(format!(
            "{} --fd={{fd}} --image={{image}} --num-queues={{queues}}",
            bin("blk-backend")?
        )),
        "qsd" => qsd("on"),
        "qsd-buffered" => qsd("off"),
        _ => None,
    }
}

fn main() -> Result<()> {
    let a = Args::parse();
    if let Err(why) = guest::qemu_available() {
        bail!("cannot boot a guest: {why}");
    }
    let fio = tests::find_program("fio").context("fio is not installed: apt-get install fio")?;
    let dir = a.dir.clone().unwrap_or_else(bench::scratch_dir);
    std::fs::create_dir_all(&dir)?;
    let image = dir.join(format!("guest-image-{}m.raw", a.image_mib));
    if std::fs::metadata(&image).map(|m| m.len()).unwrap_or(0) != a.image_mib << 20 {
        eprintln!(
            "guest-blk-bench: writing {} MiB image {}",
            a.image_mib,
            image.display()
        );
        let chunk: Vec<u8> = (0..1 << 20).map(|i| (i * 7 % 251) as u8).collect();
        let mut f = std::fs::File::create(&image)?;
        for _ in 0..a.image_mib {
            std::io::Write::write_all(&mut f, &chunk)?;
        }
        f.sync_all()?;
    }
    let mut script = String::from("set -e\n");
    for (name, args) in JOBS {
        script.push_str(&format!(
            "echo 'FIO-BEGIN {name}'\n{TOOL_RUN} /tools/fio --name={name} --filename=/dev/vda \
             --ioengine=libaio --direct=1 --runtime={s} --time_based --size={size}M {args} \
             --output-format=json --group_reporting\necho 'FIO-END {name}'\n",
            s = a.seconds,
            size = a.image_mib,
        ));
    }

    let mut backends = Vec::new();
    for spec in &a.backends {
        let (name, cmd) = match preset(spec) {
            Some(cmd) => (spec.clone(), cmd),
            None => {
                let (n, c) = spec
                    .split_once('=')
                    .with_context(|| format!("`{spec}` is neither a preset nor NAME=COMMAND"))?;
                (n.to_string(), c.to_string())
            }
        };
        let cmd = cmd
            .replace("{image}", &image.to_string_lossy())
            .replace("{queues}", &a.cpus.to_string());
        backends.push((name, cmd));
    }

    // Each round boots one guest per backend; odd rounds take the backends
    // in the other order, so neither always goes first.
    let mut runs: Vec<Vec<BTreeMap<String, Job>>> = vec![Vec::new(); backends.len()];
    for round in 0..a.rounds {
        let mut order: Vec<usize> = (0..backends.len()).collect();
        if round % 2 == 1 {
            order.reverse();
        }
        for i in order {
            let (name, cmd) = &backends[i];
            eprintln!("guest-blk-bench: round {}/{}: {name}", round + 1, a.rounds);
            runs[i].push(run_backend(name, cmd, &image, &fio, a.cpus, &script)?);
        }
    }
    let rows: Vec<Row> = backends
        .into_iter()
        .zip(runs)
        .map(|((name, cmd), rounds)| Row {
            name,
            cmd,
            jobs: median_jobs(&rounds),
            rounds,
        })
        .collect();
    let out = serde_json::json!({
        "workload": "guest-fio",
        "seconds_per_job": a.seconds,
        "image_mib": a.image_mib,
        "rounds": a.rounds,
        "results": rows,
    });
    println!("{}", serde_json::to_string_pretty(&out)?);
    Ok(())
}

/// One guest on one backend: every fio job, parsed.
fn run_backend(
    name: &str,
    cmd: &str,
    image: &std::path::Path,
    fio: &std::path::Path,
    cpus: u32,
    script: &str,
) -> Result<BTreeMap<String, Job>> {
    let argv: Vec<String> = cmd.split_whitespace().map(String::from).collect();
    // Each backend starts from a clean image (not behind the last one's
    // flush) that is all in the host page cache.
    bench::warm_page_cache(image)?;
    eprintln!("guest-blk-bench: {name}: {cmd}");
    let backend = BackendProcess::spawn(&argv, Duration::from_secs(20))?;
    let qemu = Qemu::new()
        .memory_mib(1024)
        .cpus(cpus)
        .tool(fio)?
        .blk(backend.socket());
    let run = bench::run_guest(&qemu, script, name, &backend)?;
    let mut jobs = BTreeMap::new();
    let out = run.script_output();
    for (job, _) in JOBS {
        let begin = format!("FIO-BEGIN {job}");
        let end = format!("FIO-END {job}");
        let text: String = out
            .lines()
            .skip_while(|l| !l.contains(&begin))
            .skip(1)
            .take_while(|l| !l.contains(&end))
            .collect::<Vec<_>>()
            .join("\n");
        let start = text
            .find('{')
            .with_context(|| format!("{name} {job}: no JSON:\n{text}"))?;
        let v: serde_json::Value = serde_json::from_str(&text[start..])
            .with_context(|| format!("{name} {job}: fio JSON"))?;
        let j = &v["jobs"][0];
        let side = if j["write"]["iops"].as_f64().unwrap_or(0.0) > 0.0 {
            &j["write"]
        } else {
            &j["read"]
        };
        let r = Job {
            iops: side["iops"].as_f64().unwrap_or(0.0),
            mb_per_s: side["bw_bytes"].as_f64().unwrap_or(0.0) / 1e6,
            clat_p50_us: side["clat_ns"]["percentile"]["50.000000"]
                .as_f64()
                .unwrap_or(0.0)
                / 1000.0,
        };
        eprintln!(
            "guest-blk-bench: {name} {job}: {:.0} IOPS, {:.1} MB/s, p50 {:.1} µs",
            r.iops, r.mb_per_s, r.clat_p50_us
        );
        jobs.insert(job.to_string(), r);
    }
    Ok(jobs)
}

/// Per job, the median of each figure over the rounds (the mean of the
/// middle two for an even count).
fn median_jobs(rounds: &[BTreeMap<String, Job>]) -> BTreeMap<String, Job> {
    let median = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        match v.len() {
            0 => 0.0,
            n if n % 2 == 1 => v[n / 2],
            n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
        }
    };
    let mut out = BTreeMap::new();
    for (job, _) in JOBS {
        let of =
            |f: fn(&Job) -> f64| median(rounds.iter().filter_map(|r| r.get(*job)).map(f).collect());
        out.insert(
            job.to_string(),
            Job {
                iops: of(|j| j.iops),
                mb_per_s: of(|j| j.mb_per_s),
                clat_p50_us: of(|j| j.clat_p50_us),
            },
        );
    }
    out
}
