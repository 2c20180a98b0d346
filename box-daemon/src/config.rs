//! Box daemon configuration: flags/env parsed by clap in `main`, checked here into typed errors.
//!
//! Size class shapes come from the control plane on registration; until then (and for classes it
//! does not define) the built-in shapes below are used so the pool can start booting at once.
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use hive_proto::v1::SizeClass;

use crate::backend::microvm::{GuestFiles, BUILD_IMAGES_CMD, BUILD_KERNEL_CMD};
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
    #[error("the microvm backend needs the {what}: pass {flag} ({env}); {build} builds it")]
    GuestFileUnset {
        what: &'static str,
        flag: &'static str,
        env: &'static str,
        build: &'static str,
    },
    #[error("{what} {path}: no such file; {build} builds it (or point {flag} at one)")]
    GuestFileMissing {
        what: &'static str,
        flag: &'static str,
        path: PathBuf,
        build: &'static str,
    },
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

/// The microvm backend's guest files from the three flags. The kernel may be given as the
/// directory `build-kernel.sh` prints (`HIVE_GUEST_KERNEL=<dir>`), meaning `<dir>/vmlinux`.
pub fn guest_files(
    kernel: Option<&Path>,
    rootfs_disk: Option<&Path>,
    build_disk: Option<&Path>,
) -> Result<GuestFiles, ConfigError> {
    let kernel = kernel.map(|k| {
        if k.is_dir() {
            k.join("vmlinux")
        } else {
            k.to_path_buf()
        }
    });
    let check = |p: Option<PathBuf>,
                 what: &'static str,
                 flag: &'static str,
                 env: &'static str,
                 build: &'static str| {
        let path = p.ok_or(ConfigError::GuestFileUnset {
            what,
            flag,
            env,
            build,
        })?;
        if path.is_file() {
            // Absolute: the path becomes a bind source for a jail started elsewhere.
            Ok(std::fs::canonicalize(&path).unwrap_or(path))
        } else {
            Err(ConfigError::GuestFileMissing {
                what,
                flag,
                path,
                build,
            })
        }
    };
    Ok(GuestFiles {
        kernel: check(
            kernel,
            "guest kernel",
            "--guest-kernel",
            "HIVE_GUEST_KERNEL",
            BUILD_KERNEL_CMD,
        )?,
        rootfs_disk: check(
            rootfs_disk.map(Path::to_path_buf),
            "cell rootfs disk image",
            "--guest-rootfs-disk",
            "HIVE_CELL_ROOTFS_DISK",
            BUILD_IMAGES_CMD,
        )?,
        build_disk: check(
            build_disk.map(Path::to_path_buf),
            "build image disk",
            "--build-image-disk",
            "HIVE_BUILD_IMAGE_DISK",
            BUILD_IMAGES_CMD,
        )?,
    })
}

/// The shape of class `name` until the control plane says otherwise: the shared built-in one
/// (`hive_types::sizeclass`), or for a class only the control plane's file defines, the default
/// class's shape under that name.
pub fn builtin_shape(name: &str) -> SizeClass {
    let c = hive_types::sizeclass::builtin(name)
        .or_else(|| hive_types::sizeclass::builtin(hive_types::DEFAULT_CLASS))
        .expect("the default size class is built in");
    SizeClass::from_spec(name, c)
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
    fn guest_files_name_the_missing_file_and_its_build() {
        let dir = tempfile::tempdir().unwrap();
        for f in ["vmlinux", "root.ext4", "build.ext4"] {
            std::fs::write(dir.path().join(f), b"x").unwrap();
        }
        let p = |f: &str| dir.path().join(f);
        // The kernel as build-kernel.sh's directory.
        let ok = guest_files(
            Some(dir.path()),
            Some(&p("root.ext4")),
            Some(&p("build.ext4")),
        )
        .unwrap();
        assert_eq!(ok.kernel, p("vmlinux"));
        let e = guest_files(
            Some(&p("nope")),
            Some(&p("root.ext4")),
            Some(&p("build.ext4")),
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("guest kernel") && e.contains("nope") && e.contains(BUILD_KERNEL_CMD),
            "{e}"
        );
        let e = guest_files(Some(&p("vmlinux")), None, Some(&p("build.ext4")))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("--guest-rootfs-disk")
                && e.contains("HIVE_CELL_ROOTFS_DISK")
                && e.contains(BUILD_IMAGES_CMD),
            "{e}"
        );
        let e = guest_files(
            Some(&p("vmlinux")),
            Some(&p("root.ext4")),
            Some(&p("gone.ext4")),
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("build image disk") && e.contains("gone.ext4"),
            "{e}"
        );
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
