//! Test support for the integration suite: checks the machine can run it, starts a
//! real `bai-agent` (HTTP and RPC on free loopback ports), runs labelled containers on the
//! real Docker engine, reads `/metrics`.

use std::{
    collections::BTreeMap,
    io::{Read, Write},
    net::{TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, Instant},
};

use anyhow::{Context, bail};

pub mod backendai;
pub mod bench;
pub mod cpu;
pub mod kernels;

/// The image `cargo xtask setup` builds: busybox in a `FROM scratch` image.
pub const BUSYBOX_IMAGE: &str = "bai-test/busybox:latest";

/// The image `cargo xtask setup` builds: Debian bookworm minbase with python3 (debootstrap).
pub const PYTHON_IMAGE: &str = "bai-test/python3:latest";

/// The Python interpreter of a venv with Backend.AI's own `backend.ai-common` (26.9.6), which
/// `cargo xtask test` sets up and names in `BAI_TEST_BACKENDAI_PYTHON`; the tests check what
/// the agent sends with Backend.AI's own models there.
pub fn backendai_python() -> PathBuf {
    let python = std::env::var_os("BAI_TEST_BACKENDAI_PYTHON").map(PathBuf::from).unwrap_or_else(|| {
        panic!(
            "BAI_TEST_BACKENDAI_PYTHON is not set: it names the Python of a venv with backend.ai-common 26.9.6; \
             `cargo xtask test` sets it up (`cargo xtask setup` creates the venv)"
        )
    });
    assert!(
        python.exists(),
        "{} (BAI_TEST_BACKENDAI_PYTHON) does not exist; run `cargo xtask setup`",
        python.display()
    );
    python
}

/// Runs the Python `script` with [`backendai_python`], `input` on its stdin; whether it
/// succeeded, and its stdout followed by its stderr.
pub fn run_backendai_python(script: &str, input: &[u8]) -> (bool, String) {
    let python = backendai_python();
    let mut child = Command::new(&python)
        .args(["-c", script])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|err| panic!("running {}: {err}", python.display()));
    if let Some(mut stdin) = child.stdin.take() {
        stdin.write_all(input).expect("writing the script's input");
    }
    let out = child.wait_with_output().expect("python ends");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.success(), text)
}

/// Fails the test with a list of what this machine lacks, instead of skipping it.
pub fn require_environment() {
    let mut missing = Vec::new();
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        missing.push("root (eBPF programs and cgroup attachment need it)".to_string());
    }
    if !Path::new("/sys/kernel/btf/vmlinux").exists() {
        missing.push("kernel BTF at /sys/kernel/btf/vmlinux (tp_btf programs need it)".to_string());
    }
    match Command::new("docker").args(["version", "--format", "{{.Server.Version}}"]).output() {
        Ok(out) if out.status.success() => {
            for name in [BUSYBOX_IMAGE, PYTHON_IMAGE] {
                let image = Command::new("docker").args(["image", "inspect", name]).output();
                if !image.is_ok_and(|out| out.status.success()) {
                    missing.push(format!("the test image {name} (`cargo xtask setup` builds it)"));
                }
            }
        }
        _ => missing.push("a running Docker engine (dockerd answering on /var/run/docker.sock)".to_string()),
    }
    let krunner = "/opt/bai-agent/bin/bai-krunner";
    if !Path::new(krunner).exists() {
        missing.push(format!("the kernel runner at {krunner} (`cargo xtask setup` builds and installs it)"));
    }
    let agent = agent_binary();
    if !agent.exists() {
        missing.push(format!("the agent binary at {}", agent.display()));
    }
    if !missing.is_empty() {
        panic!(
            "the integration suite cannot run here; missing: {}. `cargo xtask test` installs and starts all of it.",
            missing.join("; ")
        );
    }
}

/// `BAI_AGENT_BIN`, or `bai-agent` next to this test's target directory.
pub fn agent_binary() -> PathBuf {
    if let Some(path) = std::env::var_os("BAI_AGENT_BIN") {
        return PathBuf::from(path);
    }
    let exe = std::env::current_exe().unwrap_or_default();
    // target/<profile>/deps/<test-binary>
    exe.parent().and_then(Path::parent).map(|dir| dir.join("bai-agent")).unwrap_or_else(|| PathBuf::from("bai-agent"))
}

/// A name no other test of this run uses.
pub fn unique(prefix: &str) -> String {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    format!("{prefix}-{}-{}", std::process::id(), NEXT.fetch_add(1, Ordering::Relaxed))
}

/// `N` distinct free loopback ports (all held open until every one is picked).
pub fn free_ports<const N: usize>() -> anyhow::Result<[u16; N]> {
    let listeners: Vec<TcpListener> = (0..N).map(|_| TcpListener::bind("127.0.0.1:0")).collect::<Result<_, _>>()?;
    let mut ports = [0; N];
    for (port, listener) in ports.iter_mut().zip(&listeners) {
        *port = listener.local_addr()?.port();
    }
    Ok(ports)
}

/// A running `bai-agent`; stopped with SIGTERM when dropped.
pub struct Agent {
    child: Option<Child>,
    pub id: String,
    /// `agent.internal-addr` (HTTP: /metrics, /readyz, …).
    pub addr: String,
    /// `agent.rpc-listen-addr` (the callosum RPC server), always on 127.0.0.1.
    pub rpc_addr: String,
    _dir: tempfile::TempDir,
    pub log: PathBuf,
    /// `agent.journal-dir`: the event journal (`events.jsonl`, `events.delivered`).
    pub journal_dir: PathBuf,
    binary: PathBuf,
}

impl Agent {
    /// Starts an agent with a fresh id and port; `extra_toml` is appended to its config.
    pub fn start(extra_toml: &str) -> anyhow::Result<Agent> {
        Self::start_with_id(&unique("i-test"), extra_toml)
    }

    pub fn start_with_id(id: &str, extra_toml: &str) -> anyhow::Result<Agent> {
        Self::launch(&agent_binary(), id, None, extra_toml)
    }

    /// Like [`Agent::start`] with another build of the agent (a benchmark's baseline).
    pub fn start_binary(binary: &Path, extra_toml: &str) -> anyhow::Result<Agent> {
        Self::launch(binary, &unique("i-test"), None, extra_toml)
    }

