//! blk-backend over a real vhost-user connection, driven by the test
//! frontend: normal I/O on both engines, bad requests, hostile chains,
//! reconnects with I/O in flight, the sandbox, and bad command lines.

use std::os::unix::fs::MetadataExt;
use std::time::{Duration, Instant};

mod common;

use common::{client, image, start, IMAGE};
use tests::blk::{self, req, BlkClient, BlkError};
use tests::hostile;
use tests::queue::Shape;
use tests::ring::Seg;

fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u32 * 31 + u32::from(seed)) as u8)
        .collect()
}

/// Everyday I/O, the same on every engine and with and without O_DIRECT.
#[test]
fn reads_writes_flushes_and_ids_on_every_engine() {
    for extra in [
        &["--io-engine=uring"][..],
        &["--io-engine=threads"],
        // Reads of 4 KiB and more to the copy pool, smaller ones and the
        // rest on io_uring.
        &["--io-engine=uring", "--pool-reads-from=4096"],
        &["--io-engine=uring", "--direct"],
        &["--io-engine=threads", "--direct"],
        // Transfers of 4 KiB and more through the huge-page bounce
        // buffers; the 512-byte and unaligned ones straight.
        &["--io-engine=uring", "--direct", "--bounce=4096"],
        &["--io-engine=threads", "--direct", "--bounce=4096"],
    ] {
        let img = image();
        let mut args = vec!["--num-queues=2", "--serial=disk-0042"];
        args.extend_from_slice(extra);
        let mut b = start(img.path(), &args);
        let mut c = client(&mut b, 2, 8);
        let cfg = c.config().unwrap();
        assert_eq!(cfg.capacity, IMAGE / blk::SECTOR, "{extra:?}");
        assert_eq!(cfg.num_queues, 2);
        assert_eq!(cfg.blk_size, 512);
        assert!(cfg.seg_max >= 128 && cfg.size_max >= 4096);
        assert!(cfg.max_discard_sectors > 0 && cfg.max_write_zeroes_sectors > 0);

        let data = pattern(1, 64 << 10);
        c.write(2048, &data).unwrap();
        assert_eq!(c.read(2048, data.len() as u32).unwrap(), data, "{extra:?}");
        c.flush().unwrap();
        let on_disk = std::fs::read(img.path()).unwrap();
        assert_eq!(&on_disk[2048 * 512..2048 * 512 + data.len()], &data[..]);
        // Indirect chains; and data sharing a descriptor with the header,
        // 16 bytes into it, which O_DIRECT cannot take as is.
        c.shape = Shape::INDIRECT;
        assert_eq!(c.read(2049, 512).unwrap(), &data[512..1024]);
        c.shape = Shape {
            indirect: false,
            merge_readable: true,
        };
        c.write(4096, &data[..4096]).unwrap();
        c.shape = Shape::DIRECT;
        assert_eq!(c.read(4096, 4096).unwrap(), &data[..4096], "{extra:?}");
        let mut id = c.get_id().unwrap();
        id.truncate(9);
        assert_eq!(id, b"disk-0042");
        assert_eq!(std::fs::metadata(img.path()).unwrap().len(), IMAGE);
        assert!(b.is_running(), "{}", b.output());
    }
}

