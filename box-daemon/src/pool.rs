//! The warm pool: per size class, cells booted ahead of demand up to a target count.
//!
//! A cell counts as warm once its cell daemon answered health. [`Pool::take`] hands out a warm
//! cell in O(1) (front of a queue) or, when none is warm and there is room, cold-starts one and
//! says so. [`Pool::release`] destroys a used cell (a cell runs one build only) and tops the class
//! up again; a periodic health check ([`Pool::check_health`]) replaces dead warm cells. Network
//! slots (/30s of the cell subnet) are handed out here so the backend stays stateless about them.
use std::collections::{BTreeSet, HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hive_proto::v1::{PoolState, SizeClass};
use hive_sys::Backoff;
use tokio::sync::Notify;

use crate::backend::{CellBackend, CellSpec};
use crate::cell::Cell;

#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    #[error("unknown size class {0:?} (this box serves: {1})")]
    UnknownClass(String, String),
    #[error(
        "no room for another {class} cell ({busy} busy, {booting} booting, capacity {capacity})"
    )]
    NoRoom {
        class: String,
        busy: u32,
        booting: u32,
        capacity: u32,
    },
    #[error("no free network slot for a new cell")]
    NoSlot,
    #[error("cold start of a {class} cell")]
    ColdStart {
        class: String,
        #[source]
        source: Box<crate::backend::BackendError>,
    },
    #[error("pool is shutting down")]
    ShuttingDown,
}

/// Target and capacity of one class.
#[derive(Debug, Clone, PartialEq)]
pub struct ClassConfig {
    pub size: SizeClass,
    pub target: u32,
    pub capacity: u32,
}

#[derive(Debug)]
struct Class {
    cfg: ClassConfig,
    warm: VecDeque<Cell>,
    booting: u32,
    busy: u32,
}

impl Class {
    fn total(&self) -> u32 {
        self.warm.len() as u32 + self.booting + self.busy
    }
}

#[derive(Debug)]
struct Inner {
    classes: HashMap<String, Class>,
    free_slots: BTreeSet<u32>,
    /// Slot of every live cell, by id.
    slots: HashMap<String, u32>,
    shutting_down: bool,
    /// Boot failures in a row (warm and cold), to back off instead of spinning on a broken
    /// image, and to say the box is unhealthy.
    failures: u32,
    /// Why the last boot failed, while `failures` > 0.
    last_failure: Option<String>,
}

/// Boots failing in a row: [`Pool::boot_failures`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BootFailures {
    /// Cell boots that failed since the last one that succeeded.
    pub in_a_row: u32,
    /// The last failure's error chain (bounded), when `in_a_row` > 0.
    pub last: Option<String>,
}

/// Characters kept of a boot error for [`BootFailures::last`].
const FAILURE_TEXT: usize = 1000;

/// Counters for the benchmark and logs.
#[derive(Debug, Default, Clone, Copy)]
pub struct PoolStats {
    pub booted: u64,
    pub boot_failures: u64,
    pub total_boot: Duration,
}

/// Pause before booting again after boot failures in a row, so a broken image does not spin.
const BOOT_BACKOFF: Backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));

/// Longest a warm cell's replacement waits for the build that took it to start. A boot is
/// ~100 ms of CPU; started at the take it ran beside the build's dispatch and, on a 2-core box,
/// tripled the time from assignment to the build's first line (p50 4.3 -> 1.4 ms, p99 11 ->
/// 5 ms with the boot deferred, 100 warm starts). The agent tops up sooner, as soon as the
/// control plane has stored the build's first line.
pub const REFILL_AFTER: Duration = Duration::from_millis(50);

/// Default time a warm cell has to answer its periodic health check.
pub const DEFAULT_HEALTH_TIMEOUT: Duration = Duration::from_secs(2);

