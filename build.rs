//! Release builds of the `taskd` binary on x86_64 Linux lay out the functions a serving
//! daemon runs next to each other (lld's `--symbol-ordering-file`, from the list in
//! build/hot-functions.txt that `bench/hot_functions.py` writes), and pack the binary's
//! relative relocations (`-z pack-relative-relocs`). The kernel maps a program's code a
//! folio or 64 KiB at a time around each page it runs, so the few MiB of functions a daemon
//! runs, scattered across 16 MB of code, kept most of it mapped; gathered, they fill about
//! 4 MiB. The packed relocations leave ld.so 8 KB to read at start-up instead of 650 KB.
//! See docs/performance.md, "The daemon's code in memory".
//!
//! The names in the list carry hashes of the compiler and of the dependencies' versions, so
//! the list is used only with the compiler that made it (its first line, `rustc -vV`), which
//! links with lld on this target; packed relocations need glibc 2.36 where the binary runs,
//! so they are used only for a native build on such a system. Any other build is laid out
//! as before: same code, same behaviour, only where the functions sit in the file differs.

use std::env;
use std::path::PathBuf;
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=build/hot-functions.txt");
    println!("cargo:rerun-if-env-changed=RUSTC_LINKER");
    if let Some(order) = ordering() {
        println!(
            "cargo:rustc-link-arg-bins=-Wl,--symbol-ordering-file={}",
            order.display()
        );
        // Names of the list this build does not have (a feature left out) are not an error.
        println!("cargo:rustc-link-arg-bins=-Wl,--no-warn-symbol-ordering");
        if native_glibc_at_least(2, 36) {
            println!("cargo:rustc-link-arg-bins=-Wl,-z,pack-relative-relocs");
        }
    }
}

/// The ordering file for this build (the list without its first line, in OUT_DIR), or None
/// when the list does not apply to it.
fn ordering() -> Option<PathBuf> {
    if env::var("PROFILE").ok()? != "release"
        || env::var("TARGET").ok()? != "x86_64-unknown-linux-gnu"
        || env::var_os("RUSTC_LINKER").is_some()
    {
        return None;
    }
    // A linker of one's own (`-C linker=…`, `-fuse-ld=…`) may not take these options.
    let flags = env::var("CARGO_ENCODED_RUSTFLAGS").unwrap_or_default();
    if flags.contains("linker") || flags.contains("fuse-ld") {
        return None;
    }
    let list = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR")?).join("build/hot-functions.txt");
    let text = std::fs::read_to_string(list).ok()?;
    let (made_by, names) = text.split_once('\n')?;
    let version = Command::new(env::var_os("RUSTC")?)
        .arg("-vV")
        .output()
        .ok()?;
    if String::from_utf8_lossy(&version.stdout).lines().next()? != made_by.trim() {
        return None;
    }
    let out = PathBuf::from(env::var_os("OUT_DIR")?).join("hot-functions.order");
    std::fs::write(&out, names).ok()?;
    Some(out)
}

/// Whether this is a native build on a system whose glibc is at least `major.minor`
/// (`getconf GNU_LIBC_VERSION`, e.g. "glibc 2.36").
fn native_glibc_at_least(major: u32, minor: u32) -> bool {
    if env::var("HOST").ok() != env::var("TARGET").ok() {
        return false;
    }
    let Ok(out) = Command::new("getconf").arg("GNU_LIBC_VERSION").output() else {
        return false;
    };
    let text = String::from_utf8_lossy(&out.stdout);
    let Some(version) = text.trim().strip_prefix("glibc ") else {
        return false;
    };
    let mut parts = version.split('.').map(|p| p.parse::<u32>().unwrap_or(0));
    let found = (parts.next().unwrap_or(0), parts.next().unwrap_or(0));
    found >= (major, minor)
}
