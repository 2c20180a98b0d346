//! The built-in size classes: the one definition the control plane sends to boxes at
//! registration and a box uses until then (and for a class the control plane does not name).
//! An operator's `--size-classes` file on the control plane adds or overrides classes; boxes
//! adopt what it sends.

/// One cell shape. Rate limits of 0 mean unlimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SizeClassSpec {
    pub name: &'static str,
    pub vcpus: u32,
    pub memory_mib: u64,
    pub disk_mib: u64,
    pub net_bytes_per_sec: u64,
    pub disk_bytes_per_sec: u64,
    pub disk_ops_per_sec: u64,
    pub pids_max: u32,
}

/// The class a project gets when it names none.
pub const DEFAULT_CLASS: &str = "small";

/// `small` (2 vCPU, 2 GiB, 10 GiB disk) and `large` (8 vCPU, 16 GiB, 50 GiB disk).
pub const BUILTIN: [SizeClassSpec; 2] = [
    SizeClassSpec {
        name: "small",
        vcpus: 2,
        memory_mib: 2048,
        disk_mib: 10240,
        net_bytes_per_sec: 12_500_000, // 100 Mbit/s
        disk_bytes_per_sec: 100 << 20,
        disk_ops_per_sec: 2000,
        pids_max: 1024,
    },
    SizeClassSpec {
        name: "large",
        vcpus: 8,
        memory_mib: 16384,
        disk_mib: 51200,
        net_bytes_per_sec: 125_000_000, // 1 Gbit/s
        disk_bytes_per_sec: 400 << 20,
        disk_ops_per_sec: 8000,
        pids_max: 4096,
    },
];

/// The built-in class called `name`.
pub fn builtin(name: &str) -> Option<&'static SizeClassSpec> {
    BUILTIN.iter().find(|c| c.name == name)
}

#[cfg(test)]
mod tests {
    #[test]
    fn default_class_is_built_in() {
        assert!(super::builtin(super::DEFAULT_CLASS).is_some());
        assert!(super::builtin("medium").is_none());
    }
}
