//! Builds the kernel programs (`node-agent-ebpf/programs`) for `bpfel-unknown-none` and puts the
//! object in OUT_DIR, where `src/ebpf.rs` embeds it.
//!
//! The chain (installed by `make setup`): the stable toolchain's `rust-src` with
//! `RUSTC_BOOTSTRAP=1` for `-Z build-std=core`, and `bpf-linker` built against LLVM 22 (the
//! LLVM of rustc 1.95), found on PATH or in `$RUNWARDEN_CACHE/tools/bin`.

use std::env;
use std::path::{Path, PathBuf};
use std::process::Command;

fn main() {
    let manifest = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").unwrap());
    let ebpf = manifest.parent().unwrap().join("node-agent-ebpf");
    let programs = ebpf.join("programs");
    for watched in [programs.join("src"), programs.join("Cargo.toml"), programs.join("Cargo.lock"), ebpf.join("common")]
    {
        println!("cargo::rerun-if-changed={}", watched.display());
    }
    println!("cargo::rerun-if-env-changed=RUNWARDEN_CACHE");
    println!("cargo::rerun-if-env-changed=RUNWARDEN_BPF_LINKER_DIR");

    let out = PathBuf::from(env::var_os("OUT_DIR").unwrap());
    // <target>/<profile>/build/<crate>-<hash>/out → <target>/bpf, shared by every profile and
    // by check/clippy/test builds so the programs are compiled once.
    let target_dir = out.ancestors().nth(4).map(|t| t.join("bpf")).unwrap_or_else(|| out.join("bpf"));

    let mut path = env::var_os("PATH").unwrap_or_default();
    if let Some(dir) = linker_dir() {
        let mut dirs = vec![dir];
        dirs.extend(env::split_paths(&path));
        path = env::join_paths(dirs).unwrap();
    }

    let cargo = env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(cargo);
    // This build runs inside another cargo's: drop what that one set for its own target
    // (rustflags, clippy's wrapper, the target dir, package variables); keep registry settings.
    for (key, _) in env::vars_os() {
        let key = key.to_string_lossy();
        let keep = ["CARGO_HOME", "CARGO_NET_", "CARGO_HTTP_", "CARGO_REGISTRIES_", "CARGO_REGISTRY_"];
        let ours = key.starts_with("CARGO_") && !keep.iter().any(|k| key.starts_with(k));
        if ours || key.starts_with("RUSTC") || key == "RUSTFLAGS" || key == "RUSTDOCFLAGS" {
            cmd.env_remove(key.as_ref());
        }
    }
    cmd.current_dir(&programs)
        .env("PATH", path)
        .env("RUSTC_BOOTSTRAP", "1")
        .args(["build", "--release", "--locked", "--target", "bpfel-unknown-none", "-Z", "build-std=core"])
        .arg("--target-dir")
        .arg(&target_dir);
    let status = cmd.status().unwrap_or_else(|e| panic!("running cargo for the kernel programs: {e}"));
    if !status.success() {
        panic!(
            "building the kernel programs in {} failed (see above). They need `rustup component add rust-src` and \
             bpf-linker built against LLVM 22: run `make setup`.",
            programs.display()
        );
    }
    println!("cargo::rustc-env=RUNWARDEN_MAPS_LAYOUT={}", maps_layout(&ebpf));
    let object = target_dir.join("bpfel-unknown-none/release/runwarden");
    std::fs::copy(&object, out.join("runwarden.bpf.o")).unwrap_or_else(|e| panic!("copying {}: {e}", object.display()));
}

/// A hash (FNV-1a, hex) of what fixes the layout of the maps the agent pins: the shared types
/// and constants (all of `common`), and the programs' map definitions (`#[map]` statics).
fn maps_layout(ebpf: &Path) -> String {
    let common = std::fs::read_to_string(ebpf.join("common/src/lib.rs")).expect("reading common/src/lib.rs");
    let programs = std::fs::read_to_string(ebpf.join("programs/src/main.rs")).expect("reading programs/src/main.rs");
    let definitions: Vec<&str> = programs.lines().filter(|l| l.starts_with("static ")).collect();
    let text = format!("{common}\n{}", definitions.join("\n"));
    let hash = text.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3));
    format!("{hash:016x}")
}

/// Where `make setup` installs bpf-linker, if it is there.
fn linker_dir() -> Option<PathBuf> {
    if let Some(dir) = env::var_os("RUNWARDEN_BPF_LINKER_DIR") {
        return Some(dir.into());
    }
    let cache = env::var_os("RUNWARDEN_CACHE")
        .map(PathBuf::from)
        .or_else(|| env::var_os("HOME").map(|h| Path::new(&h).join(".cache/runwarden")))?;
    let dir = cache.join("tools/bin");
    dir.join("bpf-linker").exists().then_some(dir)
}
