//! The host port pool (`container.port-range`, default 30000–31000 inclusive): ports
//! published for kernels' REPL and service ports, handed out oldest-free first, with a
//! cooldown before a released port is reused.
//!
//! [`PortPool`] is thread-safe (a `std::sync::Mutex` inside; methods take `&self`). Time
//! comes from a clock function, [`Instant::now`] unless [`PortPool::with_clock`] says
//! otherwise, so tests can move time by hand.

use std::{
    collections::{HashSet, VecDeque},
    fmt,
    ops::RangeInclusive,
    sync::{Arc, Mutex, MutexGuard},
    time::{Duration, Instant},
};

/// Where the pool reads the time.
pub type Clock = Arc<dyn Fn() -> Instant + Send + Sync>;

/// Why ports could not be handed out or marked. Every message names the pool's range.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PortError {
    #[error("port range {low}-{high} is empty or includes port 0")]
    BadRange { low: u16, high: u16 },
    #[error("port pool {range} exhausted: requested {requested}, {free} free")]
    Exhausted { range: PortRange, requested: usize, free: usize },
    #[error(
        "port pool {range}: requested {requested}, {ready} free now and {cooling} more cooling down (next in {next_ready_in:?})"
    )]
    CoolingDown { range: PortRange, requested: usize, ready: usize, cooling: usize, next_ready_in: Duration },
    #[error("port {port} is already in use (pool {range})")]
    AlreadyInUse { range: PortRange, port: u16 },
    #[error("port {port} is listed twice")]
    Duplicate { port: u16 },
}

/// An inclusive port range, shown as `30000-31000`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PortRange {
    pub low: u16,
    pub high: u16,
}

impl PortRange {
    pub fn contains(&self, port: u16) -> bool {
        (self.low..=self.high).contains(&port)
    }

    pub fn len(&self) -> usize {
        if self.is_empty() { 0 } else { usize::from(self.high - self.low) + 1 }
    }

    pub fn is_empty(&self) -> bool {
        self.low > self.high
    }
}

impl fmt::Display for PortRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.low, self.high)
    }
}

#[derive(Debug)]
struct State {
    /// Free ports, oldest first: never-used ports (in order) then released ones by release time.
    free: VecDeque<(u16, Option<Instant>)>,
    in_use: HashSet<u16>,
}

/// Hands out host ports from a fixed range.
pub struct PortPool {
    range: PortRange,
    cooldown: Duration,
    clock: Clock,
    state: Mutex<State>,
}

impl fmt::Debug for PortPool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PortPool")
            .field("range", &self.range)
            .field("cooldown", &self.cooldown)
            .field("in_use", &self.in_use())
            .finish()
    }
}

impl PortPool {
    /// A pool of `range` (inclusive) whose released ports wait `cooldown` before reuse.
    pub fn new(range: RangeInclusive<u16>, cooldown: Duration) -> Result<PortPool, PortError> {
        Self::with_clock(range, cooldown, Arc::new(Instant::now))
    }

    /// As [`new`](Self::new), reading the time from `clock`.
    pub fn with_clock(range: RangeInclusive<u16>, cooldown: Duration, clock: Clock) -> Result<PortPool, PortError> {
        let (low, high) = range.into_inner();
        if low == 0 || low > high {
            return Err(PortError::BadRange { low, high });
        }
        let free = (low..=high).map(|port| (port, None)).collect();
        Ok(PortPool {
            range: PortRange { low, high },
            cooldown,
            clock,
            state: Mutex::new(State { free, in_use: HashSet::new() }),
        })
    }

    pub fn range(&self) -> PortRange {
        self.range
    }

    pub fn cooldown(&self) -> Duration {
        self.cooldown
    }

    /// A poisoned lock still holds consistent state: every method checks before it mutates.
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn is_ready(&self, released: Option<Instant>, now: Instant) -> bool {
        released.is_none_or(|at| now.saturating_duration_since(at) >= self.cooldown)
    }

    /// Takes `n` ports, all or none, the longest-free first; released ports are skipped
    /// until their cooldown has passed.
    pub fn take(&self, n: usize) -> Result<Vec<u16>, PortError> {
        let now = (self.clock)();
        let mut state = self.lock();
        // The queue is in release order, so the ports out of cooldown are a prefix of it.
        let ready_prefix = |limit: usize| {
            state.free.iter().take(limit).take_while(|(_, released)| self.is_ready(*released, now)).count()
        };
        if ready_prefix(n) < n {
            let ready = ready_prefix(usize::MAX);
            let free = state.free.len();
            if free < n {
                return Err(PortError::Exhausted { range: self.range, requested: n, free });
            }
            let next_ready_in = state
                .free
                .get(ready)
                .and_then(|(_, released)| *released)
                .map(|at| self.cooldown.saturating_sub(now.saturating_duration_since(at)))
                .unwrap_or_default();
            return Err(PortError::CoolingDown {
                range: self.range,
                requested: n,
                ready,
                cooling: free - ready,
                next_ready_in,
            });
        }
        let ports: Vec<u16> = state.free.drain(..n).map(|(port, _)| port).collect();
        state.in_use.extend(ports.iter().copied());
        Ok(ports)
    }

