//! The durable outbox on disk: a JSON-lines journal of every emitted event, written (and
//! fsynced) before delivery is tried, and a marker of how far delivery got.
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
    fs::{self, File, OpenOptions},
    io::{self, Write},
    os::fd::AsRawFd,
    path::{Path, PathBuf},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use base64::{Engine, engine::general_purpose::STANDARD as BASE64};
use serde::{Deserialize, Serialize};

pub const JOURNAL_FILE: &str = "events.jsonl";
pub const DELIVERED_FILE: &str = "events.delivered";
pub const LOCK_FILE: &str = "events.lock";

/// Why the journal cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    #[error(
        "the event journal in {dir} is in use by another bai-agent (set agent.journal-dir to a directory of its own)"
    )]
    InUse { dir: PathBuf },
    #[error("event journal {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
}

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

#[derive(Serialize, Deserialize)]
struct Line {
    seq: u64,
    ts_us: u64,
    name: String,
    args: String,
}

impl Line {
    fn from_record(record: &Record) -> Line {
        let ts_us = u64::try_from(record.timestamp.duration_since(UNIX_EPOCH).unwrap_or_default().as_micros())
            .unwrap_or(u64::MAX);
        Line { seq: record.seq, ts_us, name: record.name.clone(), args: BASE64.encode(&record.args) }
    }

    fn into_record(self) -> Result<Record, String> {
        let args = BASE64.decode(self.args.as_bytes()).map_err(|err| format!("`args` is not base64: {err}"))?;
        let timestamp = UNIX_EPOCH + Duration::from_micros(self.ts_us);
        Ok(Record { seq: self.seq, name: self.name, timestamp, args })
    }
}

/// The journal files of one directory, locked for this process.
pub struct Journal {
    dir: PathBuf,
    path: PathBuf,
    file: File,
    _lock: File,
    len: u64,
    last_seq: u64,
    delivered: u64,
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
        let io_err = |path: &Path| {
            let path = path.to_path_buf();
            move |source| JournalError::Io { path, source }
        };
        fs::create_dir_all(dir).map_err(io_err(dir))?;
        let lock_path = dir.join(LOCK_FILE);
        let lock =
            OpenOptions::new().create(true).truncate(false).write(true).open(&lock_path).map_err(io_err(&lock_path))?;
        // SAFETY: flock(2) on a descriptor we own; released when `lock` is closed.
        if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            let err = io::Error::last_os_error();
            if err.raw_os_error() == Some(libc::EWOULDBLOCK) {
                return Err(JournalError::InUse { dir: dir.to_path_buf() });
            }
            return Err(JournalError::Io { path: lock_path, source: err });
        }

        let delivered_path = dir.join(DELIVERED_FILE);
        let delivered = match fs::read_to_string(&delivered_path) {
            Ok(text) => text.trim().parse::<u64>().unwrap_or_else(|_| {
                tracing::warn!(path = %delivered_path.display(), content = %text.trim(), "the delivered marker is corrupt; resending the whole journal");
                0
            }),
            Err(err) if err.kind() == io::ErrorKind::NotFound => 0,
            Err(source) => return Err(JournalError::Io { path: delivered_path, source }),
        };

        let path = dir.join(JOURNAL_FILE);
        let file = OpenOptions::new().create(true).append(true).read(true).open(&path).map_err(io_err(&path))?;
        let bytes = fs::read(&path).map_err(io_err(&path))?;
        let scan = scan(&bytes);
        for (offset, reason) in &scan.skipped {
            tracing::warn!(path = %path.display(), offset, %reason, "skipping a corrupt event journal line");
        }
        if scan.good_len < bytes.len() as u64 {
            tracing::warn!(
                path = %path.display(),
                kept = scan.good_len,
                dropped = bytes.len() as u64 - scan.good_len,
                reason = scan.tail_reason.as_deref().unwrap_or("torn write"),
                "the event journal ends in a torn or corrupt record (a crash mid-write?); truncating it"
            );
            file.set_len(scan.good_len).map_err(io_err(&path))?;
            file.sync_all().map_err(io_err(&path))?;
        }
        let last_in_file = scan.records.last().map_or(0, |r| r.seq);
        let undelivered: Vec<Record> = scan.records.into_iter().filter(|r| r.seq > delivered).collect();
        let journal = Journal {
            dir: dir.to_path_buf(),
            path,
            file,
            _lock: lock,
            len: scan.good_len,
            last_seq: last_in_file.max(delivered),
            delivered,
        };
        Ok(Opened { journal, undelivered })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Bytes in `events.jsonl`.
    pub fn len_bytes(&self) -> u64 {
        self.len
    }

    /// The highest sequence number handed out.
    pub fn last_seq(&self) -> u64 {
        self.last_seq
    }

    /// The delivered marker.
    pub fn delivered(&self) -> u64 {
        self.delivered
    }

    /// Numbers `events` and appends them with one write and one fsync. The records come back
    /// even when the write failed (then the file is cut back to where it was and the error
    /// says why), so delivery can still go on from memory.
    pub fn append(&mut self, events: Vec<Unsequenced>) -> (Vec<Record>, io::Result<()>) {
        let records: Vec<Record> = events
            .into_iter()
            .enumerate()
            .map(|(i, event)| Record {
                seq: self.last_seq + 1 + i as u64,
                name: event.name,
                timestamp: event.timestamp,
                args: event.args,
            })
            .collect();
        let Some(last) = records.last() else {
            return (records, Ok(()));
        };
        self.last_seq = last.seq;
        let mut buffer = Vec::new();
        for record in &records {
            // A struct of strings and numbers always serializes.
            if serde_json::to_writer(&mut buffer, &Line::from_record(record)).is_ok() {
                buffer.push(b'\n');
            }
        }
        let written = self.file.write_all(&buffer).and_then(|()| self.file.sync_data());
        match written {
            Ok(()) => {
                self.len += buffer.len() as u64;
                (records, Ok(()))
            }
            Err(err) => {
                // Never leave half a batch behind: the next append would follow a torn line.
                let _ = self.file.set_len(self.len);
                (records, Err(err))
            }
        }
    }

    /// Persists that everything up to `seq` is delivered (atomically: temporary file, fsync,
    /// rename, fsync of the directory).
    pub fn mark_delivered(&mut self, seq: u64) -> io::Result<()> {
        if seq <= self.delivered {
            return Ok(());
        }
        let tmp = self.dir.join(format!("{DELIVERED_FILE}.tmp"));
        {
            let mut file = File::create(&tmp)?;
            writeln!(file, "{seq}")?;
            file.sync_all()?;
        }
        fs::rename(&tmp, self.dir.join(DELIVERED_FILE))?;
        File::open(&self.dir)?.sync_all()?;
        self.delivered = seq;
        Ok(())
    }

    /// Empties `events.jsonl` when everything in it is delivered; true when it did.
    pub fn compact(&mut self) -> io::Result<bool> {
        if self.len == 0 || self.delivered < self.last_seq {
            return Ok(false);
        }
        self.file.set_len(0)?;
        self.file.sync_all()?;
        self.len = 0;
        Ok(true)
    }

    /// When `events.jsonl` is larger than `max_bytes`, rewrites it (atomically) keeping only
    /// whole records from its last `keep_bytes`; true when it did. For the journal without
    /// Redis, which is the local record of events and must not grow without bound.
    pub fn trim(&mut self, max_bytes: u64, keep_bytes: u64) -> io::Result<bool> {
        if self.len <= max_bytes {
            return Ok(false);
        }
        let bytes = fs::read(&self.path)?;
        let from = bytes.len().saturating_sub(usize::try_from(keep_bytes).unwrap_or(usize::MAX));
        // Start at a record boundary: just after a newline at or after `from`.
        let start = if from == 0 {
            0
        } else {
            bytes[from - 1..].iter().position(|&b| b == b'\n').map_or(bytes.len(), |i| from + i)
        };
        let tail = &bytes[start..];
        let tmp = self.dir.join(format!("{JOURNAL_FILE}.tmp"));
        {
            let mut file = File::create(&tmp)?;
            file.write_all(tail)?;
            file.sync_all()?;
        }
        fs::rename(&tmp, &self.path)?;
        File::open(&self.dir)?.sync_all()?;
        self.file = OpenOptions::new().append(true).read(true).open(&self.path)?;
        self.len = tail.len() as u64;
        Ok(true)
    }
}

