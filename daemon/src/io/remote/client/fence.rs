//! Fenced ranges: byte ranges of the remote export that a write may still
//! reach behind the client's back, so no new write may go there.
//!
//! A write that timed out, or that was in flight on a connection that was
//! lost, may still be applied by the server later (the far end of a TCP
//! connection does not stop when ours does). Were a newer write to the
//! same blocks acknowledged first, the stale one would land over it. So
//! the range of every such write is fenced: a new write, write-zeroes or
//! trim that overlaps one fails at once with EIO, before it is sent.
//!
//! No reply can show that the stale write is gone: a FLUSH on another
//! connection does not cover requests the server still holds from a dead
//! one. So a fence lasts until the volume is reopened (the client is made
//! anew), which the durability loss recorded with it (`durability.rs`)
//! already asks for; reads are not fenced (a range under a failed write
//! holds old or new data, as on any disk). Re-sending the cut-off write
//! itself is not a new write and is never refused. Hand-written: a sorted
//! list of disjoint ranges, bounded, is all it takes.

/// The most distinct fenced ranges kept; past it, the whole export is
/// fenced (a backend that keeps timing out is not written any more).
const MAX_RANGES: usize = 1024;

/// Disjoint, sorted `[start, end)` ranges.
#[derive(Debug, Default)]
pub(super) struct Fence {
    ranges: Vec<(u64, u64)>,
}

impl Fence {
    /// Fences `[offset, offset + length)`, merging with what it touches.
    pub(super) fn add(&mut self, offset: u64, length: u32) {
        let start = offset;
        let end = offset.saturating_add(u64::from(length.max(1)));
        // The first range that ends at or after `start`.
        let first = self.ranges.partition_point(|&(_, e)| e < start);
        let mut last = first;
        let (mut lo, mut hi) = (start, end);
        while last < self.ranges.len() && self.ranges[last].0 <= end {
            lo = lo.min(self.ranges[last].0);
            hi = hi.max(self.ranges[last].1);
            last += 1;
        }
        self.ranges.splice(first..last, [(lo, hi)]);
        if self.ranges.len() > MAX_RANGES {
            self.ranges = vec![(0, u64::MAX)];
        }
    }

    /// The fenced range a write of `[offset, offset + length)` would touch.
    pub(super) fn overlap(&self, offset: u64, length: u32) -> Option<(u64, u64)> {
        let end = offset.saturating_add(u64::from(length.max(1)));
        let i = self.ranges.partition_point(|&(_, e)| e <= offset);
        self.ranges.get(i).copied().filter(|&(s, _)| s < end)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overlapping_writes_are_caught_and_neighbours_are_not() {
        let mut f = Fence::default();
        assert_eq!(f.overlap(0, u32::MAX), None);
        f.add(4096, 4096);
        assert_eq!(f.overlap(4096, 512), Some((4096, 8192)));
        assert_eq!(f.overlap(0, 4097), Some((4096, 8192)));
        assert_eq!(f.overlap(8191, 1), Some((4096, 8192)));
        assert_eq!(f.overlap(0, 4096), None);
        assert_eq!(f.overlap(8192, 4096), None);
    }

    #[test]
    fn touching_and_overlapping_ranges_merge() {
        let mut f = Fence::default();
        f.add(0, 10);
        f.add(20, 10);
        f.add(100, 1);
        assert_eq!(f.ranges, vec![(0, 10), (20, 30), (100, 101)]);
        f.add(10, 10);
        assert_eq!(f.ranges, vec![(0, 30), (100, 101)]);
        f.add(25, 80);
        assert_eq!(f.ranges, vec![(0, 105)]);
    }

    #[test]
    fn a_zero_length_request_and_the_end_of_the_range_space_are_safe() {
        let mut f = Fence::default();
        f.add(u64::MAX - 1, u32::MAX);
        assert_eq!(f.overlap(u64::MAX - 1, 0), Some((u64::MAX - 1, u64::MAX)));
        f.add(7, 0);
        assert_eq!(f.overlap(7, 0), Some((7, 8)));
    }

    #[test]
    fn too_many_ranges_fence_everything() {
        let mut f = Fence::default();
        for i in 0..=MAX_RANGES as u64 {
            f.add(i * 10, 1);
        }
        assert_eq!(f.ranges, vec![(0, u64::MAX)]);
        assert!(f.overlap(123_456_789, 1).is_some());
    }
}
