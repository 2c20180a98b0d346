//! Shared helpers for Hive's end-to-end tests (real processes, real servers).
pub mod chaos;
pub mod cluster;
pub mod controlplane;
pub mod github;
pub mod kvmhost;
pub mod pgserver;
pub mod privnet;

/// How many run ids there are: the suites derive names, subnets and addresses from them
/// (198.18.<1+id>.x test hosts, box subnets <id * 20 + n>), sized for twelve.
pub const RUN_IDS: u32 = 12;

/// This process's run id, in 0..[`RUN_IDS`], held by no other running test process: every
/// suite derives its network namespace names, subnets and addresses from it, so two tests
/// that run at once (nextest runs each test in a process of its own) never share one. The id
/// is an exclusive `flock` on `/tmp/hive-test-run-<id>.lock`, held until the process exits
/// (the kernel drops it even on `kill -9`); with all of them held, this waits for one.
pub fn run_id() -> u32 {
    static ID: std::sync::OnceLock<u32> = std::sync::OnceLock::new();
    *ID.get_or_init(|| {
        use nix::fcntl::{Flock, FlockArg};
        let start = std::process::id() % RUN_IDS;
        let t0 = std::time::Instant::now();
        loop {
            for i in 0..RUN_IDS {
                let id = (start + i) % RUN_IDS;
                let path = format!("/tmp/hive-test-run-{id}.lock");
                let file = std::fs::OpenOptions::new()
                    .create(true)
                    .truncate(false)
                    .write(true)
                    .open(&path)
                    .unwrap_or_else(|e| panic!("run id lock {path}: {e}"));
                if let Ok(lock) = Flock::lock(file, FlockArg::LockExclusiveNonblock) {
                    // Held for the life of the process.
                    std::mem::forget(lock);
                    return id;
                }
            }
            assert!(
                t0.elapsed() < std::time::Duration::from_secs(1800),
                "all {RUN_IDS} test run ids stayed taken for 30 minutes (/tmp/hive-test-run-*.lock)"
            );
            std::thread::sleep(std::time::Duration::from_millis(200));
        }
    })
}
