//! tch links libtorch's shared libraries but emits no rpath: give the libtorch worker,
//! and only it, an rpath to the libtorch it was built against (LIBTORCH, set by
//! .cargo/config.toml), so that it starts without LD_LIBRARY_PATH. `cachemoney` itself
//! does not link libtorch (see stages/neural).
fn main() {
    println!("cargo:rerun-if-env-changed=LIBTORCH");
    // Without the `gpt` feature there is no worker, and nothing links libtorch.
    if std::env::var_os("CARGO_FEATURE_GPT").is_none() {
        return;
    }
    if let Ok(libtorch) = std::env::var("LIBTORCH") {
        let lib = std::path::Path::new(&libtorch).join("lib");
        let lib = lib.canonicalize().unwrap_or(lib);
        println!(
            "cargo:rustc-link-arg-bin=cachemoney-gpt=-Wl,-rpath,{}",
            lib.display()
        );
    }
}
