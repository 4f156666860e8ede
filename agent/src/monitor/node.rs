//! The node's own totals: CPU time per core (`/proc/stat`), memory (`/proc/meminfo`),
//! network (`/proc/net/dev` of the host), and the disks: space of the filesystems kernels
//! write to (`statvfs`) and bytes read and written per disk (`/proc/diskstats`).

use std::{
    ffi::CString,
    path::{Path, PathBuf},
};

use super::files::{StatFile, parse_u64};

/// Kernel clock ticks (`USER_HZ`) in nanoseconds; Linux exports 100 ticks per second.
const TICK_NS: u64 = 10_000_000;
/// `/proc/diskstats` counts 512-byte sectors whatever the device's own sector size.
const SECTOR_BYTES: u64 = 512;

/// One core's time since boot, in nanoseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CoreTime {
    pub core: u32,
    /// user, nice, system, irq, softirq and steal.
    pub busy_ns: u64,
    /// idle and iowait.
    pub idle_ns: u64,
}

/// A filesystem kernels write to (the scratch root's).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DiskSpace {
    pub mount_point: String,
    pub device: String,
    pub total_bytes: u64,
    pub used_bytes: u64,
}

/// A whole disk's traffic since boot.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DiskIo {
    pub device: String,
    pub read_bytes: u64,
    pub written_bytes: u64,
}

/// What one sample reads of the node.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NodeReadings {
    pub cores: Vec<CoreTime>,
    pub mem_total_bytes: u64,
    pub mem_available_bytes: u64,
    /// Every interface of the host's network namespace, loopback included.
    pub net_rx_bytes: u64,
    pub net_tx_bytes: u64,
    pub disks: Vec<DiskSpace>,
    pub disk_io: Vec<DiskIo>,
}

impl NodeReadings {
    pub fn mem_used_bytes(&self) -> u64 {
        self.mem_total_bytes.saturating_sub(self.mem_available_bytes)
    }
}

/// The node's files, opened once.
#[derive(Debug)]
pub struct NodeReader {
    stat: Option<StatFile>,
    meminfo: Option<StatFile>,
    net_dev: Option<StatFile>,
    diskstats: Option<StatFile>,
    /// (mount point, device) of each filesystem measured for space.
    filesystems: Vec<(PathBuf, String)>,
    /// Whole disks by name (`vda`, `nvme0n1`): what `/sys/block` lists, less loop and ram devices.
    disks: Vec<String>,
}

impl NodeReader {
    /// Measures the filesystems holding `paths` (the scratch root) for space.
    pub fn new(paths: &[&Path]) -> NodeReader {
        let open = |path: &str| match StatFile::open(PathBuf::from(path)) {
            Ok(file) => Some(file),
            Err(err) => {
                tracing::warn!(error = %err, "cannot read a node statistics file; its numbers stay at zero");
                None
            }
        };
        let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        let mut filesystems: Vec<(PathBuf, String)> = Vec::new();
        for path in paths {
            if let Some(found) = mount_of(&mountinfo, path)
                && !filesystems.contains(&found)
            {
                filesystems.push(found);
            }
        }
        let disks = std::fs::read_dir("/sys/block")
            .map(|entries| {
                entries
                    .filter_map(Result::ok)
                    .map(|entry| entry.file_name().to_string_lossy().into_owned())
                    .filter(|name| !name.starts_with("loop") && !name.starts_with("ram"))
                    .collect()
            })
            .unwrap_or_default();
        NodeReader {
            stat: open("/proc/stat"),
            meminfo: open("/proc/meminfo"),
            net_dev: open("/proc/net/dev"),
            diskstats: open("/proc/diskstats"),
            filesystems,
            disks,
        }
    }

