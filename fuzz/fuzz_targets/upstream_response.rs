//! Raw bytes as an upstream's response to the gateway, cut into reads of
//! any size: whatever an upstream sends, muster must refuse it or frame
//! it, never panic, never loop, and never pass on more body than came.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // The first byte picks the request's method and the read size.
    let Some((&control, wire)) = data.split_first() else {
        return;
    };
    let head_request = control & 0x80 != 0;
    let read = usize::from(control & 0x7f) + 1;
    if let Some(body) = muster::gateway::feed_response(wire, head_request, read) {
        assert!(body <= wire.len(), "{body} body bytes out of {} in", wire.len());
    }
});
