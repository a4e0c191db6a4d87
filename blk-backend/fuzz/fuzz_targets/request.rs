//! Guest bytes in, one virtio-blk request parsed and checked: nothing may
//! panic, and no plan may reach past the disk or outside guest memory.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    blk_backend::fuzz::run(data);
});
