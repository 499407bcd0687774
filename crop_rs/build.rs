//! Compiles the small C layer over libjpeg (see csrc/jpeg_shim.c).
//!
//! The libjpeg-turbo it calls comes from the `turbojpeg-sys` dependency: by
//! default a static build of the libjpeg-turbo 3.x sources that crate ships
//! (needs cmake and nasm), so pixels match the libjpeg-turbo 3.x Pillow
//! bundles. The static TurboJPEG library carries the whole libjpeg API.
//! `TURBOJPEG_SOURCE=pkg-config` (or `explicit` with `TURBOJPEG_LIB_DIR` and
//! `TURBOJPEG_INCLUDE_DIR`) links another build instead.

use std::env;

fn main() {
    println!("cargo:rerun-if-changed=csrc/jpeg_shim.c");
    let mut build = cc::Build::new();
    build.file("csrc/jpeg_shim.c").warnings(true).opt_level(2);
    // Headers (jpeglib.h, jconfig.h) of the library turbojpeg-sys links.
    if let Ok(paths) = env::var("DEP_TURBOJPEG_INCLUDE") {
        for path in paths.split(',').filter(|p| !p.is_empty()) {
            build.include(path);
        }
    }
    build.compile("spacer_jpeg_shim");
}
