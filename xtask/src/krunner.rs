//! The in-container kernel runner `bai-krunner` (crate `kernel-runner`): built static for
//! x86_64-unknown-linux-musl, so it runs in any image (busybox, Debian, Alpine, ...), and
//! installed where the agent reads it by default (`[container] krunner-path`).

use std::{
    fs::{self, File, Permissions},
    io::{ErrorKind, Write},
    os::unix::fs::PermissionsExt,
    path::Path,
    process::Command,
};

use anyhow::{Context, Result, bail};

use crate::{
    Ctx, cmd,
    cmd::{already_present, ok, step},
};

/// Where setup installs the runner; the agent's default `[container] krunner-path`.
pub const KRUNNER_INSTALL_PATH: &str = "/opt/bai-agent/bin/bai-krunner";

/// The target the runner is built for: static, no libc needed in the image.
pub const MUSL_TARGET: &str = "x86_64-unknown-linux-musl";

const KRUNNER_PACKAGE: &str = "kernel-runner";
const KRUNNER_BIN: &str = "bai-krunner";

/// Builds the runner (cargo does nothing when it is fresh), checks that it is a static
/// executable, and installs it at [`KRUNNER_INSTALL_PATH`] when the installed one differs.
pub fn ensure_krunner(ctx: &Ctx) -> Result<()> {
    step("krunner", &format!("{KRUNNER_BIN} (static, {MUSL_TARGET}) installed at {KRUNNER_INSTALL_PATH}"));
    musl_target()?;
    cmd::run(&mut ctx.cargo(&["build", "--release", "-p", KRUNNER_PACKAGE, "--target", MUSL_TARGET])).with_context(
        || {
            format!(
                "building {KRUNNER_BIN} for {MUSL_TARGET} failed; fix the build error above (try \
                 `cargo build --release -p {KRUNNER_PACKAGE} --target {MUSL_TARGET}` by hand), then \
                 run setup again"
            )
        },
    )?;
    let built = ctx.target_dir().join(MUSL_TARGET).join("release").join(KRUNNER_BIN);
    let bytes =
        fs::read(&built).with_context(|| format!("the build succeeded but {} cannot be read", built.display()))?;
    check_static_elf(&bytes).with_context(|| {
        format!(
            "{} is not a static executable, so it would not run inside images without its libc; \
             it must be built for {MUSL_TARGET} without a dynamic loader (check the crate's \
             build flags and .cargo/config.toml for `-C target-feature=-crt-static`)",
            built.display()
        )
    })?;
    let changed = install(&bytes, Path::new(KRUNNER_INSTALL_PATH)).with_context(|| {
        format!("installing {} to {KRUNNER_INSTALL_PATH} failed (setup needs root)", built.display())
    })?;
    if changed {
        println!("    installed {} ({} bytes) at {KRUNNER_INSTALL_PATH}", built.display(), bytes.len());
        ok();
    } else {
        already_present();
    }
    Ok(())
}

/// Makes sure the musl target's standard library is installed for the toolchain that builds
/// the workspace (the one `cargo xtask` runs under: rustup passes it down in RUSTUP_TOOLCHAIN).
fn musl_target() -> Result<()> {
    let active = cmd::output(Command::new("rustup").args(["show", "active-toolchain"]))
        .context("cannot ask rustup for the active toolchain; install rustup from https://rustup.rs")?;
    let toolchain = active.split_whitespace().next().context("`rustup show active-toolchain` printed nothing")?;
    let installed =
        cmd::output(Command::new("rustup").args(["target", "list", "--installed", "--toolchain", toolchain]))
            .with_context(|| format!("cannot list the targets of the toolchain {toolchain}"))?;
    if installed.lines().any(|line| line.trim() == MUSL_TARGET) {
        println!("    target {MUSL_TARGET} is installed for {toolchain}");
        return Ok(());
    }
    cmd::run(Command::new("rustup").args(["target", "add", "--toolchain", toolchain, MUSL_TARGET])).with_context(
        || {
            format!(
                "adding the target {MUSL_TARGET} to {toolchain} failed; check that static.rust-lang.org is reachable"
            )
        },
    )?;
    Ok(())
}

