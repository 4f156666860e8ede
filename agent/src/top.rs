//! `bai-agentctl top`'s view of a node: the agent's `/metrics` read twice and turned into one
//! row per kernel (CPU, memory against its limit, network and disk rates), joined with
//! `list_kernels` (state, owner), sorted and laid out as a table.

use std::collections::BTreeMap;

/// One sample of a Prometheus text exposition.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

/// The samples of an exposition (classic text or OpenMetrics); comments and malformed lines
/// are skipped.
pub fn parse_exposition(text: &str) -> Vec<Sample> {
    text.lines().filter(|line| !line.starts_with('#') && !line.trim().is_empty()).filter_map(parse_line).collect()
}

fn parse_line(line: &str) -> Option<Sample> {
    let (name, labels, rest) = match line.find('{') {
        Some(open) => {
            let close = line.rfind('}')?;
            (&line[..open], parse_labels(&line[open + 1..close]), &line[close + 1..])
        }
        None => {
            let (name, rest) = line.split_once(' ')?;
            (name, BTreeMap::new(), rest)
        }
    };
    let value = rest.split_whitespace().next()?.parse().ok()?;
    Some(Sample { name: name.to_owned(), labels, value })
}

fn parse_labels(text: &str) -> BTreeMap<String, String> {
    let mut labels = BTreeMap::new();
    let mut rest = text;
    while let Some((key, after)) = rest.split_once("=\"") {
        let mut value = String::new();
        let mut chars = after.char_indices();
        let mut end = after.len();
        while let Some((i, c)) = chars.next() {
            match c {
                '\\' => match chars.next() {
                    Some((_, 'n')) => value.push('\n'),
                    Some((_, other)) => value.push(other),
                    None => {}
                },
                '"' => {
                    end = i + 1;
                    break;
                }
                other => value.push(other),
            }
        }
        labels.insert(key.trim_start_matches(',').trim().to_owned(), value);
        rest = &after[end..];
    }
    labels
}

/// One kernel's counters and gauges at one scrape.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Reading {
    pub owner: String,
    pub cpu_seconds: f64,
    pub memory_bytes: f64,
    pub memory_limit: f64,
    pub rx_bytes: f64,
    pub tx_bytes: f64,
    pub read_bytes: f64,
    pub write_bytes: f64,
}

/// The kernels' readings in one exposition, by kernel id.
pub fn readings(samples: &[Sample]) -> BTreeMap<String, Reading> {
    let mut by_kernel: BTreeMap<String, Reading> = BTreeMap::new();
    for sample in samples {
        let Some(kernel) = sample.labels.get("kernel_id").filter(|k| !k.is_empty()) else { continue };
        let field: fn(&mut Reading) -> &mut f64 = match sample.name.as_str() {
            "container_cpu_usage_seconds_total" => |r| &mut r.cpu_seconds,
            "container_memory_working_set_bytes" => |r| &mut r.memory_bytes,
            "container_spec_memory_limit_bytes" => |r| &mut r.memory_limit,
            "container_network_receive_bytes_total" => |r| &mut r.rx_bytes,
            "container_network_transmit_bytes_total" => |r| &mut r.tx_bytes,
            "container_fs_reads_bytes_total" => |r| &mut r.read_bytes,
            "container_fs_writes_bytes_total" => |r| &mut r.write_bytes,
            _ => continue,
        };
        let reading = by_kernel.entry(kernel.clone()).or_default();
        if let Some(owner) = sample.labels.get("owner_user_id") {
            reading.owner.clone_from(owner);
        }
        *field(reading) += sample.value;
    }
    by_kernel
}

/// The agent's sampling passes so far (`backendai_agent_monitor_passes_total`): readings move
/// once per pass, so rates are taken between passes.
pub fn monitor_passes(samples: &[Sample]) -> Option<f64> {
    samples.iter().find(|sample| sample.name == "backendai_agent_monitor_passes_total").map(|sample| sample.value)
}

