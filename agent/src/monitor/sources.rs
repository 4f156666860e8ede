//! Where each counted resource comes from: its eBPF program where that loads on this
//! kernel, else the container's cgroup files (and `/proc/<pid>/net/dev` for network).

pub use crate::config::Resource;

/// How a resource is being counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    Ebpf,
    CgroupFiles,
}

impl Source {
    pub fn as_str(self) -> &'static str {
        match self {
            Source::Ebpf => "ebpf",
            Source::CgroupFiles => "cgroup-files",
        }
    }
}

/// The source of every resource; cgroup files until an eBPF program is running for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sources([Source; Resource::ALL.len()]);

impl Default for Sources {
    fn default() -> Self {
        Sources([Source::CgroupFiles; Resource::ALL.len()])
    }
}

impl Sources {
    pub fn get(&self, resource: Resource) -> Source {
        self.0[resource as usize]
    }

    pub fn set(&mut self, resource: Resource, source: Source) {
        self.0[resource as usize] = source;
    }

    pub fn ebpf(&self, resource: Resource) -> bool {
        self.get(resource) == Source::Ebpf
    }

    /// Whether any resource needs the eBPF counters of a container's cgroup.
    pub fn any_ebpf(&self) -> bool {
        self.0.contains(&Source::Ebpf)
    }

    pub fn iter(&self) -> impl Iterator<Item = (Resource, Source)> + '_ {
        Resource::ALL.into_iter().map(|resource| (resource, self.get(resource)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_resource_starts_on_cgroup_files() {
        let mut sources = Sources::default();
        assert!(!sources.any_ebpf());
        sources.set(Resource::BlockIo, Source::Ebpf);
        assert!(sources.ebpf(Resource::BlockIo));
        assert!(!sources.ebpf(Resource::Cpu));
        assert_eq!(sources.iter().filter(|(_, s)| *s == Source::Ebpf).count(), 1);
    }

    #[test]
    fn resources_have_kebab_case_names() {
        let parsed: Vec<Resource> = serde_json::from_str(r#"["cpu","network","block-io","oom"]"#).expect("parses");
        assert_eq!(parsed, Resource::ALL);
        assert!(serde_json::from_str::<Resource>(r#""disk""#).is_err());
    }
}