pub struct Pool<B: CellBackend> {
    backend: Arc<B>,
    inner: Mutex<Inner>,
    stats: Mutex<PoolStats>,
    changed: Notify,
    /// Counts the changes that give the control plane more room than it can know of: a cell
    /// that became warm, a used cell released. The agent tells the control plane at once when
    /// this moved (`Pool::room_added`), rather than at its next heartbeat.
    room_added: AtomicU64,
    ready_timeout: Duration,
    /// How long a warm cell may take to answer a health check before it counts as dead.
    health_timeout: Duration,
}

impl<B: CellBackend> std::fmt::Debug for Pool<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool")
            .field("states", &self.states())
            .finish()
    }
}

impl<B: CellBackend> Pool<B> {
    pub fn new(
        backend: Arc<B>,
        classes: Vec<ClassConfig>,
        slots: u32,
        ready_timeout: Duration,
    ) -> Arc<Self> {
        Self::with_health_timeout(
            backend,
            classes,
            slots,
            ready_timeout,
            DEFAULT_HEALTH_TIMEOUT,
        )
    }

    /// As [`Pool::new`], with the warm cells' health-check timeout (slow hosts, such as an
    /// emulated KVM host, need more than the default).
    pub fn with_health_timeout(
        backend: Arc<B>,
        classes: Vec<ClassConfig>,
        slots: u32,
        ready_timeout: Duration,
        health_timeout: Duration,
    ) -> Arc<Self> {
        let classes = classes
            .into_iter()
            .map(|cfg| {
                (
                    cfg.size.name.clone(),
                    Class {
                        cfg,
                        warm: VecDeque::new(),
                        booting: 0,
                        busy: 0,
                    },
                )
            })
            .collect();
        Arc::new(Pool {
            backend,
            inner: Mutex::new(Inner {
                classes,
                free_slots: (0..slots).collect(),
                slots: HashMap::new(),
                shutting_down: false,
                failures: 0,
                last_failure: None,
            }),
            stats: Mutex::new(PoolStats::default()),
            changed: Notify::new(),
            room_added: AtomicU64::new(0),
            ready_timeout,
            health_timeout,
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn backend(&self) -> &Arc<B> {
        &self.backend
    }

    /// How many times a cell became warm or a used one was released (see `room_added`); the
    /// agent compares it with the count at its last heartbeat.
    pub fn room_added(&self) -> u64 {
        self.room_added.load(Ordering::Relaxed)
    }

    /// Resolves at the pool's next change (a boot ended, a cell taken or released).
    pub fn changed(&self) -> tokio::sync::futures::Notified<'_> {
        self.changed.notified()
    }

    pub fn stats(&self) -> PoolStats {
        *self.stats.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// How many cell boots failed since the last success, and why the last one did (the
    /// health endpoint turns this into "unhealthy").
    pub fn boot_failures(&self) -> BootFailures {
        let inner = self.lock();
        BootFailures {
            in_a_row: inner.failures,
            last: inner.last_failure.clone(),
        }
    }

    /// Adopts the shape of a class (the control plane's definition wins over the built-in one).
    /// Warm cells of the old shape are destroyed and booted again in the new one, and cells
    /// still booting in the old shape are destroyed when they come up, so a build always gets a
    /// cell of its class's current shape.
    pub fn set_shape(self: &Arc<Self>, size: &SizeClass) {
        let stale: Vec<Cell> = {
            let mut inner = self.lock();
            let Some(c) = inner.classes.get_mut(&size.name) else {
                return;
            };
            if c.cfg.size == *size {
                return;
            }
            c.cfg.size = size.clone();
            c.warm.drain(..).collect()
        };
        tracing::info!(class = %size.name, vcpus = size.vcpus, memory_mib = size.memory_mib, replaced = stale.len(), "size class shape adopted");
        let pool = Arc::clone(self);
        tokio::spawn(async move {
            for cell in stale {
                let _ = pool.backend.destroy(&cell.id).await;
                Self::free_slot(&mut pool.lock(), &cell.id);
            }
            pool.changed.notify_waiters();
            pool.top_up();
        });
    }

    /// The shape class `class` has now (tests, inspection).
    pub fn shape(&self, class: &str) -> Option<SizeClass> {
        self.lock().classes.get(class).map(|c| c.cfg.size.clone())
    }

    pub fn states(&self) -> Vec<PoolState> {
        let inner = self.lock();
        let mut v: Vec<PoolState> = inner
            .classes
            .values()
            .map(|c| PoolState {
                size_class: c.cfg.size.name.clone(),
                warm: c.warm.len() as u32,
                booting: c.booting,
                busy: c.busy,
                target: c.cfg.target,
                capacity: c.cfg.capacity,
            })
            .collect();
        v.sort_by(|a, b| a.size_class.cmp(&b.size_class));
        v
    }

    /// Ids of the warm cells (heartbeat, tests).
    pub fn warm_ids(&self) -> Vec<(String, String)> {
        let inner = self.lock();
        inner
            .classes
            .values()
            .flat_map(|c| {
                c.warm
                    .iter()
                    .map(|cell| (cell.id.clone(), cell.size_class.clone()))
            })
            .collect()
    }

    fn new_id() -> String {
        uuid::Uuid::new_v4().simple().to_string()[..12].to_string()
    }

    /// Reserves a slot and a booting place; an error when the class is full.
    fn reserve(inner: &mut Inner, class: &str) -> Result<CellSpec, PoolError> {
        let names = inner.classes.keys().cloned().collect::<Vec<_>>().join(", ");
        let c = inner
            .classes
            .get(class)
            .ok_or_else(|| PoolError::UnknownClass(class.to_string(), names))?;
        if c.total() >= c.cfg.capacity {
            return Err(PoolError::NoRoom {
                class: class.to_string(),
                busy: c.busy,
                booting: c.booting,
                capacity: c.cfg.capacity,
            });
        }
        let size = c.cfg.size.clone();
        let slot = inner.free_slots.pop_first().ok_or(PoolError::NoSlot)?;
        let id = Self::new_id();
        inner.slots.insert(id.clone(), slot);
        if let Some(c) = inner.classes.get_mut(class) {
            c.booting += 1;
        }
        Ok(CellSpec {
            id,
            size_class: size,
            slot,
        })
    }

    fn free_slot(inner: &mut Inner, id: &str) {
        if let Some(slot) = inner.slots.remove(id) {
            inner.free_slots.insert(slot);
        }
    }

    /// Boots one cell to ready. On failure everything it made is gone again.
    async fn boot(&self, spec: CellSpec) -> Result<Cell, crate::backend::BackendError> {
        let start = Instant::now();
        let id = spec.id.clone();
        let res = async {
            let mut cell = self.backend.create(spec).await?;
            self.backend.wait_ready(&cell, self.ready_timeout).await?;
            cell.boot_time = start.elapsed();
            Ok(cell)
        }
        .await;
        {
            let mut stats = self.stats.lock().unwrap_or_else(|p| p.into_inner());
            match &res {
                Ok(cell) => {
                    stats.booted += 1;
                    stats.total_boot += cell.boot_time;
                }
                Err(_) => stats.boot_failures += 1,
            }
        }
        {
            let mut inner = self.lock();
            match &res {
                Ok(_) => {
                    inner.failures = 0;
                    inner.last_failure = None;
                }
                Err(e) => {
                    inner.failures += 1;
                    inner.last_failure = Some(
                        hive_sys::error_chain(e)
                            .chars()
                            .take(FAILURE_TEXT)
                            .collect(),
                    );
                }
            }
        }
        if res.is_err() {
            let _ = self.backend.destroy(&id).await;
        }
        res
    }

    /// A cell for a build: warm if one is ready (O(1)), else cold-started. The bool is warm_start.
    /// At capacity with cells still booting, it waits for one of those rather than refuse.
    /// A warm cell's replacement starts at the caller's next [`Self::top_up`] (once the build
    /// has started) or after [`REFILL_AFTER`].
    pub async fn take(self: &Arc<Self>, class: &str) -> Result<(Cell, bool), PoolError> {
        let deadline = Instant::now() + self.ready_timeout;
        let spec = loop {
            let notified = self.changed.notified();
            {
                let mut inner = self.lock();
                if inner.shutting_down {
                    return Err(PoolError::ShuttingDown);
                }
                let names = inner.classes.keys().cloned().collect::<Vec<_>>().join(", ");
                let c = inner
                    .classes
                    .get_mut(class)
                    .ok_or_else(|| PoolError::UnknownClass(class.to_string(), names))?;
                if let Some(cell) = c.warm.pop_front() {
                    c.busy += 1;
                    drop(inner);
                    // The replacement boots once the taken cell's build has started (the
                    // caller tops up then), or after REFILL_AFTER, whichever is first.
                    let pool = Arc::clone(self);
                    tokio::spawn(async move {
                        tokio::time::sleep(REFILL_AFTER).await;
                        pool.top_up();
                    });
                    return Ok((cell, true));
                }
                match Self::reserve(&mut inner, class) {
                    Ok(spec) => break spec,
                    Err(PoolError::NoRoom { booting, .. })
                        if booting > 0 && Instant::now() < deadline => {}
                    Err(e) => return Err(e),
                }
            }
            let _ = tokio::time::timeout(Duration::from_millis(200), notified).await;
        };
        let id = spec.id.clone();
        let res = self.boot(spec).await;
        let mut inner = self.lock();
        if let Some(c) = inner.classes.get_mut(class) {
            c.booting -= 1;
        }
        match res {
            Ok(cell) => {
                if let Some(c) = inner.classes.get_mut(class) {
                    c.busy += 1;
                }
                Ok((cell, false))
            }
            Err(source) => {
                Self::free_slot(&mut inner, &id);
                Err(PoolError::ColdStart {
                    class: class.to_string(),
                    source: Box::new(source),
                })
            }
        }
    }

    /// Destroys a used cell and tops its class up.
    pub async fn release(self: &Arc<Self>, cell: Cell) {
        if let Err(e) = self.backend.destroy(&cell.id).await {
            tracing::warn!(cell = %cell.id, error = %hive_sys::error_chain(&e), "destroy cell");
        }
        {
            let mut inner = self.lock();
            Self::free_slot(&mut inner, &cell.id);
            if let Some(c) = inner.classes.get_mut(&cell.size_class) {
                c.busy = c.busy.saturating_sub(1);
            }
        }
        self.room_added.fetch_add(1, Ordering::Relaxed);
        self.changed.notify_waiters();
        self.top_up();
    }

    /// Starts boots until every class has warm + booting >= target (within capacity).
    pub fn top_up(self: &Arc<Self>) {
        let mut specs = Vec::new();
        {
            let mut inner = self.lock();
            if inner.shutting_down {
                return;
            }
            let names: Vec<String> = inner.classes.keys().cloned().collect();
            for name in names {
                loop {
                    let c = &inner.classes[&name];
                    if c.warm.len() as u32 + c.booting >= c.cfg.target {
                        break;
                    }
                    match Self::reserve(&mut inner, &name) {
                        Ok(spec) => specs.push((name.clone(), spec)),
                        Err(_) => break,
                    }
                }
            }
        }
        for (class, spec) in specs {
            let pool = Arc::clone(self);
            tokio::spawn(async move { pool.boot_warm(class, spec).await });
        }
    }

    async fn boot_warm(self: Arc<Self>, class: String, spec: CellSpec) {
        let id = spec.id.clone();
        let pause = BOOT_BACKOFF.after_failures(self.lock().failures);
        if !pause.is_zero() {
            tokio::time::sleep(pause).await;
        }
        let shape = spec.size_class.clone();
        let res = self.boot(spec).await;
        let mut retry = false;
        {
            let mut inner = self.lock();
            if let Some(c) = inner.classes.get_mut(&class) {
                c.booting -= 1;
            }
            match res {
                Ok(cell) => {
                    let reshaped = inner
                        .classes
                        .get(&class)
                        .is_some_and(|c| c.cfg.size != shape);
                    if inner.shutting_down || reshaped {
                        let pool = Arc::clone(&self);
                        Self::free_slot(&mut inner, &id);
                        tokio::spawn(async move {
                            let _ = pool.backend.destroy(&cell.id).await;
                        });
                    } else if let Some(c) = inner.classes.get_mut(&class) {
                        tracing::debug!(cell = %cell.id, class = %class, boot_ms = cell.boot_time.as_millis() as u64, "cell warm");
                        c.warm.push_back(cell);
                        self.room_added.fetch_add(1, Ordering::Relaxed);
                    }
                }
                Err(e) => {
                    Self::free_slot(&mut inner, &id);
                    tracing::warn!(class = %class, error = %hive_sys::error_chain(&e), failures = inner.failures, "warm cell failed to boot");
                    retry = true;
                }
            }
        }
        self.changed.notify_waiters();
        if retry || !self.lock().shutting_down {
            self.top_up();
        }
    }

    /// Probes every warm cell; dead ones are destroyed and replaced. Cells stay in the pool
    /// while probed, so a build arriving meanwhile still gets a warm cell.
    pub async fn check_health(self: &Arc<Self>) {
        let snapshot: Vec<Cell> = {
            let inner = self.lock();
            inner
                .classes
                .values()
                .flat_map(|c| c.warm.iter().cloned())
                .collect()
        };
        let mut dead = Vec::new();
        for cell in snapshot {
            let ok = self.backend.is_alive(&cell.id)
                && matches!(cell.health(self.health_timeout).await, Ok(true));
            if !ok {
                dead.push(cell.id);
            }
        }
        if dead.is_empty() {
            return;
        }
        let removed: Vec<Cell> = {
            let mut inner = self.lock();
            let mut removed = Vec::new();
            for c in inner.classes.values_mut() {
                // A cell taken by a build meanwhile is no longer here; that build will find out.
                let (gone, keep): (Vec<Cell>, Vec<Cell>) =
                    c.warm.drain(..).partition(|cell| dead.contains(&cell.id));
                c.warm = keep.into();
                removed.extend(gone);
            }
            removed
        };
        for cell in removed {
            tracing::warn!(cell = %cell.id, class = %cell.size_class, "warm cell failed its health check; replacing");
            let _ = self.backend.destroy(&cell.id).await;
            let mut inner = self.lock();
            Self::free_slot(&mut inner, &cell.id);
        }
        self.changed.notify_waiters();
        self.top_up();
    }

    /// Waits until `class` has at least `n` warm cells.
    pub async fn wait_warm(&self, class: &str, n: u32, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            let notified = self.changed.notified();
            let warm = self
                .lock()
                .classes
                .get(class)
                .map(|c| c.warm.len() as u32)
                .unwrap_or(0);
            if warm >= n {
                return true;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            let _ = tokio::time::timeout(left.min(Duration::from_millis(200)), notified).await;
        }
    }

    /// Stops topping up and destroys every warm cell (busy ones are released by their builds).
    pub async fn shutdown(self: &Arc<Self>) {
        let cells: Vec<Cell> = {
            let mut inner = self.lock();
            inner.shutting_down = true;
            inner
                .classes
                .values_mut()
                .flat_map(|c| c.warm.drain(..))
                .collect()
        };
        for cell in cells {
            let _ = self.backend.destroy(&cell.id).await;
            Self::free_slot(&mut self.lock(), &cell.id);
        }
        // Let cells that are still booting finish and be destroyed by their boot task.
        let deadline = Instant::now() + self.ready_timeout + Duration::from_secs(1);
        while Instant::now() < deadline && self.lock().classes.values().any(|c| c.booting > 0) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}
