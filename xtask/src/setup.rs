//! `cargo xtask setup`: makes a fresh machine ready to build, run and test the agent
//! (Debian packages, nightly Rust with rust-src, bpf-linker, tracefs, the static kernel runner,
//! dockerd, test images).
//! Every step checks first and changes nothing that is already in place.

use std::{
    fs,
    io::ErrorKind,
    os::unix::fs::symlink,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, Result, bail};

use crate::{
    Ctx, backendai, cmd,
    cmd::{already_present, ok, step},
    docker, krunner,
};

/// Debian packages the project needs on the machine (tools, test services, image building).
pub const DEBIAN_PACKAGES: &[&str] = &[
    "docker.io",
    "busybox-static",
    "protobuf-compiler",
    // protoc's own includes (google/protobuf/*.proto), which etcd-client's build imports;
    // only a Recommends of protobuf-compiler, so --no-install-recommends leaves it out.
    "libprotobuf-dev",
    "bpftool",
    "redis-server",
    "etcd-server",
    "etcd-client",
    "prometheus",
    "debootstrap",
    "python3-zmq",
    "iproute2",
    "procps",
    // A local registry for the image pull tests, on 127.0.0.1.
    "docker-registry",
    // The Backend.AI manager's database and the end-to-end stack's probes.
    "postgresql",
    "curl",
    // systemd-analyze, with which tests/dist.rs verifies the packaged units (config/systemd/).
    // Installing it starts nothing: on a machine or container without systemd running it only
    // adds the files.
    "systemd",
    // A terminal for `bai-agentctl top`'s test (tests/agentctl.rs drives it with send-keys).
    "tmux",
];

/// The LLVM inside the nightly toolchain that bpf-linker links against:
/// `<sysroot>/lib/libLLVM.so.22.1-rust-<version>-nightly`.
const LLVM_LIB_PREFIX: &str = "libLLVM.so.22.1-rust-";
const LLVM_LIB_SUFFIX: &str = "-nightly";
const BPF_LINKER_FEATURE: &str = "llvm-22";

const TRACEFS: &str = "/sys/kernel/tracing";

/// Python packages of the RPC compatibility test (`tests/python/callosum_client.py`): the
/// real callosum with its ZeroMQ and snappy extras, pinned; and aiodocker, with which the
/// accounting benchmark's Python baselines poll Docker as the Python agent does.
pub const PYTHON_PACKAGES: &[&str] =
    &["callosum==1.0.3", "pyzmq==27.2.0", "python-snappy==0.7.3", "msgpack==1.2.4", "aiodocker==0.24.0"];
/// What the test and the benchmark import; setup installs [`PYTHON_PACKAGES`] when this fails.
const PYTHON_IMPORT_CHECK: &str = "import callosum, zmq, snappy, msgpack, aiodocker";

pub fn setup(ctx: &Ctx) -> Result<()> {
    step("root", "setup runs as root");
    require_root()?;
    ok();
    packages().context(
        "installing Debian packages failed; check that the Debian mirror is reachable \
         (`apt-get update`) and that dpkg is not half-configured (`dpkg --configure -a`)",
    )?;
    nightly()?;
    bpf_linker(&ctx.bpf_linker_root)?;
    tracefs()?;
    krunner::ensure_krunner(ctx)?;
    docker::ensure_dockerd(ctx)?;
    python_packages()?;
    backendai::backendai_venv()?;
    // After the venv: the ipykernel image takes its wheels with the venv's pip.
    docker::ensure_images(ctx)?;
    println!("setup complete");
    Ok(())
}

fn require_root() -> Result<()> {
    // SAFETY: geteuid(2) cannot fail and touches no memory.
    if unsafe { libc::geteuid() } != 0 {
        bail!(
            "setup needs root: it installs packages, starts dockerd and loads eBPF; run as root \
             (e.g. `sudo -E cargo xtask setup`)"
        );
    }
    Ok(())
}

fn package_installed(name: &str) -> bool {
    cmd::output(Command::new("dpkg-query").args(["-W", "-f=${Status}", name]))
        .is_ok_and(|status| status.contains("install ok installed"))
}

