//! `bai-agentctl`: the manager-side CLI. Each subcommand is one RPC call to a running agent
//! (callosum over ZeroMQ, as Backend.AI's manager makes it), printed for people or as JSON.

use std::{
    collections::BTreeMap,
    io::{IsTerminal, Write},
    path::PathBuf,
    process::ExitCode,
    time::{Duration, Instant},
};

use anyhow::{Context, anyhow, bail};
use bai_agent::rpc::{CallOptions, RpcClient};
use base64::Engine;
use clap::{Parser, Subcommand};
use rmpv::Value;

const JSON_HELP: &str = "\
JSON output (--json): the method's result converted from msgpack. Maps become objects
(non-string keys are written as their JSON text), bytes become {\"$binary\": \"<base64>\"},
msgpack extension values become {\"$ext\": <type>, \"$data\": \"<base64>\"}. With `download`,
--json prints the bytes in the {\"$binary\": …} wrapper instead of raw.

Errors (connection refused, no reply within --timeout, a FAILURE reply) print one line
`bai-agentctl: <problem>` on stderr and exit with status 1.";

/// Talk to a bai-agent (or any Backend.AI agent) over its manager-facing RPC.
#[derive(Debug, Parser)]
#[command(name = "bai-agentctl", version, after_long_help = JSON_HELP, after_help = "See --help for the JSON output format.")]
struct Cli {
    /// The agent's RPC address: tcp://HOST:PORT or HOST:PORT.
    #[arg(
        long,
        visible_alias = "addr",
        value_name = "tcp://HOST:PORT",
        env = "BAI_AGENT_ADDR",
        default_value = "127.0.0.1:6001",
        global = true
    )]
    agent: String,
    /// Print the result as JSON (see the end of --help for how msgpack values map).
    #[arg(long, global = true)]
    json: bool,
    /// Seconds to wait for the connection and for each reply.
    #[arg(long, value_name = "SECS", default_value_t = 60.0, global = true)]
    timeout: f64,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// `ping(msg)`: the agent echoes MSG.
    Ping {
        #[arg(default_value = "ping")]
        msg: String,
    },
    /// `gather_hwinfo()`: the node's devices.
    Hwinfo,
    /// `scan_gpu_alloc_map()`: the share of each GPU that kernels hold.
    GpuAllocMap,
    /// `get_local_config()`: the configuration the agent runs with.
    Config,
    /// `health()`: the agent's health report.
    Health,
    /// `create_kernels(...)`: start kernel(s) of one session.
    Create(CreateArgs),
    /// `list_kernels()`: the kernels the agent runs.
    List,
    /// `get_logs(kernel_id)`: a kernel's container logs.
    Logs { kernel: String },
    /// `set_egress_cap(kernel_id, bits_per_sec)`: a running kernel's egress cap (0: the
    /// node's default alone); prints the cap it is held to now.
    EgressCap {
        kernel: String,
        /// Bits per second.
        bits_per_sec: u64,
    },
    /// `destroy_kernel(kernel_id, session_id, reason)`: stop and remove a kernel.
    Destroy {
        kernel: String,
        /// The kernel's session (looked up with `list_kernels` when not given).
        #[arg(long, value_name = "ID")]
        session: Option<String>,
        /// The reason reported in the kernel_terminated event.
        #[arg(long, value_name = "REASON", default_value = "user-requested")]
        reason: String,
    },
    /// `restart_kernel(session_id, kernel_id, kernel_image, {})`: recreate a kernel's container.
    Restart {
        kernel: String,
        #[arg(long, value_name = "ID")]
        session: String,
        #[arg(long, value_name = "IMAGE")]
        image: String,
    },
    /// `upload_file(kernel_id, filename, filedata)`: copy a local file into the kernel's /home/work.
    Upload {
        kernel: String,
        local_file: PathBuf,
        /// Path under /home/work (default: the local file's name).
        remote_name: Option<String>,
    },
    /// `download_single(kernel_id, filepath)`: a file's bytes; with --tar,
    /// `download_file(kernel_id, filepath)`: a tar archive of a file or directory.
    Download {
        kernel: String,
        /// Path relative to /home/work, or absolute under it.
        remote_path: String,
        /// Write to FILE instead of standard output.
        #[arg(short, long, value_name = "FILE")]
        output: Option<PathBuf>,
        /// Fetch a tar archive (works for directories).
        #[arg(long)]
        tar: bool,
    },
    /// `list_files(kernel_id, path)`: the entries of a directory in the kernel.
    Ls {
        kernel: String,
        #[arg(default_value = "/home/work")]
        path: String,
    },
    /// `execute(...)`: run CODE in the kernel and stream its output as it comes, like a remote
    /// REPL. When the code asks for input, a line is read from standard input. Ctrl-C
    /// interrupts the code. Exits with the code's exit status.
    Exec(ExecArgs),
    /// `interrupt_kernel(kernel_id)`: SIGINT to the code running in the kernel.
    Interrupt { kernel: String },
    /// `get_completions(kernel_id, text, {})`: completion candidates for TEXT.
    Complete { kernel: String, text: String },
    /// The usage records in the agent's local journal (no RPC: reads `agent.journal-dir` on
    /// this host): each record's window and deltas, and whether each sink confirmed it. The
    /// journal keeps what a sink still needs, every running kernel's last checkpoint and the
    /// newest 4096 records. With --json: one CloudEvent per line, as delivered.
    Usage {
        /// Only this kernel's records.
        #[arg(long, value_name = "ID")]
        kernel: Option<String>,
        /// The journal directory (default: `agent.journal-dir` of the agent's configuration).
        #[arg(long, value_name = "DIR")]
        journal_dir: Option<PathBuf>,
        /// The agent's configuration file (default: the agent's own search path).
        #[arg(long = "config", value_name = "FILE")]
        config: Option<PathBuf>,
    },
    /// A live view of the node's kernels: CPU, memory against its limit, network and disk
    /// rates (from the agent's /metrics, read every interval), state and owner (`list_kernels`).
    /// On a terminal it redraws until `q`; keys c, m, n, d, k sort by CPU, memory, network,
    /// disk, kernel id. Elsewhere it prints the table --iterations times (default once).
    Top {
        /// The agent's /metrics address (default: its `agent.internal-addr`, from
        /// `get_local_config`).
        #[arg(long, value_name = "HOST:PORT")]
        metrics: Option<String>,
        /// Seconds between readings.
        #[arg(long, value_name = "SECS", default_value_t = 2.0)]
        interval: f64,
        /// The column to sort by (largest first).
        #[arg(long, value_enum, default_value = "cpu")]
        sort: bai_agent::top::SortKey,
        /// How many tables to print, then exit (default: until `q` on a terminal, once elsewhere).
        #[arg(long, value_name = "N")]
        iterations: Option<u32>,
    },
    /// `start_service(kernel_id, service, {})` / `shutdown_service(kernel_id, service)`.
    Service {
        #[arg(value_parser = ["start", "stop"])]
        action: String,
        kernel: String,
        service: String,
    },
}

#[derive(Debug, clap::Args)]
struct ExecArgs {
    kernel: String,
    /// Query mode: code for the kernel's interpreter. With --batch: the command to run.
    code: String,
    /// Batch mode: run CODE as the `exec` command (after --clean and --build) instead of in
    /// the kernel's interpreter.
    #[arg(long)]
    batch: bool,
    /// Batch mode: the `clean` command.
    #[arg(long, value_name = "CMD", requires = "batch")]
    clean: Option<String>,
    /// Batch mode: the `build` command.
    #[arg(long, value_name = "CMD", requires = "batch")]
    build: Option<String>,
    /// Seconds the agent collects output before handing it over (the `flush_timeout`).
    #[arg(long, value_name = "SECS", default_value_t = 0.1)]
    flush: f64,
    /// The execute API version: 1 (stdout/stderr apart) or 2 (one ordered console).
    #[arg(long, value_name = "N", default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..=3))]
    api_version: u32,
}

#[derive(Debug, clap::Args)]
struct CreateArgs {
    /// The image's canonical name, e.g. `cr.backend.ai/stable/python:3.11-ubuntu22.04`.
    #[arg(long, value_name = "IMAGE")]
    image: String,
    /// CPU cores (`cpu` slot; fractions allowed).
    #[arg(long, value_name = "N", default_value = "1")]
    cpu: String,
    /// Memory (`mem` slot): bytes, or with a binary suffix (256m, 1g, 1.5GiB).
    #[arg(long, value_name = "SIZE", default_value = "1g")]
    mem: String,
    /// Shared memory (/dev/shm), same format as --mem.
    #[arg(long, value_name = "SIZE", default_value = "64m")]
    shmem: String,
    /// Environment variable of the kernel (repeatable).
    #[arg(long = "env", value_name = "KEY=VALUE")]
    env: Vec<String>,
    /// Session id (default: a new UUID).
    #[arg(long, value_name = "ID")]
    session: Option<String>,
    /// Kernel id (repeatable; default: new UUIDs).
    #[arg(long = "kernel-id", value_name = "ID")]
    kernel_ids: Vec<String>,
    /// The owning user (`owner_user_id`; container label ai.backend.owner-user-id).
    #[arg(long, value_name = "ID")]
    owner_user: Option<String>,
    /// The owning project (`owner_project_id`; container label ai.backend.owner-project-id).
    #[arg(long, value_name = "ID")]
    owner_project: Option<String>,
    /// Let the agent pull the image when it lacks it.
    #[arg(long)]
    auto_pull: bool,
    /// Number of kernels in the session.
    #[arg(long, value_name = "N", default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=64))]
    count: u32,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("bai-agentctl: cannot start the async runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(code) => code,
        Err(err) => {
            eprintln!("bai-agentctl: {}", bai_agent::logging::one_line(&err));
            ExitCode::FAILURE
        }
    }
}

/// One connection and the options every call uses.
#[path = "bai-agentctl/top.rs"]
mod top;

struct Agent {
    client: RpcClient,
    options: CallOptions,
}

impl Agent {
    async fn call(&self, method: &str, args: Vec<Value>) -> anyhow::Result<Value> {
        Ok(self.client.call_with(method, args, Vec::new(), &self.options).await?)
    }
}

async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    if !(cli.timeout.is_finite() && cli.timeout > 0.0) {
        bail!("--timeout must be a positive number of seconds, got {}", cli.timeout);
    }
    let timeout = Duration::from_secs_f64(cli.timeout);
    // Check local inputs before connecting.
    let upload = match &cli.command {
        Command::Upload { local_file, .. } => {
            Some(std::fs::read(local_file).with_context(|| format!("cannot read {}", local_file.display()))?)
        }
        _ => None,
    };
    let create = match &cli.command {
        Command::Create(args) => Some(create_request(args)?),
        _ => None,
    };
    if let Command::Usage { kernel, journal_dir, config } = &cli.command {
        return usage(kernel.as_deref(), journal_dir.as_deref(), config.as_deref(), cli.json);
    }
    probe(&cli.agent, timeout).await?;
    let client = match tokio::time::timeout(timeout, RpcClient::connect(&cli.agent)).await {
        Ok(client) => client?,
        Err(_) => bail!("cannot connect to the agent at {} within {timeout:?}", cli.agent),
    };
    let agent = Agent { client, options: CallOptions { timeout, ..CallOptions::default() } };
    let json = cli.json;
    let s = |text: &str| Value::from(text);
    match cli.command {
        Command::Ping { msg } => {
            let started = Instant::now();
            let reply = agent.call("ping", vec![s(&msg)]).await?;
            let elapsed = started.elapsed();
            if json {
                print_json(&reply);
            } else {
                println!("{} ({:.1} ms)", plain(&reply), elapsed.as_secs_f64() * 1000.0);
            }
        }
        Command::Hwinfo => show(&agent.call("gather_hwinfo", vec![]).await?, json),
        Command::GpuAllocMap => show(&agent.call("scan_gpu_alloc_map", vec![]).await?, json),
        Command::Config => show(&agent.call("get_local_config", vec![]).await?, json),
        Command::Health => show(&agent.call("health", vec![]).await?, json),
        Command::Create(create_args) => {
            let (session_id, kernel_ids, args) = create.expect("built above");
            // A pull happens inside create_kernels: its progress comes over a second connection.
            let progress = create_args.auto_pull.then(|| {
                tokio::spawn(show_pull_progress(cli.agent.clone(), create_args.image.clone(), agent.options.clone()))
            });
            let reply = agent.call("create_kernels", args).await;
            if let Some(progress) = progress {
                progress.abort();
                let _ = progress.await;
            }
            let reply = reply?;
            if json {
                print_json(&reply);
            } else {
                println!("session_id: {session_id}");
                match &reply {
                    Value::Array(kernels) => {
                        for (i, kernel) in kernels.iter().enumerate() {
                            let id = kernel_ids.get(i).map_or("?", String::as_str);
                            println!("kernel {id}:");
                            print_human(kernel, 1);
                        }
                    }
                    other => print_human(other, 0),
                }
            }
        }
        Command::List => {
            let reply = agent.call("list_kernels", vec![]).await?;
            if json {
                print_json(&reply);
            } else {
                print_kernels(&reply)?;
            }
        }
        Command::EgressCap { kernel, bits_per_sec } => {
            let bits =
                i64::try_from(bits_per_sec).map_err(|_| anyhow!("{bits_per_sec} bits per second is too large"))?;
            let reply = agent.call("set_egress_cap", vec![s(&kernel), Value::from(bits)]).await?;
            if json {
                print_json(&reply);
            } else {
                let cap = field(&reply, "egress_bps").and_then(Value::as_u64).unwrap_or(0);
                if cap == 0 {
                    println!("{kernel}: no egress cap");
                } else {
                    println!("{kernel}: egress capped at {cap} bit/s");
                }
            }
        }
        Command::Logs { kernel } => {
            let reply = agent.call("get_logs", vec![s(&kernel)]).await?;
            if json {
                print_json(&reply);
            } else {
                let logs = field(&reply, "logs").ok_or_else(|| anyhow!("get_logs returned no `logs`: {reply}"))?;
                let text = plain(logs);
                print!("{text}");
                if !text.is_empty() && !text.ends_with('\n') {
                    println!();
                }
            }
        }
        Command::Destroy { kernel, session, reason } => {
            let session = match session {
                Some(session) => Value::from(session),
                None => find_session(&agent, &kernel).await.map_or(Value::Nil, Value::from),
            };
            let args = vec![s(&kernel), session, s(&reason), Value::from(false)];
            let reply = agent.call("destroy_kernel", args).await?;
            if json {
                print_json(&reply);
            } else {
                println!("destroyed kernel {kernel}");
                if !reply.is_nil() {
                    print_human(&reply, 0);
                }
            }
        }
        Command::Restart { kernel, session, image } => {
            let args = vec![s(&session), s(&kernel), s(&image), Value::Map(Vec::new())];
            let reply = agent.call("restart_kernel", args).await?;
            if json {
                print_json(&reply);
            } else {
                println!("restarted kernel {kernel}");
                if !reply.is_nil() {
                    print_human(&reply, 0);
                }
            }
        }
        Command::Upload { kernel, local_file, remote_name } => {
            let data = upload.expect("read above");
            let name = match remote_name {
                Some(name) => name,
                None => local_file
                    .file_name()
                    .and_then(|n| n.to_str())
                    .ok_or_else(|| anyhow!("{} has no usable file name; give REMOTE_NAME", local_file.display()))?
                    .to_owned(),
            };
            let size = data.len();
            let reply = agent.call("upload_file", vec![s(&kernel), s(&name), Value::Binary(data)]).await?;
            if json {
                print_json(&reply);
            } else {
                println!("uploaded {size} bytes to {kernel}:{name}");
            }
        }
        Command::Download { kernel, remote_path, output, tar } => {
            let method = if tar { "download_file" } else { "download_single" };
            if output.is_none() && !json && tar && std::io::stdout().is_terminal() {
                bail!("refusing to write a tar archive to a terminal; give -o FILE or redirect the output");
            }
            let reply = agent.call(method, vec![s(&kernel), s(&remote_path)]).await?;
            let bytes = match reply {
                Value::Binary(bytes) => bytes,
                Value::String(text) => text.into_bytes(),
                other => bail!("{method} returned {} instead of bytes", type_name(&other)),
            };
            match output {
                _ if json => print_json(&Value::Binary(bytes)),
                Some(path) => {
                    std::fs::write(&path, &bytes).with_context(|| format!("cannot write {}", path.display()))?;
                    eprintln!("wrote {} bytes to {}", bytes.len(), path.display());
                }
                None => {
                    let mut stdout = std::io::stdout().lock();
                    stdout
                        .write_all(&bytes)
                        .and_then(|()| stdout.flush())
                        .context("cannot write to standard output")?;
                }
            }
        }
        Command::Ls { kernel, path } => {
            let reply = agent.call("list_files", vec![s(&kernel), s(&path)]).await?;
            if json {
                print_json(&reply);
            } else {
                print_files(&reply)?;
            }
        }
        Command::Exec(args) => return exec(&agent, &args, json).await,
        Command::Usage { .. } => unreachable!("answered before connecting"),
        Command::Top { metrics, interval, sort, iterations } => {
            return top::run(&agent, &cli.agent, metrics, interval, sort, iterations).await;
        }
        Command::Interrupt { kernel } => {
            let reply = agent.call("interrupt_kernel", vec![s(&kernel)]).await?;
            if json {
                print_json(&reply);
            } else {
                println!("interrupted the code running in {kernel}");
            }
        }
        Command::Complete { kernel, text } => {
            let reply = agent.call("get_completions", vec![s(&kernel), s(&text), Value::Map(Vec::new())]).await?;
            if json {
                print_json(&reply);
            } else {
                for candidate in field(&reply, "completions").and_then(Value::as_array).into_iter().flatten() {
                    println!("{}", plain(candidate));
                }
            }
        }
        Command::Service { action, kernel, service } => {
            let reply = if action == "start" {
                agent.call("start_service", vec![s(&kernel), s(&service), Value::Map(Vec::new())]).await?
            } else {
                agent.call("shutdown_service", vec![s(&kernel), s(&service)]).await?
            };
            if json {
                print_json(&reply);
            } else if action == "start" {
                print_human(&reply, 0);
            } else {
                println!("asked {kernel} to stop {service}");
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Drives one run with `execute` steps: prints each step's console as it arrives, answers
/// `waiting-input` from standard input, and interrupts the code on Ctrl-C.
async fn exec(agent: &Agent, args: &ExecArgs, json: bool) -> anyhow::Result<ExitCode> {
    if !(args.flush.is_finite() && args.flush > 0.0) {
        bail!("--flush must be a positive number of seconds, got {}", args.flush);
    }
    let s = |text: &str| Value::from(text);
    let session = find_session(agent, &args.kernel).await.map_or(Value::Nil, Value::from);
    let run_id = uuid::Uuid::new_v4().to_string();
    let mut opts = Vec::new();
    if args.batch {
        opts.push((s("exec"), s(&args.code)));
        opts.extend(args.clean.as_deref().map(|c| (s("clean"), s(c))));
        opts.extend(args.build.as_deref().map(|c| (s("build"), s(c))));
    }
    let (mut mode, mut code) = if args.batch { ("batch", String::new()) } else { ("query", args.code.clone()) };
    let mut stdin_lines = stdin_reader();
    loop {
        let call = vec![
            session.clone(),
            s(&args.kernel),
            Value::from(args.api_version),
            s(&run_id),
            s(mode),
            s(&code),
            Value::Map(opts.clone()),
            Value::F64(args.flush),
        ];
        let reply = tokio::select! {
            reply = agent.call("execute", call) => reply?,
            _ = tokio::signal::ctrl_c() => {
                agent.call("interrupt_kernel", vec![s(&args.kernel)]).await?;
                eprintln!("\nbai-agentctl: interrupted");
                return Ok(ExitCode::from(130));
            }
        };
        if json {
            print_json(&reply);
        } else {
            print_console(&reply)?;
        }
        let status = field(&reply, "status").and_then(Value::as_str).unwrap_or("");
        match status {
            "finished" => {
                let exit = field(&reply, "exitCode").and_then(Value::as_i64).unwrap_or(0);
                return Ok(ExitCode::from(u8::try_from(exit.rem_euclid(256)).unwrap_or(1)));
            }
            "continued" | "build-finished" | "clean-finished" => (mode, code) = ("continue", String::new()),
            "waiting-input" => {
                let line = stdin_lines.recv().await.unwrap_or_default();
                (mode, code) = ("input", line);
            }
            "exec-timeout" => bail!("the kernel stopped answering (exec-timeout); the run may still be going"),
            other => bail!("execute returned an unknown status {other:?}: {reply}"),
        }
    }
}

/// Lines of standard input, read on a thread so a waiting prompt never blocks the runtime.
/// `usage`: the local journal's records, as a table or as CloudEvent JSON lines.
fn usage(
    kernel: Option<&str>,
    journal_dir: Option<&std::path::Path>,
    config: Option<&std::path::Path>,
    json: bool,
) -> anyhow::Result<ExitCode> {
    use bai_agent::usage::{journal, record::nanos_text};
    let dir = match journal_dir {
        Some(dir) => dir.to_path_buf(),
        None => bai_agent::config::Config::load(config)?.0.agent.journal_dir,
    };
    let sinks = ["redis", "http"];
    let (records, markers) =
        journal::read(&dir, &sinks).with_context(|| format!("cannot read the usage journal in {}", dir.display()))?;
    let present: Vec<(String, u64)> =
        markers.into_iter().filter(|(sink, _)| journal::NAME.marker(&dir, sink).exists()).collect();
    let records: Vec<_> = records
        .into_iter()
        .filter(|r| r.item.event.is_some() && kernel.is_none_or(|k| r.item.kernel_id == k))
        .collect();
    if json {
        let mut out = std::io::stdout().lock();
        for record in &records {
            if let Some(event) = &record.item.event {
                writeln!(out, "{}", serde_json::to_string(event)?)?;
            }
        }
        return Ok(ExitCode::SUCCESS);
    }
    if records.is_empty() {
        println!("no usage records in {}", journal::NAME.file(&dir).display());
        return Ok(ExitCode::SUCCESS);
    }
    let mut headers = vec!["ID", "WINDOW START", "SECONDS", "CPU S", "MEM PEAK", "IO R/W", "NET RX/TX", "FINAL"];
    headers.extend(present.iter().map(|(sink, _)| sink.as_str()));
    let rows: Vec<Vec<String>> = records
        .iter()
        .filter_map(|record| {
            let event = record.item.event.as_ref()?;
            let data = &event.data;
            let seconds = humantime::parse_rfc3339(&data.window_end)
                .ok()
                .zip(humantime::parse_rfc3339(&data.window_start).ok())
                .and_then(|(end, start)| end.duration_since(start).ok())
                .map_or_else(|| "?".to_owned(), |d| nanos_text(d.as_nanos()));
            let mut row = vec![
                event.id.clone(),
                data.window_start.clone(),
                seconds,
                data.cpu_seconds.clone(),
                human_size(data.mem_peak_bytes),
                format!("{}/{}", human_size(data.io_read_bytes), human_size(data.io_write_bytes)),
                format!("{}/{}", human_size(data.net_rx_bytes), human_size(data.net_tx_bytes)),
                data.exit_reason.clone().unwrap_or_else(|| "-".to_owned()),
            ];
            row.extend(
                present.iter().map(|(_, marker)| if record.seq <= *marker { "sent" } else { "pending" }.to_owned()),
            );
            Some(row)
        })
        .collect();
    print_table(&headers, &rows);
    Ok(ExitCode::SUCCESS)
}

fn stdin_reader() -> tokio::sync::mpsc::Receiver<String> {
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    std::thread::spawn(move || {
        let stdin = std::io::stdin();
        for line in std::io::BufRead::lines(stdin.lock()) {
            let Ok(line) = line else { break };
            if tx.blocking_send(line).is_err() {
                break;
            }
        }
    });
    rx
}

/// Writes an execute step's output: stdout items to stdout, stderr items to stderr, raw bytes.
fn print_console(reply: &Value) -> anyhow::Result<()> {
    let bytes = |value: &Value| match value {
        Value::String(text) => text.as_bytes().to_vec(),
        Value::Binary(bytes) => bytes.clone(),
        other => other.to_string().into_bytes(),
    };
    let mut stdout = std::io::stdout().lock();
    let mut stderr = std::io::stderr().lock();
    let mut items = Vec::new();
    if let Some(console) = field(reply, "console").and_then(Value::as_array) {
        for item in console {
            if let Some([kind, data]) = item.as_array().map(Vec::as_slice) {
                items.push((kind.as_str().unwrap_or(""), data));
            }
        }
    } else {
        items.extend(field(reply, "stdout").map(|data| ("stdout", data)));
        items.extend(field(reply, "stderr").map(|data| ("stderr", data)));
    }
    for (kind, data) in items {
        match kind {
            "stdout" => stdout.write_all(&bytes(data)).context("cannot write to standard output")?,
            "stderr" | "log" => stderr.write_all(&bytes(data)).context("cannot write to standard error")?,
            other => writeln!(stdout, "[{other}] {data}").context("cannot write to standard output")?,
        }
    }
    stdout.flush().ok();
    stderr.flush().ok();
    Ok(())
}

/// A plain TCP connection first, so that a refused or unreachable address is reported as
/// such (ZeroMQ itself would keep retrying until the handshake times out).
async fn probe(addr: &str, timeout: Duration) -> anyhow::Result<()> {
    let Some(host_port) = addr.strip_prefix("tcp://").or((!addr.contains("://")).then_some(addr)) else {
        return Ok(());
    };
    match tokio::time::timeout(timeout, tokio::net::TcpStream::connect(host_port)).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(err)) => bail!("cannot connect to the agent at {addr}: {err}"),
        Err(_) => bail!("cannot connect to the agent at {addr} within {timeout:?}"),
    }
}

/// The session of `kernel` according to `list_kernels`, if the agent says.
async fn find_session(agent: &Agent, kernel: &str) -> Option<String> {
    let kernels = agent.call("list_kernels", vec![]).await.ok()?;
    kernels.as_array()?.iter().find_map(|k| {
        (field(k, "kernel_id").and_then(Value::as_str) == Some(kernel))
            .then(|| field(k, "session_id").and_then(Value::as_str).map(str::to_owned))
            .flatten()
    })
}

/// `create_kernels`' positional arguments: session id, kernel ids, configs, cluster info,
/// image refs; with the session and kernel ids for printing.
/// Polls `image_pull_progress` and writes the pull's progress to stderr: one line redrawn on
/// a terminal, a line per change elsewhere. Runs until aborted.
async fn show_pull_progress(addr: String, image: String, options: CallOptions) {
    let Ok(client) = RpcClient::connect(&addr).await else { return };
    let terminal = std::io::stderr().is_terminal();
    let mut last = String::new();
    let _newline = PullLine(terminal);
    loop {
        let reply =
            client.call_with("image_pull_progress", vec![Value::from(image.as_str())], Vec::new(), &options).await;
        if let Ok(Value::Map(entries)) = reply {
            let number = |key: &str| {
                entries.iter().find(|(k, _)| k.as_str() == Some(key)).and_then(|(_, v)| v.as_u64()).unwrap_or(0)
            };
            let mib = |bytes: u64| bytes as f64 / (1024.0 * 1024.0);
            let line = format!(
                "pulling {image}: {}/{} layers, {:.1}/{:.1} MiB",
                number("done_layers"),
                number("layers"),
                mib(number("current_bytes")),
                mib(number("total_bytes"))
            );
            if line != last {
                if terminal {
                    eprint!("\r\x1b[2K{line}");
                } else {
                    eprintln!("{line}");
                }
                last = line;
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Ends a redrawn progress line when the progress task stops.
struct PullLine(bool);

impl Drop for PullLine {
    fn drop(&mut self) {
        if self.0 {
            eprintln!();
        }
    }
}

fn create_request(args: &CreateArgs) -> anyhow::Result<(String, Vec<String>, Vec<Value>)> {
    let count = usize::try_from(args.count)?;
    if args.kernel_ids.len() > count && args.count != 1 {
        bail!("{} --kernel-id given for --count {}", args.kernel_ids.len(), args.count);
    }
    let count = count.max(args.kernel_ids.len());
    let mut kernel_ids = args.kernel_ids.clone();
    while kernel_ids.len() < count {
        kernel_ids.push(uuid::Uuid::new_v4().to_string());
    }
    let session_id = args.session.clone().unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
    let cpu: f64 = args.cpu.parse().map_err(|_| anyhow!("--cpu must be a number, got `{}`", args.cpu))?;
    if !(cpu.is_finite() && cpu > 0.0) {
        bail!("--cpu must be positive, got `{}`", args.cpu);
    }
    let mem = parse_size(&args.mem).with_context(|| format!("--mem `{}`", args.mem))?;
    let shmem = parse_size(&args.shmem).with_context(|| format!("--shmem `{}`", args.shmem))?;
    let mut environ = BTreeMap::new();
    for pair in &args.env {
        let (key, value) = pair.split_once('=').ok_or_else(|| anyhow!("--env wants KEY=VALUE, got `{pair}`"))?;
        if key.is_empty() {
            bail!("--env wants KEY=VALUE, got `{pair}`");
        }
        environ.insert(key.to_owned(), value.to_owned());
    }
    let s = |text: &str| Value::from(text);
    let map = |entries: Vec<(&str, Value)>| Value::Map(entries.into_iter().map(|(k, v)| (s(k), v)).collect());
    let optional = |value: &Option<String>| value.as_deref().map_or(Value::Nil, Value::from);
    let config = map(vec![
        (
            "image",
            map(vec![
                ("canonical", s(&args.image)),
                ("labels", Value::Map(Vec::new())),
                ("digest", s("")),
                ("architecture", s(std::env::consts::ARCH)),
            ]),
        ),
        ("auto_pull", Value::from(args.auto_pull)),
        ("resource_slots", map(vec![("cpu", s(&args.cpu)), ("mem", s(&mem.to_string()))])),
        ("resource_opts", map(vec![("shmem", s(&shmem.to_string()))])),
        ("environ", Value::Map(environ.iter().map(|(k, v)| (s(k), s(v))).collect())),
        ("mounts", Value::Array(Vec::new())),
        ("idle_timeout", Value::from(0)),
        ("owner_user_id", optional(&args.owner_user)),
        ("owner_project_id", optional(&args.owner_project)),
    ]);
    let cluster_info = map(vec![
        ("mode", s("single-node")),
        ("size", Value::from(count)),
        ("replicas", Value::Map(Vec::new())),
        ("network_name", Value::Nil),
        ("ssh_keypair", Value::Nil),
    ]);
    let image_refs = Value::Map(kernel_ids.iter().map(|id| (s(id), s(&args.image))).collect());
    let request = vec![
        s(&session_id),
        Value::Array(kernel_ids.iter().map(|id| s(id)).collect()),
        Value::Array(vec![config; count]),
        cluster_info,
        image_refs,
    ];
    Ok((session_id, kernel_ids, request))
}

/// Bytes from `1073741824`, `256m`, `1g`, `1.5GiB`, `512k` (binary multiples, as
/// Backend.AI's BinarySize reads them).
fn parse_size(text: &str) -> anyhow::Result<u64> {
    let lower = text.trim().to_ascii_lowercase();
    let digits = lower.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(lower.len());
    let (number, suffix) = lower.split_at(digits);
    let shift = match suffix.trim_end_matches("ib").trim_end_matches('b') {
        "" => 0,
        "k" => 10,
        "m" => 20,
        "g" => 30,
        "t" => 40,
        "p" => 50,
        _ => bail!("unknown size suffix `{suffix}` (use k, m, g, t, p or plain bytes)"),
    };
    let value: f64 = number.parse().map_err(|_| anyhow!("not a size (e.g. 1073741824, 256m, 1g)"))?;
    let bytes = value * (1u64 << shift) as f64;
    if !(bytes.is_finite() && bytes >= 1.0 && bytes < u64::MAX as f64) {
        bail!("size out of range");
    }
    Ok(bytes.round() as u64)
}

fn field<'a>(value: &'a Value, key: &str) -> Option<&'a Value> {
    value.as_map()?.iter().find(|(k, _)| k.as_str() == Some(key)).map(|(_, v)| v)
}

fn type_name(value: &Value) -> &'static str {
    match value {
        Value::Nil => "nil",
        Value::Boolean(_) => "a boolean",
        Value::Integer(_) => "an integer",
        Value::F32(_) | Value::F64(_) => "a float",
        Value::String(_) => "a string",
        Value::Binary(_) => "bytes",
        Value::Array(_) => "an array",
        Value::Map(_) => "a map",
        Value::Ext(..) => "an extension value",
    }
}

/// msgpack → JSON, as described in `--help`.
fn to_json(value: &Value) -> serde_json::Value {
    use serde_json::Value as J;
    let b64 = |bytes: &[u8]| J::from(base64::engine::general_purpose::STANDARD.encode(bytes));
    match value {
        Value::Nil => J::Null,
        Value::Boolean(b) => J::Bool(*b),
        Value::Integer(i) => i.as_u64().map(J::from).or_else(|| i.as_i64().map(J::from)).unwrap_or(J::Null),
        Value::F32(f) => float_json(f64::from(*f)),
        Value::F64(f) => float_json(*f),
        Value::String(s) => J::from(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        Value::Binary(bytes) => J::Object([("$binary".to_owned(), b64(bytes))].into_iter().collect()),
        Value::Array(items) => J::Array(items.iter().map(to_json).collect()),
        Value::Map(entries) => J::Object(
            entries
                .iter()
                .map(|(k, v)| {
                    let key = match k {
                        Value::String(s) => String::from_utf8_lossy(s.as_bytes()).into_owned(),
                        other => to_json(other).to_string(),
                    };
                    (key, to_json(v))
                })
                .collect(),
        ),
        Value::Ext(kind, data) => {
            J::Object([("$ext".to_owned(), J::from(*kind)), ("$data".to_owned(), b64(data))].into_iter().collect())
        }
    }
}

fn float_json(f: f64) -> serde_json::Value {
    serde_json::Number::from_f64(f).map_or_else(|| serde_json::Value::from(f.to_string()), serde_json::Value::Number)
}

fn print_json(value: &Value) {
    println!("{}", serde_json::to_string_pretty(&to_json(value)).unwrap_or_else(|_| "null".to_owned()));
}

/// A scalar as people read it: strings bare, nil as `null`, bytes as a size.
fn plain(value: &Value) -> String {
    match value {
        Value::Nil => "null".to_owned(),
        Value::String(s) => String::from_utf8_lossy(s.as_bytes()).into_owned(),
        Value::Binary(bytes) => format!("<{} bytes>", bytes.len()),
        Value::F64(f) => format!("{f}"),
        Value::F32(f) => format!("{f}"),
        Value::Ext(kind, data) => format!("<extension {kind}, {} bytes>", data.len()),
        other => other.to_string(),
    }
}

fn show(value: &Value, json: bool) {
    if json { print_json(value) } else { print_human(value, 0) }
}

/// `key: value` lines, nested maps and lists indented by two spaces per level.
fn print_human(value: &Value, depth: usize) {
    let indent = "  ".repeat(depth);
    match value {
        Value::Map(entries) if entries.is_empty() => println!("{indent}{{}}"),
        Value::Map(entries) => {
            for (key, value) in entries {
                let key = plain(key);
                match value {
                    Value::Map(inner) if !inner.is_empty() => {
                        println!("{indent}{key}:");
                        print_human(value, depth + 1);
                    }
                    Value::Array(items) if !items.is_empty() => {
                        println!("{indent}{key}:");
                        print_human(value, depth + 1);
                    }
                    Value::Map(_) => println!("{indent}{key}: {{}}"),
                    Value::Array(_) => println!("{indent}{key}: []"),
                    scalar => println!("{indent}{key}: {}", plain(scalar)),
                }
            }
        }
        Value::Array(items) => {
            for item in items {
                match item {
                    Value::Map(inner) if !inner.is_empty() => {
                        println!("{indent}-");
                        print_human(item, depth + 1);
                    }
                    Value::Array(inner) if !inner.is_empty() => {
                        println!("{indent}-");
                        print_human(item, depth + 1);
                    }
                    scalar => println!("{indent}- {}", plain(scalar)),
                }
            }
        }
        scalar => println!("{indent}{}", plain(scalar)),
    }
}

/// Left-aligned columns (the last one unpadded).
fn print_table(headers: &[&str], rows: &[Vec<String>]) {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for row in rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let mut out = String::new();
        for (i, (cell, width)) in cells.iter().zip(&widths).enumerate() {
            if i + 1 == cells.len() {
                out.push_str(cell);
            } else {
                out.push_str(&format!("{cell:<width$}  "));
            }
        }
        println!("{}", out.trim_end());
    };
    line(headers.to_vec());
    for row in rows {
        line(row.iter().map(String::as_str).collect());
    }
}

fn print_kernels(reply: &Value) -> anyhow::Result<()> {
    let kernels =
        reply.as_array().ok_or_else(|| anyhow!("list_kernels returned {} instead of a list", type_name(reply)))?;
    if kernels.is_empty() {
        println!("no kernels");
        return Ok(());
    }
    let cell = |kernel: &Value, key: &str| field(kernel, key).map_or_else(|| "-".to_owned(), plain);
    let rows: Vec<Vec<String>> = kernels
        .iter()
        .map(|k| {
            let container = cell(k, "container_id");
            let mem = field(k, "mem").and_then(size_of).map_or_else(|| cell(k, "mem"), human_size);
            vec![
                cell(k, "kernel_id"),
                cell(k, "session_id"),
                cell(k, "state"),
                cell(k, "cpu"),
                mem,
                format!("{}/{}", cell(k, "repl_in_port"), cell(k, "repl_out_port")),
                container.chars().take(12).collect(),
                cell(k, "image"),
            ]
        })
        .collect();
    print_table(&["KERNEL", "SESSION", "STATE", "CPU", "MEM", "REPL IN/OUT", "CONTAINER", "IMAGE"], &rows);
    Ok(())
}

fn size_of(value: &Value) -> Option<u64> {
    match value {
        Value::Integer(i) => i.as_u64(),
        Value::String(s) => s.as_str()?.parse().ok(),
        _ => None,
    }
}

fn human_size(bytes: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 { format!("{bytes} B") } else { format!("{value:.1} {}", UNITS[unit]) }
}

/// `list_files`' `{files, errors, abspath}`: `files` is a JSON text of
/// `[{filename, size, mode, ctime, mtime, atime}]`, `errors` the listing's stderr.
fn print_files(reply: &Value) -> anyhow::Result<()> {
    let errors = field(reply, "errors").map(plain).unwrap_or_default();
    if !errors.trim().is_empty() && errors != "null" {
        bail!("list_files: {}", errors.trim());
    }
    let files = match field(reply, "files") {
        Some(Value::String(text)) => text.as_str().unwrap_or_default().to_owned(),
        Some(Value::Array(_)) => to_json(field(reply, "files").expect("present")).to_string(),
        other => bail!("list_files returned no `files` text: {}", other.map_or("nothing", type_name)),
    };
    let entries: Vec<serde_json::Value> = if files.trim().is_empty() {
        Vec::new()
    } else {
        serde_json::from_str(&files).context("list_files returned `files` that is not a JSON list")?
    };
    let rows: Vec<Vec<String>> = entries
        .iter()
        .map(|entry| {
            let text = |key: &str| entry.get(key).and_then(serde_json::Value::as_str).unwrap_or("-").to_owned();
            let size = entry.get("size").and_then(serde_json::Value::as_u64);
            let mtime = entry.get("mtime").and_then(serde_json::Value::as_f64).map_or_else(
                || "-".to_owned(),
                |t| {
                    let at = std::time::UNIX_EPOCH + Duration::from_secs_f64(t.max(0.0));
                    humantime::format_rfc3339_seconds(at).to_string().replace('T', " ")
                },
            );
            vec![text("mode"), size.map_or_else(|| "-".to_owned(), |s| s.to_string()), mtime, text("filename")]
        })
        .collect();
    if let Some(path) = field(reply, "abspath") {
        println!("{}:", plain(path));
    }
    if rows.is_empty() {
        println!("(empty)");
    } else {
        print_table(&["MODE", "SIZE", "MODIFIED (UTC)", "NAME"], &rows);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("1073741824").unwrap(), 1 << 30);
        assert_eq!(parse_size("256m").unwrap(), 256 << 20);
        assert_eq!(parse_size("1g").unwrap(), 1 << 30);
        assert_eq!(parse_size("1.5GiB").unwrap(), 3 << 29);
        assert_eq!(parse_size("64MB").unwrap(), 64 << 20);
        assert!(parse_size("12x").is_err());
        assert!(parse_size("").is_err());
        assert!(parse_size("0").is_err());
    }

    #[test]
    fn json_conversion() {
        let value = Value::Map(vec![
            (Value::from("b"), Value::Binary(b"hi".to_vec())),
            (Value::from(1), Value::Nil),
            (Value::from("f"), Value::F64(1.5)),
        ]);
        assert_eq!(to_json(&value).to_string(), r#"{"1":null,"b":{"$binary":"aGk="},"f":1.5}"#);
    }

    #[test]
    fn list_files_replies() {
        let reply = |files: &str, errors: &str| {
            Value::Map(vec![
                (Value::from("files"), Value::from(files)),
                (Value::from("errors"), Value::from(errors)),
                (Value::from("abspath"), Value::from(".")),
            ])
        };
        let files = "[{\"mode\": \"-rw-r--r--\", \"size\": 5, \"ctime\": 1.5, \"mtime\": 1700000000.25, \
                     \"atime\": 1.0, \"filename\": \"a.txt\"}]\n";
        print_files(&reply(files, "")).expect("a listing");
        print_files(&reply("[]\n", "")).expect("an empty listing");
        let err = print_files(&reply("", "FileNotFoundError: [Errno 2] No such file or directory: '/home/work/x'\n"))
            .expect_err("errors fail the command");
        assert_eq!(
            err.to_string(),
            "list_files: FileNotFoundError: [Errno 2] No such file or directory: '/home/work/x'"
        );
        assert!(print_files(&reply("not json", "")).is_err());
    }

    #[test]
    fn create_arguments() {
        let cli = Cli::parse_from([
            "bai-agentctl",
            "create",
            "--image",
            "python:3",
            "--mem",
            "256m",
            "--env",
            "A=1",
            "--kernel-id",
            "k1",
            "--session",
            "s1",
        ]);
        let Command::Create(args) = cli.command else { panic!("not create") };
        let (session, kernels, request) = create_request(&args).unwrap();
        assert_eq!((session.as_str(), kernels.as_slice()), ("s1", ["k1".to_owned()].as_slice()));
        assert_eq!(request.len(), 5);
        let config = &request[2].as_array().unwrap()[0];
        let slots = field(config, "resource_slots").unwrap();
        assert_eq!(field(slots, "mem"), Some(&Value::from("268435456")));
        assert_eq!(field(slots, "cpu"), Some(&Value::from("1")));
        assert_eq!(field(field(config, "environ").unwrap(), "A"), Some(&Value::from("1")));
        assert_eq!(field(&request[4], "k1"), Some(&Value::from("python:3")));
        let generated = create_request(&CreateArgs { kernel_ids: vec![], count: 3, ..args }).unwrap();
        assert_eq!(generated.1.len(), 3);
        assert!(generated.1.iter().all(|id| uuid::Uuid::parse_str(id).is_ok()));
    }
}
