//! The append-only JSON-lines journal under the durable outboxes (manager events, usage
//! records): numbered records appended with one `write` and one `fsync` per batch, a
//! delivered marker per sink, an exclusive lock, and repair of torn tails on open.
//!
//! Files in the journal's directory, for a journal named `{stem}`:
//!
//! - `{stem}.jsonl`: one record per line, `{"seq":12, …the record's own fields…}`; `seq`
//!   increases by one per record and never restarts (across compactions and restarts).
//! - `{stem}.delivered` (or `{stem}.{sink}.delivered` for a named sink): the highest `seq`
//!   that sink confirmed, as decimal text, replaced atomically (temporary file, rename). Markers
//!   and compaction are not fsynced: what a power loss takes back is sent again (delivery is
//!   at least once); records themselves are fsynced before any sink sees them.
//! - `{stem}.lock`: held with `flock` while an agent uses the journal, so two agents never
//!   share one.
//!
//! On open, a torn or corrupt tail (a crash in the middle of a write) is logged and truncated
//! away; a corrupt line followed by good ones is logged and skipped.

use std::{
    fs::{self, File, OpenOptions},
    io::{self, Write},
    marker::PhantomData,
    os::fd::AsRawFd,
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize, de::DeserializeOwned};

/// Why a journal cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    #[error("the {what} in {dir} is in use by another bai-agent (set agent.journal-dir to a directory of its own)")]
    InUse { what: &'static str, dir: PathBuf },
    #[error("{what} {path}: {source}")]
    Io { what: &'static str, path: PathBuf, source: io::Error },
}

/// One journaled record and its number.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Sequenced<T> {
    pub seq: u64,
    #[serde(flatten)]
    pub item: T,
}

/// Names the files of one journal.
#[derive(Debug, Clone, Copy)]
pub struct JournalName {
    /// The file names' stem: `events` gives `events.jsonl`, `events.delivered`, `events.lock`.
    pub stem: &'static str,
    /// What log lines and errors call it ("event journal").
    pub what: &'static str,
}

impl JournalName {
    pub fn file(&self, dir: &Path) -> PathBuf {
        dir.join(format!("{}.jsonl", self.stem))
    }

    /// The delivered marker of `sink` ("" for a journal with one unnamed sink).
    pub fn marker(&self, dir: &Path, sink: &str) -> PathBuf {
        if sink.is_empty() {
            dir.join(format!("{}.delivered", self.stem))
        } else {
            dir.join(format!("{}.{sink}.delivered", self.stem))
        }
    }
}

#[derive(Debug)]
struct Marker {
    path: PathBuf,
    seq: u64,
}

/// One journal, locked for this process.
pub struct Journal<T> {
    name: JournalName,
    dir: PathBuf,
    path: PathBuf,
    file: File,
    _lock: File,
    len: u64,
    last_seq: u64,
    markers: Vec<Marker>,
    /// Whether the last append failed (logged once per streak).
    append_failing: bool,
    _records: PhantomData<fn() -> T>,
}

/// What [`Journal::open`] found.
pub struct Opened<T> {
    pub journal: Journal<T>,
    /// Every good record in the file, in order (delivered or not).
    pub records: Vec<Sequenced<T>>,
}

impl<T: Serialize + DeserializeOwned> Journal<T> {
    /// Opens (creating `dir` and the files if needed) and locks the journal `name` of `dir`
    /// with a delivered marker for each of `sinks`, repairs a torn tail, and returns its records.
    pub fn open(dir: &Path, name: JournalName, sinks: &[&str]) -> Result<Opened<T>, JournalError> {
        let what = name.what;
        let io_err = |path: &Path| {
            let path = path.to_path_buf();
            move |source| JournalError::Io { what, path, source }
        };
        fs::create_dir_all(dir).map_err(io_err(dir))?;
        let lock_path = dir.join(format!("{}.lock", name.stem));
        let lock =
            OpenOptions::new().create(true).truncate(false).write(true).open(&lock_path).map_err(io_err(&lock_path))?;
        // SAFETY: flock(2) on a descriptor we own; released when `lock` is closed.
        if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            let err = io::Error::last_os_error();
            if err.raw_os_error() == Some(libc::EWOULDBLOCK) {
                return Err(JournalError::InUse { what, dir: dir.to_path_buf() });
            }
            return Err(JournalError::Io { what, path: lock_path, source: err });
        }

