//! Size classes: the named cell shapes (vCPUs, memory, disk, rate limits, pids) the control plane
//! hands to boxes in `Registered` and to each `Assignment`. The built-in ones are
//! `hive_types::sizeclass::BUILTIN` (`small`, the default for projects, and `large`), which the
//! boxes start from too; an operator file (`--size-classes FILE`) adds or overrides them.

use std::collections::BTreeMap;
use std::path::Path;

use hive_proto::v1::SizeClass;
use serde::Deserialize;

pub use hive_types::DEFAULT_CLASS;

/// Errors loading or checking size classes.
#[derive(Debug, thiserror::Error)]
pub enum SizeClassError {
    #[error("read size class file {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("parse size class file {path}: {source}")]
    Parse {
        path: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("size class {name:?}: {problem}")]
    Invalid { name: String, problem: String },
    #[error("size class {name:?} unknown (known: {known})")]
    Unknown { name: String, known: String },
}

/// The `--size-classes` file: `{"size_classes": [{"name": "xl", "vcpus": 16, ...}]}`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SizeClassFile {
    pub size_classes: Vec<SizeClassConfig>,
}

/// One class as written in the file. Rate limits default to 0 (unlimited).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SizeClassConfig {
    pub name: String,
    pub vcpus: u32,
    pub memory_mib: u64,
    pub disk_mib: u64,
    #[serde(default)]
    pub net_bytes_per_sec: u64,
    #[serde(default)]
    pub disk_bytes_per_sec: u64,
    #[serde(default)]
    pub disk_ops_per_sec: u64,
    #[serde(default = "default_pids_max")]
    pub pids_max: u32,
}

fn default_pids_max() -> u32 {
    1024
}

impl SizeClassConfig {
    /// Checks the shape is one a box could actually boot.
    pub fn validate(&self) -> Result<(), SizeClassError> {
        let bad = |problem: &str| {
            Err(SizeClassError::Invalid {
                name: self.name.clone(),
                problem: problem.to_string(),
            })
        };
        if self.name.is_empty()
            || self.name.len() > 32
            || !self
                .name
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        {
            return bad("name must be 1-32 characters of a-z, 0-9, '-'");
        }
        if !(1..=256).contains(&self.vcpus) {
            return bad("vcpus must be 1..=256");
        }
        if self.memory_mib < 128 {
            return bad("memory_mib must be at least 128");
        }
        if self.disk_mib < 256 {
            return bad("disk_mib must be at least 256");
        }
        if self.pids_max < 16 {
            return bad("pids_max must be at least 16");
        }
        Ok(())
    }

    fn to_proto(&self) -> SizeClass {
        SizeClass {
            name: self.name.clone(),
            vcpus: self.vcpus,
            memory_mib: self.memory_mib,
            disk_mib: self.disk_mib,
            net_bytes_per_sec: self.net_bytes_per_sec,
            disk_bytes_per_sec: self.disk_bytes_per_sec,
            disk_ops_per_sec: self.disk_ops_per_sec,
            pids_max: self.pids_max,
        }
    }
}

/// The set of classes this control plane knows, by name.
#[derive(Debug, Clone)]
pub struct SizeClasses {
    classes: BTreeMap<String, SizeClass>,
}

impl SizeClasses {
    /// The built-in classes (`hive_types::sizeclass::BUILTIN`).
    pub fn builtin() -> Self {
        let classes = hive_types::sizeclass::BUILTIN
            .iter()
            .map(|c| (c.name.to_string(), SizeClass::from_spec(c.name, c)))
            .collect();
        SizeClasses { classes }
    }

    /// The built-in classes plus (overridden by) the given ones, each validated.
    pub fn with_overrides(extra: &[SizeClassConfig]) -> Result<Self, SizeClassError> {
        let mut set = Self::builtin();
        for c in extra {
            c.validate()?;
            set.classes.insert(c.name.clone(), c.to_proto());
        }
        Ok(set)
    }

    /// Loads a `--size-classes` JSON file on top of the built-in classes.
    pub fn load(path: &Path) -> Result<Self, SizeClassError> {
        let shown = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| SizeClassError::Read {
            path: shown.clone(),
            source,
        })?;
        let file: SizeClassFile =
            serde_json::from_str(&text).map_err(|source| SizeClassError::Parse {
                path: shown,
                source,
            })?;
        Self::with_overrides(&file.size_classes)
    }

    /// The class called `name`, or an error listing the known ones.
    pub fn get(&self, name: &str) -> Result<&SizeClass, SizeClassError> {
        self.classes
            .get(name)
            .ok_or_else(|| SizeClassError::Unknown {
                name: name.to_string(),
                known: self.names().join(", "),
            })
    }

    /// How many classes there are.
    pub fn len(&self) -> usize {
        self.classes.len()
    }

    /// Whether there are none (never, once built: the built-ins are always there).
    pub fn is_empty(&self) -> bool {
        self.classes.is_empty()
    }

    /// Names in a stable order, built-ins first when nothing overrides the order.
    pub fn names(&self) -> Vec<String> {
        let mut names: Vec<String> = self.classes.keys().cloned().collect();
        // Show the two built-ins first: it reads better in errors ("known: small, large, xl").
        names.sort_by_key(|n| match n.as_str() {
            "small" => (0, String::new()),
            "large" => (1, String::new()),
            other => (2, other.to_string()),
        });
        names
    }

    /// Every class, in the order of [`SizeClasses::names`].
    pub fn all(&self) -> Vec<SizeClass> {
        self.names()
            .iter()
            .filter_map(|n| self.classes.get(n).cloned())
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builtins_and_unknown_names_the_known() {
        let set = SizeClasses::builtin();
        assert_eq!(set.get("small").unwrap().vcpus, 2);
        assert_eq!(set.get("large").unwrap().memory_mib, 16384);
        let err = set.get("huge").unwrap_err().to_string();
        assert_eq!(err, "size class \"huge\" unknown (known: small, large)");
    }

    #[test]
    fn file_adds_and_overrides_and_rejects_bad() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("classes.json");
        std::fs::write(
            &path,
            r#"{"size_classes":[{"name":"xl","vcpus":16,"memory_mib":32768,"disk_mib":102400},
                {"name":"small","vcpus":1,"memory_mib":1024,"disk_mib":4096,"pids_max":512}]}"#,
        )
        .unwrap();
        let set = SizeClasses::load(&path).unwrap();
        assert_eq!(set.names(), vec!["small", "large", "xl"]);
        assert_eq!(set.get("small").unwrap().vcpus, 1);
        assert_eq!(set.get("xl").unwrap().pids_max, 1024);

        std::fs::write(
            &path,
            r#"{"size_classes":[{"name":"x","vcpus":0,"memory_mib":1024,"disk_mib":4096}]}"#,
        )
        .unwrap();
        let err = SizeClasses::load(&path).unwrap_err().to_string();
        assert!(err.contains("vcpus must be"), "{err}");

        std::fs::write(&path, r#"{"size_classes":[],"extra":1}"#).unwrap();
        let err = SizeClasses::load(&path).unwrap_err().to_string();
        assert!(err.contains("unknown field"), "{err}");
    }
}
