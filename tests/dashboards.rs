//! The Grafana dashboards in `dashboards/` (docs/DASHBOARDS.md): each file is checked against
//! the dashboard model its `schemaVersion` declares (keys, variables, panels, a grid without
//! overlaps, unique uids), and every query of every panel is run, its variables substituted,
//! against a real Prometheus scraping a real agent with running kernels: each returns at least
//! one series, of finite values, carrying the labels its legend names, and every metric and
//! label name it uses is one the agent really exports.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use bai_agent::rpc::client::RpcClient;
use bai_agent_tests::{
    Agent, BUSYBOX_IMAGE, PYTHON_IMAGE, PrometheusServer,
    kernels::{create, kernel_config, kernel_toml, runtime, with_field},
    require_environment, test_redis, unique, wait_until,
};
use serde_json::Value;

const FILES: [&str; 4] = ["node-overview.json", "kernel-detail.json", "agent-self.json", "usage-billing.json"];

/// The dashboard model these files are written against (Grafana 10.4 / 11.0).
const SCHEMA_VERSION: u64 = 39;

/// Panel types of that model that show query results (rows are not used: every panel queries).
const PANEL_TYPES: [&str; 7] = ["timeseries", "stat", "gauge", "bargauge", "table", "state-timeline", "piechart"];

/// Grafana's own variables that the queries may use, with the values the test gives them.
/// `$__range` and `$__range_s` are set from how long Prometheus has been scraping.
const RATE_INTERVAL: &str = "5s";
const INTERVAL: &str = "1s";

fn dashboards_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../dashboards")
}

fn load() -> Vec<(String, Value)> {
    FILES
        .iter()
        .map(|name| {
            let path = dashboards_dir().join(name);
            let text = std::fs::read_to_string(&path).unwrap_or_else(|err| panic!("{}: {err}", path.display()));
            let json = serde_json::from_str(&text).unwrap_or_else(|err| panic!("{name} is not JSON: {err}"));
            ((*name).to_owned(), json)
        })
        .collect()
}

fn panels(dashboard: &Value) -> &[Value] {
    dashboard["panels"].as_array().map(Vec::as_slice).unwrap_or_default()
}

fn variables(dashboard: &Value) -> &[Value] {
    dashboard["templating"]["list"].as_array().map(Vec::as_slice).unwrap_or_default()
}

fn variable<'a>(dashboard: &'a Value, name: &str) -> &'a Value {
    variables(dashboard).iter().find(|v| v["name"] == name).unwrap_or(&Value::Null)
}

/// The query of a `query` variable: the object form Grafana 10+ saves, or the older string.
fn variable_query(var: &Value) -> &str {
    var["query"]["query"].as_str().or_else(|| var["query"].as_str()).unwrap_or_default()
}

/// `(x, y, w, h)` of a panel, if its `gridPos` has all four as integers.
fn grid(panel: &Value) -> Option<(u64, u64, u64, u64)> {
    let pos = &panel["gridPos"];
    Some((pos["x"].as_u64()?, pos["y"].as_u64()?, pos["w"].as_u64()?, pos["h"].as_u64()?))
}

/// The names after `$` in `text`: `$name` and `${name}` (a `${name:format}` counts as `name`).
fn variable_refs(text: &str) -> Vec<String> {
    let mut names = Vec::new();
    let mut rest = text;
    while let Some(at) = rest.find('$') {
        rest = &rest[at + 1..];
        let name: String = if let Some(braced) = rest.strip_prefix('{') {
            let end = braced.find('}').unwrap_or(braced.len());
            braced[..end].split(':').next().unwrap_or_default().to_owned()
        } else {
            rest.chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect()
        };
        names.push(name);
    }
    names
}

/// `text` with each `$name` / `${name}` replaced by its value in `values`; an error names the
/// first variable that has none.
fn substitute(text: &str, values: &BTreeMap<&str, String>) -> Result<String, String> {
    let mut out = String::new();
    let mut rest = text;
    while let Some(at) = rest.find('$') {
        out.push_str(&rest[..at]);
        rest = &rest[at + 1..];
        let (name, len) = if let Some(braced) = rest.strip_prefix('{') {
            let end = braced.find('}').ok_or_else(|| format!("an unclosed ${{ in {text}"))?;
            (braced[..end].split(':').next().unwrap_or_default(), end + 2)
        } else {
            let len = rest.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).unwrap_or(rest.len());
            (&rest[..len], len)
        };
        let value = values.get(name).ok_or_else(|| format!("${name} has no value (in {text})"))?;
        out.push_str(value);
        rest = &rest[len..];
    }
    out.push_str(rest);
    Ok(out)
}

