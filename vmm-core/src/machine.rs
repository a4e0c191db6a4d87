//! The KVM VM: memory slots, the in-kernel irqchip and PIT, one thread per
//! vCPU, and the few port-I/O devices vmm-core emulates itself (the 8250
//! UART on 0x3f8, the i8042's reset line, and a debug-exit port for test
//! programs). Everything else will be a vhost-user device.

use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use kvm_bindings::{
    kvm_pit_config, kvm_userspace_memory_region, KVM_MAX_CPUID_ENTRIES, KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd, VmFd};
use tracing::{debug, info, warn};
use vm_memory::{GuestAddress, GuestMemory, GuestMemoryRegion};
use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

use crate::cpu;
use crate::memory::GuestRam;
use crate::vhost_user::VhostUserDevice;
use crate::virtio_mmio::{self, MmioTransport, VirtioDevice};

/// Where virtio-mmio devices go (in the 32-bit hole), one 4 KiB window each.
pub const VIRTIO_MMIO_BASE: u64 = 0xd000_0000;
/// Their interrupts: GSI 5 upwards on the in-kernel IOAPIC.
pub const VIRTIO_FIRST_IRQ: u32 = 5;
/// The IOAPIC's last GSI.
const LAST_IRQ: u32 = 23;

/// A virtio-mmio device in the machine: its window and interrupt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MmioSlot {
    pub base: u64,
    pub irq: u32,
}

type MmioDevices = Arc<Vec<(MmioSlot, Mutex<MmioTransport<VhostUserDevice>>)>>;

/// The COM1 UART's ports and interrupt.
pub const COM1: u16 = 0x3f8;
pub const COM1_IRQ: u32 = 4;
/// i8042 command port: 0xfe there pulses the CPU reset line.
const I8042_COMMAND: u16 = 0x64;
/// A write of byte N here ends the VM with exit code N (like QEMU's
/// isa-debug-exit): how small test programs report.
pub const DEBUG_EXIT_PORT: u16 = 0x501;
/// Where the VM's TSS goes (three pages below 4 GiB, out of RAM's way).
const TSS_ADDR: usize = 0xfffb_d000;

