//! The usage journal on disk ([`crate::journal`] named `usage` in `agent.journal-dir`): every
//! record and checkpoint, appended and fsynced before any sink sees it, with a delivered
//! marker per sink (`usage.redis.delivered`, `usage.http.delivered`).
//!
//! ```text
//! {"seq":41,"kernel_id":"…","meta":{…},"checkpoint":{"next_seq":3,…},"event":{CloudEvent}}
//! ```
//!
//! A line without `event` opens a kernel's first window. On open, the last line of each kernel
//! is its checkpoint, and the event lines past a sink's marker are that sink's backlog. The
//! file is rewritten once it passes [`REWRITE_BYTES`], keeping what a sink still needs, each
//! open kernel's checkpoint and the newest [`KEEP_RECORDS`] records (what `bai-agentctl usage`
//! shows).

use std::{
    collections::{HashMap, HashSet},
    io,
    path::Path,
};

use super::meter::{Checkpoint, UsageLine};
use super::record::KernelMeta;
use crate::journal::{self, JournalError, JournalName, Sequenced};

pub const NAME: JournalName = JournalName { stem: "usage", what: "usage journal" };
/// The journal is rewritten when it grows past this…
pub const REWRITE_BYTES: u64 = 16 << 20;
/// …keeping at least this many of the newest lines.
pub const KEEP_RECORDS: u64 = 4096;

/// The usage journal, locked for this process.
pub struct UsageJournal {
    inner: journal::Journal<UsageLine>,
    /// Per kernel, the seq of its latest line, and whether that closed it.
    latest: HashMap<String, (u64, bool)>,
    /// The size that triggers the next rewrite (more than [`REWRITE_BYTES`] when a rewrite
    /// could not shrink the file: a sink is down and its backlog is kept).
    rewrite_at: u64,
}

/// What [`UsageJournal::open`] found.
pub struct OpenedUsage {
    pub journal: UsageJournal,
    /// The last checkpoint of every kernel whose final record is not written yet.
    pub open_windows: Vec<(KernelMeta, Checkpoint)>,
    /// Per sink (in the order given), the records it has not confirmed.
    pub backlogs: Vec<Vec<Sequenced<UsageLine>>>,
}

impl UsageJournal {
    pub fn open(dir: &Path, sinks: &[&str]) -> Result<OpenedUsage, JournalError> {
        let journal::Opened { journal, records } = journal::Journal::<UsageLine>::open(dir, NAME, sinks)?;
        let mut latest = HashMap::new();
        let mut checkpoints: HashMap<String, (KernelMeta, Checkpoint)> = HashMap::new();
        for record in &records {
            latest.insert(record.item.kernel_id.clone(), (record.seq, record.item.checkpoint.closed));
            checkpoints
                .insert(record.item.kernel_id.clone(), (record.item.meta.clone(), record.item.checkpoint.clone()));
        }
        let backlogs = (0..sinks.len())
            .map(|sink| {
                let delivered = journal.delivered(sink);
                records.iter().filter(|r| r.seq > delivered && r.item.event.is_some()).cloned().collect()
            })
            .collect();
        let mut open_windows: Vec<(KernelMeta, Checkpoint)> =
            checkpoints.into_values().filter(|(_, checkpoint)| !checkpoint.closed).collect();
        open_windows.sort_by(|a, b| a.0.kernel_id.cmp(&b.0.kernel_id));
        Ok(OpenedUsage {
            journal: UsageJournal { inner: journal, latest, rewrite_at: REWRITE_BYTES },
            open_windows,
            backlogs,
        })
    }

    pub fn path(&self) -> &Path {
        self.inner.path()
    }

    pub fn last_seq(&self) -> u64 {
        self.inner.last_seq()
    }

    pub fn len_bytes(&self) -> u64 {
        self.inner.len_bytes()
    }

