//! Builds the built-in guest image from `guest/src` with the same `rustc` that builds the VMM,
//! for the host target (no extra rustup target), linked by binutils' `ld` at `abi::IMAGE_GPA`.
//! The image is embedded in the `vmm` binary (see `src/builtin.rs`).

use std::path::PathBuf;
use std::process::Command;

fn main() {
    let manifest = PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").expect("cargo sets it"));
    let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets it"));
    let rustc = std::env::var_os("RUSTC").unwrap_or_else(|| "rustc".into());
    let guest = manifest.join("guest");
    let script = guest.join("guest.ld");
    let image = out.join("vmm-guest.elf");
    println!("cargo:rerun-if-changed={}", guest.join("src").display());
    println!("cargo:rerun-if-changed={}", script.display());

    let status = Command::new(rustc)
        .args([
            "--edition",
            "2021",
            "--crate-type",
            "bin",
            "--crate-name",
            "vmm_guest_image",
        ])
        .args(["--cfg", "guest_bin"])
        .args([
            "-C",
            "opt-level=3",
            "-C",
            "panic=abort",
            "-C",
            "debuginfo=0",
        ])
        .args(["-C", "relocation-model=static", "-C", "code-model=small"])
        // Link with binutils' ld directly: no C runtime, no libc, a static image at a fixed address.
        .args(["-C", "linker=ld", "-C", "linker-flavor=ld"])
        .arg("-C")
        .arg(format!("link-arg=-T{}", script.display()))
        .args(["-C", "link-arg=--build-id=none", "-C", "link-arg=-static"])
        .args([
            "-C",
            "link-arg=--no-dynamic-linker",
            "-C",
            "link-arg=-nostdlib",
        ])
        .arg("-o")
        .arg(&image)
        .arg(guest.join("src/lib.rs"))
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .status()
        .expect("cannot run rustc to build the built-in guest");
    assert!(status.success(), "building the built-in guest failed");
}
