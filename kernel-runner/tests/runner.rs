//! End-to-end tests: the `bai-krunner` binary on free 127.0.0.1 ports, driven by a zeromq
//! PUSH/PULL client like the agent's.

use std::{
    process::{Child, Command, Stdio},
    time::Duration,
};

use bytes::Bytes;
use zeromq::{PullSocket, PushSocket, Socket, SocketRecv, SocketSend, ZmqMessage};

const STEP: Duration = Duration::from_secs(20);

struct Runner {
    child: Child,
    push: PushSocket,
    pull: PullSocket,
    dir: std::path::PathBuf,
}

impl Drop for Runner {
    fn drop(&mut self) {
        // SIGTERM lets the runner remove its scratch dir; SIGKILL if it lingers.
        Command::new("kill").arg(self.child.id().to_string()).status().ok();
        for _ in 0..100 {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.child.kill().ok();
        self.child.wait().ok();
        std::fs::remove_dir_all(&self.dir).ok();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).unwrap_or(0)
}

async fn start(runtime: &str) -> Runner {
    let dir = std::env::temp_dir().join(format!("krunner-test-{}-{}", std::process::id(), free_port()));
    std::fs::create_dir_all(dir.join("work")).expect("temp dir");
    let (pin, pout) = (free_port(), free_port());
    std::fs::write(dir.join("intrinsic-ports.json"), format!(r#"{{"replin": {pin}, "replout": {pout}}}"#))
        .expect("ports file");
    let child = Command::new(env!("CARGO_BIN_EXE_bai-krunner"))
        .args(["--bind", "127.0.0.1", "--runtime", runtime, "--config-dir"])
        .arg(&dir)
        .arg("--work-dir")
        .arg(dir.join("work"))
        .stdin(Stdio::null())
        .spawn()
        .expect("spawn runner");
    let mut push = PushSocket::new();
    let mut pull = PullSocket::new();
    for _ in 0..200 {
        if push.connect(&format!("tcp://127.0.0.1:{pin}")).await.is_ok() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    for _ in 0..200 {
        if pull.connect(&format!("tcp://127.0.0.1:{pout}")).await.is_ok() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    Runner { child, push, pull, dir }
}

impl Runner {
    async fn send(&mut self, op: &str, payload: &[u8]) {
        let msg = ZmqMessage::try_from(vec![Bytes::copy_from_slice(op.as_bytes()), Bytes::copy_from_slice(payload)])
            .expect("message");
        self.push.send(msg).await.expect("send");
    }

    async fn recv(&mut self) -> (String, Vec<u8>) {
        let msg = tokio::time::timeout(STEP, self.pull.recv()).await.expect("reply in time").expect("recv");
        let frames = msg.into_vec();
        assert_eq!(frames.len(), 2, "two frames");
        (String::from_utf8_lossy(&frames[0]).into_owned(), frames[1].to_vec())
    }

    /// Sends `op` and collects replies up to the `end` message: (merged console, exit code).
    async fn collect(&mut self, end: &str) -> (Vec<(String, Vec<u8>)>, i64) {
        let mut console: Vec<(String, Vec<u8>)> = Vec::new();
        loop {
            let (kind, data) = self.recv().await;
            if kind == end {
                let v: serde_json::Value = serde_json::from_slice(&data).expect("json");
                return (console, v["exitCode"].as_i64().expect("exitCode"));
            }
            match console.last_mut() {
                Some((last, buf)) if *last == kind => buf.extend_from_slice(&data),
                _ => console.push((kind, data)),
            }
        }
    }

    async fn run(&mut self, code: &str) -> (Vec<(String, Vec<u8>)>, i64) {
        self.send("code", code.as_bytes()).await;
        self.collect("finished").await
    }
}

fn text(console: &[(String, Vec<u8>)], kind: &str) -> String {
    console.iter().filter(|(k, _)| k == kind).map(|(_, d)| String::from_utf8_lossy(d).into_owned()).collect()
}

#[tokio::test]
async fn shell_state_order_exit_code_and_bytes() {
    let mut r = start("shell").await;
    let (c, code) = r.run("mkdir -p sub && cd sub && X=42").await;
    assert_eq!(code, 0, "{c:?}");
    r.send("complete", br#"{"code": "ech"}"#).await;
    let (kind, data) = r.recv().await;
    assert_eq!(kind, "completion");
    assert!(String::from_utf8_lossy(&data).contains("\"echo\""), "{}", String::from_utf8_lossy(&data));
    let (c, code) = r.run("echo \"$X $(basename \"$PWD\")\"").await;
    assert_eq!((text(&c, "stdout"), code), ("42 sub\n".into(), 0));

    let (c, code) = r.run("echo out1; sleep 0.2; echo err1 >&2; sleep 0.2; echo out2; false").await;
    assert_eq!(code, 1);
    let kinds: Vec<&str> = c.iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(kinds, ["stdout", "stderr", "stdout"], "{c:?}");
    assert_eq!(text(&c, "stderr"), "err1\n");

    let (_, code) = r.run("(exit 7)").await;
    assert_eq!(code, 7);

    let (c, code) = r.run(r"printf '\377\376ok\200\n'").await;
    assert_eq!(code, 0);
    assert_eq!(c, vec![("stdout".to_string(), b"\xff\xfeok\x80\n".to_vec())]);
}

#[tokio::test]
async fn shell_interrupt_then_next_snippet() {
    let mut r = start("shell").await;
    r.run("Y=kept").await;
    r.send("code", b"while :; do :; done").await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    r.send("interrupt", b"").await;
    let (_, code) = r.collect("finished").await;
    assert_eq!(code, 130);
    let (c, code) = r.run("echo alive $Y").await;
    assert_eq!((text(&c, "stdout"), code), ("alive kept\n".into(), 0));

    // `exit` kills the shell; the next snippet gets a fresh one.
    let (_, code) = r.run("exit 3").await;
    assert_eq!(code, 3);
    let (c, code) = r.run("echo again").await;
    assert_eq!((text(&c, "stdout"), code), ("again\n".into(), 0));

    r.send("status", b"").await;
    let (kind, data) = r.recv().await;
    assert_eq!(kind, "status");
    assert_eq!(&data[..12], b"\x81\xaastarted_at");
    // Completion answers even while nothing runs; while code runs it answers at once, empty.
    r.send("code", b"sleep 1").await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    r.send("complete", br#"{"code": "ec", "row": 0, "col": 2}"#).await;
    assert_eq!(r.recv().await, ("completion".into(), b"[]".to_vec()));
    r.collect("finished").await;
}

#[tokio::test]
async fn batch_steps() {
    let mut r = start("shell").await;
    r.send("clean", b"").await;
    r.send("build", b"echo building; echo warn >&2").await;
    r.send("exec", b"echo $_BACKEND_BATCH_MODE; exit 4").await;
    let (_, code) = r.collect("clean-finished").await;
    assert_eq!(code, 0);
    let (c, code) = r.collect("build-finished").await;
    assert_eq!((text(&c, "stdout"), text(&c, "stderr"), code), ("building\n".into(), "warn\n".into(), 0));
    let (c, code) = r.collect("finished").await;
    assert_eq!((text(&c, "stdout"), code), ("1\n".into(), 4));
    // A failed build skips exec with 127.
    r.send("build", b"exit 2").await;
    r.send("exec", b"echo never").await;
    assert_eq!(r.collect("build-finished").await.1, 2);
    let (c, code) = r.collect("finished").await;
    assert_eq!((c.len(), code), (0, 127));
}

fn have_python() -> bool {
    Command::new("python3").arg("-c").arg("pass").status().is_ok_and(|s| s.success())
}

#[tokio::test]
async fn python_state_input_and_interrupt() {
    assert!(have_python(), "python3 is missing: `cargo xtask setup` installs it");
    let mut r = start("python").await;
    let (c, code) = r.run("x = 41\ndef f(a):\n    return a + 1").await;
    assert_eq!(code, 0, "{c:?}");
    // Completion sees the interpreter's own names.
    r.send("complete", br#"{"code": "f"}"#).await;
    let (kind, data) = r.recv().await;
    assert_eq!(kind, "completion");
    let found: Vec<String> = serde_json::from_slice(&data).expect("json list");
    assert!(found.contains(&"f(".to_owned()) && found.contains(&"float(".to_owned()), "{found:?}");
    r.send("complete", br#"{"code": "no_such_name_"}"#).await;
    assert_eq!(r.recv().await, ("completion".to_owned(), b"[]".to_vec()));
    let (c, code) = r.run("print(f(x))\nx * 2").await;
    assert_eq!((text(&c, "stdout"), code), ("42\n82\n".into(), 0));

    let (c, code) = r.run("1/0").await;
    assert_eq!(code, 1);
    assert!(text(&c, "stderr").contains("ZeroDivisionError"), "{c:?}");

    r.send("code", b"name = input('who? ')\nprint('hi', name)").await;
    let mut seen = Vec::new();
    loop {
        let (kind, data) = r.recv().await;
        if kind == "waiting-input" {
            let v: serde_json::Value = serde_json::from_slice(&data).expect("json");
            assert_eq!(v["is_password"], false);
            break;
        }
        seen.push((kind, data));
    }
    assert_eq!(seen, vec![("stdout".to_string(), b"who? ".to_vec())]);
    r.send("input", "wörld".as_bytes()).await;
    let (c, code) = r.collect("finished").await;
    assert_eq!((text(&c, "stdout"), code), ("hi wörld\n".into(), 0));

    r.send("code", b"while True:\n    pass").await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    r.send("interrupt", b"").await;
    let (c, code) = r.collect("finished").await;
    assert_eq!(code, 130);
    assert!(text(&c, "stderr").contains("KeyboardInterrupt"), "{c:?}");
    let (c, code) = r.run("print(x)").await;
    assert_eq!((text(&c, "stdout"), code), ("41\n".into(), 0));

    let (c, code) = r.run("import sys; sys.stdout.buffer.write(b'\\xff\\x00z'); sys.stdout.flush()").await;
    assert_eq!((c, code), (vec![("stdout".to_string(), b"\xff\x00z".to_vec())], 0));
}
