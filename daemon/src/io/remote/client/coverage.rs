//! Which bytes of a read the server's reply has filled so far: a sorted
//! list of disjoint ranges, relative to the request's offset. A read is
//! handed to its caller only when the list covers it entirely (`mod.rs`,
//! `Shared::complete`), because the read buffer comes from the pool and
//! whatever a reply leaves unwritten is some earlier user's memory.
//!
//! The list is bounded: a chunk adds at most one range, adjacent ranges
//! merge (a server sending in order keeps one range), and a reply
//! scattered into more than `MAX_RANGES` separate pieces fails its
//! request rather than growing the list further.

/// Disjoint pieces a reply may be scattered into before its request fails.
/// Real servers send extents in order (one merged range) or a few out of
/// order; thousands of gaps is a server wasting our memory.
pub const MAX_RANGES: usize = 1024;

/// Why a chunk does not fit the request it answers. The request fails
/// with EIO; the connection stays up (the stream is still framed).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum CoverageError {
    #[error("a reply chunk of {len} bytes at {offset} lies outside its request")]
    Outside { offset: u64, len: u64 },
    #[error("an empty data or hole chunk")]
    Empty,
    #[error("reply chunks overlap at request byte {at}")]
    Overlap { at: u32 },
    #[error("a reply scattered into more than {MAX_RANGES} pieces")]
    Fragmented,
}

#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Coverage {
    /// `[start, end)` pairs, sorted, disjoint and never adjacent.
    ranges: Vec<(u32, u32)>,
}

impl Coverage {
    /// Forgets everything (the request is being sent again).
    pub fn clear(&mut self) {
        self.ranges.clear();
    }

    /// Marks all `len` bytes as written (a simple reply's payload).
    pub fn fill(&mut self, len: u32) {
        self.ranges.clear();
        if len > 0 {
            self.ranges.push((0, len));
        }
    }

    /// Where a chunk of `len` bytes at absolute `offset` lands in a request
    /// of `request_len` bytes at `request_offset`: `[start, end)` in the
    /// read buffer, if it lies inside the request and over nothing already
    /// written. Records nothing (`add` does, once the bytes are in).
    /// Every input is the server's: arithmetic is checked.
    pub fn locate(
        &self,
        request_offset: u64,
        request_len: u32,
        offset: u64,
        len: u64,
    ) -> Result<(usize, usize), CoverageError> {
        let outside = CoverageError::Outside { offset, len };
        let start = offset.checked_sub(request_offset).ok_or(outside)?;
        let end = start.checked_add(len).ok_or(outside)?;
        if end > u64::from(request_len) {
            return Err(outside);
        }
        if len == 0 {
            return Err(CoverageError::Empty);
        }
        // Both fit in u32: end <= request_len.
        let (start, end) = (start as u32, end as u32);
        if let Some(at) = self.overlap(start, end) {
            return Err(CoverageError::Overlap { at });
        }
        Ok((start as usize, end as usize))
    }

    /// `locate`, then `add`.
    #[cfg(test)]
    fn place(
        &mut self,
        request_offset: u64,
        request_len: u32,
        offset: u64,
        len: u64,
    ) -> Result<usize, CoverageError> {
        let (start, end) = self.locate(request_offset, request_len, offset, len)?;
        self.add(start, end)?;
        Ok(start)
    }

    /// The first range that ends after `start`: the only one that can
    /// overlap `[start, end)`, and where it goes.
    fn slot(&self, start: u32) -> usize {
        self.ranges.partition_point(|&(_, e)| e <= start)
    }

    fn overlap(&self, start: u32, end: u32) -> Option<u32> {
        let &(s, _) = self.ranges.get(self.slot(start))?;
        (s < end).then_some(s.max(start))
    }

