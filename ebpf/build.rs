//! Compiles the XDP program with clang (issue 7: C, not Rust, for the eBPF side) into OUT_DIR.
//!
//! The compiler is `clang-14` (Debian's; override with the `HYPHA_BPF_CLANG` environment
//! variable); libbpf's headers (`libbpf-dev`) provide `bpf_helpers.h`. The C header's
//! `_Static_assert`s pin the map types' layout, so a mismatch with `maps.rs` fails here.

use std::path::PathBuf;
use std::process::Command;

fn main() {
    let src = "src/hypha_xdp.bpf.c";
    println!("cargo:rerun-if-changed={src}");
    println!("cargo:rerun-if-changed=src/maps.h");
    println!("cargo:rerun-if-env-changed=HYPHA_BPF_CLANG");
    let clang = std::env::var("HYPHA_BPF_CLANG").unwrap_or_else(|_| "clang-14".to_owned());
    let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"))
        .join("hypha_xdp.bpf.o");
    let status = Command::new(&clang)
        .args([
            "-target",
            "bpf",
            "-O2",
            "-g",
            "-Wall",
            "-Werror",
            "-I/usr/include/x86_64-linux-gnu",
            "-c",
            src,
            "-o",
        ])
        .arg(&out)
        .status();
    match status {
        Ok(s) if s.success() => {}
        Ok(s) => panic!("{clang} failed to compile {src} ({s}); see the messages above"),
        Err(e) => panic!(
            "cannot run {clang} ({e}): the XDP program needs clang 14 and libbpf headers \
             (apt-get install --no-install-recommends clang-14 libbpf-dev), \
             or set HYPHA_BPF_CLANG to another clang"
        ),
    }
}
