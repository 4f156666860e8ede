//! The Docker side of setup: a running dockerd and the test images, built locally because no
//! image registry is reachable.

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};

use crate::{
    Ctx, cmd,
    services::{log_tail, spawn_daemon},
    setup::{already_present, ok, step},
};

/// How long one `docker version` may take before it counts as "not answering".
const PROBE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long dockerd gets to come up.
const START_TIMEOUT: Duration = Duration::from_secs(60);

/// The test images setup builds when they are missing.
const IMAGES: &[TestImage] = &[TestImage {
    name: "bai-test/busybox:latest",
    what: "FROM scratch + Debian's busybox-static, about 2 MB",
    build: build_busybox,
}];

struct TestImage {
    name: &'static str,
    what: &'static str,
    build: fn(&Ctx, &str) -> Result<()>,
}

/// Asks the engine for its version: `Ok(version)`, or `Err(why not)` when it does not answer.
fn engine_version() -> Result<std::result::Result<String, String>> {
    let probe =
        cmd::probe_timeout(Command::new("docker").args(["version", "--format", "{{.Server.Version}}"]), PROBE_TIMEOUT)
            .context("the docker CLI does not run; it comes with the Debian package docker.io")?;
    Ok(match probe.status {
        Some(status) if status.success() => Ok(probe.stdout),
        Some(status) => Err(format!("{}: {}", cmd::describe(status), probe.stderr)),
        None => Err(format!("no answer within {} s", PROBE_TIMEOUT.as_secs())),
    })
}

pub fn ensure_dockerd(ctx: &Ctx) -> Result<()> {
    step("dockerd", "the Docker engine answers on /var/run/docker.sock");
    if let Ok(version) = engine_version()? {
        println!("    Docker Engine {version}");
        already_present();
        return Ok(());
    }
    let log = ctx.xtask_dir().join("dockerd.log");
    let mut child = spawn_daemon(&mut Command::new("dockerd"), &log)
        .context("starting dockerd failed; it comes with the Debian package docker.io (`apt-get install docker.io`)")?;
    let deadline = Instant::now() + START_TIMEOUT;
    loop {
        let answer = engine_version()?;
        if let Ok(version) = &answer {
            println!(
                "    Docker Engine {version} (dockerd pid {}, log {}; it keeps running)",
                child.id(),
                log.display()
            );
            ok();
            return Ok(());
        }
        if let Ok(Some(status)) = child.try_wait() {
            bail!(
                "dockerd exited ({}) before it answered; last lines of {}:\n{}\n\
                 Fix what the log says (a stale /var/run/docker.pid from a dead dockerd can be \
                 removed), then run setup again",
                cmd::describe(status),
                log.display(),
                log_tail(&log, 20)
            );
        }
        if Instant::now() >= deadline {
            bail!(
                "dockerd (pid {}) did not answer `docker version` within {} s (last answer: {}); \
                 it is still running. Last lines of {}:\n{}",
                child.id(),
                START_TIMEOUT.as_secs(),
                answer.err().unwrap_or_default(),
                log.display(),
                log_tail(&log, 20)
            );
        }
        thread::sleep(Duration::from_millis(500));
    }
}

pub fn ensure_images(ctx: &Ctx) -> Result<()> {
    for image in IMAGES {
        step("image", &format!("{} ({})", image.name, image.what));
        if cmd::probe(Command::new("docker").args(["image", "inspect", image.name])) {
            already_present();
            continue;
        }
        (image.build)(ctx, image.name).with_context(|| format!("building the test image {} failed", image.name))?;
        cmd::run(Command::new("docker").args([
            "run",
            "--rm",
            "--network",
            "none",
            image.name,
            "/bin/sh",
            "-c",
            "true",
        ]))
        .with_context(|| format!("the freshly built test image {} does not run", image.name))?;
        ok();
    }
    Ok(())
}

/// A scratch directory for a docker build context, removed when dropped.
struct BuildContext(PathBuf);

impl BuildContext {
    fn new(name: &str) -> Result<Self> {
        let dir = std::env::temp_dir().join(format!("bai-xtask-{name}-{}", std::process::id()));
        if dir.exists() {
            fs::remove_dir_all(&dir).with_context(|| format!("removing {}", dir.display()))?;
        }
        fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        Ok(Self(dir))
    }

    fn add(&self, from: &Path, name: &str) -> Result<()> {
        let to = self.0.join(name);
        fs::copy(from, &to).with_context(|| format!("copying {} to {}", from.display(), to.display()))?;
        Ok(())
    }
}

impl Drop for BuildContext {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

fn build_busybox(ctx: &Ctx, name: &str) -> Result<()> {
    let busybox = ["/bin/busybox", "/usr/bin/busybox"]
        .into_iter()
        .map(Path::new)
        .find(|path| path.is_file())
        .context("/bin/busybox is missing; reinstall it with `apt-get install --reinstall busybox-static`")?;
    let context = BuildContext::new("busybox")?;
    context.add(&ctx.workspace.join("config/images/busybox/Dockerfile"), "Dockerfile")?;
    context.add(busybox, "busybox")?;
    cmd::run(Command::new("docker").args(["build", "-t", name]).arg(&context.0).env("DOCKER_BUILDKIT", "0"))
}
