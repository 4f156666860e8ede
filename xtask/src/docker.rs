//! The Docker side of setup: a running dockerd and the test images, built locally because no
//! image registry is reachable.

use std::{
    fs,
    os::unix::ffi::OsStringExt,
    path::{Path, PathBuf},
    process::Command,
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};

use crate::{
    Ctx,
    backendai::backendai_python,
    cmd,
    cmd::{already_present, ok, step},
    services::{log_tail, spawn_daemon},
};

/// How long one `docker version` may take before it counts as "not answering".
const PROBE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long dockerd gets to come up.
const START_TIMEOUT: Duration = Duration::from_secs(60);

/// The label that records a hash of what a test image was built from (see
/// [`TestImage::inputs_hash`]); setup rebuilds the image when it differs.
pub const INPUTS_LABEL: &str = "ai.backend.test-image-inputs";

/// Bump when the build steps in this file change in a way the hashed inputs do not show.
const RECIPE_VERSION: u32 = 2;

/// The test images setup builds when they are missing or were built from other inputs.
const IMAGES: &[TestImage] = &[
    TestImage {
        name: "bai-test/busybox:latest",
        what: "FROM scratch + Debian's busybox-static, about 2 MB",
        dir: "config/images/busybox",
        labels: &[
            ("ai.backend.runtime-type", "shell"),
            ("ai.backend.runtime-path", "/bin/sh"),
            ("ai.backend.service-ports", "http:http:8080"),
        ],
        recipe: Recipe::Dockerfile,
        check: &[
            "/bin/sh",
            "-c",
            "test -s /etc/backend.ai/service-defs/http.json && httpd --help 2>&1 | grep -q httpd",
        ],
    },
    TestImage {
        name: "bai-test/python3:latest",
        what: "Debian bookworm minbase + python3 by debootstrap, about 160 MB",
        dir: "config/images/python3",
        labels: &[
            ("ai.backend.runtime-type", "python"),
            ("ai.backend.runtime-path", "/usr/bin/python3"),
            ("ai.backend.service-ports", "http:http:8080"),
        ],
        recipe: Recipe::Debootstrap { suite: "bookworm", include: &["python3"], cmd: r#"["/bin/sh"]"# },
        check: &[
            "/bin/sh",
            "-c",
            "test -s /etc/backend.ai/service-defs/http.json && /usr/bin/python3 -c 'import http.server'",
        ],
    },
    // After its base, which it is built from.
    TestImage {
        name: "bai-test/python3-ipykernel:latest",
        what: "bai-test/python3 + ipykernel from PyPI wheels: the Python agent's query mode, for bench-backendai",
        dir: "config/images/python3-ipykernel",
        // What the Python agent's libc probe makes of bookworm's glibc 2.36; with the label it
        // runs no probe container.
        labels: &[("ai.backend.base-distro", "ubuntu22.04")],
        recipe: Recipe::Wheels { base: "bai-test/python3:latest", python: "3.11", packages: &["ipykernel==7.4.0"] },
        check: &[
            "/bin/sh",
            "-c",
            "test -s /usr/local/share/jupyter/kernels/python3/kernel.json && /usr/bin/python3 -c 'import ipykernel.kernelapp'",
        ],
    },
];

#[derive(Clone, Copy)]
struct TestImage {
    name: &'static str,
    what: &'static str,
    /// Its build inputs in the workspace: `service-defs/*.json` (copied to
    /// `/etc/backend.ai/service-defs/`) and, for [`Recipe::Dockerfile`], `Dockerfile`; for
    /// [`Recipe::Wheels`], `kernel.json` (and no service definitions of its own).
    dir: &'static str,
    /// Image labels (besides [`INPUTS_LABEL`]).
    labels: &'static [(&'static str, &'static str)],
    recipe: Recipe,
    /// A command the freshly built image must run successfully (`docker run --network none`).
    check: &'static [&'static str],
}

