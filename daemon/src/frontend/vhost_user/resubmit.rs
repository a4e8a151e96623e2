//! The descriptor chain at a given head, for requests resubmitted after
//! a restart: the inflight log (`inflight_log.rs`) names their heads, and
//! they are no longer on the available ring, so virtio-queue's
//! `pop_descriptor_chain` cannot return them.
//!
//! Hand-written because virtio-queue keeps `DescriptorChain::new`
//! private. It walks the table as virtio-queue's chain iterator does, so
//! the request parser sees the same descriptors either way: at most
//! `queue_size` descriptors, a `next` outside the table ends the chain,
//! one level of indirect table (length a multiple of 16, at most 65,535
//! entries), at most 4 GiB in all. What the descriptors say is the
//! parser's to check (`request.rs`).

use virtio_queue::desc::split::Descriptor;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemory};

const DESCRIPTOR: u64 = 16;

/// The descriptors of the chain whose head is `head` in the table at
/// `table` of `size` entries.
pub fn chain_at<M: GuestMemory>(
    memory: &M,
    table: GuestAddress,
    size: u16,
    head: u16,
) -> impl Iterator<Item = Descriptor> + '_ {
    Walk {
        memory,
        table,
        size,
        next: head,
        ttl: size,
        indirect: false,
        bytes: 0,
    }
}

struct Walk<'a, M> {
    memory: &'a M,
    table: GuestAddress,
    size: u16,
    next: u16,
    ttl: u16,
    indirect: bool,
    bytes: u32,
}

impl<M: GuestMemory> Iterator for Walk<'_, M> {
    type Item = Descriptor;

    fn next(&mut self) -> Option<Descriptor> {
        loop {
            if self.ttl == 0 || self.next >= self.size {
                return None;
            }
            let at = self.table.checked_add(u64::from(self.next) * DESCRIPTOR)?;
            let desc: Descriptor = self.memory.read_obj(at).ok()?;
            if desc.refers_to_indirect_table() {
                // One level only, and only whole descriptors.
                if self.indirect || !u64::from(desc.len()).is_multiple_of(DESCRIPTOR) {
                    return None;
                }
                let entries = u16::try_from(u64::from(desc.len()) / DESCRIPTOR).ok()?;
                self.table = desc.addr();
                self.size = entries;
                self.next = 0;
                self.ttl = entries;
                self.indirect = true;
                continue;
            }
            self.bytes = self.bytes.checked_add(desc.len())?;
            if desc.has_next() {
                self.next = desc.next();
                self.ttl -= 1;
            } else {
                self.ttl = 0;
            }
            return Some(desc);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use virtio_bindings::virtio_ring::{
        VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE,
    };
    use vm_memory::GuestMemoryMmap;

    fn put(memory: &GuestMemoryMmap<()>, table: u64, index: u16, desc: Descriptor) {
        memory
            .write_obj(desc, GuestAddress(table + u64::from(index) * DESCRIPTOR))
            .unwrap();
    }

    #[test]
    fn follows_next_and_one_indirect_table_and_stops_on_loops() {
        let memory = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
        let next = VRING_DESC_F_NEXT as u16;
        let write = VRING_DESC_F_WRITE as u16;
        // 5 → 2 → 7 (end).
        put(&memory, 0x1000, 5, Descriptor::new(0x4000, 16, next, 2));
        put(&memory, 0x1000, 2, Descriptor::new(0x5000, 512, next, 7));
        put(&memory, 0x1000, 7, Descriptor::new(0x6000, 1, write, 0));
        let lens: Vec<u32> = chain_at(&memory, GuestAddress(0x1000), 8, 5)
            .map(|d| d.len())
            .collect();
        assert_eq!(lens, vec![16, 512, 1]);
        // A loop ends after `size` descriptors.
        put(&memory, 0x1000, 1, Descriptor::new(0x4000, 16, next, 1));
        assert_eq!(chain_at(&memory, GuestAddress(0x1000), 8, 1).count(), 8);
        // A head or a next outside the table ends the chain.
        assert_eq!(chain_at(&memory, GuestAddress(0x1000), 8, 8).count(), 0);
        put(&memory, 0x1000, 3, Descriptor::new(0x4000, 16, next, 9));
        assert_eq!(chain_at(&memory, GuestAddress(0x1000), 8, 3).count(), 1);
        // An indirect table of two.
        let indirect = VRING_DESC_F_INDIRECT as u16;
        put(&memory, 0x1000, 4, Descriptor::new(0x2000, 32, indirect, 0));
        put(&memory, 0x2000, 0, Descriptor::new(0x4000, 16, next, 1));
        put(&memory, 0x2000, 1, Descriptor::new(0x6000, 1, write, 0));
        assert_eq!(chain_at(&memory, GuestAddress(0x1000), 8, 4).count(), 2);
        // Nested indirect tables and partial descriptors end the chain.
        put(&memory, 0x2000, 1, Descriptor::new(0x3000, 16, indirect, 0));
        assert_eq!(chain_at(&memory, GuestAddress(0x1000), 8, 4).count(), 1);
        put(&memory, 0x1000, 4, Descriptor::new(0x2000, 20, indirect, 0));
        assert_eq!(chain_at(&memory, GuestAddress(0x1000), 8, 4).count(), 0);
        // A table outside guest memory.
        assert_eq!(
            chain_at(&memory, GuestAddress(0xffff_0000), 8, 0).count(),
            0
        );
    }
}