    /// Records `[start, end)` of the buffer (from `locate`) as written.
    /// Checked again: another chunk may have been recorded since.
    pub fn add(&mut self, start: usize, end: usize) -> Result<(), CoverageError> {
        let (Ok(start), Ok(end)) = (u32::try_from(start), u32::try_from(end)) else {
            return Err(CoverageError::Outside {
                offset: start as u64,
                len: end.saturating_sub(start) as u64,
            });
        };
        if start >= end {
            return Err(CoverageError::Empty);
        }
        if let Some(at) = self.overlap(start, end) {
            return Err(CoverageError::Overlap { at });
        }
        let i = self.slot(start);
        let joins_left = i > 0 && self.ranges[i - 1].1 == start;
        let joins_right = self.ranges.get(i).is_some_and(|&(s, _)| s == end);
        match (joins_left, joins_right) {
            (true, true) => {
                self.ranges[i - 1].1 = self.ranges[i].1;
                self.ranges.remove(i);
            }
            (true, false) => self.ranges[i - 1].1 = end,
            (false, true) => self.ranges[i].0 = start,
            (false, false) => {
                if self.ranges.len() >= MAX_RANGES {
                    return Err(CoverageError::Fragmented);
                }
                self.ranges.insert(i, (start, end));
            }
        }
        Ok(())
    }

    /// Whether all of `[0, len)` is covered.
    pub fn is_complete(&self, len: u32) -> bool {
        match self.ranges.as_slice() {
            [] => len == 0,
            [(0, end)] => *end == len,
            _ => false,
        }
    }

    /// Zeroes the bytes of `buf` no chunk wrote, so a failed read's buffer
    /// holds nothing but the server's bytes and zeros.
    pub fn zero_gaps(&self, buf: &mut [u8]) {
        let mut at = 0usize;
        for &(s, e) in &self.ranges {
            let s = (s as usize).min(buf.len());
            buf[at.min(s)..s].fill(0);
            at = at.max(e as usize);
        }
        if at < buf.len() {
            buf[at..].fill(0);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn in_order_chunks_merge_into_one_range() {
        let mut c = Coverage::default();
        assert_eq!(c.place(4096, 300, 4096, 100), Ok(0));
        assert_eq!(c.place(4096, 300, 4196, 100), Ok(100));
        assert!(!c.is_complete(300));
        assert_eq!(c.place(4096, 300, 4296, 100), Ok(200));
        assert!(c.is_complete(300));
        assert_eq!(c.ranges.len(), 1);
    }

    #[test]
    fn out_of_order_chunks_fill_the_gaps() {
        let mut c = Coverage::default();
        c.place(0, 300, 200, 100).unwrap();
        c.place(0, 300, 0, 100).unwrap();
        assert_eq!(c.ranges, vec![(0, 100), (200, 300)]);
        c.place(0, 300, 100, 100).unwrap();
        assert!(c.is_complete(300));
    }

    #[test]
    fn overlap_outside_and_empty_are_refused_and_not_recorded() {
        let mut c = Coverage::default();
        c.place(0, 300, 100, 100).unwrap();
        assert_eq!(
            c.place(0, 300, 150, 10),
            Err(CoverageError::Overlap { at: 150 })
        );
        assert_eq!(
            c.place(0, 300, 50, 60),
            Err(CoverageError::Overlap { at: 100 })
        );
        assert!(matches!(
            c.place(0, 300, 250, 51),
            Err(CoverageError::Outside { .. })
        ));
        assert!(matches!(
            c.place(10, 300, 0, 5),
            Err(CoverageError::Outside { .. })
        ));
        assert!(matches!(
            c.place(0, 300, u64::MAX, 2),
            Err(CoverageError::Outside { .. })
        ));
        assert_eq!(c.place(0, 300, 0, 0), Err(CoverageError::Empty));
        assert_eq!(c.ranges, vec![(100, 200)]);
    }

    #[test]
    fn scattering_is_bounded() {
        let mut c = Coverage::default();
        let len = (MAX_RANGES as u32 + 1) * 2;
        for i in 0..MAX_RANGES as u64 {
            c.place(0, len, i * 2, 1).unwrap();
        }
        assert_eq!(
            c.place(0, len, MAX_RANGES as u64 * 2, 1),
            Err(CoverageError::Fragmented)
        );
        // Filling a gap still works: it merges.
        c.place(0, len, 1, 1).unwrap();
    }

    #[test]
    fn gaps_are_zeroed() {
        let mut c = Coverage::default();
        c.place(0, 10, 2, 3).unwrap();
        c.place(0, 10, 7, 1).unwrap();
        let mut buf = [9u8; 10];
        c.zero_gaps(&mut buf);
        assert_eq!(buf, [0, 0, 9, 9, 9, 0, 0, 9, 0, 0]);
        let mut buf = [9u8; 4];
        Coverage::default().zero_gaps(&mut buf);
        assert_eq!(buf, [0; 4]);
    }
}