fn is_ident_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_' || c == ':'
}

/// The identifiers of a PromQL expression (outside string literals and `[...]` ranges), each
/// with whether it is used as a label name: in `by (…)`, `without (…)`, `on (…)`,
/// `ignoring (…)`, `group_left (…)`, `group_right (…)`, or before a matcher operator.
fn identifiers(expr: &str) -> Vec<(String, bool)> {
    let chars: Vec<char> = expr.chars().collect();
    let mut found = Vec::new();
    let (mut i, mut label_list_depth, mut depth, mut prev_word) = (0, None::<usize>, 0usize, String::new());
    while i < chars.len() {
        let c = chars[i];
        if c == '"' || c == '\'' {
            i += 1;
            while i < chars.len() && chars[i] != c {
                i += if chars[i] == '\\' { 2 } else { 1 };
            }
            i += 1;
            continue;
        }
        if c == '[' {
            while i < chars.len() && chars[i] != ']' {
                i += 1;
            }
            i += 1;
            continue;
        }
        if c == '(' {
            depth += 1;
            if ["by", "without", "on", "ignoring", "group_left", "group_right"].contains(&prev_word.as_str()) {
                label_list_depth = Some(depth);
            }
            prev_word.clear();
            i += 1;
            continue;
        }
        if c == ')' {
            if label_list_depth == Some(depth) {
                label_list_depth = None;
            }
            depth = depth.saturating_sub(1);
            prev_word.clear();
            i += 1;
            continue;
        }
        if c.is_ascii_alphabetic() || c == '_' {
            let start = i;
            while i < chars.len() && is_ident_char(chars[i]) {
                i += 1;
            }
            let word: String = chars[start..i].iter().collect();
            let after: String = chars[i..].iter().collect::<String>().trim_start().chars().take(2).collect();
            let matcher = after.starts_with("=~")
                || after.starts_with("!~")
                || after.starts_with("!=")
                || (after.starts_with('=') && !after.starts_with("=="));
            found.push((word.clone(), label_list_depth.is_some() || matcher));
            prev_word = word;
            continue;
        }
        if c.is_ascii_digit() || c == '.' {
            // A number (1e-9 included): not an identifier.
            while i < chars.len() && (chars[i].is_ascii_alphanumeric() || chars[i] == '.' || chars[i] == '-') {
                if chars[i] == '-' && !matches!(chars[i - 1], 'e' | 'E') {
                    break;
                }
                i += 1;
            }
            prev_word.clear();
            continue;
        }
        if !c.is_whitespace() {
            prev_word.clear();
        }
        i += 1;
    }
    found
}

/// The labels a legend names (`{{label}}`).
fn legend_labels(legend: &str) -> Vec<String> {
    legend
        .split("{{")
        .skip(1)
        .filter_map(|part| part.split_once("}}").map(|(name, _)| name.trim().to_owned()))
        .collect()
}

fn where_(file: &str, panel: &Value) -> String {
    format!("{file} / panel {:?}", panel["title"].as_str().unwrap_or("<untitled>"))
}

