//! Subprocess helpers: print-and-run, capture, probe with a timeout, and SIGINT handling; and
//! the progress lines every task prints.
//!
//! Every failure message names the command that failed, the way it would be typed in a shell.

use std::{
    ffi::OsStr,
    io::Read,
    os::unix::process::{CommandExt, ExitStatusExt},
    process::{Child, Command, ExitStatus, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};

/// Runs `cmd` with inherited stdio after printing it (`$ ...`); fails unless it exits 0.
pub fn run(cmd: &mut Command) -> Result<()> {
    let status = status(cmd)?;
    if !status.success() {
        bail!("`{}` failed: {}", display(cmd), describe(status));
    }
    Ok(())
}

/// Runs `cmd` with inherited stdio after printing it (`$ ...`) and returns how it ended.
///
/// While the child runs, xtask ignores SIGINT: Ctrl-C reaches the child from the terminal
/// (same process group), and xtask outlives it to clean up (stop services, restore sysctls)
/// and report. The child gets SIGINT's default disposition back (an ignored signal would be
/// inherited across exec).
pub fn status(cmd: &mut Command) -> Result<ExitStatus> {
    println!("$ {}", display(cmd));
    let guard = SigintIgnored::new();
    default_sigint(cmd);
    let mut child = spawn(cmd)?;
    let status = child.wait().with_context(|| format!("waiting for `{}`", display(cmd)))?;
    drop(guard);
    Ok(status)
}

/// Runs `first | second` with inherited stdin of `first`, stdout of `second` and both stderrs,
/// after printing it; fails unless both exit 0 (SIGINT as in [`status`]).
pub fn pipe(first: &mut Command, second: &mut Command) -> Result<()> {
    let shown = format!("{} | {}", display(first), display(second));
    println!("$ {shown}");
    let guard = SigintIgnored::new();
    default_sigint(first);
    default_sigint(second);
    let mut producer = spawn(first.stdout(Stdio::piped()))?;
    let pipe = producer.stdout.take().context("the first command of a pipe has no stdout")?;
    let consumer = spawn(second.stdin(Stdio::from(pipe)));
    let mut consumer = match consumer {
        Ok(child) => child,
        Err(err) => {
            // Not reaped yet, so the PID is still this child's.
            let _ = producer.kill();
            let _ = producer.wait();
            return Err(err);
        }
    };
    let second_status = consumer.wait().with_context(|| format!("waiting for `{}`", display(second)))?;
    let first_status = producer.wait().with_context(|| format!("waiting for `{}`", display(first)))?;
    drop(guard);
    if !second_status.success() {
        bail!("`{shown}` failed: `{}` ended with {}", display(second), describe(second_status));
    }
    if !first_status.success() {
        bail!("`{shown}` failed: `{}` ended with {}", display(first), describe(first_status));
    }
    Ok(())
}

/// Gives the child SIGINT's default disposition back (xtask ignores it while children run,
/// and an ignored signal would be inherited across exec).
fn default_sigint(cmd: &mut Command) {
    // SAFETY: the closure runs between fork and exec and only calls signal(2), which is
    // async-signal-safe.
    unsafe {
        cmd.pre_exec(|| {
            libc::signal(libc::SIGINT, libc::SIG_DFL);
            Ok(())
        });
    }
}

/// Runs `cmd` quietly and returns its stdout (trimmed); fails with its stderr unless it exits 0.
pub fn output(cmd: &mut Command) -> Result<String> {
    let out = cmd.stdin(Stdio::null()).output().with_context(|| format!("cannot start `{}`", display(cmd)))?;
    if !out.status.success() {
        bail!("`{}` failed: {}{}", display(cmd), describe(out.status), stderr_suffix(&out.stderr));
    }
    String::from_utf8(out.stdout)
        .map(|s| s.trim().to_owned())
        .with_context(|| format!("`{}` printed something that is not UTF-8", display(cmd)))
}

/// Runs `cmd` quietly and says whether it started and exited 0.
pub fn probe(cmd: &mut Command) -> bool {
    cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::null()).status().is_ok_and(|s| s.success())
}

/// What a command run with [`probe_timeout`] did.
pub struct Probe {
    /// `None` when it ran past the timeout and was killed.
    pub status: Option<ExitStatus>,
    pub stdout: String,
    pub stderr: String,
}

/// Runs `cmd` quietly with a time limit; kills it (that PID only) when it runs past `timeout`.
pub fn probe_timeout(cmd: &mut Command, timeout: Duration) -> Result<Probe> {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot start `{}`", display(cmd)))?;
    let stdout = drain(child.stdout.take());
    let stderr = drain(child.stderr.take());
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(status) = child.try_wait().with_context(|| format!("waiting for `{}`", display(cmd)))? {
            break Some(status);
        }
        if Instant::now() >= deadline {
            // The child is not reaped yet, so its PID cannot have been reused.
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        thread::sleep(Duration::from_millis(50));
    };
    Ok(Probe { status, stdout: stdout.join().unwrap_or_default(), stderr: stderr.join().unwrap_or_default() })
}

fn drain<R: Read + Send + 'static>(pipe: Option<R>) -> thread::JoinHandle<String> {
    thread::spawn(move || {
        let mut buf = Vec::new();
        if let Some(mut pipe) = pipe {
            let _ = pipe.read_to_end(&mut buf);
        }
        String::from_utf8_lossy(&buf).trim().to_owned()
    })
}

fn spawn(cmd: &mut Command) -> Result<Child> {
    cmd.spawn().with_context(|| {
        format!("cannot start `{}` (is `{}` installed and on PATH?)", display(cmd), cmd.get_program().to_string_lossy())
    })
}

