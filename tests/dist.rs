//! The operator's packages (`cargo xtask dist`, docs/DEPLOYMENT.md): the systemd units pass
//! `systemd-analyze verify`, the sysctl file names settings this kernel has, and the .deb
//! (built from the dev profile's binaries: `cargo xtask dist --profile dev`, as a release build
//! is too slow for a test) installs with `dpkg -i` in a fresh Debian made by debootstrap and
//! imported into Docker, where its binaries run and its conffile is in place, then purges
//! cleanly.
//!
//! Needs what `cargo xtask setup` installs: systemd (for systemd-analyze), debootstrap, a
//! running dockerd, and the toolchain pieces `cargo xtask dist` builds with. The Debian mirror
//! is BAI_DEBIAN_MIRROR, else this machine's apt source for bookworm.

use std::{
    fs,
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
    time::Instant,
};

const UNITS: &[&str] = &["backendai-agent.service", "backendai-watcher.service"];
const SUITE: &str = "bookworm";

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("tests/ has a parent").to_path_buf()
}

fn text(out: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

/// Runs `cmd`, panics with its output unless it exits 0; returns the output.
fn run(cmd: &mut Command) -> String {
    let shown = format!("{cmd:?}");
    let out = cmd.stdin(Stdio::null()).output().unwrap_or_else(|err| panic!("cannot start {shown}: {err}"));
    let text = text(&out);
    assert!(out.status.success(), "{shown} failed ({}):\n{text}", out.status);
    text
}

fn write_exec(path: &Path, body: &str) {
    fs::create_dir_all(path.parent().expect("a parent")).expect("creating a directory");
    fs::write(path, body).expect("writing a stub");
    fs::set_permissions(path, fs::Permissions::from_mode(0o755)).expect("chmod a stub");
}

/// `systemd-analyze verify` of the units in a scratch root (`--root`): the root holds systemd's
/// own units (the targets the units' default dependencies name), the units, and stub
/// executables at the paths their Exec lines name (it checks that those exist). Works without
/// a running systemd. Warnings (an unknown key, a bad value) exit 0, so the output must be empty.
#[test]
fn units_pass_systemd_analyze_verify() {
    let root = tempfile::tempdir().expect("a temporary directory");
    let unit_dir = root.path().join("lib/systemd/system");
    fs::create_dir_all(&unit_dir).expect("creating the unit directory");
    let system_units = Path::new("/usr/lib/systemd/system");
    assert!(system_units.is_dir(), "no {}: `cargo xtask setup` installs Debian's systemd", system_units.display());
    run(Command::new("cp").arg("-a").arg(format!("{}/.", system_units.display())).arg(&unit_dir));
    for unit in UNITS {
        fs::copy(workspace().join("config/systemd").join(unit), unit_dir.join(unit)).expect("copying a unit");
    }
    for exe in ["usr/bin/bai-agent", "usr/bin/bai-watcher", "bin/kill"] {
        write_exec(&root.path().join(exe), "#!/bin/sh\n");
    }
    let units: Vec<String> = UNITS.iter().map(|unit| format!("/lib/systemd/system/{unit}")).collect();
    let out = Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .arg(format!("--root={}", root.path().display()))
        .args(&units)
        .output()
        .unwrap_or_else(|err| panic!("systemd-analyze is missing ({err}); `cargo xtask setup` installs systemd"));
    let said = text(&out);
    assert!(out.status.success() && said.trim().is_empty(), "systemd-analyze verify ({}):\n{said}", out.status);

    // The settings the deployment relies on.
    let agent = fs::read_to_string(unit_dir.join(UNITS[0])).expect("reading the agent's unit");
    for line in [
        "ExecStart=/usr/bin/bai-agent --config /etc/backend.ai/agent.toml",
        "ExecReload=/bin/kill -HUP $MAINPID",
        "After=docker.service network-online.target",
        "Restart=on-failure",
        "LimitMEMLOCK=infinity",
    ] {
        assert!(agent.lines().any(|l| l == line), "the agent's unit lacks `{line}`");
    }
    let bound = agent.lines().find_map(|l| l.strip_prefix("CapabilityBoundingSet=")).expect("a bounding set");
    for cap in ["CAP_BPF", "CAP_PERFMON", "CAP_NET_ADMIN", "CAP_SYS_ADMIN", "CAP_SYS_RESOURCE"] {
        assert!(bound.split_whitespace().any(|c| c == cap), "the agent's bounding set lacks {cap}");
    }
    assert!(!bound.contains("CAP_MKNOD"), "{bound}");
    let watcher = fs::read_to_string(unit_dir.join(UNITS[1])).expect("reading the watcher's unit");
    assert!(watcher.lines().any(|l| l == "ExecStart=/usr/bin/bai-watcher --config /etc/backend.ai/agent.toml"));
    // The unit the watcher controls by default is the agent's.
    let sample = fs::read_to_string(workspace().join("config/agent.sample.toml")).expect("the sample config");
    assert!(sample.contains(&format!("target-service = \"{}\"", UNITS[0])));
}

/// Every setting of the sysctl file exists on this kernel (one with a leading `-` may be
/// missing: its module may not be loaded), and the limits file has four fields a line.
#[test]
fn sysctl_and_limits_files_are_well_formed() {
    let sysctl = fs::read_to_string(workspace().join("config/sysctl/60-bai-agent.conf")).expect("the sysctl file");
    let mut settings = 0;
    for line in sysctl.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#')) {
        let (key, value) = line.split_once('=').unwrap_or_else(|| panic!("not key = value: {line:?}"));
        let (optional, key) = match key.trim().strip_prefix('-') {
            Some(key) => (true, key),
            None => (false, key.trim()),
        };
        assert!(value.trim().parse::<u64>().is_ok(), "{line:?}");
        let path = Path::new("/proc/sys").join(key.replace('.', "/"));
        assert!(optional || path.exists(), "{key} does not exist on this kernel ({})", path.display());
        settings += 1;
    }
    assert!(settings >= 5, "{settings} settings");
    let limits = fs::read_to_string(workspace().join("config/limits/60-bai-agent.conf")).expect("the limits file");
    for line in limits.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#')) {
        let fields: Vec<&str> = line.split_whitespace().collect();
        assert_eq!(fields.len(), 4, "{line:?}");
        assert!(["soft", "hard", "-"].contains(&fields[1]), "{line:?}");
        assert!(["nofile", "memlock"].contains(&fields[2]), "{line:?}");
        assert!(fields[3] == "unlimited" || fields[3].parse::<u64>().is_ok(), "{line:?}");
    }
}

