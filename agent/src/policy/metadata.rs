//! Metadata service for kernels: each caller is identified by its own kernel's socket tables.

use std::collections::{BTreeMap, HashMap};
use std::io::{self, Read};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{ConnectInfo, Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Extension, Json, Router};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

const MAX_PROC_FILE_BYTES: u64 = 8 << 20;
const MAX_CGROUP_PROCS_BYTES: u64 = 1 << 20;
const MAX_CGROUP_DEPTH: usize = 6;
const MAX_CGROUP_DIRS: usize = 1024;
const REFUSAL_LOG_EVERY: Duration = Duration::from_secs(60);
const REFUSAL_LOG_CAPACITY: usize = 1024;
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);
const FORBIDDEN_BODY: &str = "forbidden: not a kernel of this agent";
const META_DATA_LISTING: &str = "envs\nlocal-ipv4\nsandbox";
/// Client socket states accepted: ESTABLISHED, FIN_WAIT1, FIN_WAIT2 (request sent, then half-closed), CLOSE_WAIT.
const ACCEPTED_STATES: [u8; 4] = [0x01, 0x04, 0x05, 0x08];

/// What the service needs from the kernel registry.
pub trait KernelDirectory: Send + Sync + 'static {
    /// Ids of the kernels running now.
    fn kernel_ids(&self) -> Vec<String>;
    /// A kernel's environment as its container got it (None: unknown kernel).
    fn environ(&self, kernel_id: &str) -> Option<BTreeMap<String, String>>;
}

#[derive(Debug, Clone)]
pub struct MetadataConfig {
    /// Where each kernel's own cgroup directory lives in the unified cgroup hierarchy:
    /// `{kernels_cgroup_root}/{kernel_id}/` (the container's cgroup is somewhere below it).
    pub kernels_cgroup_root: PathBuf,
    /// Answer of /latest/meta-data/sandbox (Backend.AI's `container.sandbox-type`, "docker").
    pub sandbox_type: String,
    /// Root of procfs, "/proc" (tests may point elsewhere).
    pub proc_root: PathBuf,
}