    /// Reads everything; a file that fails to read leaves its numbers at zero.
    pub fn read(&self, buf: &mut Vec<u8>) -> NodeReadings {
        let mut node = NodeReadings::default();
        if let Some(Ok(text)) = self.stat.as_ref().map(|f| f.read(buf)) {
            node.cores = parse_cores(text);
        }
        if let Some(Ok(text)) = self.meminfo.as_ref().map(|f| f.read(buf)) {
            (node.mem_total_bytes, node.mem_available_bytes) = parse_meminfo(text);
        }
        if let Some(Ok(text)) = self.net_dev.as_ref().map(|f| f.read(buf)) {
            (node.net_rx_bytes, node.net_tx_bytes) = parse_net_dev(text);
        }
        if let Some(Ok(text)) = self.diskstats.as_ref().map(|f| f.read(buf)) {
            node.disk_io = parse_diskstats(text, &self.disks);
        }
        node.disks = self.filesystems.iter().filter_map(|(mount, device)| disk_space(mount, device)).collect();
        node
    }
}

fn fields(line: &[u8]) -> impl Iterator<Item = &[u8]> {
    line.split(|b| b.is_ascii_whitespace()).filter(|f| !f.is_empty())
}

/// The `cpuN` lines of `/proc/stat`.
fn parse_cores(text: &[u8]) -> Vec<CoreTime> {
    let mut cores = Vec::new();
    for line in text.split(|&b| b == b'\n') {
        let mut words = fields(line);
        let Some(name) = words.next() else { continue };
        let Some(core) = name.strip_prefix(b"cpu").and_then(parse_u64) else { continue };
        // user nice system idle iowait irq softirq steal (guest time is inside user)
        let ticks: Vec<u64> = words.take(8).map(|w| parse_u64(w).unwrap_or(0)).collect();
        if ticks.len() < 8 {
            continue;
        }
        let busy = ticks[0] + ticks[1] + ticks[2] + ticks[5] + ticks[6] + ticks[7];
        let idle = ticks[3] + ticks[4];
        cores.push(CoreTime {
            core: u32::try_from(core).unwrap_or(u32::MAX),
            busy_ns: busy.saturating_mul(TICK_NS),
            idle_ns: idle.saturating_mul(TICK_NS),
        });
    }
    cores
}

/// (MemTotal, MemAvailable) in bytes.
fn parse_meminfo(text: &[u8]) -> (u64, u64) {
    let (mut total, mut available) = (0, 0);
    for line in text.split(|&b| b == b'\n') {
        let mut words = fields(line);
        let (Some(key), Some(kib)) = (words.next(), words.next().and_then(parse_u64)) else { continue };
        match key {
            b"MemTotal:" => total = kib * 1024,
            b"MemAvailable:" => available = kib * 1024,
            _ => {}
        }
    }
    (total, available)
}

/// (rx bytes, tx bytes) over every interface.
fn parse_net_dev(text: &[u8]) -> (u64, u64) {
    let (mut rx, mut tx) = (0, 0);
    for line in text.split(|&b| b == b'\n') {
        let Some(colon) = line.iter().position(|&b| b == b':') else { continue };
        let numbers: Vec<u64> = fields(&line[colon + 1..]).map(|f| parse_u64(f).unwrap_or(0)).collect();
        if numbers.len() >= 9 {
            rx += numbers[0];
            tx += numbers[8];
        }
    }
    (rx, tx)
}

/// Sectors read and written of the named whole disks.
fn parse_diskstats(text: &[u8], disks: &[String]) -> Vec<DiskIo> {
    let mut out = Vec::new();
    for line in text.split(|&b| b == b'\n') {
        // major minor name reads merged sectors_read ms writes merged sectors_written …
        let words: Vec<&[u8]> = fields(line).take(10).collect();
        if words.len() < 10 {
            continue;
        }
        let name = String::from_utf8_lossy(words[2]);
        if !disks.iter().any(|disk| *disk == name) {
            continue;
        }
        out.push(DiskIo {
            device: name.into_owned(),
            read_bytes: parse_u64(words[5]).unwrap_or(0).saturating_mul(SECTOR_BYTES),
            written_bytes: parse_u64(words[9]).unwrap_or(0).saturating_mul(SECTOR_BYTES),
        });
    }
    out
}

