//! The runner's main loop: binds PULL (REPL in) and PUSH (REPL out), dispatches ops, runs
//! query/batch jobs one at a time in arrival order, and answers `status`/`complete`/services
//! on the side. `interrupt` sends SIGINT to the running job's process group.

use std::{
    net::SocketAddr,
    path::PathBuf,
    sync::{Arc, Mutex},
    time::Duration,
};

use bytes::Bytes;
use tokio::sync::mpsc;
use zeromq::{PullSocket, PushSocket, Socket, SocketRecv, SocketSend, ZmqError, ZmqMessage};

use crate::{
    batch,
    config::RunnerConfig,
    interp::{InterpError, Interpreter},
    protocol::{self, Outbox, Request, reply},
    service::Services,
};

/// Outgoing messages waiting for the PUSH socket; a full queue slows the producers down.
const OUTBOX_CAPACITY: usize = 256;

#[derive(Debug, thiserror::Error)]
pub enum RunnerError {
    #[error("binding {addr}: {source}")]
    Bind { addr: SocketAddr, source: Box<ZmqError> },
    #[error("creating the scratch dir {path}: {source}")]
    Scratch { path: PathBuf, source: std::io::Error },
}

/// A queued query/batch job.
enum Job {
    Code(String),
    Clean(String),
    Build(String),
    Exec(String),
    Complete(String),
}

/// The process group of the job running now, if any.
type Running = Arc<Mutex<Option<i32>>>;

fn set_running(running: &Running, pgid: Option<i32>) {
    if let Ok(mut slot) = running.lock() {
        *slot = pgid;
    }
}

