//! Backend.AI's own Python packages for the tests: a venv of the release whose wire formats
//! bai-agent is checked against, and the unpacked `backend.ai-install` wheel (the manager's
//! configuration templates and fixtures).

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, Result, bail};

use crate::{
    cmd,
    cmd::{already_present, ok, step},
};

/// The Backend.AI release whose wire formats the tests check bai-agent against.
pub const BACKENDAI_VERSION: &str = "26.9.6";
/// A venv of Backend.AI's own Python packages at [`BACKENDAI_VERSION`], kept across runs on
/// one machine: `backend.ai-common` (the tests validate what the agent sends with Backend.AI's
/// own models), `backend.ai-manager` and `backend.ai-client`, which the end-to-end tests
/// run as the control plane and the user's CLI, and `backend.ai-agent` (with its kernel runner
/// `backend.ai-krunner-static-gnu`), the Python agent that `bench-backendai` measures
/// bai-agent against.
pub const BACKENDAI_VENV: &str = "/opt/bai-agent/backendai-26.9.6";
/// The unpacked `backend.ai-install` wheel: the manager's configuration templates and fixtures.
pub const BACKENDAI_INSTALL: &str = "/opt/bai-agent/backendai-install-26.9.6";
/// The packages of the venv.
const BACKENDAI_PACKAGES: [&str; 4] =
    ["backend.ai-common", "backend.ai-manager", "backend.ai-client", "backend.ai-agent"];
/// What the venv must import.
const BACKENDAI_IMPORT_CHECK: &str = "import ai.backend.common.events.event_types.agent.anycast, \
    ai.backend.common.events.event_types.kernel.anycast, ai.backend.common.message_queue.payload, \
    ai.backend.manager.server, ai.backend.client.cli.main, ai.backend.agent.server, ai.backend.krunner.static_gnu";

/// The Python interpreter of [`BACKENDAI_VENV`].
pub fn backendai_python() -> PathBuf {
    Path::new(BACKENDAI_VENV).join("bin/python")
}

/// Creates [`BACKENDAI_VENV`] with Python 3.13 (what the 26.9 wheels require: pyenv's, or
/// `python3.13` on PATH) and installs [`BACKENDAI_PACKAGES`] into it; unpacks the
/// `backend.ai-install` wheel into [`BACKENDAI_INSTALL`].
pub fn backendai_venv() -> Result<()> {
    let packages: Vec<String> = BACKENDAI_PACKAGES.iter().map(|p| format!("{p}=={BACKENDAI_VERSION}")).collect();
    step("backend.ai", &format!("a Python 3.13 venv with {} in {BACKENDAI_VENV}", packages.join(" ")));
    let python = backendai_python();
    if cmd::probe(Command::new(&python).args(["-c", BACKENDAI_IMPORT_CHECK])) {
        already_present();
    } else {
        if !python.exists() {
            let interpreter = python313().context(
                "no Python 3.13 found (Backend.AI 26.9 needs >=3.13,<3.14): looked in `pyenv root`/versions/3.13* and \
                 for python3.13 on PATH; install one (e.g. `pyenv install 3.13`) and run setup again",
            )?;
            println!("    Python 3.13 is {}", interpreter.display());
            let _ = std::fs::remove_dir_all(BACKENDAI_VENV);
            cmd::run(Command::new(&interpreter).args(["-m", "venv", BACKENDAI_VENV]))
                .context("creating the venv failed")?;
        }
        cmd::run(
            Command::new(&python)
                .args(["-m", "pip", "install", "--quiet", "--disable-pip-version-check"])
                .args(&packages),
        )
        .with_context(|| format!("pip could not install {}; check that PyPI is reachable", packages.join(" ")))?;
        if !cmd::probe(Command::new(&python).args(["-c", BACKENDAI_IMPORT_CHECK])) {
            bail!("pip reported success but `{} -c \"{BACKENDAI_IMPORT_CHECK}\"` still fails", python.display());
        }
        ok();
    }
    backendai_install(&python)
}

/// Downloads the `backend.ai-install` wheel (not installed: only its configuration templates
/// and fixtures are used) and unpacks it into [`BACKENDAI_INSTALL`].
fn backendai_install(python: &Path) -> Result<()> {
    step(
        "backend.ai",
        &format!("backend.ai-install=={BACKENDAI_VERSION}'s templates and fixtures in {BACKENDAI_INSTALL}"),
    );
    let install = Path::new(BACKENDAI_INSTALL);
    let marker = install.join("ai/backend/install/configs/manager.toml");
    if marker.exists() {
        already_present();
        return Ok(());
    }
    let download = PathBuf::from(format!("{BACKENDAI_INSTALL}.download"));
    let _ = std::fs::remove_dir_all(&download);
    cmd::run(
        Command::new(python)
            .args(["-m", "pip", "download", "--quiet", "--disable-pip-version-check", "--no-deps", "-d"])
            .arg(&download)
            .arg(format!("backend.ai-install=={BACKENDAI_VERSION}")),
    )
    .context("pip could not download backend.ai-install; check that PyPI is reachable")?;
    let wheel = std::fs::read_dir(&download)?
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .find(|path| path.extension().is_some_and(|ext| ext == "whl"))
        .with_context(|| format!("no wheel in {}", download.display()))?;
    let _ = std::fs::remove_dir_all(install);
    cmd::run(Command::new(python).args(["-m", "zipfile", "-e"]).arg(&wheel).arg(install))?;
    let _ = std::fs::remove_dir_all(&download);
    if !marker.exists() {
        bail!("{} has no {}", wheel.display(), marker.display());
    }
    ok();
    Ok(())
}

/// A Python 3.13 interpreter: pyenv's newest 3.13 (`pyenv root`, else `$PYENV_ROOT` or
/// `~/.pyenv` when pyenv is not on PATH), else `python3.13` on PATH.
fn python313() -> Option<PathBuf> {
    let pyenv_root = cmd::output(Command::new("pyenv").arg("root"))
        .ok()
        .or_else(|| std::env::var("PYENV_ROOT").ok())
        .or_else(|| std::env::var("HOME").ok().map(|home| format!("{home}/.pyenv")));
    let from_pyenv = pyenv_root.and_then(|root| {
        let mut versions: Vec<PathBuf> = std::fs::read_dir(Path::new(root.trim()).join("versions"))
            .ok()?
            .filter_map(|entry| entry.ok().map(|e| e.path()))
            .filter(|path| path.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with("3.13")))
            .map(|path| path.join("bin/python3.13"))
            .filter(|python| python.exists())
            .collect();
        versions.sort();
        versions.pop()
    });
    from_pyenv.or_else(|| {
        cmd::output(Command::new("python3.13").args(["-c", "import sys; print(sys.executable)"]))
            .ok()
            .map(|path| PathBuf::from(path.trim()))
    })
}