    /// Like [`Agent::start_with_id`] with `agent.journal-dir` set to `journal_dir` (which may
    /// outlive the agent, e.g. to start another agent on the same event journal), and
    /// `agent.image-commit-path` beside it ([`Agent::commit_dir`]).
    pub fn start_with_journal(id: &str, journal_dir: &Path, extra_toml: &str) -> anyhow::Result<Agent> {
        Self::launch(&agent_binary(), id, Some(journal_dir), extra_toml)
    }

    /// `agent.image-commit-path` of an agent started on a journal of its own: `commit` next to
    /// the journal directory.
    pub fn commit_dir(&self) -> PathBuf {
        self.journal_dir.with_file_name("commit")
    }

    /// Without a `journal_dir`, the agent's event journal is `state/` in its own temporary
    /// directory ([`Agent::journal_dir`]), so that agents never share one.
    fn launch(binary: &Path, id: &str, journal_dir: Option<&Path>, extra_toml: &str) -> anyhow::Result<Agent> {
        let dir = tempfile::tempdir()?;
        let [http_port, rpc_port] = free_ports()?;
        let (addr, rpc_addr) = (format!("127.0.0.1:{http_port}"), format!("127.0.0.1:{rpc_port}"));
        // An earlier build (a benchmark's baseline) may not know `image-commit-path`.
        let commit_dir = journal_dir
            .map(|journal| format!("image-commit-path = \"{}\"\n", journal.with_file_name("commit").display()));
        let journal_dir = journal_dir.map_or_else(|| dir.path().join("state"), Path::to_path_buf);
        // Agents run side by side: each metadata service on a port of its own (an earlier
        // build, a benchmark's baseline, has no [policy]).
        let policy = if binary == agent_binary() && !extra_toml.contains("[policy]") {
            "[policy]\nmetadata-service-port = 0\n"
        } else {
            ""
        };
        let config = dir.path().join("agent.toml");
        std::fs::write(
            &config,
            format!(
                "[agent]\nid = \"{id}\"\ninternal-addr = \"{addr}\"\nrpc-listen-addr = \"{rpc_addr}\"\n\
                 journal-dir = \"{}\"\n{}\n[logging]\nlevel = \"debug\"\n\n{policy}\n{extra_toml}\n",
                journal_dir.display(),
                commit_dir.unwrap_or_default(),
            ),
        )?;
        let log = dir.path().join("agent.log");
        let mut agent = Agent {
            child: None,
            id: id.to_owned(),
            addr,
            rpc_addr,
            _dir: dir,
            log,
            journal_dir,
            binary: binary.to_path_buf(),
        };
        agent.spawn()?;
        Ok(agent)
    }

    /// Starts the agent process on its config (appending to its log) and waits until it is ready.
    fn spawn(&mut self) -> anyhow::Result<()> {
        let log_file = std::fs::OpenOptions::new().create(true).append(true).open(&self.log)?;
        let child = Command::new(&self.binary)
            .arg("--config")
            .arg(self._dir.path().join("agent.toml"))
            .stdin(Stdio::null())
            .stdout(log_file.try_clone()?)
            .stderr(log_file)
            .spawn()
            .with_context(|| format!("starting {}", self.binary.display()))?;
        self.child = Some(child);
        self.wait_ready(Duration::from_secs(30))
    }

    /// Starts a stopped (or killed) agent again on the same config: the same id, ports and
    /// journal, as a supervisor would.
    pub fn restart(&mut self) -> anyhow::Result<()> {
        if self.child.is_some() {
            bail!("the agent is still running");
        }
        self.spawn()
    }

