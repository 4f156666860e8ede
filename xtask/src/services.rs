//! Background daemons that xtask starts (dockerd, and test services such as Redis, etcd and
//! Prometheus): own session, stdio to a log file, stopped by PID.

use std::{
    fs::{self, OpenOptions},
    io::{Read, Write},
    net::{TcpListener, TcpStream},
    os::unix::process::CommandExt,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result};

use crate::cmd;

/// How long [`Service`] waits after SIGTERM before it sends SIGKILL.
const STOP_GRACE: Duration = Duration::from_secs(5);

/// Spawns `cmd` as a daemon: its own session (`setsid`), stdin from /dev/null, stdout and
/// stderr appended to `log`. CI waits for whoever holds its output pipes, so a daemon must not
/// keep them. The caller owns the returned child; dropping it neither waits nor kills.
pub fn spawn_daemon(cmd: &mut Command, log: &Path) -> Result<Child> {
    if let Some(dir) = log.parent() {
        fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let out = OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .with_context(|| format!("opening log file {}", log.display()))?;
    let err = out.try_clone().with_context(|| format!("opening log file {}", log.display()))?;
    cmd.stdin(Stdio::null()).stdout(Stdio::from(out)).stderr(Stdio::from(err));
    // SAFETY: setsid(2) is async-signal-safe; it only fails when the child already leads a
    // process group, which a freshly forked child never does.
    unsafe {
        cmd.pre_exec(|| {
            libc::setsid();
            Ok(())
        });
    }
    println!("$ {} >>{} 2>&1 &", cmd::display(cmd), log.display());
    cmd.spawn().with_context(|| {
        format!(
            "cannot start `{}` (is `{}` installed and on PATH?)",
            cmd::display(cmd),
            cmd.get_program().to_string_lossy()
        )
    })
}

/// The last `lines` lines of a log file, for error messages.
pub fn log_tail(log: &Path, lines: usize) -> String {
    match fs::read(log) {
        Ok(bytes) => {
            let text = String::from_utf8_lossy(&bytes);
            let all: Vec<&str> = text.lines().collect();
            all[all.len().saturating_sub(lines)..].join("\n")
        }
        Err(err) => format!("(cannot read {}: {err})", log.display()),
    }
}

/// A daemon started for the length of one xtask run. Dropping it stops exactly the process it
/// started: SIGTERM, then SIGKILL after [`STOP_GRACE`]. The child stays unreaped until then, so
/// its PID cannot have been handed to another process.
#[allow(dead_code, reason = "test services (Redis, etcd, Prometheus) start through it next")]
pub struct Service {
    name: String,
    child: Child,
    log: PathBuf,
}

#[allow(dead_code, reason = "test services (Redis, etcd, Prometheus) start through it next")]
impl Service {
    /// Starts `cmd` as a daemon (see [`spawn_daemon`]) logging to `<log_dir>/<name>.log`.
    pub fn start(name: &str, mut cmd: Command, log_dir: &Path) -> Result<Self> {
        let log = log_dir.join(format!("{name}.log"));
        let child = spawn_daemon(&mut cmd, &log).with_context(|| format!("starting {name}"))?;
        Ok(Self { name: name.to_owned(), child, log })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn log(&self) -> &Path {
        &self.log
    }

    /// Whether the process is still alive (reaps it when it has exited).
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Polls `ready` until it returns true, failing when the daemon exits or `timeout` passes;
    /// the error carries the log's last lines.
    pub fn wait_ready(&mut self, timeout: Duration, mut ready: impl FnMut() -> bool) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if ready() {
                return Ok(());
            }
            if !self.is_running() {
                anyhow::bail!(
                    "{} exited before it was ready; last lines of {}:\n{}",
                    self.name,
                    self.log.display(),
                    log_tail(&self.log, 20)
                );
            }
            if Instant::now() >= deadline {
                anyhow::bail!(
                    "{} was not ready after {} s; last lines of {}:\n{}",
                    self.name,
                    timeout.as_secs(),
                    self.log.display(),
                    log_tail(&self.log, 20)
                );
            }
            thread::sleep(Duration::from_millis(100));
        }
    }

    fn stop(&mut self) {
        if !self.is_running() {
            return;
        }
        let Ok(pid) = libc::pid_t::try_from(self.child.id()) else {
            return;
        };
        // SAFETY: plain kill(2) of our own unreaped child.
        unsafe { libc::kill(pid, libc::SIGTERM) };
        let deadline = Instant::now() + STOP_GRACE;
        while Instant::now() < deadline {
            if !self.is_running() {
                println!("    stopped {} (pid {pid})", self.name);
                return;
            }
            thread::sleep(Duration::from_millis(50));
        }
        eprintln!("    {} (pid {pid}) ignored SIGTERM for {} s; sending SIGKILL", self.name, STOP_GRACE.as_secs());
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The Redis port tried first for the tests' private `redis-server` (then the next few, then
/// any free port); never the default 6379, so a developer's own Redis is not touched.
pub const TEST_REDIS_PORT: u16 = 16379;

/// Starts a private `redis-server` for the tests on a free 127.0.0.1 port, without
/// persistence (`--save "" --appendonly no`), logging to `<log_dir>/redis.log`, and waits until
/// it answers PING. Returns the service (stopped by PID when dropped) and its `127.0.0.1:PORT`.
pub fn start_test_redis(log_dir: &Path) -> Result<(Service, String)> {
    let port = (TEST_REDIS_PORT..TEST_REDIS_PORT + 20)
        .find(|&port| TcpListener::bind(("127.0.0.1", port)).is_ok())
        .map_or_else(|| Ok::<u16, anyhow::Error>(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port()), Ok)?;
    let addr = format!("127.0.0.1:{port}");
    let mut cmd = Command::new("redis-server");
    cmd.args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
        .arg("--dir")
        .arg(log_dir);
    fs::create_dir_all(log_dir).with_context(|| format!("creating {}", log_dir.display()))?;
    let mut service = Service::start("redis", cmd, log_dir)?;
    service.wait_ready(Duration::from_secs(20), || redis_answers(&addr))?;
    println!("    redis-server (pid {}) on {addr}", service.pid());
    Ok((service, addr))
}

/// The etcd client port tried first for the tests' private `etcd` (peer port: the next one;
/// then the next few pairs, then any free ports); never the default 2379/2380.
pub const TEST_ETCD_PORT: u16 = 12379;

/// Starts a private `etcd` (v3 API) for the tests on free 127.0.0.1 ports, with its data in
/// `<log_dir>/etcd-data` (wiped first), logging to `<log_dir>/etcd.log`, and waits until it
/// answers `/health`. Returns the service (stopped by PID when dropped) and its `127.0.0.1:PORT`.
pub fn start_test_etcd(log_dir: &Path) -> Result<(Service, String)> {
    let free = |port: u16| TcpListener::bind(("127.0.0.1", port)).is_ok();
    let (client, peer) = match (TEST_ETCD_PORT..TEST_ETCD_PORT + 20).step_by(2).find(|&p| free(p) && free(p + 1)) {
        Some(port) => (port, port + 1),
        None => {
            let (a, b) = (TcpListener::bind("127.0.0.1:0")?, TcpListener::bind("127.0.0.1:0")?);
            (a.local_addr()?.port(), b.local_addr()?.port())
        }
    };
    let (addr, client_url, peer_url) =
        (format!("127.0.0.1:{client}"), format!("http://127.0.0.1:{client}"), format!("http://127.0.0.1:{peer}"));
    let data = log_dir.join("etcd-data");
    if data.exists() {
        fs::remove_dir_all(&data).with_context(|| format!("wiping {}", data.display()))?;
    }
    fs::create_dir_all(log_dir).with_context(|| format!("creating {}", log_dir.display()))?;
    let mut cmd = Command::new("etcd");
    cmd.arg("--data-dir")
        .arg(&data)
        .args(["--name", "default", "--listen-client-urls", &client_url, "--advertise-client-urls", &client_url])
        .args(["--listen-peer-urls", &peer_url, "--initial-advertise-peer-urls", &peer_url])
        .args(["--initial-cluster", &format!("default={peer_url}")]);
    let mut service = Service::start("etcd", cmd, log_dir)?;
    service.wait_ready(Duration::from_secs(30), || etcd_healthy(&addr))?;
    println!("    etcd (pid {}) on {addr}", service.pid());
    Ok((service, addr))
}

/// Whether an etcd at `addr` answers `GET /health` with `"health":"true"`.
pub fn etcd_healthy(addr: &str) -> bool {
    let Ok(mut stream) = TcpStream::connect(addr) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(1)));
    let mut reply = String::new();
    stream.write_all(format!("GET /health HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes()).is_ok()
        && stream.read_to_string(&mut reply).is_ok()
        && reply.contains("\"health\":\"true\"")
}

/// Whether a Redis at `addr` answers PING.
pub fn redis_answers(addr: &str) -> bool {
    let Ok(mut stream) = TcpStream::connect(addr) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(1)));
    let mut reply = [0u8; 7];
    stream.write_all(b"PING\r\n").is_ok() && stream.read_exact(&mut reply).is_ok() && &reply == b"+PONG\r\n"
}

