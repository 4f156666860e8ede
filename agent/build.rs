//! Builds the eBPF objects (`agent-ebpf`: the counters, `agent-policy`: enforcement) with the nightly toolchain and `bpf-linker`
//! so `cargo build` of the agent embeds programs that match its sources.

use std::{
    env,
    path::{Path, PathBuf},
    process::Command,
};

/// Where `cargo xtask setup` installs `bpf-linker` unless `BPF_LINKER_DIR` says otherwise.
const DEFAULT_BPF_LINKER_DIR: &str = "/opt/bai-agent/bpf-linker/bin";
const BPF_TARGET: &str = "bpfel-unknown-none";

fn main() {
    let manifest_dir = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"));
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    let workspace = manifest_dir.parent().expect("agent/ lives in the workspace");
    let ebpf_dir = workspace.join("agent-ebpf");

    for watched in ["agent-ebpf/src", "agent-ebpf/Cargo.toml", "agent-ebpf/Cargo.lock", "agent-common/src"] {
        println!("cargo:rerun-if-changed={}", workspace.join(watched).display());
    }
    println!("cargo:rerun-if-env-changed=BPF_LINKER_DIR");

    let linker_dir = env::var_os("BPF_LINKER_DIR").map(PathBuf::from).unwrap_or_else(|| DEFAULT_BPF_LINKER_DIR.into());
    let path = prepend_path(&linker_dir);
    let target_dir = out_dir.join("ebpf-target");

    let mut cmd = Command::new("rustup");
    cmd.args(["run", "nightly", "cargo", "build", "--release", "--target", BPF_TARGET, "-Z", "build-std=core"])
        .arg("--manifest-path")
        .arg(ebpf_dir.join("Cargo.toml"))
        .arg("--target-dir")
        .arg(&target_dir)
        .env("PATH", path)
        // BTF in the object lets the kernel describe the maps; debuginfo feeds it.
        .env("CARGO_ENCODED_RUSTFLAGS", "-Cdebuginfo=2\x1f-Clink-arg=--btf");
    // The outer build's compiler settings must not leak into the nightly BPF build.
    for key in [
        "RUSTC",
        "RUSTC_WRAPPER",
        "RUSTC_WORKSPACE_WRAPPER",
        "RUSTFLAGS",
        "RUSTUP_TOOLCHAIN",
        "CARGO_TARGET_DIR",
        "CARGO_BUILD_TARGET",
        "CARGO_MAKEFLAGS",
        "CARGO_ENCODED_RUSTFLAGS",
    ] {
        cmd.env_remove(key);
    }

    let status = match cmd.status() {
        Ok(status) => status,
        Err(err) => {
            panic!("cannot run `rustup run nightly cargo` to build the eBPF programs ({err}); run `cargo xtask setup`")
        }
    };
    if !status.success() {
        panic!(
            "building the eBPF programs failed ({status}); they need the nightly toolchain with rust-src and \
             bpf-linker in {} (or BPF_LINKER_DIR): run `cargo xtask setup`",
            linker_dir.display()
        );
    }

    for name in ["agent-ebpf", "agent-policy"] {
        let object = target_dir.join(BPF_TARGET).join("release").join(name);
        let embedded = out_dir.join(format!("{name}.o"));
        if let Err(err) = std::fs::copy(&object, &embedded) {
            panic!("copying {} to {}: {err}", object.display(), embedded.display());
        }
    }
}

fn prepend_path(dir: &Path) -> std::ffi::OsString {
    let mut paths = vec![dir.to_path_buf()];
    if let Some(existing) = env::var_os("PATH") {
        paths.extend(env::split_paths(&existing));
    }
    env::join_paths(paths).expect("PATH entries contain no separator")
}
