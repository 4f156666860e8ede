//! A real Backend.AI 26.9.6 control plane for the end-to-end tests: PostgreSQL, etcd, Redis
//! and the manager from PyPI, stood up by `tests/e2e/stack.sh` on free loopback ports and
//! stopped (by PID) when dropped; and the user's `backend.ai` CLI against it.

use std::{
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, bail};

use crate::backendai_python;

/// The example keypair of Backend.AI's fixtures (a superadmin), which the CLI signs with.
const ACCESS_KEY: &str = "AKIAIOSFODNN7EXAMPLE";
const SECRET_KEY: &str = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY";

/// The project (registry namespace) of the `local` registry the fixtures define.
pub const REGISTRY_PROJECT: &str = "e2e";

/// A running control plane; stopped when dropped.
pub struct ControlPlane {
    dir: tempfile::TempDir,
    venv: PathBuf,
    pub redis_addr: String,
    pub redis_port: u16,
    pub etcd_addr: String,
    pub manager_addr: String,
    /// Where the manager looks for Prometheus (`[metric] addr`): the kernels' live stats come
    /// from there in 26.9; the test starts one scraping the agent.
    pub prometheus_addr: String,
    pg_port: u16,
}

/// What a CLI command printed, and whether it succeeded.
#[derive(Debug)]
pub struct CliOutput {
    pub success: bool,
    pub stdout: String,
    pub stderr: String,
}

impl CliOutput {
    /// Both streams, for assertion messages.
    pub fn text(&self) -> String {
        format!("stdout:\n{}\nstderr:\n{}", self.stdout, self.stderr)
    }
}

/// `BAI_TEST_BACKENDAI_INSTALL`: the unpacked `backend.ai-install` wheel `cargo xtask setup`
/// leaves (the manager's configuration templates and fixtures).
fn install_dir() -> PathBuf {
    let dir = std::env::var_os("BAI_TEST_BACKENDAI_INSTALL").map(PathBuf::from).unwrap_or_else(|| {
        panic!("BAI_TEST_BACKENDAI_INSTALL is not set: `cargo xtask test` (or `cargo xtask e2e`) sets it up")
    });
    assert!(
        dir.join("ai/backend/install/configs/manager.toml").exists(),
        "{} has no backend.ai-install templates; run `cargo xtask setup`",
        dir.display()
    );
    dir
}

fn stack_script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("e2e/stack.sh")
}

