//! OOM kills as they happen: the `mark_victim` program's ring buffer, read when the
//! kernel wakes the agent. (The per-cgroup count lives in the counters; this only names
//! the victims.)

use std::io;

use agent_common::{OomEvent, TASK_COMM_LEN};
use aya::maps::{MapData, RingBuf};
use tokio::io::unix::AsyncFd;

/// One victim of the OOM killer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OomKill {
    pub cgroup_id: u64,
    pub pid: u32,
    pub comm: String,
}

impl OomKill {
    /// Decodes one ring buffer record; `None` for a record of the wrong size.
    pub fn parse(record: &[u8]) -> Option<OomKill> {
        if record.len() < std::mem::size_of::<OomEvent>() {
            return None;
        }
        // SAFETY: the record holds at least one OomEvent, written by the program as plain
        // data; read_unaligned copes with any alignment.
        let event: OomEvent = unsafe { std::ptr::read_unaligned(record.as_ptr().cast()) };
        let end = event.comm.iter().position(|&b| b == 0).unwrap_or(TASK_COMM_LEN);
        Some(OomKill {
            cgroup_id: event.cgroup_id,
            pid: event.pid,
            comm: String::from_utf8_lossy(&event.comm[..end]).into_owned(),
        })
    }
}

/// The ring buffer, registered with the runtime.
pub struct OomEvents {
    ring: AsyncFd<RingBuf<MapData>>,
}

impl OomEvents {
    pub fn new(ring: RingBuf<MapData>) -> io::Result<Self> {
        // SAFETY: the ring buffer owns its map's descriptor and keeps it open, unchanged,
        // for as long as it lives, and the AsyncFd owns the ring buffer.
        let ring =
            unsafe { AsyncFd::register_with_interest(ring, tokio::io::Interest::READABLE) }.map_err(io::Error::from)?;
        Ok(OomEvents { ring })
    }

    /// Waits for records, then returns every one there is.
    pub async fn next(&mut self) -> io::Result<Vec<OomKill>> {
        let mut guard = self.ring.readable_mut().await?;
        let ring = guard.get_inner_mut();
        let mut kills = Vec::new();
        while let Some(record) = ring.next() {
            match OomKill::parse(&record) {
                Some(kill) => kills.push(kill),
                None => tracing::warn!(bytes = record.len(), "an OOM event record of the wrong size"),
            }
        }
        guard.clear_ready();
        Ok(kills)
    }
}

/// The next kills, or never when there is no ring buffer (or it failed, which is logged once).
pub async fn next_kills(events: &mut Option<OomEvents>) -> Vec<OomKill> {
    let Some(ring) = events else {
        return std::future::pending().await;
    };
    match ring.next().await {
        Ok(kills) => kills,
        Err(err) => {
            tracing::warn!(error = %err, "reading OOM kill events failed; no longer following them (they are still counted)");
            *events = None;
            Vec::new()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_decode_to_kills() {
        let event = OomEvent { cgroup_id: 42, pid: 7, _pad: 0, comm: *b"dd\0\0\0\0\0\0\0\0\0\0\0\0\0\0" };
        // SAFETY: OomEvent is plain #[repr(C)] data.
        let bytes: [u8; std::mem::size_of::<OomEvent>()] = unsafe { std::mem::transmute(event) };
        assert_eq!(OomKill::parse(&bytes), Some(OomKill { cgroup_id: 42, pid: 7, comm: "dd".into() }));
        assert_eq!(OomKill::parse(&bytes[..8]), None);
    }
}
