//! A virtio device whose implementation is a vhost-user backend process:
//! the [`VirtioDevice`] the virtio-mmio transport drives, translated into
//! vhost-user messages. The data path never comes back here: each queue's
//! kick and call are eventfds the VMM binds to KVM (an ioeventfd on the
//! queue's notify register, an irqfd on the device's interrupt).

use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use vhost::vhost_user::message::{
    VhostUserConfigFlags, VhostUserInflight, VhostUserProtocolFeatures,
};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use vm_memory::{Bytes, GuestAddress, GuestMemory, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use crate::virtio_mmio::{QueueConfig, VirtioDevice, VERSION_1};

/// VHOST_USER_F_PROTOCOL_FEATURES: a vhost-user bit, never the driver's.
const PROTOCOL_FEATURES: u64 = 1 << 30;

/// Errors connecting to a backend.
#[derive(Debug, thiserror::Error)]
pub enum VuError {
    #[error("{socket}: {step}: {detail} (is a vhost-user backend serving there?)")]
    Protocol {
        socket: PathBuf,
        step: &'static str,
        detail: String,
    },
    #[error(
        "{socket}: the backend offers no VIRTIO_F_VERSION_1; vmm-core drives modern devices only"
    )]
    NotModern { socket: PathBuf },
    #[error("{socket}: not a {expected} backend: {why}")]
    WrongDevice {
        socket: PathBuf,
        expected: &'static str,
        why: String,
    },
    #[error("creating an eventfd: {0}")]
    EventFd(#[source] std::io::Error),
}

/// Device-specific feature bits (0 to 23) the types' backends offer.
mod bits {
    pub const DEVICE: u64 = (1 << 24) - 1;
    pub const BLK_SEG_MAX: u64 = 1 << 2;
    pub const BLK_BLK_SIZE: u64 = 1 << 6;
    pub const NET_MAC: u64 = 1 << 5;
    pub const NET_MRG_RXBUF: u64 = 1 << 15;
    pub const NET_STATUS: u64 = 1 << 16;
    pub const FS_NOTIFICATION: u64 = 1 << 0;
}

fn type_name(device_type: u32) -> &'static str {
    match device_type {
        1 => "virtio-net",
        2 => "virtio-blk",
        26 => "virtio-fs",
        _ => "virtio",
    }
}

/// What a backend offering `features` and `queues` looks like.
fn looks_like(features: u64, queues: usize) -> String {
    let d = features & bits::DEVICE;
    let blk = bits::BLK_SEG_MAX | bits::BLK_BLK_SIZE;
    let net = bits::NET_MAC | bits::NET_MRG_RXBUF | bits::NET_STATUS;
    let what = if d & !bits::FS_NOTIFICATION == 0 {
        "no device features, as a virtio-fs backend"
    } else if d & blk == blk && d & bits::NET_MRG_RXBUF == 0 {
        "block-device features (segment limit, block size), as a virtio-blk backend"
    } else if d & net == net {
        "a MAC address, mergeable receive buffers and link status, as a virtio-net backend"
    } else {
        "device features of another kind"
    };
    format!(
        "it offers {what} does ({queues} queue{})",
        if queues == 1 { "" } else { "s" }
    )
}

/// vhost-user has no message that names the device type, so tell it by
/// what the backend offers: the device feature bits of each kind do not
/// mix (a disk has a segment limit, block size and flush; a NIC a MAC,
/// mergeable buffers and link status; a virtio-fs device neither), and
/// the queue counts (a NIC needs a receive and a transmit queue, a
/// virtio-fs device a high-priority and a request queue). A backend that
/// clearly belongs to another kind is refused here, before any guest
/// sees a device that cannot work.
pub fn check_device_type(device_type: u32, features: u64, queues: usize) -> Result<(), String> {
    let d = features & bits::DEVICE;
    // Bits shared between kinds mean different things (a disk's flush is
    // a NIC's ECN, its read-only flag a NIC's MAC): only combinations
    // that one kind never offers count.
    let blk = bits::BLK_SEG_MAX | bits::BLK_BLK_SIZE;
    let net = bits::NET_MAC | bits::NET_MRG_RXBUF | bits::NET_STATUS;
    let wrong = match device_type {
        26 => d & !bits::FS_NOTIFICATION != 0 || queues < 2,
        2 => d == 0 || (d & net == net && d & blk == 0),
        1 => d == 0 || queues < 2 || (d & blk == blk && d & bits::NET_MRG_RXBUF == 0),
        _ => false,
    };
    if wrong {
        Err(looks_like(features, queues))
    } else {
        Ok(())
    }
}

