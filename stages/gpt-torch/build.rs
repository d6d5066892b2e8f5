//! tch links libtorch's shared libraries but emits no rpath, so a program built against
//! the project's `.venv` would not start without LD_LIBRARY_PATH. This package is the
//! only one that links libtorch: its worker binary `cachemoney-gpt`, its tests and its
//! examples get an rpath to the libtorch tch was built with (LIBTORCH, set by
//! .cargo/config.toml).
fn main() {
    println!("cargo:rerun-if-env-changed=LIBTORCH");
    if let Ok(libtorch) = std::env::var("LIBTORCH") {
        let lib = std::path::Path::new(&libtorch).join("lib");
        let lib = lib.canonicalize().unwrap_or(lib);
        println!("cargo:rustc-link-arg=-Wl,-rpath,{}", lib.display());
    }
}
