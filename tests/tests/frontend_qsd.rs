//! The test frontend's virtio-blk helpers and hostile-guest helpers, against
//! a real vhost-user-blk backend (qemu-storage-daemon, the peer to beat).

use std::time::Duration;

use tests::blk::{self, BlkClient, BlkError};
use tests::frontend::BackendProcess;
use tests::hostile;
use tests::ring::Seg;

const IMAGE: u64 = 64 << 20;

fn qsd(img: &std::path::Path) -> Option<BackendProcess> {
    let bin = tests::require_program("qemu-storage-daemon", "apt-get install qemu-system-common")?;
    let argv = [
        bin.to_string_lossy().into_owned(),
        "--blockdev".into(),
        format!("driver=file,node-name=f,filename={}", img.display()),
        "--export".into(),
        "type=vhost-user-blk,id=e,node-name=f,addr.type=fd,addr.str={fd},writable=on,num-queues=2"
            .into(),
    ];
    Some(BackendProcess::spawn(&argv, Duration::from_secs(10)).expect("qemu-storage-daemon serves"))
}

fn image() -> tempfile::NamedTempFile {
    let f = tempfile::NamedTempFile::new().unwrap();
    f.as_file().set_len(IMAGE).unwrap();
    f
}

#[test]
fn blk_requests_round_trip() {
    let img = image();
    let Some(mut backend) = qsd(img.path()) else {
        return;
    };
    let mut c = BlkClient::connect(&mut backend, 2, 8, 1 << 20)
        .unwrap_or_else(|e| panic!("{e}\n{}", backend.output()));
    let cfg = c.config().unwrap();
    assert_eq!(cfg.capacity, IMAGE / blk::SECTOR);
    assert_eq!(cfg.num_queues, 2);

    let data: Vec<u8> = (0..8192u32).map(|i| (i % 251) as u8).collect();
    c.write(8, &data).unwrap();
    assert_eq!(c.read(8, 8192).unwrap(), data);
    c.flush().unwrap();
    // The write reached the image file at byte 8 * 512.
    let on_disk = std::fs::read(img.path()).unwrap();
    assert_eq!(&on_disk[4096..4096 + 8192], &data[..]);

    // Indirect chains carry the same request.
    c.shape = tests::queue::Shape::INDIRECT;
    assert_eq!(c.read(8, 512).unwrap(), &data[..512]);
    c.shape = tests::queue::Shape::DIRECT;

    assert_eq!(c.get_id().unwrap().len(), blk::ID_BYTES as usize);
    // Beyond capacity is an error status, not a hang.
    assert!(matches!(
        c.read(IMAGE / blk::SECTOR, 512),
        Err(BlkError::Status(blk::S_IOERR))
    ));
    // An unknown request type is UNSUPP.
    assert_eq!(c.raw_status(0x7777, 0, &[]).unwrap(), blk::S_UNSUPP);
}

#[test]
fn many_requests_in_flight_on_two_queues() {
    let img = image();
    let Some(mut backend) = qsd(img.path()) else {
        return;
    };
    let mut c = BlkClient::connect(&mut backend, 2, 32, 4096).unwrap();
    for q in 0..2 {
        for i in 0..32u64 {
            let sector = (q as u64 * 32 + i) * 8;
            c.push(
                q,
                blk::req::OUT,
                sector,
                &[(q as u8) * 32 + i as u8; 4096],
                0,
            )
            .unwrap();
        }
        c.queues[q].publish().unwrap();
    }
    for q in 0..2 {
        for _ in 0..32 {
            let done = c.queues[q].wait().unwrap();
            assert_eq!(BlkClient::status(&done).unwrap(), blk::S_OK);
        }
    }
    for i in 0..64u64 {
        assert_eq!(c.read(i * 8, 4096).unwrap(), vec![i as u8; 4096]);
    }
}

#[test]
fn hostile_chains_do_not_stop_the_backend() {
    let img = image();
    let Some(mut backend) = qsd(img.path()) else {
        return;
    };
    let mut c = BlkClient::connect(&mut backend, 1, 8, 4096).unwrap();
    let buf = c.dev.mem.alloc_in(1, 4096, 64).unwrap();
    let status = c.dev.mem.alloc_in(1, 64, 64).unwrap();
    let ring = c.queues[0].ring();
    hostile::readable_outside_memory(ring, 16, Seg::writable(status, 1)).unwrap();
    hostile::looped_chain(ring, buf).unwrap();
    hostile::head_out_of_range(ring).unwrap();
    hostile::indirect_table_outside_memory(ring).unwrap();
    // Whatever the peer did with that ring, the process lives and a fresh
    // connection (a guest reboot, to a VMM) is served.
    drop(c);
    assert!(backend.is_running(), "the peer died:\n{}", backend.output());
    let mut c = BlkClient::connect(&mut backend, 1, 8, 4096).unwrap();
    c.write(0, &[7u8; 512]).unwrap();
    assert_eq!(c.read(0, 512).unwrap(), vec![7u8; 512]);
}
