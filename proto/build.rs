//! Generates the hive.v1 gRPC code from `hive/v1/*.proto` (one file per service, shared
//! messages in `common.proto`; all one package, so the generated module is `hive_proto::v1`),
//! and writes the file descriptor set the control plane's reflection service serves.
//! Needs `protoc` on PATH (Debian: protobuf-compiler) or `PROTOC` set.
use std::path::PathBuf;

const PROTOS: [&str; 5] = [
    "hive/v1/common.proto",
    "hive/v1/control.proto",
    "hive/v1/box.proto",
    "hive/v1/cell.proto",
    "hive/v1/connector.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    for p in PROTOS {
        println!("cargo:rerun-if-changed={p}");
    }
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .file_descriptor_set_path(out.join("hive_v1_descriptor.bin"))
        .compile_protos(&PROTOS, &["."])?;
    Ok(())
}