/// Connect and negotiate: the frontend, the backend's features, the
/// protocol features agreed and the number of queues.
fn handshake(socket: &Path, default_queues: usize) -> Result<Handshake, VuError> {
    let err = |step: &'static str| {
        let socket = socket.to_path_buf();
        move |e: vhost::Error| VuError::Protocol {
            socket,
            step,
            detail: e.to_string(),
        }
    };
    let mut fe = Frontend::connect(socket, 64).map_err(err("connecting"))?;
    fe.set_owner().map_err(err("SET_OWNER"))?;
    let backend_features = fe.get_features().map_err(err("GET_FEATURES"))?;
    if backend_features & VERSION_1 == 0 {
        return Err(VuError::NotModern {
            socket: socket.to_path_buf(),
        });
    }
    let mut protocol = VhostUserProtocolFeatures::empty();
    let mut queues = default_queues;
    if backend_features & PROTOCOL_FEATURES != 0 {
        let offered = fe
            .get_protocol_features()
            .map_err(err("GET_PROTOCOL_FEATURES"))?;
        protocol = offered
            & (VhostUserProtocolFeatures::CONFIG
                | VhostUserProtocolFeatures::MQ
                | VhostUserProtocolFeatures::REPLY_ACK
                | VhostUserProtocolFeatures::RESET_DEVICE
                | VhostUserProtocolFeatures::INFLIGHT_SHMFD);
        fe.set_protocol_features(protocol)
            .map_err(err("SET_PROTOCOL_FEATURES"))?;
        if protocol.contains(VhostUserProtocolFeatures::MQ) {
            queues = fe.get_queue_num().map_err(err("GET_QUEUE_NUM"))? as usize;
        }
    }
    Ok((fe, backend_features, protocol, queues))
}

/// A new connection, negotiated: see [`handshake`].
pub type Handshake = (Frontend, u64, VhostUserProtocolFeatures, usize);

/// Connect to `socket` and negotiate, trying every 50 ms for up to `wait`.
pub fn wait_for_backend(socket: &Path, queues: usize, wait: Duration) -> Result<Handshake, String> {
    let deadline = Instant::now() + wait;
    loop {
        match handshake(socket, queues) {
            Ok(h) => return Ok(h),
            Err(e) if Instant::now() >= deadline => {
                return Err(format!("not served again within {wait:?}: {e}"))
            }
            Err(_) => std::thread::sleep(Duration::from_millis(50)),
        }
    }
}

/// One vhost-user device.
pub struct VhostUserDevice {
    socket: PathBuf,
    frontend: Frontend,
    device_type: u32,
    backend_features: u64,
    protocol: VhostUserProtocolFeatures,
    queue_max: u16,
    mem: GuestMemoryMmap,
    kicks: Vec<EventFd>,
    calls: Vec<EventFd>,
    started: bool,
    /// The queues the last activation started.
    running: Vec<usize>,
    /// What the driver set up, replayed on a new connection.
    activation: Option<(u64, Vec<(usize, QueueConfig)>)>,
    /// The inflight area the backend made at activation (INFLIGHT_SHMFD):
    /// kept here and handed to a restarted backend, which finds in it the
    /// requests its predecessor had taken and not finished.
    inflight: Option<(VhostUserInflight, std::fs::File)>,
    reconnects: Arc<AtomicU64>,
    /// The last activation's failure, for the VMM to report.
    pub last_error: Option<String>,
}

