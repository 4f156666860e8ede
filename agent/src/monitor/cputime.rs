//! A container's CPU time split into user and system time, the way the kernel splits a
//! cgroup's for `cpuacct.stat` and `cpu.stat` (`cputime_adjust()`): the exact total is shared
//! out in the ratio of the tick samples of user and system time, and neither part ever goes
//! down, so both stay counters and always add up to the total.

/// User and system nanoseconds, adding up to the total they were split from.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CpuSplit {
    pub user_ns: u64,
    pub system_ns: u64,
}

impl CpuSplit {
    /// Splits `total_ns` by the samples `user_sampled_ns` : `system_sampled_ns`, keeping both
    /// parts at least what they were. A total that did not grow keeps the last split.
    pub fn update(&mut self, total_ns: u64, user_sampled_ns: u64, system_sampled_ns: u64) -> CpuSplit {
        let previous = *self;
        if previous.user_ns.saturating_add(previous.system_ns) >= total_ns {
            return previous;
        }
        let mut system = if system_sampled_ns == 0 {
            0
        } else if user_sampled_ns == 0 {
            total_ns
        } else {
            let scaled = u128::from(system_sampled_ns) * u128::from(total_ns)
                / (u128::from(system_sampled_ns) + u128::from(user_sampled_ns));
            u64::try_from(scaled).unwrap_or(total_ns)
        };
        system = system.max(previous.system_ns).min(total_ns);
        let mut user = total_ns - system;
        if user < previous.user_ns {
            user = previous.user_ns;
            system = total_ns - user;
        }
        *self = CpuSplit { user_ns: user, system_ns: system };
        *self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_total_is_shared_in_the_samples_ratio() {
        let mut split = CpuSplit::default();
        assert_eq!(split.update(1000, 300, 100), CpuSplit { user_ns: 750, system_ns: 250 });
    }

    #[test]
    fn without_samples_everything_is_user_time() {
        let mut split = CpuSplit::default();
        assert_eq!(split.update(1000, 0, 0), CpuSplit { user_ns: 1000, system_ns: 0 });
        let mut split = CpuSplit::default();
        assert_eq!(split.update(1000, 0, 40), CpuSplit { user_ns: 0, system_ns: 1000 });
    }

    #[test]
    fn neither_part_goes_down_and_both_add_up() {
        let mut split = CpuSplit::default();
        split.update(1000, 100, 100);
        // The ratio swings to user time: system time holds, user time takes the growth.
        let next = split.update(1200, 1000, 1);
        assert_eq!(next, CpuSplit { user_ns: 700, system_ns: 500 });
        // A total that did not grow keeps the split.
        assert_eq!(split.update(1100, 1, 1000), next);
        // The ratio swings back: user time holds.
        let last = split.update(2000, 1, 1000);
        assert_eq!(last.user_ns + last.system_ns, 2000);
        assert!(last.user_ns >= 700 && last.system_ns >= 500);
    }

    #[test]
    fn huge_values_do_not_overflow() {
        let mut split = CpuSplit::default();
        let total = u64::MAX / 2;
        let parts = split.update(total, u64::MAX / 3, u64::MAX / 3);
        assert_eq!(parts.user_ns + parts.system_ns, total);
    }
}
