//! The virtio-mmio transport over a real vhost-user backend: a driver's
//! register writes (made here, as a guest's MMIO exits would deliver
//! them) bring up blk-backend's queue; a request placed in guest memory
//! and kicked through the queue's eventfd (what the KVM ioeventfd does)
//! is served, and the interrupt arrives on the call eventfd (what the
//! irqfd carries). No vCPU is involved: this is the translation alone.

mod common;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_core::memory::GuestRam;
use vmm_core::vhost_user::VhostUserDevice;
use vmm_core::virtio_mmio::{reg, status, MmioTransport, VERSION_1};

struct Backend(Child);
impl Drop for Backend {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A backend binary built beside vmm-core (None, with the skip printed,
/// when it is not; under CI that is a failure).
fn sibling(name: &str) -> Option<std::path::PathBuf> {
    let bin = Path::new(env!("CARGO_BIN_EXE_vmm-core"))
        .parent()
        .unwrap()
        .join(name);
    if !bin.is_file() {
        let why = format!("{} is not built (cargo build --workspace)", bin.display());
        if std::env::var_os("CI").is_some() {
            panic!("{why} (CI is set)");
        }
        let _ = std::io::Write::write_fmt(&mut std::io::stderr(), format_args!("skipped: {why}\n"));
        return None;
    }
    Some(bin)
}

fn blk_backend(dir: &Path) -> Option<(Backend, std::path::PathBuf)> {
    let bin = sibling("blk-backend")?;
    let image = dir.join("disk.img");
    let data: Vec<u8> = (0..1 << 20).map(|i: u32| (i % 251) as u8).collect();
    std::fs::write(&image, &data).unwrap();
    let sock = dir.join("blk.sock");
    let mut cmd = Command::new(bin);
    cmd.arg(format!("--image={}", image.display()))
        .arg("--log-level=info");
    Some((listening(cmd, &sock, &dir.join("blk.log")), sock))
}

/// `cmd` (a backend) serving `sock` without a sandbox, its stderr appended
/// to `log`; returns once the socket is there.
fn listening(mut cmd: Command, sock: &Path, log: &Path) -> Backend {
    let child = cmd
        .arg(format!("--socket-path={}", sock.display()))
        .arg("--sandbox=none")
        .stdin(Stdio::null())
        .stderr(
            std::fs::File::options()
                .create(true)
                .append(true)
                .open(log)
                .unwrap(),
        )
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while !sock.exists() {
        assert!(
            Instant::now() < deadline,
            "{} never listened",
            cmd.get_program().to_string_lossy()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    Backend(child)
}

fn wr<D: vmm_core::virtio_mmio::VirtioDevice>(t: &mut MmioTransport<D>, off: u64, v: u32) {
    t.write(off, &v.to_le_bytes());
}

fn rd<D: vmm_core::virtio_mmio::VirtioDevice>(t: &mut MmioTransport<D>, off: u64) -> u32 {
    let mut b = [0u8; 4];
    t.read(off, &mut b);
    u32::from_le_bytes(b)
}

#[test]
fn a_block_read_through_virtio_mmio_and_vhost_user() {
    let dir = tempfile::tempdir().unwrap();
    let Some((_b, sock)) = blk_backend(dir.path()) else {
        return;
    };
    let ram = GuestRam::new(32 << 20).unwrap();
    let dev = VhostUserDevice::connect(&sock, 2, &ram.mem, 1, 256).expect("connects");
    let mut t = MmioTransport::new(dev);
    assert_eq!(rd(&mut t, reg::DEVICE_ID), 2);
    // Config space through GET_CONFIG: the capacity in 512-byte sectors.
    let mut cap = [0u8; 8];
    t.read(reg::CONFIG, &mut cap);
    assert_eq!(u64::from_le_bytes(cap), 2048);

    // The driver's side of virtio 3.1.1, queue 0 of 16 entries.
    wr(&mut t, reg::STATUS, status::ACKNOWLEDGE | status::DRIVER);
    wr(&mut t, reg::DRIVER_FEATURES_SEL, 1);
    wr(&mut t, reg::DRIVER_FEATURES, (VERSION_1 >> 32) as u32);
    wr(
        &mut t,
        reg::STATUS,
        status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK,
    );
    assert_ne!(rd(&mut t, reg::STATUS) & status::FEATURES_OK, 0);
    let (desc, avail, used) = (0x10000u64, 0x11000u64, 0x12000u64);
    wr(&mut t, reg::QUEUE_SEL, 0);
    wr(&mut t, reg::QUEUE_NUM, 16);
    wr(&mut t, reg::QUEUE_DESC_LOW, desc as u32);
    wr(&mut t, reg::QUEUE_DRIVER_LOW, avail as u32);
    wr(&mut t, reg::QUEUE_DEVICE_LOW, used as u32);
    wr(&mut t, reg::QUEUE_READY, 1);
    wr(&mut t, reg::STATUS, 0xf);
    assert_eq!(
        rd(&mut t, reg::STATUS) & status::NEEDS_RESET,
        0,
        "{:?}",
        t.device.last_error
    );

    // A read of sector 8: header, 512-byte buffer, status byte.
    let mem = &ram.mem;
    let (hdr, buf, st) = (0x20000u64, 0x21000u64, 0x22000u64);
    let mut h = [0u8; 16];
    h[8..16].copy_from_slice(&8u64.to_le_bytes()); // type 0 = IN
    mem.write_slice(&h, GuestAddress(hdr)).unwrap();
    mem.write_obj(0xffu8, GuestAddress(st)).unwrap();
    let d = |i: u64, addr: u64, len: u32, flags: u16, next: u16| {
        let a = desc + 16 * i;
        mem.write_obj(addr, GuestAddress(a)).unwrap();
        mem.write_obj(len, GuestAddress(a + 8)).unwrap();
        mem.write_obj(flags, GuestAddress(a + 12)).unwrap();
        mem.write_obj(next, GuestAddress(a + 14)).unwrap();
    };
    d(0, hdr, 16, 1, 1); // NEXT
    d(1, buf, 512, 1 | 2, 2); // NEXT | WRITE
    d(2, st, 1, 2, 0); // WRITE
    mem.write_obj(0u16, GuestAddress(avail + 4)).unwrap(); // ring[0] = head 0
    mem.write_obj(1u16, GuestAddress(avail + 2)).unwrap(); // idx = 1
                                                           // The kick, as the ioeventfd on QueueNotify would deliver it.
    t.device.kick(0).unwrap().write(1).unwrap();
    // The interrupt, as the irqfd would carry it.
    let call = t.device.call(0).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while call.read().is_err() {
        assert!(Instant::now() < deadline, "no interrupt");
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(
        mem.read_obj::<u16>(GuestAddress(used + 2)).unwrap(),
        1,
        "used idx"
    );
    assert_eq!(
        mem.read_obj::<u8>(GuestAddress(st)).unwrap(),
        0,
        "VIRTIO_BLK_S_OK"
    );
    let mut got = vec![0u8; 512];
    mem.read_slice(&mut got, GuestAddress(buf)).unwrap();
    let want: Vec<u8> = (8 * 512..9 * 512).map(|i: u32| (i % 251) as u8).collect();
    assert_eq!(got, want);

    // A reset stops the device; the transport is back to square one.
    wr(&mut t, reg::STATUS, 0);
    assert_eq!(rd(&mut t, reg::STATUS), 0);
}

#[test]
fn a_socket_nobody_serves_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let ram = GuestRam::new(16 << 20).unwrap();
    let e = VhostUserDevice::connect(&dir.path().join("none.sock"), 2, &ram.mem, 1, 256)
        .err()
        .expect("fails");
    let msg = e.to_string();
    assert!(
        msg.contains("none.sock") && msg.contains("vhost-user backend"),
        "{msg}"
    );
}

/// Lay out a read of sector 8 on queue 0's rings: descriptors, the
/// available ring holding head 0, and the request's header and status.
fn prepare_read(mem: &GuestMemoryMmap) {
    let (desc, avail) = (0x10000u64, 0x11000u64);
    let (hdr, buf, st) = (0x20000u64, 0x21000u64, 0x22000u64);
    let mut h = [0u8; 16];
    h[8..16].copy_from_slice(&8u64.to_le_bytes());
    mem.write_slice(&h, GuestAddress(hdr)).unwrap();
    mem.write_obj(0xffu8, GuestAddress(st)).unwrap();
    for (i, (addr, len, flags, next)) in [(hdr, 16u32, 1u16, 1u16), (buf, 512, 3, 2), (st, 1, 2, 0)]
        .into_iter()
        .enumerate()
    {
        let a = desc + 16 * i as u64;
        mem.write_obj(addr, GuestAddress(a)).unwrap();
        mem.write_obj(len, GuestAddress(a + 8)).unwrap();
        mem.write_obj(flags, GuestAddress(a + 12)).unwrap();
        mem.write_obj(next, GuestAddress(a + 14)).unwrap();
    }
    mem.write_obj(0u16, GuestAddress(avail + 4)).unwrap();
    mem.write_obj(1u16, GuestAddress(avail + 2)).unwrap();
}

/// Long-mode code: `mov rax, addr; mov dword [rax], v`.
fn write_reg(code: &mut Vec<u8>, addr: u64, v: u32) {
    code.extend_from_slice(&[0x48, 0xb8]);
    code.extend_from_slice(&addr.to_le_bytes());
    code.extend_from_slice(&[0xc7, 0x00]);
    code.extend_from_slice(&v.to_le_bytes());
}

/// Spin until the 16-bit word at `addr` is `v`.
fn wait_word(code: &mut Vec<u8>, addr: u64, v: u8) {
    code.extend_from_slice(&[0x48, 0xbb]); // mov rbx, addr
    code.extend_from_slice(&addr.to_le_bytes());
    code.extend_from_slice(&[0x0f, 0xb7, 0x03]); // movzx eax, word [rbx]
    code.extend_from_slice(&[0x83, 0xf8, v]); // cmp eax, v
    code.extend_from_slice(&[0x75, 0xf8]); // jne back to the movzx
}

/// `mov word [addr], v`.
fn store_word(code: &mut Vec<u8>, addr: u64, v: u16) {
    code.extend_from_slice(&[0x48, 0xbb]); // mov rbx, addr
    code.extend_from_slice(&addr.to_le_bytes());
    code.extend_from_slice(&[0x66, 0xc7, 0x03]); // mov word [rbx], v
    code.extend_from_slice(&v.to_le_bytes());
}

/// The driver's register writes for queue 0 on the rings `prepare_read`
/// laid out (MMIO exits into vmm-core), then the kick (an ioeventfd: no
/// exit).
fn bring_up_queue(code: &mut Vec<u8>, base: u64) {
    set_up_queue(code, base, 0);
    write_reg(code, base + reg::QUEUE_NOTIFY, 0);
}

/// The driver's register writes that make `queue` live on the rings at
/// 0x10000 (descriptors), 0x11000 (available) and 0x12000 (used).
fn set_up_queue(code: &mut Vec<u8>, base: u64, queue: u32) {
    for (off, v) in [
        (reg::STATUS, 3),
        (reg::DRIVER_FEATURES_SEL, 1),
        (reg::DRIVER_FEATURES, 1),
        (reg::STATUS, 0xb),
        (reg::QUEUE_SEL, queue),
        (reg::QUEUE_NUM, 16),
        (reg::QUEUE_DESC_LOW, 0x10000),
        (reg::QUEUE_DRIVER_LOW, 0x11000),
        (reg::QUEUE_DEVICE_LOW, 0x12000),
        (reg::QUEUE_READY, 1),
        (reg::STATUS, 0xf),
    ] {
        write_reg(code, base + off, v);
    }
}

/// The request's status byte + 0x40 to the debug-exit port.
fn exit_with_status(code: &mut Vec<u8>) {
    code.extend_from_slice(&[0x48, 0xbb]); // mov rbx, status byte
    code.extend_from_slice(&0x22000u64.to_le_bytes());
    code.extend_from_slice(&[0x0f, 0xb6, 0x03]); // movzx eax, byte [rbx]
    code.extend_from_slice(&[0x04, 0x40]); // add al, 0x40
    code.extend_from_slice(&[0x66, 0xba, 0x01, 0x05, 0xee]); // out 0x501, al
}

/// A one-vCPU VM whose only device is a blk-backend started in `dir`,
/// its vCPU under the seccomp filter the binary uses (vhost-user messages,
/// ioeventfd and irqfd set-up happen there), and queue 0's rings laid out
/// by [`prepare_read`].
fn vm_on_blk_backend(
    dir: &Path,
    huge: bool,
) -> Option<(
    (Backend, std::path::PathBuf),
    GuestMemoryMmap,
    vmm_core::machine::Machine,
    vmm_core::machine::MmioSlot,
)> {
    let backend = blk_backend(dir)?;
    let ram = GuestRam::with_pages(32 << 20, huge).unwrap();
    let mem = ram.mem.clone();
    let dev = VhostUserDevice::connect(&backend.1, 2, &ram.mem, 1, 256).expect("connects");
    let mut m = vmm_core::machine::Machine::new(ram, 1, Box::new(std::io::sink())).unwrap();
    m.set_seccomp(backend_common::seccomp::Action::Kill);
    let slot = m.add_virtio_mmio(dev).unwrap();
    prepare_read(&mem);
    Some((backend, mem, m, slot))
}

#[test]
fn a_long_mode_guest_program_reads_a_block_through_vmm_core() {
    reads_a_block(false);
}

/// The same with guest memory in 2 MiB huge pages, which the backend maps
/// from the hugetlbfs memfd SET_MEM_TABLE hands it.
#[test]
fn a_block_read_in_huge_page_memory() {
    let free = vmm_core::memory::free_huge_pages();
    if free < 16 {
        backend_common::skip_or_fail(&format!(
            "huge pages: {free} of 16 free (sysctl vm.nr_hugepages=16)"
        ));
        return;
    }
    reads_a_block(true);
}

fn reads_a_block(huge: bool) {
    use vmm_core::machine::{load_program, Stop};
    if !common::kvm() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let Some((_b, mem, m, slot)) = vm_on_blk_backend(dir.path(), huge) else {
        return;
    };
    let notify_exits = std::sync::Arc::clone(&m.mmio_devices()[0].1.lock().unwrap().notify_exits);
    // The program: the driver's register writes (MMIO exits into
    // vmm-core), the kick (an ioeventfd: no exit), a poll of the used
    // index, and the request's status byte + 0x40 to the debug-exit port.
    let mut code = Vec::new();
    bring_up_queue(&mut code, slot.base);
    wait_word(&mut code, 0x12002, 1);
    exit_with_status(&mut code);
    load_program(m.ram(), 0x10_0000, &code).unwrap();
    m.start_long_mode(0x10_0000, 0).unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(m.run());
    });
    let stop = rx
        .recv_timeout(Duration::from_secs(30))
        .expect("the program finishes");
    assert_eq!(stop, Stop::DebugExit(0x40), "VIRTIO_BLK_S_OK");
    // The kick went by the ioeventfd, not through vmm-core.
    assert_eq!(
        notify_exits.load(std::sync::atomic::Ordering::Relaxed),
        0,
        "QueueNotify exited to the VMM"
    );
    let mut got = vec![0u8; 512];
    mem.read_slice(&mut got, GuestAddress(0x21000)).unwrap();
    let want: Vec<u8> = (8 * 512..9 * 512).map(|i: u32| (i % 251) as u8).collect();
    assert_eq!(got, want);
}

/// Reconnect: a long-mode program reads a block, its backend is killed
/// (-9) and started again on the same socket, and the program's next
/// request completes through the new one. vmm-core's device watcher sees
/// the hang-up, reconnects, and replays the memory table and the ring
/// (its base from the used index); the VM runs on throughout.
#[test]
fn a_killed_backend_is_reconnected_and_the_next_request_completes() {
    use std::sync::atomic::Ordering;
    use vmm_core::machine::{load_program, Stop};
    if !common::kvm() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let Some(((backend, sock), mem, m, slot)) = vm_on_blk_backend(dir.path(), false) else {
        return;
    };
    let reconnects = m.mmio_devices()[0]
        .1
        .lock()
        .unwrap()
        .device
        .reconnect_counter();
    let mut code = Vec::new();
    bring_up_queue(&mut code, slot.base);
    wait_word(&mut code, 0x12002, 1); // the first request is used
    store_word(&mut code, 0x30000, 1); // tell the host
    wait_word(&mut code, 0x30002, 1); // wait for its go
    store_word(&mut code, 0x11006, 0); // avail ring[1] = head 0
    store_word(&mut code, 0x11002, 2); // avail idx = 2
    write_reg(&mut code, slot.base + reg::QUEUE_NOTIFY, 0);
    wait_word(&mut code, 0x12002, 2);
    exit_with_status(&mut code);
    load_program(m.ram(), 0x10_0000, &code).unwrap();
    m.start_long_mode(0x10_0000, 0).unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(m.run());
    });
    let flag = |addr: u64| mem.read_obj::<u16>(GuestAddress(addr)).unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while flag(0x30000) != 1 {
        assert!(
            Instant::now() < deadline,
            "the first request never completed"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    // Kill the backend and start a new one on the same socket.
    drop(backend);
    let _ = std::fs::remove_file(&sock);
    let (_backend, _) = blk_backend(dir.path()).unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while reconnects.load(Ordering::Relaxed) == 0 {
        assert!(Instant::now() < deadline, "never reconnected");
        std::thread::sleep(Duration::from_millis(20));
    }
    // The second request reads sector 16 into a cleared buffer.
    let mut h = [0u8; 16];
    h[8..16].copy_from_slice(&16u64.to_le_bytes());
    mem.write_slice(&h, GuestAddress(0x20000)).unwrap();
    mem.write_slice(&[0u8; 512], GuestAddress(0x21000)).unwrap();
    mem.write_obj(0xffu8, GuestAddress(0x22000)).unwrap();
    mem.write_obj(1u16, GuestAddress(0x30002)).unwrap();
    let stop = rx
        .recv_timeout(Duration::from_secs(30))
        .expect("the second request completes");
    assert_eq!(stop, Stop::DebugExit(0x40), "VIRTIO_BLK_S_OK");
    let mut got = vec![0u8; 512];
    mem.read_slice(&mut got, GuestAddress(0x21000)).unwrap();
    let want: Vec<u8> = (16 * 512..17 * 512).map(|i: u32| (i % 251) as u8).collect();
    assert_eq!(got, want);
    // The first backend made the inflight area; the restarted one was
    // handed the same area instead of a new one.
    let log = std::fs::read_to_string(dir.path().join("blk.log")).unwrap();
    assert_eq!(
        log.matches("inflight area made for the frontend").count(),
        1,
        "{log}"
    );
    assert_eq!(
        log.matches("inflight area taken from the frontend").count(),
        2,
        "{log}"
    );
}

/// A tag given with --fs must be the one the backend serves: vmm-core
/// cannot change it, so a mismatch is an error naming both.
#[test]
fn a_tag_the_backend_does_not_serve_is_a_clear_error() {
    let Some(bin) = sibling("virtiofsd-fast") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("fs.sock");
    let share = tempfile::tempdir().unwrap();
    let child = Command::new(bin)
        .arg(format!("--socket-path={}", sock.display()))
        .arg(format!("--shared-dir={}", share.path().display()))
        .arg("--tag=share")
        .arg("--sandbox=none")
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let _fs = Backend(child);
    let deadline = Instant::now() + Duration::from_secs(20);
    while !sock.exists() {
        assert!(Instant::now() < deadline, "virtiofsd-fast never listened");
        std::thread::sleep(Duration::from_millis(20));
    }
    let run = |tag: &str| {
        Command::new(env!("CARGO_BIN_EXE_vmm-core"))
            .args(["--kernel", "/nonexistent/vmlinux", "--memory", "64M"])
            .arg(format!("--fs=socket={},tag={tag}", sock.display()))
            .output()
            .unwrap()
    };
    let out = run("home");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("serves tag `share`, not `home`"), "{err}");
    // The right tag passes that check (and fails later, on the kernel).
    let out = run("share");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("/nonexistent/vmlinux"), "{err}");
}