        let mut markers = Vec::with_capacity(sinks.len());
        for sink in sinks {
            let path = name.marker(dir, sink);
            let seq = match fs::read_to_string(&path) {
                Ok(text) => text.trim().parse::<u64>().unwrap_or_else(|_| {
                    tracing::warn!(path = %path.display(), content = %text.trim(), "the delivered marker of the {what} is corrupt; resending the whole journal");
                    0
                }),
                Err(err) if err.kind() == io::ErrorKind::NotFound => 0,
                Err(source) => return Err(JournalError::Io { what, path, source }),
            };
            markers.push(Marker { path, seq });
        }

        let path = name.file(dir);
        let file = OpenOptions::new().create(true).append(true).read(true).open(&path).map_err(io_err(&path))?;
        let bytes = fs::read(&path).map_err(io_err(&path))?;
        let scan = scan::<T>(&bytes);
        for (offset, reason) in &scan.skipped {
            tracing::warn!(path = %path.display(), offset, %reason, "skipping a corrupt line of the {what}");
        }
        if scan.good_len < bytes.len() as u64 {
            tracing::warn!(
                path = %path.display(),
                kept = scan.good_len,
                dropped = bytes.len() as u64 - scan.good_len,
                reason = scan.tail_reason.as_deref().unwrap_or("torn write"),
                "the {what} ends in a torn or corrupt record (a crash mid-write?); truncating it"
            );
            file.set_len(scan.good_len).map_err(io_err(&path))?;
            file.sync_all().map_err(io_err(&path))?;
        }
        let last_in_file = scan.records.last().map_or(0, |r| r.seq);
        let last_marked = markers.iter().map(|m| m.seq).max().unwrap_or(0);
        let journal = Journal {
            name,
            dir: dir.to_path_buf(),
            path,
            file,
            _lock: lock,
            len: scan.good_len,
            last_seq: last_in_file.max(last_marked),
            markers,
            append_failing: false,
            _records: PhantomData,
        };
        Ok(Opened { journal, records: scan.records })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn what(&self) -> &'static str {
        self.name.what
    }

    /// Bytes in the journal file.
    pub fn len_bytes(&self) -> u64 {
        self.len
    }

    /// The highest sequence number handed out.
    pub fn last_seq(&self) -> u64 {
        self.last_seq
    }

    /// The delivered marker of the `sink`-th sink given to [`Journal::open`].
    pub fn delivered(&self, sink: usize) -> u64 {
        self.markers.get(sink).map_or(self.last_seq, |m| m.seq)
    }

    /// Numbers `items` and appends them with one write and one fsync. The records come back
    /// even when the write failed (then the file is cut back to where it was and the error
    /// says why), so delivery can still go on from memory. A streak of failures is logged once,
    /// and so is the recovery.
    pub fn append(&mut self, items: Vec<T>) -> (Vec<Sequenced<T>>, io::Result<()>) {
        let records: Vec<Sequenced<T>> = items
            .into_iter()
            .enumerate()
            .map(|(i, item)| Sequenced { seq: self.last_seq + 1 + i as u64, item })
            .collect();
        let Some(last) = records.last() else {
            return (records, Ok(()));
        };
        self.last_seq = last.seq;
        let mut buffer = Vec::new();
        for record in &records {
            match serde_json::to_writer(&mut buffer, record) {
                Ok(()) => buffer.push(b'\n'),
                Err(err) => {
                    tracing::error!(seq = record.seq, %err, "a record of the {} does not serialize", self.name.what)
                }
            }
        }
        let written = self.file.write_all(&buffer).and_then(|()| self.file.sync_data());
        match &written {
            Ok(()) => {
                self.len += buffer.len() as u64;
                if std::mem::take(&mut self.append_failing) {
                    tracing::info!(path = %self.path.display(), "the {} is writable again", self.name.what);
                }
            }
            Err(err) => {
                // Never leave half a batch behind: the next append would follow a torn line.
                let _ = self.file.set_len(self.len);
                if !std::mem::replace(&mut self.append_failing, true) {
                    tracing::error!(
                        path = %self.path.display(),
                        %err,
                        "cannot write the {}; what it should hold is kept in memory only (lost if the agent stops) until it works again",
                        self.name.what
                    );
                }
            }
        }
        (records, written)
    }

    /// Records that the `sink`-th sink has everything up to `seq` (atomically: temporary file,
    /// rename). Not fsynced: a marker only saves sending records again, so one that a power
    /// loss takes back costs at most a resend of what it covered (delivery is at least once);
    /// an agent that crashes or is killed loses nothing, the page cache has it.
    pub fn mark_delivered(&mut self, sink: usize, seq: u64) -> io::Result<()> {
        let Some(marker) = self.markers.get_mut(sink) else {
            return Ok(());
        };
        if seq <= marker.seq {
            return Ok(());
        }
        replace_file(&marker.path, format!("{seq}\n").as_bytes())?;
        marker.seq = seq;
        Ok(())
    }

    /// How many sinks have a marker.
    pub fn sink_count(&self) -> usize {
        self.markers.len()
    }

    /// Whether every sink has every record.
    pub fn all_delivered(&self) -> bool {
        self.markers.iter().all(|m| m.seq >= self.last_seq)
    }

    /// Empties the journal file when every sink has everything in it; true when it did. Not
    /// fsynced either: a power loss can bring back records every marker covers, and those are
    /// skipped when the journal is read again.
    pub fn compact(&mut self) -> io::Result<bool> {
        if self.len == 0 || !self.all_delivered() {
            return Ok(false);
        }
        self.file.set_len(0)?;
        self.len = 0;
        Ok(true)
    }

    /// When the file is larger than `max_bytes`, rewrites it (atomically) keeping only whole
    /// records from its last `keep_bytes`; true when it did. For a journal that is itself the
    /// record (no sink) and must not grow without bound.
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
        self.replace_with(&bytes[start..])?;
        Ok(true)
    }

    /// Rewrites the file (atomically) with only the records `keep` chooses, in order.
    pub fn retain(&mut self, mut keep: impl FnMut(&Sequenced<T>) -> bool) -> io::Result<()> {
        let bytes = fs::read(&self.path)?;
        let mut kept = Vec::with_capacity(bytes.len() / 2);
        for line in bytes.split_inclusive(|&b| b == b'\n') {
            if let Ok(record) = serde_json::from_slice::<Sequenced<T>>(line)
                && keep(&record)
            {
                kept.extend_from_slice(line);
            }
        }
        self.replace_with(&kept)
    }

    fn replace_with(&mut self, content: &[u8]) -> io::Result<()> {
        write_atomically(&self.dir, &self.path, content)?;
        self.file = OpenOptions::new().append(true).read(true).open(&self.path)?;
        self.len = content.len() as u64;
        Ok(())
    }
}

