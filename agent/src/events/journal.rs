//! The manager events' outbox on disk ([`crate::journal`] named `events`): a JSON-lines
//! journal of every emitted event, written (and fsynced) before delivery is tried, and a
//! marker of how far delivery got.
//!
//! Files in `agent.journal-dir`:
//!
//! - `events.jsonl`: one record per line,
//!   `{"seq":12,"ts_us":1714000000123456,"name":"agent_heartbeat","args":"kYqiaXCp..."}` where
//!   `seq` increases by one per event (and never restarts, across compactions and restarts),
//!   `ts_us` is the emission time in microseconds since the Unix epoch, and `args` is the standard base64 of
//!   the msgpack bytes that go to Redis as the `args` field (the arguments as a msgpack array).
//!   A batch of records is written with one `write` and one `fsync`.
//! - `events.delivered`: the highest `seq` known to be delivered, as decimal text; replaced
//!   atomically (write a temporary file, fsync, rename, fsync the directory).
//! - `events.lock`: held with `flock` while an agent uses the journal, so two agents never
//!   share one.
//!
//! On open, a torn or corrupt tail (a crash in the middle of a write) is logged and truncated
//! away; a corrupt line followed by good ones is logged and skipped. Records after the
//! delivered marker come back as the backlog. When everything in the journal is delivered it
//! is truncated to nothing ([`Journal::compact`]); without Redis it is trimmed to its newest
//! bytes instead ([`Journal::trim`]).