/// The machine's Debian mirror for [`SUITE`]: BAI_DEBIAN_MIRROR, else the first apt source
/// naming the suite (one-line or deb822 format), else deb.debian.org.
fn debian_mirror() -> String {
    if let Some(mirror) = std::env::var("BAI_DEBIAN_MIRROR").ok().filter(|m| !m.is_empty()) {
        return mirror;
    }
    let mut files = vec![PathBuf::from("/etc/apt/sources.list")];
    if let Ok(entries) = fs::read_dir("/etc/apt/sources.list.d") {
        let mut more: Vec<PathBuf> = entries.filter_map(|e| e.ok().map(|e| e.path())).collect();
        more.sort();
        files.extend(more);
    }
    for file in files {
        let Ok(text) = fs::read_to_string(&file) else { continue };
        if file.extension().is_some_and(|ext| ext == "sources") {
            for paragraph in text.split("\n\n") {
                let field = |name: &str| {
                    paragraph
                        .lines()
                        .find_map(|l| l.strip_prefix(name).map(|v| v.trim().to_owned()))
                        .unwrap_or_default()
                };
                if field("Types:").split_whitespace().any(|t| t == "deb")
                    && field("Suites:").split_whitespace().any(|s| s == SUITE)
                    && let Some(uri) = field("URIs:").split_whitespace().next()
                {
                    return uri.to_owned();
                }
            }
        } else if file.extension().is_some_and(|ext| ext == "list") {
            for line in text.lines() {
                let line = line.split('#').next().unwrap_or_default();
                let words: Vec<&str> = line.split_whitespace().filter(|w| !w.starts_with('[')).collect();
                if words.len() >= 3 && words[0] == "deb" && words[2] == SUITE {
                    return words[1].to_owned();
                }
            }
        }
    }
    "http://deb.debian.org/debian".to_owned()
}

