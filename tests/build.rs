// The test binaries link libtorch too: same rpath and CUDA linking as the worker's binaries.
include!("../worker/build.rs");