#[cfg(test)]
mod tests {
    use super::*;

    fn alive(pid: u32) -> bool {
        let pid = libc::pid_t::try_from(pid).expect("pid fits pid_t");
        // SAFETY: signal 0 only checks that the process exists.
        unsafe { libc::kill(pid, 0) == 0 }
    }

    fn log_dir(test: &str) -> PathBuf {
        std::env::temp_dir().join(format!("xtask-services-{test}-{}", std::process::id()))
    }

    #[test]
    fn service_logs_and_is_stopped_on_drop() -> Result<()> {
        let dir = log_dir("drop");
        let mut cmd = Command::new("sh");
        cmd.args(["-c", "echo hello; echo oops >&2; exec sleep 1000"]);
        let mut service = Service::start("sleeper", cmd, &dir)?;
        let pid = service.pid();
        let log = service.log().to_path_buf();
        service.wait_ready(Duration::from_secs(10), || {
            fs::read_to_string(&log).is_ok_and(|s| s.contains("hello") && s.contains("oops"))
        })?;
        assert!(alive(pid));
        let started = Instant::now();
        drop(service);
        assert!(started.elapsed() < STOP_GRACE);
        assert!(!alive(pid), "pid {pid} survived the drop");
        fs::remove_dir_all(&dir)?;
        Ok(())
    }