    /// Puts ports back; they become available after the cooldown. Ports not in use (or
    /// outside the range) are ignored. Returns how many were released.
    pub fn release(&self, ports: &[u16]) -> usize {
        let now = (self.clock)();
        let mut state = self.lock();
        let mut released = 0;
        for port in ports {
            if state.in_use.remove(port) {
                state.free.push_back((*port, Some(now)));
                released += 1;
            }
        }
        released
    }

    /// Marks ports found on running kernels (after an agent restart) as in use, all or
    /// none. Ports outside the range are not this pool's and are ignored; a port already
    /// in use is an error.
    pub fn reserve(&self, ports: &[u16]) -> Result<(), PortError> {
        let mut state = self.lock();
        let mut seen = HashSet::new();
        for port in ports.iter().copied().filter(|port| self.range.contains(*port)) {
            if !seen.insert(port) {
                return Err(PortError::Duplicate { port });
            }
            if state.in_use.contains(&port) {
                return Err(PortError::AlreadyInUse { range: self.range, port });
            }
        }
        state.free.retain(|(port, _)| !seen.contains(port));
        state.in_use.extend(seen);
        Ok(())
    }

    /// One port for the `assign_port` RPC. Like Backend.AI's, this path ignores the
    /// cooldown: it takes the longest-free port even if it was released a moment ago.
    pub fn assign_one(&self) -> Result<u16, PortError> {
        let mut state = self.lock();
        let Some((port, _)) = state.free.pop_front() else {
            return Err(PortError::Exhausted { range: self.range, requested: 1, free: 0 });
        };
        state.in_use.insert(port);
        Ok(port)
    }

    /// The `release_port` RPC: `true` when `port` was in use and is now released.
    pub fn release_one(&self, port: u16) -> bool {
        self.release(&[port]) == 1
    }

    /// How many ports are in use.
    pub fn in_use(&self) -> usize {
        self.lock().in_use.len()
    }

    pub fn is_in_use(&self, port: u16) -> bool {
        self.lock().in_use.contains(&port)
    }

