//! Guest bytes in, one transmit chain checked: nothing may panic, and what
//! passes must lie inside guest memory and hold a frame of a sane size.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    net_backend::fuzz::run(data);
});
