//! virtio-net frames (virtio 1.x section 5.1) over the test frontend.
//!
//! Queue 2k is receive queue k, 2k+1 transmit queue k, and the control queue
//! (when negotiated) comes last. Every frame is preceded by a
//! virtio_net_hdr_v1, 12 bytes with VERSION_1.

use crate::frontend::{BackendProcess, DeviceOptions, FrontendError, VuDevice};
use crate::queue::{ReqQueue, Shape};
use crate::ring::RingError;

/// Feature bits.
pub mod feature {
    pub const CSUM: u64 = 1 << 0;
    pub const GUEST_CSUM: u64 = 1 << 1;
    pub const MTU: u64 = 1 << 3;
    pub const MAC: u64 = 1 << 5;
    pub const GUEST_TSO4: u64 = 1 << 7;
    pub const GUEST_TSO6: u64 = 1 << 8;
    pub const HOST_TSO4: u64 = 1 << 11;
    pub const HOST_TSO6: u64 = 1 << 12;
    pub const MRG_RXBUF: u64 = 1 << 15;
    pub const STATUS: u64 = 1 << 16;
    pub const CTRL_VQ: u64 = 1 << 17;
    pub const MQ: u64 = 1 << 22;
    pub const EVENT_IDX: u64 = 1 << 29;
}

/// sizeof(struct virtio_net_hdr_v1).
pub const HDR_LEN: usize = 12;
/// gso_type values.
pub const GSO_NONE: u8 = 0;
pub const GSO_TCPV4: u8 = 1;
pub const GSO_TCPV6: u8 = 4;
/// flags: the checksum at csum_start+csum_offset is to be filled in.
pub const F_NEEDS_CSUM: u8 = 1;

/// Errors of the net client.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("received {0} bytes, fewer than a virtio_net_hdr")]
    Short(usize),
    #[error(transparent)]
    Ring(#[from] RingError),
    #[error("the device was set up without a control queue (CTRL_VQ)")]
    NoControlQueue,
    #[error(transparent)]
    Frontend(#[from] FrontendError),
}

/// struct virtio_net_hdr_v1.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NetHdr {
    pub flags: u8,
    pub gso_type: u8,
    pub hdr_len: u16,
    pub gso_size: u16,
    pub csum_start: u16,
    pub csum_offset: u16,
    pub num_buffers: u16,
}

impl NetHdr {
    pub fn encode(&self) -> [u8; HDR_LEN] {
        let mut b = [0u8; HDR_LEN];
        b[0] = self.flags;
        b[1] = self.gso_type;
        b[2..4].copy_from_slice(&self.hdr_len.to_le_bytes());
        b[4..6].copy_from_slice(&self.gso_size.to_le_bytes());
        b[6..8].copy_from_slice(&self.csum_start.to_le_bytes());
        b[8..10].copy_from_slice(&self.csum_offset.to_le_bytes());
        b[10..12].copy_from_slice(&self.num_buffers.to_le_bytes());
        b
    }

    pub fn decode(b: &[u8]) -> Result<Self, NetError> {
        if b.len() < HDR_LEN {
            return Err(NetError::Short(b.len()));
        }
        let u16_at = |o: usize| u16::from_le_bytes([b[o], b[o + 1]]);
        Ok(NetHdr {
            flags: b[0],
            gso_type: b[1],
            hdr_len: u16_at(2),
            gso_size: u16_at(4),
            csum_start: u16_at(6),
            csum_offset: u16_at(8),
            num_buffers: u16_at(10),
        })
    }
}

