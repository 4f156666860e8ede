//! The kernel's user: the uid, group and supplementary groups the agent hands over in
//! `LOCAL_USER_ID`, `LOCAL_GROUP_ID` and `ADDITIONAL_GIDS` (Backend.AI's names, which its
//! images' entrypoints honour the same way). The user's processes (the interpreter, batch and
//! startup commands, services, the bootstrap script) run as that user; the runner stays root.

use std::{collections::BTreeMap, io, path::Path};

/// Who the user's processes run as; all `None`/empty means unchanged (root).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KernelUser {
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub groups: Vec<u32>,
}

impl KernelUser {
    /// From the kernel's environment; ids that do not parse are left out (with a warning).
    pub fn from_env(env: &BTreeMap<String, String>) -> KernelUser {
        let id = |key: &str| {
            let value = env.get(key)?;
            match value.trim().parse::<u32>() {
                Ok(id) => Some(id),
                Err(_) => {
                    tracing::warn!(key, value, "not a user or group id; ignored");
                    None
                }
            }
        };
        let groups = env
            .get("ADDITIONAL_GIDS")
            .map(|listed| listed.split(',').filter_map(|gid| gid.trim().parse().ok()).collect())
            .unwrap_or_default();
        KernelUser { uid: id("LOCAL_USER_ID"), gid: id("LOCAL_GROUP_ID"), groups }
    }

    pub fn is_unchanged(&self) -> bool {
        self.uid.is_none() && self.gid.is_none() && self.groups.is_empty()
    }

    /// Hands `dir` (not what is in it) to the user, so its processes can write there.
    pub fn own(&self, dir: &Path) -> io::Result<()> {
        if self.uid.is_none() && self.gid.is_none() {
            return Ok(());
        }
        std::os::unix::fs::chown(dir, self.uid, self.gid)
    }

    /// Makes `cmd`'s process drop to the user before it execs: supplementary groups, then the
    /// group, then the user (the order in which root can still do each).
    pub fn apply(&self, cmd: &mut tokio::process::Command) {
        if self.is_unchanged() {
            return;
        }
        let (uid, gid) = (self.uid, self.gid);
        // Built here, in the parent: nothing may allocate between fork and exec.
        let groups: Vec<libc::gid_t> = self.groups.iter().copied().chain(gid).collect();
        // SAFETY: only setgroups, setgid and setuid run in the child, all async-signal-safe,
        // on a list allocated before the fork.
        unsafe {
            cmd.pre_exec(move || {
                if (!groups.is_empty() || uid.is_some()) && libc::setgroups(groups.len(), groups.as_ptr()) != 0 {
                    return Err(io::Error::last_os_error());
                }
                if let Some(gid) = gid
                    && libc::setgid(gid) != 0
                {
                    return Err(io::Error::last_os_error());
                }
                if let Some(uid) = uid
                    && libc::setuid(uid) != 0
                {
                    return Err(io::Error::last_os_error());
                }
                Ok(())
            });
        }
    }
}

/// [`KernelUser::apply`] for the user named in `env`.
pub fn apply(cmd: &mut tokio::process::Command, env: &BTreeMap<String, String>) {
    KernelUser::from_env(env).apply(cmd);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect()
    }

    #[test]
    fn the_user_comes_from_backend_ais_variables() {
        let user = KernelUser::from_env(&env(&[
            ("LOCAL_USER_ID", "1234"),
            ("LOCAL_GROUP_ID", "2345"),
            ("ADDITIONAL_GIDS", "3456, 7"),
        ]));
        assert_eq!(user, KernelUser { uid: Some(1234), gid: Some(2345), groups: vec![3456, 7] });
        assert!(KernelUser::from_env(&env(&[])).is_unchanged());
        assert_eq!(KernelUser::from_env(&env(&[("LOCAL_USER_ID", "-1")])).uid, None);
    }

    /// Needs root (as the runner has in a container): the child really runs as the user.
    #[tokio::test]
    async fn a_process_runs_as_the_user() {
        // SAFETY: geteuid cannot fail.
        if unsafe { libc::geteuid() } != 0 {
            panic!("this test needs root (the integration suite runs as root)");
        }
        let vars = env(&[("LOCAL_USER_ID", "4321"), ("LOCAL_GROUP_ID", "5432"), ("ADDITIONAL_GIDS", "6543")]);
        let mut cmd = tokio::process::Command::new("/bin/sh");
        cmd.args(["-c", "echo $(id -u) $(id -g) $(id -G)"]);
        apply(&mut cmd, &vars);
        let out = cmd.output().await.expect("runs");
        let text = String::from_utf8_lossy(&out.stdout);
        let fields: Vec<&str> = text.split_whitespace().collect();
        assert_eq!(&fields[..2], ["4321", "5432"], "{text}");
        assert!(fields[2..].contains(&"6543") && fields[2..].contains(&"5432"), "{text}");
    }
}