    /// Appends `lines` with one write and one fsync; see [`journal::Journal::append`].
    pub fn append(&mut self, lines: Vec<UsageLine>) -> (Vec<Sequenced<UsageLine>>, io::Result<()>) {
        let (records, written) = self.inner.append(lines);
        for record in &records {
            self.latest.insert(record.item.kernel_id.clone(), (record.seq, record.item.checkpoint.closed));
        }
        (records, written)
    }

    pub fn mark_delivered(&mut self, sink: usize, seq: u64) -> io::Result<()> {
        self.inner.mark_delivered(sink, seq)
    }

    /// Rewrites the journal when it is over [`REWRITE_BYTES`]: true when it did.
    pub fn maybe_rewrite(&mut self) -> io::Result<bool> {
        if self.inner.len_bytes() <= self.rewrite_at {
            return Ok(false);
        }
        let needed_from =
            (0..self.inner.sink_count()).map(|sink| self.inner.delivered(sink)).min().unwrap_or(self.inner.last_seq());
        let recent_from = self.inner.last_seq().saturating_sub(KEEP_RECORDS);
        let checkpoints: HashSet<u64> =
            self.latest.values().filter(|(_, closed)| !closed).map(|(seq, _)| *seq).collect();
        self.inner.retain(|record| {
            record.seq > needed_from || record.seq > recent_from || checkpoints.contains(&record.seq)
        })?;
        // Kernels whose final record went are forgotten with their lines.
        let kept_from = needed_from.min(recent_from);
        self.latest.retain(|_, (seq, closed)| !*closed || *seq > kept_from);
        self.rewrite_at = REWRITE_BYTES.max(self.inner.len_bytes().saturating_mul(2));
        Ok(true)
    }
}

/// A sink's name and the seq up to which it confirmed the journal.
pub type SinkMark = (String, u64);

