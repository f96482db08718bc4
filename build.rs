//! Compiles the contract under `proto/` into Rust (tonic + prost) without a system `protoc`:
//! protox parses the files in pure Rust, and the encoded descriptor set is written next to the
//! generated code so the server can offer it through gRPC reflection.

use std::{env, fs, path::PathBuf};

use prost::Message;

const PROTO_FILES: &[&str] = &[
    "messaging/v1/resources.proto",
    "messaging/v1/messaging.proto",
    "messaging/v1/file_relay.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    let out_dir = PathBuf::from(env::var("OUT_DIR")?);

    // Source info is kept so `grpcurl describe` shows the contract's comments.
    let descriptors = protox::compile(PROTO_FILES, ["proto"])?;
    fs::write(
        out_dir.join("messaging_v1_descriptor.bin"),
        descriptors.encode_to_vec(),
    )?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        // Payload bytes stay reference-counted from the wire to the blob store: no copies.
        .bytes(".messaging.v1.UploadFileRequest.chunk")
        .bytes(".messaging.v1.DownloadFileResponse.chunk")
        .compile_fds(descriptors)?;
    Ok(())
}