impl VhostUserDevice {
    /// Connect to the backend at `socket` and learn what it offers. Queues:
    /// what the backend says with MQ, else `default_queues`.
    pub fn connect(
        socket: &Path,
        device_type: u32,
        mem: &GuestMemoryMmap,
        default_queues: usize,
        queue_max: u16,
    ) -> Result<Self, VuError> {
        let (fe, backend_features, protocol, queues) = handshake(socket, default_queues)?;
        check_device_type(device_type, backend_features, queues).map_err(|why| {
            VuError::WrongDevice {
                socket: socket.to_path_buf(),
                expected: type_name(device_type),
                why,
            }
        })?;
        let ev = || EventFd::new(libc::EFD_NONBLOCK).map_err(VuError::EventFd);
        let kicks = (0..queues).map(|_| ev()).collect::<Result<_, _>>()?;
        let calls = (0..queues).map(|_| ev()).collect::<Result<_, _>>()?;
        Ok(VhostUserDevice {
            socket: socket.to_path_buf(),
            frontend: fe,
            device_type,
            backend_features,
            protocol,
            queue_max,
            mem: mem.clone(),
            kicks,
            calls,
            started: false,
            running: Vec::new(),
            activation: None,
            inflight: None,
            reconnects: Arc::new(AtomicU64::new(0)),
            last_error: None,
        })
    }

    /// How many times this device reconnected to its backend.
    pub fn reconnect_counter(&self) -> Arc<AtomicU64> {
        Arc::clone(&self.reconnects)
    }

    /// Whether the backend has hung up its end of the socket.
    pub fn hung_up(&self) -> bool {
        let mut p = libc::pollfd {
            fd: self.frontend.as_raw_fd(),
            events: libc::POLLRDHUP,
            revents: 0,
        };
        // SAFETY: one valid pollfd, no waiting.
        let n = unsafe { libc::poll(&mut p, 1, 0) };
        n > 0 && p.revents & (libc::POLLHUP | libc::POLLRDHUP | libc::POLLERR) != 0
    }

    /// Connect to the backend again (a restarted process on the same
    /// socket), waiting up to `wait` for it to serve, and replay what the
    /// driver had set up: features, memory table, and for each running
    /// queue its size, addresses, base (the used index in guest memory:
    /// what the dead backend finished), call and kick eventfds (the same
    /// ones KVM has bound, so nothing changes on the guest's side) and
    /// enable; then each queue is kicked and its interrupt raised once, so
    /// requests the guest made meanwhile are taken and buffers the dead
    /// backend returned are seen.
    pub fn reconnect(&mut self, wait: Duration) -> Result<(), String> {
        tracing::warn!(socket = %self.socket.display(), "backend hung up; waiting for it to serve again");
        let h = wait_for_backend(&self.socket, self.kicks.len(), wait)?;
        self.adopt(h)
    }

    /// Take a new connection ([`wait_for_backend`]) and replay the device's
    /// state onto it (see [`VhostUserDevice::reconnect`]).
    pub fn adopt(&mut self, h: Handshake) -> Result<(), String> {
        let sock = self.socket.display().to_string();
        let (fe, features, protocol, queues) = h;
        tracing::info!(socket = %sock, "connected again; features and protocol features negotiated");
        if features != self.backend_features || queues != self.kicks.len() {
            return Err(format!(
                "the new backend offers features {features:#x} and {queues} queues, \
                 the old one {:#x} and {}",
                self.backend_features,
                self.kicks.len()
            ));
        }
        self.frontend = fe;
        self.protocol = protocol;
        if let Some((driver_features, queues)) = self.activation.clone() {
            let bases = queues
                .iter()
                .map(|(_, q)| {
                    self.mem
                        .read_obj::<u16>(GuestAddress(q.device + 2))
                        .map(u16::from_le)
                        .map_err(|e| format!("reading a used index: {e}"))
                })
                .collect::<Result<Vec<_>, _>>()?;
            self.start(driver_features, &queues, &bases)?;
            // A kick the guest sent while no backend ran sits in the kick
            // eventfd, and the library consumes and drops a kick that comes
            // before its ring's SET_VRING_ENABLE: so kick each ring again
            // now that the enables are done (one answered request makes
            // sure, REPLY_ACK or not). And the dead backend
            // may have returned buffers without interrupting the guest: a
            // spare interrupt makes the guest look at its used rings.
            self.frontend
                .get_features()
                .map_err(|e| format!("GET_FEATURES after the replay: {e}"))?;
            for &(i, _) in &queues {
                if let Some(k) = self.kicks.get(i) {
                    let _ = k.write(1);
                }
                if let Some(c) = self.calls.get(i) {
                    let _ = c.write(1);
                }
            }
            tracing::info!(
                socket = %sock,
                queues = queues.len(),
                ?bases,
                "memory table, rings (bases from the used indexes), eventfds replayed"
            );
        }
        self.reconnects.fetch_add(1, Ordering::Relaxed);
        tracing::info!(socket = %sock, "backend reconnected");
        Ok(())
    }