/// An Ethernet frame: dst, src, ethertype, payload (no FCS).
pub fn ethernet_frame(dst: [u8; 6], src: [u8; 6], ethertype: u16, payload: &[u8]) -> Vec<u8> {
    let mut f = Vec::with_capacity(14 + payload.len());
    f.extend_from_slice(&dst);
    f.extend_from_slice(&src);
    f.extend_from_slice(&ethertype.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// The config-space fields tests look at.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NetConfig {
    pub mac: [u8; 6],
    pub status: u16,
    pub max_virtqueue_pairs: u16,
    pub mtu: u16,
}

impl NetConfig {
    pub fn decode(b: &[u8]) -> Self {
        let at = |o: usize| {
            b.get(o..o + 2)
                .map_or(0, |s| u16::from_le_bytes([s[0], s[1]]))
        };
        let mut mac = [0u8; 6];
        if let Some(m) = b.get(0..6) {
            mac.copy_from_slice(m);
        }
        NetConfig {
            mac,
            status: at(6),
            max_virtqueue_pairs: at(8),
            mtu: at(10),
        }
    }
}

/// A virtio-net device seen from the guest: one rx/tx pair per `pairs`.
pub struct NetClient {
    pub dev: VuDevice,
    pub rx: Vec<ReqQueue>,
    pub tx: Vec<ReqQueue>,
    /// The control queue, when `features` asked for CTRL_VQ.
    pub ctrl: Option<ReqQueue>,
    pub shape: Shape,
}

impl NetClient {
    /// Bring up `pairs` queue pairs with `depth` buffers of `buf_len` bytes.
    pub fn connect(
        backend: &mut BackendProcess,
        pairs: usize,
        depth: usize,
        buf_len: u32,
        features: u64,
    ) -> Result<Self, NetError> {
        let with_ctrl = features & feature::CTRL_VQ != 0;
        let opts = DeviceOptions {
            queues: 2 * pairs + usize::from(with_ctrl),
            queue_size: (depth * 2).next_power_of_two().clamp(64, 1024) as u16,
            device_features: features,
            region_size: (u64::from(buf_len) * depth as u64 * 2 * pairs as u64 + (16 << 20))
                .next_power_of_two(),
            ..Default::default()
        };
        let mut dev = backend.device(&opts)?;
        let rings = std::mem::take(&mut dev.queues);
        let (mut rx, mut tx, mut ctrl) = (Vec::new(), Vec::new(), None);
        for (i, r) in rings.into_iter().enumerate() {
            let q = ReqQueue::new(r, &mut dev.mem, depth, buf_len, buf_len)?;
            if i == 2 * pairs {
                ctrl = Some(q);
            } else if i % 2 == 0 {
                rx.push(q);
            } else {
                tx.push(q);
            }
        }
        Ok(NetClient {
            dev,
            rx,
            tx,
            ctrl,
            shape: Shape::DIRECT,
        })
    }

    /// Send a control command (class, command, data) and return the ack
    /// byte the device wrote.
    pub fn command(&mut self, class: u8, command: u8, data: &[u8]) -> Result<u8, NetError> {
        let q = self.ctrl.as_mut().ok_or(NetError::NoControlQueue)?;
        let c = q.call(&[&[class, command], data], &[1], self.shape)?;
        Ok(c.written().first().copied().unwrap_or(0xff))
    }

    pub fn config(&mut self) -> Result<NetConfig, NetError> {
        Ok(NetConfig::decode(&self.dev.read_config(0, 12)?))
    }

    /// Transmit one frame with `hdr` on pair `q`, and wait for the device to
    /// take it.
    pub fn send(&mut self, q: usize, hdr: NetHdr, frame: &[u8]) -> Result<(), NetError> {
        let h = hdr.encode();
        self.tx[q].call(&[&h, frame], &[], self.shape)?;
        Ok(())
    }

    /// Give the device `n` receive buffers of `len` bytes on pair `q`.
    pub fn post_rx(&mut self, q: usize, n: usize, len: u32) -> Result<(), NetError> {
        for _ in 0..n {
            self.rx[q].push(&[], &[len], self.shape)?;
        }
        self.rx[q].publish()?;
        Ok(())
    }

    /// Wait for one received frame on pair `q`: its header and bytes.
    pub fn recv(&mut self, q: usize) -> Result<(NetHdr, Vec<u8>), NetError> {
        let c = self.rx[q].wait()?;
        let w = c.written();
        let hdr = NetHdr::decode(w)?;
        Ok((hdr, w[HDR_LEN..].to_vec()))
    }
}

/// A network namespace made with `ip netns add` (root only), deleted on
/// drop.
pub struct Netns(pub String);

impl Netns {
    /// None where `ip netns add` fails (not root, no iproute2).
    pub fn new(name: &str) -> Option<Netns> {
        let ok = std::process::Command::new("ip")
            .args(["netns", "add", name])
            .status()
            .ok()?
            .success();
        ok.then(|| Netns(name.to_string()))
    }

    /// A namespace whose default route leaves through a veth pair (both
    /// ends inside it, 192.0.2.2/24 via 192.0.2.1): an uplink as a host
    /// has one, going nowhere, which is what passt needs to start.
    pub fn with_uplink(name: &str) -> Option<Netns> {
        let ns = Netns::new(name)?;
        ns.exec(&["ip", "link", "set", "lo", "up"]);
        ns.exec(&[
            "ip", "link", "add", "up0", "type", "veth", "peer", "name", "up1",
        ]);
        ns.exec(&["ip", "link", "set", "up1", "up"]);
        ns.exec(&["ip", "link", "set", "up0", "up"]);
        ns.exec(&["ip", "addr", "add", "192.0.2.2/24", "dev", "up0"]);
        ns.exec(&["ip", "route", "add", "default", "via", "192.0.2.1"]);
        Some(ns)
    }

    /// Run `args` inside the namespace; it must succeed.
    pub fn exec(&self, args: &[&str]) {
        let st = std::process::Command::new("ip")
            .args(["netns", "exec", &self.0])
            .args(args)
            .status()
            .unwrap();
        assert!(st.success(), "ip netns exec {} {args:?}", self.0);
    }

    /// Run `f` on a thread inside the namespace (what it spawns is in the
    /// namespace too).
    pub fn spawn<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> std::thread::JoinHandle<T> {
        use std::os::fd::AsRawFd;
        let path = format!("/run/netns/{}", self.0);
        std::thread::spawn(move || {
            let ns = std::fs::File::open(&path).unwrap();
            // SAFETY: setns on this thread only, with a namespace fd.
            let rc = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
            f()
        })
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = std::process::Command::new("ip")
            .args(["netns", "del", &self.0])
            .status();
    }
}

/// A network namespace with an uplink, for a test that runs passt (or
/// what starts it) inside: None, with the reason, where that cannot be
/// had (under the rule of [`crate::require`]).
pub fn netns_for_passt(tag: &str) -> Option<Netns> {
    crate::require_program("passt", "apt-get install passt")?;
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        crate::require::<()>(Err("a network namespace for passt needs root".into()));
        return None;
    }
    let name = format!("vmm{tag}{}", std::process::id() % 100_000);
    let ns = Netns::with_uplink(&name);
    if ns.is_none() {
        crate::require::<()>(Err(
            "`ip netns add` failed (apt-get install iproute2)".into()
        ));
    }
    ns
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trips() {
        let h = NetHdr {
            flags: F_NEEDS_CSUM,
            gso_type: GSO_TCPV4,
            hdr_len: 54,
            gso_size: 1448,
            csum_start: 34,
            csum_offset: 16,
            num_buffers: 1,
        };
        assert_eq!(NetHdr::decode(&h.encode()).unwrap(), h);
        assert!(matches!(NetHdr::decode(&[0; 5]), Err(NetError::Short(5))));
    }

    #[test]
    fn frame_layout() {
        let f = ethernet_frame([1; 6], [2; 6], 0x0800, b"x");
        assert_eq!(f.len(), 15);
        assert_eq!(&f[12..14], &[0x08, 0x00]);
    }

    #[test]
    fn config_decodes_mac_status_pairs_mtu() {
        let b = [0x52, 0x54, 0, 1, 2, 3, 1, 0, 2, 0, 0xdc, 0x05];
        let c = NetConfig::decode(&b);
        assert_eq!(
            c,
            NetConfig {
                mac: [0x52, 0x54, 0, 1, 2, 3],
                status: 1,
                max_virtqueue_pairs: 2,
                mtu: 1500
            }
        );
    }
}
