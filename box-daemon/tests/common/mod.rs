//! Shared set-up for the box daemon's integration tests: real images, real hive-cell, real
//! namespaces, cgroups, veths and nftables (these tests need root).
#![allow(dead_code)]
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use hive_box::backend::sandbox::{Sandbox, SandboxConfig};
use hive_box::net::BoxNet;
use hive_proto::v1::SizeClass;

/// The Debian base rootfs from deploy/images/build-images.sh (used as cell rootfs and build
/// image; the fresh hive-cell is bound over /sbin/hive-cell).
pub fn base_rootfs() -> PathBuf {
    if let Ok(p) = std::env::var("HIVE_BUILD_IMAGE") {
        return PathBuf::from(p);
    }
    let cache = std::env::var("HIVE_CACHE").unwrap_or_else(|_| "/var/cache/hive".into());
    let images = Path::new(&cache).join("images");
    let found = std::fs::read_dir(&images).ok().and_then(|entries| {
        entries
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().starts_with("base-"))
            .map(|e| e.path().join("rootfs"))
            .find(|p| p.join("usr/bin/git").exists())
    });
    found.unwrap_or_else(|| {
        panic!(
            "no build image: run `deploy/images/build-images.sh` (it caches under {}) or set HIVE_BUILD_IMAGE",
            images.display()
        )
    })
}

/// The hive-cell binary of this checkout (built on demand).
pub fn hive_cell() -> PathBuf {
    let exe = PathBuf::from(env!("CARGO_BIN_EXE_hive-box"));
    let bin = exe.parent().unwrap().join("hive-cell");
    let status = hive_testkit::cargo::nested_cargo()
        .args(["build", "-p", "hive-cell", "--bin", "hive-cell"])
        .status()
        .expect("run cargo build -p hive-cell");
    assert!(status.success(), "cargo build -p hive-cell failed");
    assert!(bin.exists(), "{} missing after build", bin.display());
    bin
}

pub struct TestBox {
    pub dir: tempfile::TempDir,
    pub sandbox: Arc<Sandbox>,
    pub net: BoxNet,
}

/// A sandbox backend with names unique to this test (table, subnet, cgroup parent).
pub fn sandbox(tag: &str, third_octet: u8) -> TestBox {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_test_writer()
        .try_init();
    let dir = tempfile::Builder::new()
        .prefix(&format!("hive-box-{tag}-"))
        .tempdir()
        .unwrap();
    let net = BoxNet {
        table: format!("hive_t_{tag}"),
        subnet: format!("100.96.{third_octet}.0/24").parse().unwrap(),
        blocked: vec![],
    };
    net.setup().expect("load nftables table");
    let image = base_rootfs();
    let mut cell_env = BTreeMap::new();
    cell_env.insert("RUST_LOG".into(), "info".into());
    let sandbox = Sandbox::new(SandboxConfig {
        data_dir: dir.path().to_path_buf(),
        cell_rootfs: image.clone(),
        build_image: image,
        cell_binary: Some(hive_cell()),
        jail_helper: PathBuf::from(env!("CARGO_BIN_EXE_hive-box")),
        cgroup_parent: format!("hive-test-{tag}"),
        net: net.clone(),
        cell_env,
        // A range of its own per test box (distinct third octets), far from derived ones.
        cell_uid_base: 0x2000_0000 + u32::from(third_octet) * (1 << 22),
    })
    .expect("sandbox backend");
    TestBox {
        dir,
        sandbox: Arc::new(sandbox),
        net,
    }
}

impl Drop for TestBox {
    /// Even when a test fails half-way, leave no cell behind (the reaper finds them on disk).
    fn drop(&mut self) {
        let sandbox = Arc::clone(&self.sandbox);
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(hive_box::reaper::reap(sandbox.as_ref()));
        })
        .join();
        self.sandbox
            .cgroups()
            .remove_parent(&self.sandbox.config().cgroup_parent);
        let _ = self.net.teardown();
    }
}

pub fn small() -> SizeClass {
    SizeClass {
        name: "small".into(),
        vcpus: 1,
        memory_mib: 512,
        pids_max: 256,
        ..Default::default()
    }
}
