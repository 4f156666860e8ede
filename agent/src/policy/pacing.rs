//! The qdisc side of egress caps, on every interface of a kernel's own network namespace (set
//! through rtnetlink from a thread that joined it): `fq`, which holds each packet until the
//! departure time the egress program gave it (Earliest Departure Time), or, on kernels built
//! without `sch_fq`, a token bucket (`tbf`) at the cap.

use std::{
    ffi::CStr,
    io,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    path::Path,
};

#[derive(Debug, thiserror::Error)]
pub enum PacingError {
    #[error("the kernel has no process to find its network namespace by")]
    NoProcess,
    #[error(
        "the kernel shares the host's network namespace; an egress cap needs its own (a qdisc there would pace the whole node)"
    )]
    HostNetwork,
    #[error("entering the kernel's network namespace ({path}): {source}")]
    Namespace { path: String, source: io::Error },
    #[error("setting the fq qdisc on `{interface}`: {source}")]
    Qdisc { interface: String, source: io::Error },
    #[error("the pacing thread failed: {0}")]
    Thread(String),
}

/// How a capped kernel's packets are held to its cap.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shaper {
    /// The egress program stamps each packet's departure time; `fq` holds it until then.
    Edt,
    /// A token bucket qdisc at the cap (the kernel has no `fq`).
    Tbf,
}

impl Shaper {
    pub fn name(self) -> &'static str {
        match self {
            Shaper::Edt => "edt",
            Shaper::Tbf => "tbf",
        }
    }

    /// What this kernel can do: EDT when it has the `fq` qdisc (tried in a scratch network
    /// namespace), the token bucket otherwise.
    pub fn detect() -> Shaper {
        let probe = std::thread::Builder::new().name("fq-probe".into()).spawn(|| {
            // SAFETY: unshare on this thread only; it ends with the thread's namespace.
            if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
                return Err(io::Error::last_os_error());
            }
            set_root_qdisc(LOOPBACK_INDEX, &Qdisc::Fq)
        });
        match probe.map(|thread| thread.join()) {
            Ok(Ok(Ok(()))) => Shaper::Edt,
            Ok(Ok(Err(err))) => {
                tracing::info!(error = %err, "this kernel has no fq qdisc; egress caps use a token bucket (tbf)");
                Shaper::Tbf
            }
            _ => Shaper::Tbf,
        }
    }
}

const LOOPBACK_INDEX: u32 = 1;

/// A root qdisc this module sets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Qdisc {
    /// `fq` with its defaults.
    Fq,
    /// `tbf` at this many bytes per second.
    Tbf { bytes_per_sec: u64 },
    /// None of ours: the interface's default root qdisc back.
    Default,
}

/// Sets `qdisc` at the root of every interface but loopback in `pid`'s network namespace;
/// returns the interfaces. Refuses the host's own namespace.
pub fn install(proc_root: &Path, pid: u32, qdisc: Qdisc) -> Result<Vec<String>, PacingError> {
    let path = proc_root.join(pid.to_string()).join("ns/net");
    let namespace = |source| PacingError::Namespace { path: path.display().to_string(), source };
    let theirs = std::fs::metadata(&path).map_err(namespace)?;
    let ours = std::fs::metadata(proc_root.join("self/ns/net")).map_err(namespace)?;
    use std::os::unix::fs::MetadataExt;
    if (theirs.dev(), theirs.ino()) == (ours.dev(), ours.ino()) {
        return Err(PacingError::HostNetwork);
    }
    let file = std::fs::File::open(&path).map_err(namespace)?;
    // A thread of its own joins the namespace and ends there: no other task ever runs in it.
    std::thread::Builder::new()
        .name("pacing-netns".into())
        .spawn(move || {
            // SAFETY: setns on this thread only, with a namespace file it holds open.
            if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                return Err(PacingError::Namespace { path: "setns".into(), source: io::Error::last_os_error() });
            }
            let mut done = Vec::new();
            for (index, name) in interfaces() {
                if index == LOOPBACK_INDEX || name == "lo" {
                    continue;
                }
                set_root_qdisc(index, &qdisc)
                    .map_err(|source| PacingError::Qdisc { interface: name.clone(), source })?;
                done.push(name);
            }
            Ok(done)
        })
        .map_err(|err| PacingError::Thread(err.to_string()))?
        .join()
        .map_err(|_| PacingError::Thread("it panicked".into()))?
}