#[test]
fn every_dashboard_is_a_well_formed_provisioning_ready_model() {
    let dashboards = load();
    let mut problems = Vec::new();
    let mut uids = BTreeMap::new();
    let mut titles = BTreeSet::new();
    let builtins = ["__rate_interval", "__interval", "__interval_ms", "__range", "__range_s", "__range_ms"];
    for (file, d) in &dashboards {
        let mut problem = |text: String| problems.push(format!("{file}: {text}"));
        for key in ["title", "uid"] {
            if d[key].as_str().is_none_or(str::is_empty) {
                problem(format!("no `{key}`"));
            }
        }
        if d["schemaVersion"].as_u64() != Some(SCHEMA_VERSION) {
            problem(format!("schemaVersion is {}, not {SCHEMA_VERSION}", d["schemaVersion"]));
        }
        if !d["id"].is_null() {
            problem("has an `id`: provisioned dashboards leave it out (the uid identifies them)".into());
        }
        let uid = d["uid"].as_str().unwrap_or_default();
        if uid.len() > 40 || !uid.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_') {
            problem(format!("uid {uid:?} is not 1-40 of [A-Za-z0-9_-]"));
        }
        if let Some(other) = uids.insert(uid.to_owned(), file.clone()) {
            problem(format!("uid {uid:?} is also {other}'s"));
        }
        if !titles.insert(d["title"].as_str().unwrap_or_default().to_owned()) {
            problem(format!("title {} is not unique", d["title"]));
        }
        if d["time"]["from"].as_str().is_none() || d["time"]["to"].as_str().is_none() {
            problem("no `time.from` / `time.to`".into());
        }
        if !d["templating"]["list"].is_array() {
            problem("no `templating.list`".into());
        }
        if panels(d).is_empty() {
            problem("no `panels`".into());
        }

        // The variables: a Prometheus data source, then the node and kernel, queried through it.
        let datasource = variable(d, "datasource");
        if datasource["type"] != "datasource" || datasource["query"] != "prometheus" {
            problem(format!("$datasource is not a prometheus data source variable: {datasource}"));
        }
        for (name, label) in [("node", "instance"), ("kernel", "kernel_id")] {
            let var = variable(d, name);
            let query = variable_query(var);
            if var["type"] != "query"
                || var["datasource"]["uid"] != "${datasource}"
                || !query.starts_with("label_values(")
                || !query.trim_end().ends_with(&format!(", {label})"))
            {
                problem(format!("${name} is not a query variable label_values(…, {label}) on $datasource: {var}"));
            }
            if var["definition"].as_str() != Some(query) {
                problem(format!("${name}'s definition is not its query"));
            }
        }
        let defined: BTreeSet<String> =
            variables(d).iter().filter_map(|v| v["name"].as_str().map(str::to_owned)).collect();

        let mut ids = BTreeSet::new();
        let mut boxes: Vec<(String, (u64, u64, u64, u64))> = Vec::new();
        for panel in panels(d) {
            let at = where_(file, panel);
            let mut problem = |text: String| problems.push(format!("{at}: {text}"));
            if !panel["type"].as_str().is_some_and(|t| PANEL_TYPES.contains(&t)) {
                problem(format!("type {} is not one of {PANEL_TYPES:?}", panel["type"]));
            }
            if panel["title"].as_str().is_none_or(str::is_empty) {
                problem("no title".into());
            }
            if panel["description"].as_str().is_none_or(str::is_empty) {
                problem("no description (what the panel answers)".into());
            }
            if !panel["id"].as_u64().is_some_and(|id| ids.insert(id)) {
                problem(format!("id {} missing or not unique", panel["id"]));
            }
            if panel["datasource"]["type"] != "prometheus" || panel["datasource"]["uid"] != "${datasource}" {
                problem(format!("datasource {} is not ${{datasource}}", panel["datasource"]));
            }
            match grid(panel) {
                Some((x, _, w, h)) if w >= 1 && h >= 1 && x + w <= 24 => {
                    boxes.push((at.clone(), grid(panel).unwrap_or_default()))
                }
                _ => problem(format!("gridPos {} is not x, y, w, h within 24 columns", panel["gridPos"])),
            }
            let targets = panel["targets"].as_array().map(Vec::as_slice).unwrap_or_default();
            if targets.is_empty() {
                problem("no targets".into());
            }
            let mut ref_ids = BTreeSet::new();
            for target in targets {
                let expr = target["expr"].as_str().unwrap_or_default();
                if expr.trim().is_empty() {
                    problem(format!("a target without `expr`: {target}"));
                }
                if !target["refId"].as_str().is_some_and(|r| !r.is_empty() && ref_ids.insert(r.to_owned())) {
                    problem(format!("refId {} missing or not unique", target["refId"]));
                }
                if !target["datasource"].is_null() && target["datasource"] != panel["datasource"] {
                    problem(format!("target {} has another datasource", target["refId"]));
                }
                if expr.contains("vector(") {
                    problem(format!("`{expr}` uses a constant vector(…), which would hide a wrong series name"));
                }
                for name in variable_refs(expr) {
                    if !defined.contains(&name) && !builtins.contains(&name.as_str()) {
                        problem(format!("`{expr}` uses ${name}, which is neither a variable nor Grafana's"));
                    }
                }
            }
        }
        for (i, (a, (ax, ay, aw, ah))) in boxes.iter().enumerate() {
            for (b, (bx, by, bw, bh)) in &boxes[i + 1..] {
                if ax < &(bx + bw) && bx < &(ax + aw) && ay < &(by + bh) && by < &(ay + ah) {
                    problems.push(format!("{a} and {b} overlap in the grid"));
                }
            }
        }
    }
    assert!(problems.is_empty(), "{} problems:\n{}", problems.len(), problems.join("\n"));
}

