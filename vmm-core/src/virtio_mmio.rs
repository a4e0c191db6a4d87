//! The virtio-mmio transport, version 2 (virtio 1.2, 4.2.2): the register
//! file a driver programs, kept as state here and turned into calls on a
//! [`VirtioDevice`] (for vmm-core, a vhost-user frontend): the device's
//! features and config space, the queues' sizes and addresses once the
//! driver sets DRIVER_OK, and a reset when it writes 0 to Status.
//!
//! Queue notifications and interrupts do not pass through here: each
//! queue's QueueNotify write is a KVM ioeventfd bound to the backend's kick
//! fd, and the backend's call fd is a KVM irqfd. InterruptStatus reads
//! report "used buffer" for that reason; config changes are raised by the
//! device through [`MmioTransport::config_changed`].

/// Register offsets.
pub mod reg {
    pub const MAGIC: u64 = 0x000;
    pub const VERSION: u64 = 0x004;
    pub const DEVICE_ID: u64 = 0x008;
    pub const VENDOR_ID: u64 = 0x00c;
    pub const DEVICE_FEATURES: u64 = 0x010;
    pub const DEVICE_FEATURES_SEL: u64 = 0x014;
    pub const DRIVER_FEATURES: u64 = 0x020;
    pub const DRIVER_FEATURES_SEL: u64 = 0x024;
    pub const QUEUE_SEL: u64 = 0x030;
    pub const QUEUE_NUM_MAX: u64 = 0x034;
    pub const QUEUE_NUM: u64 = 0x038;
    pub const QUEUE_READY: u64 = 0x044;
    pub const QUEUE_NOTIFY: u64 = 0x050;
    pub const INTERRUPT_STATUS: u64 = 0x060;
    pub const INTERRUPT_ACK: u64 = 0x064;
    pub const STATUS: u64 = 0x070;
    pub const QUEUE_DESC_LOW: u64 = 0x080;
    pub const QUEUE_DESC_HIGH: u64 = 0x084;
    pub const QUEUE_DRIVER_LOW: u64 = 0x090;
    pub const QUEUE_DRIVER_HIGH: u64 = 0x094;
    pub const QUEUE_DEVICE_LOW: u64 = 0x0a0;
    pub const QUEUE_DEVICE_HIGH: u64 = 0x0a4;
    pub const SHM_SEL: u64 = 0x0ac;
    pub const SHM_LEN_LOW: u64 = 0x0b0;
    pub const SHM_LEN_HIGH: u64 = 0x0b4;
    pub const SHM_BASE_LOW: u64 = 0x0b8;
    pub const SHM_BASE_HIGH: u64 = 0x0bc;
    pub const CONFIG_GENERATION: u64 = 0x0fc;
    pub const CONFIG: u64 = 0x100;
}

/// Device status bits.
pub mod status {
    pub const ACKNOWLEDGE: u32 = 1;
    pub const DRIVER: u32 = 2;
    pub const DRIVER_OK: u32 = 4;
    pub const FEATURES_OK: u32 = 8;
    pub const NEEDS_RESET: u32 = 0x40;
    pub const FAILED: u32 = 0x80;
}

/// "virt", little-endian.
pub const MAGIC: u32 = 0x7472_6976;
/// VIRTIO_F_VERSION_1: a version 2 transport offers only modern devices.
pub const VERSION_1: u64 = 1 << 32;
/// The size of one device's register window.
pub const WINDOW: u64 = 0x1000;
const INT_USED_BUFFER: u32 = 1;
const INT_CONFIG: u32 = 2;

/// One queue as the driver configured it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct QueueConfig {
    pub size: u16,
    pub ready: bool,
    pub desc: u64,
    pub driver: u64,
    pub device: u64,
}