/// Writes `bytes` to `dest` with mode 0755 unless it already holds them: a temporary file in
/// the same directory, then a rename, so a reader (a container starting) never sees half a
/// file, and a runner bind-mounted into a running container keeps its old inode.
/// Returns whether it changed anything.
fn install(bytes: &[u8], dest: &Path) -> Result<bool> {
    let dir = dest.parent().with_context(|| format!("{} has no parent directory", dest.display()))?;
    match fs::read(dest) {
        Ok(existing) if existing == bytes => {
            let mode = fs::metadata(dest).with_context(|| format!("reading {}", dest.display()))?.permissions().mode();
            if mode & 0o7777 == 0o755 {
                return Ok(false);
            }
            fs::set_permissions(dest, Permissions::from_mode(0o755))
                .with_context(|| format!("setting mode 0755 on {}", dest.display()))?;
            return Ok(true);
        }
        Ok(_) => {}
        Err(err) if err.kind() == ErrorKind::NotFound => {}
        Err(err) => return Err(err).with_context(|| format!("reading {}", dest.display())),
    }
    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let name = dest.file_name().with_context(|| format!("{} has no file name", dest.display()))?;
    let tmp = dir.join(format!(".{}.tmp-{}", name.to_string_lossy(), std::process::id()));
    let written = (|| -> Result<()> {
        let mut file = File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
        file.write_all(bytes).with_context(|| format!("writing {}", tmp.display()))?;
        file.set_permissions(Permissions::from_mode(0o755))
            .with_context(|| format!("setting mode 0755 on {}", tmp.display()))?;
        file.sync_all().with_context(|| format!("syncing {}", tmp.display()))?;
        fs::rename(&tmp, dest).with_context(|| format!("renaming {} to {}", tmp.display(), dest.display()))
    })();
    if written.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    written?;
    Ok(true)
}

const PT_INTERP: u32 = 3;
const ET_EXEC: u16 = 2;
const ET_DYN: u16 = 3;

