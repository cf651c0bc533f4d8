//! Generates the cohort.v1 messages and services into OUT_DIR with a vendored protoc.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    // tonic-prost-build runs protoc from PROTOC; the vendored binary means no system protoc.
    std::env::set_var("PROTOC", protoc);
    // Blob chunk payloads as `Bytes`: decoding then slices the received buffer instead of copying
    // every megabyte once more.
    tonic_prost_build::configure().bytes(".cohort.v1.BlobChunk.data").compile_protos(&["cohort/v1/cohort.proto"], &["."])?;
    println!("cargo:rerun-if-changed=cohort/v1/cohort.proto");
    Ok(())
}