/// Mount points under `dir` (debootstrap mounts /proc and /sys inside while it runs), deepest
/// first.
fn mounts_below(dir: &Path) -> Vec<String> {
    let prefix = format!("{}/", dir.display());
    let mut found: Vec<String> = fs::read_to_string("/proc/self/mounts")
        .unwrap_or_default()
        .lines()
        .filter_map(|line| line.split_whitespace().nth(1).map(str::to_owned))
        .filter(|point| point.starts_with(&prefix))
        .collect();
    found.sort_by_key(|point| std::cmp::Reverse(point.len()));
    found
}

/// A root file system under a temporary directory: unmounts what is mounted below it before
/// the directory goes.
struct Rootfs(tempfile::TempDir);

impl Drop for Rootfs {
    fn drop(&mut self) {
        for point in mounts_below(self.0.path()) {
            let _ = Command::new("umount").arg("-l").arg(&point).status();
        }
    }
}

/// A Docker image this test made; removed when dropped.
struct Image(String);

impl Drop for Image {
    fn drop(&mut self) {
        let _ = Command::new("docker").args(["rmi", "-f", &self.0]).stdout(Stdio::null()).status();
    }
}

/// `debootstrap --variant=minbase` of Debian [`SUITE`] imported as a Docker image (as `cargo
/// xtask setup` builds its bai-test/python3 image, with nothing added).
fn fresh_debian_image() -> Image {
    let rootfs = Rootfs(tempfile::Builder::new().prefix("bai-dist-rootfs-").tempdir().expect("a temporary directory"));
    let mirror = debian_mirror();
    let started = Instant::now();
    run(Command::new("debootstrap").arg("--variant=minbase").arg(SUITE).arg(rootfs.0.path()).arg(&mirror));
    println!("debootstrap {SUITE} from {mirror}: {:.1} s", started.elapsed().as_secs_f64());
    for point in mounts_below(rootfs.0.path()) {
        run(Command::new("umount").arg(&point));
    }
    let _ = fs::remove_dir_all(rootfs.0.path().join("var/cache/apt/archives"));
    let name = format!("bai-test/dist-debian:{}", std::process::id());
    let mut tar = Command::new("tar")
        .arg("-C")
        .arg(rootfs.0.path())
        .args(["--numeric-owner", "-c", "."])
        .stdout(Stdio::piped())
        .spawn()
        .expect("starting tar");
    let image = Image(name.clone());
    let import = Command::new("docker")
        .args(["import", "--change", "CMD [\"/bin/sh\"]", "-", &name])
        .stdin(tar.stdout.take().expect("tar's stdout"))
        .output()
        .expect("starting docker import");
    let tar_status = tar.wait().expect("waiting for tar");
    assert!(import.status.success() && tar_status.success(), "tar ({tar_status}) | docker import:\n{}", text(&import));
    image
}

