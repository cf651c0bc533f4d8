// Embeds libtorch's folder as the binaries' rpath so that they run with no environment set, and
// keeps libtorch_cuda linked (rustc links with --as-needed, which would drop it because no symbol
// of it is referenced; without it the CUDA backend never registers).

fn main() {
    // torch-sys announces where it found libtorch through its `links = "tch"` metadata.
    let Ok(lib_dir) = std::env::var("DEP_TCH_LIBTORCH_LIB") else {
        return;
    };
    println!("cargo:rustc-link-arg=-Wl,-rpath,{lib_dir}");
    // NCCL is loaded at run time (cudarc's dynamic loading) from the wheel's nvidia/nccl/lib.
    let nccl_dir = std::path::Path::new(&lib_dir).join("../../nvidia/nccl/lib");
    if nccl_dir.is_dir() {
        println!("cargo:rustc-link-arg=-Wl,-rpath,{}", nccl_dir.display());
    }
    if std::path::Path::new(&lib_dir).join("libtorch_cuda.so").exists() {
        println!("cargo:rustc-link-arg=-Wl,--no-as-needed,-ltorch_cuda,--as-needed");
    }
}
