//! tch links libtorch's shared libraries but emits no rpath, so a binary built against
//! the project's `.venv` would not start without LD_LIBRARY_PATH. This crate's tests get
//! an rpath to the libtorch that tch was built with (LIBTORCH, set by
//! .cargo/config.toml); the root package's build.rs does the same for the worker binary.
fn main() {
    println!("cargo:rerun-if-env-changed=LIBTORCH");
    if let Ok(libtorch) = std::env::var("LIBTORCH") {
        let lib = std::path::Path::new(&libtorch).join("lib");
        let lib = lib.canonicalize().unwrap_or(lib);
        println!("cargo:rustc-link-arg=-Wl,-rpath,{}", lib.display());
    }
}
