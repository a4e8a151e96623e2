//! The guest memory and vring types as vhost-user-backend instantiates
//! them for this device, named once for the files that handle them
//! (`backend.rs`, `notify.rs`, `socket.rs`). No dirty-page bitmap: no live migration
//! through this backend.

use vhost_user_backend::VringMutex;
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};

pub type GuestMemory = GuestMemoryMmap<()>;
pub type Memory = GuestMemoryAtomic<GuestMemory>;
pub type Vring = VringMutex<Memory>;