    #[test]
    fn service_that_ignores_sigterm_gets_sigkill() -> Result<()> {
        let dir = log_dir("kill");
        let mut cmd = Command::new("sh");
        // An ignored signal stays ignored across exec.
        cmd.args(["-c", "trap '' TERM; echo up; exec sleep 1000"]);
        let mut service = Service::start("stubborn", cmd, &dir)?;
        let pid = service.pid();
        let log = service.log().to_path_buf();
        service.wait_ready(Duration::from_secs(10), || fs::read_to_string(&log).is_ok_and(|s| s.contains("up")))?;
        let started = Instant::now();
        drop(service);
        assert!(started.elapsed() >= STOP_GRACE);
        assert!(!alive(pid), "pid {pid} survived SIGKILL");
        fs::remove_dir_all(&dir)?;
        Ok(())
    }

    #[test]
    fn test_redis_answers_and_is_stopped_on_drop() -> Result<()> {
        let dir = log_dir("redis");
        let (service, addr) = start_test_redis(&dir)?;
        let pid = service.pid();
        assert!(addr.starts_with("127.0.0.1:"), "{addr}");
        assert!(redis_answers(&addr));
        drop(service);
        assert!(!alive(pid), "redis-server (pid {pid}) survived the drop");
        assert!(!redis_answers(&addr));
        fs::remove_dir_all(&dir)?;
        Ok(())
    }

    #[test]
    fn test_etcd_is_healthy_and_is_stopped_on_drop() -> Result<()> {
        let dir = log_dir("etcd");
        let (service, addr) = start_test_etcd(&dir)?;
        let pid = service.pid();
        assert!(addr.starts_with("127.0.0.1:"), "{addr}");
        assert!(etcd_healthy(&addr));
        drop(service);
        assert!(!alive(pid), "etcd (pid {pid}) survived the drop");
        assert!(!etcd_healthy(&addr));
        fs::remove_dir_all(&dir)?;
        Ok(())
    }

    #[test]
    fn wait_ready_reports_an_early_exit_with_the_log() -> Result<()> {
        let dir = log_dir("early");
        let mut cmd = Command::new("sh");
        cmd.args(["-c", "echo cannot bind port; exit 1"]);
        let mut service = Service::start("failing", cmd, &dir)?;
        let err = service.wait_ready(Duration::from_secs(10), || false).unwrap_err().to_string();
        assert!(err.contains("failing exited before it was ready"), "{err}");
        assert!(err.contains("cannot bind port"), "{err}");
        fs::remove_dir_all(&dir)?;
        Ok(())
    }
}