#[test]
fn out_of_range_and_misshapen_requests_get_ioerr_and_leave_the_image_alone() {
    let img = image();
    std::fs::write(img.path(), pattern(9, IMAGE as usize)).unwrap();
    let before = std::fs::read(img.path()).unwrap();
    let mut b = start(img.path(), &[]);
    let mut c = client(&mut b, 1, 8);
    let last = IMAGE / blk::SECTOR;
    let ioerr = |r: Result<(), BlkError>| matches!(r, Err(BlkError::Status(blk::S_IOERR)));
    assert!(ioerr(c.write(last, &[1u8; 512])), "past the end");
    assert!(ioerr(c.write(last - 1, &[1u8; 1024])), "across the end");
    assert!(ioerr(c.write(u64::MAX / 2, &[1u8; 512])), "offset overflow");
    assert!(ioerr(c.write(0, &[1u8; 100])), "not a whole sector");
    assert!(
        matches!(c.read(last, 512), Err(BlkError::Status(blk::S_IOERR))),
        "read past the end"
    );
    assert!(matches!(
        c.read(0, 700),
        Err(BlkError::Status(blk::S_IOERR))
    ));
    assert!(ioerr(c.discard(last - 1, 8)), "discard across the end");
    // Unknown request types, and known ones we do not offer.
    for typ in [0x7777, 10, 14, 24] {
        assert_eq!(
            c.raw_status(typ, 0, &[]).unwrap(),
            blk::S_UNSUPP,
            "type {typ}"
        );
    }
    // Unmap on a discard and unknown flags on write-zeroes are UNSUPP.
    assert_eq!(
        c.raw_status(req::DISCARD, 0, &blk::range_segment(0, 8, true))
            .unwrap(),
        blk::S_UNSUPP
    );
    let mut seg = blk::range_segment(0, 8, false);
    seg[12] = 4;
    assert_eq!(
        c.raw_status(req::WRITE_ZEROES, 0, &seg).unwrap(),
        blk::S_UNSUPP
    );
    c.flush().unwrap();
    let after = std::fs::read(img.path()).unwrap();
    assert_eq!(after.len(), before.len(), "the image changed size");
    assert!(after == before, "a refused request touched the image");
    assert!(c.dev.has_feature(blk::feature::DISCARD));
}

#[test]
fn a_readonly_disk_refuses_every_write() {
    let img = image();
    std::fs::write(img.path(), pattern(3, IMAGE as usize)).unwrap();
    let before = std::fs::read(img.path()).unwrap();
    let mut b = start(img.path(), &["--readonly"]);
    let mut c = client(&mut b, 1, 4);
    assert!(c.dev.has_feature(blk::feature::RO));
    assert!(!c.dev.has_feature(blk::feature::DISCARD));
    for r in [
        c.write(0, &[0u8; 512]),
        c.discard(0, 8),
        c.write_zeroes(0, 8, false),
    ] {
        assert!(matches!(r, Err(BlkError::Status(blk::S_IOERR))), "{r:?}");
    }
    assert_eq!(c.read(0, 512).unwrap(), &before[..512]);
    c.flush().unwrap();
    assert!(std::fs::read(img.path()).unwrap() == before);
}

#[test]
fn discard_and_write_zeroes_punch_holes() {
    let img = image();
    let mut b = start(img.path(), &[]);
    let mut c = client(&mut b, 1, 4);
    let blocks = || std::fs::metadata(img.path()).unwrap().blocks();
    let mb = pattern(5, 1 << 20);
    for i in 0..4u64 {
        c.write(i * 2048, &mb).unwrap();
    }
    c.flush().unwrap();
    let full = blocks();
    assert!(full >= 4 * 2048, "writes allocated {full} blocks");
    c.discard(0, 2048).unwrap();
    assert!(
        blocks() <= full - 2048,
        "discard left {} of {full}",
        blocks()
    );
    assert_eq!(c.read(0, 4096).unwrap(), vec![0u8; 4096]);
    // Write-zeroes with unmap deallocates; without, it zeroes in place.
    c.write_zeroes(2048, 2048, true).unwrap();
    assert!(blocks() <= full - 4096);
    c.write_zeroes(4096, 2048, false).unwrap();
    assert_eq!(c.read(4096, 1 << 20).unwrap(), vec![0u8; 1 << 20]);
    assert_eq!(
        c.read(6144, 1 << 20).unwrap(),
        mb,
        "the next megabyte is intact"
    );
    assert_eq!(std::fs::metadata(img.path()).unwrap().len(), IMAGE);
}