/// What the transport needs from the device behind it.
pub trait VirtioDevice {
    fn device_type(&self) -> u32;
    /// Feature bits the device offers (VERSION_1 among them).
    fn features(&self) -> u64;
    fn num_queues(&self) -> usize;
    fn queue_max_size(&self) -> u16;
    /// Read config space at `offset` into `data`.
    fn read_config(&mut self, offset: u64, data: &mut [u8]);
    fn write_config(&mut self, offset: u64, data: &[u8]);
    /// The driver set DRIVER_OK: start the device with these features and
    /// the ready queues (index, configuration).
    fn activate(&mut self, features: u64, queues: &[(usize, QueueConfig)]) -> Result<(), String>;
    /// The driver reset the device.
    fn reset(&mut self);
}

/// The register file of one virtio-mmio device.
pub struct MmioTransport<D> {
    pub device: D,
    device_features_sel: u32,
    driver_features_sel: u32,
    driver_features: u64,
    queue_sel: u32,
    queues: Vec<QueueConfig>,
    status: u32,
    interrupt_status: u32,
    config_generation: u32,
    /// Bad accesses, counted (a driver bug, not ours): logged rarely.
    pub bad_accesses: u64,
    /// QueueNotify writes that reached the VMM: none while the queue's
    /// ioeventfd is in place (kicks go to the backend by the kernel).
    pub notify_exits: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

impl<D: VirtioDevice> MmioTransport<D> {
    pub fn new(device: D) -> Self {
        let n = device.num_queues();
        MmioTransport {
            device,
            device_features_sel: 0,
            driver_features_sel: 0,
            driver_features: 0,
            queue_sel: 0,
            queues: vec![QueueConfig::default(); n],
            status: 0,
            interrupt_status: 0,
            config_generation: 0,
            bad_accesses: 0,
            notify_exits: Default::default(),
        }
    }

    pub fn status(&self) -> u32 {
        self.status
    }

    pub fn queues(&self) -> &[QueueConfig] {
        &self.queues
    }

    /// The device's config space changed: tell the driver (the caller
    /// raises the interrupt).
    pub fn config_changed(&mut self) {
        self.config_generation = self.config_generation.wrapping_add(1);
        self.interrupt_status |= INT_CONFIG;
    }

    fn queue(&mut self) -> Option<&mut QueueConfig> {
        self.queues.get_mut(self.queue_sel as usize)
    }

    /// Queue registers may change only before DRIVER_OK, on a queue that is
    /// not ready.
    fn queue_writable(&mut self) -> Option<&mut QueueConfig> {
        if self.status & status::DRIVER_OK != 0 {
            return None;
        }
        self.queue().filter(|q| !q.ready)
    }

    /// A driver read of `data.len()` bytes at `offset`.
    pub fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= reg::CONFIG {
            self.device.read_config(offset - reg::CONFIG, data);
            return;
        }
        if data.len() != 4 {
            self.bad_accesses += 1;
            data.fill(0);
            return;
        }
        let v: u32 = match offset {
            reg::MAGIC => MAGIC,
            reg::VERSION => 2,
            reg::DEVICE_ID => self.device.device_type(),
            reg::VENDOR_ID => 0,
            reg::DEVICE_FEATURES => match self.device_features_sel {
                0 => self.device.features() as u32,
                1 => (self.device.features() >> 32) as u32,
                _ => 0,
            },
            reg::QUEUE_NUM_MAX => {
                if self.queue().is_some() {
                    u32::from(self.device.queue_max_size())
                } else {
                    0
                }
            }
            reg::QUEUE_READY => self.queue().map_or(0, |q| u32::from(q.ready)),
            reg::INTERRUPT_STATUS => self.interrupt_status | INT_USED_BUFFER,
            reg::STATUS => self.status,
            reg::CONFIG_GENERATION => self.config_generation,
            // No shared memory region (a virtio-fs DAX window, say): the
            // specification has a device without the selected region
            // answer all ones. Zero reads as a region of length 0 at 0,
            // which Linux's virtiofs then fails to reserve and gives up.
            reg::SHM_LEN_LOW | reg::SHM_LEN_HIGH | reg::SHM_BASE_LOW | reg::SHM_BASE_HIGH => {
                u32::MAX
            }
            _ => {
                self.bad_accesses += 1;
                0
            }
        };
        data.copy_from_slice(&v.to_le_bytes());
    }

