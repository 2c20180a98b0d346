//! Generates the hive.v1 gRPC code from `proto/hive/v1/hive.proto`.
//! Needs `protoc` on PATH (Debian: protobuf-compiler) or `PROTOC` set.
fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto/hive/v1/hive.proto");
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .compile_protos(&["proto/hive/v1/hive.proto"], &["proto"])?;
    Ok(())
}