/// `cargo xtask dist --profile dev`, then the .deb in a fresh Debian: installs with `dpkg
/// --force-depends -i` (its Depends, docker.io | docker-ce and iproute2, are not installed
/// there: the container has no network and the binaries do not need them to start), the
/// binaries run, `bai-agent --check-config` accepts the conffile (given and found by the
/// default search), and `dpkg --purge` removes everything, none of it failing without systemd.
#[test]
fn the_deb_installs_and_runs_in_a_fresh_debian() {
    let started = Instant::now();
    let out = tempfile::Builder::new().prefix("bai-dist-").tempdir().expect("a temporary directory");
    run(Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
        .args(["xtask", "dist", "--profile", "dev", "--out-dir"])
        .arg(out.path())
        .current_dir(workspace()));
    println!("cargo xtask dist --profile dev: {:.1} s", started.elapsed().as_secs_f64());

    let version = env!("CARGO_PKG_VERSION");
    let tarball = out.path().join(format!("bai-agent-{version}-{}.tar.gz", std::env::consts::ARCH));
    let listing = run(Command::new("tar").arg("-tzf").arg(&tarball));
    let top = format!("bai-agent-{version}-{}", std::env::consts::ARCH);
    for entry in [
        "bin/bai-agent",
        "bin/bai-agentctl",
        "bin/bai-watcher",
        "bin/bai-krunner",
        "etc/backend.ai/agent.toml",
        "systemd/backendai-agent.service",
        "systemd/backendai-watcher.service",
        "sysctl.d/60-bai-agent.conf",
        "limits.d/60-bai-agent.conf",
        "README",
    ] {
        assert!(listing.lines().any(|l| l == format!("{top}/{entry}")), "{entry} is not in the tarball:\n{listing}");
    }

    let deb = out.path().join(format!("bai-agent_{version}_amd64.deb"));
    let depends = run(Command::new("dpkg-deb").args(["--field"]).arg(&deb).arg("Depends"));
    assert_eq!(depends.trim(), "docker.io | docker-ce, iproute2");
    let conffiles = run(Command::new("dpkg-deb").arg("--info").arg(&deb).arg("conffiles"));
    assert!(conffiles.lines().any(|l| l == "/etc/backend.ai/agent.toml"), "{conffiles}");

    let debootstrapped = Instant::now();
    let image = fresh_debian_image();
    println!("fresh Debian image: {:.1} s", debootstrapped.elapsed().as_secs_f64());
    let script = r#"set -ex
dpkg --force-depends -i /tmp/bai-agent.deb
test "$(dpkg-query -W -f='${Status}' bai-agent)" = "install ok installed"
dpkg-query -W -f='${Conffiles}\n' bai-agent | grep -q '^ /etc/backend.ai/agent.toml '
test -f /etc/backend.ai/agent.toml
bai-agent --help
bai-agent --version
bai-agent --config /etc/backend.ai/agent.toml --check-config > /tmp/check.txt
grep -q 'configuration from /etc/backend.ai/agent.toml is valid' /tmp/check.txt
cd / && bai-agent --check-config > /tmp/found.txt
grep -q 'configuration from /etc/backend.ai/agent.toml is valid' /tmp/found.txt
bai-watcher --help
bai-agentctl --help
/opt/bai-agent/bin/bai-krunner --help
test -f /lib/systemd/system/backendai-agent.service
test -f /lib/systemd/system/backendai-watcher.service
test -f /usr/lib/sysctl.d/60-bai-agent.conf
test -f /etc/security/limits.d/60-bai-agent.conf
dpkg --purge bai-agent
test ! -e /usr/bin/bai-agent
test ! -e /etc/backend.ai/agent.toml
echo PACKAGE-OK
"#;
    let ran = Instant::now();
    let said = run(Command::new("docker")
        .args(["run", "--rm", "--network", "none", "-v"])
        .arg(format!("{}:/tmp/bai-agent.deb:ro", deb.display()))
        .arg(&image.0)
        .args(["/bin/sh", "-c", script]));
    println!("install, run, purge in the container: {:.1} s", ran.elapsed().as_secs_f64());
    assert!(said.contains("PACKAGE-OK"), "{said}");
    let tail: Vec<&str> = said.lines().rev().take(30).collect();
    println!("{}", tail.into_iter().rev().collect::<Vec<_>>().join("\n"));
    drop(image);
    println!("whole test: {:.1} s", started.elapsed().as_secs_f64());
}