/// The time two scrapes' readings are apart: the passes between them times the monitor
/// interval where both are known (the readings are the passes'), else the wall time between
/// the scrapes.
pub fn readings_apart(passes: Option<(f64, f64)>, monitor_interval: f64, wall: f64) -> f64 {
    match passes {
        Some((before, now)) if monitor_interval > 0.0 && now > before => (now - before) * monitor_interval,
        _ => wall,
    }
}

/// What `list_kernels` says of a kernel.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Listed {
    pub state: String,
    pub owner: String,
}

/// One line of the view.
#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    pub kernel_id: String,
    pub state: String,
    pub owner: String,
    /// Percent of one CPU.
    pub cpu_percent: f64,
    pub memory_bytes: f64,
    pub memory_limit: f64,
    /// Bytes per second.
    pub rx_rate: f64,
    pub tx_rate: f64,
    pub read_rate: f64,
    pub write_rate: f64,
}

/// Rows from two scrapes `elapsed` seconds apart: every kernel listed or measured now.
pub fn rows(
    before: &BTreeMap<String, Reading>,
    now: &BTreeMap<String, Reading>,
    elapsed: f64,
    listed: &BTreeMap<String, Listed>,
) -> Vec<Row> {
    let ids: std::collections::BTreeSet<&String> = now.keys().chain(listed.keys()).collect();
    ids.into_iter()
        .map(|id| {
            let current = now.get(id).cloned().unwrap_or_default();
            let earlier = before.get(id).cloned().unwrap_or_else(|| current.clone());
            let rate = |a: f64, b: f64| if elapsed > 0.0 { ((a - b) / elapsed).max(0.0) } else { 0.0 };
            let entry = listed.get(id);
            Row {
                kernel_id: id.clone(),
                state: entry.map_or_else(|| "-".to_owned(), |e| e.state.clone()),
                owner: entry.map(|e| e.owner.clone()).filter(|o| !o.is_empty()).unwrap_or(current.owner.clone()),
                cpu_percent: rate(current.cpu_seconds, earlier.cpu_seconds) * 100.0,
                memory_bytes: current.memory_bytes,
                memory_limit: current.memory_limit,
                rx_rate: rate(current.rx_bytes, earlier.rx_bytes),
                tx_rate: rate(current.tx_bytes, earlier.tx_bytes),
                read_rate: rate(current.read_bytes, earlier.read_bytes),
                write_rate: rate(current.write_bytes, earlier.write_bytes),
            }
        })
        .collect()
}

/// The column rows are sorted by (largest first; the kernel id in order).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum SortKey {
    Cpu,
    Mem,
    Net,
    Disk,
    Kernel,
}

impl SortKey {
    /// The key a keypress picks: `c`, `m`, `n`, `d`, `k`.
    pub fn from_key(key: u8) -> Option<SortKey> {
        match key {
            b'c' => Some(SortKey::Cpu),
            b'm' => Some(SortKey::Mem),
            b'n' => Some(SortKey::Net),
            b'd' => Some(SortKey::Disk),
            b'k' => Some(SortKey::Kernel),
            _ => None,
        }
    }

    fn name(self) -> &'static str {
        match self {
            SortKey::Cpu => "cpu",
            SortKey::Mem => "mem",
            SortKey::Net => "net",
            SortKey::Disk => "disk",
            SortKey::Kernel => "kernel",
        }
    }
}

pub fn sort(rows: &mut [Row], key: SortKey) {
    let measure = |row: &Row| match key {
        SortKey::Cpu => row.cpu_percent,
        SortKey::Mem => row.memory_bytes,
        SortKey::Net => row.rx_rate + row.tx_rate,
        SortKey::Disk => row.read_rate + row.write_rate,
        SortKey::Kernel => 0.0,
    };
    rows.sort_by(|a, b| measure(b).total_cmp(&measure(a)).then_with(|| a.kernel_id.cmp(&b.kernel_id)));
}

fn human(bytes: f64) -> String {
    const UNITS: [&str; 5] = ["B", "K", "M", "G", "T"];
    let mut value = bytes;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 { format!("{value:.0}{}", UNITS[unit]) } else { format!("{value:.1}{}", UNITS[unit]) }
}