struct Scan {
    records: Vec<Record>,
    /// Bytes up to the end of the last good record.
    good_len: u64,
    /// Corrupt lines before the last good record: (byte offset, reason).
    skipped: Vec<(u64, String)>,
    tail_reason: Option<String>,
}

/// Parses the journal's bytes: every good record, and where the good part ends.
fn scan(bytes: &[u8]) -> Scan {
    let mut records: Vec<Record> = Vec::new();
    let mut good_len = 0u64;
    let mut bad_since_good: Vec<(u64, String)> = Vec::new();
    let mut skipped = Vec::new();
    let mut offset = 0usize;
    while offset < bytes.len() {
        let Some(newline) = bytes[offset..].iter().position(|&b| b == b'\n') else {
            bad_since_good.push((offset as u64, "no newline at the end (torn write)".to_owned()));
            break;
        };
        let line = &bytes[offset..offset + newline];
        let end = offset + newline + 1;
        let parsed = serde_json::from_slice::<Line>(line).map_err(|err| err.to_string()).and_then(Line::into_record);
        match parsed {
            Ok(record) if records.last().is_some_and(|last| record.seq <= last.seq) => {
                let reason = format!("sequence {} does not follow {}", record.seq, records.last().map_or(0, |l| l.seq));
                bad_since_good.push((offset as u64, reason));
            }
            Ok(record) => {
                skipped.append(&mut bad_since_good);
                records.push(record);
                good_len = end as u64;
            }
            Err(reason) if line.iter().all(|&b| b == b' ' || b == b'\r') => {
                // An empty line is harmless; count it as part of the good region.
                if bad_since_good.is_empty() {
                    good_len = end as u64;
                } else {
                    bad_since_good.push((offset as u64, reason));
                }
            }
            Err(reason) => bad_since_good.push((offset as u64, reason)),
        }
        offset = end;
    }
    let tail_reason = bad_since_good.first().map(|(_, reason)| reason.clone());
    Scan { records, good_len, skipped, tail_reason }
}

#[cfg(test)]
mod tests {
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