/// vhost-user cannot name a device type; vmm-core tells it from what the
/// backend offers and refuses a backend of another kind with a message
/// that says which kind it looks like.
#[test]
fn a_backend_of_the_wrong_device_type_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let Some((_blk, blk_sock)) = blk_backend(dir.path()) else {
        return;
    };
    let run = |flag: String| {
        Command::new(env!("CARGO_BIN_EXE_vmm-core"))
            .args(["--kernel", "/nonexistent/vmlinux", "--memory", "64M"])
            .arg(flag)
            .output()
            .unwrap()
    };
    for flag in [
        format!("--fs=socket={},tag=share", blk_sock.display()),
        format!("--net=socket={}", blk_sock.display()),
    ] {
        let out = run(flag.clone());
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{flag}: {err}");
        assert!(err.contains("not a virtio-"), "{flag}: {err}");
        assert!(err.contains("as a virtio-blk backend"), "{flag}: {err}");
    }
    // The disk as a disk passes that check (and fails later, on the kernel).
    let out = run(format!("--blk=socket={}", blk_sock.display()));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("/nonexistent/vmlinux"), "{err}");
}

/// virtiofsd-fast on `sock`, sharing `share`, with extra flags; its log
/// goes to `log`.
fn virtiofsd_fast(sock: &Path, share: &Path, extra: &[String], log: &Path) -> Option<Backend> {
    let bin = sibling("virtiofsd-fast")?;
    let _ = std::fs::remove_file(sock);
    let mut cmd = Command::new(bin);
    cmd.arg(format!("--shared-dir={}", share.display()))
        .args(extra);
    Some(listening(cmd, sock, log))
}

