//! Network where the `cgroup_skb` programs do not count it: bytes and packets of every
//! interface in the container's network namespace (`/proc/<pid>/net/dev`), loopback
//! included as the programs count it.

use std::{io, path::PathBuf};

use agent_common::CgroupCounters;

use super::{StatFile, parse_u64};

#[derive(Debug)]
pub struct NetDevReader {
    file: StatFile,
}

impl NetDevReader {
    pub fn open(pid: u32) -> io::Result<Self> {
        Ok(NetDevReader { file: StatFile::open(PathBuf::from(format!("/proc/{pid}/net/dev")))? })
    }

    pub fn read(&self, buf: &mut Vec<u8>, counters: &mut CgroupCounters) -> io::Result<()> {
        let totals = sum_interfaces(self.file.read(buf)?);
        (counters.rx_bytes, counters.rx_packets, counters.tx_bytes, counters.tx_packets) = totals;
        Ok(())
    }
}

/// (rx bytes, rx packets, tx bytes, tx packets) over the interface lines
/// ("  lo: rxbytes rxpackets errs drop fifo frame compressed multicast txbytes txpackets …").
fn sum_interfaces(text: &[u8]) -> (u64, u64, u64, u64) {
    let mut totals = (0, 0, 0, 0);
    for line in text.split(|&b| b == b'\n') {
        let Some(colon) = line.iter().position(|&b| b == b':') else { continue };
        let fields: Vec<u64> = line[colon + 1..]
            .split(|b| b.is_ascii_whitespace())
            .filter(|f| !f.is_empty())
            .filter_map(parse_u64)
            .collect();
        if fields.len() >= 10 {
            totals.0 += fields[0];
            totals.1 += fields[1];
            totals.2 += fields[8];
            totals.3 += fields[9];
        }
    }
    totals
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interfaces_are_summed_loopback_included() {
        let text = b"Inter-|   Receive                            |  Transmit\n face |bytes    packets errs drop fifo frame compressed multicast|bytes    packets errs drop fifo colls carrier compressed\n    lo:     100       2    0    0    0     0          0         0      100       2    0    0    0     0       0          0\n  eth0:    1000      10    0    0    0     0          0         0     2000      20    0    0    0     0       0          0\n";
        assert_eq!(sum_interfaces(text), (1100, 12, 2100, 22));
    }
}