#[test]
fn hostile_chains_are_dropped_and_the_backend_keeps_serving() {
    let img = image();
    std::fs::write(img.path(), pattern(7, IMAGE as usize)).unwrap();
    let before = std::fs::read(img.path()).unwrap();
    let mut b = start(img.path(), &[]);
    let mut c = client(&mut b, 1, 8);
    let buf = c.dev.mem.alloc_in(1, 4096, 64).unwrap();
    let status = c.dev.mem.alloc_in(1, 64, 64).unwrap();
    let hdr = c.dev.mem.alloc_in(1, 64, 64).unwrap();
    c.dev
        .mem
        .mem()
        .write_slice(&blk::out_header(req::OUT, 0), hdr)
        .unwrap();
    use vm_memory::Bytes;
    let ring = c.queues[0].ring();
    // The header outside memory; data outside memory; no status byte.
    hostile::readable_outside_memory(ring, 16, Seg::writable(status, 1)).unwrap();
    let h = ring
        .add(
            &[
                Seg::readable(hdr, 16),
                Seg::readable(vm_memory::GuestAddress(tests::memory::UNMAPPED_GPA), 512),
                Seg::writable(status, 1),
            ],
            false,
        )
        .unwrap();
    ring.push_avail(h).unwrap();
    ring.publish().unwrap();
    ring.kick_now().unwrap();
    hostile::no_writable_part(ring, Seg::readable(hdr, 16)).unwrap();
    hostile::zero_length(ring, buf, 3).unwrap();
    hostile::looped_chain(ring, buf).unwrap();
    hostile::indirect_table_outside_memory(ring).unwrap();
    hostile::indirect_table_bad_length(ring, buf).unwrap();
    let mut dropped = 0;
    while let Ok(u) = ring.wait_used(Duration::from_millis(300)) {
        assert_eq!(u.len, 0, "an unusable chain came back with data");
        dropped += 1;
    }
    assert!(dropped >= 4, "only {dropped} chains came back");
    // A write whose data descriptor is shorter than a sector: IOERR.
    assert!(matches!(
        c.write(0, &[0u8; 10]),
        Err(BlkError::Status(blk::S_IOERR))
    ));
    assert!(b.is_running(), "died:\n{}", b.output());
    assert_eq!(c.read(0, 512).unwrap(), &before[..512]);
    drop(c);
    // A fresh connection is served as usual.
    let mut c = client(&mut b, 1, 8);
    c.write(8, &[9u8; 512]).unwrap();
    assert_eq!(c.read(8, 512).unwrap(), vec![9u8; 512]);
    let after = std::fs::read(img.path()).unwrap();
    assert!(after[..4096] == before[..4096] && after[4608..] == before[4608..]);
    // Logged once and then rate-limited, not once per chain forever.
    let warnings = b.output().matches("dropping an unusable request").count();
    assert!((1..=10).contains(&warnings), "{warnings} warnings");
}

/// More large transfers in flight than a queue's bounce pages hold: those
/// past the pool go straight to guest memory, and every byte lands where
/// it should either way.
#[test]
fn bounced_transfers_beyond_the_pool_go_straight() {
    let img = image();
    let mut b = start(
        img.path(),
        &["--direct", "--bounce=65536", "--num-queues=1"],
    );
    let mut c = client(&mut b, 1, 32);
    const MIB: usize = 1 << 20;
    let n = 24u64; // the pool holds 16 transfers of 1 MiB
    for round in 0..2u8 {
        for i in 0..n {
            let data = pattern(round * 64 + i as u8, MIB);
            c.push(0, req::OUT, i * (MIB as u64 / 512), &data, 0)
                .unwrap();
        }
        c.queues[0].publish().unwrap();
        for _ in 0..n {
            let done = c.queues[0].wait().unwrap();
            assert_eq!(BlkClient::status(&done).unwrap(), blk::S_OK);
        }
        let on_disk = std::fs::read(img.path()).unwrap();
        for i in 0..n as usize {
            let want = pattern(round * 64 + i as u8, MIB);
            assert!(
                on_disk[i * MIB..(i + 1) * MIB] == want[..],
                "write {i}, round {round}"
            );
        }
        for i in 0..n {
            c.push(0, req::IN, i * (MIB as u64 / 512), &[], MIB as u32)
                .unwrap();
        }
        c.queues[0].publish().unwrap();
        let mut seen = Vec::new();
        for _ in 0..n {
            let done = c.queues[0].wait().unwrap();
            assert_eq!(BlkClient::status(&done).unwrap(), blk::S_OK);
            // A pattern's first byte is its seed.
            let i = done.data[0].wrapping_sub(round * 64);
            assert!(u64::from(i) < n, "a read came back with unknown data");
            assert!(
                done.data[..MIB] == pattern(round * 64 + i, MIB)[..],
                "read {i}"
            );
            seen.push(i);
        }
        seen.sort_unstable();
        seen.dedup();
        assert_eq!(
            seen.len(),
            n as usize,
            "every read came back with its own data"
        );
    }
    let log = b.output();
    assert!(log.contains("huge-page buffers"), "{log}");
    assert!(b.is_running(), "{log}");
}