    /// A driver write of `data` at `offset`.
    pub fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= reg::CONFIG {
            self.device.write_config(offset - reg::CONFIG, data);
            return;
        }
        let Ok(bytes) = <[u8; 4]>::try_from(data) else {
            self.bad_accesses += 1;
            return;
        };
        let v = u32::from_le_bytes(bytes);
        let lo = |x: &mut u64| *x = (*x & !0xffff_ffff) | u64::from(v);
        let hi = |x: &mut u64| *x = (*x & 0xffff_ffff) | (u64::from(v) << 32);
        match offset {
            reg::DEVICE_FEATURES_SEL => self.device_features_sel = v,
            reg::DRIVER_FEATURES_SEL => self.driver_features_sel = v,
            reg::DRIVER_FEATURES => {
                if self.status & status::FEATURES_OK != 0 {
                    self.bad_accesses += 1;
                } else {
                    match self.driver_features_sel {
                        0 => lo(&mut self.driver_features),
                        1 => hi(&mut self.driver_features),
                        _ => self.bad_accesses += 1,
                    }
                }
            }
            reg::QUEUE_SEL => self.queue_sel = v,
            reg::QUEUE_NUM => {
                let max = self.device.queue_max_size();
                match self.queue_writable() {
                    Some(q) if v > 0 && v <= u32::from(max) && v.is_power_of_two() => {
                        q.size = v as u16
                    }
                    _ => self.bad_accesses += 1,
                }
            }
            reg::QUEUE_READY => {
                if self.status & status::DRIVER_OK != 0 {
                    self.bad_accesses += 1;
                } else if let Some(q) = self.queue() {
                    q.ready = v == 1;
                }
            }
            reg::QUEUE_DESC_LOW
            | reg::QUEUE_DESC_HIGH
            | reg::QUEUE_DRIVER_LOW
            | reg::QUEUE_DRIVER_HIGH
            | reg::QUEUE_DEVICE_LOW
            | reg::QUEUE_DEVICE_HIGH => match self.queue_writable() {
                Some(q) => match offset {
                    reg::QUEUE_DESC_LOW => lo(&mut q.desc),
                    reg::QUEUE_DESC_HIGH => hi(&mut q.desc),
                    reg::QUEUE_DRIVER_LOW => lo(&mut q.driver),
                    reg::QUEUE_DRIVER_HIGH => hi(&mut q.driver),
                    reg::QUEUE_DEVICE_LOW => lo(&mut q.device),
                    _ => hi(&mut q.device),
                },
                None => self.bad_accesses += 1,
            },
            // Reaches here only when no ioeventfd took it.
            reg::QUEUE_NOTIFY => {
                self.notify_exits
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
            reg::INTERRUPT_ACK => self.interrupt_status &= !v,
            reg::STATUS => self.set_status(v),
            // Any region may be selected; none exists (see `read`).
            reg::SHM_SEL => {}
            _ => self.bad_accesses += 1,
        }
    }