impl ControlPlane {
    /// Stands the control plane up (a minute or two); fails with the stack's logs.
    pub fn start() -> anyhow::Result<ControlPlane> {
        let venv = backendai_python().parent().and_then(Path::parent).context("the venv of the python")?.to_path_buf();
        if !venv.join("bin/backend.ai").exists() {
            bail!("{} has no backend.ai CLI (backend.ai-manager, -client); run `cargo xtask setup`", venv.display());
        }
        let dir = tempfile::Builder::new().prefix("bai-e2e-").tempdir()?;
        // PostgreSQL runs as `postgres` and must reach its data directory inside.
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))?;
        let ports = crate::free_ports::<7>()?;
        let [pg, etcd, etcd_peer, redis, manager, manager_internal, prometheus] = ports;
        let plane = ControlPlane {
            dir,
            venv,
            redis_addr: format!("127.0.0.1:{redis}"),
            redis_port: redis,
            etcd_addr: format!("127.0.0.1:{etcd}"),
            manager_addr: format!("127.0.0.1:{manager}"),
            prometheus_addr: format!("127.0.0.1:{prometheus}"),
            pg_port: pg,
        };
        let out = Command::new("bash")
            .arg(stack_script())
            .arg("up")
            .envs([
                ("E2E_DIR", plane.dir.path().to_path_buf()),
                ("E2E_VENV", plane.venv.clone()),
                ("E2E_INSTALL", install_dir()),
            ])
            .envs(
                [
                    ("E2E_PG_PORT", pg),
                    ("E2E_ETCD_PORT", etcd),
                    ("E2E_ETCD_PEER_PORT", etcd_peer),
                    ("E2E_REDIS_PORT", redis),
                    ("E2E_MANAGER_PORT", manager),
                    ("E2E_MANAGER_INTERNAL_PORT", manager_internal),
                    ("E2E_PROMETHEUS_PORT", prometheus),
                ]
                .map(|(k, v)| (k, v.to_string())),
            )
            .env("E2E_REGISTRY_PROJECT", REGISTRY_PROJECT)
            .stdin(Stdio::null())
            .output()
            .context("running tests/e2e/stack.sh")?;
        println!("{}", String::from_utf8_lossy(&out.stdout));
        if !out.status.success() {
            bail!(
                "the Backend.AI control plane did not come up: {}\n{}\n{}",
                String::from_utf8_lossy(&out.stderr),
                plane.log_tail("manager", 80),
                plane.log_tail("schema", 40)
            );
        }
        Ok(plane)
    }

    /// The last `lines` lines of one of the stack's logs (`manager`, `postgres`, `schema`, …).
    pub fn log_tail(&self, name: &str, lines: usize) -> String {
        let path = self.dir.path().join("logs").join(format!("{name}.log"));
        let text = std::fs::read_to_string(&path).unwrap_or_default();
        let tail: Vec<&str> = text.lines().rev().take(lines).collect();
        format!("--- {} ---\n{}", path.display(), tail.into_iter().rev().collect::<Vec<_>>().join("\n"))
    }

    /// A directory of this run for the test's own files (scratch roots, uploads).
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// `backend.ai <args>` as the example superadmin, with a time limit; run in `cwd`.
    pub fn cli_in(&self, cwd: &Path, args: &[&str], timeout: Duration) -> CliOutput {
        let out = Command::new("timeout")
            .arg(timeout.as_secs().to_string())
            .arg(self.venv.join("bin/backend.ai"))
            .args(args)
            .current_dir(cwd)
            .env("BACKEND_ENDPOINT", format!("http://{}", self.manager_addr))
            .env("BACKEND_ENDPOINT_TYPE", "api")
            .env("BACKEND_ACCESS_KEY", ACCESS_KEY)
            .env("BACKEND_SECRET_KEY", SECRET_KEY)
            .env("PYTHONWARNINGS", "ignore")
            .stdin(Stdio::null())
            .output()
            .expect("running the backend.ai CLI");
        let out = CliOutput {
            success: out.status.success(),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        };
        println!("$ backend.ai {}\n{}", args.join(" "), out.text());
        out
    }

    /// `program` (the venv's `backend.ai`, its Python, …) with the client's environment: the
    /// manager's endpoint and the example superadmin's keys. Nothing printed, no time limit:
    /// for callers that time the command themselves (the benchmarks).
    pub fn client_command(&self, program: &Path) -> Command {
        let mut command = Command::new(program);
        command
            .env("BACKEND_ENDPOINT", format!("http://{}", self.manager_addr))
            .env("BACKEND_ENDPOINT_TYPE", "api")
            .env("BACKEND_ACCESS_KEY", ACCESS_KEY)
            .env("BACKEND_SECRET_KEY", SECRET_KEY)
            .env("PYTHONWARNINGS", "ignore")
            .stdin(Stdio::null());
        command
    }

    /// The venv the control plane runs from (`bin/backend.ai`, `bin/python`).
    pub fn venv(&self) -> &Path {
        &self.venv
    }

    pub fn cli(&self, args: &[&str]) -> CliOutput {
        self.cli_in(self.dir.path(), args, Duration::from_secs(180))
    }

    /// `backend.ai mgr <args>` with the manager's configuration (administration commands).
    pub fn mgr(&self, args: &[&str]) -> CliOutput {
        let manager = self.dir.path().join("manager");
        let config = manager.join("manager.toml");
        let config = config.to_string_lossy();
        let mut full = vec!["mgr", "-f", config.as_ref()];
        full.extend_from_slice(args);
        self.cli_in(&manager, &full, Duration::from_secs(180))
    }

    /// One SQL query's rows (`psql -tA`: `|`-separated fields, one row per line).
    pub fn sql(&self, query: &str) -> anyhow::Result<String> {
        let out = Command::new("runuser")
            .args(["-u", "postgres", "--", "psql", "-h", "127.0.0.1", "-p", &self.pg_port.to_string()])
            .args(["-d", "backend", "-tA", "-v", "ON_ERROR_STOP=1", "-c", query])
            .output()
            .context("running psql")?;
        if !out.status.success() {
            bail!("psql {query:?}: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
    }

    /// Waits until `query` returns `expected` (trimmed); the last answer in the error.
    pub fn wait_for_sql(&self, query: &str, expected: &str, timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        let mut last = String::new();
        while Instant::now() < deadline {
            match self.sql(query) {
                Ok(rows) if rows == expected => return Ok(()),
                Ok(rows) => last = rows,
                Err(err) => last = err.to_string(),
            }
            std::thread::sleep(Duration::from_millis(500));
        }
        bail!("{query:?} did not return {expected:?} within {timeout:?}; last: {last:?}")
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        let out = Command::new("bash").arg(stack_script()).arg("down").env("E2E_DIR", self.dir.path()).output();
        if let Ok(out) = out
            && !out.status.success()
        {
            eprintln!("stopping the control plane: {}", String::from_utf8_lossy(&out.stderr));
        }
    }
}
