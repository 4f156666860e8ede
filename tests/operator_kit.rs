//! What an operator deploys beside the agent: the Prometheus alerting and recording rules in
//! `config/prometheus/`, checked and unit-tested by Prometheus' own `promtool` (which `cargo
//! xtask setup` installs with Debian's `prometheus`).

use std::{path::Path, process::Command};

fn promtool(args: &[&str]) -> String {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../config/prometheus");
    let out = Command::new("promtool").args(args).current_dir(&dir).output().unwrap_or_else(|err| {
        panic!("promtool is missing ({err}); `cargo xtask setup` installs it with Debian's prometheus")
    });
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "promtool {args:?} in {}:\n{text}", dir.display());
    text
}

#[test]
fn the_alerting_and_recording_rules_are_valid() {
    let text = promtool(&["check", "rules", "bai-agent.rules.yml"]);
    assert!(text.contains("SUCCESS: 10 rules found"), "{text}");
}

/// Each alert fires on the input that should fire it (and only after its `for`), stays quiet
/// otherwise, and the recording rules compute what their names say
/// (`bai-agent.rules.test.yml`).
#[test]
fn every_alert_passes_its_unit_tests() {
    let text = promtool(&["test", "rules", "bai-agent.rules.test.yml"]);
    assert!(text.contains("SUCCESS"), "{text}");
}