#[test]
fn the_expression_scanner_tells_metrics_from_labels() {
    let found = identifiers(
        "sum by (kernel_id, le) (rate(container_cpu_usage_seconds_total{instance=~\"$node\", kernel_id!=\"a b\"}[5s])) \
         / clamp_min(x_total{slot=\"cpu\"} == 1, 1e-9) or 0 * y{a!~\"z\"}",
    );
    let labels: Vec<&str> = found.iter().filter(|(_, l)| *l).map(|(w, _)| w.as_str()).collect();
    let words: Vec<&str> = found.iter().filter(|(_, l)| !*l).map(|(w, _)| w.as_str()).collect();
    assert_eq!(labels, ["kernel_id", "le", "instance", "kernel_id", "slot", "a"]);
    assert_eq!(words, ["sum", "by", "rate", "container_cpu_usage_seconds_total", "clamp_min", "x_total", "or", "y"]);
    assert_eq!(variable_refs("a{b=~\"$node\"}[${__range}] ${kernel:regex}"), ["node", "__range", "kernel"]);
    let values = BTreeMap::from([("node", "n1".to_owned()), ("__range", "30s".to_owned()), ("__range_s", "30".into())]);
    assert_eq!(substitute("x{i=~\"$node\"}[$__range] * $__range_s", &values).as_deref(), Ok("x{i=~\"n1\"}[30s] * 30"));
    assert!(substitute("$nope", &values).is_err());
    assert_eq!(legend_labels("{{kernel_id}} rx {{ sink }}"), ["kernel_id", "sink"]);
}

/// What the python kernel does, in a loop, so that every rate has something to show: a little
/// CPU, a loopback TCP transfer, direct I/O on its scratch directory (on a disk), a raw socket
/// that the raw-socket guardrail refuses (a policy verdict), and a file in /dev/shm.
const PYTHON_WORK: &str = r#"exec python3 -u - <<'EOF'
import mmap, os, socket, threading, time
server = socket.socket()
server.bind(("127.0.0.1", 0))
server.listen(1)
def drain():
    conn, _ = server.accept()
    while conn.recv(1 << 16):
        pass
threading.Thread(target=drain, daemon=True).start()
client = socket.create_connection(server.getsockname())
block = mmap.mmap(-1, 1 << 20)
block.write(b"x" * (1 << 20))
held = bytearray(16 << 20)
with open("/dev/shm/dashboards", "wb") as shm:
    shm.write(b"y" * (1 << 20))
while True:
    start = time.time()
    while time.time() - start < 0.05:
        pass
    client.sendall(b"z" * (256 << 10))
    try:
        fd = os.open("/home/work/blob", os.O_RDWR | os.O_CREAT | getattr(os, "O_DIRECT", 0))
        os.pwrite(fd, block, 0)
        os.preadv(fd, [block], 0)
        os.close(fd)
    except OSError as err:
        print("direct I/O:", err)
    try:
        socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP).close()
    except OSError:
        pass
    time.sleep(0.2)
EOF
"#;

