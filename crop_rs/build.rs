//! Compiles the small C layer over libjpeg (see csrc/jpeg_shim.c) and links
//! libjpeg-turbo, the JPEG decoder Pillow bundles, so pixels match Pillow's.
//!
//! By default the system library is used (Debian: `libjpeg62-turbo-dev`).
//! Set `SPACER_LIBJPEG_DIR` to a prefix with `include/` and `lib/` to use
//! another libjpeg-turbo build, and `SPACER_LIBJPEG_STATIC=1` to link it statically.

use std::env;
use std::path::PathBuf;

fn main() {
    println!("cargo:rerun-if-changed=csrc/jpeg_shim.c");
    println!("cargo:rerun-if-env-changed=SPACER_LIBJPEG_DIR");
    println!("cargo:rerun-if-env-changed=SPACER_LIBJPEG_STATIC");

    let mut build = cc::Build::new();
    build.file("csrc/jpeg_shim.c").warnings(true).opt_level(2);
    if let Ok(prefix) = env::var("SPACER_LIBJPEG_DIR") {
        let prefix = PathBuf::from(prefix);
        build.include(prefix.join("include"));
        for lib in ["lib", "lib64"] {
            println!("cargo:rustc-link-search=native={}", prefix.join(lib).display());
        }
    }
    build.compile("spacer_jpeg_shim");

    let kind = if env::var("SPACER_LIBJPEG_STATIC").map(|v| v == "1").unwrap_or(false) {
        "static"
    } else {
        "dylib"
    };
    println!("cargo:rustc-link-lib={kind}=jpeg");
}
