//! The eBPF counter store on real cgroups: a cgroup in a direct slot and one whose
//! slot is taken (counted in the overflow hash map) both get exactly their CPU time,
//! checked against each cgroup's own `cpu.stat`.

use std::{
    path::{Path, PathBuf},
    process::{Child, Command},
    time::Duration,
};

use agent_common::slot_index;
use bai_agent::monitor::{CgroupLayout, EbpfMonitor};
use bai_agent_tests::{relative_error, require_environment};

/// A directory of test cgroups under the unified hierarchy, removed when dropped.
struct CgroupTree {
    root: PathBuf,
    children: Vec<PathBuf>,
}

impl CgroupTree {
    fn create(layout: &CgroupLayout) -> CgroupTree {
        let root = layout.unified_root.join(format!("bai-agent-test-{}", std::process::id()));
        std::fs::create_dir(&root).expect("create a test cgroup (needs root)");
        CgroupTree { root, children: Vec::new() }
    }

    fn child(&mut self, name: &str) -> PathBuf {
        let path = self.root.join(name);
        std::fs::create_dir(&path).expect("create a child cgroup");
        self.children.push(path.clone());
        path
    }
}

impl Drop for CgroupTree {
    fn drop(&mut self) {
        for child in self.children.iter().rev() {
            let _ = std::fs::remove_dir(child);
        }
        let _ = std::fs::remove_dir(&self.root);
    }
}

/// A shell that stops itself, is moved into `cgroup`, and then spins until stopped:
/// none of its running time falls outside the cgroup.
fn spin_in(cgroup: &Path) -> Child {
    let child =
        Command::new("sh").args(["-c", "kill -STOP $$; while :; do :; done"]).spawn().expect("spawn a busy shell");
    let stat = format!("/proc/{}/stat", child.id());
    bai_agent_tests::wait_until("the shell to stop itself", Duration::from_secs(5), || {
        std::fs::read_to_string(&stat)
            .is_ok_and(|s| s.rsplit(')').next().is_some_and(|rest| rest.trim_start().starts_with('T')))
    })
    .expect("shell stops");
    std::fs::write(cgroup.join("cgroup.procs"), child.id().to_string()).expect("move it into the cgroup");
    signal(&child, libc::SIGCONT);
    child
}

fn signal(child: &Child, signal: i32) {
    // SAFETY: signalling our own child by pid.
    unsafe { libc::kill(i32::try_from(child.id()).expect("pid fits"), signal) };
}

fn usage_ns(cgroup: &Path) -> f64 {
    let stat = std::fs::read_to_string(cgroup.join("cpu.stat")).expect("cpu.stat");
    let usec: f64 =
        stat.lines().find_map(|l| l.strip_prefix("usage_usec ")).expect("usage_usec").trim().parse().expect("a number");
    usec * 1000.0
}

#[test]
fn direct_and_overflow_slots_both_count_exactly() {
    require_environment();
    let layout = CgroupLayout::detect().expect("cgroup2 is mounted");
    let mut monitor = EbpfMonitor::load(&[], None).expect("eBPF loads");
    let mut tree = CgroupTree::create(&layout);

    // Cgroup ids are inode numbers handed out in order, so a collision on a slot index
    // turns up within one table's worth of cgroups.
    let first = tree.child("first");
    let first_id = layout
        .cgroup_at(first.strip_prefix(&layout.unified_root).expect("under root").to_str().expect("utf-8"))
        .expect("resolves")
        .id;
    let mut colliding = None;
    for n in 0..(agent_common::SLOTS * 2) {
        let path = tree.child(&format!("c{n}"));
        let relative = path.strip_prefix(&layout.unified_root).expect("under root").to_str().expect("utf-8").to_owned();
        let cgroup = layout.cgroup_at(&relative).expect("resolves");
        if slot_index(cgroup.id) == slot_index(first_id) {
            colliding = Some(cgroup);
            break;
        }
    }
    let second = colliding.expect("two cgroups with the same slot index");

    monitor.attach(first_id, &first).expect("attach the first (direct slot)");
    monitor.attach(second.id, &second.path).expect("attach the second (overflow)");
    assert_eq!(monitor.occupancy(), (1, 1), "one cgroup in a slot, one in the overflow map");

    let before = [usage_ns(&first), usage_ns(&second.path)];
    let mut spinners = [spin_in(&first), spin_in(&second.path)];
    std::thread::sleep(Duration::from_millis(1500));
    // Stopping switches the spinners out, which charges their last slices.
    for spinner in &spinners {
        signal(spinner, libc::SIGSTOP);
    }
    std::thread::sleep(Duration::from_millis(300));
    let truths = [usage_ns(&first) - before[0], usage_ns(&second.path) - before[1]];
    let counted = [monitor.read(first_id).expect("read first"), monitor.read(second.id).expect("read second")];
    for spinner in &mut spinners {
        spinner.kill().expect("kill spinner");
        spinner.wait().expect("reap spinner");
    }
    for ((truth, counters), which) in truths.iter().zip(&counted).zip(["direct slot", "overflow map"]) {
        let error = relative_error(counters.cpu_ns as f64, *truth);
        println!("{which}: agent {} ns, cpu.stat {truth} ns, error {:.4}%", counters.cpu_ns, error * 100.0);
        assert!(*truth > 3e8, "{which}: the spinner should have run a while, ran {truth} ns");
        assert!(error < 0.001, "{which}: agent {} ns vs cpu.stat {truth} ns", counters.cpu_ns);
    }

    // Letting go of the overflow cgroup leaves the direct one counting, and vice versa.
    // (Killing the stopped spinners let them run briefly to exit: counters only grow.)
    let last = monitor.detach(second.id).expect("detach overflow");
    assert!(last.cpu_ns >= counted[1].cpu_ns);
    assert!(monitor.read(second.id).is_err(), "a detached cgroup is no longer readable");
    assert!(monitor.read(first_id).expect("still counted").cpu_ns >= counted[0].cpu_ns);
    monitor.detach(first_id).expect("detach direct");
    assert_eq!(monitor.occupancy(), (0, 0));
}
