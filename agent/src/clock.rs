//! Periodic clocks for the agent's tasks that run every interval (the monitor's samples, the
//! stats writer, the heartbeat): a `timerfd` that fires every interval, waited on through the
//! runtime's poller.
//!
//! Tokio's timer wheel reaches a deadline a second away in steps (it wakes at the end of each
//! coarser slot and files the timer again), so a one-second `interval` wakes the runtime three
//! or four times per tick. A timerfd wakes it once, which on a node that is otherwise idle is a
//! good share of what sampling costs.

use std::{
    io,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    time::Duration,
};

use tokio::io::unix::AsyncFd;

/// Fires every `interval` from its creation (the first tick is immediate, as
/// `tokio::time::interval`'s); ticks missed while the monitor was busy are merged into one.
pub struct Ticker {
    fd: AsyncFd<OwnedFd>,
    first: bool,
    interval: Duration,
}

/// A [`Ticker`], or tokio's interval where no timerfd can be made.
pub enum Clock {
    Timerfd(Ticker),
    Tokio(tokio::time::Interval),
}

impl Clock {
    pub fn new(interval: Duration) -> Clock {
        match Ticker::new(interval) {
            Ok(ticker) => Clock::Timerfd(ticker),
            Err(err) => {
                tracing::debug!(error = %err, "no timerfd for a clock; using the runtime's timer");
                let mut tokio = tokio::time::interval(interval);
                tokio.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                Clock::Tokio(tokio)
            }
        }
    }

    /// Waits for the next tick.
    pub async fn tick(&mut self) {
        match self {
            Clock::Timerfd(ticker) => {
                if let Err(err) = ticker.tick().await {
                    tracing::warn!(error = %err, "a timerfd clock failed; using the runtime's timer");
                    let interval = ticker.interval;
                    *self = Clock::Tokio(tokio::time::interval_at(tokio::time::Instant::now() + interval, interval));
                }
            }
            Clock::Tokio(interval) => {
                interval.tick().await;
            }
        }
    }
}

impl Ticker {
    pub fn new(interval: Duration) -> io::Result<Ticker> {
        // SAFETY: timerfd_create takes plain flags and returns a new descriptor or -1.
        let raw = unsafe { libc::timerfd_create(libc::CLOCK_MONOTONIC, libc::TFD_NONBLOCK | libc::TFD_CLOEXEC) };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a fresh descriptor that this value now owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let every = libc::timespec {
            tv_sec: libc::time_t::try_from(interval.as_secs()).unwrap_or(libc::time_t::MAX),
            tv_nsec: libc::c_long::from(interval.subsec_nanos()),
        };
        let spec = libc::itimerspec { it_interval: every, it_value: every };
        // SAFETY: a valid timerfd and a fully initialised itimerspec; no old value is asked for.
        if unsafe { libc::timerfd_settime(fd.as_raw_fd(), 0, &spec, std::ptr::null_mut()) } != 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: the OwnedFd keeps its descriptor open, unchanged, for as long as it lives, and
        // the AsyncFd owns it.
        let fd =
            unsafe { AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE) }.map_err(io::Error::from)?;
        Ok(Ticker { fd, first: true, interval })
    }

    /// Waits for the next tick.
    pub async fn tick(&mut self) -> io::Result<()> {
        if std::mem::take(&mut self.first) {
            return Ok(());
        }
        loop {
            let mut ready = self.fd.readable().await?;
            let mut expirations = [0u8; 8];
            // SAFETY: reading 8 bytes (the expiration count) into a buffer of 8 bytes.
            let read = unsafe { libc::read(ready.get_inner().as_raw_fd(), expirations.as_mut_ptr().cast(), 8) };
            if read == 8 {
                ready.clear_ready();
                return Ok(());
            }
            let err = io::Error::last_os_error();
            if err.kind() != io::ErrorKind::WouldBlock {
                return Err(err);
            }
            ready.clear_ready();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn ticks_every_interval_the_first_at_once() {
        let mut ticker = Ticker::new(Duration::from_millis(50)).expect("timerfd");
        let started = std::time::Instant::now();
        ticker.tick().await.expect("first tick");
        assert!(started.elapsed() < Duration::from_millis(40), "the first tick is immediate");
        for _ in 0..3 {
            ticker.tick().await.expect("tick");
        }
        let elapsed = started.elapsed();
        assert!(elapsed >= Duration::from_millis(140) && elapsed < Duration::from_millis(400), "{elapsed:?}");
    }
}