    fn set_status(&mut self, v: u32) {
        if v == 0 {
            self.device.reset();
            let n = self.queues.len();
            self.queues = vec![QueueConfig::default(); n];
            self.status = 0;
            self.driver_features = 0;
            self.interrupt_status = 0;
            self.device_features_sel = 0;
            self.driver_features_sel = 0;
            self.queue_sel = 0;
            return;
        }
        // Bits only accumulate (3.1.1); a driver clearing one is wrong.
        if v & self.status != self.status {
            self.bad_accesses += 1;
            return;
        }
        let new = v & !self.status;
        if new & status::FEATURES_OK != 0 {
            let offered = self.device.features();
            if self.driver_features & !offered != 0 || self.driver_features & VERSION_1 == 0 {
                // Not accepted: FEATURES_OK stays clear for the driver to see.
                self.status = v & !status::FEATURES_OK;
                return;
            }
        }
        self.status = v;
        if new & status::DRIVER_OK != 0 {
            let ready: Vec<(usize, QueueConfig)> = self
                .queues
                .iter()
                .copied()
                .enumerate()
                .filter(|(_, q)| q.ready && q.size > 0)
                .collect();
            if let Err(why) = self.device.activate(self.driver_features, &ready) {
                tracing::error!(
                    device = self.device.device_type(),
                    "activating the device: {why}"
                );
                self.status |= status::NEEDS_RESET;
                self.config_changed();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Default)]
    struct Fake {
        activated: Option<(u64, Vec<(usize, QueueConfig)>)>,
        resets: u32,
        config: [u8; 8],
        fail: bool,
    }

    impl VirtioDevice for Fake {
        fn device_type(&self) -> u32 {
            2
        }
        fn features(&self) -> u64 {
            VERSION_1 | 1 << 9
        }
        fn num_queues(&self) -> usize {
            2
        }
        fn queue_max_size(&self) -> u16 {
            256
        }
        fn read_config(&mut self, offset: u64, data: &mut [u8]) {
            for (i, b) in data.iter_mut().enumerate() {
                *b = self.config.get(offset as usize + i).copied().unwrap_or(0);
            }
        }
        fn write_config(&mut self, offset: u64, data: &[u8]) {
            for (i, b) in data.iter().enumerate() {
                if let Some(c) = self.config.get_mut(offset as usize + i) {
                    *c = *b;
                }
            }
        }
        fn activate(&mut self, f: u64, q: &[(usize, QueueConfig)]) -> Result<(), String> {
            if self.fail {
                return Err("no".into());
            }
            self.activated = Some((f, q.to_vec()));
            Ok(())
        }
        fn reset(&mut self) {
            self.resets += 1;
        }
    }

    fn rd(t: &mut MmioTransport<Fake>, off: u64) -> u32 {
        let mut b = [0u8; 4];
        t.read(off, &mut b);
        u32::from_le_bytes(b)
    }
    fn wr(t: &mut MmioTransport<Fake>, off: u64, v: u32) {
        t.write(off, &v.to_le_bytes());
    }

    /// The driver's side of 3.1.1, for queue 0 at the given addresses.
    fn bring_up(t: &mut MmioTransport<Fake>, features_hi: u32) {
        wr(t, reg::STATUS, status::ACKNOWLEDGE);
        wr(t, reg::STATUS, status::ACKNOWLEDGE | status::DRIVER);
        wr(t, reg::DRIVER_FEATURES_SEL, 1);
        wr(t, reg::DRIVER_FEATURES, features_hi);
        wr(t, reg::DRIVER_FEATURES_SEL, 0);
        wr(t, reg::DRIVER_FEATURES, 1 << 9);
        wr(
            t,
            reg::STATUS,
            status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK,
        );
    }

    /// No shared memory region: every region reads as all ones, as the
    /// specification has it (Linux's virtiofs took zeros for a region of
    /// length 0 at 0, failed to reserve it and gave up the device).
    #[test]
    fn shared_memory_regions_read_as_absent() {
        let mut t = MmioTransport::new(Fake::default());
        for id in [0u32, 1, 7] {
            wr(&mut t, reg::SHM_SEL, id);
            for r in [
                reg::SHM_LEN_LOW,
                reg::SHM_LEN_HIGH,
                reg::SHM_BASE_LOW,
                reg::SHM_BASE_HIGH,
            ] {
                assert_eq!(rd(&mut t, r), u32::MAX, "region {id} at {r:#x}");
            }
        }
        assert_eq!(t.bad_accesses, 0);
    }

    #[test]
    fn a_driver_brings_a_device_up() {
        let mut t = MmioTransport::new(Fake::default());
        assert_eq!(rd(&mut t, reg::MAGIC), MAGIC);
        assert_eq!(rd(&mut t, reg::VERSION), 2);
        assert_eq!(rd(&mut t, reg::DEVICE_ID), 2);
        wr(&mut t, reg::DEVICE_FEATURES_SEL, 1);
        assert_eq!(rd(&mut t, reg::DEVICE_FEATURES), 1);
        bring_up(&mut t, 1);
        assert_ne!(rd(&mut t, reg::STATUS) & status::FEATURES_OK, 0);
        wr(&mut t, reg::QUEUE_SEL, 0);
        assert_eq!(rd(&mut t, reg::QUEUE_NUM_MAX), 256);
        wr(&mut t, reg::QUEUE_NUM, 128);
        wr(&mut t, reg::QUEUE_DESC_LOW, 0x1000);
        wr(&mut t, reg::QUEUE_DESC_HIGH, 1);
        wr(&mut t, reg::QUEUE_DRIVER_LOW, 0x2000);
        wr(&mut t, reg::QUEUE_DEVICE_LOW, 0x3000);
        wr(&mut t, reg::QUEUE_READY, 1);
        wr(&mut t, reg::QUEUE_SEL, 7);
        assert_eq!(rd(&mut t, reg::QUEUE_NUM_MAX), 0, "no queue 7");
        wr(&mut t, reg::STATUS, 0xf);
        let (f, q) = t.device.activated.clone().unwrap();
        assert_eq!(f, VERSION_1 | 1 << 9);
        assert_eq!(
            q,
            vec![(
                0,
                QueueConfig {
                    size: 128,
                    ready: true,
                    desc: 0x1_0000_1000,
                    driver: 0x2000,
                    device: 0x3000
                }
            )]
        );
        // After DRIVER_OK the queue is fixed.
        wr(&mut t, reg::QUEUE_SEL, 0);
        wr(&mut t, reg::QUEUE_NUM, 64);
        assert_eq!(t.queues()[0].size, 128);
        // Config space passes through.
        t.write(reg::CONFIG + 2, &[9]);
        let mut b = [0u8; 1];
        t.read(reg::CONFIG + 2, &mut b);
        assert_eq!(b, [9]);
        // Reset.
        wr(&mut t, reg::STATUS, 0);
        assert_eq!(t.device.resets, 1);
        assert_eq!(rd(&mut t, reg::STATUS), 0);
        assert_eq!(t.queues()[0], QueueConfig::default());
    }

    #[test]
    fn bad_drivers_are_refused_not_obeyed() {
        let mut t = MmioTransport::new(Fake::default());
        // Without VERSION_1, FEATURES_OK does not stick.
        bring_up(&mut t, 0);
        assert_eq!(rd(&mut t, reg::STATUS) & status::FEATURES_OK, 0);
        let mut t = MmioTransport::new(Fake::default());
        // A feature the device does not offer.
        wr(&mut t, reg::DRIVER_FEATURES, 1 << 3);
        wr(&mut t, reg::DRIVER_FEATURES_SEL, 1);
        wr(&mut t, reg::DRIVER_FEATURES, 1);
        wr(&mut t, reg::STATUS, 0xb);
        assert_eq!(rd(&mut t, reg::STATUS) & status::FEATURES_OK, 0);
        // Queue sizes that are not powers of two or too large; short
        // accesses; unknown registers: counted, ignored.
        let before = t.bad_accesses;
        wr(&mut t, reg::QUEUE_NUM, 100);
        wr(&mut t, reg::QUEUE_NUM, 512);
        t.write(reg::QUEUE_NUM, &[1, 0]);
        wr(&mut t, 0x0e0, 1);
        assert_eq!(t.queues()[0].size, 0);
        assert_eq!(t.bad_accesses, before + 4);
        // A device that cannot start asks for a reset.
        let mut t = MmioTransport::new(Fake {
            fail: true,
            ..Default::default()
        });
        bring_up(&mut t, 1);
        wr(&mut t, reg::STATUS, 0xf);
        assert_ne!(rd(&mut t, reg::STATUS) & status::NEEDS_RESET, 0);
        assert_ne!(rd(&mut t, reg::INTERRUPT_STATUS) & INT_CONFIG, 0);
    }
}