/// Errors creating or running the VM.
#[derive(Debug, thiserror::Error)]
pub enum MachineError {
    #[error("opening /dev/kvm: {0} (is KVM available here, and may this user open it?)")]
    Kvm(#[source] kvm_ioctls::Error),
    #[error("{what}: {source}")]
    Ioctl {
        what: &'static str,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error(transparent)]
    Cpu(#[from] cpu::CpuError),
    #[error("creating the serial port's interrupt: {0}")]
    Event(#[source] std::io::Error),
    #[error(
        "no room for another virtio device (interrupts {VIRTIO_FIRST_IRQ} to {LAST_IRQ} are taken)"
    )]
    TooManyDevices,
}

fn ioctl(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> MachineError {
    move |source| MachineError::Ioctl { what, source }
}

/// Why the VM stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Stop {
    /// A program wrote this code to [`DEBUG_EXIT_PORT`].
    DebugExit(u8),
    /// The guest reset the machine through the i8042 (Linux's `reboot=k`
    /// power-off and reboot) or a KVM system event.
    Reset,
    /// A triple fault.
    Shutdown,
    /// A vCPU halted with no in-kernel irqchip to wait in.
    Halted,
    /// KVM could not go on (an entry failure, an emulation error).
    Failed(String),
    /// Asked to stop through [`Control::shutdown`] (the control API).
    Requested,
    /// The guest powered off through ACPI (S5 on the power port).
    PowerOff,
}

/// Pausing, resuming and stopping the vCPUs from another thread (the
/// control API). A vCPU looks at it between exits; a vCPU inside KVM_RUN
/// (running guest code, or halted in the kernel) is kicked out with a
/// signal, sent again every millisecond until it has parked, since one
/// that arrives just before it enters KVM_RUN is not seen there.
pub struct Control {
    attention: AtomicBool,
    state: Mutex<RunState>,
    changed: Condvar,
    threads: Mutex<Vec<libc::pthread_t>>,
}

#[derive(Default)]
struct RunState {
    pause: bool,
    shutdown: bool,
    parked: usize,
    running: usize,
}

/// The signal that kicks a vCPU out of KVM_RUN; its handler does nothing.
fn kick_signal() -> libc::c_int {
    libc::SIGRTMIN() + 1
}

extern "C" fn on_kick(_: libc::c_int) {}

impl Control {
    fn new() -> Arc<Self> {
        static HANDLER: std::sync::Once = std::sync::Once::new();
        HANDLER.call_once(|| {
            // SAFETY: a handler that does nothing, installed without
            // SA_RESTART so that KVM_RUN returns EINTR.
            unsafe {
                let mut sa: libc::sigaction = std::mem::zeroed();
                sa.sa_sigaction = on_kick as extern "C" fn(libc::c_int) as *const () as usize;
                libc::sigemptyset(&mut sa.sa_mask);
                libc::sigaction(kick_signal(), &sa, std::ptr::null_mut());
            }
        });
        Arc::new(Control {
            attention: AtomicBool::new(false),
            state: Mutex::new(RunState::default()),
            changed: Condvar::new(),
            threads: Mutex::new(Vec::new()),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, RunState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn kick(&self) {
        for t in self
            .threads
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
        {
            // SAFETY: signalling a vCPU thread of this process, which
            // exists until the process ends (they are never joined).
            unsafe { libc::pthread_kill(*t, kick_signal()) };
        }
    }

    /// Whether the vCPUs are paused (all parked).
    pub fn is_paused(&self) -> bool {
        let s = self.lock();
        s.pause && s.parked == s.running
    }

    /// Stop every vCPU between two instructions; returns once all are
    /// parked, or an error after `timeout`.
    pub fn pause(&self, timeout: Duration) -> Result<(), String> {
        let deadline = Instant::now() + timeout;
        let mut s = self.lock();
        if s.shutdown {
            return Err("the VM is shutting down".into());
        }
        s.pause = true;
        self.attention.store(true, Ordering::SeqCst);
        while s.parked < s.running {
            drop(s);
            self.kick();
            s = self.lock();
            if Instant::now() >= deadline {
                return Err(format!(
                    "{} of {} vCPUs paused after {timeout:?}",
                    s.parked, s.running
                ));
            }
            s = self
                .changed
                .wait_timeout(s, Duration::from_millis(1))
                .map(|(g, _)| g)
                .unwrap_or_else(|e| e.into_inner().0);
        }
        Ok(())
    }

    /// Let paused vCPUs run again.
    pub fn resume(&self) {
        let mut s = self.lock();
        s.pause = false;
        self.attention.store(s.shutdown, Ordering::SeqCst);
        self.changed.notify_all();
    }

    /// End the VM: every vCPU stops with [`Stop::Requested`].
    pub fn shutdown(&self) {
        let mut s = self.lock();
        s.shutdown = true;
        s.pause = false;
        self.attention.store(true, Ordering::SeqCst);
        self.changed.notify_all();
        drop(s);
        self.kick();
    }

    /// A vCPU thread starting.
    fn enter(&self) {
        // SAFETY: pthread_self cannot fail.
        let me = unsafe { libc::pthread_self() };
        self.threads
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(me);
        self.lock().running += 1;
    }

    /// Between exits: park while paused; whether to stop for good.
    fn checkpoint(&self) -> bool {
        if !self.attention.load(Ordering::SeqCst) {
            return false;
        }
        let mut s = self.lock();
        if s.pause && !s.shutdown {
            s.parked += 1;
            self.changed.notify_all();
            while s.pause && !s.shutdown {
                s = self.changed.wait(s).unwrap_or_else(|e| e.into_inner());
            }
            s.parked -= 1;
        }
        s.shutdown
    }
}

/// The UART's interrupt line: an eventfd bound to IRQ 4 by an irqfd.
struct IrqLine(EventFd);

impl Trigger for IrqLine {
    type E = std::io::Error;
    fn trigger(&self) -> std::io::Result<()> {
        self.0.write(1)
    }
}

type Uart = Serial<IrqLine, vm_superio::serial::NoEvents, Box<dyn Write + Send>>;

/// A VM ready to be set up and run.
pub struct Machine {
    _kvm: Kvm,
    vm: VmFd,
    ram: GuestRam,
    vcpus: Vec<VcpuFd>,
    uart: Arc<Mutex<Uart>>,
    mmio: Vec<(MmioSlot, Mutex<MmioTransport<VhostUserDevice>>)>,
    control: Arc<Control>,
    seccomp: backend_common::seccomp::Action,
    reconnect_wait: Duration,
}

impl Machine {
    /// A VM with `ram`, `cpus` vCPUs and its console written to `console`.
    pub fn new(
        ram: GuestRam,
        cpus: u8,
        console: Box<dyn Write + Send>,
    ) -> Result<Self, MachineError> {
        let kvm = Kvm::new().map_err(MachineError::Kvm)?;
        let vm = kvm.create_vm().map_err(ioctl("KVM_CREATE_VM"))?;
        vm.set_tss_address(TSS_ADDR)
            .map_err(ioctl("KVM_SET_TSS_ADDR"))?;
        vm.create_irq_chip().map_err(ioctl("KVM_CREATE_IRQCHIP"))?;
        vm.create_pit2(kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        })
        .map_err(ioctl("KVM_CREATE_PIT2"))?;
        for (slot, region) in ram.mem.iter().enumerate() {
            let host = ram.mem.get_host_address(region.start_addr()).map_err(|_| {
                MachineError::Event(std::io::Error::other("a region with no mapping"))
            })?;
            let r = kvm_userspace_memory_region {
                slot: slot as u32,
                guest_phys_addr: region.start_addr().0,
                memory_size: region.len(),
                userspace_addr: host as u64,
                flags: 0,
            };
            // SAFETY: the mapping is valid for the region's length and
            // lives as long as `ram`, which the Machine owns with the VM.
            unsafe { vm.set_user_memory_region(r) }.map_err(ioctl("KVM_SET_USER_MEMORY_REGION"))?;
        }
        // Known before the vCPUs' sandbox, for their error messages.
        backend_common::hardware_virtualization();
        let supported = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(ioctl("KVM_GET_SUPPORTED_CPUID"))?;
        let mut vcpus = Vec::new();
        for i in 0..cpus {
            let v = vm
                .create_vcpu(u64::from(i))
                .map_err(ioctl("KVM_CREATE_VCPU"))?;
            v.set_cpuid2(&cpu::cpuid_for(&supported, i, cpus))
                .map_err(ioctl("KVM_SET_CPUID2"))?;
            vcpus.push(v);
        }
        let irq = EventFd::new(libc::EFD_NONBLOCK).map_err(MachineError::Event)?;
        vm.register_irqfd(&irq, COM1_IRQ)
            .map_err(ioctl("KVM_IRQFD"))?;
        let uart = Arc::new(Mutex::new(Serial::new(IrqLine(irq), console)));
        Ok(Machine {
            _kvm: kvm,
            vm,
            ram,
            vcpus,
            uart,
            mmio: Vec::new(),
            control: Control::new(),
            seccomp: backend_common::seccomp::Action::None,
            reconnect_wait: Duration::from_secs(30),
        })
    }

    /// Put a vhost-user device on the next virtio-mmio window. Each
    /// queue's notify register becomes a KVM ioeventfd on the backend's
    /// kick fd, and each call fd a KVM irqfd on the device's interrupt, so
    /// the data path never leaves the kernel and the backend.
    pub fn add_virtio_mmio(&mut self, dev: VhostUserDevice) -> Result<MmioSlot, MachineError> {
        let n = self.mmio.len() as u32;
        let irq = VIRTIO_FIRST_IRQ + n;
        if irq > LAST_IRQ {
            return Err(MachineError::TooManyDevices);
        }
        let slot = MmioSlot {
            base: VIRTIO_MMIO_BASE + u64::from(n) * virtio_mmio::WINDOW,
            irq,
        };
        let notify = kvm_ioctls::IoEventAddress::Mmio(slot.base + virtio_mmio::reg::QUEUE_NOTIFY);
        for q in 0..virtio_mmio::VirtioDevice::num_queues(&dev) {
            if let (Some(kick), Some(call)) = (dev.kick(q), dev.call(q)) {
                self.vm
                    .register_ioevent(kick, &notify, q as u32)
                    .map_err(ioctl("KVM_IOEVENTFD"))?;
                self.vm
                    .register_irqfd(call, irq)
                    .map_err(ioctl("KVM_IRQFD"))?;
            }
        }
        info!(base = slot.base, irq, socket = %dev.socket().display(), "virtio-mmio device");
        self.mmio.push((slot, Mutex::new(MmioTransport::new(dev))));
        Ok(slot)
    }

    pub fn ram(&self) -> &GuestRam {
        &self.ram
    }

    /// The boot vCPU, to set up before [`Machine::run`].
    pub fn boot_vcpu(&self) -> &VcpuFd {
        &self.vcpus[0]
    }

    /// Start the boot vCPU in 64-bit mode at `rip` with `rsi`.
    pub fn start_long_mode(&self, rip: u64, rsi: u64) -> Result<(), MachineError> {
        Ok(cpu::setup_long_mode(
            self.boot_vcpu(),
            &self.ram.mem,
            rip,
            rsi,
        )?)
    }

    /// Feed bytes to the UART, as if typed on the console.
    pub fn console_input(&self) -> impl Fn(&[u8]) + Send + 'static {
        let uart = Arc::clone(&self.uart);
        move |b: &[u8]| {
            if let Ok(mut u) = uart.lock() {
                let _ = u.enqueue_raw_bytes(b);
            }
        }
    }

    /// The virtio-mmio devices' transports, to inspect (shared with the
    /// vCPU threads once the VM runs).
    pub fn mmio_devices(&self) -> &[(MmioSlot, Mutex<MmioTransport<VhostUserDevice>>)] {
        &self.mmio
    }

    /// Have `run` put each thread under its role's seccomp filter
    /// ([`crate::seccomp`]) once it starts: the vCPU threads on
    /// themselves, the calling thread once they are started.
    pub fn set_seccomp(&mut self, action: backend_common::seccomp::Action) {
        self.seccomp = action;
    }

    /// How long a device waits for its backend to serve again after the
    /// backend hung up (default 30 s); after that the device stays down and
    /// the VM runs on without it.
    pub fn set_reconnect_wait(&mut self, wait: Duration) {
        self.reconnect_wait = wait;
    }

    /// Pause, resume and shut down the VM from another thread.
    pub fn control(&self) -> Arc<Control> {
        Arc::clone(&self.control)
    }

    /// Run every vCPU on a thread of its own until the first one stops the
    /// VM, and say why. (The others are left in KVM_RUN: the VM is over.)
    pub fn run(self) -> Stop {
        let (tx, rx) = mpsc::channel();
        let _vm = &self.vm;
        let mut threads = Vec::new();
        let mmio: MmioDevices = Arc::new(self.mmio);
        for (i, vcpu) in self.vcpus.into_iter().enumerate() {
            let uart = Arc::clone(&self.uart);
            let mmio = Arc::clone(&mmio);
            let control = Arc::clone(&self.control);
            let seccomp = self.seccomp;
            let tx = tx.clone();
            let t = std::thread::Builder::new()
                .name(format!("vcpu{i}"))
                .spawn(move || {
                    control.enter();
                    let stop = match crate::seccomp::install(crate::seccomp::Role::Vcpu, seccomp) {
                        Ok(()) => vcpu_loop(i, vcpu, &uart, &mmio, &control),
                        Err(e) => Stop::Failed(e),
                    };
                    let _ = tx.send(stop);
                });
            match t {
                Ok(t) => threads.push(t),
                Err(e) => return Stop::Failed(format!("starting vCPU {i}: {e}")),
            }
        }
        drop(tx);
        if !mmio.is_empty() {
            let mmio = Arc::clone(&mmio);
            let (seccomp, wait) = (self.seccomp, self.reconnect_wait);
            let t = std::thread::Builder::new()
                .name("devices".into())
                .spawn(move || watch_backends(&mmio, seccomp, wait));
            if let Err(e) = t {
                return Stop::Failed(format!("starting the device watcher: {e}"));
            }
        }
        if let Err(e) = crate::seccomp::install(crate::seccomp::Role::Vmm, self.seccomp) {
            self.control.shutdown();
            return Stop::Failed(e);
        }
        let stop = rx
            .recv()
            .unwrap_or_else(|_| Stop::Failed("every vCPU thread ended".into()));
        if let Ok(mut u) = self.uart.lock() {
            let _ = u.writer_mut().flush();
        }
        std::mem::forget(self.ram);
        stop
    }
}

/// Watch every device's backend socket; when one hangs up, reconnect it
/// (see [`VhostUserDevice::reconnect`]) while the VM runs on. A device
/// whose backend does not come back within `wait` stays down; it is tried
/// again if its socket is served later.
fn watch_backends(mmio: &MmioDevices, seccomp: backend_common::seccomp::Action, wait: Duration) {
    if let Err(e) = crate::seccomp::install(crate::seccomp::Role::Devices, seccomp) {
        warn!("{e}; backends will not be reconnected");
        return;
    }
    // Devices whose backend did not come back in time: tried once a round.
    let mut down = vec![false; mmio.len()];
    loop {
        std::thread::sleep(Duration::from_millis(100));
        for (n, (slot, dev)) in mmio.iter().enumerate() {
            let Some((hung_up, socket, queues)) = dev.lock().ok().map(|d| {
                (
                    d.device.hung_up(),
                    d.device.socket().to_path_buf(),
                    d.device.num_queues(),
                )
            }) else {
                continue;
            };
            if !hung_up {
                continue;
            }
            if !down[n] {
                warn!(base = slot.base, socket = %socket.display(), "backend hung up; waiting for it to serve again");
            }
            // Wait without holding the device: its registers stay usable
            // (a vCPU touching them meanwhile gets no backend's answer).
            let h = crate::vhost_user::wait_for_backend(
                &socket,
                queues,
                if down[n] { Duration::ZERO } else { wait },
            );
            let r = h.and_then(|h| match dev.lock() {
                Ok(mut d) => d.device.adopt(h),
                Err(_) => Err("the device's lock is poisoned".into()),
            });
            match r {
                Ok(()) => down[n] = false,
                Err(e) => {
                    if !down[n] {
                        warn!(base = slot.base, socket = %socket.display(), "{e}; the device stays down");
                    }
                    down[n] = true;
                }
            }
        }
    }
}

/// The virtio-mmio device whose window holds `addr`, and the offset.
fn mmio_at(mmio: &MmioDevices, addr: u64) -> Option<(&Mutex<MmioTransport<VhostUserDevice>>, u64)> {
    mmio.iter().find_map(|(slot, dev)| {
        (addr >= slot.base && addr < slot.base + virtio_mmio::WINDOW)
            .then(|| (dev, addr - slot.base))
    })
}

fn vcpu_loop(
    index: usize,
    mut vcpu: VcpuFd,
    uart: &Mutex<Uart>,
    mmio: &MmioDevices,
    control: &Control,
) -> Stop {
    loop {
        if control.checkpoint() {
            return Stop::Requested;
        }
        let exit = match vcpu.run() {
            Ok(e) => e,
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => continue,
            Err(e) => return Stop::Failed(format!("KVM_RUN on vCPU {index}: {e}")),
        };
        match exit {
            VcpuExit::IoOut(port, data) => {
                let v = data.first().copied().unwrap_or(0);
                match port {
                    p if (COM1..COM1 + 8).contains(&p) => {
                        if let Ok(mut u) = uart.lock() {
                            if let Err(e) = u.write((p - COM1) as u8, v) {
                                debug!(error = ?e, "UART write");
                            }
                        }
                    }
                    DEBUG_EXIT_PORT => return Stop::DebugExit(v),
                    crate::acpi::POWER_PORT if v & 0x20 != 0 => {
                        info!(
                            vcpu = index,
                            sleep_type = (v >> 2) & 7,
                            "the guest powered off (ACPI)"
                        );
                        return Stop::PowerOff;
                    }
                    crate::acpi::POWER_PORT if v == crate::acpi::RESET => {
                        info!(vcpu = index, "the guest reset the machine (ACPI)");
                        return Stop::Reset;
                    }
                    I8042_COMMAND if v == 0xfe => {
                        info!(vcpu = index, "the guest reset the machine (i8042)");
                        return Stop::Reset;
                    }
                    _ => {}
                }
            }
            VcpuExit::IoIn(port, data) => {
                let v = match port {
                    p if (COM1..COM1 + 8).contains(&p) => uart
                        .lock()
                        .map(|mut u| u.read((p - COM1) as u8))
                        .unwrap_or(0xff),
                    // The i8042's status: no data, input buffer empty.
                    I8042_COMMAND => 0,
                    _ => 0xff,
                };
                data.fill(v);
            }
            VcpuExit::MmioRead(addr, data) => match mmio_at(mmio, addr) {
                Some((dev, off)) => {
                    if let Ok(mut d) = dev.lock() {
                        d.read(off, data);
                    }
                }
                None => {
                    debug!(addr, len = data.len(), "MMIO read of nothing");
                    data.fill(0xff);
                }
            },
            VcpuExit::MmioWrite(addr, data) => match mmio_at(mmio, addr) {
                Some((dev, off)) => {
                    if let Ok(mut d) = dev.lock() {
                        d.write(off, data);
                    }
                }
                None => debug!(addr, len = data.len(), "MMIO write to nothing"),
            },
            VcpuExit::Hlt => return Stop::Halted,
            VcpuExit::Shutdown => return Stop::Shutdown,
            VcpuExit::SystemEvent(kind, _) => {
                info!(vcpu = index, kind, "system event");
                return Stop::Reset;
            }
            VcpuExit::FailEntry(reason, cpu) => {
                return Stop::Failed(format!("KVM entry failure {reason:#x} on CPU {cpu}"))
            }
            VcpuExit::InternalError => {
                let rip = vcpu.get_regs().map(|r| r.rip).unwrap_or(0);
                let why = if backend_common::hardware_virtualization() {
                    "an instruction KVM could not emulate?"
                } else {
                    // Seen with Debian's 6.1 kernel on PVM: cmpxchg16b on a
                    // write-protected page, xrstor at FPU set-up, and the
                    // int3 self-test of the kernel's code patching.
                    "this CPU has no VT-x/AMD-V (no vmx/svm in /proc/cpuinfo), so KVM \
                     emulates the guest kernel's privileged code, and its emulator lacks \
                     instructions a stock kernel uses; boot on a host with hardware \
                     virtualization, or under QEMU (orchestrator: vmm = \"qemu\")"
                };
                return Stop::Failed(format!(
                    "KVM internal error on vCPU {index} at rip {rip:#x}: {why}"
                ));
            }
            other => warn!(vcpu = index, exit = ?other, "unhandled exit"),
        }
    }
}

/// Load `code` at `addr` (tests and tools).
pub fn load_program(ram: &GuestRam, addr: u64, code: &[u8]) -> Result<(), String> {
    use vm_memory::Bytes;
    ram.mem
        .write_slice(code, GuestAddress(addr))
        .map_err(|e| e.to_string())
}