/// Accepts an ELF executable without a PT_INTERP program header (static, or static-pie as
/// Rust's musl target links by default); refuses anything else, saying why.
pub fn check_static_elf(bytes: &[u8]) -> Result<()> {
    if bytes.len() < 16 || &bytes[..4] != b"\x7fELF" {
        bail!("not an ELF file (no \\x7fELF magic)");
    }
    let wide = match bytes[4] {
        1 => false,
        2 => true,
        class => bail!("unknown ELF class {class}"),
    };
    let little = match bytes[5] {
        1 => true,
        2 => false,
        data => bail!("unknown ELF data encoding {data}"),
    };
    let field = |offset: usize, len: usize| -> Result<u64> {
        let raw = bytes
            .get(offset..offset + len)
            .with_context(|| format!("truncated ELF file: {} bytes, a field at {offset} needs {len}", bytes.len()))?;
        let mut value: u64 = 0;
        for i in 0..len {
            let byte = if little { raw[len - 1 - i] } else { raw[i] };
            value = (value << 8) | u64::from(byte);
        }
        Ok(value)
    };
    let e_type = field(16, 2)? as u16;
    if e_type != ET_EXEC && e_type != ET_DYN {
        bail!("ELF type {e_type} is not an executable (2 or 3)");
    }
    let (phoff, phentsize, phnum) = if wide {
        (field(0x20, 8)?, field(0x36, 2)?, field(0x38, 2)?)
    } else {
        (field(0x1c, 4)?, field(0x2a, 2)?, field(0x2c, 2)?)
    };
    if phnum == 0xffff {
        bail!("more than 65534 program headers (PN_XNUM) is not supported here");
    }
    let min_entsize = if wide { 56 } else { 32 };
    if phnum > 0 && phentsize < min_entsize {
        bail!("program header entries of {phentsize} bytes are too small (at least {min_entsize})");
    }
    if phnum == 0 {
        bail!("no program headers: not a loadable executable");
    }
    let table_end = phnum.checked_mul(phentsize).and_then(|size| size.checked_add(phoff));
    if table_end.is_none_or(|end| end > bytes.len() as u64) {
        bail!("truncated ELF file: {} bytes, the program headers need {phnum} × {phentsize} at {phoff}", bytes.len());
    }
    for i in 0..phnum {
        let entry = usize::try_from(phoff + i * phentsize).context("program header offset out of range")?;
        let p_type = field(entry, 4)? as u32;
        if p_type == PT_INTERP {
            let (offset, size) = if wide {
                (field(entry + 8, 8)?, field(entry + 32, 8)?)
            } else {
                (field(entry + 4, 4)?, field(entry + 16, 4)?)
            };
            let interpreter = usize::try_from(offset)
                .ok()
                .zip(usize::try_from(size).ok())
                .and_then(|(offset, size)| bytes.get(offset..offset.checked_add(size)?))
                .map(|raw| String::from_utf8_lossy(raw).trim_end_matches('\0').to_owned())
                .unwrap_or_else(|| "?".to_owned());
            bail!("dynamically linked: it has a PT_INTERP program header (interpreter {interpreter})");
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A minimal little-endian ELF64 executable: header, then one program header per type,
    /// then the interpreter path (what a PT_INTERP entry points at).
    fn elf64(program_headers: &[u32]) -> Vec<u8> {
        let interp = b"/lib/ld-musl-x86_64.so.1\0";
        let phoff = 64u64;
        let interp_offset = phoff + 56 * program_headers.len() as u64;
        let mut out = vec![0u8; 64];
        out[..4].copy_from_slice(b"\x7fELF");
        out[4] = 2; // ELFCLASS64
        out[5] = 1; // ELFDATA2LSB
        out[6] = 1; // EV_CURRENT
        out[16..18].copy_from_slice(&ET_DYN.to_le_bytes());
        out[18..20].copy_from_slice(&62u16.to_le_bytes()); // EM_X86_64
        out[0x20..0x28].copy_from_slice(&phoff.to_le_bytes());
        out[0x34..0x36].copy_from_slice(&64u16.to_le_bytes());
        out[0x36..0x38].copy_from_slice(&56u16.to_le_bytes());
        out[0x38..0x3a].copy_from_slice(&(program_headers.len() as u16).to_le_bytes());
        for &p_type in program_headers {
            let mut ph = [0u8; 56];
            ph[..4].copy_from_slice(&p_type.to_le_bytes());
            if p_type == PT_INTERP {
                ph[8..16].copy_from_slice(&interp_offset.to_le_bytes());
                ph[32..40].copy_from_slice(&(interp.len() as u64).to_le_bytes());
            }
            out.extend_from_slice(&ph);
        }
        out.extend_from_slice(interp);
        out
    }

    #[test]
    fn static_elf_is_accepted_and_dynamic_refused() {
        const PT_LOAD: u32 = 1;
        const PT_DYNAMIC: u32 = 2;
        // static-pie: PT_DYNAMIC for self-relocation, but no interpreter.
        check_static_elf(&elf64(&[PT_LOAD, PT_DYNAMIC])).unwrap();
        let err = check_static_elf(&elf64(&[PT_LOAD, PT_INTERP, PT_DYNAMIC])).unwrap_err().to_string();
        assert!(err.contains("PT_INTERP") && err.contains("/lib/ld-musl-x86_64.so.1"), "{err}");
    }

    #[test]
    fn non_elf_and_truncated_files_are_refused() {
        let err = check_static_elf(b"#!/bin/sh\necho hi\n").unwrap_err().to_string();
        assert!(err.contains("not an ELF file"), "{err}");
        let err = check_static_elf(&elf64(&[1])[..70]).unwrap_err().to_string();
        assert!(err.contains("truncated"), "{err}");
        let mut object = elf64(&[1]);
        object[16] = 1; // ET_REL
        assert!(check_static_elf(&object).is_err());
    }

    #[test]
    fn host_binaries_busybox_static_ls_dynamic() {
        // Debian's busybox-static is static; coreutils' ls is dynamic. Skipped where absent.
        if let Ok(bytes) = fs::read("/bin/busybox") {
            check_static_elf(&bytes).unwrap();
        }
        if let Ok(bytes) = fs::read("/bin/ls") {
            let err = check_static_elf(&bytes).unwrap_err().to_string();
            assert!(err.contains("PT_INTERP"), "{err}");
        }
    }

    #[test]
    fn install_writes_once_then_leaves_it() -> Result<()> {
        let dir = std::env::temp_dir().join(format!("bai-xtask-install-{}", std::process::id()));
        let dest = dir.join("bin/runner");
        assert!(install(b"one", &dest)?);
        assert_eq!(fs::read(&dest)?, b"one");
        assert_eq!(fs::metadata(&dest)?.permissions().mode() & 0o7777, 0o755);
        assert!(!install(b"one", &dest)?);
        assert!(install(b"two", &dest)?);
        assert_eq!(fs::read(&dest)?, b"two");
        let leftovers: Vec<_> = fs::read_dir(dest.parent().unwrap())?.collect();
        assert_eq!(leftovers.len(), 1, "a temporary file is left: {leftovers:?}");
        fs::remove_dir_all(&dir)?;
        Ok(())
    }
}
