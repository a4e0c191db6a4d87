//! virtio-blk requests (virtio 1.x section 5.2) over the test frontend.
//!
//! A request is a readable virtio_blk_outhdr, then data (readable for OUT,
//! writable for IN and GET_ID), then one writable status byte.

use crate::frontend::{BackendProcess, DeviceOptions, FrontendError, VuDevice};
use crate::queue::{Completion, ReqQueue, Shape};
use crate::ring::RingError;

/// Request types.
pub mod req {
    pub const IN: u32 = 0;
    pub const OUT: u32 = 1;
    pub const FLUSH: u32 = 4;
    pub const GET_ID: u32 = 8;
    pub const DISCARD: u32 = 11;
    pub const WRITE_ZEROES: u32 = 13;
}

/// Status byte values.
pub const S_OK: u8 = 0;
pub const S_IOERR: u8 = 1;
pub const S_UNSUPP: u8 = 2;

/// Feature bits.
pub mod feature {
    pub const SIZE_MAX: u64 = 1 << 1;
    pub const SEG_MAX: u64 = 1 << 2;
    pub const RO: u64 = 1 << 5;
    pub const BLK_SIZE: u64 = 1 << 6;
    pub const FLUSH: u64 = 1 << 9;
    pub const TOPOLOGY: u64 = 1 << 10;
    pub const MQ: u64 = 1 << 12;
    pub const DISCARD: u64 = 1 << 13;
    pub const WRITE_ZEROES: u64 = 1 << 14;
    /// Everything a Linux guest would accept.
    pub const ALL: u64 =
        SIZE_MAX | SEG_MAX | RO | BLK_SIZE | FLUSH | TOPOLOGY | MQ | DISCARD | WRITE_ZEROES;
}

/// Length of the GET_ID reply.
pub const ID_BYTES: u32 = 20;
/// The sector unit of the protocol, whatever the logical block size.
pub const SECTOR: u64 = 512;

/// Errors of the block client.
#[derive(Debug, thiserror::Error)]
pub enum BlkError {
    #[error("the device answered status {0}")]
    Status(u8),
    #[error("the device returned {0} bytes, with no room for a status byte")]
    NoStatus(u32),
    #[error(transparent)]
    Ring(#[from] RingError),
    #[error(transparent)]
    Frontend(#[from] FrontendError),
}

/// The config-space fields tests look at.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BlkConfig {
    pub capacity: u64,
    pub size_max: u32,
    pub seg_max: u32,
    pub blk_size: u32,
    pub num_queues: u16,
    pub max_discard_sectors: u32,
    pub max_write_zeroes_sectors: u32,
}

/// virtio_blk_outhdr.
pub fn out_header(typ: u32, sector: u64) -> [u8; 16] {
    let mut h = [0u8; 16];
    h[0..4].copy_from_slice(&typ.to_le_bytes());
    h[8..16].copy_from_slice(&sector.to_le_bytes());
    h
}

/// One virtio_blk_discard_write_zeroes segment.
pub fn range_segment(sector: u64, sectors: u32, unmap: bool) -> [u8; 16] {
    let mut s = [0u8; 16];
    s[0..8].copy_from_slice(&sector.to_le_bytes());
    s[8..12].copy_from_slice(&sectors.to_le_bytes());
    s[12..16].copy_from_slice(&u32::from(unmap).to_le_bytes());
    s
}

/// A virtio-blk device seen from the guest.
pub struct BlkClient {
    pub dev: VuDevice,
    pub queues: Vec<ReqQueue>,
    pub shape: Shape,
}

impl BlkClient {
    /// Bring up `queues` request queues, `depth` requests of up to `max_io`
    /// bytes in flight on each.
    pub fn connect(
        backend: &mut BackendProcess,
        queues: usize,
        depth: usize,
        max_io: u32,
    ) -> Result<Self, BlkError> {
        Self::connect_with(backend, queues, depth, max_io, false)
    }

