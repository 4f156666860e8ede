//! `bench-exec`: what routing code through the agent costs, against talking to the kernel
//! runner directly over ZeroMQ, in the same run on the same kernels.
//!
//! 1. Round trip of a trivial snippet (`echo` in the busybox shell kernel, `pass` in the
//!    python3 kernel): `execute` (query mode, waiting for `finished`) through [`RpcClient`],
//!    against a PUSH/PULL pair connected straight to a second kernel's published REPL ports
//!    sending `code` and reading until `finished`. Both paths run in alternating blocks.
//! 2. Streaming: a snippet printing SIZE bytes, collected through `execute` steps (flush
//!    0.1 s, as `bai-agentctl exec` does) against reading the runner's messages directly.
//!
//! Usage: `bench-exec [RUNS] [STREAM_MB]` (defaults 1000 and 256).

use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use bai_agent::rpc::client::RpcClient;
use bai_agent_tests::{
    Agent, BUSYBOX_IMAGE, PYTHON_IMAGE,
    bench::{Summary, load_average, machine_description, ms, us},
    kernels::{create, created_id, field, kernel_config},
    require_environment, unique,
};
use bytes::Bytes;
use rmpv::Value;
use zeromq::{PullSocket, PushSocket, Socket, SocketRecv, SocketSend, ZmqMessage};

const WARM_UP: usize = 50;
/// The timed runs of each path come in this many alternating blocks.
const BLOCKS: usize = 10;
const FIRST_PORT: u16 = 25000;

fn main() -> anyhow::Result<()> {
    let usage = "usage: bench-exec [RUNS] [STREAM_MB]";
    let mut args = std::env::args().skip(1);
    let runs: usize = args.next().map(|s| s.parse()).transpose().context(usage)?.unwrap_or(1000);
    let stream_mb: usize = args.next().map(|s| s.parse()).transpose().context(usage)?.unwrap_or(256);
    ensure!(runs >= BLOCKS && stream_mb > 0, "{usage}: RUNS >= {BLOCKS}, STREAM_MB > 0");
    require_environment();
    if std::env::var_os("RUST_LOG").is_none() {
        // SAFETY: no other thread exists yet.
        unsafe { std::env::set_var("RUST_LOG", "info") };
    }
    let load_before = load_average();
    let dir = tempfile::tempdir()?;
    let toml = format!(
        "[container]\nscratch-root = \"{scratch}\"\nmount-root = \"{vfolders}\"\nport-range = [{FIRST_PORT}, {last}]\n\
         [resource]\nreserved-cpu = 0\nreserved-mem = \"512m\"\n[kernel-runner]\noutput-limit = \"4g\"\n",
        scratch = dir.path().join("scratch").display(),
        vfolders = dir.path().join("vfolders").display(),
        last = FIRST_PORT + 39,
    );
    std::fs::create_dir_all(dir.path().join("vfolders"))?;
    let agent = Agent::start(&toml)?;
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let (results, streamed) = rt.block_on(async {
        let client = RpcClient::connect(&agent.rpc_addr).await?;
        let mut results = Vec::new();
        let mut streamed = None;
        for (image, label, snippet) in
            [(BUSYBOX_IMAGE, "shell `echo hi`", "echo hi"), (PYTHON_IMAGE, "python `pass`", "pass")]
        {
            let routed = start(&client, image).await?;
            let direct = start(&client, image).await?;
            let mut repl = DirectRepl::connect(&direct.1).await?;
            for _ in 0..WARM_UP {
                agent_round_trip(&client, &routed.0, snippet).await?;
                repl.round_trip(snippet).await?;
            }
            let (mut through_agent, mut straight) = (Vec::with_capacity(runs), Vec::with_capacity(runs));
            for _ in 0..BLOCKS {
                for _ in 0..runs / BLOCKS {
                    through_agent.push(agent_round_trip(&client, &routed.0, snippet).await?);
                }
                for _ in 0..runs / BLOCKS {
                    straight.push(repl.round_trip(snippet).await?);
                }
            }
            results.push((label, Summary::of(&through_agent), Summary::of(&straight)));
            if image == BUSYBOX_IMAGE {
                let bytes = stream_mb << 20;
                let code = format!("head -c {bytes} /dev/zero");
                let through_agent = agent_stream(&client, &routed.0, &code, bytes).await?;
                let straight = repl.stream(&code, bytes).await?;
                streamed = Some((through_agent, straight));
            }
            // The node has room for two such kernels at a time.
            drop(repl);
            for kernel in [&routed.0, &direct.0] {
                client.call("destroy_kernel", vec![kernel.as_str().into(), "bench".into()], vec![]).await?;
            }
        }
        anyhow::Ok((results, streamed))
    })?;

    println!("Code execution, {}", machine_description()?);
    println!();
    println!("Load average (1 min) before: {load_before}, after: {}", load_average());
    println!();
    println!("| snippet | path | runs | p50 µs | p90 µs | p99 µs | mean µs | max µs |");
    println!("|---|---|---:|---:|---:|---:|---:|---:|");
    let mut added = Vec::new();
    for (label, through_agent, straight) in &results {
        for (path, s) in [("agent `execute`", through_agent), ("direct ZeroMQ", straight)] {
            println!(
                "| {label} | {path} | {runs} | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} |",
                us(s.p50),
                us(s.p90),
                us(s.p99),
                us(s.mean),
                us(s.max)
            );
        }
        added.push((label, through_agent.p50.saturating_sub(straight.p50)));
    }
    println!();
    for (label, extra) in added {
        println!("Agent adds at p50 for {label}: {:.3} ms (target: under 0.3 ms)", ms(extra));
    }
    if let Some((through_agent, straight)) = streamed {
        println!();
        println!(
            "Streaming {stream_mb} MiB of shell output: through the agent {:.0} MiB/s ({:.2} s), direct {:.0} MiB/s ({:.2} s)",
            mib_per_second(through_agent),
            through_agent.1.as_secs_f64(),
            mib_per_second(straight),
            straight.1.as_secs_f64()
        );
    }
    Ok(())
}

