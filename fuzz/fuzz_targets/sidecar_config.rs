//! The sidecar's TOML configuration: refused with an error naming the field, or accepted; never a panic.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let _ = trustline_sidecar::config::Config::parse(std::path::Path::new("/nonexistent/fuzz/sidecar.toml"), text);
});