/// The calling thread's network namespace's interfaces, by index.
fn interfaces() -> Vec<(u32, String)> {
    // SAFETY: if_nameindex returns an array ended by a zero entry, freed below.
    let list = unsafe { libc::if_nameindex() };
    if list.is_null() {
        return Vec::new();
    }
    let mut found = Vec::new();
    let mut cursor = list;
    // SAFETY: entries up to the zero one are valid, their names NUL-terminated.
    unsafe {
        while (*cursor).if_index != 0 {
            let name = CStr::from_ptr((*cursor).if_name).to_string_lossy().into_owned();
            found.push(((*cursor).if_index, name));
            cursor = cursor.add(1);
        }
        libc::if_freenameindex(list);
    }
    found
}

const RTM_NEWQDISC: u16 = 36;
const RTM_DELQDISC: u16 = 37;
const TCA_KIND: u16 = 1;
const TCA_OPTIONS: u16 = 2;
const TCA_TBF_PARMS: u16 = 1;
const TCA_TBF_RATE64: u16 = 4;
const TCA_TBF_BURST: u16 = 6;
const TC_H_ROOT: u32 = 0xffff_ffff;
const NLMSG_ERROR: u16 = 2;
const NLA_F_NESTED: u16 = 1 << 15;
/// `TC_LINKLAYER_ETHERNET`: rates are of whole packets (no ATM cells).
const LINKLAYER_ETHERNET: u8 = 1;
/// The scheduler's tick, as the kernel's `PSCHED_NS2TICKS` counts (64 ns).
const PSCHED_SHIFT: u32 = 6;

/// Appends one netlink attribute, padded to four bytes.
fn attribute(message: &mut Vec<u8>, kind: u16, payload: &[u8]) {
    let length = (4 + payload.len()) as u16;
    message.extend_from_slice(&length.to_ne_bytes());
    message.extend_from_slice(&kind.to_ne_bytes());
    message.extend_from_slice(payload);
    while !message.len().is_multiple_of(4) {
        message.push(0);
    }
}

/// The smallest bucket: larger than any packet the stack hands a qdisc (a 64 KiB GSO
/// segment and its headers). A packet larger than the bucket can never leave: after a cap is
/// lowered, one queued under the old, larger bucket would block its queue for good.
const MIN_BURST: u64 = 128 * 1024;

/// The bucket and queue of a token bucket at `bytes_per_sec`: a burst of 10 ms of the rate
/// (at least [`MIN_BURST`]) and a queue of 100 ms more.
fn tbf_options(bytes_per_sec: u64) -> Vec<u8> {
    let burst = (bytes_per_sec / 100).max(MIN_BURST).min(u64::from(u32::MAX)) as u32;
    let limit = (bytes_per_sec / 10 + u64::from(burst)).min(u64::from(u32::MAX)) as u32;
    // struct tc_ratespec: cell_log, linklayer, overhead, cell_align, mpu, rate (bytes/s).
    let mut ratespec = vec![0u8, LINKLAYER_ETHERNET, 0, 0, 0, 0, 0, 0];
    ratespec.extend_from_slice(&(bytes_per_sec.min(u64::from(u32::MAX)) as u32).to_ne_bytes());
    // The bucket in scheduler ticks (the kernel reads `buffer` only without TCA_TBF_BURST).
    let buffer_ns = u64::from(burst) * 1_000_000_000 / bytes_per_sec.max(1);
    let buffer_ticks = (buffer_ns >> PSCHED_SHIFT).min(u64::from(u32::MAX)) as u32;
    // struct tc_tbf_qopt: rate, peakrate (none), limit, buffer, mtu.
    let mut parms = ratespec.clone();
    parms.extend_from_slice(&[0u8; 12]);
    parms.extend_from_slice(&limit.to_ne_bytes());
    parms.extend_from_slice(&buffer_ticks.to_ne_bytes());
    parms.extend_from_slice(&0u32.to_ne_bytes());
    let mut options = Vec::new();
    attribute(&mut options, TCA_TBF_PARMS, &parms);
    if bytes_per_sec > u64::from(u32::MAX) {
        attribute(&mut options, TCA_TBF_RATE64, &bytes_per_sec.to_ne_bytes());
    }
    attribute(&mut options, TCA_TBF_BURST, &burst.to_ne_bytes());
    options
}

