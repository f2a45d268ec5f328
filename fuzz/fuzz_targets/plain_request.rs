//! Raw bytes as what a client sends first on a connection: muster's own
//! HTTP/1.1 server must take plain request heads off the front, or leave
//! every byte for hyper, and never panic or lose a byte on the way.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let taken = muster::feed_requests(data);
    // Every head takes at least "X / HTTP/1.1\n\n" (httparse, like
    // hyper, takes a bare LF for a line end).
    assert!(taken <= data.len() / 14, "{taken} heads from {} bytes", data.len());
});
