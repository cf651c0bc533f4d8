//! Generates the cohort.v1 messages and services into OUT_DIR with a vendored protoc.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    // tonic-prost-build runs protoc from PROTOC; the vendored binary means no system protoc.
    std::env::set_var("PROTOC", protoc);
    tonic_prost_build::configure().compile_protos(&["cohort/v1/cohort.proto"], &["."])?;
    println!("cargo:rerun-if-changed=cohort/v1/cohort.proto");
    Ok(())
}