/// The values of a `label_values(selector, label)` variable, asked of Prometheus as Grafana does.
fn label_values(prometheus: &PrometheusServer, query: &str) -> Result<Vec<String>, String> {
    let inner = query
        .trim()
        .strip_prefix("label_values(")
        .and_then(|q| q.strip_suffix(')'))
        .ok_or_else(|| format!("{query} is not label_values(…)"))?;
    let (selector, label) = inner.rsplit_once(',').ok_or_else(|| format!("{query} names no label"))?;
    let reply = prometheus
        .api(&format!("series?match[]={}", encode(selector.trim())))
        .map_err(|err| format!("{query}: {err}"))?;
    let values: BTreeSet<String> = reply["data"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default()
        .iter()
        .filter_map(|series| series[label.trim()].as_str().map(str::to_owned))
        .collect();
    Ok(values.into_iter().collect())
}

fn encode(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'_' | b'-' | b'.' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// What is wrong with one target's result, if anything.
fn check_result(prometheus: &PrometheusServer, expr: &str, legend: &str, table: bool) -> Result<(), String> {
    let result = prometheus.query(expr).map_err(|err| format!("the query failed: {err}"))?;
    if result.is_empty() {
        return Err("returned no series".into());
    }
    for series in &result {
        let value = series["value"][1].as_str().unwrap_or_default();
        if !value.parse::<f64>().is_ok_and(f64::is_finite) {
            return Err(format!("returned {value} for {}", series["metric"]));
        }
        if !table {
            for label in legend_labels(legend) {
                if series["metric"][&label].as_str().is_none_or(str::is_empty) {
                    return Err(format!("its legend names {{{{{label}}}}}, which {} lacks", series["metric"]));
                }
            }
        }
    }
    Ok(())
}

#[test]
fn every_panel_query_returns_series_from_a_real_prometheus_scraping_the_agent() {
    require_environment();
    let dashboards = load();
    let dir = tempfile::tempdir().expect("tempdir");
    let stream = unique("usage-dashboards");
    // Fast sampling and stats, usage windows of 2 s, and two fake CUDA devices so that the
    // accelerator panels have data too.
    let toml = format!(
        "{}[monitor]\ninterval = \"200ms\"\ngone-series-grace = \"30s\"\nstats-interval = \"500ms\"\n\n\
         [usage]\ninterval = \"2s\"\nstream = \"{stream}\"\n",
        kernel_toml(dir.path(), 24700)
    )
    .replace(
        "[debug]\nheartbeat-interval = \"60s\"\n",
        "[debug]\nheartbeat-interval = \"60s\"\nfake-cuda-devices = 2\n",
    );
    assert!(toml.contains("fake-cuda-devices = 2"), "kernel_toml's [debug] section changed: {toml}");
    let agent = Agent::start(&toml).expect("agent starts");
    let rt = runtime();
    let client = rt.block_on(RpcClient::connect(&agent.rpc_addr)).expect("connect");
    let busy = unique("kernel");
    let config = with_field(kernel_config(PYTHON_IMAGE, "1", "256m"), "startup_command", PYTHON_WORK.into());
    rt.block_on(create(&client, "s-dashboards", &busy, config)).expect("create the python kernel");
    let quiet = unique("kernel");
    let config = with_field(
        kernel_config(BUSYBOX_IMAGE, "1", "128m"),
        "startup_command",
        "while :; do dd if=/dev/zero of=/dev/null bs=64k count=200 2>/dev/null; sleep 1; done".into(),
    );
    rt.block_on(create(&client, "s-dashboards", &quiet, config)).expect("create the busybox kernel");
    agent.wait_for_kernel(&busy, true, Duration::from_secs(20)).expect("the python kernel is measured");
    agent.wait_for_kernel(&quiet, true, Duration::from_secs(20)).expect("the busybox kernel is measured");

    let prometheus = PrometheusServer::start(&[&agent.addr]).expect("prometheus starts");
    let scraping_since = Instant::now();
    // RPC calls while Prometheus scrapes, so that the RPC rates and latencies have samples.
    let ping = |rounds: usize| {
        for _ in 0..rounds {
            rt.block_on(client.call("list_kernels", vec![], vec![])).expect("list_kernels");
        }
    };
    let busy_rate = |metric: &str| {
        format!(
            "sum(rate({metric}{{kernel_id=\"{busy}\"}}[{RATE_INTERVAL}])) > 0 and sum(count_over_time(up[1m])) >= 16"
        )
    };
    let mut waiting = vec![
        busy_rate("container_cpu_usage_seconds_total"),
        busy_rate("container_network_transmit_bytes_total"),
        busy_rate("container_fs_writes_bytes_total"),
        busy_rate("backendai_agent_policy_verdicts_total"),
        format!("sum(rate(backendai_agent_rpc_requests_total{{method=\"list_kernels\"}}[{RATE_INTERVAL}])) > 0"),
        "sum(backendai_agent_usage_delivered_total) > 0".to_owned(),
    ];
    wait_until("Prometheus to have enough samples for rates", Duration::from_secs(60), || {
        ping(2);
        waiting.retain(|query| !prometheus.query(query).is_ok_and(|r| !r.is_empty()));
        std::thread::sleep(Duration::from_millis(250));
        waiting.is_empty()
    })
    .unwrap_or_else(|err| panic!("{err}; still empty: {waiting:?}\nprometheus log:\n{}", prometheus.log_text()));

    // The names the agent really exports, and the label names Prometheus holds.
    let exported: BTreeSet<String> = agent.metrics().expect("/metrics").into_iter().map(|s| s.name).collect();
    let labels = prometheus.api("labels").expect("labels");
    let label_names: BTreeSet<String> = labels["data"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default()
        .iter()
        .filter_map(|l| l.as_str().map(str::to_owned))
        .collect();

    let mut failures = Vec::new();
    let mut queries = Vec::new();
    for (file, d) in &dashboards {
        // The variables as Grafana resolves them: the node first, then its kernels.
        let mut values: BTreeMap<&str, String> = BTreeMap::from([
            ("__rate_interval", RATE_INTERVAL.to_owned()),
            ("__interval", INTERVAL.to_owned()),
            ("__interval_ms", "1000".to_owned()),
        ]);
        let nodes = label_values(&prometheus, variable_query(variable(d, "node"))).expect("the $node query");
        assert!(nodes.contains(&agent.addr), "{file}: $node offers {nodes:?}, not the agent at {}", agent.addr);
        // A multi-value variable with several values selected reads `(a|b)` in a query.
        let multi = |name: &str| variable(d, name)["multi"] == true;
        values.insert("node", if multi("node") { format!("({})", agent.addr) } else { agent.addr.clone() });
        let kernel_query = substitute(variable_query(variable(d, "kernel")), &values).expect("substituted");
        let kernels = label_values(&prometheus, &kernel_query).expect("the $kernel query");
        assert!(
            kernels.contains(&busy) && kernels.contains(&quiet),
            "{file}: $kernel offers {kernels:?}, not both kernels ({busy}, {quiet})"
        );
        values.insert("kernel", if multi("kernel") { format!("({busy}|{quiet})") } else { busy.clone() });
        for panel in panels(d) {
            for target in panel["targets"].as_array().map(Vec::as_slice).unwrap_or_default() {
                let raw = target["expr"].as_str().unwrap_or_default();
                let at = format!("{} ({}): {raw}", where_(file, panel), target["refId"].as_str().unwrap_or("?"));
                for (word, is_label) in identifiers(raw) {
                    let ours = word.starts_with("container_") || word.starts_with("backendai_");
                    if is_label && !label_names.contains(&word) {
                        failures.push(format!("{at}\n    uses the label {word}, which no series has"));
                    } else if !is_label && ours && !exported.contains(&word) {
                        failures.push(format!("{at}\n    uses {word}, which the agent's /metrics does not have"));
                    }
                }
                let legend = target["legendFormat"].as_str().unwrap_or_default().to_owned();
                let table = target["format"] == "table";
                queries.push((at, raw.to_owned(), legend, table, values.clone()));
            }
        }
    }

    // Every query, with $__range covering what Prometheus has scraped; a query that finds
    // nothing is asked again for a few seconds (a counter that has not moved yet) before it fails.
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut pending: Vec<_> = queries.iter().collect();
    let mut last_errors = BTreeMap::new();
    while !pending.is_empty() {
        ping(1);
        let range = scraping_since.elapsed().as_secs() + 2;
        pending.retain(|(at, raw, legend, table, values)| {
            let mut values = values.clone();
            values.insert("__range", format!("{range}s"));
            values.insert("__range_s", range.to_string());
            values.insert("__range_ms", (range * 1000).to_string());
            let outcome = substitute(raw, &values).and_then(|expr| {
                check_result(&prometheus, &expr, legend, *table).map_err(|err| format!("{err}\n    ran: {expr}"))
            });
            match outcome {
                Ok(_) => false,
                Err(err) => {
                    last_errors.insert(at.clone(), err);
                    true
                }
            }
        });
        if Instant::now() > deadline {
            break;
        }
        if !pending.is_empty() {
            std::thread::sleep(Duration::from_millis(500));
        }
    }
    for (at, ..) in &pending {
        failures.push(format!("{at}\n    {}", last_errors.get(at).map_or("", String::as_str)));
    }

    // The usage stream of this test only: leave the shared Redis as it was.
    if let Ok(redis) = redis::Client::open(format!("redis://{}/4", test_redis()))
        && let Ok(mut conn) = redis.get_connection_with_timeout(Duration::from_secs(5))
    {
        let _: Result<i64, _> = redis::cmd("DEL").arg(&stream).query(&mut conn);
    }
    assert!(
        failures.is_empty(),
        "{} of {} panel queries failed:\n{}",
        failures.len(),
        queries.len(),
        failures.join("\n")
    );
    eprintln!("{} panel queries of {} dashboards returned series", queries.len(), dashboards.len());
}