    fn wait_ready(&mut self, timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Some(child) = self.child.as_mut()
                && let Some(status) = child.try_wait()?
            {
                bail!("the agent exited with {status} before it was ready; its log:\n{}", self.log_text());
            }
            if let Ok((200, _)) = http_get(&self.addr, "/readyz") {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        bail!("the agent was not ready within {timeout:?}; its log:\n{}", self.log_text())
    }

    /// The agent's `agent.toml`.
    pub fn config_path(&self) -> PathBuf {
        self._dir.path().join("agent.toml")
    }

    /// Sends SIGHUP: the agent re-reads its file's `[policy]` rules.
    pub fn reload(&self) -> anyhow::Result<()> {
        let pid = self.pid().context("the agent is not running")?;
        let status = Command::new("kill").args(["-HUP", &pid.to_string()]).status()?;
        anyhow::ensure!(status.success(), "kill -HUP {pid} failed");
        Ok(())
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn get(&self, path: &str) -> anyhow::Result<(u16, String)> {
        http_get(&self.addr, path)
    }

    /// Every sample of the current `/metrics`.
    pub fn metrics(&self) -> anyhow::Result<Vec<Sample>> {
        let (status, body) = self.get("/metrics")?;
        if status != 200 {
            bail!("/metrics answered {status}: {body}");
        }
        Ok(parse_exposition(&body))
    }

    /// The value of `name` for the series whose `kernel_id` label is `kernel_id`.
    pub fn kernel_value(&self, name: &str, kernel_id: &str) -> anyhow::Result<Option<f64>> {
        Ok(self
            .metrics()?
            .into_iter()
            .find(|s| s.name == name && s.labels.get("kernel_id").map(String::as_str) == Some(kernel_id))
            .map(|s| s.value))
    }

    /// Where the agent says `resource`'s numbers come from (`ebpf` or `cgroup-files`).
    pub fn source_of(&self, resource: &str) -> anyhow::Result<Option<String>> {
        Ok(self
            .metrics()?
            .into_iter()
            .find(|s| {
                s.name == "backendai_agent_resource_source"
                    && s.labels.get("resource").map(String::as_str) == Some(resource)
                    && s.value == 1.0
            })
            .and_then(|s| s.labels.get("source").cloned()))
    }

    /// Waits until `kernel_id` has series in `/metrics` (or, with `present = false`, has none).
    pub fn wait_for_kernel(&self, kernel_id: &str, present: bool, timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let found = self.kernel_value("container_cpu_usage_seconds_total", kernel_id)?.is_some();
            if found == present {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "kernel {kernel_id} {} /metrics within {timeout:?}; agent log:\n{}",
                    if present { "did not appear in" } else { "did not leave" },
                    self.log_text()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// `kill -9`: the agent gets no chance to clean up.
    pub fn kill_hard(&mut self) -> anyhow::Result<()> {
        let mut child = self.child.take().context("agent already stopped")?;
        child.kill()?;
        child.wait()?;
        Ok(())
    }

    /// Sends SIGTERM and waits; returns the exit status.
    pub fn stop(&mut self) -> anyhow::Result<std::process::ExitStatus> {
        let mut child = self.child.take().context("agent already stopped")?;
        let pid = i32::try_from(child.id())?;
        // SAFETY: signalling our own child by pid.
        unsafe { libc::kill(pid, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = child.try_wait()? {
                return Ok(status);
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                bail!("the agent did not stop within 20 s of SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if self.child.is_some() {
            let _ = self.stop();
        }
        // The agent leaves its eBPF programs counting for the next agent of its id; no test
        // wants them after it.
        let _ = std::fs::remove_dir_all(bai_agent::config::Config::default().monitor.bpffs_dir.join(&self.id));
        // Whatever happened in the test, leave none of this agent's kernels behind.
        remove_agent_containers(&self.id);
        remove_kernel_cgroups(&self.id);
    }
}

/// Removes an agent's kernel cgroup directories (`{policy.cgroup-parent}/{agent id}`) from
/// every hierarchy, deepest first (a cgroup directory goes with `rmdir` only).
pub fn remove_kernel_cgroups(agent_id: &str) {
    fn remove_tree(dir: &Path) {
        for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                remove_tree(&entry.path());
            }
        }
        let _ = std::fs::remove_dir(dir);
    }
    let parent = bai_agent::config::Config::default().policy.cgroup_parent;
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    for mount in bai_agent::monitor::cgroup::hierarchy_mounts(&mountinfo) {
        remove_tree(&mount.join(parent.trim_start_matches('/')).join(agent_id));
    }
}

/// A minimal HTTP/1.0 GET against a loopback address.
pub fn http_get(addr: &str, path: &str) -> anyhow::Result<(u16, String)> {
    http_request(addr, "GET", path, &[], "")
}

/// One HTTP/1.0 request with extra `headers` and a (JSON) `body`: the status and the body.
pub fn http_request(
    addr: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> anyhow::Result<(u16, String)> {
    let mut stream = TcpStream::connect(addr)?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut head = format!("{method} {path} HTTP/1.0\r\nHost: {addr}\r\n");
    for (name, value) in headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    if !body.is_empty() {
        head.push_str(&format!("Content-Type: application/json\r\nContent-Length: {}\r\n", body.len()));
    }
    write!(stream, "{head}\r\n{body}")?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    let (head, body) = response.split_once("\r\n\r\n").context("malformed HTTP response")?;
    let status = head.split_whitespace().nth(1).context("no status")?.parse()?;
    Ok((status, body.to_owned()))
}

/// One line of an OpenMetrics exposition.
#[derive(Debug, Clone)]
pub struct Sample {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

/// Removes every container (running or not) labelled as agent `agent_id`'s; best effort.
pub fn remove_agent_containers(agent_id: &str) {
    let listed = Command::new("docker")
        .args(["ps", "-aq", "--filter", &format!("label=ai.backend.agent-id={agent_id}")])
        .output();
    if let Ok(listed) = listed {
        let ids: Vec<String> = String::from_utf8_lossy(&listed.stdout).split_whitespace().map(str::to_owned).collect();
        if !ids.is_empty() {
            let _ = Command::new("docker").arg("rm").arg("-f").args(&ids).output();
        }
    }
}

pub fn parse_exposition(text: &str) -> Vec<Sample> {
    let mut samples = Vec::new();
    for line in text.lines().filter(|l| !l.starts_with('#') && !l.trim().is_empty()) {
        let (series, value) = match line.rsplit_once(' ') {
            Some(parts) => parts,
            None => continue,
        };
        let Ok(value) = value.parse::<f64>() else {
            continue;
        };
        let (name, labels) = match series.split_once('{') {
            Some((name, rest)) => (name, parse_labels(rest.trim_end_matches('}'))),
            None => (series, BTreeMap::new()),
        };
        samples.push(Sample { name: name.to_owned(), labels, value });
    }
    samples
}

fn parse_labels(text: &str) -> BTreeMap<String, String> {
    let mut labels = BTreeMap::new();
    let mut rest = text;
    while let Some((key, after)) = rest.split_once("=\"") {
        let Some(end) = after.find('"') else { break };
        labels.insert(key.trim_start_matches(',').to_owned(), after[..end].to_owned());
        rest = &after[end + 1..];
    }
    labels
}

/// A container on the real engine, removed when dropped.
pub struct Container {
    pub id: String,
    pub kernel_id: String,
}

impl Container {
    /// `docker run -d` with the kernel labels of `agent_id`, the `docker run` options in
    /// `options`, the busybox image, and `sh -c script`.
    pub fn run(agent_id: &str, options: &[&str], script: &str) -> anyhow::Result<Container> {
        Self::run_image(agent_id, BUSYBOX_IMAGE, options, script)
    }

    /// [`Container::run`] with another image (one that has `sh`).
    pub fn run_image(agent_id: &str, image: &str, options: &[&str], script: &str) -> anyhow::Result<Container> {
        let kernel_id = unique("kernel");
        let labels = [
            format!("ai.backend.agent-id={agent_id}"),
            format!("ai.backend.kernel-id={kernel_id}"),
            format!("ai.backend.session-id=session-of-{kernel_id}"),
            "ai.backend.owner-user-id=user-1".to_string(),
            "ai.backend.owner-project-id=project-1".to_string(),
        ];
        let mut cmd = Command::new("docker");
        cmd.args(["run", "-d"]);
        for label in &labels {
            cmd.args(["--label", label]);
        }
        cmd.args(options).args([image, "sh", "-c", script]);
        let out = cmd.output().context("running docker")?;
        if !out.status.success() {
            bail!("docker run failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(Container { id: String::from_utf8(out.stdout)?.trim().to_owned(), kernel_id })
    }

    pub fn pid(&self) -> anyhow::Result<u32> {
        let out = Command::new("docker").args(["inspect", "-f", "{{.State.Pid}}", &self.id]).output()?;
        Ok(String::from_utf8(out.stdout)?.trim().parse()?)
    }

    pub fn remove(&self) -> anyhow::Result<()> {
        let out = Command::new("docker").args(["rm", "-f", &self.id]).output()?;
        if !out.status.success() {
            bail!("docker rm failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(())
    }

    /// Nanoseconds of CPU the container's cgroup used, by the kernel's own accounting:
    /// `cpuacct.usage` on hybrid hosts, `cpu.stat` `usage_usec` on pure v2 hosts.
    pub fn kernel_cpu_ns(&self) -> anyhow::Result<u64> {
        let pid = self.pid()?;
        let cgroups = std::fs::read_to_string(format!("/proc/{pid}/cgroup"))?;
        if let Some(path) = bai_agent::monitor::cgroup::v1_entry(&cgroups, "cpuacct") {
            let file = format!("/sys/fs/cgroup/cpuacct{path}/cpuacct.usage");
            let file = if Path::new(&file).exists() {
                file
            } else {
                format!("/sys/fs/cgroup/cpu,cpuacct{path}/cpuacct.usage")
            };
            return Ok(std::fs::read_to_string(&file).with_context(|| file.clone())?.trim().parse()?);
        }
        let path = bai_agent::monitor::cgroup::unified_entry(&cgroups).context("no cgroup v2 entry")?;
        let stat = std::fs::read_to_string(format!("/sys/fs/cgroup{path}/cpu.stat"))?;
        let usec: u64 = stat
            .lines()
            .find_map(|l| l.strip_prefix("usage_usec "))
            .context("no usage_usec in cpu.stat")?
            .trim()
            .parse()?;
        Ok(usec * 1000)
    }

    /// A line of `/proc/<pid>/net/dev` inside the container's network namespace.
    pub fn net_dev(&self, interface: &str) -> anyhow::Result<NetDev> {
        let pid = self.pid()?;
        let text = std::fs::read_to_string(format!("/proc/{pid}/net/dev"))?;
        for line in text.lines().skip(2) {
            let Some((name, fields)) = line.split_once(':') else {
                continue;
            };
            if name.trim() != interface {
                continue;
            }
            let numbers: Vec<u64> = fields.split_whitespace().filter_map(|f| f.parse().ok()).collect();
            if numbers.len() < 10 {
                bail!("short net/dev line: {line}");
            }
            return Ok(NetDev {
                rx_bytes: numbers[0],
                rx_packets: numbers[1],
                tx_bytes: numbers[8],
                tx_packets: numbers[9],
            });
        }
        bail!("no interface {interface} in /proc/{pid}/net/dev")
    }

    /// The container's directory of a cgroup controller (`memory`, `blkio`, …): its v1
    /// hierarchy on hybrid hosts, the unified one on pure v2 hosts.
    pub fn cgroup_dir(&self, controller: &str) -> anyhow::Result<PathBuf> {
        let layout = bai_agent::monitor::CgroupLayout::detect()?;
        let cgroups = layout.container_cgroups(self.pid()?)?;
        Ok(cgroups.dir(controller).with_context(|| format!("the host has no {controller} controller"))?.to_path_buf())
    }

    /// A cgroup file of the container, read now.
    pub fn cgroup_file(&self, controller: &str, name: &str) -> anyhow::Result<String> {
        let path = self.cgroup_dir(controller)?.join(name);
        std::fs::read_to_string(&path).with_context(|| path.display().to_string())
    }

    /// One `key value` entry of a keyed cgroup file (`memory.stat`, `cpu.stat`, …).
    pub fn cgroup_stat(&self, controller: &str, name: &str, key: &str) -> anyhow::Result<u64> {
        let text = self.cgroup_file(controller, name)?;
        text.lines()
            .find_map(|line| line.strip_prefix(key).and_then(|rest| rest.strip_prefix(' ')))
            .with_context(|| format!("no {key} in {name}"))?
            .trim()
            .parse()
            .with_context(|| format!("{key} in {name}"))
    }

    /// Whether `path` exists inside the container (read through `/proc/<pid>/root`).
    pub fn has_file(&self, path: &str) -> bool {
        self.pid().is_ok_and(|pid| Path::new(&format!("/proc/{pid}/root{path}")).exists())
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        let _ = Command::new("docker").args(["rm", "-f", &self.id]).output();
    }
}

/// Interface counters as `/proc/net/dev` reports them (link-layer header included).
#[derive(Debug, Clone, Copy)]
pub struct NetDev {
    pub rx_bytes: u64,
    pub rx_packets: u64,
    pub tx_bytes: u64,
    pub tx_packets: u64,
}

/// Polls `probe` every 100 ms until it returns true.
pub fn wait_until(what: &str, timeout: Duration, mut probe: impl FnMut() -> bool) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    while !probe() {
        if Instant::now() > deadline {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(())
}

/// |a - b| / b
pub fn relative_error(measured: f64, truth: f64) -> f64 {
    if truth == 0.0 { if measured == 0.0 { 0.0 } else { f64::INFINITY } } else { (measured - truth).abs() / truth }
}

/// `BAI_TEST_REDIS` (`127.0.0.1:PORT`), the private Redis that `cargo xtask test` starts;
/// fails the test when it is not set (no silent skip).
pub fn test_redis() -> String {
    match std::env::var("BAI_TEST_REDIS") {
        Ok(addr) if !addr.trim().is_empty() => addr.trim().to_owned(),
        _ => panic!("BAI_TEST_REDIS is not set: run the suite with `cargo xtask test`, which starts Redis"),
    }
}

/// A free TCP port on 127.0.0.1 (free when this returns).
pub fn free_loopback_port() -> anyhow::Result<u16> {
    let [port] = free_ports()?;
    Ok(port)
}

/// A `redis-server` of a test's own on 127.0.0.1 (no persistence), stopped by PID when
/// dropped. [`RedisServer::stop`] and [`RedisServer::restart`] make outages.
pub struct RedisServer {
    pub port: u16,
    child: Option<Child>,
    dir: tempfile::TempDir,
}

impl RedisServer {
    pub fn start(port: u16) -> anyhow::Result<RedisServer> {
        let mut server = RedisServer { port, child: None, dir: tempfile::tempdir()? };
        server.restart()?;
        Ok(server)
    }

    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Starts it (again) on the same port and waits until it answers PING.
    pub fn restart(&mut self) -> anyhow::Result<()> {
        anyhow::ensure!(self.child.is_none(), "redis-server on port {} is already running", self.port);
        let log = std::fs::OpenOptions::new().create(true).append(true).open(self.dir.path().join("redis.log"))?;
        let port = self.port.to_string();
        let child = Command::new("redis-server")
            .args(["--port", &port, "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(self.dir.path())
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting redis-server (Debian package redis-server; `cargo xtask setup` installs it)")?;
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        while !redis_pings(&self.addr()) {
            if let Some(child) = self.child.as_mut()
                && let Some(status) = child.try_wait()?
            {
                self.child = None;
                let log = std::fs::read_to_string(self.dir.path().join("redis.log")).unwrap_or_default();
                bail!("redis-server on port {port} exited with {status}; its log:\n{log}");
            }
            if Instant::now() > deadline {
                bail!("redis-server on port {port} did not answer PING within 20 s");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(())
    }

    /// SIGTERM to the server (by PID) and waits for it to exit; SIGKILL after 10 s.
    pub fn stop(&mut self) -> anyhow::Result<()> {
        stop_child(self.child.take().context("redis-server is not running")?)
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        if self.child.is_some() {
            let _ = self.stop();
        }
    }
}

/// Whether a Redis answers PING at `addr`.
pub fn redis_pings(addr: &str) -> bool {
    let Ok(mut stream) = TcpStream::connect(addr) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(1)));
    let mut reply = [0u8; 7];
    stream.write_all(b"PING\r\n").is_ok() && stream.read_exact(&mut reply).is_ok() && &reply == b"+PONG\r\n"
}

/// One entry of the `events` stream.
#[derive(Debug, Clone)]
pub struct StreamEvent {
    /// The stream entry id (`<ms>-<n>`).
    pub id: String,
    /// The entry's field names, sorted.
    pub fields: Vec<String>,
    pub name: String,
    pub source: String,
    /// The raw `args` field (≤ 25.x format): msgpack of the arguments array.
    pub args: Vec<u8>,
    /// The raw `payload` field (26.9 format): the event's fields as JSON.
    pub payload: Vec<u8>,
}

impl StreamEvent {
    /// The milliseconds part of the entry id (when Redis added it).
    pub fn added_ms(&self) -> u64 {
        self.id.split('-').next().and_then(|ms| ms.parse().ok()).unwrap_or(0)
    }

    /// `args`, decoded; it must be exactly one msgpack value.
    pub fn args_value(&self) -> rmpv::Value {
        bai_agent::rpc::codec::unpack(&self.args, "args").unwrap_or_else(|err| panic!("{err}: {:?}", self.args))
    }
}

/// A background reader of one Redis stream: XREAD from the start, reconnecting across
/// outages, handing each entry to a callback in stream order. Stopped when dropped.
pub struct StreamFollower {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl StreamFollower {
    pub fn start(
        redis_addr: &str,
        db: u32,
        stream: &str,
        mut on_entry: impl FnMut(redis::streams::StreamId) + Send + 'static,
    ) -> anyhow::Result<StreamFollower> {
        let client = redis::Client::open(format!("redis://{redis_addr}/{db}"))?;
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (stopping, stream) = (stop.clone(), stream.to_owned());
        let thread = std::thread::spawn(move || {
            let mut last_id = "0-0".to_owned();
            let mut connection = None;
            while !stopping.load(Ordering::Relaxed) {
                if connection.is_none() {
                    connection = client.get_connection_with_timeout(Duration::from_secs(1)).ok();
                    if connection.is_none() {
                        std::thread::sleep(Duration::from_millis(50));
                        continue;
                    }
                }
                let Some(conn) = connection.as_mut() else { continue };
                let reply: redis::RedisResult<Option<redis::streams::StreamReadReply>> = redis::cmd("XREAD")
                    .arg("COUNT")
                    .arg(1000)
                    .arg("BLOCK")
                    .arg(200)
                    .arg("STREAMS")
                    .arg(&stream)
                    .arg(&last_id)
                    .query(conn);
                let Ok(reply) = reply else {
                    // A restarted Redis (no persistence) starts its stream afresh, with later ids.
                    connection = None;
                    std::thread::sleep(Duration::from_millis(50));
                    continue;
                };
                for key in reply.map(|r| r.keys).unwrap_or_default() {
                    for entry in key.ids {
                        last_id = entry.id.clone();
                        on_entry(entry);
                    }
                }
            }
        });
        Ok(StreamFollower { stop, thread: Some(thread) })
    }
}

impl Drop for StreamFollower {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// An entry's field names, sorted.
fn field_names(entry: &redis::streams::StreamId) -> Vec<String> {
    let mut fields: Vec<String> = entry.map.keys().cloned().collect();
    fields.sort();
    fields
}

/// A field's bytes (empty when missing).
fn field_bytes(entry: &redis::streams::StreamId, field: &str) -> Vec<u8> {
    match entry.map.get(field) {
        Some(redis::Value::BulkString(bytes)) => bytes.clone(),
        Some(redis::Value::SimpleString(text)) => text.clone().into_bytes(),
        _ => Vec::new(),
    }
}

/// Polls `collected` until `done` holds for it; the error lists what did arrive.
fn wait_for_collected<T: Clone>(
    collected: &std::sync::Mutex<Vec<T>>,
    what: &str,
    timeout: Duration,
    mut done: impl FnMut(&[T]) -> bool,
    describe: impl Fn(&[T]) -> String,
) -> anyhow::Result<Vec<T>> {
    let deadline = Instant::now() + timeout;
    loop {
        let items = collected.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone();
        if done(&items) {
            return Ok(items);
        }
        if Instant::now() > deadline {
            bail!("timed out after {timeout:?} waiting for {what}; arrived: {}", describe(&items));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Reads the stream `events` of a Redis database in the background and keeps the entries
/// whose `source` is one agent id, in stream order. Entries are collected as they come, so the
/// stream's MAXLEN trimming and a restart of a Redis without persistence lose none of them.
pub struct EventCollector {
    events: std::sync::Arc<std::sync::Mutex<Vec<StreamEvent>>>,
    _follower: StreamFollower,
}

impl EventCollector {
    pub fn start(redis_addr: &str, db: u32, source: &str) -> anyhow::Result<EventCollector> {
        let events = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let (sink, source) = (events.clone(), source.to_owned());
        let follower = StreamFollower::start(redis_addr, db, "events", move |entry| {
            let event = StreamEvent {
                id: entry.id.clone(),
                fields: field_names(&entry),
                name: String::from_utf8_lossy(&field_bytes(&entry, "name")).into_owned(),
                source: String::from_utf8_lossy(&field_bytes(&entry, "source")).into_owned(),
                args: field_bytes(&entry, "args"),
                payload: field_bytes(&entry, "payload"),
            };
            if event.source == source {
                sink.lock().unwrap_or_else(std::sync::PoisonError::into_inner).push(event);
            }
        })?;
        Ok(EventCollector { events, _follower: follower })
    }

    /// What has arrived so far, in stream order.
    pub fn events(&self) -> Vec<StreamEvent> {
        self.events.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone()
    }

    /// Polls until `done` holds for what has arrived; the error lists what did.
    pub fn wait_for(
        &self,
        what: &str,
        timeout: Duration,
        done: impl FnMut(&[StreamEvent]) -> bool,
    ) -> anyhow::Result<Vec<StreamEvent>> {
        wait_for_collected(&self.events, what, timeout, done, |events| {
            format!("{:?}", events.iter().map(|e| e.name.as_str()).collect::<Vec<_>>())
        })
    }
}

/// Subscribes to a Redis pub/sub channel in the background and keeps every message whose
/// `source` is one agent id (Backend.AI's broadcast messages: `{"name", "source", "payload"}`
/// JSON). Stopped when dropped.
pub struct BroadcastCollector {
    messages: std::sync::Arc<std::sync::Mutex<Vec<serde_json::Value>>>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl BroadcastCollector {
    /// Returns once subscribed, so nothing published after it is missed.
    pub fn start(redis_addr: &str, channel: &str, source: &str) -> anyhow::Result<BroadcastCollector> {
        let client = redis::Client::open(format!("redis://{redis_addr}/"))?;
        let mut connection = client.get_connection_with_timeout(Duration::from_secs(3))?;
        connection.set_read_timeout(Some(Duration::from_millis(200)))?;
        let messages = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (sink, stopping, subscribe_to, source) =
            (messages.clone(), stop.clone(), channel.to_owned(), source.to_owned());
        let (subscribed_tx, subscribed_rx) = std::sync::mpsc::channel();
        let thread = std::thread::spawn(move || {
            let mut pubsub = connection.as_pubsub();
            let subscribed = pubsub.subscribe(&subscribe_to);
            let _ = subscribed_tx.send(subscribed.is_ok());
            while !stopping.load(Ordering::Relaxed) {
                let Ok(message) = pubsub.get_message() else { continue };
                let Ok(payload) = message.get_payload::<String>() else { continue };
                let Ok(json) = serde_json::from_str::<serde_json::Value>(&payload) else { continue };
                if json["source"] == source.as_str() {
                    sink.lock().unwrap_or_else(std::sync::PoisonError::into_inner).push(json);
                }
            }
        });
        if !subscribed_rx.recv_timeout(Duration::from_secs(5)).unwrap_or(false) {
            bail!("could not subscribe to {channel} on {redis_addr}");
        }
        Ok(BroadcastCollector { messages, stop, thread: Some(thread) })
    }

    /// Polls until `done` holds for what has arrived; the error lists the names that did.
    pub fn wait_for(
        &self,
        what: &str,
        timeout: Duration,
        done: impl FnMut(&[serde_json::Value]) -> bool,
    ) -> anyhow::Result<Vec<serde_json::Value>> {
        wait_for_collected(&self.messages, what, timeout, done, |messages| {
            format!("{:?}", messages.iter().map(|m| m["name"].as_str().unwrap_or("?")).collect::<Vec<_>>())
        })
    }
}

impl Drop for BroadcastCollector {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// A `docker-registry` of the test's own on 127.0.0.1 (with a login when started so), stopped
/// by PID when dropped.
pub struct LocalRegistry {
    child: Child,
    /// `127.0.0.1:<port>`.
    pub addr: String,
    dir: tempfile::TempDir,
}

impl LocalRegistry {
    pub fn start() -> anyhow::Result<LocalRegistry> {
        Self::launch(None)
    }

    /// A registry that answers only to `username` / `password` (htpasswd, bcrypt from the
    /// Backend.AI venv's `bcrypt`).
    pub fn start_with_login(username: &str, password: &str) -> anyhow::Result<LocalRegistry> {
        Self::launch(Some((username, password)))
    }

    fn launch(login: Option<(&str, &str)>) -> anyhow::Result<LocalRegistry> {
        let dir = tempfile::tempdir()?;
        let addr = format!("127.0.0.1:{}", free_loopback_port()?);
        let mut config = format!(
            "version: 0.1\nlog:\n  level: error\nstorage:\n  filesystem:\n    rootdirectory: {}\nhttp:\n  addr: {addr}\n",
            dir.path().join("data").display()
        );
        if let Some((username, password)) = login {
            let script = "import bcrypt, sys\nuser, pw = sys.stdin.read().split('\\n', 1)\n\
                          print(user + ':' + bcrypt.hashpw(pw.encode(), bcrypt.gensalt()).decode())";
            let (ok, line) = run_backendai_python(script, format!("{username}\n{password}").as_bytes());
            if !ok {
                bail!("hashing the registry password failed: {line}");
            }
            let htpasswd = dir.path().join("htpasswd");
            std::fs::write(&htpasswd, line.trim())?;
            config.push_str(&format!("auth:\n  htpasswd:\n    realm: test\n    path: {}\n", htpasswd.display()));
        }
        let config_path = dir.path().join("config.yml");
        std::fs::write(&config_path, config)?;
        let child = Command::new("docker-registry")
            .arg("serve")
            .arg(&config_path)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("docker-registry runs (cargo xtask setup installs it)")?;
        let registry = LocalRegistry { child, addr, dir };
        wait_until("the registry to listen", Duration::from_secs(10), || TcpStream::connect(&registry.addr).is_ok())?;
        Ok(registry)
    }

    /// `docker login` to this registry in its own client configuration ([`LocalRegistry::docker`]).
    pub fn login(&self, username: &str, password: &str) -> anyhow::Result<()> {
        let mut child = Command::new("docker")
            .env("DOCKER_CONFIG", self.dir.path().join("docker-client"))
            .args(["login", "-u", username, "--password-stdin", &self.addr])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()?;
        child.stdin.take().context("docker login's stdin")?.write_all(password.as_bytes())?;
        let out = child.wait_with_output()?;
        if !out.status.success() {
            bail!("docker login {}: {}", self.addr, String::from_utf8_lossy(&out.stderr));
        }
        Ok(())
    }

    /// Runs `docker` with a client configuration of this registry's own (so a `login` never
    /// touches the user's `~/.docker`); its stdout, or an error with its stderr.
    pub fn docker(&self, args: &[&str]) -> anyhow::Result<String> {
        let out =
            Command::new("docker").env("DOCKER_CONFIG", self.dir.path().join("docker-client")).args(args).output()?;
        if !out.status.success() {
            bail!("docker {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }
}

impl Drop for LocalRegistry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `BAI_AGENTCTL_BIN`, or `bai-agentctl` next to [`agent_binary`].
pub fn agentctl_binary() -> PathBuf {
    if let Some(path) = std::env::var_os("BAI_AGENTCTL_BIN") {
        return PathBuf::from(path);
    }
    agent_binary().with_file_name("bai-agentctl")
}

/// `BAI_TEST_ETCD` (`127.0.0.1:PORT`), the private etcd that `cargo xtask test` starts; fails
/// the test when it is not set (no silent skip).
pub fn test_etcd() -> String {
    match std::env::var("BAI_TEST_ETCD") {
        Ok(addr) if !addr.trim().is_empty() => addr.trim().to_owned(),
        _ => panic!("BAI_TEST_ETCD is not set: run the suite with `cargo xtask test`, which starts etcd"),
    }
}

/// An etcd v3 client of `addr` (`host:port`, plain HTTP) that has answered a request.
pub async fn etcd_client(addr: &str) -> anyhow::Result<etcd_client::Client> {
    let options = etcd_client::ConnectOptions::new()
        .with_connect_timeout(Duration::from_secs(5))
        .with_timeout(Duration::from_secs(5));
    let mut client = etcd_client::Client::connect([format!("http://{addr}")], Some(options))
        .await
        .with_context(|| format!("connecting to etcd at {addr}"))?;
    client.get("/", None).await.with_context(|| format!("etcd at {addr} does not answer"))?;
    Ok(client)
}

/// The value of `key` (and the id of its lease, 0 for none), if the key exists.
pub async fn etcd_get(client: &mut etcd_client::Client, key: &str) -> anyhow::Result<Option<(String, i64)>> {
    let response = client.get(key, None).await.with_context(|| format!("etcd get {key}"))?;
    Ok(response.kvs().first().map(|kv| (String::from_utf8_lossy(kv.value()).into_owned(), kv.lease())))
}

/// Whether an etcd answers `GET /health` with `"health":"true"` at `addr`.
pub fn etcd_healthy(addr: &str) -> bool {
    http_get(addr, "/health").is_ok_and(|(status, body)| status == 200 && body.contains("\"health\":\"true\""))
}

/// An `etcd` of a test's own on two free 127.0.0.1 ports (client, peer), its data in a
/// temporary directory; stopped by PID when dropped. [`EtcdServer::stop`] and
/// [`EtcdServer::restart`] make outages.
pub struct EtcdServer {
    pub port: u16,
    peer_port: u16,
    child: Option<Child>,
    dir: tempfile::TempDir,
}

impl EtcdServer {
    pub fn start() -> anyhow::Result<EtcdServer> {
        let [port, peer_port] = free_ports()?;
        let mut server = EtcdServer { port, peer_port, child: None, dir: tempfile::tempdir()? };
        server.restart(false)?;
        Ok(server)
    }

    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Starts it (again) on the same ports, with its data wiped first when `wipe` (a fresh
    /// cluster: every key and lease gone), and waits until it is healthy.
    pub fn restart(&mut self, wipe: bool) -> anyhow::Result<()> {
        anyhow::ensure!(self.child.is_none(), "etcd on port {} is already running", self.port);
        let data = self.dir.path().join("data");
        if wipe && data.exists() {
            std::fs::remove_dir_all(&data)?;
        }
        let log = std::fs::OpenOptions::new().create(true).append(true).open(self.dir.path().join("etcd.log"))?;
        let (client_url, peer_url) =
            (format!("http://127.0.0.1:{}", self.port), format!("http://127.0.0.1:{}", self.peer_port));
        let child = Command::new("etcd")
            .arg("--data-dir")
            .arg(&data)
            .args(["--name", "default", "--listen-client-urls", &client_url, "--advertise-client-urls", &client_url])
            .args(["--listen-peer-urls", &peer_url, "--initial-advertise-peer-urls", &peer_url])
            .args(["--initial-cluster", &format!("default={peer_url}")])
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting etcd (Debian package etcd-server; `cargo xtask setup` installs it)")?;
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        while !etcd_healthy(&self.addr()) {
            if let Some(child) = self.child.as_mut()
                && let Some(status) = child.try_wait()?
            {
                self.child = None;
                let log = std::fs::read_to_string(self.dir.path().join("etcd.log")).unwrap_or_default();
                bail!("etcd on port {} exited with {status}; its log:\n{log}", self.port);
            }
            if Instant::now() > deadline {
                bail!("etcd on port {} was not healthy within 30 s", self.port);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(())
    }

    /// SIGTERM to the server (by PID) and waits for it to exit; SIGKILL after 10 s.
    pub fn stop(&mut self) -> anyhow::Result<()> {
        stop_child(self.child.take().context("etcd is not running")?)
    }
}

impl Drop for EtcdServer {
    fn drop(&mut self) {
        if self.child.is_some() {
            let _ = self.stop();
        }
    }
}

/// SIGTERM to a child of ours (by PID), then SIGKILL if it has not exited within 10 s.
pub fn stop_child(mut child: Child) -> anyhow::Result<()> {
    let pid = i32::try_from(child.id())?;
    // SAFETY: signalling our own, unreaped child by pid.
    unsafe { libc::kill(pid, libc::SIGTERM) };
    let deadline = Instant::now() + Duration::from_secs(10);
    while child.try_wait()?.is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

/// A `prometheus` server of a test's own on 127.0.0.1, scraping `targets` every 500 ms,
/// stopped by PID when dropped.
pub struct PrometheusServer {
    pub addr: String,
    child: Option<Child>,
    dir: tempfile::TempDir,
}

impl PrometheusServer {
    pub fn start(targets: &[&str]) -> anyhow::Result<PrometheusServer> {
        Self::start_at(&format!("127.0.0.1:{}", free_loopback_port()?), targets)
    }

    /// [`PrometheusServer::start`] listening on `addr`.
    pub fn start_at(addr: &str, targets: &[&str]) -> anyhow::Result<PrometheusServer> {
        let dir = tempfile::tempdir()?;
        let addr = addr.to_owned();
        let targets: Vec<String> = targets.iter().map(|t| format!("\"{t}\"")).collect();
        let config = dir.path().join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 500ms\n  scrape_timeout: 400ms\nscrape_configs:\n  - job_name: bai-agent\n    \
                 static_configs:\n      - targets: [{}]\n",
                targets.join(", ")
            ),
        )?;
        let log = std::fs::File::create(dir.path().join("prometheus.log"))?;
        let child = Command::new("prometheus")
            .arg(format!("--config.file={}", config.display()))
            .arg(format!("--storage.tsdb.path={}", dir.path().join("data").display()))
            .arg(format!("--web.listen-address={addr}"))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting prometheus (Debian package prometheus; `cargo xtask setup` installs it)")?;
        let mut server = PrometheusServer { addr, child: Some(child), dir };
        let deadline = Instant::now() + Duration::from_secs(30);
        while !matches!(http_get(&server.addr, "/-/ready"), Ok((200, _))) {
            if let Some(child) = server.child.as_mut()
                && let Some(status) = child.try_wait()?
            {
                server.child = None;
                bail!("prometheus exited with {status}; its log:\n{}", server.log_text());
            }
            if Instant::now() > deadline {
                bail!("prometheus was not ready within 30 s; its log:\n{}", server.log_text());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(server)
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("prometheus.log")).unwrap_or_default()
    }

    /// `GET /api/v1/<path>`, parsed.
    pub fn api(&self, path: &str) -> anyhow::Result<serde_json::Value> {
        let (status, body) = http_get(&self.addr, &format!("/api/v1/{path}"))?;
        if status != 200 {
            bail!("prometheus answered {status} to {path}: {body}");
        }
        Ok(serde_json::from_str(&body)?)
    }

    /// The instant query `promql` (URL-encoded here), as its result vector.
    pub fn query(&self, promql: &str) -> anyhow::Result<Vec<serde_json::Value>> {
        let encoded: String = promql
            .bytes()
            .map(|b| match b {
                b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'_' | b'-' | b'.' => (b as char).to_string(),
                _ => format!("%{b:02X}"),
            })
            .collect();
        let reply = self.api(&format!("query?query={encoded}"))?;
        Ok(reply["data"]["result"].as_array().cloned().unwrap_or_default())
    }
}

impl Drop for PrometheusServer {
    fn drop(&mut self) {
        if let Some(child) = self.child.take() {
            let _ = stop_child(child);
        }
    }
}

/// One usage record as it arrived in a Redis stream: the entry id and the CloudEvent.
#[derive(Debug, Clone)]
pub struct UsageEntry {
    pub entry_id: String,
    /// The entry's field names, sorted.
    pub fields: Vec<String>,
    pub event: serde_json::Value,
}

impl UsageEntry {
    pub fn id(&self) -> &str {
        self.event["id"].as_str().unwrap_or_default()
    }

    pub fn kernel_id(&self) -> &str {
        self.event["data"]["kernel_id"].as_str().unwrap_or_default()
    }

    pub fn seq(&self) -> u64 {
        self.event["data"]["seq"].as_u64().unwrap_or(u64::MAX)
    }

    pub fn is_final(&self) -> bool {
        self.event["data"]["final"].as_bool().unwrap_or(false)
    }
}

/// Reads a usage stream in the background and keeps the records of one agent (`source` =
/// `bai-agent/{agent_id}`), in stream order, so a restart of a Redis without persistence loses
/// none of them.
pub struct UsageCollector {
    entries: std::sync::Arc<std::sync::Mutex<Vec<UsageEntry>>>,
    _follower: StreamFollower,
}

impl UsageCollector {
    pub fn start(redis_addr: &str, db: u32, stream: &str, agent_id: &str) -> anyhow::Result<UsageCollector> {
        let entries = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let (sink, source) = (entries.clone(), format!("bai-agent/{agent_id}"));
        let follower = StreamFollower::start(redis_addr, db, stream, move |entry| {
            let event: serde_json::Value = serde_json::from_slice(&field_bytes(&entry, "event")).unwrap_or_default();
            if event["source"] == source.as_str() {
                let fields = field_names(&entry);
                sink.lock().unwrap_or_else(std::sync::PoisonError::into_inner).push(UsageEntry {
                    entry_id: entry.id,
                    fields,
                    event,
                });
            }
        })?;
        Ok(UsageCollector { entries, _follower: follower })
    }

    pub fn entries(&self) -> Vec<UsageEntry> {
        self.entries.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone()
    }

    /// Polls until `done` holds for what has arrived.
    pub fn wait_for(
        &self,
        what: &str,
        timeout: Duration,
        done: impl FnMut(&[UsageEntry]) -> bool,
    ) -> anyhow::Result<Vec<UsageEntry>> {
        wait_for_collected(&self.entries, what, timeout, done, |entries| {
            format!("{:?}", entries.iter().map(UsageEntry::id).collect::<Vec<_>>())
        })
    }
}