#[test]
fn many_requests_in_flight_on_every_queue() {
    for engine in [
        &["--io-engine=uring"][..],
        &["--io-engine=threads"],
        // Every read to the copy pool, every write on io_uring.
        &["--io-engine=uring", "--pool-reads-from=4096"],
    ] {
        let img = image();
        let mut args = vec!["--num-queues=4"];
        args.extend_from_slice(engine);
        let mut b = start(img.path(), &args);
        let mut c = client(&mut b, 4, 32);
        for round in 0..3u8 {
            for q in 0..4 {
                for i in 0..32u64 {
                    let sector = (q as u64 * 32 + i) * 8;
                    let fill = round.wrapping_mul(64) ^ (q as u8 * 32 + i as u8);
                    c.push(q, req::OUT, sector, &[fill; 4096], 0).unwrap();
                }
                c.queues[q].publish().unwrap();
            }
            for q in 0..4 {
                for _ in 0..32 {
                    let done = c.queues[q].wait().unwrap();
                    assert_eq!(BlkClient::status(&done).unwrap(), blk::S_OK);
                }
            }
            for i in 0..128u64 {
                let fill = round.wrapping_mul(64) ^ (i as u8);
                assert_eq!(c.read(i * 8, 4096).unwrap(), vec![fill; 4096], "{engine:?}");
            }
            // And read back 32 at a time on each queue (with the copy pool,
            // all but the first of each burst go to the pool).
            for q in 0..4 {
                for i in 0..32u64 {
                    c.push(q, req::IN, (q as u64 * 32 + i) * 8, &[], 4096)
                        .unwrap();
                }
                c.queues[q].publish().unwrap();
                let mut fills: Vec<u8> = (0..32)
                    .map(|_| {
                        let done = c.queues[q].wait().unwrap();
                        assert_eq!(BlkClient::status(&done).unwrap(), blk::S_OK);
                        assert!(done.data[..4096].iter().all(|&b| b == done.data[0]));
                        done.data[0]
                    })
                    .collect();
                fills.sort_unstable();
                let mut want: Vec<u8> = (0..32u8)
                    .map(|i| round.wrapping_mul(64) ^ (q as u8 * 32 + i))
                    .collect();
                want.sort_unstable();
                assert_eq!(fills, want, "{engine:?} queue {q}");
            }
        }
    }
}

#[test]
fn serves_again_after_the_frontend_leaves_with_io_in_flight() {
    let img = image();
    let mut b = start(img.path(), &["--num-queues=2"]);
    for round in 0..3u8 {
        let mut c = client(&mut b, 2, 32);
        // Everything from the last round that completed is on disk.
        if round > 0 {
            assert_eq!(c.read(0, 4096).unwrap(), vec![round - 1; 4096]);
        }
        c.write(0, &[round; 4096]).unwrap();
        for i in 0..32u64 {
            c.push(1, req::OUT, 1024 + i * 128, &[round; 1 << 16], 0)
                .unwrap();
        }
        c.queues[1].publish().unwrap();
        // Leave without waiting.
        drop(c);
    }
    assert!(b.is_running(), "{}", b.output());
    let mut c = client(&mut b, 2, 4);
    assert_eq!(c.read(0, 4096).unwrap(), vec![2u8; 4096]);
}

#[test]
fn four_kib_logical_blocks() {
    let img = image();
    let mut b = start(img.path(), &["--logical-block-size=4096"]);
    let mut c = client(&mut b, 1, 4);
    let cfg = c.config().unwrap();
    assert_eq!(cfg.blk_size, 4096);
    assert_eq!(
        cfg.capacity,
        IMAGE / 512,
        "capacity stays in 512-byte sectors"
    );
    assert!(matches!(
        c.read(1, 4096),
        Err(BlkError::Status(blk::S_IOERR))
    ));
    assert!(matches!(
        c.write(0, &[1u8; 512]),
        Err(BlkError::Status(blk::S_IOERR))
    ));
    c.write(8, &[1u8; 4096]).unwrap();
    assert_eq!(c.read(8, 4096).unwrap(), vec![1u8; 4096]);
}

