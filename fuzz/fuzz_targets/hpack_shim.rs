//! The agent's HTTP/2 `:authority` shim: every byte a local caller sends to the Workload API socket passes
//! through it before the caller is attested. Reads through the shim until it ends or refuses.
#![no_main]
use libfuzzer_sys::fuzz_target;
use tokio::io::AsyncReadExt;

fuzz_target!(|data: &[u8]| {
    let rt = tokio::runtime::Builder::new_current_thread().build().expect("runtime");
    rt.block_on(async {
        let mut input = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
        input.extend_from_slice(data);
        let mut shim = trustline_identity_agent::h2_authority::AuthorityFix::new(std::io::Cursor::new(input));
        let mut out = vec![0u8; 64 * 1024];
        let mut total = 0usize;
        while let Ok(n) = shim.read(&mut out).await {
            if n == 0 {
                break;
            }
            total += n;
            // What comes out is bounded by what went in (re-encoding expands at most by a constant factor).
            assert!(total <= 64 * (data.len() + 64) + 64 * 1024, "{total} bytes out of {}", data.len());
        }
    });
});
