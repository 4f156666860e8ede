//! Batch mode: one `clean`/`build`/`exec` command at a time through `/bin/sh -c` in the work
//! dir, in its own process group, output streamed until the command exits and its pipes close.

use std::{collections::BTreeMap, io, os::unix::process::ExitStatusExt, path::Path, process::Stdio};

use bytes::Bytes;
use tokio::{io::AsyncReadExt, process::Command};

use crate::protocol::{Outbox, reply};

const READ_CHUNK: usize = 64 * 1024;

/// A process's exit code as Backend.AI reports it: the code, or minus the signal number.
pub fn exit_code(status: std::process::ExitStatus) -> i32 {
    status.code().or_else(|| status.signal().map(|signal| -signal)).unwrap_or(-1)
}

/// Makes the child lead a new session and process group (the group `interrupt` signals)
/// without a controlling terminal. A container's TTY would otherwise stop a child in a
/// background group that touches it (SIGTTIN/SIGTTOU), as an interactive shell does at start.
/// Only for use between fork and exec.
pub fn detach_from_terminal() -> io::Result<()> {
    // SAFETY: setsid(2) is async-signal-safe and takes no pointers.
    if unsafe { libc::setsid() } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Runs `command_line` with `/bin/sh -c`; `on_start` gets the process group id (for interrupt).
pub async fn run_command(
    command_line: &str,
    work_dir: &Path,
    env: &BTreeMap<String, String>,
    batch_mode: bool,
    out: &Outbox,
    on_start: impl FnOnce(i32),
) -> io::Result<i32> {
    let mut cmd = Command::new("/bin/sh");
    cmd.arg("-c")
        .arg(command_line)
        .current_dir(work_dir)
        .envs(env)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    if batch_mode {
        cmd.env("_BACKEND_BATCH_MODE", "1");
    }
    crate::user::apply(&mut cmd, env);
    // SAFETY: `setsid` and `signal` are async-signal-safe.
    unsafe {
        cmd.pre_exec(|| {
            detach_from_terminal()?;
            libc::signal(libc::SIGINT, libc::SIG_DFL);
            Ok(())
        });
    }
    let mut child = cmd.spawn()?;
    on_start(child.id().and_then(|pid| i32::try_from(pid).ok()).unwrap_or(0));
    let (Some(mut stdout), Some(mut stderr)) = (child.stdout.take(), child.stderr.take()) else {
        return Err(io::Error::other("child pipes missing"));
    };
    let mut buf = vec![0u8; READ_CHUNK];
    let mut ebuf = vec![0u8; READ_CHUNK];
    let (mut stdout_open, mut stderr_open) = (true, true);
    while stdout_open || stderr_open {
        tokio::select! {
            biased;
            n = stdout.read(&mut buf), if stdout_open => match n {
                Ok(0) | Err(_) => stdout_open = false,
                Ok(n) => out.send(reply::STDOUT, Bytes::copy_from_slice(&buf[..n])).await,
            },
            n = stderr.read(&mut ebuf), if stderr_open => match n {
                Ok(0) | Err(_) => stderr_open = false,
                Ok(n) => out.send(reply::STDERR, Bytes::copy_from_slice(&ebuf[..n])).await,
            },
        }
    }
    Ok(exit_code(child.wait().await?))
}