#[test]
fn a_resized_image_shows_in_the_config_space() {
    let img = image();
    let mut b = start(img.path(), &["--resize-poll-ms=20"]);
    let mut c = client(&mut b, 1, 4);
    img.as_file().set_len(2 * IMAGE).unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while c.config().unwrap().capacity != 2 * IMAGE / 512 {
        assert!(Instant::now() < deadline, "the new size never showed");
        std::thread::sleep(Duration::from_millis(20));
    }
    // The new space is usable; after a shrink, the old space is not.
    c.write(2 * IMAGE / 512 - 8, &[4u8; 4096]).unwrap();
    img.as_file().set_len(IMAGE).unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while c.config().unwrap().capacity != IMAGE / 512 {
        assert!(Instant::now() < deadline, "the shrink never showed");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(matches!(
        c.write(IMAGE / 512, &[4u8; 512]),
        Err(BlkError::Status(blk::S_IOERR))
    ));
    assert_eq!(std::fs::metadata(img.path()).unwrap().len(), IMAGE);
}

#[test]
fn the_sandbox_leaves_only_the_image_and_sockets() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        backend_common::skip_or_fail("the namespace sandbox needs root");
        return;
    }
    let img = image();
    // A descriptor the test leaks into the child must not survive.
    let leak = std::fs::File::open("/etc/hostname").unwrap();
    let _ = &leak;
    let mut b = start(img.path(), &["--num-queues=2"]);
    let mut c = client(&mut b, 2, 4);
    c.write(0, &[1u8; 512]).unwrap();
    let pid = b.serving_pid().unwrap();
    assert_ne!(
        pid,
        b.pid().unwrap(),
        "the backend forks into a pid namespace"
    );
    for ns in ["mnt", "net", "pid", "ipc"] {
        let ours = std::fs::read_link(format!("/proc/self/ns/{ns}")).unwrap();
        let theirs = std::fs::read_link(format!("/proc/{pid}/ns/{ns}")).unwrap();
        assert_ne!(ours, theirs, "{ns} namespace is shared with the host");
    }
    let root: Vec<_> = std::fs::read_dir(format!("/proc/{pid}/root"))
        .unwrap()
        .collect();
    assert!(root.is_empty(), "the root holds {root:?}");
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    for key in ["CapEff:", "CapPrm:", "CapBnd:"] {
        let l = status.lines().find(|l| l.starts_with(key)).unwrap();
        assert_eq!(
            u64::from_str_radix(l.split_whitespace().nth(1).unwrap(), 16).unwrap(),
            0,
            "{l}"
        );
    }
    assert!(status
        .lines()
        .any(|l| l.starts_with("Seccomp:") && l.ends_with('2')));
    let image = std::fs::canonicalize(img.path()).unwrap();
    for e in std::fs::read_dir(format!("/proc/{pid}/fd")).unwrap() {
        let e = e.unwrap();
        let fd: i32 = e.file_name().to_str().unwrap().parse().unwrap();
        let target = std::fs::read_link(e.path()).unwrap();
        let t = target.to_string_lossy();
        let ok = fd <= 2
            || target == image
            || t.starts_with("socket:")
            || t.starts_with("anon_inode:")
            // Guest memory, mapped from the frontend's memfds.
            || t.starts_with("/memfd:");
        assert!(ok, "fd {fd} -> {t}");
    }
    assert!(b.is_running());
}

#[test]
fn bad_command_lines_and_images_are_clear_errors() {
    let run = |args: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_blk-backend"))
            .args(args)
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("s").display().to_string();
    let (code, err) = run(&["--socket-path", &sock, "--image", "/nonexistent/disk.img"]);
    assert_eq!(code, Some(1));
    assert!(
        err.contains("cannot open the image") && err.contains("truncate -s"),
        "{err}"
    );
    let (code, err) = run(&["--socket-path", &sock, "--image", "/tmp"]);
    assert_eq!(code, Some(1));
    assert!(
        err.contains("neither a regular file nor a block device"),
        "{err}"
    );
    let (code, err) = run(&[
        "--socket-path",
        &sock,
        "--image",
        "/tmp/x",
        "--logical-block-size",
        "1000",
    ]);
    assert_eq!(code, Some(2));
    assert!(err.contains("512 or 4096"), "{err}");
    // One writer per image.
    let img = image();
    let mut first = start(img.path(), &[]);
    let _c = client(&mut first, 1, 4);
    let (code, err) = run(&[
        "--socket-path",
        &sock,
        "--image",
        &img.path().display().to_string(),
    ]);
    assert_eq!(code, Some(1));
    assert!(err.contains("in use by another process"), "{err}");
}