/// Binds the sockets and serves until `shutdown` resolves.
pub async fn run(config: RunnerConfig, shutdown: impl std::future::Future<Output = ()>) -> Result<(), RunnerError> {
    let in_addr = SocketAddr::new(config.bind, config.repl_in_port);
    let out_addr = SocketAddr::new(config.bind, config.repl_out_port);
    let mut pull = PullSocket::new();
    pull.bind(&format!("tcp://{in_addr}"))
        .await
        .map_err(|source| RunnerError::Bind { addr: in_addr, source: Box::new(source) })?;
    let mut push = PushSocket::new();
    push.bind(&format!("tcp://{out_addr}"))
        .await
        .map_err(|source| RunnerError::Bind { addr: out_addr, source: Box::new(source) })?;
    tracing::info!(%in_addr, %out_addr, runtime = ?config.runtime, "kernel runner listening");

    let scratch = std::env::temp_dir().join(format!("bai-krunner-{}", std::process::id()));
    std::fs::create_dir_all(&scratch).map_err(|source| RunnerError::Scratch { path: scratch.clone(), source })?;
    // The interpreter, running as the kernel's user, reads its snippets from here.
    crate::user::KernelUser::from_env(&config.child_env)
        .own(&scratch)
        .map_err(|source| RunnerError::Scratch { path: scratch.clone(), source })?;

    let (out_tx, out_rx) = mpsc::channel(OUTBOX_CAPACITY);
    let outbox = Outbox::new(out_tx);
    let sender = tokio::spawn(send_loop(push, out_rx));
    let (job_tx, job_rx) = mpsc::unbounded_channel();
    let (input_tx, input_rx) = mpsc::unbounded_channel();
    let (interrupt_tx, interrupt_rx) = mpsc::unbounded_channel();
    let running: Running = Arc::new(Mutex::new(None));
    let config = Arc::new(config);
    let worker = tokio::spawn(work_loop(
        config.clone(),
        scratch.clone(),
        outbox.clone(),
        job_rx,
        input_rx,
        interrupt_rx,
        running.clone(),
    ));
    let services = Arc::new(Services::new(
        config.service_defs_dir.clone(),
        config.work_dir.clone(),
        config.runtime.path.clone(),
        config.child_env.clone(),
    ));
    let started_at = protocol::monotonic_seconds();

    tokio::pin!(shutdown);
    loop {
        let message = tokio::select! {
            () = &mut shutdown => break,
            received = pull.recv() => match received {
                Ok(message) => message,
                Err(err) => {
                    tracing::debug!(%err, "REPL receive error");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            },
        };
        let frames: Vec<Bytes> = message.into_vec();
        let request = match Request::parse(&frames) {
            Ok(request) => request,
            Err(err) => {
                tracing::warn!(%err, "dropping a REPL message");
                continue;
            }
        };
        match request {
            Request::Code(code) => {
                job_tx.send(Job::Code(code)).ok();
            }
            Request::Clean(cmd) => {
                job_tx.send(Job::Clean(cmd)).ok();
            }
            Request::Build(cmd) => {
                job_tx.send(Job::Build(cmd)).ok();
            }
            Request::Exec(cmd) => {
                job_tx.send(Job::Exec(cmd)).ok();
            }
            Request::Input(text) => {
                input_tx.send(text).ok();
            }
            Request::Interrupt => {
                if interrupt(&running) {
                    interrupt_tx.send(()).ok();
                }
            }
            Request::Status => outbox.send(reply::STATUS, protocol::status_payload(started_at)).await,
            Request::Complete(payload) => {
                // Running code owns the interpreter; a completion never waits for it.
                if running.lock().ok().and_then(|slot| *slot).is_some() {
                    outbox.send(reply::COMPLETION, Bytes::from_static(b"[]")).await;
                } else {
                    job_tx.send(Job::Complete(crate::complete::request_text(&payload))).ok();
                }
            }
            Request::Event(data) => tracing::info!(event = %String::from_utf8_lossy(&data), "agent event"),
            Request::StartService(payload) => {
                let (services, outbox) = (services.clone(), outbox.clone());
                tokio::spawn(async move {
                    let result = services.start(&payload).await;
                    outbox.send(reply::SERVICE_RESULT, Bytes::from(result.to_string())).await;
                });
            }
            Request::ShutdownService(payload) => services.shutdown(&payload).await,
            Request::GetApps(name) => {
                outbox.send(reply::APPS_RESULT, Bytes::from(services.apps(&name).to_string())).await;
            }
        }
    }
    tracing::info!("kernel runner shutting down");
    worker.abort();
    drop(outbox);
    tokio::time::timeout(Duration::from_secs(1), sender).await.ok();
    std::fs::remove_dir_all(&scratch).ok();
    Ok(())
}

/// SIGINT to the running job's process group; false when nothing runs.
fn interrupt(running: &Running) -> bool {
    let pgid = running.lock().ok().and_then(|slot| *slot);
    match pgid {
        Some(pgid) if pgid > 0 => {
            tracing::info!(pgid, "interrupting the running code");
            // SAFETY: kill(2) with a negative pid signals the process group we created.
            unsafe { libc::kill(-pgid, libc::SIGINT) };
            true
        }
        _ => {
            tracing::debug!("interrupt with nothing running");
            false
        }
    }
}

/// Owns the PUSH socket. Like libzmq's PUSH, a message waits until an agent is connected.
async fn send_loop(mut push: PushSocket, mut rx: mpsc::Receiver<(&'static str, Bytes)>) {
    while let Some((op, payload)) = rx.recv().await {
        let frames = vec![Bytes::from_static(op.as_bytes()), payload];
        let Ok(mut message) = ZmqMessage::try_from(frames) else { continue };
        loop {
            match push.send(message).await {
                Ok(()) => break,
                Err(ZmqError::ReturnToSender { message: back, .. }) => {
                    message = back;
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Err(err) => {
                    tracing::warn!(%err, op, "REPL send failed; message dropped");
                    break;
                }
            }
        }
    }
}

/// Runs jobs one at a time, in arrival order.
async fn work_loop(
    config: Arc<RunnerConfig>,
    scratch: PathBuf,
    out: Outbox,
    mut jobs: mpsc::UnboundedReceiver<Job>,
    mut inputs: mpsc::UnboundedReceiver<String>,
    mut interrupts: mpsc::UnboundedReceiver<()>,
    running: Running,
) {
    let mut interp: Option<Interpreter> = None;
    let mut build_ok: Option<bool> = None;
    while let Some(job) = jobs.recv().await {
        match job {
            Job::Code(code) => {
                let code =
                    run_query(&config, &scratch, &out, &mut interp, &code, (&mut inputs, &mut interrupts), &running)
                        .await;
                set_running(&running, None);
                out.send(reply::FINISHED, protocol::exit_code_payload(code)).await;
            }
            Job::Clean(cmd) => {
                let code =
                    if cmd.is_empty() || cmd == "*" { 0 } else { run_batch(&config, &out, &cmd, &running).await };
                out.send(reply::CLEAN_FINISHED, protocol::exit_code_payload(code)).await;
            }
            Job::Build(cmd) => {
                let code = match cmd.as_str() {
                    "" => 0,
                    "*" if config.work_dir.join("Makefile").is_file() => {
                        run_batch(&config, &out, "make", &running).await
                    }
                    "*" => 0,
                    cmd => run_batch(&config, &out, cmd, &running).await,
                };
                build_ok = Some(code == 0);
                out.send(reply::BUILD_FINISHED, protocol::exit_code_payload(code)).await;
            }
            Job::Complete(text) => {
                let candidates = match config.runtime.kind {
                    crate::config::RuntimeKind::Shell => {
                        let path = config.child_env.get("PATH").cloned().or_else(|| std::env::var("PATH").ok());
                        let found = crate::complete::shell(&text, &config.work_dir, &path.unwrap_or_default());
                        serde_json::Value::from(found).to_string()
                    }
                    crate::config::RuntimeKind::Python => {
                        match python_completions(&config, &scratch, &mut interp, &text).await {
                            Some(list) => list,
                            None => "[]".to_owned(),
                        }
                    }
                };
                out.send(reply::COMPLETION, Bytes::from(candidates)).await;
            }
            Job::Exec(cmd) => {
                // Backend.AI skips the exec step after a failed build, with "command not found".
                let code = if build_ok.take() == Some(false) {
                    127
                } else if cmd.is_empty() {
                    0
                } else if cmd == "*" {
                    let fallback = match config.runtime.kind {
                        crate::config::RuntimeKind::Python => "python3 main.py",
                        crate::config::RuntimeKind::Shell => "sh main.sh",
                    };
                    run_batch(&config, &out, fallback, &running).await
                } else {
                    run_batch(&config, &out, &cmd, &running).await
                };
                out.send(reply::FINISHED, protocol::exit_code_payload(code)).await;
            }
        }
    }
}

async fn python_completions(
    config: &RunnerConfig,
    scratch: &std::path::Path,
    interp: &mut Option<Interpreter>,
    text: &str,
) -> Option<String> {
    if interp.is_none() {
        *interp = Interpreter::start(&config.runtime, &config.child_env, &config.work_dir, scratch).await.ok();
    }
    match interp.as_mut()?.complete(text).await {
        Ok(list) => Some(list),
        Err(err) => {
            tracing::warn!(%err, "completion failed; restarting the interpreter with the next snippet");
            *interp = None;
            None
        }
    }
}

async fn run_batch(config: &RunnerConfig, out: &Outbox, cmd: &str, running: &Running) -> i32 {
    let result = batch::run_command(cmd, &config.work_dir, &config.child_env, true, out, |pgid| {
        set_running(running, Some(pgid))
    })
    .await;
    set_running(running, None);
    match result {
        Ok(code) => code,
        Err(err) => {
            tracing::error!(%err, cmd, "batch command failed to run");
            -1
        }
    }
}

async fn run_query(
    config: &RunnerConfig,
    scratch: &std::path::Path,
    out: &Outbox,
    interp: &mut Option<Interpreter>,
    code: &str,
    (inputs, interrupts): (&mut mpsc::UnboundedReceiver<String>, &mut mpsc::UnboundedReceiver<()>),
    running: &Running,
) -> i32 {
    if interp.is_none() {
        match Interpreter::start(&config.runtime, &config.child_env, &config.work_dir, scratch).await {
            Ok(started) => *interp = Some(started),
            Err(err) => {
                tracing::error!(%err, "cannot start the interpreter");
                out.send(reply::STDERR, Bytes::from(format!("bai-krunner: {err}\n"))).await;
                return 127;
            }
        }
    }
    let Some(current) = interp.as_mut() else { return 127 };
    set_running(running, Some(current.pgid()));
    match current.run(code, out, inputs, interrupts).await {
        Ok(code) => code,
        Err(InterpError::Exited(code)) => {
            tracing::warn!(code, "the interpreter exited; it restarts with the next snippet");
            *interp = None;
            code
        }
        Err(err) => {
            tracing::error!(%err, "interpreter failure; restarting it with the next snippet");
            *interp = None;
            -1
        }
    }
}
