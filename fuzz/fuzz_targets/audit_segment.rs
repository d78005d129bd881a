//! Accountability-log segments as someone with the disk may have left them: verify and the record reader must
//! name what is wrong, never panic or loop.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(dir) = tempfile::tempdir() else { return };
    let path = dir.path().join(trustline_audit::format::segment_name(0));
    if std::fs::write(&path, data).is_err() {
        return;
    }
    let _ = trustline_audit::verify(dir.path(), None);
    let _ = trustline_audit::verify::records(dir.path(), None);
    let _ = trustline_audit::format::parse_header(data);
    let mut off = trustline_audit::format::HEADER_LEN;
    while let Some(f) = trustline_audit::format::decode_frame(data, off) {
        if f.is_empty() {
            break;
        }
        off += f.len();
    }
});
