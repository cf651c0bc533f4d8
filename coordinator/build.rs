// Embeds libtorch's folder as the binary's rpath (as the worker's build.rs does), so that
// `coordinator generate`, which samples a generator with libtorch on the CPU, runs with no
// environment set.

fn main() {
    // torch-sys announces where it found libtorch through its `links = "tch"` metadata.
    let Ok(lib_dir) = std::env::var("DEP_TCH_LIBTORCH_LIB") else {
        return;
    };
    println!("cargo:rustc-link-arg=-Wl,-rpath,{lib_dir}");
}