/// Replaces `path` (in `dir`) with `content` durably: temporary file, fsync, rename, fsync of
/// `dir`.
fn write_atomically(dir: &Path, path: &Path, content: &[u8]) -> io::Result<()> {
    let tmp = write_temporary(path, content, true)?;
    fs::rename(&tmp, path)?;
    File::open(dir)?.sync_all()
}

/// Replaces `path` with `content` atomically for every reader, without waiting for the disk.
fn replace_file(path: &Path, content: &[u8]) -> io::Result<()> {
    let tmp = write_temporary(path, content, false)?;
    fs::rename(&tmp, path)
}

/// `{path}.tmp` holding `content` (fsynced when `durable`).
fn write_temporary(path: &Path, content: &[u8], durable: bool) -> io::Result<PathBuf> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    let mut file = File::create(&tmp)?;
    file.write_all(content)?;
    if durable {
        file.sync_all()?;
    }
    Ok(tmp)
}

/// Reads a journal file without locking or repairing it (for a CLI looking at a running
/// agent's journal): every good record; a torn last line is ignored.
pub fn read_records<T: DeserializeOwned>(path: &Path) -> io::Result<Vec<Sequenced<T>>> {
    Ok(scan::<T>(&fs::read(path)?).records)
}

/// A marker's value, without locking (0 when there is none).
pub fn read_marker(path: &Path) -> u64 {
    fs::read_to_string(path).ok().and_then(|text| text.trim().parse().ok()).unwrap_or(0)
}

struct Scan<T> {
    records: Vec<Sequenced<T>>,
    /// Bytes up to the end of the last good record.
    good_len: u64,
    /// Corrupt lines before the last good record: (byte offset, reason).
    skipped: Vec<(u64, String)>,
    tail_reason: Option<String>,
}

/// Parses a journal's bytes: every good record, and where the good part ends.
fn scan<T: DeserializeOwned>(bytes: &[u8]) -> Scan<T> {
    let mut records: Vec<Sequenced<T>> = Vec::new();
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
        match serde_json::from_slice::<Sequenced<T>>(line).map_err(|err| err.to_string()) {
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