/// The table, with a header line saying when, how many and the sort key.
pub fn render(rows: &[Row], key: SortKey, agent: &str, interval: f64) -> String {
    let mut out = format!(
        "bai-agentctl top: {agent}  kernels {}  every {interval}s  sorted by {}  (c m n d k: sort, q: quit)\n",
        rows.len(),
        key.name()
    );
    out.push_str(&format!(
        "{:<36} {:<11} {:<12} {:>7} {:>17} {:>9} {:>9} {:>9} {:>9}\n",
        "KERNEL", "STATE", "OWNER", "CPU%", "MEM/LIMIT", "RX/s", "TX/s", "READ/s", "WRITE/s"
    ));
    for row in rows {
        let limit = if row.memory_limit > 0.0 { human(row.memory_limit) } else { "-".into() };
        let owner: String = if row.owner.is_empty() { "-".into() } else { row.owner.chars().take(12).collect() };
        out.push_str(&format!(
            "{:<36} {:<11} {:<12} {:>7.1} {:>17} {:>9} {:>9} {:>9} {:>9}\n",
            row.kernel_id,
            row.state,
            owner,
            row.cpu_percent,
            format!("{}/{limit}", human(row.memory_bytes)),
            human(row.rx_rate),
            human(row.tx_rate),
            human(row.read_rate),
            human(row.write_rate),
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = "# TYPE container_cpu_usage_seconds_total counter\n\
        container_cpu_usage_seconds_total{kernel_id=\"k1\",owner_user_id=\"alice\"} 10.5\n\
        container_memory_working_set_bytes{kernel_id=\"k1\",owner_user_id=\"alice\"} 1048576\n\
        container_spec_memory_limit_bytes{kernel_id=\"k1\"} 268435456\n\
        container_network_transmit_bytes_total{kernel_id=\"k2\",note=\"a \\\"quoted\\\" value\"} 2048\n\
        backendai_agent_up 1\n";

    #[test]
    fn an_exposition_becomes_readings_per_kernel() {
        let samples = parse_exposition(TEXT);
        assert_eq!(samples.len(), 5);
        assert_eq!(samples[3].labels["note"], "a \"quoted\" value");
        let now = readings(&samples);
        assert_eq!(now["k1"].owner, "alice");
        assert_eq!(now["k1"].memory_limit, 268435456.0);
        assert_eq!(now["k2"].tx_bytes, 2048.0);
    }

    #[test]
    fn rates_span_the_passes_between_two_scrapes() {
        let samples = parse_exposition("backendai_agent_monitor_passes_total 42\n# HELP x\nother 1\n");
        assert_eq!(monitor_passes(&samples), Some(42.0));
        assert_eq!(monitor_passes(&parse_exposition("other 1\n")), None);
        assert_eq!(readings_apart(Some((40.0, 42.0)), 1.0, 1.3), 2.0, "two passes of a second");
        assert_eq!(readings_apart(Some((42.0, 42.0)), 1.0, 1.3), 1.3, "no pass between: the wall time");
        assert_eq!(readings_apart(None, 1.0, 1.3), 1.3);
    }

    #[test]
    fn rates_come_from_two_scrapes_and_sorting_puts_the_largest_first() {
        let before = readings(&parse_exposition(TEXT));
        let mut later = before.clone();
        later.get_mut("k1").expect("k1").cpu_seconds += 1.0;
        later.get_mut("k2").expect("k2").tx_bytes += 4096.0;
        let listed = BTreeMap::from([("k3".to_owned(), Listed { state: "creating".into(), owner: "bob".into() })]);
        let mut table = rows(&before, &later, 2.0, &listed);
        assert_eq!(table.len(), 3, "measured and listed kernels");
        sort(&mut table, SortKey::Cpu);
        assert_eq!((table[0].kernel_id.as_str(), table[0].cpu_percent), ("k1", 50.0));
        sort(&mut table, SortKey::Net);
        assert_eq!((table[0].kernel_id.as_str(), table[0].tx_rate), ("k2", 2048.0));
        let text = render(&table, SortKey::Net, "127.0.0.1:6001", 2.0);
        assert!(text.contains("sorted by net") && text.contains("k3") && text.contains("creating"), "{text}");
        assert!(text.contains("1.0M/256.0M"), "{text}");
    }
}