    /// The eventfd the backend waits on for queue `q` (bind it to the
    /// queue's notify register with a KVM ioeventfd).
    pub fn kick(&self, q: usize) -> Option<&EventFd> {
        self.kicks.get(q)
    }

    /// The eventfd the backend signals for queue `q` (bind it to the
    /// device's interrupt with a KVM irqfd).
    pub fn call(&self, q: usize) -> Option<&EventFd> {
        self.calls.get(q)
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    fn start(
        &mut self,
        features: u64,
        queues: &[(usize, QueueConfig)],
        bases: &[u16],
    ) -> Result<(), String> {
        let step = |s: &'static str| move |e: vhost::Error| format!("{s}: {e}");
        let fe = &mut self.frontend;
        fe.set_features(features | (self.backend_features & PROTOCOL_FEATURES))
            .map_err(step("SET_FEATURES"))?;
        let regions: Vec<VhostUserMemoryRegionInfo> = self
            .mem
            .iter()
            .map(|r| VhostUserMemoryRegionInfo::from_guest_region(r).map_err(|e| e.to_string()))
            .collect::<Result<_, _>>()?;
        fe.set_mem_table(&regions).map_err(step("SET_MEM_TABLE"))?;
        if self
            .protocol
            .contains(VhostUserProtocolFeatures::INFLIGHT_SHMFD)
        {
            if self.inflight.is_none() {
                let ask = VhostUserInflight {
                    mmap_size: 0,
                    mmap_offset: 0,
                    num_queues: self.kicks.len() as u16,
                    queue_size: queues.iter().map(|(_, q)| q.size).max().unwrap_or(0),
                };
                self.inflight = Some(fe.get_inflight_fd(&ask).map_err(step("GET_INFLIGHT_FD"))?);
            }
            if let Some((info, file)) = &self.inflight {
                fe.set_inflight_fd(info, file.as_raw_fd())
                    .map_err(step("SET_INFLIGHT_FD"))?;
            }
        }
        for (n, &(i, q)) in queues.iter().enumerate() {
            let base = bases.get(n).copied().unwrap_or(0);
            let (Some(kick), Some(call)) = (self.kicks.get(i), self.calls.get(i)) else {
                return Err(format!(
                    "queue {i}: the backend has {} queues",
                    self.kicks.len()
                ));
            };
            // vhost-user ring addresses are this process's virtual
            // addresses; the backend maps them through the memory table.
            let va = |g: u64, what: &str| {
                self.mem
                    .get_host_address(GuestAddress(g))
                    .map(|p| p as u64)
                    .map_err(|_| {
                        format!("queue {i}: the {what} ring at {g:#x} is outside guest memory")
                    })
            };
            let cfg = VringConfigData {
                queue_max_size: self.queue_max,
                queue_size: q.size,
                flags: 0,
                desc_table_addr: va(q.desc, "descriptor")?,
                used_ring_addr: va(q.device, "used")?,
                avail_ring_addr: va(q.driver, "available")?,
                log_addr: None,
            };
            fe.set_vring_num(i, q.size).map_err(step("SET_VRING_NUM"))?;
            fe.set_vring_addr(i, &cfg).map_err(step("SET_VRING_ADDR"))?;
            fe.set_vring_base(i, base).map_err(step("SET_VRING_BASE"))?;
            fe.set_vring_call(i, call).map_err(step("SET_VRING_CALL"))?;
            fe.set_vring_kick(i, kick).map_err(step("SET_VRING_KICK"))?;
            if self.backend_features & PROTOCOL_FEATURES != 0 {
                fe.set_vring_enable(i, true)
                    .map_err(step("SET_VRING_ENABLE"))?;
            }
        }
        Ok(())
    }
}

impl VirtioDevice for VhostUserDevice {
    fn device_type(&self) -> u32 {
        self.device_type
    }

    fn features(&self) -> u64 {
        self.backend_features & !PROTOCOL_FEATURES
    }

    fn num_queues(&self) -> usize {
        self.kicks.len()
    }

