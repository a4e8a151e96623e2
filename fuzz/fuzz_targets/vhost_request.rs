//! The vhost-user-blk request parser against descriptor chains a hostile
//! guest writes: virtio-queue's own walker over a mock split queue feeds
//! `frontend/vhost_user/request.rs`. Every request it accepts lies in
//! guest memory and inside the volume; nothing panics.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    hostcryptd::fuzzing::vhost_request(data);
});
