//! The set of exports a server offers: each is an open volume under its NBD
//! name. An empty export name selects the first volume, so
//! `nbd+unix:///?socket=...` works without knowing names.

use std::sync::Arc;

use super::proto::*;
use crate::volume::Volume;

#[derive(Debug)]
pub struct Export {
    pub volume: Volume,
    pub description: String,
    pub allow_discards: bool,
}

impl Export {
    pub fn name(&self) -> &str {
        &self.volume.name
    }

    pub fn size(&self) -> u64 {
        self.volume.data.size()
    }

    /// Transmission flags: flush and FUA always (writes go to a page cache),
    /// multi-conn because every connection shares one backing file, so a
    /// flush on any connection persists writes completed on all of them.
    /// TRIM only when the volume opts in: discards reveal which blocks are
    /// unused, as with dm-crypt's `allow_discards`.
    pub fn transmission_flags(&self) -> u16 {
        let mut flags = TFLAG_HAS_FLAGS
            | TFLAG_SEND_FLUSH
            | TFLAG_SEND_FUA
            | TFLAG_SEND_WRITE_ZEROES
            | TFLAG_CAN_MULTI_CONN
            | TFLAG_SEND_CACHE;
        if self.allow_discards {
            flags |= TFLAG_SEND_TRIM;
        }
        flags
    }

    /// Minimum, preferred and maximum block size. Any byte alignment works
    /// (partial sectors are read-modify-written), but whole encryption
    /// sectors avoid that cost, so the sector size is preferred.
    pub fn block_sizes(&self) -> (u32, u32, u32) {
        (1, self.volume.data.sector_size() as u32, MAX_PAYLOAD)
    }
}

#[derive(Debug, Default, Clone)]
pub struct Exports {
    list: Vec<Arc<Export>>,
}

impl Exports {
    pub fn new(list: Vec<Arc<Export>>) -> Self {
        Exports { list }
    }

    pub fn find(&self, name: &str) -> Option<Arc<Export>> {
        if name.is_empty() {
            return self.list.first().cloned();
        }
        self.list.iter().find(|e| e.name() == name).cloned()
    }

    pub fn iter(&self) -> impl Iterator<Item = &Arc<Export>> {
        self.list.iter()
    }
}