/// `tc qdisc replace dev <index> root <qdisc>`, as one rtnetlink request.
fn set_root_qdisc(ifindex: u32, qdisc: &Qdisc) -> io::Result<()> {
    let mut message = Vec::with_capacity(128);
    let (kind, flags) = match qdisc {
        Qdisc::Default => (RTM_DELQDISC, libc::NLM_F_REQUEST | libc::NLM_F_ACK),
        _ => (RTM_NEWQDISC, libc::NLM_F_REQUEST | libc::NLM_F_ACK | libc::NLM_F_CREATE | libc::NLM_F_REPLACE),
    };
    // nlmsghdr: length (filled in below), type, flags, sequence, port.
    message.extend_from_slice(&0u32.to_ne_bytes());
    message.extend_from_slice(&kind.to_ne_bytes());
    let flags = flags as u16;
    message.extend_from_slice(&flags.to_ne_bytes());
    message.extend_from_slice(&1u32.to_ne_bytes());
    message.extend_from_slice(&0u32.to_ne_bytes());
    // tcmsg: family and padding, interface, handle (the kernel picks), parent, info.
    message.extend_from_slice(&[libc::AF_UNSPEC as u8, 0, 0, 0]);
    message.extend_from_slice(&(ifindex as i32).to_ne_bytes());
    message.extend_from_slice(&0u32.to_ne_bytes());
    message.extend_from_slice(&TC_H_ROOT.to_ne_bytes());
    message.extend_from_slice(&0u32.to_ne_bytes());
    match qdisc {
        Qdisc::Fq => attribute(&mut message, TCA_KIND, b"fq\0"),
        Qdisc::Tbf { bytes_per_sec } => {
            attribute(&mut message, TCA_KIND, b"tbf\0");
            attribute(&mut message, TCA_OPTIONS | NLA_F_NESTED, &tbf_options(*bytes_per_sec));
        }
        Qdisc::Default => {}
    }
    let length = message.len() as u32;
    message[..4].copy_from_slice(&length.to_ne_bytes());

    // SAFETY: a plain socket call; the descriptor is owned at once.
    let raw = unsafe { libc::socket(libc::AF_NETLINK, libc::SOCK_RAW | libc::SOCK_CLOEXEC, libc::NETLINK_ROUTE) };
    if raw < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a new descriptor nobody else owns.
    let socket = unsafe { OwnedFd::from_raw_fd(raw) };
    // SAFETY: sending the buffer above, whole.
    let sent = unsafe { libc::send(socket.as_raw_fd(), message.as_ptr().cast(), message.len(), 0) };
    if sent < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut reply = [0u8; 1024];
    // SAFETY: receiving into a buffer of the given size.
    let received = unsafe { libc::recv(socket.as_raw_fd(), reply.as_mut_ptr().cast(), reply.len(), 0) };
    if received < 0 {
        return Err(io::Error::last_os_error());
    }
    match ack_status(&reply[..received as usize]) {
        // Nothing of ours was there to remove.
        Err(err) if *qdisc == Qdisc::Default && matches!(err.raw_os_error(), Some(libc::ENOENT | libc::EINVAL)) => {
            Ok(())
        }
        other => other,
    }
}

/// The outcome an rtnetlink acknowledgement carries (`nlmsgerr.error`: 0 or a negative errno).
fn ack_status(reply: &[u8]) -> io::Result<()> {
    if reply.len() < 20 {
        return Err(io::Error::other("a short rtnetlink reply"));
    }
    let kind = u16::from_ne_bytes([reply[4], reply[5]]);
    if kind != NLMSG_ERROR {
        return Err(io::Error::other(format!("an unexpected rtnetlink reply (type {kind})")));
    }
    match i32::from_ne_bytes([reply[16], reply[17], reply[18], reply[19]]) {
        0 => Ok(()),
        errno => Err(io::Error::from_raw_os_error(-errno)),
    }
}

/// Bits per second (as operators and `resource_opts.net_egress_bps` give caps) as the bytes
/// per second the program counts in; 0 stays 0 (no cap).
pub fn bytes_per_sec(bits_per_sec: u64) -> u64 {
    if bits_per_sec == 0 { 0 } else { (bits_per_sec / 8).max(1) }
}

/// The cap a kernel gets: the narrower of the node's default and its own (0: none).
pub fn effective_cap(node_default: u64, own: u64) -> u64 {
    match (node_default, own) {
        (0, own) => own,
        (node, 0) => node,
        (node, own) => node.min(own),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_kernels_cap_only_narrows_the_nodes() {
        assert_eq!(effective_cap(0, 0), 0);
        assert_eq!(effective_cap(100, 0), 100);
        assert_eq!(effective_cap(0, 50), 50);
        assert_eq!(effective_cap(100, 500), 100);
        assert_eq!(effective_cap(100, 50), 50);
        assert_eq!(bytes_per_sec(80_000_000), 10_000_000);
        assert_eq!(bytes_per_sec(0), 0);
    }

    #[test]
    fn acknowledgements_carry_the_errno() {
        let mut ack = vec![0u8; 36];
        ack[4..6].copy_from_slice(&NLMSG_ERROR.to_ne_bytes());
        assert!(ack_status(&ack).is_ok());
        ack[16..20].copy_from_slice(&(-libc::EPERM).to_ne_bytes());
        assert_eq!(ack_status(&ack).unwrap_err().raw_os_error(), Some(libc::EPERM));
        assert!(ack_status(&ack[..8]).is_err());
    }
}