/// A FUSE request: fuse_in_header (as root) and its arguments.
fn fuse_request(opcode: u32, unique: u64, nodeid: u64, args: &[&[u8]]) -> Vec<u8> {
    let len = 40 + args.iter().map(|a| a.len()).sum::<usize>();
    let mut v = Vec::with_capacity(len);
    v.extend_from_slice(&(len as u32).to_le_bytes());
    v.extend_from_slice(&opcode.to_le_bytes());
    v.extend_from_slice(&unique.to_le_bytes());
    v.extend_from_slice(&nodeid.to_le_bytes());
    v.extend_from_slice(&[0u8; 16]); // uid, gid, pid, extlen, padding
    for a in args {
        v.extend_from_slice(a);
    }
    v
}

/// Where the fs requests' buffers sit in guest memory, and the words the
/// program and the host signal each other with.
const FS_REQ: u64 = 0x20000;
const FS_REPLY: u64 = 0x24000;
const GO: u64 = 0x30002;
const DONE: u64 = 0x30000;

/// A program that brings up virtio-fs request queue 1 and then serves
/// `rounds` requests one at a time: it waits for the host's go (GO = k),
/// makes head 0 the k-th available entry, kicks (an ioeventfd), waits for
/// the used index to reach k and says so (DONE = k). Then it exits with
/// 0x40 on the debug port.
fn fs_request_program(base: u64, rounds: u8) -> Vec<u8> {
    let mut code = Vec::new();
    set_up_queue(&mut code, base, 1);
    for k in 1..=rounds {
        wait_word(&mut code, GO, k);
        store_word(&mut code, 0x11004 + 2 * u64::from(k - 1), 0);
        store_word(&mut code, 0x11002, u16::from(k));
        write_reg(&mut code, base + reg::QUEUE_NOTIFY, 1);
        wait_word(&mut code, 0x12002, k);
        store_word(&mut code, DONE, u16::from(k));
    }
    exit_with_status(&mut code);
    code
}

