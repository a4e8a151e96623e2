//! What the guest sees of the device: the virtio-blk feature bits, the
//! vhost-user protocol features and the configuration space, from the
//! volume's geometry and the export's settings. Pure functions; the
//! backend (`backend.rs`) hands them to vhost-user-backend.
//!
//! The configuration space is laid out by hand (offsets from the virtio
//! 1.2 spec, 5.2.4) rather than through `virtio_bindings`'
//! `virtio_blk_config`, which vm-memory cannot serialize (no
//! `ByteValued`) and whose length changes between binding versions.

use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_MQ,
    VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_TOPOLOGY, VIRTIO_BLK_F_WRITE_ZEROES,
};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};

use super::request::{Limits, ID_LEN, SECTOR};

/// Descriptors per virtqueue at most (the guest may choose fewer).
pub const QUEUE_SIZE: u16 = 256;
/// Data buffers per request at most (VIRTIO_BLK_F_SEG_MAX): a request,
/// with its header and status, fits the smallest ring qemu gives a
/// vhost-user-blk device (128 descriptors) even without indirect
/// descriptors.
pub const SEG_MAX: u32 = 128 - 2;
/// Most queues a device offers: vhost-user-backend maps queues to its
/// worker threads with a 64-bit mask.
pub const MAX_QUEUES: usize = 64;
/// Longest read or write accepted: what a guest may pin in daemon memory
/// per request (bounce buffers and read results).
pub const MAX_DATA: u64 = 32 << 20;
/// Largest discard or write-zeroes, in 512-byte sectors (2 GiB): one
/// request runs on one worker thread, so bound how long it holds it.
pub const MAX_ZERO_SECTORS: u32 = 1 << 22;
/// Length of the configuration space served: through
/// `write_zeroes_may_unmap` and its padding.
pub const CONFIG_LEN: usize = 60;

/// The device as one export serves it.
#[derive(Debug, Clone)]
pub struct Device {
    /// The volume's size in bytes (a multiple of its sector size).
    pub size: u64,
    /// The volume's sector size: the logical block size the guest sees.
    pub block_size: u32,
    pub queues: u16,
    pub read_only: bool,
    /// Discards are offered (`allow_discards`); write-zeroes always are.
    pub discard: bool,
    /// GET_ID's answer: the volume name, cut to 20 bytes.
    pub serial: [u8; ID_LEN],
}

impl Device {
    pub fn new(
        name: &str,
        size: u64,
        block_size: u32,
        queues: u16,
        read_only: bool,
        discard: bool,
    ) -> Self {
        let mut serial = [0u8; ID_LEN];
        let bytes = name.as_bytes();
        let n = bytes.len().min(ID_LEN);
        serial[..n].copy_from_slice(&bytes[..n]);
        Device {
            size,
            block_size,
            queues,
            read_only,
            discard,
            serial,
        }
    }

    /// The virtio feature bits offered.
    pub fn features(&self) -> u64 {
        let mut bits = [
            VIRTIO_BLK_F_SEG_MAX,
            VIRTIO_BLK_F_BLK_SIZE,
            VIRTIO_BLK_F_FLUSH,
            VIRTIO_BLK_F_TOPOLOGY,
            VIRTIO_BLK_F_MQ,
            VIRTIO_BLK_F_WRITE_ZEROES,
            VIRTIO_RING_F_EVENT_IDX,
            VIRTIO_RING_F_INDIRECT_DESC,
            VIRTIO_F_VERSION_1,
        ]
        .iter()
        .fold(0u64, |acc, bit| acc | (1 << bit));
        if self.read_only {
            bits |= 1u64 << VIRTIO_BLK_F_RO;
        }
        if self.discard {
            bits |= 1u64 << VIRTIO_BLK_F_DISCARD;
        }
        bits | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
    }

