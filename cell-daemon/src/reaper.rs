//! The one place that calls `waitpid`. As PID 1 the daemon inherits every orphan in the cell, so it
//! must reap with `waitpid(-1)`; doing that next to per-child waits would steal their exit statuses.
//! Instead this single reaper collects every status on SIGCHLD and hands it to whoever registered
//! the pid at spawn time; statuses nobody asked for (orphans) are simply discarded.
//!
//! Children must therefore be spawned through [`Reaper::spawn`] and never `wait()`ed directly
//! (and nothing in this process uses `tokio::process`, which would reap on its own).

use nix::errno::Errno;
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use std::collections::HashMap;
use std::process::{Child, Command};
use std::sync::{Arc, Mutex};
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::oneshot;

/// How a child ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    Code(i32),
    Signal(i32),
}

impl Exit {
    /// Shell convention: a signal death reads as 128 + signal number.
    pub fn code(self) -> i32 {
        match self {
            Exit::Code(c) => c,
            Exit::Signal(s) => 128 + s,
        }
    }
}

impl std::fmt::Display for Exit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Exit::Code(c) => write!(f, "exit code {c}"),
            Exit::Signal(s) => write!(f, "signal {s}"),
        }
    }
}

/// Errors starting the reaper.
#[derive(Debug, thiserror::Error)]
pub enum ReaperError {
    #[error("install SIGCHLD handler")]
    Signal(#[source] std::io::Error),
    #[error("a reaper already runs in this process (there must be one waitpid(-1) caller)")]
    AlreadyRunning,
}

static STARTED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Dispatches child exit statuses to waiters by pid.
#[derive(Debug, Default)]
pub struct Reaper {
    waiters: Mutex<HashMap<i32, oneshot::Sender<Exit>>>,
}

impl Reaper {
    /// Starts the SIGCHLD loop on the current tokio runtime.
    pub fn start() -> Result<Arc<Self>, ReaperError> {
        if STARTED.swap(true, std::sync::atomic::Ordering::SeqCst) {
            return Err(ReaperError::AlreadyRunning);
        }
        let mut sigchld = signal(SignalKind::child()).map_err(ReaperError::Signal)?;
        let reaper = Arc::new(Reaper::default());
        let r = reaper.clone();
        tokio::spawn(async move {
            loop {
                r.reap_all();
                if sigchld.recv().await.is_none() {
                    return;
                }
            }
        });
        Ok(reaper)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<i32, oneshot::Sender<Exit>>> {
        self.waiters.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Spawns `cmd` and registers its pid before the lock is released, so the reaper cannot
    /// dispatch the exit before someone is listening for it.
    pub fn spawn(&self, cmd: &mut Command) -> std::io::Result<(Child, oneshot::Receiver<Exit>)> {
        let mut waiters = self.lock();
        let child = cmd.spawn()?;
        let (tx, rx) = oneshot::channel();
        waiters.insert(child.id() as i32, tx);
        Ok((child, rx))
    }

    /// Collects every exited child now.
    ///
    /// The lock is held across `waitpid`: a spawn in progress holds it too, so (a) its pid is
    /// registered before we can reap it, and (b) when its exec fails, std's own `waitpid` on
    /// the failed child runs while we wait, instead of finding the child already reaped (std
    /// panics then).
    fn reap_all(&self) {
        let mut waiters = self.lock();
        loop {
            let (pid, exit) = match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::Exited(pid, code)) => (pid, Exit::Code(code)),
                Ok(WaitStatus::Signaled(pid, sig, _)) => (pid, Exit::Signal(sig as i32)),
                Ok(WaitStatus::StillAlive) | Err(Errno::ECHILD) => return,
                Err(Errno::EINTR) => continue,
                Ok(_) => continue,
                Err(e) => {
                    tracing::warn!(error = %e, "waitpid failed");
                    return;
                }
            };
            if let Some(tx) = waiters.remove(&pid.as_raw()) {
                let _ = tx.send(exit);
            }
        }
    }
}

/// What a helper command printed and how it ended.
#[derive(Debug)]
pub struct Output {
    pub exit: Exit,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
}

/// Runs a short helper command (`ip`, `nft`) to completion, capturing its output.
pub async fn run(reaper: &Reaper, cmd: &mut Command) -> std::io::Result<Output> {
    use std::process::Stdio;
    use tokio::io::AsyncReadExt;
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let (mut child, exited) = reaper.spawn(cmd)?;
    let mut out = crate::container::pipe_reader(child.stdout.take())?;
    let mut err = crate::container::pipe_reader(child.stderr.take())?;
    let (mut stdout, mut stderr) = (Vec::new(), Vec::new());
    let (a, b) = tokio::join!(out.read_to_end(&mut stdout), err.read_to_end(&mut stderr));
    a?;
    b?;
    let exit = exited
        .await
        .map_err(|_| std::io::Error::other("reaper stopped"))?;
    Ok(Output {
        exit,
        stdout,
        stderr,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    // One test only: two reapers in one process would steal each other's children.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn exit_statuses_reach_their_waiters() {
        let reaper = Reaper::start().unwrap();
        assert!(matches!(Reaper::start(), Err(ReaperError::AlreadyRunning)));
        let mut rxs = Vec::new();
        for code in [0, 3, 7] {
            let (_c, rx) = reaper
                .spawn(Command::new("/bin/sh").args(["-c", &format!("exit {code}")]))
                .unwrap();
            rxs.push((code, rx));
        }
        for (code, rx) in rxs {
            assert_eq!(rx.await.unwrap(), Exit::Code(code));
        }
        let (_c, rx) = reaper
            .spawn(Command::new("/bin/sh").args(["-c", "kill -9 $$"]))
            .unwrap();
        assert_eq!(rx.await.unwrap(), Exit::Signal(9));
        let out = run(
            &reaper,
            Command::new("/bin/sh").args(["-c", "echo hi; echo no >&2; exit 2"]),
        )
        .await
        .unwrap();
        assert_eq!(out.exit.code(), 2);
        assert_eq!(out.stdout, b"hi\n");
        assert_eq!(out.stderr, b"no\n");

        // Failed execs (std and glibc wait for those children themselves) are errors, not
        // panics, while the reaper is busy on other threads.
        let mut tasks = Vec::new();
        for _ in 0..4 {
            let r = reaper.clone();
            tasks.push(tokio::spawn(async move {
                for _ in 0..50 {
                    assert!(r.spawn(&mut Command::new("/nonexistent/hive-x")).is_err());
                    let (_c, rx) = r.spawn(&mut Command::new("/bin/true")).unwrap();
                    assert_eq!(rx.await.unwrap(), Exit::Code(0));
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
    }
}
