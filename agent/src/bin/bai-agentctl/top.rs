//! `bai-agentctl top`: the terminal side of `bai_agent::top` (readings every interval, the
//! table redrawn in place with keys read in raw mode, or printed plain off a terminal).

use std::{
    collections::BTreeMap,
    io::{IsTerminal, Write},
    os::fd::AsRawFd,
    process::ExitCode,
    time::{Duration, Instant},
};

use anyhow::{Context, anyhow, bail};
use bai_agent::top::{self, Listed, Reading, SortKey};
use rmpv::Value;

use super::{Agent, field};

pub async fn run(
    agent: &Agent,
    agent_addr: &str,
    metrics: Option<String>,
    interval: f64,
    mut key: SortKey,
    iterations: Option<u32>,
) -> anyhow::Result<ExitCode> {
    if !(interval.is_finite() && interval >= 0.2) {
        bail!("--interval must be at least 0.2 seconds, got {interval}");
    }
    let url = format!("http://{}/metrics", metrics_addr(agent, agent_addr, metrics).await?);
    // The agent's counters move once per monitor pass: two readings closer than that can show
    // no change at all, so readings are never closer.
    let monitor_interval = monitor_interval(agent).await.as_secs_f64();
    let interval = interval.max(monitor_interval);
    let http = reqwest::Client::builder().timeout(Duration::from_secs(10)).build()?;
    let live = std::io::stdout().is_terminal() && iterations.is_none();
    let _raw = if live { Some(RawTerminal::enter()?) } else { None };
    let mut before = scrape(&http, &url).await?;
    let mut taken = Instant::now();
    // The first table needs a second reading for its rates.
    let mut wait = Duration::from_secs_f64(interval);
    let mut printed = 0u32;
    loop {
        if live {
            match next_key(wait).await {
                Some(b'q') | Some(3) => return Ok(ExitCode::SUCCESS),
                Some(pressed) => key = SortKey::from_key(pressed).unwrap_or(key),
                None => {}
            }
        } else {
            tokio::time::sleep(wait).await;
        }
        let now = scrape_after_a_pass(&http, &url, &before, Duration::from_secs_f64(interval)).await?;
        let wall = taken.elapsed().as_secs_f64();
        taken = Instant::now();
        let elapsed = top::readings_apart(before.passes.zip(now.passes), monitor_interval, wall);
        let listed = listed(agent).await?;
        let mut rows = top::rows(&before.readings, &now.readings, elapsed, &listed);
        top::sort(&mut rows, key);
        let table = top::render(&rows, key, agent_addr, interval);
        let mut out = std::io::stdout().lock();
        if live {
            // Home, clear, the table (output processing stays on: newlines still return).
            write!(out, "\x1b[H\x1b[2J{table}")?;
        } else {
            if printed > 0 {
                writeln!(out)?;
            }
            write!(out, "{table}")?;
        }
        out.flush()?;
        printed += 1;
        if !live && printed >= iterations.unwrap_or(1) {
            return Ok(ExitCode::SUCCESS);
        }
        before = now;
        wait = Duration::from_secs_f64(interval);
    }
}

/// The agent's /metrics: the flag, or its `agent.internal-addr` (an unspecified host is the
/// RPC address's host).
async fn metrics_addr(agent: &Agent, agent_addr: &str, given: Option<String>) -> anyhow::Result<String> {
    if let Some(addr) = given {
        return Ok(addr);
    }
    let config = agent.call("get_local_config", vec![]).await?;
    let internal = field(&config, "agent")
        .and_then(|section| field(section, "internal-addr"))
        .and_then(Value::as_str)
        .ok_or_else(|| anyhow!("get_local_config has no agent.internal-addr; pass --metrics"))?;
    let addr: std::net::SocketAddr = internal.parse().with_context(|| format!("agent.internal-addr {internal}"))?;
    if !addr.ip().is_unspecified() {
        return Ok(addr.to_string());
    }
    let host = agent_addr.trim_start_matches("tcp://").rsplit_once(':').map_or("127.0.0.1", |(host, _)| host);
    Ok(format!("{host}:{}", addr.port()))
}

