//! Compiles `proto/*.proto` with `protox` (a protobuf compiler written in Rust), so the build needs no system
//! `protoc`, then generates tonic client and server code from the resulting descriptors.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = ["proto/agent.proto", "proto/admin.proto", "proto/workload.proto"];
    for f in files {
        println!("cargo:rerun-if-changed={f}");
    }
    let fds = protox::compile(files, ["proto"])?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_fds(fds)?;
    Ok(())
}