/// Host side of one round: lay `req` out as head 0 (a readable then a
/// writable descriptor), give the go, wait for the program to see it used,
/// and return the reply's error and body.
fn fs_round(mem: &GuestMemoryMmap, k: u16, req: &[u8]) -> (i32, Vec<u8>) {
    mem.write_slice(req, GuestAddress(FS_REQ)).unwrap();
    for (i, (addr, len, flags, next)) in [
        (FS_REQ, req.len() as u32, 1u16, 1u16),
        (FS_REPLY, 4096, 2, 0),
    ]
    .into_iter()
    .enumerate()
    {
        let a = 0x10000 + 16 * i as u64;
        mem.write_obj(addr, GuestAddress(a)).unwrap();
        mem.write_obj(len, GuestAddress(a + 8)).unwrap();
        mem.write_obj(flags, GuestAddress(a + 12)).unwrap();
        mem.write_obj(next, GuestAddress(a + 14)).unwrap();
    }
    mem.write_obj(k, GuestAddress(GO)).unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while mem.read_obj::<u16>(GuestAddress(DONE)).unwrap() != k {
        assert!(Instant::now() < deadline, "request {k} never completed");
        std::thread::sleep(Duration::from_millis(5));
    }
    let used_len = mem
        .read_obj::<u32>(GuestAddress(0x12004 + 8 * u64::from(k - 1) + 4))
        .unwrap() as usize;
    let mut reply = vec![0u8; used_len.clamp(16, 4096)];
    mem.read_slice(&mut reply, GuestAddress(FS_REPLY)).unwrap();
    let error = i32::from_le_bytes(reply[4..8].try_into().unwrap());
    (error, reply[16..].to_vec())
}