/// The agent's `monitor.interval` (from `get_local_config`; nothing when it does not say).
async fn monitor_interval(agent: &Agent) -> Duration {
    let config = agent.call("get_local_config", vec![]).await.ok();
    config
        .as_ref()
        .and_then(|config| field(config, "monitor"))
        .and_then(|section| field(section, "interval"))
        .and_then(Value::as_str)
        .and_then(|text| humantime::parse_duration(text).ok())
        .unwrap_or(Duration::ZERO)
}

/// One scrape: the kernels' readings and the agent's passes so far.
struct Scrape {
    readings: BTreeMap<String, Reading>,
    passes: Option<f64>,
}

async fn scrape(http: &reqwest::Client, url: &str) -> anyhow::Result<Scrape> {
    let text = http.get(url).send().await.with_context(|| format!("reading {url}"))?.text().await?;
    let samples = top::parse_exposition(&text);
    Ok(Scrape { readings: top::readings(&samples), passes: top::monitor_passes(&samples) })
}

/// A scrape after the agent's next pass since `before`: scrapes again every tenth of a second,
/// for at most `patience`, while the agent has not sampled since (two readings from one pass
/// would show every rate as 0).
async fn scrape_after_a_pass(
    http: &reqwest::Client,
    url: &str,
    before: &Scrape,
    patience: Duration,
) -> anyhow::Result<Scrape> {
    let deadline = Instant::now() + patience;
    loop {
        let now = scrape(http, url).await?;
        let moved = match (before.passes, now.passes) {
            (Some(before), Some(now)) => now > before,
            _ => true,
        };
        if moved || Instant::now() >= deadline {
            return Ok(now);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn listed(agent: &Agent) -> anyhow::Result<BTreeMap<String, Listed>> {
    let reply = agent.call("list_kernels", vec![]).await?;
    let text = |kernel: &Value, key: &str| field(kernel, key).and_then(Value::as_str).unwrap_or_default().to_owned();
    Ok(reply
        .as_array()
        .into_iter()
        .flatten()
        .map(|kernel| {
            (text(kernel, "kernel_id"), Listed { state: text(kernel, "state"), owner: text(kernel, "owner_user_id") })
        })
        .collect())
}

/// A key pressed within `wait`, if any.
async fn next_key(wait: Duration) -> Option<u8> {
    tokio::task::spawn_blocking(move || {
        let mut poll = libc::pollfd { fd: std::io::stdin().as_raw_fd(), events: libc::POLLIN, revents: 0 };
        let millis = i32::try_from(wait.as_millis()).unwrap_or(i32::MAX);
        // SAFETY: one pollfd, owned here.
        if unsafe { libc::poll(&mut poll, 1, millis) } <= 0 {
            return None;
        }
        let mut byte = 0u8;
        // SAFETY: reading one byte into a local.
        let read = unsafe { libc::read(poll.fd, (&mut byte as *mut u8).cast(), 1) };
        (read == 1).then_some(byte)
    })
    .await
    .ok()
    .flatten()
}

/// The terminal in raw mode (keys arrive one at a time, unechoed; Ctrl-C is a key) until
/// dropped, when it is put back and the cursor moved below the table.
struct RawTerminal {
    saved: libc::termios,
}

impl RawTerminal {
    fn enter() -> anyhow::Result<Self> {
        let fd = std::io::stdin().as_raw_fd();
        // SAFETY: termios is plain data filled by tcgetattr.
        let mut saved: libc::termios = unsafe { std::mem::zeroed() };
        // SAFETY: a valid descriptor and a termios to fill.
        if unsafe { libc::tcgetattr(fd, &mut saved) } != 0 {
            bail!("reading the terminal's mode: {}", std::io::Error::last_os_error());
        }
        let mut raw = saved;
        raw.c_lflag &= !(libc::ICANON | libc::ECHO | libc::ISIG);
        raw.c_cc[libc::VMIN] = 1;
        raw.c_cc[libc::VTIME] = 0;
        // SAFETY: as above.
        if unsafe { libc::tcsetattr(fd, libc::TCSANOW, &raw) } != 0 {
            bail!("setting the terminal's mode: {}", std::io::Error::last_os_error());
        }
        Ok(Self { saved })
    }
}

impl Drop for RawTerminal {
    fn drop(&mut self) {
        // SAFETY: restoring the mode read in `enter`.
        unsafe { libc::tcsetattr(std::io::stdin().as_raw_fd(), libc::TCSANOW, &self.saved) };
        println!();
    }
}
