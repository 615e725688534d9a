//! Links Debian's libspandsp dynamically (LGPL-2.1: never a static copy).
fn main() {
    println!("cargo:rustc-link-lib=dylib=spandsp");
    println!("cargo:rerun-if-changed=build.rs");
}