/// The mount (mount point, source device) that holds `path`: the longest mount point prefix.
fn mount_of(mountinfo: &str, path: &Path) -> Option<(PathBuf, String)> {
    let path = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
    let mut best: Option<(PathBuf, String)> = None;
    for line in mountinfo.lines() {
        let Some((left, right)) = line.split_once(" - ") else { continue };
        let Some(mount_point) = left.split_whitespace().nth(4) else { continue };
        let source = right.split_whitespace().nth(1).unwrap_or("none");
        let mount_point = PathBuf::from(mount_point);
        if path.starts_with(&mount_point)
            && best.as_ref().is_none_or(|(current, _)| mount_point.as_os_str().len() >= current.as_os_str().len())
        {
            best = Some((mount_point, source.to_owned()));
        }
    }
    best
}

fn disk_space(mount_point: &Path, device: &str) -> Option<DiskSpace> {
    let c_path = CString::new(mount_point.as_os_str().as_encoded_bytes()).ok()?;
    // SAFETY: statvfs is plain data, filled by the call for a valid C string.
    let mut stat: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    if unsafe { libc::statvfs(c_path.as_ptr(), &mut stat) } != 0 {
        return None;
    }
    let block = stat.f_frsize;
    Some(DiskSpace {
        mount_point: mount_point.display().to_string(),
        device: device.to_owned(),
        total_bytes: stat.f_blocks.saturating_mul(block),
        used_bytes: stat.f_blocks.saturating_sub(stat.f_bfree).saturating_mul(block),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cores_are_read_from_proc_stat() {
        let text = b"cpu  10 0 5 100 1 0 0 0 0 0\ncpu0 6 1 3 50 1 1 1 1 0 0\ncpu1 4 0 2 50 0 0 0 0 0 0\nintr 1 2\n";
        let cores = parse_cores(text);
        assert_eq!(cores.len(), 2);
        assert_eq!(cores[0], CoreTime { core: 0, busy_ns: 13 * TICK_NS, idle_ns: 51 * TICK_NS });
        assert_eq!(cores[1].busy_ns, 6 * TICK_NS);
    }

    #[test]
    fn meminfo_and_net_dev_parse() {
        assert_eq!(parse_meminfo(b"MemTotal: 100 kB\nMemFree: 10 kB\nMemAvailable: 40 kB\n"), (102400, 40960));
        let dev = b"Inter-| Receive\n face |bytes\n    lo: 10 1 0 0 0 0 0 0 20 2 0 0 0 0 0 0\n  eth0: 100 1 0 0 0 0 0 0 200 2 0 0 0 0 0 0\n";
        assert_eq!(parse_net_dev(dev), (110, 220));
    }

    #[test]
    fn only_whole_disks_are_counted() {
        let text = b" 254 0 vda 10 0 80 5 20 0 160 9 0 0 0\n 254 1 vda1 10 0 80 5 20 0 160 9 0 0 0\n";
        let io = parse_diskstats(text, &["vda".to_owned()]);
        assert_eq!(io, vec![DiskIo { device: "vda".into(), read_bytes: 80 * 512, written_bytes: 160 * 512 }]);
    }

    #[test]
    fn this_node_reads_plausibly() {
        let reader = NodeReader::new(&[Path::new("/")]);
        let node = reader.read(&mut Vec::new());
        assert!(!node.cores.is_empty());
        assert!(node.mem_total_bytes > node.mem_available_bytes && node.mem_available_bytes > 0);
        assert_eq!(node.disks.len(), 1, "{node:?}");
        assert!(node.disks[0].total_bytes >= node.disks[0].used_bytes && node.disks[0].used_bytes > 0);
    }
}