/// The inflight area the client set up with the backend.
fn inflight_area(c: &BlkClient) -> (vhost::vhost_user::message::VhostUserInflight, std::fs::File) {
    let (i, f) = c
        .dev
        .inflight
        .as_ref()
        .expect("the inflight area is offered");
    (*i, f.try_clone().unwrap())
}

/// Every head the backend takes is recorded in the vhost-user inflight area
/// (the shim answers GET/SET_INFLIGHT_FD), and cleared once used.
#[test]
fn requests_are_tracked_in_the_inflight_area() {
    use std::os::unix::fs::FileExt;
    let img = image();
    let mut b = start(img.path(), &["--num-queues=2"]);
    let mut c = BlkClient::connect_with(&mut b, 2, 8, 1 << 20, true)
        .unwrap_or_else(|e| panic!("{e}\n{}", b.output()));
    let (info, file) = inflight_area(&c);
    let (queues, qsize) = (info.num_queues as usize, info.queue_size as usize);
    assert_eq!(queues, 2);
    let per_queue = (16 + 16 * qsize).next_multiple_of(64);
    assert_eq!(info.mmap_size as usize, queues * per_queue);
    for i in 0..8u64 {
        c.write(i * 8, &[i as u8; 4096]).unwrap();
    }
    c.flush().unwrap();
    let mut area = vec![0u8; info.mmap_size as usize];
    file.read_exact_at(&mut area, 0).unwrap();
    let q0 = &area[..per_queue];
    assert_eq!(u16::from_le_bytes([q0[8], q0[9]]), 1, "version");
    assert_eq!(
        usize::from(u16::from_le_bytes([q0[10], q0[11]])),
        qsize,
        "desc_num"
    );
    assert_eq!(
        u16::from_le_bytes([q0[14], q0[15]]),
        9,
        "used_idx after 9 requests"
    );
    let mut counters = Vec::new();
    for d in 0..qsize {
        let e = &q0[16 + 16 * d..32 + 16 * d];
        let counter = u64::from_le_bytes(e[8..16].try_into().unwrap());
        if counter > 0 {
            assert_eq!(e[0], 0, "descriptor {d} still marked in flight");
            counters.push(counter);
        }
    }
    assert!(!counters.is_empty(), "no request was recorded");
    // Queue 1 saw nothing.
    assert!(area[per_queue..].iter().skip(16).all(|&x| x == 0));
    // The frontend cannot shrink the area under the backend's mapping (a
    // write there would then kill the backend).
    let shrink = file.set_len(0);
    assert_eq!(
        shrink.map_err(|e| e.raw_os_error()),
        Err(Some(libc::EPERM)),
        "the inflight area could be truncated"
    );
    c.write(0, &[7; 4096]).unwrap();
    assert!(b.is_running(), "{}", b.output());
}