fn packages() -> Result<()> {
    step("packages", &format!("Debian packages: {}", DEBIAN_PACKAGES.join(" ")));
    let missing: Vec<&str> = DEBIAN_PACKAGES.iter().copied().filter(|name| !package_installed(name)).collect();
    if missing.is_empty() {
        already_present();
        return Ok(());
    }
    println!("    missing: {}", missing.join(" "));
    cmd::run(Command::new("apt-get").arg("update"))?;
    cmd::run(
        Command::new("apt-get")
            .args(["install", "-y", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )?;
    let still_missing: Vec<&str> = missing.into_iter().filter(|name| !package_installed(name)).collect();
    if !still_missing.is_empty() {
        bail!("apt-get reported success but these packages are not installed: {}", still_missing.join(" "));
    }
    ok();
    Ok(())
}

fn nightly() -> Result<()> {
    step("rust", "nightly toolchain with rust-src (for the eBPF build)");
    let toolchains = cmd::output(Command::new("rustup").args(["toolchain", "list"])).context(
        "cannot list Rust toolchains; install rustup from https://rustup.rs and make sure \
         `rustup` is on PATH",
    )?;
    // `nightly-<host>` is what `+nightly` picks; dated nightlies (`nightly-2025-01-01-<host>`) are not.
    let has_nightly = toolchains.lines().any(|line| {
        let name = line.split_whitespace().next().unwrap_or_default();
        name == "nightly"
            || name.strip_prefix("nightly-").is_some_and(|rest| !rest.starts_with(|c: char| c.is_ascii_digit()))
    });
    if !has_nightly {
        bail!(
            "no nightly Rust toolchain is installed (the eBPF programs need one); install it with \
             `rustup toolchain install nightly`, then run setup again"
        );
    }
    let version = cmd::output(
        Command::new("rustc")
            .args(["+nightly", "--version"])
            .env("RUSTUP_AUTO_INSTALL", "0"),
    )
    .context("the nightly toolchain is listed but `rustc +nightly` does not run; reinstall it with `rustup toolchain install nightly`")?;
    println!("    {version}");
    let components = cmd::output(Command::new("rustup").args(["+nightly", "component", "list", "--installed"]))?;
    if components.lines().any(|line| line.trim().starts_with("rust-src")) {
        already_present();
        return Ok(());
    }
    cmd::run(Command::new("rustup").args(["+nightly", "component", "add", "rust-src"]))
        .context("adding rust-src to the nightly toolchain failed")?;
    ok();
    Ok(())
}

/// The nightly toolchain's own LLVM library, which bpf-linker is built against.
fn nightly_llvm() -> Result<PathBuf> {
    let sysroot = cmd::output(Command::new("rustc").args(["+nightly", "--print", "sysroot"]))?;
    let lib = Path::new(&sysroot).join("lib");
    let entries = fs::read_dir(&lib).with_context(|| format!("listing {}", lib.display()))?;
    let mut found: Vec<PathBuf> = Vec::new();
    for entry in entries {
        let entry = entry.with_context(|| format!("listing {}", lib.display()))?;
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if name.starts_with(LLVM_LIB_PREFIX) && name.ends_with(LLVM_LIB_SUFFIX) {
            found.push(entry.path());
        }
    }
    found.sort();
    match found.pop() {
        Some(path) => Ok(path),
        None => bail!(
            "no {LLVM_LIB_PREFIX}*{LLVM_LIB_SUFFIX} in {}: bpf-linker is built against the LLVM 22 \
             inside the nightly toolchain, and this nightly ships a different LLVM (or none). \
             Update this step (and the `{BPF_LINKER_FEATURE}` feature) to the LLVM it ships, or \
             install a nightly with LLVM 22",
            lib.display()
        ),
    }
}

/// Makes `link` a symlink to `target`, replacing a symlink that points elsewhere.
/// Returns whether it changed anything.
fn ensure_symlink(target: &Path, link: &Path) -> Result<bool> {
    match fs::read_link(link) {
        Ok(existing) if existing == target => return Ok(false),
        Ok(_) => fs::remove_file(link).with_context(|| format!("removing {}", link.display()))?,
        Err(err) if err.kind() == ErrorKind::NotFound => {}
        Err(err) => {
            return Err(err).with_context(|| {
                format!(
                    "{} exists and is not a symlink; move it away so setup can link it to {}",
                    link.display(),
                    target.display()
                )
            });
        }
    }
    symlink(target, link).with_context(|| format!("linking {} -> {}", link.display(), target.display()))?;
    println!("    linked {} -> {}", link.display(), target.display());
    Ok(true)
}

fn bpf_linker(root: &Path) -> Result<()> {
    step("bpf-linker", &format!("bpf-linker in {} (linked against the nightly's LLVM)", root.display()));
    let fix = || {
        format!(
            "installing bpf-linker into {} failed; it needs the nightly toolchain's LLVM 22 and a \
             C/C++ toolchain (Debian `build-essential`); set BAI_BPF_LINKER_ROOT to install it \
             elsewhere",
            root.display()
        )
    };
    let lib_dir = root.join("lib");
    fs::create_dir_all(&lib_dir).with_context(|| format!("creating {}", lib_dir.display())).with_context(fix)?;
    let llvm = nightly_llvm().with_context(fix)?;
    let file_name = llvm.file_name().context("the LLVM library path has no file name")?;
    // `libLLVM.so` is what the build (LLVM_PREFIX) looks for; the full soname is the binary's
    // NEEDED entry, found at run time through its rpath to <root>/lib.
    ensure_symlink(&llvm, &lib_dir.join("libLLVM.so")).with_context(fix)?;
    ensure_symlink(&llvm, &lib_dir.join(file_name)).with_context(fix)?;

    let bin = root.join("bin").join("bpf-linker");
    if let Ok(version) = cmd::output(Command::new(&bin).arg("--version")) {
        println!("    {version}");
        already_present();
        return Ok(());
    }
    cmd::run(
        Command::new("cargo")
            .arg("install")
            .arg("--root")
            .arg(root)
            .args(["bpf-linker", "--no-default-features", "--features", BPF_LINKER_FEATURE])
            .env("LLVM_PREFIX", root),
    )
    .with_context(fix)?;
    let version = cmd::output(Command::new(&bin).arg("--version"))
        .with_context(|| format!("the freshly installed {} does not run", bin.display()))
        .with_context(fix)?;
    println!("    {version}");
    ok();
    Ok(())
}

fn tracefs() -> Result<()> {
    step("tracefs", &format!("tracefs mounted at {TRACEFS} (classic tracepoint programs need it)"));
    if Path::new(TRACEFS).join("events").exists() {
        already_present();
        return Ok(());
    }
    cmd::run(Command::new("mount").args(["-t", "tracefs", "nodev", TRACEFS])).with_context(|| {
        format!(
            "mounting tracefs at {TRACEFS} failed; the kernel needs CONFIG_TRACING and setup \
                 needs CAP_SYS_ADMIN (in a container: --privileged)"
        )
    })?;
    ok();
    Ok(())
}

/// Installs the callosum test's Python packages for the `python3` on PATH, the one the
/// test runs (it may be a pyenv or venv interpreter rather than Debian's /usr/bin/python3).
fn python_packages() -> Result<()> {
    step("python", &format!("Python packages for the callosum test and the baselines: {}", PYTHON_PACKAGES.join(" ")));
    let interpreter = cmd::output(Command::new("python3").args(["-c", "import sys; print(sys.executable)"]))
        .context("`python3` is not on PATH; the RPC compatibility test runs it (Debian: apt-get install python3)")?;
    println!("    python3 is {interpreter}");
    if cmd::probe(Command::new("python3").args(["-c", PYTHON_IMPORT_CHECK])) {
        already_present();
        return Ok(());
    }
    if !cmd::probe(Command::new("python3").args(["-m", "pip", "--version"])) {
        if interpreter.starts_with("/usr/") {
            cmd::run(
                Command::new("apt-get")
                    .args(["install", "-y", "--no-install-recommends", "python3-pip"])
                    .env("DEBIAN_FRONTEND", "noninteractive"),
            )
            .context("installing python3-pip failed")?;
        } else {
            bail!("{interpreter} has no pip; install pip for it (`{interpreter} -m ensurepip`) and run setup again");
        }
    }
    let mut install = Command::new("python3");
    install.args(["-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--root-user-action=ignore"]);
    // Debian marks its own interpreter externally managed (PEP 668); these pinned test
    // packages go into it regardless, as root would with apt.
    let externally_managed = cmd::probe(Command::new("python3").args([
        "-c",
        "import os, sys, sysconfig; \
         sys.exit(0 if os.path.exists(os.path.join(sysconfig.get_path('stdlib'), 'EXTERNALLY-MANAGED')) else 1)",
    ]));
    if externally_managed {
        install.arg("--break-system-packages");
    }
    cmd::run(install.args(PYTHON_PACKAGES)).with_context(|| {
        format!("pip could not install {}; check that PyPI is reachable", PYTHON_PACKAGES.join(" "))
    })?;
    if !cmd::probe(Command::new("python3").args(["-c", PYTHON_IMPORT_CHECK])) {
        bail!("pip reported success but `python3 -c \"{PYTHON_IMPORT_CHECK}\"` still fails");
    }
    ok();
    Ok(())
}