#[derive(Clone, Copy)]
enum Recipe {
    /// `docker build` of `<dir>/Dockerfile` with Debian's static busybox and `service-defs/`
    /// in the context.
    Dockerfile,
    /// `debootstrap --variant=minbase --include=<include> <suite>` from the machine's Debian
    /// mirror, plus `service-defs/`, then `docker import` with the labels and `CMD <cmd>`.
    Debootstrap { suite: &'static str, include: &'static [&'static str], cmd: &'static str },
    /// `FROM <base>` plus Python packages from PyPI wheels for the base's Python: `pip install
    /// --target --only-binary=:all:` for the image's platform and Python version on the host
    /// (nothing is built or fetched inside the image), copied to its
    /// `/usr/local/lib/python<python>/dist-packages/`, and `<dir>/kernel.json` as the Jupyter
    /// kernelspec `python3`.
    Wheels { base: &'static str, python: &'static str, packages: &'static [&'static str] },
}

impl TestImage {
    fn config_dir(&self, ctx: &Ctx) -> PathBuf {
        ctx.workspace.join(self.dir)
    }

    /// `service-defs/*` of the image's config dir as (file name, content), sorted by name; none
    /// for an image built on another (it has its base's).
    fn service_defs(&self, ctx: &Ctx) -> Result<Vec<(String, Vec<u8>)>> {
        if matches!(self.recipe, Recipe::Wheels { .. }) {
            return Ok(Vec::new());
        }
        let dir = self.config_dir(ctx).join("service-defs");
        let mut defs = Vec::new();
        for entry in fs::read_dir(&dir).with_context(|| format!("listing {}", dir.display()))? {
            let entry = entry.with_context(|| format!("listing {}", dir.display()))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if entry.file_type().with_context(|| format!("inspecting {}", entry.path().display()))?.is_file()
                && name.ends_with(".json")
            {
                let content = fs::read(entry.path()).with_context(|| format!("reading {}", entry.path().display()))?;
                defs.push((name, content));
            }
        }
        defs.sort();
        Ok(defs)
    }

    /// A stable hash (FNV-1a 64, hex) of everything the image is built from that the
    /// workspace controls: the name, the labels, the recipe (Dockerfile text; debootstrap
    /// suite, packages and CMD; or the base image and its own inputs label, the Python
    /// version, the packages and `kernel.json`) and the service definitions. Not what is
    /// downloaded.
    fn inputs_hash(&self, ctx: &Ctx) -> Result<String> {
        let mut hash = Fnv1a::new();
        hash.field(b"recipe-version");
        hash.field(RECIPE_VERSION.to_string().as_bytes());
        hash.field(self.name.as_bytes());
        for (key, value) in self.labels {
            hash.field(b"label");
            hash.field(key.as_bytes());
            hash.field(value.as_bytes());
        }
        match &self.recipe {
            Recipe::Dockerfile => {
                let path = self.config_dir(ctx).join("Dockerfile");
                hash.field(b"dockerfile");
                hash.field(&fs::read(&path).with_context(|| format!("reading {}", path.display()))?);
            }
            Recipe::Debootstrap { suite, include, cmd } => {
                hash.field(b"debootstrap minbase");
                hash.field(suite.as_bytes());
                for package in *include {
                    hash.field(package.as_bytes());
                }
                hash.field(cmd.as_bytes());
            }
            Recipe::Wheels { base, python, packages } => {
                hash.field(b"wheels");
                hash.field(base.as_bytes());
                // Rebuilt when its base is.
                hash.field(present_inputs(base).unwrap_or_default().as_bytes());
                hash.field(python.as_bytes());
                for package in *packages {
                    hash.field(package.as_bytes());
                }
                let path = self.config_dir(ctx).join("kernel.json");
                hash.field(b"kernelspec");
                hash.field(&fs::read(&path).with_context(|| format!("reading {}", path.display()))?);
            }
        }
        for (name, content) in self.service_defs(ctx)? {
            hash.field(b"service-def");
            hash.field(name.as_bytes());
            hash.field(&content);
        }
        Ok(format!("{:016x}", hash.finish()))
    }

    /// The labels the image gets: its own and [`INPUTS_LABEL`].
    fn all_labels(&self, inputs: &str) -> Vec<(String, String)> {
        self.labels
            .iter()
            .map(|(key, value)| ((*key).to_owned(), (*value).to_owned()))
            .chain([(INPUTS_LABEL.to_owned(), inputs.to_owned())])
            .collect()
    }
}

/// FNV-1a, 64 bit: small, stable across Rust versions and machines (std's hashers are not).
struct Fnv1a(u64);