#[derive(Debug, thiserror::Error)]
pub enum MetadataError {
    #[error("cannot bind the metadata service to {addr}")]
    Bind { addr: SocketAddr, source: io::Error },
    #[error("cannot read the metadata listener's local address")]
    LocalAddr(#[source] io::Error),
    #[error("metadata service stopped")]
    Serve(#[source] io::Error),
}

/// Binds the listener (separate so the daemon reports a bind failure at startup, naming the address).
pub async fn bind(addr: SocketAddr) -> Result<TcpListener, MetadataError> {
    TcpListener::bind(addr).await.map_err(|source| MetadataError::Bind { addr, source })
}

/// Serves until `cancel` fires (then waits at most `SHUTDOWN_GRACE` for open connections).
///
/// The listener's local address is what callers must have connected to. If it is unspecified
/// (0.0.0.0 or ::), the server cannot know which of its addresses a client used, so the
/// client's socket is matched on the server port only.
pub async fn serve(
    listener: TcpListener,
    directory: Arc<dyn KernelDirectory>,
    config: MetadataConfig,
    cancel: CancellationToken,
) -> Result<(), MetadataError> {
    let local = listener.local_addr().map_err(MetadataError::LocalAddr)?;
    if local.ip().is_unspecified() {
        info!(%local, "metadata service bound to an unspecified address; matching callers on port only");
    }
    let shared = Arc::new(Shared { directory, config: Arc::new(config), local, refusals: Mutex::default() });
    let app = router(shared).into_make_service_with_connect_info::<SocketAddr>();
    let server = axum::serve(listener, app).with_graceful_shutdown(cancel.clone().cancelled_owned());
    info!(%local, "metadata service listening");
    tokio::select! {
        served = server.into_future() => served.map_err(MetadataError::Serve),
        () = async { cancel.cancelled().await; tokio::time::sleep(SHUTDOWN_GRACE).await } => {
            warn!("metadata service connections still open after the shutdown grace; dropping them");
            Ok(())
        }
    }
}

/// Which kernel owns the client end (`peer`) of a connection accepted at `local`, verified; None if none does.
///
/// A kernel owns the connection when a process in its cgroup sees, in its own network namespace,
/// a TCP socket from `peer` to `local`. If two kernels do (a shared namespace), nobody is trusted.
pub fn identify(
    directory: &dyn KernelDirectory,
    config: &MetadataConfig,
    peer: SocketAddr,
    local: SocketAddr,
) -> Option<String> {
    let (peer, local) = (canonical(peer), canonical(local));
    let mut found: Option<String> = None;
    for kernel_id in directory.kernel_ids() {
        if !is_path_component(&kernel_id) {
            warn!(kernel_id, "kernel id is not a single path component; skipped");
            continue;
        }
        if !kernel_owns(config, &kernel_id, peer, local) {
            continue;
        }
        if let Some(first) = &found {
            warn!(first, second = kernel_id, %peer, "connection seen by two kernels; refusing both");
            return None;
        }
        found = Some(kernel_id);
    }
    found
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct TcpEntry {
    local: SocketAddr,
    remote: SocketAddr,
    state: u8,
}

struct Shared {
    directory: Arc<dyn KernelDirectory>,
    config: Arc<MetadataConfig>,
    local: SocketAddr,
    refusals: Mutex<HashMap<IpAddr, Instant>>,
}

/// The identified caller, put in the request's extensions by `gate`.
#[derive(Debug, Clone)]
struct Caller {
    kernel_id: String,
    ip: IpAddr,
}

fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/", get(|| async { "latest/" }))
        .route("/latest", get(|| async { "meta-data/" }))
        .route("/latest/", get(|| async { "meta-data/" }))
        .route("/latest/meta-data", get(|| async { META_DATA_LISTING }))
        .route("/latest/meta-data/", get(|| async { META_DATA_LISTING }))
        .route("/latest/meta-data/envs", get(envs))
        .route("/latest/meta-data/local-ipv4", get(local_ipv4))
        .route("/latest/meta-data/sandbox", get(sandbox))
        .fallback(|| async { StatusCode::NOT_FOUND })
        .layer(middleware::from_fn_with_state(shared.clone(), gate))
        .with_state(shared)
}

/// Identifies every request before routing; refuses strangers; stamps `Server: BackendAI`.
async fn gate(State(shared): State<Arc<Shared>>, mut request: Request, next: Next) -> Response {
    let peer = request.extensions().get::<ConnectInfo<SocketAddr>>().map(|info| canonical(info.0));
    let kernel_id = match peer {
        Some(peer) => identify_blocking(&shared, peer).await,
        None => None,
    };
    let mut response = match (peer, kernel_id) {
        (Some(peer), Some(kernel_id)) => {
            debug!(kernel_id, path = %request.uri().path(), "metadata request");
            request.extensions_mut().insert(Caller { kernel_id, ip: peer.ip() });
            next.run(request).await
        }
        (peer, _) => {
            log_refusal(&shared, peer);
            (StatusCode::FORBIDDEN, FORBIDDEN_BODY).into_response()
        }
    };
    response.headers_mut().insert(header::SERVER, HeaderValue::from_static("BackendAI"));
    response
}

async fn identify_blocking(shared: &Shared, peer: SocketAddr) -> Option<String> {
    let (directory, config, local) = (shared.directory.clone(), shared.config.clone(), shared.local);
    match tokio::task::spawn_blocking(move || identify(directory.as_ref(), &config, peer, local)).await {
        Ok(found) => found,
        Err(err) => {
            error!(%peer, error = %err, "metadata caller identification failed");
            None
        }
    }
}

/// Warns about a refused caller at most once per IP per `REFUSAL_LOG_EVERY`.
fn log_refusal(shared: &Shared, peer: Option<SocketAddr>) {
    let Some(peer) = peer else {
        warn!("metadata request without a peer address refused");
        return;
    };
    let now = Instant::now();
    let mut seen = shared.refusals.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    if seen.get(&peer.ip()).is_some_and(|last| now.duration_since(*last) < REFUSAL_LOG_EVERY) {
        return;
    }
    if seen.len() >= REFUSAL_LOG_CAPACITY {
        seen.retain(|_, last| now.duration_since(*last) < REFUSAL_LOG_EVERY);
        if seen.len() >= REFUSAL_LOG_CAPACITY {
            seen.clear();
        }
    }
    seen.insert(peer.ip(), now);
    warn!(%peer, "metadata request from a caller that is not a kernel of this agent refused");
}

async fn envs(State(shared): State<Arc<Shared>>, Extension(caller): Extension<Caller>) -> Response {
    match shared.directory.environ(&caller.kernel_id) {
        Some(environ) => Json(environ).into_response(),
        None => StatusCode::NOT_FOUND.into_response(),
    }
}

async fn local_ipv4(Extension(caller): Extension<Caller>) -> String {
    caller.ip.to_string()
}

async fn sandbox(State(shared): State<Arc<Shared>>) -> String {
    shared.config.sandbox_type.clone()
}

/// An IPv4-mapped IPv6 address as plain IPv4; anything else as is.
fn canonical(addr: SocketAddr) -> SocketAddr {
    SocketAddr::new(addr.ip().to_canonical(), addr.port())
}

fn is_path_component(id: &str) -> bool {
    !id.is_empty() && id != "." && id != ".." && !id.contains(['/', '\0'])
}

/// Whether a process of `kernel_id` sees the client socket `peer` → `local` in its network namespace.
fn kernel_owns(config: &MetadataConfig, kernel_id: &str, peer: SocketAddr, local: SocketAddr) -> bool {
    let cgroup = config.kernels_cgroup_root.join(kernel_id);
    let mut pid = None;
    walk_cgroup_pids(&cgroup, |found| {
        pid = Some(found);
        true
    });
    let Some(pid) = pid else { return false };
    let seen = read_sockets(&config.proc_root, pid).iter().any(|entry| socket_matches(entry, peer, local));
    // The pid was read before the socket tables: make sure it still belongs to the kernel.
    seen && walk_cgroup_pids(&cgroup, |found| found == pid)
}

/// Calls `visit` with the pids in `root`'s `cgroup.procs` and its descendants' (bounded) until it returns true.
pub(super) fn walk_cgroup_pids(root: &Path, mut visit: impl FnMut(u32) -> bool) -> bool {
    let mut stack = vec![(root.to_path_buf(), 0usize)];
    let mut visited = 0usize;
    while let Some((dir, depth)) = stack.pop() {
        visited += 1;
        if visited > MAX_CGROUP_DIRS {
            warn!(root = %root.display(), "kernel cgroup tree too large; search cut short");
            return false;
        }
        if let Ok(procs) = read_capped(&dir.join("cgroup.procs"), MAX_CGROUP_PROCS_BYTES)
            && procs.lines().filter_map(|line| line.trim().parse::<u32>().ok().filter(|pid| *pid > 0)).any(&mut visit)
        {
            return true;
        }
        if depth >= MAX_CGROUP_DEPTH {
            continue;
        }
        let Ok(entries) = std::fs::read_dir(&dir) else { continue };
        for entry in entries.flatten() {
            if entry.file_type().is_ok_and(|kind| kind.is_dir()) {
                stack.push((entry.path(), depth + 1));
            }
        }
    }
    false
}

/// The TCP sockets (v4 and v6) of `pid`'s network namespace; unreadable files count as empty.
fn read_sockets(proc_root: &Path, pid: u32) -> Vec<TcpEntry> {
    let net = proc_root.join(pid.to_string()).join("net");
    ["tcp", "tcp6"]
        .iter()
        .filter_map(|file| read_capped(&net.join(file), MAX_PROC_FILE_BYTES).ok())
        .flat_map(|text| parse_proc_net_tcp(&text))
        .collect()
}

fn socket_matches(entry: &TcpEntry, peer: SocketAddr, local: SocketAddr) -> bool {
    let (entry_local, entry_remote) = (canonical(entry.local), canonical(entry.remote));
    let remote_matches = if local.ip().is_unspecified() {
        entry_remote.port() == local.port()
    } else {
        (entry_remote.ip(), entry_remote.port()) == (local.ip(), local.port())
    };
    ACCEPTED_STATES.contains(&entry.state)
        && (entry_local.ip(), entry_local.port()) == (peer.ip(), peer.port())
        && remote_matches
}

fn read_capped(path: &Path, cap: u64) -> io::Result<String> {
    let mut bytes = Vec::new();
    std::fs::File::open(path)?.take(cap).read_to_end(&mut bytes)?;
    Ok(String::from_utf8_lossy(&bytes).into_owned())
}

/// Parses `/proc/<pid>/net/tcp` or `tcp6`, skipping the header and malformed lines.
fn parse_proc_net_tcp(text: &str) -> Vec<TcpEntry> {
    text.lines().filter_map(parse_tcp_line).collect()
}

fn parse_tcp_line(line: &str) -> Option<TcpEntry> {
    let mut fields = line.split_whitespace();
    if !fields.next()?.ends_with(':') {
        return None;
    }
    let local = parse_proc_socket(fields.next()?)?;
    let remote = parse_proc_socket(fields.next()?)?;
    let state = fields.next().filter(|state| state.len() == 2).and_then(hex_u32)?;
    Some(TcpEntry { local, remote, state: u8::try_from(state).ok()? })
}

/// `ADDR:PORT`: the address as 32-bit words printed `%08X` in native byte order, the port `%04X`.
fn parse_proc_socket(field: &str) -> Option<SocketAddr> {
    let (addr, port) = field.split_once(':')?;
    let port = u16::try_from(hex_u32(port).filter(|_| port.len() == 4)?).ok()?;
    let word = |index: usize| addr.get(index * 8..index * 8 + 8).and_then(hex_u32).map(u32::to_ne_bytes);
    let ip = match addr.len() {
        8 => IpAddr::V4(Ipv4Addr::from(word(0)?)),
        32 => {
            let mut octets = [0u8; 16];
            for index in 0..4 {
                octets[index * 4..index * 4 + 4].copy_from_slice(&word(index)?);
            }
            IpAddr::V6(Ipv6Addr::from(octets))
        }
        _ => return None,
    };
    Some(SocketAddr::new(ip, port))
}

fn hex_u32(text: &str) -> Option<u32> {
    let digits_only = !text.is_empty() && text.len() <= 8 && text.bytes().all(|b| b.is_ascii_hexdigit());
    digits_only.then(|| u32::from_str_radix(text, 16).ok()).flatten()
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    const TCP_HEADER: &str =
        "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n";

    struct FakeDirectory(Vec<String>);

    impl KernelDirectory for FakeDirectory {
        fn kernel_ids(&self) -> Vec<String> {
            self.0.clone()
        }
        fn environ(&self, kernel_id: &str) -> Option<BTreeMap<String, String>> {
            Some(BTreeMap::from([("BACKENDAI_KERNEL_ID".to_owned(), kernel_id.to_owned())]))
        }
    }

    fn addr(text: &str) -> SocketAddr {
        text.parse().expect("test address")
    }

    /// One `/proc/net/tcp` line, encoded the kernel's way on this machine.
    fn proc_line(local: SocketAddr, remote: SocketAddr, state: u8) -> String {
        let encode = |a: SocketAddr| {
            let words: Vec<[u8; 4]> = match a.ip() {
                IpAddr::V4(ip) => vec![ip.octets()],
                IpAddr::V6(ip) => ip.octets().chunks(4).map(|c| [c[0], c[1], c[2], c[3]]).collect(),
            };
            let hex: String = words.iter().map(|w| format!("{:08X}", u32::from_ne_bytes(*w))).collect();
            format!("{hex}:{:04X}", a.port())
        };
        format!(
            "   1: {} {} {state:02X} 00000000:00000000 00:00000000 00000000     0        0 51234 1\n",
            encode(local),
            encode(remote)
        )
    }

    /// `{root}/cgroup/{kid}/docker-1.scope/cgroup.procs` holding `pid`, and `{root}/proc/{pid}/net/tcp`.
    fn fake_tree(root: &Path, kernel_id: &str, pid: u32, tcp: &str) -> MetadataConfig {
        let scope = root.join("cgroup").join(kernel_id).join("docker-1.scope");
        std::fs::create_dir_all(&scope).expect("cgroup dir");
        std::fs::write(scope.join("cgroup.procs"), format!("{pid}\n")).expect("cgroup.procs");
        let net = root.join("proc").join(pid.to_string()).join("net");
        std::fs::create_dir_all(&net).expect("net dir");
        std::fs::write(net.join("tcp"), format!("{TCP_HEADER}{tcp}")).expect("net/tcp");
        MetadataConfig {
            kernels_cgroup_root: root.join("cgroup"),
            sandbox_type: "docker".into(),
            proc_root: root.join("proc"),
        }
    }

    #[test]
    #[cfg_attr(target_endian = "big", ignore)]
    fn parses_ipv4_lines_and_skips_garbage() {
        let text = format!(
            concat!(
                "{}",
                "   0: 00000000:0016 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 20296 1\n",
                "   1: 020011AC:C4F2 010011AC:9CC0 01 00000000:00000000 00:00000000 00000000  1000        0 51234 1\n",
                "garbage\n\n",
                "   2: ZZZZZZZZ:0016 00000000:0000 0A\n",
                "   3: 0100007F 0100007F:0050 01\n",
                "   4: 0100007F:0050 0100007F:0050 XY\n",
                "   5: 0100007F:+050 0100007F:0050 01\n",
            ),
            TCP_HEADER
        );
        let entries = parse_proc_net_tcp(&text);
        assert_eq!(
            entries,
            vec![
                TcpEntry { local: addr("0.0.0.0:22"), remote: addr("0.0.0.0:0"), state: 0x0A },
                TcpEntry { local: addr("172.17.0.2:50418"), remote: addr("172.17.0.1:40128"), state: 0x01 },
            ]
        );
    }

    #[test]
    #[cfg_attr(target_endian = "big", ignore)]
    fn parses_tcp6_lines_with_mapped_and_real_ipv6() {
        let text = concat!(
            "  sl  local_address                         remote_address                        st tx_queue ...\n",
            "   0: 0000000000000000FFFF0000020011AC:C4F2 0000000000000000FFFF0000010011AC:9CC0 01 00000000:00000000",
            " 00:00000000 00000000     0        0 7001 1 0000000000000000 20 4 30 10 -1\n",
            "   1: B80D0120000000000000000005000000:D431 B80D0120000000000000000001000000:9CC0 08 00000000:00000000",
            " 00:00000000 00000000     0        0 7002 1 0000000000000000 20 4 30 10 -1\n",
            "   2: B80D01200000000000000000050000:D431 B80D0120000000000000000001000000:9CC0 01\n",
        );
        let entries = parse_proc_net_tcp(text);
        assert_eq!(entries.len(), 2);
        assert_eq!(entries[0].local, addr("[::ffff:172.17.0.2]:50418"));
        assert_eq!(canonical(entries[0].remote), addr("172.17.0.1:40128"));
        assert_eq!(entries[1].local, addr("[2001:db8::5]:54321"));
        assert_eq!(entries[1].remote, addr("[2001:db8::1]:40128"));
        assert_eq!(entries[1].state, 0x08);
    }

    #[test]
    fn identifies_the_kernel_owning_the_socket() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (peer, local) = (addr("172.17.0.2:50418"), addr("172.17.0.1:40128"));
        let config = fake_tree(dir.path(), "k-1", 4242, &proc_line(peer, local, 0x01));
        let directory = FakeDirectory(vec!["../x".into(), "..".into(), "".into(), "k-0".into(), "k-1".into()]);
        assert_eq!(identify(&directory, &config, peer, local).as_deref(), Some("k-1"));
        let mapped_peer = addr("[::ffff:172.17.0.2]:50418");
        assert_eq!(identify(&directory, &config, mapped_peer, local).as_deref(), Some("k-1"));
        assert_eq!(identify(&directory, &config, peer, addr("0.0.0.0:40128")).as_deref(), Some("k-1"));
        assert_eq!(identify(&directory, &config, peer, addr("172.17.0.1:40129")), None);
        assert_eq!(identify(&directory, &config, addr("172.17.0.3:50418"), local), None);
        assert_eq!(identify(&FakeDirectory(vec!["../x".into()]), &config, peer, local), None);
    }

    #[test]
    fn matches_v4_mapped_rows_and_refuses_listening_or_shared_sockets() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (peer, local) = (addr("172.17.0.2:50418"), addr("172.17.0.1:40128"));
        let mapped = proc_line(addr("[::ffff:172.17.0.2]:50418"), addr("[::ffff:172.17.0.1]:40128"), 0x05);
        let config = fake_tree(dir.path(), "k-1", 4242, &mapped);
        assert_eq!(identify(&FakeDirectory(vec!["k-1".into()]), &config, peer, local).as_deref(), Some("k-1"));
        fake_tree(dir.path(), "k-1", 4242, &proc_line(peer, local, 0x0A));
        assert_eq!(identify(&FakeDirectory(vec!["k-1".into()]), &config, peer, local), None);
        fake_tree(dir.path(), "k-1", 4242, &proc_line(peer, local, 0x01));
        fake_tree(dir.path(), "k-2", 4242, &proc_line(peer, local, 0x01));
        assert_eq!(identify(&FakeDirectory(vec!["k-1".into(), "k-2".into()]), &config, peer, local), None);
    }

