//! `bai-watcher` as the manager uses it: the token (403 without it), the agent's status (its
//! unit through a stand-in `systemctl`, its real `/health`), start/stop/restart/soft and hard
//! reset as service-manager commands, the fstab, real tmpfs mounts under the mount root (a name
//! that escapes it refused by name) and the node's shutdown.

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::Duration,
};

use bai_agent_tests::{
    Agent, agent_binary, etcd_client, etcd_get, free_loopback_port, http_request, require_environment, test_etcd,
    unique, wait_until,
};

const TOKEN: &str = "watcher-test-token";

/// A stand-in for `systemctl` (and for `shutdown`): appends its arguments to `log`, and
/// answers `is-active` with `active`.
fn stand_in(dir: &Path, name: &str, log: &Path) -> PathBuf {
    let path = dir.join(name);
    let script = format!(
        "#!/bin/sh\necho \"{name} $*\" >> {log}\nif [ \"$1\" = is-active ]; then echo active; fi\n",
        log = log.display()
    );
    std::fs::write(&path, script).expect("stand-in");
    Command::new("chmod").arg("+x").arg(&path).status().expect("chmod");
    path
}

struct Watcher {
    child: Child,
    addr: String,
}

impl Drop for Watcher {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_watcher(config: &Path, addr: &str) -> Watcher {
    let binary = agent_binary().with_file_name("bai-watcher");
    let log = std::fs::File::create(config.with_extension("log")).expect("log");
    let child = Command::new(&binary)
        .arg("--config")
        .arg(config)
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap_or_else(|err| panic!("{}: {err}", binary.display()));
    wait_until("the watcher listens", Duration::from_secs(10), || std::net::TcpStream::connect(addr).is_ok())
        .unwrap_or_else(|err| {
            panic!("{err}: {}", std::fs::read_to_string(config.with_extension("log")).unwrap_or_default())
        });
    Watcher { child, addr: addr.to_owned() }
}

fn call(watcher: &Watcher, method: &str, path: &str, body: &str) -> (u16, String) {
    http_request(&watcher.addr, method, path, &[("X-BackendAI-Watcher-Token", TOKEN)], body).expect("request")
}

#[test]
fn the_watcher_answers_the_manager_with_its_token_and_only_under_the_mount_root() {
    require_environment();
    let dir = tempfile::tempdir().expect("tempdir");
    let agent = Agent::start("").expect("an agent to report on");
    let calls = dir.path().join("calls.log");
    let systemctl = stand_in(dir.path(), "systemctl", &calls);
    let shutdown = stand_in(dir.path(), "shutdown", &calls);
    let mount_root = dir.path().join("mnt");
    std::fs::create_dir_all(&mount_root).expect("mount root");
    let fstab = dir.path().join("fstab");
    std::fs::write(&fstab, "# the node's fstab\n").expect("fstab");
    let addr = format!("127.0.0.1:{}", free_loopback_port().expect("a port"));
    let config = dir.path().join("agent.toml");
    std::fs::write(
        &config,
        format!(
            "[agent]\ninternal-addr = \"{agent_addr}\"\n\n[container]\nmount-root = \"{root}\"\n\n\
             [watcher]\ntoken = \"{TOKEN}\"\nservice-addr = \"{addr}\"\nsoft-reset-available = true\n\
             systemctl = [\"{systemctl}\"]\nshutdown-command = [\"{shutdown}\", \"-h\", \"now\"]\nfstab-path = \"{fstab}\"\n",
            agent_addr = agent.addr,
            root = mount_root.display(),
            systemctl = systemctl.display(),
            shutdown = shutdown.display(),
            fstab = fstab.display(),
        ),
    )
    .expect("config");
    let mut watcher = start_watcher(&config, &addr);

    // The token: missing or wrong is 403, and nothing runs.
    let (status, _) = http_request(&addr, "POST", "/agent/stop", &[], "").expect("request");
    assert_eq!(status, 403);
    let (status, _) = http_request(&addr, "GET", "/", &[("X-BackendAI-Watcher-Token", "guess")], "").expect("request");
    assert_eq!(status, 403);
    assert!(!calls.exists(), "nothing ran for a refused request");

    // Status: the unit's state and the agent's own /health.
    let (status, body) = call(&watcher, "GET", "/", "");
    assert_eq!(status, 200, "{body}");
    let report: serde_json::Value = serde_json::from_str(&body).expect("json");
    assert_eq!(report["agent-status"], "active");
    assert_eq!(report["watcher-status"], "active");
    assert!(report["agent-health"].is_object(), "the agent's /health: {report}");

    // The unit, through the service manager.
    for path in ["/agent/stop", "/agent/start", "/agent/restart", "/soft-reset", "/hard-reset"] {
        let (status, body) = call(&watcher, "POST", path, "");
        assert_eq!((status, body.as_str()), (200, r#"{"result":"ok"}"#), "{path}");
    }
    let log = std::fs::read_to_string(&calls).expect("calls");
    let lines: Vec<&str> = log.lines().collect();
    assert_eq!(
        lines,
        [
            "systemctl is-active backendai-agent.service",
            "systemctl stop backendai-agent.service",
            "systemctl start backendai-agent.service",
            "systemctl restart backendai-agent.service",
            "systemctl reload backendai-agent.service",
            "systemctl stop backendai-agent.service",
            "systemctl restart docker.service",
            "systemctl start backendai-agent.service",
        ]
    );

    // The fstab, and no other file.
    assert_eq!(call(&watcher, "GET", "/fstab", ""), (200, "# the node's fstab\n".to_owned()));
    let (status, body) = call(&watcher, "GET", "/fstab?fstab_path=%2Fetc%2Fpasswd", "");
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("/etc/passwd"), "{body}");

    // A real mount under the root, listed, in the fstab; then gone.
    let request =
        r#"{"name": "scratch1", "fs_location": "tmpfs", "fs_type": "tmpfs", "options": "size=1m", "edit_fstab": true}"#;
    let (status, body) = call(&watcher, "POST", "/mounts", request);
    assert_eq!(status, 200, "{body}");
    let point = mount_root.join("scratch1");
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").expect("mountinfo");
    assert!(mountinfo.contains(&format!(" {} ", point.display())), "mounted");
    let (status, body) = call(&watcher, "GET", "/mounts", "");
    assert_eq!((status, body), (200, format!("[\"{}\"]", point.display())));
    assert!(
        std::fs::read_to_string(&fstab)
            .expect("fstab")
            .contains(&format!("tmpfs {} tmpfs size=1m 0 0", point.display()))
    );
    for (name, reason) in [("../escape", "one directory name"), ("a/b", "one directory name")] {
        let body = format!(r#"{{"name": "{name}", "fs_location": "tmpfs", "fs_type": "tmpfs"}}"#);
        let (status, answer) = call(&watcher, "POST", "/mounts", &body);
        assert_eq!(status, 400, "{name}: {answer}");
        assert!(answer.contains(name) && answer.contains(reason), "{answer}");
    }
    let (status, body) = call(&watcher, "POST", "/mounts", "{not json");
    assert_eq!(status, 400, "{body}");
    let (status, body) = call(&watcher, "DELETE", "/mounts", r#"{"name": "scratch1", "edit_fstab": true}"#);
    assert_eq!(status, 200, "{body}");
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").expect("mountinfo");
    assert!(!mountinfo.contains(&format!(" {} ", point.display())), "unmounted");
    assert!(!point.exists(), "its empty directory goes too");
    assert_eq!(std::fs::read_to_string(&fstab).expect("fstab"), "# the node's fstab\n");

    // Shutdown: the agent stopped, the node's shutdown run, the watcher gone.
    assert_eq!(call(&watcher, "POST", "/shutdown", "").0, 200);
    let log = std::fs::read_to_string(&calls).expect("calls");
    assert!(log.ends_with("systemctl stop backendai-agent.service\nshutdown -h now\n"), "{log}");
    wait_until("the watcher exits", Duration::from_secs(10), || matches!(watcher.child.try_wait(), Ok(Some(_))))
        .expect("exited after the shutdown");
}

/// With etcd: the watcher's token is registered at `config/watcher/token`, where the manager
/// reads it, when etcd has none; one already there is never overwritten.
#[test]
fn the_watcher_registers_its_token_in_etcd_for_the_manager() {
    require_environment();
    let etcd = test_etcd();
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    let mut client = runtime.block_on(etcd_client(&etcd)).expect("etcd client");
    let dir = tempfile::tempdir().expect("tempdir");
    for (namespace, already) in [(unique("ns-watcher"), None), (unique("ns-watcher"), Some("the-managers-token"))] {
        let key = format!("/sorna/{namespace}/config/watcher/token");
        if let Some(value) = already {
            runtime.block_on(client.put(key.as_str(), value, None)).expect("put");
        }
        let addr = format!("127.0.0.1:{}", free_loopback_port().expect("a port"));
        let config = dir.path().join(format!("{namespace}.toml"));
        std::fs::write(
            &config,
            format!(
                "[etcd]\naddr = \"{etcd}\"\nnamespace = \"{namespace}\"\n\n[watcher]\ntoken = \"{TOKEN}\"\nservice-addr = \"{addr}\"\n"
            ),
        )
        .expect("config");
        let watcher = start_watcher(&config, &addr);
        let held = runtime.block_on(etcd_get(&mut client, &key)).expect("get").map(|(value, _)| value);
        assert_eq!(held.as_deref(), Some(already.unwrap_or(TOKEN)), "{key}");
        // The watcher still answers its own token.
        assert_ne!(call(&watcher, "GET", "/fstab?fstab_path=%2Fnowhere", "").0, 403);
        if already.is_some() {
            let log = std::fs::read_to_string(config.with_extension("log")).expect("log");
            assert!(log.contains("differs from watcher.token"), "{log}");
        }
    }
}