/// A backend that starts on the inflight area of one that died finds the
/// requests that one had taken and not finished, and runs exactly those:
/// not the one it finished, and nothing twice.
#[test]
fn requests_left_in_flight_by_a_dead_backend_are_run_once() {
    use std::os::unix::fs::FileExt;
    use vm_memory::{Address, Bytes};
    let img = image();
    // What the finished request wrote, since overwritten on the host: a
    // second run of it would bring back its bytes.
    img.as_file().write_all_at(&[b'z'; 512], 16 * 512).unwrap();
    let mut b = start(img.path(), &[]);
    let mut c = BlkClient::connect_with(&mut b, 1, 8, 1 << 20, true)
        .unwrap_or_else(|e| panic!("{e}\n{}", b.output()));
    let (info, file) = inflight_area(&c);
    // The state a backend leaves when it dies after taking three writes
    // and finishing only the second: in the rings, and in the area.
    let h1 = c.push(0, req::OUT, 8, &[b'a'; 512], 0).unwrap();
    let h2 = c.push(0, req::OUT, 16, &[b'b'; 512], 0).unwrap();
    let h3 = c.push(0, req::OUT, 24, &[b'c'; 512], 0).unwrap();
    let used = c.queues[0].ring().addrs().used;
    let mem = c.dev.mem.mem();
    mem.write_obj(u32::from(h2).to_le(), used.unchecked_add(4))
        .unwrap();
    mem.write_obj(1u32.to_le(), used.unchecked_add(8)).unwrap();
    mem.write_obj(1u16.to_le(), used.unchecked_add(2)).unwrap();
    let desc = |head: u16| 16 + 16 * u64::from(head);
    for (head, counter, inflight) in [(h1, 1u64, 1u8), (h2, 2, 0), (h3, 3, 1)] {
        file.write_all_at(&[inflight], desc(head)).unwrap();
        file.write_all_at(&counter.to_le_bytes(), desc(head) + 8)
            .unwrap();
    }
    file.write_all_at(&h2.to_le_bytes(), 12).unwrap(); // last_batch_head
    file.write_all_at(&1u16.to_le_bytes(), 14).unwrap(); // used_idx
    assert_eq!(info.num_queues, 1);
    c.queues[0].publish().unwrap();

    let mut done = Vec::new();
    for _ in 0..3 {
        let comp = c.queues[0]
            .wait()
            .unwrap_or_else(|e| panic!("{e}\n{}", b.output()));
        done.push(comp.token);
        if comp.token != h2 {
            assert_eq!(BlkClient::status(&comp).unwrap(), blk::S_OK);
        }
    }
    assert_eq!(done, [h2, h1, h3], "the lost two in the order taken");
    let used_idx: u16 = mem.read_obj(used.unchecked_add(2)).unwrap();
    assert_eq!(u16::from_le(used_idx), 3, "nothing ran twice");
    let mut sector = [0u8; 512];
    for (s, want) in [(8u64, b'a'), (16, b'z'), (24, b'c')] {
        img.as_file().read_exact_at(&mut sector, s * 512).unwrap();
        assert!(sector.iter().all(|&x| x == want), "sector {s}");
    }
    let mut flag = [0u8; 1];
    for head in [h1, h2, h3] {
        file.read_exact_at(&mut flag, desc(head)).unwrap();
        assert_eq!(flag[0], 0, "head {head} still marked in flight");
    }
    assert!(b.output().contains("resubmitting"), "{}", b.output());
}

/// GET_VRING_BASE is answered only once every request taken from the ring
/// is finished and in the used ring: the position the frontend gets back
/// covers exactly what was done.
#[test]
fn get_vring_base_waits_for_io_in_flight() {
    use vhost::VhostBackend;
    use vm_memory::{Address, Bytes};
    // O_DIRECT on a real disk, so the writes take a while.
    let dir = tempfile::tempdir_in("/var/tmp").unwrap();
    let path = dir.path().join("disk.img");
    std::fs::File::create(&path)
        .unwrap()
        .set_len(IMAGE)
        .unwrap();
    let mut b = start(&path, &["--direct"]);
    let mut c = BlkClient::connect(&mut b, 1, 16, 1 << 20)
        .unwrap_or_else(|e| panic!("{e}\n{}", b.output()));
    for i in 0..16u64 {
        c.push(0, req::OUT, i * 2048, &vec![i as u8 + 1; 1 << 20], 0)
            .unwrap();
    }
    c.queues[0].publish().unwrap();
    let used_at = c.queues[0].ring().addrs().used.unchecked_add(2);
    let base = c
        .dev
        .frontend()
        .get_vring_base(0)
        .unwrap_or_else(|e| panic!("{e}\n{}", b.output()));
    let used = u16::from_le(c.dev.mem.mem().read_obj::<u16>(used_at).unwrap());
    eprintln!("GET_VRING_BASE: {base} taken, {used} used");
    assert!(base > 0, "the backend took nothing before the ring stopped");
    assert_eq!(
        u32::from(used),
        base,
        "requests still in flight at the reply"
    );
    assert!(b.is_running(), "{}", b.output());
}