    fn queue_max_size(&self) -> u16 {
        self.queue_max
    }

    fn read_config(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if !self.protocol.contains(VhostUserProtocolFeatures::CONFIG) {
            return;
        }
        let buf = vec![0u8; data.len()];
        match self.frontend.get_config(
            offset as u32,
            data.len() as u32,
            VhostUserConfigFlags::WRITABLE,
            &buf,
        ) {
            Ok((_, got)) => {
                let n = got.len().min(data.len());
                data[..n].copy_from_slice(&got[..n]);
            }
            Err(e) => tracing::warn!(socket = %self.socket.display(), error = %e, "GET_CONFIG"),
        }
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        if !self.protocol.contains(VhostUserProtocolFeatures::CONFIG) {
            return;
        }
        if let Err(e) =
            self.frontend
                .set_config(offset as u32, VhostUserConfigFlags::WRITABLE, data)
        {
            tracing::warn!(socket = %self.socket.display(), error = %e, "SET_CONFIG");
        }
    }

    fn activate(&mut self, features: u64, queues: &[(usize, QueueConfig)]) -> Result<(), String> {
        let r = self.start(features, queues, &[]);
        self.started = r.is_ok();
        self.activation = r.is_ok().then(|| (features, queues.to_vec()));
        self.running = queues.iter().map(|&(i, _)| i).collect();
        if let Err(e) = &r {
            self.last_error = Some(e.clone());
        }
        r
    }

    fn reset(&mut self) {
        if !self.started {
            return;
        }
        self.started = false;
        self.activation = None;
        // A reset guest starts with fresh rings: nothing to resubmit.
        self.inflight = None;
        for i in std::mem::take(&mut self.running) {
            if self.backend_features & PROTOCOL_FEATURES != 0 {
                let _ = self.frontend.set_vring_enable(i, false);
            }
            // Stops the ring (the backend answers once it is idle).
            let _ = self.frontend.get_vring_base(i);
        }
        if self
            .protocol
            .contains(VhostUserProtocolFeatures::RESET_DEVICE)
        {
            let _ = self.frontend.reset_device();
        }
    }
}

#[cfg(test)]
mod type_tests {
    use super::*;

    // What the project's backends offer (device bits and queues).
    const BLK: u64 = (1 << 2) | (1 << 6) | (1 << 9) | (1 << 10) | (1 << 12) | (1 << 13) | (1 << 14);
    const NET: u64 = 1
        | (1 << 1)
        | (1 << 3)
        | (1 << 5)
        | (1 << 7)
        | (1 << 8)
        | (1 << 9)
        | (1 << 11)
        | (1 << 12)
        | (1 << 13)
        | (1 << 15)
        | (1 << 16)
        | (1 << 17)
        | (1 << 22);
    const FS: u64 = 0;

    #[test]
    fn each_backend_passes_as_its_own_kind() {
        assert!(check_device_type(2, BLK, 1).is_ok());
        assert!(check_device_type(2, BLK | (1 << 5), 4).is_ok()); // read-only, 4 queues
        let e = check_device_type(1, BLK | (1 << 5), 4).unwrap_err(); // ... is no NIC
        assert!(e.contains("virtio-blk"), "{e}");
        assert!(check_device_type(1, NET, 3).is_ok());
        assert!(check_device_type(26, FS, 2).is_ok());
        assert!(check_device_type(26, FS | 1, 3).is_ok());
    }

    #[test]
    fn a_backend_of_another_kind_is_named() {
        let e = check_device_type(2, FS, 2).unwrap_err();
        assert!(e.contains("virtio-fs"), "{e}");
        let e = check_device_type(2, NET, 3).unwrap_err();
        assert!(e.contains("virtio-net"), "{e}");
        let e = check_device_type(1, BLK, 1).unwrap_err();
        assert!(e.contains("virtio-blk"), "{e}");
        let e = check_device_type(1, FS, 2).unwrap_err();
        assert!(e.contains("virtio-fs"), "{e}");
        let e = check_device_type(26, BLK, 1).unwrap_err();
        assert!(e.contains("virtio-blk"), "{e}");
        let e = check_device_type(26, NET, 3).unwrap_err();
        assert!(e.contains("virtio-net"), "{e}");
    }
}
