//! Box daemon configuration: flags/env parsed by clap in `main`, checked here into typed errors.
//!
//! Size class shapes come from the control plane on registration; until then (and for classes it
//! does not define) the built-in shapes below are used so the pool can start booting at once.
use std::collections::BTreeMap;
use std::str::FromStr;

use hive_proto::v1::SizeClass;

use crate::pool::ClassConfig;

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum ConfigError {
    #[error("{flag} {value:?}: expected CLASS=N (e.g. small=2)")]
    ClassCount { flag: &'static str, value: String },
    #[error("{flag} {value:?}: class name must be 1..=32 characters of a-z, 0-9, '-' or '_'")]
    ClassName { flag: &'static str, value: String },
    #[error("--capacity {class}={capacity} is below its --pool target {target}")]
    CapacityBelowTarget {
        class: String,
        capacity: u32,
        target: u32,
    },
    #[error("--capacity names class {0:?} which has no --pool entry")]
    CapacityWithoutPool(String),
    #[error("no --pool given: the box needs at least one size class (e.g. --pool small=2)")]
    NoPool,
    #[error("unknown backend {0:?}: expected auto, microvm or sandbox")]
    Backend(String),
}

/// `CLASS=N` as given to `--pool` and `--capacity`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClassCount {
    pub class: String,
    pub count: u32,
}

impl FromStr for ClassCount {
    type Err = ConfigError;
    fn from_str(s: &str) -> Result<Self, ConfigError> {
        parse_class_count("--pool/--capacity", s)
    }
}

fn parse_class_count(flag: &'static str, s: &str) -> Result<ClassCount, ConfigError> {
    let (class, n) = s.split_once('=').ok_or(ConfigError::ClassCount {
        flag,
        value: s.to_string(),
    })?;
    let count = n
        .trim()
        .parse::<u32>()
        .map_err(|_| ConfigError::ClassCount {
            flag,
            value: s.to_string(),
        })?;
    let class = class.trim();
    if class.is_empty()
        || class.len() > 32
        || !class
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
    {
        return Err(ConfigError::ClassName {
            flag,
            value: s.to_string(),
        });
    }
    Ok(ClassCount {
        class: class.to_string(),
        count,
    })
}

/// Which cell backend to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackendChoice {
    Auto,
    Microvm,
    Sandbox,
}

impl FromStr for BackendChoice {
    type Err = ConfigError;
    fn from_str(s: &str) -> Result<Self, ConfigError> {
        match s {
            "auto" => Ok(BackendChoice::Auto),
            "microvm" => Ok(BackendChoice::Microvm),
            "sandbox" => Ok(BackendChoice::Sandbox),
            _ => Err(ConfigError::Backend(s.to_string())),
        }
    }
}

/// Built-in shapes (used until the control plane says otherwise).
pub fn builtin_shape(name: &str) -> SizeClass {
    let (vcpus, memory_mib, pids_max) = match name {
        "large" => (4, 8192, 4096),
        "medium" => (2, 4096, 2048),
        _ => (1, 2048, 1024),
    };
    SizeClass {
        name: name.to_string(),
        vcpus,
        memory_mib,
        disk_mib: 10 * 1024,
        pids_max,
        ..Default::default()
    }
}

/// Turns `--pool` and `--capacity` into class configs. Capacity defaults to twice the target
/// plus one, so a burst can cold-start a few cells beyond the warm ones.
pub fn classes(
    pool: &[ClassCount],
    capacity: &[ClassCount],
) -> Result<Vec<ClassConfig>, ConfigError> {
    if pool.is_empty() {
        return Err(ConfigError::NoPool);
    }
    let mut out: BTreeMap<String, ClassConfig> = BTreeMap::new();
    for p in pool {
        out.insert(
            p.class.clone(),
            ClassConfig {
                size: builtin_shape(&p.class),
                target: p.count,
                capacity: p.count * 2 + 1,
            },
        );
    }
    for c in capacity {
        let cfg = out
            .get_mut(&c.class)
            .ok_or_else(|| ConfigError::CapacityWithoutPool(c.class.clone()))?;
        if c.count < cfg.target {
            return Err(ConfigError::CapacityBelowTarget {
                class: c.class.clone(),
                capacity: c.count,
                target: cfg.target,
            });
        }
        cfg.capacity = c.count;
    }
    Ok(out.into_values().collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_class_counts() {
        assert_eq!(
            "small=2".parse::<ClassCount>().unwrap(),
            ClassCount {
                class: "small".into(),
                count: 2
            }
        );
        for bad in ["small", "small=x", "=2", "Sm all=1", "small=-1"] {
            let e = bad.parse::<ClassCount>().unwrap_err().to_string();
            assert!(e.contains(bad), "{e}");
        }
    }

    #[test]
    fn capacity_defaults_and_checks() {
        let pool = vec!["small=2".parse().unwrap()];
        let c = classes(&pool, &[]).unwrap();
        assert_eq!((c[0].target, c[0].capacity), (2, 5));
        let c = classes(&pool, &["small=8".parse().unwrap()]).unwrap();
        assert_eq!(c[0].capacity, 8);
        assert_eq!(
            classes(&pool, &["small=1".parse().unwrap()]).unwrap_err(),
            ConfigError::CapacityBelowTarget {
                class: "small".into(),
                capacity: 1,
                target: 2
            }
        );
        assert!(classes(&pool, &["large=1".parse().unwrap()]).is_err());
        assert_eq!(classes(&[], &[]).unwrap_err(), ConfigError::NoPool);
    }

    #[test]
    fn backend_choice() {
        assert_eq!(
            "auto".parse::<BackendChoice>().unwrap(),
            BackendChoice::Auto
        );
        assert!("kvm"
            .parse::<BackendChoice>()
            .unwrap_err()
            .to_string()
            .contains("kvm"));
    }
}
