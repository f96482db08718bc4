//! Generates the client stubs from the service's contract (`../proto`), in pure Rust (protox):
//! no system `protoc`.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=../proto");
    let descriptors = protox::compile(
        [
            "messaging/v1/resources.proto",
            "messaging/v1/messaging.proto",
            "messaging/v1/file_relay.proto",
        ],
        ["../proto"],
    )?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(false)
        .bytes(".messaging.v1.UploadFileRequest.chunk")
        .bytes(".messaging.v1.DownloadFileResponse.chunk")
        .compile_fds(descriptors)?;
    Ok(())
}