/// A guest's FUSE session outlives its daemon: a long-mode program's
/// mount (INIT, LOOKUP, OPEN, READ) goes on through vmm-core after
/// virtiofsd-fast is killed (-9) and started again on the same socket and
/// `--state-file`: vmm-core reconnects, and the next READ on the open file
/// handle and a GETATTR on the node ID are served by the new daemon with no
/// new INIT. Without the state file, the same READ fails.
#[test]
fn a_killed_fs_backend_resumes_the_guests_session_through_vmm_core() {
    use std::sync::atomic::Ordering;
    use vmm_core::machine::{load_program, Stop};
    if !common::kvm() {
        return;
    }
    for with_state in [true, false] {
        let dir = tempfile::tempdir().unwrap();
        let share = dir.path().join("share");
        std::fs::create_dir(&share).unwrap();
        std::fs::write(share.join("file"), b"served twice").unwrap();
        let sock = dir.path().join("fs.sock");
        let log = dir.path().join("fs.log");
        let extra: Vec<String> = if with_state {
            vec![format!(
                "--state-file={}",
                dir.path().join("fs.state").display()
            )]
        } else {
            Vec::new()
        };
        let Some(backend) = virtiofsd_fast(&sock, &share, &extra, &log) else {
            return;
        };
        let ram = GuestRam::new(32 << 20).unwrap();
        let mem = ram.mem.clone();
        let dev = VhostUserDevice::connect(&sock, 26, &ram.mem, 2, 256).expect("connects");
        let mut m = vmm_core::machine::Machine::new(ram, 1, Box::new(std::io::sink())).unwrap();
        m.set_seccomp(backend_common::seccomp::Action::Kill);
        let slot = m.add_virtio_mmio(dev).unwrap();
        let reconnects = m.mmio_devices()[0]
            .1
            .lock()
            .unwrap()
            .device
            .reconnect_counter();
        mem.write_obj(0u8, GuestAddress(0x22000)).unwrap();
        load_program(m.ram(), 0x10_0000, &fs_request_program(slot.base, 6)).unwrap();
        m.start_long_mode(0x10_0000, 0).unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(m.run());
        });

        // INIT (7.38, no flags), LOOKUP, OPEN, READ.
        let mut init = [0u8; 64];
        init[0..4].copy_from_slice(&7u32.to_le_bytes());
        init[4..8].copy_from_slice(&38u32.to_le_bytes());
        let (e, _) = fs_round(&mem, 1, &fuse_request(26, 1, 0, &[&init]));
        assert_eq!(e, 0, "INIT");
        let (e, body) = fs_round(&mem, 2, &fuse_request(1, 2, 1, &[b"file\0"]));
        assert_eq!(e, 0, "LOOKUP");
        let node = u64::from_le_bytes(body[0..8].try_into().unwrap());
        let (e, body) = fs_round(&mem, 3, &fuse_request(14, 3, node, &[&[0u8; 8]]));
        assert_eq!(e, 0, "OPEN");
        let fh = u64::from_le_bytes(body[0..8].try_into().unwrap());
        let mut read_in = [0u8; 40];
        read_in[0..8].copy_from_slice(&fh.to_le_bytes());
        read_in[16..20].copy_from_slice(&2048u32.to_le_bytes());
        let (e, body) = fs_round(&mem, 4, &fuse_request(15, 4, node, &[&read_in]));
        assert_eq!(
            (e, body.as_slice()),
            (0, &b"served twice"[..]),
            "READ:\n{}",
            std::fs::read_to_string(&log).unwrap()
        );

        drop(backend);
        let _backend = virtiofsd_fast(&sock, &share, &extra, &log).unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        while reconnects.load(Ordering::Relaxed) == 0 {
            assert!(Instant::now() < deadline, "never reconnected");
            std::thread::sleep(Duration::from_millis(20));
        }
        let (e, body) = fs_round(&mem, 5, &fuse_request(15, 5, node, &[&read_in]));
        let (ge, attr) = fs_round(&mem, 6, &fuse_request(3, 6, node, &[&[0u8; 16]]));
        let stop = rx
            .recv_timeout(Duration::from_secs(30))
            .expect("the program finishes");
        assert_eq!(stop, Stop::DebugExit(0x40));
        let log = std::fs::read_to_string(&log).unwrap();
        if with_state {
            assert_eq!(
                (e, body.as_slice()),
                (0, &b"served twice"[..]),
                "READ after the restart:\n{log}"
            );
            assert_eq!(ge, 0, "GETATTR after the restart:\n{log}");
            // fuse_attr_out: valid, valid_nsec, dummy, then ino and size.
            assert_eq!(u64::from_le_bytes(attr[24..32].try_into().unwrap()), 12);
            assert!(log.contains("resuming the guest's session"), "{log}");
        } else {
            assert_eq!(e, -libc::EBADF, "a new daemon without the session");
        }
    }
}