/// "exit status 3", "killed by signal 9", ...
pub fn describe(status: ExitStatus) -> String {
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exit status {code}"),
        (None, Some(signal)) => format!("killed by signal {signal}"),
        _ => status.to_string(),
    }
}

/// The shell exit code that stands for `status` (128 + signal when killed by one).
pub fn exit_code(status: ExitStatus) -> u8 {
    match (status.code(), status.signal()) {
        (Some(code), _) => u8::try_from(code & 0xff).unwrap_or(1),
        (None, Some(signal)) => u8::try_from((128 + signal) & 0xff).unwrap_or(1),
        _ => 1,
    }
}

fn stderr_suffix(stderr: &[u8]) -> String {
    let text = String::from_utf8_lossy(stderr);
    let text = text.trim();
    if text.is_empty() { String::new() } else { format!("\n{text}") }
}

/// The command as one would type it: `VAR=value program args...`, quoted where needed.
pub fn display(cmd: &Command) -> String {
    let envs = cmd.get_envs().filter_map(|(key, value)| value.map(|value| format!("{}={}", quote(key), quote(value))));
    let words = std::iter::once(quote(cmd.get_program())).chain(cmd.get_args().map(quote));
    envs.chain(words).collect::<Vec<_>>().join(" ")
}

fn quote(word: &OsStr) -> String {
    let word = word.to_string_lossy();
    let plain = !word.is_empty() && word.chars().all(|c| c.is_ascii_alphanumeric() || "-_./:=+,@%".contains(c));
    if plain {
        word.into_owned()
    } else if word.chars().any(char::is_control) {
        // bash's $'...' shows control characters (the \x1f in CARGO_ENCODED_RUSTFLAGS).
        let mut quoted = String::from("$'");
        for c in word.chars() {
            match c {
                '\\' | '\'' => {
                    quoted.push('\\');
                    quoted.push(c);
                }
                c if c.is_control() => quoted.push_str(&format!("\\x{:02x}", u32::from(c))),
                c => quoted.push(c),
            }
        }
        quoted.push('\'');
        quoted
    } else {
        format!("'{}'", word.replace('\'', r"'\''"))
    }
}

/// Ignores SIGINT in xtask until dropped, then puts back what was there before.
struct SigintIgnored {
    previous: libc::sighandler_t,
}

impl SigintIgnored {
    fn new() -> Self {
        // SAFETY: installs SIG_IGN, no handler code runs.
        let previous = unsafe { libc::signal(libc::SIGINT, libc::SIG_IGN) };
        Self { previous }
    }
}

impl Drop for SigintIgnored {
    fn drop(&mut self) {
        if self.previous != libc::SIG_ERR {
            // SAFETY: restores the disposition signal(2) returned earlier.
            unsafe { libc::signal(libc::SIGINT, self.previous) };
        }
    }
}

/// Prints `==> step: what`: a setup step starting.
pub fn step(name: &str, what: &str) {
    println!("==> {name}: {what}");
}

/// Prints that the step succeeded.
pub fn ok() {
    println!("    ok");
}

/// Prints that the step found its work done.
pub fn already_present() {
    println!("    already present");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_quotes_what_the_shell_would_split() {
        let mut cmd = Command::new("docker");
        cmd.args(["version", "--format", "{{.Server.Version}}", "it's"]).env("A", "b c").env("F", "-Ca\x1f-Cb's");
        assert_eq!(
            display(&cmd),
            r"A='b c' F=$'-Ca\x1f-Cb\'s' docker version --format '{{.Server.Version}}' 'it'\''s'"
        );
    }

    #[test]
    fn probe_timeout_kills_a_slow_command() -> Result<()> {
        let started = Instant::now();
        let probe = probe_timeout(Command::new("sleep").arg("30"), Duration::from_millis(200))?;
        assert!(probe.status.is_none());
        assert!(started.elapsed() < Duration::from_secs(10));
        let probe = probe_timeout(Command::new("sh").args(["-c", "echo out; echo err >&2"]), Duration::from_secs(10))?;
        assert!(probe.status.is_some_and(|s| s.success()));
        assert_eq!((probe.stdout.as_str(), probe.stderr.as_str()), ("out", "err"));
        Ok(())
    }

    #[test]
    fn child_gets_sigint_back_while_xtask_ignores_it() -> Result<()> {
        let status = status(Command::new("sh").args(["-c", "kill -INT $$; exit 0"]))?;
        assert_eq!(status.signal(), Some(libc::SIGINT), "{status:?}");
        assert_eq!(exit_code(status), 130);
        Ok(())
    }

    #[test]
    fn pipe_feeds_the_second_and_names_a_failure() -> Result<()> {
        pipe(Command::new("echo").arg("through"), Command::new("grep").args(["-q", "^through$"]))?;
        let err = pipe(Command::new("sh").args(["-c", "exit 4"]), &mut Command::new("cat")).unwrap_err();
        assert_eq!(err.to_string(), "`sh -c 'exit 4' | cat` failed: `sh -c 'exit 4'` ended with exit status 4");
        let err = pipe(&mut Command::new("true"), Command::new("sh").args(["-c", "cat; exit 5"])).unwrap_err();
        assert!(err.to_string().ends_with("ended with exit status 5"), "{err}");
        Ok(())
    }

    #[test]
    fn run_names_the_failed_command() {
        let err = run(Command::new("sh").args(["-c", "exit 3"])).unwrap_err();
        assert_eq!(err.to_string(), "`sh -c 'exit 3'` failed: exit status 3");
        let err = output(&mut Command::new("xtask-no-such-program")).unwrap_err();
        assert!(err.to_string().contains("xtask-no-such-program"), "{err}");
    }
}