/// A started kernel: its id and container id.
async fn start(client: &RpcClient, image: &str) -> anyhow::Result<(String, String)> {
    let kernel = unique("bench-kernel");
    let created = create(client, "bench", &kernel, kernel_config(image, "1", "536870912"))
        .await
        .map_err(|err| anyhow::anyhow!("create_kernels: {err}"))?;
    Ok((kernel, created_id(&created, "container_id")))
}

async fn execute(
    client: &RpcClient,
    kernel: &str,
    run: &str,
    mode: &str,
    code: &str,
    flush: f64,
) -> anyhow::Result<Value> {
    let args = vec![
        "bench".into(),
        kernel.into(),
        2.into(),
        run.into(),
        mode.into(),
        code.into(),
        Value::Nil,
        if flush > 0.0 { Value::F64(flush) } else { Value::Nil },
    ];
    Ok(client.call("execute", args, vec![]).await?)
}

async fn agent_round_trip(client: &RpcClient, kernel: &str, snippet: &str) -> anyhow::Result<Duration> {
    let run = unique("run");
    let started = Instant::now();
    let result = execute(client, kernel, &run, "query", snippet, 0.0).await?;
    let elapsed = started.elapsed();
    if field(&result, "status").as_str() != Some("finished") {
        bail!("execute did not finish: {result}");
    }
    Ok(elapsed)
}

/// Bytes received and the time they took.
async fn agent_stream(
    client: &RpcClient,
    kernel: &str,
    code: &str,
    expected: usize,
) -> anyhow::Result<(usize, Duration)> {
    let run = unique("stream");
    let started = Instant::now();
    let mut received = 0;
    let mut result = execute(client, kernel, &run, "query", code, 0.1).await?;
    loop {
        for item in field(&result, "console").as_array().into_iter().flatten() {
            if let Some([_, data]) = item.as_array().map(Vec::as_slice) {
                received += match data {
                    Value::String(s) => s.as_bytes().len(),
                    Value::Binary(b) => b.len(),
                    _ => 0,
                };
            }
        }
        match field(&result, "status").as_str() {
            Some("finished") => break,
            Some("continued") => result = execute(client, kernel, &run, "continue", "", 0.1).await?,
            other => bail!("unexpected status {other:?}"),
        }
    }
    ensure!(received == expected, "received {received} of {expected} bytes through the agent");
    Ok((received, started.elapsed()))
}

/// A PUSH/PULL pair straight to a kernel's published REPL ports, as the agent itself holds.
struct DirectRepl {
    push: PushSocket,
    pull: PullSocket,
}

impl DirectRepl {
    async fn connect(container: &str) -> anyhow::Result<DirectRepl> {
        let port = |p: u16| -> anyhow::Result<u16> {
            let out = std::process::Command::new("docker").args(["port", container, &p.to_string()]).output()?;
            let text = String::from_utf8_lossy(&out.stdout).into_owned();
            text.lines().next().and_then(|l| l.rsplit(':').next()).and_then(|p| p.trim().parse().ok()).context(text)
        };
        let (in_port, out_port) = (port(2000)?, port(2001)?);
        let mut pull = PullSocket::new();
        let mut push = PushSocket::new();
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let attempt = async {
                pull.connect(&format!("tcp://127.0.0.1:{out_port}")).await?;
                push.connect(&format!("tcp://127.0.0.1:{in_port}")).await
            };
            match tokio::time::timeout(Duration::from_secs(2), attempt).await {
                Ok(Ok(())) => break,
                _ if Instant::now() < deadline => tokio::time::sleep(Duration::from_millis(100)).await,
                _ => bail!("cannot reach the runner of {container}"),
            }
        }
        Ok(DirectRepl { push, pull })
    }

    async fn send_code(&mut self, code: &str) -> anyhow::Result<()> {
        let frames = vec![Bytes::from_static(b"code"), Bytes::copy_from_slice(code.as_bytes())];
        self.push.send(ZmqMessage::try_from(frames).map_err(|e| anyhow::anyhow!("{e}"))?).await?;
        Ok(())
    }

    /// Reads messages until `finished`; the output bytes seen.
    async fn until_finished(&mut self) -> anyhow::Result<usize> {
        let mut received = 0;
        loop {
            let message = self.pull.recv().await?;
            let frames = message.into_vec();
            match frames.first().map(|op| &op[..]) {
                Some(b"finished") => return Ok(received),
                Some(b"stdout" | b"stderr") => received += frames.get(1).map_or(0, Bytes::len),
                _ => {}
            }
        }
    }

    async fn round_trip(&mut self, snippet: &str) -> anyhow::Result<Duration> {
        let started = Instant::now();
        self.send_code(snippet).await?;
        self.until_finished().await?;
        Ok(started.elapsed())
    }

    async fn stream(&mut self, code: &str, expected: usize) -> anyhow::Result<(usize, Duration)> {
        let started = Instant::now();
        self.send_code(code).await?;
        let received = self.until_finished().await?;
        ensure!(received == expected, "received {received} of {expected} bytes directly");
        Ok((received, started.elapsed()))
    }
}

fn mib_per_second((bytes, elapsed): (usize, Duration)) -> f64 {
    bytes as f64 / f64::from(1 << 20) / elapsed.as_secs_f64().max(1e-9)
}
