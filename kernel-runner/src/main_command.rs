//! The kernel's main command (`bai-krunner -- CMD…`): started next to the REPL, given the
//! container's stdio, sent the runner's SIGTERM, and its end is the runner's end.

use std::{collections::BTreeMap, io, path::Path, process::Stdio, time::Duration};

use tokio::process::{Child, Command};

/// How long the main command gets between SIGTERM and SIGKILL when the runner is stopped.
const STOP_GRACE: Duration = Duration::from_secs(5);

pub struct MainCommand {
    child: Child,
}

impl MainCommand {
    /// Starts `argv` in the work dir with the kernel's environment.
    pub fn start(argv: &[String], work_dir: &Path, env: &BTreeMap<String, String>) -> io::Result<MainCommand> {
        let Some((program, args)) = argv.split_first() else {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "empty main command"));
        };
        let mut cmd = Command::new(program);
        cmd.args(args)
            .current_dir(work_dir)
            .envs(env)
            .stdin(Stdio::inherit())
            .stdout(Stdio::inherit())
            .stderr(Stdio::inherit());
        crate::user::apply(&mut cmd, env);
        let child = cmd.spawn()?;
        tracing::info!(command = ?argv, pid = child.id(), "main command started");
        Ok(MainCommand { child })
    }

    /// Waits for the command to end; its exit code in shell terms (128 + signal when killed).
    pub async fn wait(&mut self) -> i32 {
        match self.child.wait().await {
            Ok(status) => shell_exit_code(status),
            Err(err) => {
                tracing::error!(%err, "waiting for the main command failed");
                1
            }
        }
    }

    /// SIGTERM, then SIGKILL after a grace period; returns the exit code.
    pub async fn stop(&mut self) -> i32 {
        if let Some(pid) = self.child.id().and_then(|pid| i32::try_from(pid).ok()) {
            // SAFETY: kill(2) on our own child's pid.
            unsafe { libc::kill(pid, libc::SIGTERM) };
        }
        match tokio::time::timeout(STOP_GRACE, self.wait()).await {
            Ok(code) => code,
            Err(_) => {
                tracing::warn!("the main command ignored SIGTERM; killing it");
                self.child.start_kill().ok();
                self.wait().await
            }
        }
    }
}

/// `$?` as a shell reports it: the exit code, or 128 + the signal number.
pub fn shell_exit_code(status: std::process::ExitStatus) -> i32 {
    use std::os::unix::process::ExitStatusExt;
    status.code().or_else(|| status.signal().map(|signal| 128 + signal)).unwrap_or(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn exit_codes_follow_the_shell() {
        let env = BTreeMap::new();
        let dir = std::env::temp_dir();
        let argv = |s: &str| vec!["/bin/sh".to_owned(), "-c".to_owned(), s.to_owned()];
        let mut ok = MainCommand::start(&argv("exit 3"), &dir, &env).expect("spawn");
        assert_eq!(ok.wait().await, 3);
        let mut killed = MainCommand::start(&argv("kill -9 $$"), &dir, &env).expect("spawn");
        assert_eq!(killed.wait().await, 137);
        let mut slow = MainCommand::start(&argv("sleep 30"), &dir, &env).expect("spawn");
        assert_eq!(slow.stop().await, 128 + libc::SIGTERM);
        assert!(MainCommand::start(&[], &dir, &env).is_err());
    }
}
