//! The session's bootstrap script (`bootstrap.sh` in the work dir, written by the agent from
//! the kernel config's `bootstrap_script`): run once with `/bin/sh` before the kernel serves,
//! as Backend.AI's kernel runner does, its output going to the container's log.

use std::{collections::BTreeMap, path::Path, process::Stdio, time::Duration};

use tokio::process::Command;

/// The script's name in the work dir.
pub const SCRIPT: &str = "bootstrap.sh";
/// How long a bootstrap script may run before the runner gives up on it and serves anyway.
pub const TIMEOUT: Duration = Duration::from_secs(600);

/// Runs `work_dir/bootstrap.sh` when it is there and waits for it (at most [`TIMEOUT`]); a
/// failing or hanging script is logged, and the kernel serves all the same.
pub async fn run_if_present(work_dir: &Path, env: &BTreeMap<String, String>) {
    let script = work_dir.join(SCRIPT);
    if !script.is_file() {
        return;
    }
    tracing::info!(script = %script.display(), "running the bootstrap script");
    let mut cmd = Command::new("/bin/sh");
    cmd.arg(&script)
        .current_dir(work_dir)
        .envs(env)
        .stdin(Stdio::null())
        .stdout(Stdio::inherit())
        .stderr(Stdio::inherit())
        .kill_on_drop(true);
    crate::user::apply(&mut cmd, env);
    let child = cmd.spawn();
    let mut child = match child {
        Ok(child) => child,
        Err(err) => return tracing::error!(%err, "cannot start the bootstrap script"),
    };
    match tokio::time::timeout(TIMEOUT, child.wait()).await {
        Ok(Ok(status)) if status.success() => tracing::info!("the bootstrap script finished"),
        Ok(Ok(status)) => tracing::warn!(%status, "the bootstrap script failed; the kernel starts anyway"),
        Ok(Err(err)) => tracing::error!(%err, "waiting for the bootstrap script failed"),
        Err(_) => {
            tracing::warn!(timeout = ?TIMEOUT, "the bootstrap script ran too long and was killed");
            child.kill().await.ok();
        }
    }
}