/// What `bai-agentctl usage` shows: the journal's records (and for each sink, up to where it
/// confirmed), read without disturbing a running agent.
pub fn read(dir: &Path, sinks: &[&str]) -> io::Result<(Vec<Sequenced<UsageLine>>, Vec<SinkMark>)> {
    let records = match journal::read_records::<UsageLine>(&NAME.file(dir)) {
        Ok(records) => records,
        Err(err) if err.kind() == io::ErrorKind::NotFound => Vec::new(),
        Err(err) => return Err(err),
    };
    let markers =
        sinks.iter().map(|sink| ((*sink).to_owned(), journal::read_marker(&NAME.marker(dir, sink)))).collect();
    Ok((records, markers))
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::usage::{
        meter::{Meter, Observation},
        record::Counts,
    };

    const SEC: u64 = 1_000_000_000;
    const T0: u64 = 1_764_590_400 * SEC;

    fn meta(kernel_id: &str) -> KernelMeta {
        KernelMeta {
            kernel_id: kernel_id.into(),
            slots: BTreeMap::from([("cpu".to_owned(), "1".to_owned())]),
            ..KernelMeta::default()
        }
    }

    fn observe(meter: &mut Meter, at: u64, kernel_id: &str, cpu_ns: u64) -> Vec<UsageLine> {
        let counts = Counts { cpu_ns, ..Counts::default() };
        let observation = Observation {
            kernel_id,
            container_id: "c",
            cgroup_id: Some(1),
            totals: counts,
            run: counts,
            mem_bytes: u64::MAX / 2,
            accel_util_pct: &[],
        };
        meter.observe(at, &[observation], &[], true)
    }

    #[test]
    fn checkpoints_and_each_sinks_backlog_come_back_after_reopening() {
        let dir = tempfile::tempdir().expect("tempdir");
        let opened = UsageJournal::open(dir.path(), &["redis", "http"]).expect("open");
        assert!(opened.open_windows.is_empty());
        let mut journal = opened.journal;
        let mut meter = Meter::new("i-a", 10 * SEC);
        let mut lines: Vec<UsageLine> = meter.start(meta("a"), T0).into_iter().collect();
        lines.extend(meter.start(meta("b"), T0));
        // b ends at once (no container of it shows up); a runs for 26 s.
        meter.terminate("b", "user-requested", T0);
        for step in 1..=26 {
            lines.extend(observe(&mut meter, T0 + step * SEC, "a", step * SEC));
        }
        let (records, written) = journal.append(lines);
        written.expect("written");
        let events: Vec<u64> = records.iter().filter(|r| r.item.event.is_some()).map(|r| r.seq).collect();
        assert_eq!(events.len(), 3, "b's final record, a's windows at 10 s and 20 s");
        journal.mark_delivered(0, events[1]).expect("redis has two");
        drop(journal);

        let opened = UsageJournal::open(dir.path(), &["redis", "http"]).expect("reopen");
        assert_eq!(opened.open_windows.len(), 1, "b is closed");
        let (meta_a, checkpoint) = &opened.open_windows[0];
        assert_eq!(meta_a.kernel_id, "a");
        assert_eq!(checkpoint.next_seq, 2);
        assert_eq!(checkpoint.window_start_ns, T0 + 20 * SEC);
        assert_eq!(checkpoint.totals.counts.cpu_ns, 20 * SEC);
        assert!(checkpoint.totals.mem_byte_ns > u128::from(u64::MAX), "byte-nanoseconds outgrow 64 bits");
        let seqs = |sink: usize| opened.backlogs[sink].iter().map(|r| r.seq).collect::<Vec<_>>();
        assert_eq!(seqs(0), [events[2]]);
        assert_eq!(seqs(1), events);
    }

    #[test]
    fn a_rewrite_keeps_open_checkpoints_undelivered_records_and_the_newest() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut journal = UsageJournal::open(dir.path(), &["redis"]).expect("open").journal;
        let mut meter = Meter::new("i-a", SEC);
        journal.append(meter.start(meta("long-lived"), T0).into_iter().collect()).1.expect("written");
        let first = observe(&mut meter, T0 + SEC, "long-lived", 1);
        journal.append(first).1.expect("written");
        meter = Meter::new("i-a", SEC);
        let mut at = T0 + 2 * SEC;
        while journal.len_bytes() <= REWRITE_BYTES {
            let mut lines = Vec::new();
            for _ in 0..256 {
                let kernel = format!("k-{at}");
                lines.extend(meter.start(meta(&kernel), at));
                meter.terminate(&kernel, "user-requested", at);
                lines.extend(observe(&mut meter, at + SEC, &kernel, 5));
                at += SEC;
            }
            journal.append(lines).1.expect("written");
        }
        let last = journal.last_seq();
        journal.mark_delivered(0, last - 10).expect("marked");
        let undelivered = journal::read_records::<UsageLine>(&NAME.file(dir.path()))
            .expect("read")
            .into_iter()
            .filter(|r| r.seq > last - 10 && r.item.event.is_some())
            .count();
        assert!(journal.maybe_rewrite().expect("rewrite"));
        assert!(journal.len_bytes() < REWRITE_BYTES / 2, "{}", journal.len_bytes());
        drop(journal);
        let opened = UsageJournal::open(dir.path(), &["redis"]).expect("reopen");
        let long_lived = opened.open_windows.iter().find(|(meta, _)| meta.kernel_id == "long-lived");
        assert_eq!(long_lived.map(|(_, c)| c.next_seq), Some(1), "the long-lived kernel's checkpoint survives");
        assert_eq!(opened.backlogs[0].len(), undelivered, "what redis has not confirmed is kept");
        assert!(undelivered > 0);
        let kept = journal::read_records::<UsageLine>(&NAME.file(dir.path())).expect("read");
        assert!(kept.len() as u64 >= KEEP_RECORDS && kept.len() as u64 <= KEEP_RECORDS + 2, "{}", kept.len());
    }
}
