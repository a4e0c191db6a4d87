//! The control API on a running VM: a small real-mode program prints
//! without end on the UART; pause stops it between two instructions,
//! resume lets it go on, shutdown ends the VM.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::time::Duration;

use backend_common::seccomp::Action;
use serde_json::Value;
use vmm_core::api::{DeviceInfo, VmInfo};
use vmm_core::cpu;
use vmm_core::machine::{load_program, Machine, Stop};
use vmm_core::memory::GuestRam;

fn ask(conn: &mut BufReader<UnixStream>, req: &str) -> Value {
    writeln!(conn.get_mut(), "{req}").unwrap();
    let mut line = String::new();
    conn.read_line(&mut line).unwrap();
    serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line}"))
}

#[test]
fn pause_resume_status_and_shutdown_through_the_socket() {
    if !common::kvm() {
        return;
    }
    let console = common::Console::default();
    // Two vCPUs: the second waits for a start-up IPI inside KVM_RUN, so a
    // pause must kick it out of the kernel too.
    let m = Machine::new(
        GuestRam::new(32 << 20).unwrap(),
        2,
        Box::new(console.clone()),
    )
    .expect("a VM");
    // start: mov dx, 0x3f8; mov al, 'x'; out dx, al; mov cx, 0x4000;
    //        loop $; jmp start
    let code = [
        0xba, 0xf8, 0x03, 0xb0, b'x', 0xee, 0xb9, 0x00, 0x40, 0xe2, 0xfe, 0xeb, 0xf3,
    ];
    load_program(m.ram(), 0x1000, &code).unwrap();
    cpu::setup_real_mode(m.boot_vcpu(), 0x1000).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("api.sock");
    let info = VmInfo {
        vcpus: 2,
        memory: 32 << 20,
        devices: vec![DeviceInfo {
            kind: "blk",
            socket: "/run/blk0.sock".into(),
            reconnects: Arc::new(std::sync::atomic::AtomicU64::new(3)),
        }],
    };
    vmm_core::api::serve(&sock, m.control(), info, Action::Kill).unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || tx.send(m.run()).unwrap());
    console.wait_longer_than(0);
    let mut c = BufReader::new(UnixStream::connect(&sock).unwrap());

    let r = ask(&mut c, r#"{"command":"status"}"#);
    assert_eq!(r["ok"], true, "{r}");
    assert_eq!(r["state"], "running", "{r}");
    assert_eq!(r["vcpus"], 2, "{r}");
    assert_eq!(r["memory_mib"], 32, "{r}");
    assert_eq!(r["devices"][0]["kind"], "blk", "{r}");
    assert_eq!(r["devices"][0]["reconnects"], 3, "{r}");

    let r = ask(&mut c, r#"{"command":"pause"}"#);
    assert_eq!(r["state"], "paused", "{r}");
    let at = console.len();
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(console.len(), at, "the program ran on while paused");
    assert_eq!(ask(&mut c, r#"{"command":"status"}"#)["state"], "paused");

    let r = ask(&mut c, r#"{"command":"resume"}"#);
    assert_eq!(r["state"], "running", "{r}");
    console.wait_longer_than(at);

    // Bad requests get an error and the API keeps serving.
    let r = ask(&mut c, "pause please");
    assert_eq!(r["ok"], false, "{r}");
    assert!(r["error"].as_str().unwrap().contains("not JSON"), "{r}");
    let r = ask(&mut c, r#"{"command":"reboot"}"#);
    assert!(
        r["error"].as_str().unwrap().contains("unknown command"),
        "{r}"
    );
    let r = ask(&mut c, r#"{"command":"reconnect","device":"blk0"}"#);
    assert_eq!(r["ok"], false, "{r}");

    // A second VMM may not take over a socket that is being served.
    let again = vmm_core::api::serve(
        &sock,
        Machine::new(
            GuestRam::new(32 << 20).unwrap(),
            1,
            Box::new(std::io::sink()),
        )
        .unwrap()
        .control(),
        VmInfo {
            vcpus: 1,
            memory: 2 << 20,
            devices: Vec::new(),
        },
        Action::Kill,
    );
    assert!(again.is_err(), "a live API socket was taken over");

    let r = ask(&mut c, r#"{"command":"shutdown"}"#);
    assert_eq!(r["ok"], true, "{r}");
    let stop = rx
        .recv_timeout(Duration::from_secs(10))
        .expect("the VM stopped");
    assert_eq!(stop, Stop::Requested);
}
