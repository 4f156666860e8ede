//! Query mode: the long-lived interpreter (POSIX shell or Python 3) that runs snippets with
//! state kept between them, streaming its stdout/stderr and reporting completion on a side pipe.
//!
//! Shell: `sh -i` in its own process group reads commands from its stdin; each snippet is
//! written to a file and run as `. FILE </dev/null; echo "SENTINEL done SEQ $?" >&9`. An
//! interactive shell abandons the current line (and its buffered input) on SIGINT and reads
//! on, so after an interrupt the runner writes the `echo` line again; a stale duplicate is
//! told apart by its SEQ.
//! Python: `python3 -u -c DRIVER` reads `code <json path>` / `input <json str>` lines on fd 3
//! and reports `SENTINEL ready|done N|input 0|1` on fd 4 (`driver.py`).

use std::{
    collections::BTreeMap,
    io,
    os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd},
    path::{Path, PathBuf},
    process::Stdio,
    time::Duration,
};

use bytes::Bytes;
use tokio::{
    io::{AsyncBufReadExt, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader},
    net::unix::pipe,
    process::{Child, Command},
    sync::mpsc,
};

/// How long a completion may take before the answer is "nothing".
const COMPLETE_TIMEOUT: Duration = Duration::from_secs(3);

use crate::{
    config::{Runtime, RuntimeKind},
    protocol::{Outbox, reply, waiting_input_payload},
};

