//! Block I/O where the `block_bio_queue` program does not count it: bytes and operations
//! read and written, from `blkio.throttle.io_service_bytes_recursive` and
//! `io_serviced_recursive` (v1) or `io.stat` (v2), summed over devices.
//!
//! Kernels since 6.10 keep the v1 numbers only on devices with a blkio throttle rule set
//! for some cgroup; without one, v1 hosts read zeros here.

use std::io;

use agent_common::CgroupCounters;

use super::{StatFile, parse_u64};
use crate::monitor::cgroup::{CgroupMode, ContainerCgroups};

#[derive(Debug)]
pub enum BlockIoReader {
    V1 { bytes: StatFile, ops: StatFile },
    V2 { stat: StatFile },
}

impl BlockIoReader {
    pub fn open(cgroups: &ContainerCgroups) -> io::Result<Self> {
        let dir = cgroups.dir("blkio").ok_or_else(|| io::Error::other("the host has no blkio/io controller"))?;
        Ok(match cgroups.mode {
            CgroupMode::Hybrid => BlockIoReader::V1 {
                bytes: StatFile::open(dir.join("blkio.throttle.io_service_bytes_recursive"))?,
                ops: StatFile::open(dir.join("blkio.throttle.io_serviced_recursive"))?,
            },
            CgroupMode::Unified => BlockIoReader::V2 { stat: StatFile::open(dir.join("io.stat"))? },
        })
    }

    pub fn read(&self, buf: &mut Vec<u8>, counters: &mut CgroupCounters) -> io::Result<()> {
        match self {
            BlockIoReader::V1 { bytes, ops } => {
                (counters.io_read_bytes, counters.io_write_bytes) = sum_v1(bytes.read(buf)?);
                (counters.io_read_ops, counters.io_write_ops) = sum_v1(ops.read(buf)?);
            }
            BlockIoReader::V2 { stat } => {
                let (mut rbytes, mut wbytes, mut rios, mut wios) = (0u64, 0u64, 0u64, 0u64);
                // "8:0 rbytes=1 wbytes=2 rios=3 wios=4 dbytes=0 dios=0" per device.
                for field in stat.read(buf)?.split(|b| b.is_ascii_whitespace()) {
                    let Some(eq) = field.iter().position(|&b| b == b'=') else { continue };
                    let value = parse_u64(&field[eq + 1..]).unwrap_or(0);
                    match &field[..eq] {
                        b"rbytes" => rbytes += value,
                        b"wbytes" => wbytes += value,
                        b"rios" => rios += value,
                        b"wios" => wios += value,
                        _ => {}
                    }
                }
                (counters.io_read_bytes, counters.io_write_bytes) = (rbytes, wbytes);
                (counters.io_read_ops, counters.io_write_ops) = (rios, wios);
            }
        }
        Ok(())
    }
}

/// (Read, Write) summed over the "MAJ:MIN Op value" lines of a v1 blkio file.
fn sum_v1(text: &[u8]) -> (u64, u64) {
    let (mut read, mut write) = (0u64, 0u64);
    for line in text.split(|&b| b == b'\n') {
        let mut fields = line.split(|&b| b == b' ');
        let (Some(_device), Some(op), Some(value)) = (fields.next(), fields.next(), fields.next()) else { continue };
        let value = parse_u64(value).unwrap_or(0);
        match op {
            b"Read" => read += value,
            b"Write" => write += value,
            _ => {}
        }
    }
    (read, write)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn v1_lines_are_summed_over_devices() {
        let text =
            b"254:0 Read 100\n254:0 Write 200\n254:0 Sync 300\n254:0 Discard 5\n8:0 Read 1\n8:0 Write 2\nTotal 303\n";
        assert_eq!(sum_v1(text), (101, 202));
        assert_eq!(sum_v1(b"Total 0\n"), (0, 0));
    }
}
