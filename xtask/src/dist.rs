//! `cargo xtask dist`: the operator's packages of a node.
//!
//! Builds the agent's binaries (`cargo build -p bai-agent --bins`, release unless `--profile`
//! says otherwise) and the static kernel runner (always release, for
//! x86_64-unknown-linux-musl, as setup builds it), copies them without their debug info, and
//! writes under the output directory (default `target/dist/`):
//!
//! - `bai-agent-{version}-{arch}.tar.gz`: `bin/`, `etc/backend.ai/agent.toml` (the annotated
//!   sample), `systemd/`, `sysctl.d/`, `limits.d/`, `prometheus/`, `README` and
//!   `DEPLOYMENT.md`, all under one directory `bai-agent-{version}-{arch}/`;
//! - `bai-agent_{version}_{debarch}.deb`, built by `dpkg-deb --build --root-owner-group` from a
//!   staged tree (see [`DEB_FILES`]).

use std::{
    fs,
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    process::Command,
    time::Instant,
};

use anyhow::{Context, Result, bail};

use crate::{
    Ctx, cmd,
    cmd::{ok, step},
    krunner::{KRUNNER_INSTALL_PATH, MUSL_TARGET, check_static_elf},
};

/// The package's name (Debian package and archive prefix).
pub const PACKAGE: &str = "bai-agent";
/// The agent's binaries, from `cargo build -p bai-agent --bins`.
pub const AGENT_BINS: &[&str] = &["bai-agent", "bai-agentctl", "bai-watcher"];
const KRUNNER_PACKAGE: &str = "kernel-runner";
const KRUNNER_BIN: &str = "bai-krunner";

/// A file of the packages: where it comes from in the workspace, where the .deb installs it
/// (absolute), where the archive holds it (relative to its top directory), its mode, and
/// whether it is a conffile.
struct PackagedFile {
    source: Source,
    deb: &'static str,
    tar: &'static str,
    mode: u32,
    conffile: bool,
}