/// The Python driver, run with `python3 -u -c`.
const PYTHON_DRIVER: &str = include_str!("driver.py");
/// Where the shell reports completion.
const SHELL_STATUS_FD: RawFd = 9;
/// Python driver's command input and status output.
const PY_CTL_FD: RawFd = 3;
const PY_STATUS_FD: RawFd = 4;
/// How long an interpreter may take to come up.
const START_TIMEOUT: Duration = Duration::from_secs(30);
const READ_CHUNK: usize = 64 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum InterpError {
    #[error("starting {path}: {source}")]
    Spawn { path: PathBuf, source: io::Error },
    #[error("interpreter I/O: {0}")]
    Io(#[from] io::Error),
    #[error("the interpreter did not become ready within {0:?}")]
    StartTimeout(Duration),
    /// The interpreter exited (e.g. `exit` in a snippet); it is restarted for the next one.
    #[error("the interpreter exited with code {0}")]
    Exited(i32),
}

/// What the status pipe said.
enum Status {
    Ready,
    /// Snippet sequence number (shell only; 0 from Python) and exit code.
    Done(u64, i32),
    WantsInput {
        is_password: bool,
    },
    /// Completion candidates (JSON list text).
    Completions(String),
}

/// One running interpreter process.
pub struct Interpreter {
    kind: RuntimeKind,
    child: Child,
    pgid: i32,
    commands: Box<dyn AsyncWrite + Unpin + Send>,
    stdout: pipe::Receiver,
    stderr: pipe::Receiver,
    status: BufReader<pipe::Receiver>,
    status_line: Vec<u8>,
    sentinel: String,
    scratch: PathBuf,
    runs: u64,
}

impl Interpreter {
    /// Starts the interpreter in `work_dir` and waits until it reports ready (output before
    /// that, such as a shell banner or "job control turned off", is discarded).
    pub async fn start(
        runtime: &Runtime,
        env: &BTreeMap<String, String>,
        work_dir: &Path,
        scratch: &Path,
    ) -> Result<Interpreter, InterpError> {
        let sentinel = random_token();
        let (stdout_r, stdout_w) = io::pipe()?;
        let (stderr_r, stderr_w) = io::pipe()?;
        let (status_r, status_w) = io::pipe()?;
        let status_w = high_fd(OwnedFd::from(status_w))?;
        let mut cmd = Command::new(&runtime.path);
        cmd.current_dir(work_dir)
            .envs(env)
            .stdout(Stdio::from(stdout_w))
            .stderr(Stdio::from(stderr_w))
            .kill_on_drop(true);
        crate::user::apply(&mut cmd, env);
        let mut fd_map = vec![(status_w.as_raw_fd(), SHELL_STATUS_FD)];
        let mut ctl_writer = None;
        match runtime.kind {
            RuntimeKind::Shell => {
                cmd.arg("-i").env("PS1", "").env("PS2", "").env_remove("ENV").stdin(Stdio::piped());
            }
            RuntimeKind::Python => {
                let (ctl_r, ctl_w) = io::pipe()?;
                let ctl_r = high_fd(OwnedFd::from(ctl_r))?;
                fd_map = vec![(status_w.as_raw_fd(), PY_STATUS_FD), (ctl_r.as_raw_fd(), PY_CTL_FD)];
                cmd.arg("-u").arg("-c").arg(PYTHON_DRIVER).env("BAI_KRUNNER_SENTINEL", &sentinel).stdin(Stdio::null());
                ctl_writer = Some((ctl_r, ctl_w));
            }
        }
        // SAFETY: only async-signal-safe calls (setsid, dup2, signal) between fork and exec; the
        // source fds are open in the parent and numbered ≥ 64, so no target clobbers one.
        unsafe {
            cmd.pre_exec(move || {
                crate::batch::detach_from_terminal()?;
                for &(from, to) in &fd_map {
                    if libc::dup2(from, to) < 0 {
                        return Err(io::Error::last_os_error());
                    }
                }
                // A runner started with SIGINT ignored must not pass that on: interrupt relies on it.
                libc::signal(libc::SIGINT, libc::SIG_DFL);
                Ok(())
            });
        }
        let mut child = cmd.spawn().map_err(|source| InterpError::Spawn { path: runtime.path.clone(), source })?;
        drop(cmd); // closes the child's ends held by the command
        drop(status_w);
        let pgid = child.id().and_then(|pid| i32::try_from(pid).ok()).unwrap_or(0);
        let commands: Box<dyn AsyncWrite + Unpin + Send> = match ctl_writer {
            Some((ctl_r, ctl_w)) => {
                drop(ctl_r);
                Box::new(pipe::Sender::from_owned_fd(OwnedFd::from(ctl_w))?)
            }
            None => match child.stdin.take() {
                Some(stdin) => Box::new(stdin),
                None => return Err(InterpError::Io(io::Error::other("shell stdin missing"))),
            },
        };
        let mut interp = Interpreter {
            kind: runtime.kind,
            child,
            pgid,
            commands,
            stdout: pipe::Receiver::from_owned_fd(OwnedFd::from(stdout_r))?,
            stderr: pipe::Receiver::from_owned_fd(OwnedFd::from(stderr_r))?,
            status: BufReader::new(pipe::Receiver::from_owned_fd(OwnedFd::from(status_r))?),
            status_line: Vec::new(),
            sentinel,
            scratch: scratch.to_path_buf(),
            runs: 0,
        };
        if interp.kind == RuntimeKind::Shell {
            let line = format!("echo \"{} ready\" >&{SHELL_STATUS_FD}\n", interp.sentinel);
            interp.commands.write_all(line.as_bytes()).await?;
            interp.commands.flush().await?;
        }
        let ready = tokio::time::timeout(START_TIMEOUT, interp.wait_ready()).await;
        match ready {
            Ok(result) => result?,
            Err(_) => return Err(InterpError::StartTimeout(START_TIMEOUT)),
        }
        tracing::info!(kind = ?interp.kind, pid = interp.pgid, "interpreter ready");
        Ok(interp)
    }

    /// The process group to signal for `interrupt`.
    pub fn pgid(&self) -> i32 {
        self.pgid
    }

    async fn wait_ready(&mut self) -> Result<(), InterpError> {
        let mut sink = vec![0u8; READ_CHUNK];
        let mut esink = vec![0u8; READ_CHUNK];
        loop {
            tokio::select! {
                biased;
                _ = self.stdout.read(&mut sink) => {}
                _ = self.stderr.read(&mut esink) => {}
                status = read_status(&mut self.status, &mut self.status_line, &self.sentinel) => match status? {
                    Some(Status::Ready) => {
                        drain(&self.stdout, None, "").await;
                        drain(&self.stderr, None, "").await;
                        return Ok(());
                    }
                    Some(_) => {}
                    None => return Err(InterpError::Exited(self.exit_code().await)),
                },
            }
        }
    }

    /// Runs one snippet, streaming `stdout`/`stderr` to `out` and answering `input()` from
    /// `inputs`; returns the snippet's exit code. `Err(Exited)` means the interpreter is gone.
    pub async fn run(
        &mut self,
        code: &str,
        out: &Outbox,
        inputs: &mut mpsc::UnboundedReceiver<String>,
        interrupts: &mut mpsc::UnboundedReceiver<()>,
    ) -> Result<i32, InterpError> {
        while interrupts.try_recv().is_ok() {}
        self.runs += 1;
        let file = self.scratch.join(format!("snippet-{}", self.runs));
        tokio::fs::write(&file, code).await?;
        let file_str = file.to_string_lossy().into_owned();
        let command = match self.kind {
            RuntimeKind::Shell => format!(
                ". {} </dev/null; echo \"{} done {} $?\" >&{SHELL_STATUS_FD}\n",
                shell_quote(&file_str),
                self.sentinel,
                self.runs
            ),
            RuntimeKind::Python => format!("code {}\n", serde_json::Value::String(file_str)),
        };
        self.commands.write_all(command.as_bytes()).await?;
        self.commands.flush().await?;
        let result = self.pump(out, inputs, interrupts).await;
        tokio::fs::remove_file(&file).await.ok();
        result
    }

    async fn pump(
        &mut self,
        out: &Outbox,
        inputs: &mut mpsc::UnboundedReceiver<String>,
        interrupts: &mut mpsc::UnboundedReceiver<()>,
    ) -> Result<i32, InterpError> {
        let mut buf = vec![0u8; READ_CHUNK];
        let mut ebuf = vec![0u8; READ_CHUNK];
        let mut stdout_open = true;
        let mut stderr_open = true;
        loop {
            tokio::select! {
                biased;
                n = self.stdout.read(&mut buf), if stdout_open => match n {
                    Ok(0) | Err(_) => stdout_open = false,
                    Ok(n) => out.send(reply::STDOUT, Bytes::copy_from_slice(&buf[..n])).await,
                },
                n = self.stderr.read(&mut ebuf), if stderr_open => match n {
                    Ok(0) | Err(_) => stderr_open = false,
                    Ok(n) => out.send(reply::STDERR, Bytes::copy_from_slice(&ebuf[..n])).await,
                },
                Some(()) = interrupts.recv() => if self.kind == RuntimeKind::Shell {
                    let line = format!("echo \"{} done {} $?\" >&{SHELL_STATUS_FD}\n", self.sentinel, self.runs);
                    self.commands.write_all(line.as_bytes()).await?;
                    self.commands.flush().await?;
                },
                status = read_status(&mut self.status, &mut self.status_line, &self.sentinel) => {
                    // Everything the interpreter wrote before reporting is in the pipes now.
                    drain(&self.stdout, Some(out), reply::STDOUT).await;
                    drain(&self.stderr, Some(out), reply::STDERR).await;
                    match status? {
                        Some(Status::Done(seq, code)) if self.kind == RuntimeKind::Python || seq == self.runs => {
                            return Ok(code);
                        }
                        Some(Status::Done(..)) | Some(Status::Ready) | Some(Status::Completions(_)) => {}
                        Some(Status::WantsInput { is_password }) => {
                            out.send(reply::WAITING_INPUT, waiting_input_payload(is_password)).await;
                            let Some(text) = self.wait_input(out, inputs).await? else {
                                return Err(InterpError::Exited(self.exit_code().await));
                            };
                            let line = format!("input {}\n", serde_json::Value::String(text));
                            self.commands.write_all(line.as_bytes()).await?;
                            self.commands.flush().await?;
                        }
                        None => return Err(InterpError::Exited(self.exit_code().await)),
                    }
                }
            }
        }
    }

    /// Waits for an `input` op while still forwarding output; `None` if the runner is closing.
    async fn wait_input(
        &mut self,
        out: &Outbox,
        inputs: &mut mpsc::UnboundedReceiver<String>,
    ) -> Result<Option<String>, InterpError> {
        let mut buf = vec![0u8; READ_CHUNK];
        let mut ebuf = vec![0u8; READ_CHUNK];
        loop {
            tokio::select! {
                text = inputs.recv() => return Ok(text),
                n = self.stdout.read(&mut buf) => if let Ok(n @ 1..) = n {
                    out.send(reply::STDOUT, Bytes::copy_from_slice(&buf[..n])).await;
                },
                n = self.stderr.read(&mut ebuf) => if let Ok(n @ 1..) = n {
                    out.send(reply::STDERR, Bytes::copy_from_slice(&ebuf[..n])).await;
                },
            }
        }
    }

    /// Python completion candidates for `text` from the interpreter's globals, as a JSON list;
    /// the shell profile completes without its interpreter (see `complete`).
    pub async fn complete(&mut self, text: &str) -> Result<String, InterpError> {
        if self.kind != RuntimeKind::Python {
            return Ok("[]".to_owned());
        }
        let line = format!("complete {}\n", serde_json::Value::String(text.to_owned()));
        self.commands.write_all(line.as_bytes()).await?;
        self.commands.flush().await?;
        let wait = async {
            loop {
                match read_status(&mut self.status, &mut self.status_line, &self.sentinel).await? {
                    Some(Status::Completions(list)) => return Ok(list),
                    Some(_) => {}
                    None => return Err(InterpError::Exited(-1)),
                }
            }
        };
        match tokio::time::timeout(COMPLETE_TIMEOUT, wait).await {
            Ok(result) => result,
            Err(_) => Ok("[]".to_owned()),
        }
    }

    async fn exit_code(&mut self) -> i32 {
        match tokio::time::timeout(Duration::from_secs(5), self.child.wait()).await {
            Ok(Ok(status)) => crate::batch::exit_code(status),
            _ => -1,
        }
    }
}

/// The next status line carrying our sentinel; `None` at EOF (the interpreter exited).
async fn read_status(
    status: &mut BufReader<pipe::Receiver>,
    status_line: &mut Vec<u8>,
    sentinel: &str,
) -> Result<Option<Status>, InterpError> {
    loop {
        // `read_until` is cancel-safe: a partial line stays in `status_line`.
        let n = status.read_until(b'\n', status_line).await?;
        if n == 0 && !status_line.ends_with(b"\n") {
            return Ok(None);
        }
        let line = String::from_utf8_lossy(status_line).trim_end().to_owned();
        status_line.clear();
        let Some(rest) = line.strip_prefix(sentinel) else {
            continue; // something else wrote to our fd
        };
        let mut words = rest.split_whitespace();
        let status = match (words.next(), words.next()) {
            (Some("ready"), _) => Status::Ready,
            (Some("done"), Some(first)) => match words.next() {
                Some(code) => Status::Done(first.parse().unwrap_or(0), code.parse().unwrap_or(-1)),
                None => Status::Done(0, first.parse().unwrap_or(-1)),
            },
            (Some("input"), flag) => Status::WantsInput { is_password: flag == Some("1") },
            (Some("completions"), Some(_)) => {
                Status::Completions(rest.trim_start().trim_start_matches("completions").trim().to_owned())
            }
            _ => continue,
        };
        return Ok(Some(status));
    }
}

/// Forwards what a pipe holds right now (bypassing the reactor's readiness cache).
async fn drain(pipe: &pipe::Receiver, out: Option<&Outbox>, kind: &'static str) {
    let mut buf = vec![0u8; READ_CHUNK];
    loop {
        // SAFETY: `buf` is a valid writable buffer of `buf.len()` bytes; the fd is open and non-blocking.
        let n = unsafe { libc::read(pipe.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        let Ok(n @ 1..) = usize::try_from(n) else { return };
        if let Some(out) = out {
            out.send(kind, Bytes::copy_from_slice(&buf[..n])).await;
        }
    }
}

/// Moves an fd to a number ≥ 64 (close-on-exec) so the child's `dup2`s cannot collide.
fn high_fd(fd: OwnedFd) -> io::Result<OwnedFd> {
    // SAFETY: `fd` is a valid open descriptor; F_DUPFD_CLOEXEC returns a new one we own.
    let new = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_DUPFD_CLOEXEC, 64) };
    if new < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `new` was just returned by fcntl and is owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(new) })
}

fn shell_quote(text: &str) -> String {
    format!("'{}'", text.replace('\'', r"'\''"))
}

/// A per-process random token (hash keys are seeded from the OS).
pub fn random_token() -> String {
    use std::hash::{BuildHasher, Hasher};
    let mut token = String::from("__bai_krunner_");
    for i in 0..2u64 {
        let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
        hasher.write_u64(i ^ u64::from(std::process::id()));
        token.push_str(&format!("{:016x}", hasher.finish()));
    }
    token
}
