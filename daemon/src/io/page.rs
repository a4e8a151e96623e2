//! One page of buffer memory, the unit both the pooled buffers
//! (`buffers.rs`) and the registered arenas (`fixed.rs`) are made of; its
//! alignment is what O_DIRECT needs.

pub(super) const PAGE: usize = 4096;

#[derive(Clone, Copy)]
#[repr(C, align(4096))]
pub(super) struct Page(pub(super) [u8; PAGE]);