enum Source {
    /// A path relative to the workspace root.
    Workspace(&'static str),
    /// A built binary (stripped copy), by name.
    Binary(&'static str),
}

/// Everything both packages carry. The runner goes where the agent looks for it by default
/// (`[kernel-runner] path`, [`KRUNNER_INSTALL_PATH`]), so a config without `path` works too.
const DEB_FILES: &[PackagedFile] = &[
    PackagedFile {
        source: Source::Binary("bai-agent"),
        deb: "/usr/bin/bai-agent",
        tar: "bin/bai-agent",
        mode: 0o755,
        conffile: false,
    },
    PackagedFile {
        source: Source::Binary("bai-agentctl"),
        deb: "/usr/bin/bai-agentctl",
        tar: "bin/bai-agentctl",
        mode: 0o755,
        conffile: false,
    },
    PackagedFile {
        source: Source::Binary("bai-watcher"),
        deb: "/usr/bin/bai-watcher",
        tar: "bin/bai-watcher",
        mode: 0o755,
        conffile: false,
    },
    PackagedFile {
        source: Source::Binary(KRUNNER_BIN),
        deb: KRUNNER_INSTALL_PATH,
        tar: "bin/bai-krunner",
        mode: 0o755,
        conffile: false,
    },
    PackagedFile {
        source: Source::Workspace("config/agent.sample.toml"),
        deb: "/etc/backend.ai/agent.toml",
        tar: "etc/backend.ai/agent.toml",
        mode: 0o644,
        conffile: true,
    },
    PackagedFile {
        source: Source::Workspace("config/systemd/backendai-agent.service"),
        deb: "/lib/systemd/system/backendai-agent.service",
        tar: "systemd/backendai-agent.service",
        mode: 0o644,
        conffile: false,
    },
    PackagedFile {
        source: Source::Workspace("config/systemd/backendai-watcher.service"),
        deb: "/lib/systemd/system/backendai-watcher.service",
        tar: "systemd/backendai-watcher.service",
        mode: 0o644,
        conffile: false,
    },
    PackagedFile {
        source: Source::Workspace("config/sysctl/60-bai-agent.conf"),
        deb: "/usr/lib/sysctl.d/60-bai-agent.conf",
        tar: "sysctl.d/60-bai-agent.conf",
        mode: 0o644,
        conffile: false,
    },
    PackagedFile {
        source: Source::Workspace("config/limits/60-bai-agent.conf"),
        deb: "/etc/security/limits.d/60-bai-agent.conf",
        tar: "limits.d/60-bai-agent.conf",
        mode: 0o644,
        conffile: true,
    },
    PackagedFile {
        source: Source::Workspace("config/prometheus/bai-agent.rules.yml"),
        deb: "/usr/share/bai-agent/prometheus/bai-agent.rules.yml",
        tar: "prometheus/bai-agent.rules.yml",
        mode: 0o644,
        conffile: false,
    },
    PackagedFile {
        source: Source::Workspace("docs/DEPLOYMENT.md"),
        deb: "/usr/share/doc/bai-agent/DEPLOYMENT.md",
        tar: "DEPLOYMENT.md",
        mode: 0o644,
        conffile: false,
    },
    PackagedFile {
        source: Source::Workspace("docs/WATCHER.md"),
        deb: "/usr/share/doc/bai-agent/WATCHER.md",
        tar: "WATCHER.md",
        mode: 0o644,
        conffile: false,
    },
];

/// Options of `cargo xtask dist`.
pub struct DistOptions {
    /// Cargo profile of the agent's binaries: `release` (default) or `dev` (faster to build; what
    /// the package test uses).
    pub profile: String,
    /// Where the packages go (default `target/dist`).
    pub out_dir: Option<PathBuf>,
}

/// `x86_64` → `amd64` and so on: Debian's name for the machine.
pub fn debian_arch(arch: &str) -> Result<&'static str> {
    Ok(match arch {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => bail!("no Debian architecture is known here for {other}"),
    })
}

/// Cargo's output directory name of a profile.
fn profile_dir(profile: &str) -> &str {
    match profile {
        "dev" | "test" => "debug",
        "bench" => "release",
        other => other,
    }
}

pub fn dist(ctx: &Ctx, options: &DistOptions) -> Result<()> {
    let started = Instant::now();
    let version = env!("CARGO_PKG_VERSION");
    let arch = std::env::consts::ARCH;
    let debarch = debian_arch(arch)?;
    if format!("{arch}-unknown-linux-musl") != MUSL_TARGET {
        bail!("the kernel runner is built for {MUSL_TARGET}; packages for {arch} are not supported");
    }
    for tool in ["dpkg-deb", "strip", "tar"] {
        if !cmd::probe(Command::new(tool).arg("--version")) {
            bail!("`{tool}` does not run; dist needs it (Debian packages dpkg, binutils, tar)");
        }
    }
    let out_dir = options.out_dir.clone().unwrap_or_else(|| ctx.target_dir().join("dist"));
    let profile = options.profile.as_str();

    step("build", &format!("{} ({profile})", AGENT_BINS.join(", ")));
    cmd::run(&mut ctx.cargo(&["build", "--profile", profile, "-p", PACKAGE, "--bins"]))
        .context("building the agent's binaries failed")?;
    step("build", &format!("{KRUNNER_BIN} (release, static, {MUSL_TARGET})"));
    cmd::run(&mut ctx.cargo(&["build", "--release", "-p", KRUNNER_PACKAGE, "--target", MUSL_TARGET])).with_context(
        || format!("building {KRUNNER_BIN} failed; the {MUSL_TARGET} target comes with `cargo xtask setup`"),
    )?;

    // Staging, one per run (two runs at once, e.g. a release dist and the package test, do
    // not share it); removed at the end.
    let work = ctx.target_dir().join("dist-work").join(std::process::id().to_string());
    remove_dir_if_present(&work)?;
    fs::create_dir_all(&out_dir).with_context(|| format!("creating {}", out_dir.display()))?;

    step("strip", "copies of the binaries without debug info");
    let bins_dir = work.join("bin");
    fs::create_dir_all(&bins_dir).with_context(|| format!("creating {}", bins_dir.display()))?;
    let built = ctx.target_dir().join(profile_dir(profile));
    for bin in AGENT_BINS {
        strip_copy(&built.join(bin), &bins_dir.join(bin))?;
    }
    let krunner = bins_dir.join(KRUNNER_BIN);
    strip_copy(&ctx.target_dir().join(MUSL_TARGET).join("release").join(KRUNNER_BIN), &krunner)?;
    check_static_elf(&fs::read(&krunner).with_context(|| format!("reading {}", krunner.display()))?)
        .with_context(|| format!("{} is not static after strip", krunner.display()))?;
    ok();

    let source_of = |file: &PackagedFile| match file.source {
        Source::Workspace(path) => ctx.workspace.join(path),
        Source::Binary(name) => bins_dir.join(name),
    };

    let top = format!("{PACKAGE}-{version}-{arch}");
    let tarball = out_dir.join(format!("{top}.tar.gz"));
    step("tar", &tarball.display().to_string());
    let tar_root = work.join("tar").join(&top);
    for file in DEB_FILES {
        place(&source_of(file), &tar_root.join(file.tar), file.mode)?;
    }
    write_file(&tar_root.join("README"), &tar_readme(version, arch), 0o644)?;
    cmd::run(
        Command::new("tar")
            .arg("-C")
            .arg(work.join("tar"))
            .args(["--sort=name", "--owner=0", "--group=0", "--numeric-owner", "-czf"])
            .arg(&tarball)
            .arg(&top),
    )?;
    ok();

    let deb = out_dir.join(format!("{PACKAGE}_{version}_{debarch}.deb"));
    step("deb", &deb.display().to_string());
    let deb_root = work.join("deb");
    let mut installed_bytes: u64 = 0;
    for file in DEB_FILES {
        let dest = deb_root.join(file.deb.trim_start_matches('/'));
        place(&source_of(file), &dest, file.mode)?;
        installed_bytes += fs::metadata(&dest).with_context(|| format!("reading {}", dest.display()))?.len();
    }
    let control_dir = deb_root.join("DEBIAN");
    write_file(&control_dir.join("control"), &control(version, debarch, installed_bytes.div_ceil(1024)), 0o644)?;
    let conffiles: String = DEB_FILES.iter().filter(|f| f.conffile).map(|f| format!("{}\n", f.deb)).collect();
    write_file(&control_dir.join("conffiles"), &conffiles, 0o644)?;
    write_file(&control_dir.join("postinst"), POSTINST, 0o755)?;
    write_file(&control_dir.join("prerm"), PRERM, 0o755)?;
    write_file(&control_dir.join("postrm"), POSTRM, 0o755)?;
    // xz as Debian's own packages; gzip -1 for a dev build, whose binaries are large and
    // which is built to be tested, not shipped.
    let compression: &[&str] = if profile == "release" { &["-Zxz"] } else { &["-Zgzip", "-z1"] };
    cmd::run(
        Command::new("dpkg-deb").arg("--build").arg("--root-owner-group").args(compression).arg(&deb_root).arg(&deb),
    )?;
    ok();

    remove_dir_if_present(&work)?;
    for artifact in [&tarball, &deb] {
        let size = fs::metadata(artifact).with_context(|| format!("reading {}", artifact.display()))?.len();
        println!("{} ({:.1} MiB)", artifact.display(), size as f64 / 1048576.0);
    }
    println!("dist took {:.1} s", started.elapsed().as_secs_f64());
    Ok(())
}

fn remove_dir_if_present(dir: &Path) -> Result<()> {
    match fs::remove_dir_all(dir) {
        Err(err) if err.kind() != std::io::ErrorKind::NotFound => {
            Err(err).with_context(|| format!("removing {}", dir.display()))
        }
        _ => Ok(()),
    }
}

/// `strip --strip-debug` into `dest`: symbols stay (panics and profilers still name functions),
/// DWARF goes (a release build carries line tables, `debug = 1`, a dev build all of it).
fn strip_copy(built: &Path, dest: &Path) -> Result<()> {
    if !built.is_file() {
        bail!("{} is missing after its build", built.display());
    }
    cmd::output(Command::new("strip").arg("--strip-debug").arg("-o").arg(dest).arg(built))?;
    Ok(())
}

/// Copies `source` to `dest` (creating its directories) with `mode`.
fn place(source: &Path, dest: &Path, mode: u32) -> Result<()> {
    if let Some(dir) = dest.parent() {
        fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    fs::copy(source, dest).with_context(|| format!("copying {} to {}", source.display(), dest.display()))?;
    fs::set_permissions(dest, fs::Permissions::from_mode(mode))
        .with_context(|| format!("setting mode {mode:o} on {}", dest.display()))
}

fn write_file(path: &Path, text: &str, mode: u32) -> Result<()> {
    if let Some(dir) = path.parent() {
        fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    fs::write(path, text).with_context(|| format!("writing {}", path.display()))?;
    fs::set_permissions(path, fs::Permissions::from_mode(mode))
        .with_context(|| format!("setting mode {mode:o} on {}", path.display()))
}

/// `DEBIAN/control`.
pub fn control(version: &str, debarch: &str, installed_kib: u64) -> String {
    format!(
        "Package: {PACKAGE}\n\
         Version: {version}\n\
         Architecture: {debarch}\n\
         Maintainer: bai-agent developers <bai-agent@localhost>\n\
         Installed-Size: {installed_kib}\n\
         Depends: docker.io | docker-ce, iproute2\n\
         Section: admin\n\
         Priority: optional\n\
         Description: Backend.AI-compatible node agent with eBPF accounting\n \
         bai-agent runs Backend.AI kernels as Docker containers and accounts for each with\n \
         eBPF (CPU time, network and block I/O), served as Prometheus metrics.\n \
         .\n \
         This package holds bai-agent, bai-agentctl, bai-watcher, the static in-container\n \
         kernel runner bai-krunner, the systemd units backendai-agent.service and\n \
         backendai-watcher.service (not enabled), /etc/backend.ai/agent.toml, and sysctl\n \
         and limits settings for an agent node.\n"
    )
}

/// Reloads systemd's units, only where systemd runs (a container or chroot has none), and
/// applies the package's sysctl settings there. The units are not enabled or started: the
/// agent needs its configuration (etcd, Redis, the manager) first.
const POSTINST: &str = r#"#!/bin/sh
set -e
if [ "$1" = "configure" ] && [ -d /run/systemd/system ]; then
    systemctl daemon-reload || true
    /lib/systemd/systemd-sysctl /usr/lib/sysctl.d/60-bai-agent.conf || true
fi
exit 0
"#;

/// Stops the services before their binaries go (removal only, not upgrades).
const PRERM: &str = r#"#!/bin/sh
set -e
if [ "$1" = "remove" ] && [ -d /run/systemd/system ]; then
    systemctl stop backendai-watcher.service backendai-agent.service || true
fi
exit 0
"#;

const POSTRM: &str = r#"#!/bin/sh
set -e
if [ -d /run/systemd/system ]; then
    systemctl daemon-reload || true
fi
exit 0
"#;

fn tar_readme(version: &str, arch: &str) -> String {
    format!(
        "bai-agent {version} for {arch}: a Backend.AI-compatible node agent.\n\
         \n\
         bin/bai-agent, bin/bai-agentctl, bin/bai-watcher  -> /usr/bin/\n\
         bin/bai-krunner (static, runs inside kernels)       -> {KRUNNER_INSTALL_PATH}\n\
         etc/backend.ai/agent.toml (every key, annotated)    -> /etc/backend.ai/agent.toml\n\
         systemd/*.service                                   -> /etc/systemd/system/\n\
         sysctl.d/60-bai-agent.conf                          -> /etc/sysctl.d/ (then `sysctl --system`)\n\
         limits.d/60-bai-agent.conf                          -> /etc/security/limits.d/\n\
         prometheus/bai-agent.rules.yml                      Prometheus alert rules\n\
         \n\
         Then: systemctl daemon-reload && systemctl enable --now backendai-agent backendai-watcher\n\
         On Debian and Ubuntu the .deb of the same release does all of this: dpkg -i bai-agent_*.deb\n\
         See DEPLOYMENT.md.\n"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_packaged_file_exists_in_the_workspace() -> Result<()> {
        let ctx = Ctx::new("/opt/bai-agent/bpf-linker".into())?;
        for file in DEB_FILES {
            if let Source::Workspace(path) = file.source {
                assert!(ctx.workspace.join(path).is_file(), "{path} is missing");
            }
            assert!(file.deb.starts_with('/'), "{}", file.deb);
            assert!(!file.tar.starts_with('/'), "{}", file.tar);
            // Debian policy: every file the package puts in /etc is a conffile.
            assert_eq!(file.conffile, file.deb.starts_with("/etc/"), "{}", file.deb);
        }
        Ok(())
    }

    #[test]
    fn the_runner_goes_where_the_agent_looks_for_it() -> Result<()> {
        let ctx = Ctx::new("/opt/bai-agent/bpf-linker".into())?;
        let sample = fs::read_to_string(ctx.workspace.join("config/agent.sample.toml"))?;
        assert!(sample.contains(&format!("path = \"{KRUNNER_INSTALL_PATH}\"")), "the sample config's runner path");
        assert!(DEB_FILES.iter().any(|f| f.deb == KRUNNER_INSTALL_PATH));
        Ok(())
    }

    #[test]
    fn control_is_well_formed() {
        let text = control("1.2.3", "amd64", 42);
        assert!(text.ends_with('\n') && !text.contains("\n\n"), "{text}");
        for line in text.lines() {
            // A field, or a continuation line of the description (leading space).
            assert!(line.starts_with(' ') || line.contains(": "), "{line:?}");
            assert!(line != " " && !line.ends_with(' '), "{line:?}");
        }
        assert!(text.contains("\nDepends: docker.io | docker-ce, iproute2\n"));
        assert!(text.contains("\nInstalled-Size: 42\n"));
        assert_eq!(debian_arch("x86_64").unwrap(), "amd64");
        assert_eq!(profile_dir("dev"), "debug");
        assert_eq!(profile_dir("release"), "release");
    }
}