    /// The vhost-user protocol features offered: the configuration space,
    /// several queues, replies to every request (REPLY_ACK) and memory
    /// regions added one at a time (CONFIGURE_MEM_SLOTS; libblkio needs
    /// both). INFLIGHT_SHMFD is not among them: vhost-user-backend 0.24
    /// does not implement it (third_party/vhost-user-backend/HOSTCRYPT.md).
    pub fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
            | VhostUserProtocolFeatures::INFLIGHT_SHMFD
    }

    /// What the request parser checks against.
    pub fn limits(&self) -> Limits {
        Limits {
            capacity: self.size,
            max_data: MAX_DATA,
            read_only: self.read_only,
            discard: self.discard,
            max_segments: SEG_MAX as usize,
            max_zero_sectors: MAX_ZERO_SECTORS,
        }
    }

    /// The configuration space (`struct virtio_blk_config`), little-endian.
    pub fn config_space(&self) -> [u8; CONFIG_LEN] {
        let mut c = [0u8; CONFIG_LEN];
        let mut put =
            |offset: usize, bytes: &[u8]| c[offset..offset + bytes.len()].copy_from_slice(bytes);
        // capacity, in 512-byte sectors whatever the block size
        put(0, &(self.size / SECTOR).to_le_bytes());
        // size_max (offset 8) stays 0: SIZE_MAX is not offered.
        // seg_max: data descriptors per request. A driver without
        // indirect descriptors must fit a whole request (with its header
        // and status) in its ring, whose size it picks (qemu: 128), and a
        // request that never fits hangs it: SEG_MAX of the queue size we
        // allow would hang Linux under qemu.
        put(12, &SEG_MAX.to_le_bytes());
        // geometry (16..20) unused.
        put(20, &self.block_size.to_le_bytes());
        // topology: physical_block_exp 0 (physical = logical),
        // alignment_offset 0, min_io_size 1 block, opt_io_size 0.
        put(26, &1u16.to_le_bytes());
        // writeback (32) unused without CONFIG_WCE; num_queues:
        put(34, &self.queues.to_le_bytes());
        // Discard and write-zeroes: in 512-byte sectors, one segment each,
        // aligned to the block size.
        let max_sectors = MAX_ZERO_SECTORS;
        let alignment = self.block_size / SECTOR as u32;
        if self.discard {
            put(36, &max_sectors.to_le_bytes());
            put(40, &1u32.to_le_bytes());
            put(44, &alignment.to_le_bytes());
        }
        put(48, &max_sectors.to_le_bytes());
        put(52, &1u32.to_le_bytes());
        // write_zeroes_may_unmap: zeroes become holes only with discards.
        c[56] = u8::from(self.discard);
        c
    }

    /// `size` bytes of the configuration space from `offset`, zero past
    /// its end (a frontend may ask for a newer, longer layout).
    pub fn config_range(&self, offset: u32, size: u32) -> Vec<u8> {
        let space = self.config_space();
        let mut out = vec![0u8; size as usize];
        let start = offset as usize;
        if start < space.len() {
            let n = (space.len() - start).min(out.len());
            out[..n].copy_from_slice(&space[start..start + n]);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_4096_byte_sector_volume_shows_4096_byte_blocks() {
        let d = Device::new("cache0", 1 << 30, 4096, 2, false, true);
        let c = d.config_space();
        assert_eq!(
            u64::from_le_bytes(c[0..8].try_into().unwrap()),
            (1 << 30) / 512
        );
        assert_eq!(u32::from_le_bytes(c[20..24].try_into().unwrap()), 4096);
        assert_eq!(u16::from_le_bytes(c[34..36].try_into().unwrap()), 2);
        assert_eq!(u32::from_le_bytes(c[44..48].try_into().unwrap()), 8);
        assert_ne!(d.features() & (1 << VIRTIO_BLK_F_DISCARD), 0);
        assert_eq!(d.features() & (1 << VIRTIO_BLK_F_RO), 0);
        assert_eq!(&d.serial[..6], b"cache0");
    }

    #[test]
    fn read_only_and_no_discards_show_in_the_features() {
        let d = Device::new(&"x".repeat(40), 1 << 20, 512, 1, true, false);
        assert_ne!(d.features() & (1 << VIRTIO_BLK_F_RO), 0);
        assert_eq!(d.features() & (1 << VIRTIO_BLK_F_DISCARD), 0);
        assert_eq!(d.serial, [b'x'; 20]);
        assert_eq!(d.config_space()[56], 0);
    }

    #[test]
    fn config_reads_past_the_end_are_zero() {
        let d = Device::new("v", 1 << 20, 512, 1, false, false);
        assert_eq!(d.config_range(56, 8), vec![0; 8]);
        assert_eq!(d.config_range(200, 4), vec![0; 4]);
        assert_eq!(
            d.config_range(0, 8),
            ((1u64 << 20) / 512).to_le_bytes().to_vec()
        );
    }
}