impl Fnv1a {
    const OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0000_0100_0000_01b3;

    fn new() -> Self {
        Self(Self::OFFSET)
    }

    fn write(&mut self, bytes: &[u8]) {
        for &byte in bytes {
            self.0 ^= u64::from(byte);
            self.0 = self.0.wrapping_mul(Self::PRIME);
        }
    }

    /// Writes `bytes` with its length first, so that ("ab", "c") and ("a", "bc") differ.
    fn field(&mut self, bytes: &[u8]) {
        self.write(&(bytes.len() as u64).to_le_bytes());
        self.write(bytes);
    }

    fn finish(&self) -> u64 {
        self.0
    }
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

/// What the image present under `name` says in [`INPUTS_LABEL`]: `None` when there is no such
/// image, `Some("")` when it lacks the label.
fn present_inputs(name: &str) -> Option<String> {
    let format = format!("{{{{index .Config.Labels \"{INPUTS_LABEL}\"}}}}");
    let value = cmd::output(Command::new("docker").args(["image", "inspect", "--format", &format, name])).ok()?;
    Some(if value == "<no value>" { String::new() } else { value })
}

fn image_id(name: &str) -> Option<String> {
    cmd::output(Command::new("docker").args(["image", "inspect", "--format", "{{.Id}}", name])).ok()
}

pub fn ensure_images(ctx: &Ctx) -> Result<()> {
    for image in IMAGES {
        step("image", &format!("{} ({})", image.name, image.what));
        let inputs = image.inputs_hash(ctx).with_context(|| {
            format!("reading the build inputs of {} under {} failed", image.name, image.config_dir(ctx).display())
        })?;
        match present_inputs(image.name) {
            Some(present) if present == inputs => {
                println!("    {INPUTS_LABEL}={inputs}");
                already_present();
                continue;
            }
            Some(present) if present.is_empty() => {
                println!("    present without {INPUTS_LABEL}: rebuilding (inputs {inputs})")
            }
            Some(present) => println!("    present with inputs {present}, now {inputs}: rebuilding"),
            None => println!("    missing: building (inputs {inputs})"),
        }
        let old_id = image_id(image.name);
        let built = match image.recipe {
            Recipe::Dockerfile => build_dockerfile(ctx, image, &inputs),
            Recipe::Debootstrap { suite, include, cmd } => build_debootstrap(ctx, image, &inputs, suite, include, cmd),
            Recipe::Wheels { base, python, packages } => build_wheels(ctx, image, &inputs, base, python, packages),
        };
        built.with_context(|| format!("building the test image {} failed", image.name))?;
        match present_inputs(image.name) {
            Some(present) if present == inputs => {}
            other => bail!(
                "the freshly built {} has {INPUTS_LABEL}={:?}, not {inputs}; the label did not reach the image",
                image.name,
                other.unwrap_or_default()
            ),
        }
        cmd::run(Command::new("docker").args(["run", "--rm", "--network", "none", image.name]).args(image.check))
            .with_context(|| format!("the freshly built test image {} does not pass its check", image.name))?;
        // The image it replaces is now untagged; remove it unless a container still uses it.
        if let Some(old_id) = old_id.filter(|old| image_id(image.name).as_ref() != Some(old))
            && cmd::probe(Command::new("docker").args(["image", "rm", &old_id]))
        {
            println!("    removed the previous image {old_id}");
        }
        if let Ok(size) =
            cmd::output(Command::new("docker").args(["image", "inspect", "--format", "{{.Size}}", image.name]))
        {
            println!("    size {size} bytes");
        }
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

impl BuildContext {
    /// Copies `from` (a directory, not recursive: its files) to `<context>/<name>/`.
    fn add_dir(&self, from: &Path, name: &str) -> Result<()> {
        let to = self.0.join(name);
        fs::create_dir_all(&to).with_context(|| format!("creating {}", to.display()))?;
        for entry in fs::read_dir(from).with_context(|| format!("listing {}", from.display()))? {
            let entry = entry.with_context(|| format!("listing {}", from.display()))?;
            if entry.file_type().with_context(|| format!("inspecting {}", entry.path().display()))?.is_file() {
                self.add(&entry.path(), &format!("{name}/{}", entry.file_name().to_string_lossy()))?;
            }
        }
        Ok(())
    }
}

fn build_dockerfile(ctx: &Ctx, image: &TestImage, inputs: &str) -> Result<()> {
    let busybox = ["/bin/busybox", "/usr/bin/busybox"]
        .into_iter()
        .map(Path::new)
        .find(|path| path.is_file())
        .context("/bin/busybox is missing; reinstall it with `apt-get install --reinstall busybox-static`")?;
    let config = image.config_dir(ctx);
    let context = BuildContext::new("busybox")?;
    context.add(&config.join("Dockerfile"), "Dockerfile")?;
    context.add(busybox, "busybox")?;
    context.add_dir(&config.join("service-defs"), "service-defs")?;
    let mut build = Command::new("docker");
    build.args(["build", "-t", image.name]);
    for (key, value) in image.all_labels(inputs) {
        build.arg("--label").arg(format!("{key}={value}"));
    }
    cmd::run(build.arg(&context.0).env("DOCKER_BUILDKIT", "0"))
}

fn build_wheels(ctx: &Ctx, image: &TestImage, inputs: &str, base: &str, python: &str, packages: &[&str]) -> Result<()> {
    if image_id(base).is_none() {
        bail!("its base image {base} is missing (setup builds it first)");
    }
    let context = BuildContext::new("wheels")?;
    let site = context.0.join("site");
    let platform = format!("manylinux2014_{}", std::env::consts::ARCH);
    // The venv's pip (a recent one, kept by setup); --target leaves the venv alone.
    cmd::run(
        Command::new(backendai_python())
            .args(["-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--no-warn-conflicts"])
            .args(["--no-compile", "--only-binary=:all:", "--implementation", "cp", "--platform", &platform])
            .args(["--python-version", python, "--target"])
            .arg(&site)
            .args(packages),
    )
    .with_context(|| {
        format!(
            "pip could not fetch the wheels of {} for Python {python}; check that PyPI is reachable",
            packages.join(" ")
        )
    })?;
    // Scripts and data files are laid out for a host install; the kernelspec is ours.
    for extra in ["bin", "share"] {
        let path = site.join(extra);
        if path.exists() {
            fs::remove_dir_all(&path).with_context(|| format!("removing {}", path.display()))?;
        }
    }
    context.add(&image.config_dir(ctx).join("kernel.json"), "kernel.json")?;
    let dockerfile = format!(
        "FROM {base}\nCOPY site/ /usr/local/lib/python{python}/dist-packages/\n\
         COPY kernel.json /usr/local/share/jupyter/kernels/python3/kernel.json\n"
    );
    fs::write(context.0.join("Dockerfile"), dockerfile).context("writing the Dockerfile")?;
    let mut build = Command::new("docker");
    build.args(["build", "-t", image.name]);
    for (key, value) in image.all_labels(inputs) {
        build.arg("--label").arg(format!("{key}={value}"));
    }
    cmd::run(build.arg(&context.0).env("DOCKER_BUILDKIT", "0"))
}

/// A root file system that debootstrap fills: whatever is mounted below it is unmounted and
/// then it is removed, when dropped; never removed while something is still mounted there
/// (debootstrap mounts /proc and /sys inside, and may bind /dev).
struct RootfsDir(PathBuf);

impl RootfsDir {
    fn new(name: &str) -> Result<Self> {
        let dir = std::env::temp_dir().join(format!("bai-xtask-{name}-{}", std::process::id()));
        let this = Self(dir);
        if this.0.exists() {
            this.remove()?;
        }
        fs::create_dir_all(&this.0).with_context(|| format!("creating {}", this.0.display()))?;
        Ok(this)
    }

    /// Unmounts everything below the directory (deepest first); fails naming what stays.
    fn unmount_all(&self) -> Result<()> {
        let mut mounts = mounts_below(&self.0)?;
        mounts.sort_by_key(|path| std::cmp::Reverse(path.as_os_str().len()));
        for mount in &mounts {
            if !cmd::probe(Command::new("umount").arg(mount)) {
                // Busy: detach it now, the kernel finishes when the last user goes.
                let _ = cmd::probe(Command::new("umount").arg("-l").arg(mount));
            }
        }
        let left = mounts_below(&self.0)?;
        if !left.is_empty() {
            let left: Vec<String> = left.iter().map(|path| path.display().to_string()).collect();
            bail!("still mounted after umount: {}; unmount them by hand", left.join(", "));
        }
        Ok(())
    }

    fn remove(&self) -> Result<()> {
        self.unmount_all().with_context(|| format!("not removing {}", self.0.display()))?;
        fs::remove_dir_all(&self.0).with_context(|| format!("removing {}", self.0.display()))
    }
}

impl Drop for RootfsDir {
    fn drop(&mut self) {
        if self.0.symlink_metadata().is_err() {
            return; // removed already
        }
        if let Err(err) = self.remove() {
            eprintln!("xtask: warning: {err:#}");
        }
    }
}

/// Mount points at or below `dir`, from /proc/self/mountinfo.
fn mounts_below(dir: &Path) -> Result<Vec<PathBuf>> {
    let mountinfo = fs::read_to_string("/proc/self/mountinfo").context("reading /proc/self/mountinfo")?;
    Ok(parse_mount_points(&mountinfo).into_iter().filter(|mount| mount.starts_with(dir)).collect())
}

/// The mount points (5th field, octal escapes such as `\040` undone) of a mountinfo text.
fn parse_mount_points(mountinfo: &str) -> Vec<PathBuf> {
    mountinfo
        .lines()
        .filter_map(|line| line.split(' ').nth(4))
        .map(|field| {
            let bytes = field.as_bytes();
            let mut out = Vec::with_capacity(bytes.len());
            let mut i = 0;
            while i < bytes.len() {
                let octal = bytes.get(i + 1..i + 4).filter(|d| d.iter().all(|c| (b'0'..=b'7').contains(c)));
                match (bytes[i], octal) {
                    (b'\\', Some(d)) => {
                        out.push((d[0] - b'0') * 64 + (d[1] - b'0') * 8 + (d[2] - b'0'));
                        i += 4;
                    }
                    (byte, _) => {
                        out.push(byte);
                        i += 1;
                    }
                }
            }
            PathBuf::from(std::ffi::OsString::from_vec(out))
        })
        .collect()
}

/// The Debian mirror this machine's apt uses for `suite`: `BAI_DEBIAN_MIRROR` when set, else
/// the first `deb` source for that suite in /etc/apt/sources.list and
/// /etc/apt/sources.list.d/*.{list,sources}.
fn debian_mirror(suite: &str) -> Result<String> {
    if let Some(mirror) = std::env::var_os("BAI_DEBIAN_MIRROR").filter(|m| !m.is_empty()) {
        return Ok(mirror.to_string_lossy().into_owned());
    }
    let mut files = vec![PathBuf::from("/etc/apt/sources.list")];
    if let Ok(entries) = fs::read_dir("/etc/apt/sources.list.d") {
        let mut more: Vec<PathBuf> = entries
            .filter_map(|entry| entry.ok().map(|entry| entry.path()))
            .filter(|path| path.extension().is_some_and(|ext| ext == "list" || ext == "sources"))
            .collect();
        more.sort();
        files.extend(more);
    }
    for file in &files {
        let Ok(text) = fs::read_to_string(file) else { continue };
        let deb822 = file.extension().is_some_and(|ext| ext == "sources");
        let found = if deb822 { mirror_from_deb822(&text, suite) } else { mirror_from_one_line(&text, suite) };
        if let Some(mirror) = found {
            return Ok(mirror);
        }
    }
    let searched: Vec<String> = files.iter().map(|file| file.display().to_string()).collect();
    bail!(
        "no apt source for the Debian suite {suite} in {}; add one (e.g. `deb http://deb.debian.org/debian {suite} \
         main`) or set BAI_DEBIAN_MIRROR to a Debian mirror URL",
        searched.join(", ")
    )
}

/// `deb [options] URI SUITE COMPONENTS...` lines.
fn mirror_from_one_line(text: &str, suite: &str) -> Option<String> {
    text.lines().find_map(|line| {
        let line = line.split('#').next().unwrap_or_default();
        let mut words = line.split_whitespace();
        if words.next()? != "deb" {
            return None;
        }
        let mut uri = words.next()?;
        if uri.starts_with('[') {
            // Options: `[arch=amd64 signed-by=...]`, possibly several words.
            while !uri.ends_with(']') {
                uri = words.next()?;
            }
            uri = words.next()?;
        }
        (words.next()? == suite).then(|| uri.to_owned())
    })
}

/// deb822 stanzas (`Types:`, `URIs:`, `Suites:`, `Enabled:`), separated by blank lines.
fn mirror_from_deb822(text: &str, suite: &str) -> Option<String> {
    let mut stanzas = vec![Vec::new()];
    for line in text.lines() {
        if line.trim().is_empty() {
            stanzas.push(Vec::new());
        } else if !line.starts_with('#') {
            stanzas.last_mut()?.push(line);
        }
    }
    stanzas.iter().find_map(|stanza| {
        let value = |key: &str| {
            stanza.iter().find_map(|line| {
                let (name, value) = line.split_once(':')?;
                name.trim().eq_ignore_ascii_case(key).then(|| value.trim())
            })
        };
        let enabled = value("Enabled").is_none_or(|v| !v.eq_ignore_ascii_case("no"));
        let deb = value("Types")?.split_whitespace().any(|t| t == "deb");
        let has_suite = value("Suites")?.split_whitespace().any(|s| s == suite);
        if enabled && deb && has_suite { value("URIs")?.split_whitespace().next().map(str::to_owned) } else { None }
    })
}

/// Removes what apt keeps for itself, as Debian's own images do: the downloaded .debs
/// (`var/cache/apt/archives/*.deb`), the package caches (`var/cache/apt/*.bin`) and the index
/// files (`var/lib/apt/lists/*`); `apt-get update` brings the last back. About 90 MB.
fn trim_apt_caches(root: &Path) -> Result<()> {
    let mut freed = 0u64;
    // (directory, the files in it to remove: those ending with this; "" for all but `lock`)
    for (dir, suffix) in [("var/cache/apt/archives", ".deb"), ("var/cache/apt", ".bin"), ("var/lib/apt/lists", "")] {
        let dir = root.join(dir);
        let Ok(entries) = fs::read_dir(&dir) else { continue };
        for entry in entries {
            let entry = entry.with_context(|| format!("listing {}", dir.display()))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            let meta = entry.metadata().with_context(|| format!("inspecting {}", entry.path().display()))?;
            let remove = if suffix.is_empty() { name != "lock" } else { name.ends_with(suffix) };
            if meta.is_file() && remove {
                fs::remove_file(entry.path()).with_context(|| format!("removing {}", entry.path().display()))?;
                freed += meta.len();
            }
        }
    }
    println!("    removed {} MB of apt caches from the image", freed / 1_000_000);
    Ok(())
}

fn build_debootstrap(
    ctx: &Ctx,
    image: &TestImage,
    inputs: &str,
    suite: &str,
    include: &[&str],
    image_cmd: &str,
) -> Result<()> {
    let mirror = debian_mirror(suite)?;
    let rootfs = RootfsDir::new("python3-rootfs")?;
    let started = Instant::now();
    let status = cmd::status(
        Command::new("debootstrap")
            .arg("--variant=minbase")
            .arg(format!("--include={}", include.join(",")))
            .arg(suite)
            .arg(&rootfs.0)
            .arg(&mirror),
    )
    .context("debootstrap does not run; it comes with the Debian package debootstrap")?;
    if !status.success() {
        let log = rootfs.0.join("debootstrap/debootstrap.log");
        bail!(
            "debootstrap of {suite} from {mirror} failed ({}); check that the mirror is reachable \
             (`apt-get update`), or set BAI_DEBIAN_MIRROR to another one. Last lines of {}:\n{}",
            cmd::describe(status),
            log.display(),
            log_tail(&log, 20)
        );
    }
    println!("    debootstrap took {:.1} s", started.elapsed().as_secs_f64());
    rootfs.unmount_all()?;
    trim_apt_caches(&rootfs.0)?;
    let defs_dir = rootfs.0.join("etc/backend.ai/service-defs");
    fs::create_dir_all(&defs_dir).with_context(|| format!("creating {}", defs_dir.display()))?;
    for (name, content) in image.service_defs(ctx)? {
        let path = defs_dir.join(&name);
        fs::write(&path, content).with_context(|| format!("writing {}", path.display()))?;
    }
    let mut import = Command::new("docker");
    import.arg("import");
    for (key, value) in image.all_labels(inputs) {
        import.arg("--change").arg(format!("LABEL {key}={value}"));
    }
    import.arg("--change").arg(format!("CMD {image_cmd}")).args(["-", image.name]);
    cmd::pipe(Command::new("tar").arg("-C").arg(&rootfs.0).args(["--numeric-owner", "-c", "."]), &mut import)?;
    rootfs.remove()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fnv1a_matches_the_reference_vectors() {
        let hash = |bytes: &[u8]| {
            let mut fnv = Fnv1a::new();
            fnv.write(bytes);
            fnv.finish()
        };
        assert_eq!(hash(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(hash(b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(hash(b"foobar"), 0x8594_4171_f739_67e8);
    }

    #[test]
    fn inputs_hash_is_stable_and_follows_labels_and_recipe() -> Result<()> {
        let ctx = Ctx::new("/opt/bai-agent/bpf-linker".into())?;
        for image in IMAGES {
            let first = image.inputs_hash(&ctx)?;
            assert_eq!(first, image.inputs_hash(&ctx)?);
            assert_eq!(first.len(), 16);
            if !matches!(image.recipe, Recipe::Wheels { .. }) {
                assert!(!image.service_defs(&ctx)?.is_empty(), "{} has no service-defs/*.json", image.dir);
            }
            let relabelled = TestImage { labels: &[("ai.backend.runtime-type", "other")], ..*image };
            assert_ne!(first, relabelled.inputs_hash(&ctx)?);
        }
        let python = IMAGES.iter().find(|image| matches!(image.recipe, Recipe::Debootstrap { .. })).unwrap();
        let other_suite = TestImage {
            recipe: Recipe::Debootstrap { suite: "trixie", include: &["python3"], cmd: r#"["/bin/sh"]"# },
            ..*python
        };
        assert_ne!(python.inputs_hash(&ctx)?, other_suite.inputs_hash(&ctx)?);
        Ok(())
    }

    #[test]
    fn service_defs_name_their_command() -> Result<()> {
        let ctx = Ctx::new("/opt/bai-agent/bpf-linker".into())?;
        for image in IMAGES {
            for (name, content) in image.service_defs(&ctx)? {
                let text = String::from_utf8(content)?;
                assert!(text.trim_start().starts_with('{') && text.contains("\"command\""), "{name}: {text}");
                assert!(text.contains("{port}"), "{name} does not use {{port}}: {text}");
            }
        }
        Ok(())
    }

    #[test]
    fn mirror_is_read_from_both_source_formats() {
        let deb822 = "Types: deb\n# http://snapshot.debian.org/archive/debian/20250520T000000Z\n\
                      URIs: http://deb.debian.org/debian\nSuites: bookworm bookworm-updates\nComponents: main\n\n\
                      Types: deb\nURIs: http://deb.debian.org/debian-security\nSuites: bookworm-security\n";
        assert_eq!(mirror_from_deb822(deb822, "bookworm").as_deref(), Some("http://deb.debian.org/debian"));
        assert_eq!(mirror_from_deb822(deb822, "trixie"), None);
        let disabled = "Enabled: no\nTypes: deb\nURIs: http://a/debian\nSuites: bookworm\n";
        assert_eq!(mirror_from_deb822(disabled, "bookworm"), None);
        let one_line = "# deb http://old/debian bookworm main\n\
                        deb-src http://src/debian bookworm main\n\
                        deb [arch=amd64 signed-by=/k.gpg] http://mirror.example/debian bookworm main contrib\n";
        assert_eq!(mirror_from_one_line(one_line, "bookworm").as_deref(), Some("http://mirror.example/debian"));
        assert_eq!(mirror_from_one_line("deb http://x/debian bookworm-security main", "bookworm"), None);
    }

    #[test]
    fn mount_points_are_unescaped() {
        let mountinfo = "22 1 8:1 / / rw,relatime - ext4 /dev/vda rw\n\
                         90 22 0:5 / /tmp/a\\040b/proc rw - proc proc rw\n";
        assert_eq!(parse_mount_points(mountinfo), [PathBuf::from("/"), PathBuf::from("/tmp/a b/proc")]);
        assert!(mounts_below(Path::new("/nonexistent-bai-xtask")).unwrap().is_empty());
    }
}