use std::{
    io,
    path::Path,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use base64::{Engine, engine::general_purpose::STANDARD as BASE64};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

pub use crate::journal::JournalError;
use crate::journal::{self, JournalName, Sequenced};

pub const NAME: JournalName = JournalName { stem: "events", what: "event journal" };
pub const JOURNAL_FILE: &str = "events.jsonl";
pub const DELIVERED_FILE: &str = "events.delivered";
pub const LOCK_FILE: &str = "events.lock";

/// One journaled event.
#[derive(Debug, Clone, PartialEq)]
pub struct Record {
    pub seq: u64,
    pub name: String,
    pub timestamp: SystemTime,
    /// msgpack of the arguments as an array (a Python tuple on the manager's side).
    pub args: Vec<u8>,
}

impl Record {
    /// The arguments, decoded.
    pub fn args_value(&self) -> Result<rmpv::Value, crate::rpc::codec::RpcError> {
        crate::rpc::codec::unpack(&self.args, "event args")
    }
}

/// An event that has no sequence number yet.
#[derive(Debug, Clone, PartialEq)]
pub struct Unsequenced {
    pub name: String,
    pub timestamp: SystemTime,
    pub args: Vec<u8>,
}

/// A line's fields besides `seq`.
#[derive(Debug, Serialize, Deserialize)]
pub struct EventLine {
    ts_us: u64,
    name: String,
    #[serde(serialize_with = "to_base64", deserialize_with = "from_base64")]
    args: Vec<u8>,
}

fn to_base64<S: Serializer>(bytes: &[u8], serializer: S) -> Result<S::Ok, S::Error> {
    serializer.serialize_str(&BASE64.encode(bytes))
}

fn from_base64<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Vec<u8>, D::Error> {
    let text = String::deserialize(deserializer)?;
    BASE64.decode(text.as_bytes()).map_err(|err| serde::de::Error::custom(format!("`args` is not base64: {err}")))
}

impl From<Unsequenced> for EventLine {
    fn from(event: Unsequenced) -> Self {
        let ts_us = u64::try_from(event.timestamp.duration_since(UNIX_EPOCH).unwrap_or_default().as_micros())
            .unwrap_or(u64::MAX);
        EventLine { ts_us, name: event.name, args: event.args }
    }
}

impl From<Sequenced<EventLine>> for Record {
    fn from(line: Sequenced<EventLine>) -> Self {
        let Sequenced { seq, item } = line;
        Record { seq, name: item.name, timestamp: UNIX_EPOCH + Duration::from_micros(item.ts_us), args: item.args }
    }
}

/// The event journal of one directory, locked for this process.
pub struct Journal {
    inner: journal::Journal<EventLine>,
}

/// What [`Journal::open`] found.
pub struct Opened {
    pub journal: Journal,
    /// Records after the delivered marker, in order.
    pub undelivered: Vec<Record>,
}

impl Journal {
    /// Opens (creating `dir` and the files if needed) and locks the journal of `dir`, repairs
    /// a torn tail, and returns the records not yet delivered.
    pub fn open(dir: &Path) -> Result<Opened, JournalError> {
        let journal::Opened { journal, records } = journal::Journal::open(dir, NAME, &[""])?;
        let delivered = journal.delivered(0);
        let undelivered = records.into_iter().filter(|r| r.seq > delivered).map(Record::from).collect();
        Ok(Opened { journal: Journal { inner: journal }, undelivered })
    }

    pub fn path(&self) -> &Path {
        self.inner.path()
    }

    /// Bytes in `events.jsonl`.
    pub fn len_bytes(&self) -> u64 {
        self.inner.len_bytes()
    }

    /// The highest sequence number handed out.
    pub fn last_seq(&self) -> u64 {
        self.inner.last_seq()
    }

    /// The delivered marker.
    pub fn delivered(&self) -> u64 {
        self.inner.delivered(0)
    }

    /// Numbers `events` and appends them with one write and one fsync. The records come back
    /// even when the write failed (then the file is cut back to where it was and the error
    /// says why), so delivery can still go on from memory.
    pub fn append(&mut self, events: Vec<Unsequenced>) -> (Vec<Record>, io::Result<()>) {
        let (lines, written) = self.inner.append(events.into_iter().map(EventLine::from).collect());
        (lines.into_iter().map(Record::from).collect(), written)
    }

    /// Persists that everything up to `seq` is delivered.
    pub fn mark_delivered(&mut self, seq: u64) -> io::Result<()> {
        self.inner.mark_delivered(0, seq)
    }

    /// Empties `events.jsonl` when everything in it is delivered; true when it did.
    pub fn compact(&mut self) -> io::Result<bool> {
        self.inner.compact()
    }

    /// When `events.jsonl` is larger than `max_bytes`, rewrites it (atomically) keeping only
    /// whole records from its last `keep_bytes`; true when it did. For the journal without
    /// Redis, which is the local record of events and must not grow without bound.
    pub fn trim(&mut self, max_bytes: u64, keep_bytes: u64) -> io::Result<bool> {
        self.inner.trim(max_bytes, keep_bytes)
    }
}

#[cfg(test)]
mod tests {
    use std::fs;

    use super::*;

    fn event(name: &str, n: u8) -> Unsequenced {
        Unsequenced {
            name: name.into(),
            timestamp: UNIX_EPOCH + Duration::from_millis(1_700_000_000_123),
            args: vec![0x91, n],
        }
    }

    fn journal_bytes(dir: &Path) -> Vec<u8> {
        fs::read(dir.join(JOURNAL_FILE)).expect("journal")
    }

    #[test]
    fn appended_records_come_back_in_order_after_reopening() {
        let dir = tempfile::tempdir().expect("tempdir");
        let opened = Journal::open(dir.path()).expect("open");
        assert!(opened.undelivered.is_empty());
        let mut journal = opened.journal;
        let (records, written) = journal.append(vec![event("a", 1), event("b", 2)]);
        written.expect("written");
        assert_eq!(records.iter().map(|r| r.seq).collect::<Vec<_>>(), [1, 2]);
        let (records, written) = journal.append(vec![event("c", 3)]);
        written.expect("written");
        assert_eq!(records[0].seq, 3);
        drop(journal);

        let opened = Journal::open(dir.path()).expect("reopen");
        let names: Vec<_> = opened.undelivered.iter().map(|r| (r.seq, r.name.as_str(), r.args.clone())).collect();
        assert_eq!(names, [(1, "a", vec![0x91, 1]), (2, "b", vec![0x91, 2]), (3, "c", vec![0x91, 3])]);
        assert_eq!(opened.undelivered[0].timestamp, UNIX_EPOCH + Duration::from_millis(1_700_000_000_123));
        assert_eq!(opened.journal.last_seq(), 3);
    }

    #[test]
    fn lines_are_json_with_base64_msgpack_args() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut journal = Journal::open(dir.path()).expect("open").journal;
        journal.append(vec![event("agent_started", 7)]).1.expect("written");
        let text = String::from_utf8(journal_bytes(dir.path())).expect("utf-8");
        let line: serde_json::Value = serde_json::from_str(text.trim_end()).expect("json");
        assert_eq!(line["seq"], 1);
        assert_eq!(line["name"], "agent_started");
        assert_eq!(line["args"], BASE64.encode([0x91, 7]));
        assert_eq!(line["ts_us"], 1_700_000_000_123_000u64);
        assert!(text.ends_with('\n'));
    }

    #[test]
    fn delivered_records_are_not_reloaded_and_sequence_numbers_continue_after_compaction() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut journal = Journal::open(dir.path()).expect("open").journal;
        journal.append(vec![event("a", 1), event("b", 2), event("c", 3)]).1.expect("written");
        journal.mark_delivered(2).expect("marked");
        assert!(!journal.compact().expect("compact"), "one record is still undelivered");
        drop(journal);
        let opened = Journal::open(dir.path()).expect("reopen");
        assert_eq!(opened.undelivered.iter().map(|r| r.seq).collect::<Vec<_>>(), [3]);
        let mut journal = opened.journal;
        journal.mark_delivered(3).expect("marked");
        assert!(journal.compact().expect("compact"));
        assert_eq!(journal.len_bytes(), 0);
        assert!(journal_bytes(dir.path()).is_empty());
        assert_eq!(fs::read_to_string(dir.path().join(DELIVERED_FILE)).expect("marker").trim(), "3");
        let (records, written) = journal.append(vec![event("d", 4)]);
        written.expect("written");
        assert_eq!(records[0].seq, 4, "numbering goes on after compaction");
        drop(journal);
        let opened = Journal::open(dir.path()).expect("reopen");
        assert_eq!(opened.undelivered.iter().map(|r| r.seq).collect::<Vec<_>>(), [4]);
        drop(opened);
        // Even with an empty journal, the marker keeps the numbering going.
        let mut journal = Journal::open(dir.path()).expect("reopen").journal;
        journal.mark_delivered(4).expect("marked");
        journal.compact().expect("compact");
        drop(journal);
        let mut journal = Journal::open(dir.path()).expect("reopen").journal;
        assert_eq!(journal.append(vec![event("e", 5)]).0[0].seq, 5);
    }

    #[test]
    fn a_torn_last_line_is_truncated_and_appending_goes_on() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut journal = Journal::open(dir.path()).expect("open").journal;
        journal.append(vec![event("a", 1), event("b", 2)]).1.expect("written");
        drop(journal);
        let good = journal_bytes(dir.path());
        let mut torn = good.clone();
        torn.extend_from_slice(br#"{"seq":3,"ts_us":1700000000100000,"name":"c","ar"#);
        fs::write(dir.path().join(JOURNAL_FILE), &torn).expect("tear");

        let opened = Journal::open(dir.path()).expect("a torn tail is not an error");
        assert_eq!(opened.undelivered.iter().map(|r| r.seq).collect::<Vec<_>>(), [1, 2]);
        assert_eq!(journal_bytes(dir.path()), good, "the torn record is cut off");
        let mut journal = opened.journal;
        let (records, written) = journal.append(vec![event("c", 3)]);
        written.expect("written");
        assert_eq!(records[0].seq, 3);
        drop(journal);
        let opened = Journal::open(dir.path()).expect("reopen");
        assert_eq!(opened.undelivered.iter().map(|r| r.name.as_str()).collect::<Vec<_>>(), ["a", "b", "c"]);
    }

    #[test]
    fn a_corrupt_tail_of_nul_bytes_is_truncated_and_a_corrupt_middle_line_skipped() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut journal = Journal::open(dir.path()).expect("open").journal;
        journal.append(vec![event("a", 1)]).1.expect("written");
        drop(journal);
        let mut bytes = journal_bytes(dir.path());
        bytes.extend_from_slice(b"not json at all\n");
        let with_garbage = bytes.len();
        let mut journal = {
            fs::write(dir.path().join(JOURNAL_FILE), &bytes).expect("write");
            Journal::open(dir.path()).expect("open").journal
        };
        // The garbage line was the tail: it is gone, and a new record follows the first.
        assert_eq!(journal.len_bytes() as usize, with_garbage - b"not json at all\n".len());
        journal.append(vec![event("b", 2)]).1.expect("written");
        drop(journal);

        // Garbage in the middle (followed by a good record) is skipped, not truncated.
        let good = journal_bytes(dir.path());
        let first_end = good.iter().position(|&b| b == b'\n').expect("newline") + 1;
        let mut middle = good[..first_end].to_vec();
        middle.extend_from_slice(b"{broken\n");
        middle.extend_from_slice(&good[first_end..]);
        middle.extend_from_slice(&[0u8; 64]);
        fs::write(dir.path().join(JOURNAL_FILE), &middle).expect("write");
        let opened = Journal::open(dir.path()).expect("open");
        assert_eq!(opened.undelivered.iter().map(|r| r.seq).collect::<Vec<_>>(), [1, 2]);
        assert_eq!(journal_bytes(dir.path()).len(), middle.len() - 64, "only the NUL tail is cut");
    }

    #[test]
    fn trim_keeps_whole_records_from_the_end() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut journal = Journal::open(dir.path()).expect("open").journal;
        for n in 0..100u8 {
            journal.append(vec![event("e", n)]).1.expect("written");
        }
        let full = journal.len_bytes();
        assert!(!journal.trim(full, full / 2).expect("trim"), "not over the limit");
        assert!(journal.trim(full / 2, full / 4).expect("trim"));
        assert!(journal.len_bytes() <= full / 4 && journal.len_bytes() > 0);
        journal.append(vec![event("last", 200)]).1.expect("written");
        drop(journal);
        let opened = Journal::open(dir.path()).expect("reopen");
        let seqs: Vec<u64> = opened.undelivered.iter().map(|r| r.seq).collect();
        assert_eq!(seqs.last(), Some(&101));
        assert!(seqs.windows(2).all(|w| w[1] == w[0] + 1), "a contiguous tail: {seqs:?}");
        assert!(seqs.len() < 60, "the head was dropped: {seqs:?}");
    }

    #[test]
    fn a_second_user_of_the_directory_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let first = Journal::open(dir.path()).expect("open");
        let err = Journal::open(dir.path()).err().expect("locked");
        assert!(matches!(err, JournalError::InUse { .. }), "{err}");
        drop(first);
        Journal::open(dir.path()).expect("free again");
    }

    #[test]
    fn a_corrupt_marker_resends_everything() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut journal = Journal::open(dir.path()).expect("open").journal;
        journal.append(vec![event("a", 1), event("b", 2)]).1.expect("written");
        journal.mark_delivered(2).expect("marked");
        drop(journal);
        fs::write(dir.path().join(DELIVERED_FILE), "garbage").expect("write");
        let opened = Journal::open(dir.path()).expect("open");
        assert_eq!(opened.undelivered.len(), 2);
    }
}