    /// [`BlkClient::connect`], optionally setting up the inflight area.
    pub fn connect_with(
        backend: &mut BackendProcess,
        queues: usize,
        depth: usize,
        max_io: u32,
        inflight: bool,
    ) -> Result<Self, BlkError> {
        let opts = DeviceOptions {
            inflight,
            queues,
            queue_size: (depth * 4).next_power_of_two().clamp(64, 1024) as u16,
            device_features: feature::ALL,
            region_size: ((u64::from(max_io) + 3 * 4096) * depth as u64 * queues as u64
                + (16 << 20))
                .next_power_of_two(),
            ..Default::default()
        };
        let mut dev = backend.device(&opts)?;
        let rings = std::mem::take(&mut dev.queues);
        let mut qs = Vec::with_capacity(queues);
        for r in rings {
            // Data in its own page-aligned buffers, as a Linux guest sends
            // page-cache pages: what O_DIRECT back ends can take as is.
            qs.push(ReqQueue::with_alignment(
                r,
                &mut dev.mem,
                depth,
                max_io + 64,
                max_io + 64,
                4096,
            )?);
        }
        Ok(BlkClient {
            dev,
            queues: qs,
            shape: Shape::DIRECT,
        })
    }

    /// Read the config space through GET_CONFIG.
    pub fn config(&mut self) -> Result<BlkConfig, BlkError> {
        let b = self.dev.read_config(0, 60)?;
        let u32_at = |o: usize| u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]]);
        Ok(BlkConfig {
            capacity: u64::from(u32_at(0)) | (u64::from(u32_at(4)) << 32),
            size_max: u32_at(8),
            seg_max: u32_at(12),
            blk_size: u32_at(20),
            num_queues: u16::from_le_bytes([b[34], b[35]]),
            max_discard_sectors: u32_at(36),
            max_write_zeroes_sectors: u32_at(48),
        })
    }

    /// Queue a request on queue `q` without publishing it.
    pub fn push(
        &mut self,
        q: usize,
        typ: u32,
        sector: u64,
        data: &[u8],
        read_len: u32,
    ) -> Result<u16, BlkError> {
        let hdr = out_header(typ, sector);
        let writable: &[u32] = if read_len > 0 { &[read_len, 1] } else { &[1] };
        Ok(self.queues[q].push(&[&hdr, data], writable, self.shape)?)
    }

    /// The status byte of a completion: the last byte of the writable area.
    pub fn status(c: &Completion) -> Result<u8, BlkError> {
        c.data.last().copied().ok_or(BlkError::NoStatus(c.len))
    }

    fn call(
        &mut self,
        typ: u32,
        sector: u64,
        data: &[u8],
        read_len: u32,
    ) -> Result<Vec<u8>, BlkError> {
        self.push(0, typ, sector, data, read_len)?;
        self.queues[0].publish()?;
        let mut c = self.queues[0].wait()?;
        let status = Self::status(&c)?;
        if status != S_OK {
            return Err(BlkError::Status(status));
        }
        c.data.truncate(read_len as usize);
        Ok(c.data)
    }

    pub fn read(&mut self, sector: u64, len: u32) -> Result<Vec<u8>, BlkError> {
        self.call(req::IN, sector, &[], len)
    }
    pub fn write(&mut self, sector: u64, data: &[u8]) -> Result<(), BlkError> {
        self.call(req::OUT, sector, data, 0).map(|_| ())
    }
    pub fn flush(&mut self) -> Result<(), BlkError> {
        self.call(req::FLUSH, 0, &[], 0).map(|_| ())
    }
    /// GET_ID: the serial, NUL-padded to 20 bytes.
    pub fn get_id(&mut self) -> Result<Vec<u8>, BlkError> {
        self.call(req::GET_ID, 0, &[], ID_BYTES)
    }
    pub fn discard(&mut self, sector: u64, sectors: u32) -> Result<(), BlkError> {
        self.call(req::DISCARD, 0, &range_segment(sector, sectors, false), 0)
            .map(|_| ())
    }
    pub fn write_zeroes(&mut self, sector: u64, sectors: u32, unmap: bool) -> Result<(), BlkError> {
        self.call(
            req::WRITE_ZEROES,
            0,
            &range_segment(sector, sectors, unmap),
            0,
        )
        .map(|_| ())
    }
    /// A request of any type, returning the raw status (for unknown types).
    pub fn raw_status(&mut self, typ: u32, sector: u64, data: &[u8]) -> Result<u8, BlkError> {
        match self.call(typ, sector, data, 0) {
            Ok(_) => Ok(S_OK),
            Err(BlkError::Status(s)) => Ok(s),
            Err(e) => Err(e),
        }
    }
}