    /// How many ports are free, cooling down or not.
    pub fn free(&self) -> usize {
        self.lock().free.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A clock that moves only when told.
    struct ManualClock(Arc<Mutex<Instant>>);

    impl ManualClock {
        fn new() -> (ManualClock, Clock) {
            let now = Arc::new(Mutex::new(Instant::now()));
            let reader = Arc::clone(&now);
            let clock: Clock = Arc::new(move || *reader.lock().expect("clock"));
            (ManualClock(now), clock)
        }

        fn advance(&self, by: Duration) {
            *self.0.lock().expect("clock") += by;
        }
    }

    fn pool(low: u16, high: u16, cooldown: Duration) -> (PortPool, ManualClock) {
        let (manual, clock) = ManualClock::new();
        (PortPool::with_clock(low..=high, cooldown, clock).expect("valid range"), manual)
    }

    #[test]
    fn takes_in_order_and_all_or_nothing() {
        let (pool, _) = pool(30000, 30004, Duration::from_secs(10));
        assert_eq!(pool.take(2).expect("free"), vec![30000, 30001]);
        assert_eq!(pool.take(2).expect("free"), vec![30002, 30003]);
        let err = pool.take(2).expect_err("one left");
        assert_eq!(err.to_string(), "port pool 30000-30004 exhausted: requested 2, 1 free");
        assert_eq!(pool.in_use(), 4, "a failed take takes nothing");
        assert_eq!(pool.take(1).expect("last"), vec![30004]);
        assert!(pool.take(0).expect("nothing asked").is_empty());
    }

    #[test]
    fn released_ports_wait_for_the_cooldown() {
        let (pool, clock) = pool(30000, 30002, Duration::from_secs(10));
        let ports = pool.take(3).expect("free");
        assert_eq!(pool.release(&ports[..2]), 2);
        let err = pool.take(1).expect_err("cooling");
        assert!(matches!(err, PortError::CoolingDown { ready: 0, cooling: 2, .. }), "{err}");
        assert!(err.to_string().contains("30000-30002"), "{err}");
        clock.advance(Duration::from_secs(9));
        assert!(pool.take(1).is_err());
        clock.advance(Duration::from_secs(1));
        assert_eq!(pool.take(2).expect("cooled"), vec![30000, 30001]);
    }

    #[test]
    fn never_used_ports_come_before_released_ones() {
        let (pool, clock) = pool(30000, 30003, Duration::ZERO);
        let first = pool.take(2).expect("free");
        pool.release(&first);
        clock.advance(Duration::from_secs(1));
        assert_eq!(pool.take(3).expect("free"), vec![30002, 30003, 30000]);
    }

    #[test]
    fn partly_cooled_requests_fail_whole() {
        let (pool, clock) = pool(30000, 30001, Duration::from_secs(10));
        let ports = pool.take(2).expect("free");
        pool.release(&ports[..1]);
        clock.advance(Duration::from_secs(5));
        pool.release(&ports[1..]);
        clock.advance(Duration::from_secs(5));
        let err = pool.take(2).expect_err("second still cooling");
        assert!(
            matches!(err, PortError::CoolingDown { ready: 1, cooling: 1, next_ready_in, .. } if next_ready_in == Duration::from_secs(5)),
            "{err}"
        );
        assert_eq!(pool.free(), 2);
        assert_eq!(pool.take(1).expect("first cooled"), vec![30000]);
    }

    #[test]
    fn release_ignores_ports_not_in_use() {
        let (pool, _) = pool(30000, 30001, Duration::ZERO);
        assert_eq!(pool.release(&[30000, 40000]), 0);
        let ports = pool.take(1).expect("free");
        assert!(pool.release_one(ports[0]));
        assert!(!pool.release_one(ports[0]), "twice is a no-op");
        assert_eq!(pool.free(), 2);
    }

    #[test]
    fn reserve_marks_recovered_ports() {
        let (pool, _) = pool(30000, 30003, Duration::from_secs(10));
        pool.reserve(&[30001, 30003, 12345]).expect("free ports");
        assert_eq!(pool.in_use(), 2, "out-of-range ports are not the pool's");
        assert!(pool.is_in_use(30003));
        let err = pool.reserve(&[30002, 30001]).expect_err("30001 taken");
        assert_eq!(err.to_string(), "port 30001 is already in use (pool 30000-30003)");
        assert!(!pool.is_in_use(30002), "all or nothing");
        assert!(matches!(pool.reserve(&[30002, 30002]), Err(PortError::Duplicate { port: 30002 })));
        assert_eq!(pool.take(2).expect("free"), vec![30000, 30002]);
        // A port cooling down can be reserved too.
        pool.release(&[30000]);
        pool.reserve(&[30000]).expect("cooling port");
        assert_eq!(pool.free(), 0);
    }

    #[test]
    fn assign_one_ignores_the_cooldown() {
        let (pool, _) = pool(30000, 30000, Duration::from_secs(60));
        let port = pool.assign_one().expect("free");
        assert_eq!(port, 30000);
        let err = pool.assign_one().expect_err("exhausted");
        assert!(matches!(err, PortError::Exhausted { .. }), "{err}");
        assert!(pool.release_one(port));
        assert!(pool.take(1).is_err(), "take respects the cooldown");
        assert_eq!(pool.assign_one().expect("RPC path does not"), 30000);
    }

    #[test]
    fn bad_ranges_are_refused() {
        let (low, high) = (31000, 30000);
        assert!(matches!(PortPool::new(low..=high, Duration::ZERO), Err(PortError::BadRange { .. })));
        assert!(matches!(PortPool::new(0..=10, Duration::ZERO), Err(PortError::BadRange { .. })));
        let pool = PortPool::new(65535..=65535, Duration::ZERO).expect("single port");
        assert_eq!(pool.range().len(), 1);
        assert_eq!(pool.take(1).expect("free"), vec![65535]);
        let pool = PortPool::new(1..=65535, Duration::ZERO).expect("everything");
        assert_eq!(pool.free(), 65535);
    }

    #[test]
    fn concurrent_takes_never_share_a_port() {
        let pool = Arc::new(PortPool::new(30000..=30099, Duration::from_secs(10)).expect("valid"));
        let handles: Vec<_> = (0..10)
            .map(|_| {
                let pool = Arc::clone(&pool);
                std::thread::spawn(move || (0..5).flat_map(|_| pool.take(2).unwrap_or_default()).collect::<Vec<_>>())
            })
            .collect();
        let mut all: Vec<u16> = handles.into_iter().flat_map(|h| h.join().expect("thread")).collect();
        assert_eq!(all.len(), 100);
        all.sort_unstable();
        all.dedup();
        assert_eq!(all.len(), 100);
        assert_eq!(pool.in_use(), 100);
    }
}