    async fn get(listening: SocketAddr, root: &Path, known: bool, path: &str) -> String {
        let mut stream = tokio::net::TcpStream::connect(listening).await.expect("connect");
        let client = stream.local_addr().expect("client address");
        let remote = if known { listening } else { SocketAddr::new(listening.ip(), 1) };
        fake_tree(root, "k-1", 4242, &proc_line(client, remote, 0x01));
        let request =
            format!("GET {path} HTTP/1.1\r\nHost: 169.254.169.254\r\nX-Kernel-Id: k-1\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await.expect("send");
        let mut response = String::new();
        stream.read_to_string(&mut response).await.expect("receive");
        response
    }

    #[tokio::test]
    async fn serves_identified_kernels_and_refuses_strangers() {
        let dir = tempfile::tempdir().expect("tempdir");
        let config = fake_tree(dir.path(), "k-1", 4242, "");
        let listener = bind(addr("127.0.0.1:0")).await.expect("bind");
        let listening = listener.local_addr().expect("local address");
        let cancel = CancellationToken::new();
        let server = tokio::spawn(serve(listener, Arc::new(FakeDirectory(vec!["k-1".into()])), config, cancel.clone()));

        let root = dir.path();
        let refused = get(listening, root, false, "/latest/meta-data/envs").await;
        assert!(refused.starts_with("HTTP/1.1 403"), "{refused}");
        assert!(refused.ends_with(FORBIDDEN_BODY) && refused.to_lowercase().contains("server: backendai"));
        assert!(get(listening, root, false, "/nowhere").await.starts_with("HTTP/1.1 403"));

        let envs = get(listening, root, true, "/latest/meta-data/envs").await;
        assert!(
            envs.starts_with("HTTP/1.1 200") && envs.to_lowercase().contains("content-type: application/json"),
            "{envs}"
        );
        assert!(
            envs.ends_with(r#"{"BACKENDAI_KERNEL_ID":"k-1"}"#) && envs.to_lowercase().contains("server: backendai")
        );
        assert!(get(listening, root, true, "/").await.ends_with("\r\n\r\nlatest/"));
        assert!(get(listening, root, true, "/latest/").await.ends_with("\r\n\r\nmeta-data/"));
        assert!(get(listening, root, true, "/latest/meta-data").await.ends_with("\r\n\r\nenvs\nlocal-ipv4\nsandbox"));
        assert!(get(listening, root, true, "/latest/meta-data/local-ipv4").await.ends_with("\r\n\r\n127.0.0.1"));
        assert!(get(listening, root, true, "/latest/meta-data/sandbox").await.ends_with("\r\n\r\ndocker"));
        let missing = get(listening, root, true, "/latest/user-data").await;
        assert!(missing.starts_with("HTTP/1.1 404") && missing.to_lowercase().contains("server: backendai"));

        cancel.cancel();
        let stopped = tokio::time::timeout(Duration::from_secs(10), server).await.expect("server stops");
        assert!(matches!(stopped, Ok(Ok(()))));
    }
}
