//! `bai-krunner`, the in-container kernel runner: binds the REPL PULL/PUSH sockets and runs
//! user code for the agent in Backend.AI's kernel runner protocol (see `protocol`).
//!
//! Query mode keeps one long-lived interpreter per runner (`interp`: POSIX shell or Python 3)
//! so state survives between snippets; batch mode runs `clean`/`build`/`exec` commands
//! (`batch`); `service` starts and stops the image's declared services; `main_command` runs
//! the kernel's own main process (`bai-krunner -- CMD…`) whose end ends the runner.
//!
//! The release binary is static (it must run in a `FROM scratch` image):
//! `cargo build --release -p kernel-runner --target x86_64-unknown-linux-musl`
//! → `target/x86_64-unknown-linux-musl/release/bai-krunner`.

pub mod batch;
pub mod bootstrap;
pub mod complete;
pub mod config;
pub mod interp;
pub mod main_command;
pub mod protocol;
pub mod runner;
pub mod service;
pub mod user;
