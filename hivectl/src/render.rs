//! How hivectl shows things: aligned tables and relative times for people, stable JSON for
//! scripts (states as short names, times as both epoch milliseconds and ISO 8601 UTC).

use hive_proto::v1::{
    BoxInfo, BoxState, Build, BuildState, CellInfo, LogChunk, LogStream, Project, SizeClass,
    StateTransition,
};
use serde_json::{json, Value};

/// Left-aligned columns separated by two spaces; the last column is not padded.
pub fn table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (i, cell) in row.iter().enumerate() {
            if let Some(w) = widths.get_mut(i) {
                *w = (*w).max(cell.chars().count());
            }
        }
    }
    let mut out = String::new();
    let mut line = |cells: &mut dyn Iterator<Item = &str>| {
        let mut l = String::new();
        for (i, cell) in cells.enumerate() {
            if i > 0 {
                l.push_str("  ");
            }
            l.push_str(cell);
            if i + 1 < widths.len() {
                let pad = widths[i].saturating_sub(cell.chars().count());
                l.extend(std::iter::repeat_n(' ', pad));
            }
        }
        out.push_str(l.trim_end());
        out.push('\n');
    };
    line(&mut headers.iter().copied());
    for row in rows {
        line(&mut row.iter().map(String::as_str));
    }
    out
}

/// `2026-11-27T05:34:25Z`; empty for 0 (never).
pub fn iso(ms: i64) -> String {
    hive_types::time::iso(ms, 'T')
}

/// `12s ago`, `5m ago`, `3h ago`, `2d ago`; `-` for 0 (never).
pub fn ago(ms: i64, now: i64) -> String {
    if ms <= 0 {
        return "-".to_string();
    }
    let s = (now - ms).max(0) / 1000;
    match s {
        0..=59 => format!("{s}s ago"),
        60..=3599 => format!("{}m ago", s / 60),
        3600..=86_399 => format!("{}h ago", s / 3600),
        _ => format!("{}d ago", s / 86_400),
    }
}

/// `ISO (relative)` for show commands.
pub fn when(ms: i64, now: i64) -> String {
    if ms <= 0 {
        "-".to_string()
    } else {
        format!("{} ({})", iso(ms), ago(ms, now))
    }
}

pub fn state_name(state: i32) -> &'static str {
    BuildState::try_from(state)
        .unwrap_or(BuildState::Unspecified)
        .short_name()
}

pub fn box_state_name(state: i32) -> &'static str {
    BoxState::try_from(state)
        .unwrap_or(BoxState::Unspecified)
        .short_name()
}

pub fn stream_name(stream: i32) -> &'static str {
    match LogStream::try_from(stream).unwrap_or(LogStream::Unspecified) {
        LogStream::Unspecified => "unspecified",
        LogStream::Stdout => "stdout",
        LogStream::Stderr => "stderr",
        LogStream::System => "system",
    }
}

pub(crate) fn dash(s: &str) -> String {
    if s.is_empty() {
        "-".to_string()
    } else {
        s.to_string()
    }
}

/// First 12 characters of a commit id.
fn short_rev(r: &str) -> String {
    dash(&r.chars().take(12).collect::<String>())
}

pub(crate) fn time_json(ms: i64) -> Value {
    if ms <= 0 {
        Value::Null
    } else {
        Value::String(iso(ms))
    }
}

// ---------------------------------------------------------------------------------------------
// Projects

pub fn project_json(p: &Project) -> Value {
    json!({
        "id": p.id,
        "name": p.name,
        "repo_url": p.repo_url,
        "branch": p.branch,
        "tags": p.tags,
        "size_class": p.size_class,
        "private_network": p.private_network,
        "steps": p.steps,
        "timeout_secs": p.timeout_secs,
        // Names only: the control plane never returns env values (they may be secrets).
        "env_names": p.env_names,
        "has_secret": p.has_secret,
        "hive": p.hive,
        "created_at_ms": p.created_at_ms,
        "created_at": time_json(p.created_at_ms),
    })
}

pub fn projects_table(ps: &[Project], now: i64) -> String {
    let rows: Vec<Vec<String>> = ps
        .iter()
        .map(|p| {
            vec![
                p.name.clone(),
                p.repo_url.clone(),
                if p.branch.is_empty() {
                    "*".to_string()
                } else {
                    p.branch.clone()
                },
                if p.hive.is_empty() {
                    dash(&p.size_class)
                } else {
                    format!("-> {}", p.hive)
                },
                p.steps.len().to_string(),
                ago(p.created_at_ms, now),
            ]
        })
        .collect();
    table(
        &["NAME", "REPO", "BRANCH", "SIZE", "STEPS", "CREATED"],
        &rows,
    )
}

pub fn project_text(p: &Project, now: i64) -> String {
    let mut s = String::new();
    let mut kv = |k: &str, v: String| s.push_str(&format!("{k:<17}{v}\n"));
    kv("name:", p.name.clone());
    kv("id:", p.id.clone());
    kv("repo:", p.repo_url.clone());
    kv(
        "branch:",
        if p.branch.is_empty() {
            "* (every branch)".into()
        } else {
            p.branch.clone()
        },
    );
    kv(
        "tags:",
        if p.tags.is_empty() {
            "none (tag pushes do not build)".into()
        } else {
            p.tags.clone()
        },
    );
    if !p.hive.is_empty() {
        kv("hive:", format!("{} (pushes are forwarded there)", p.hive));
    }
    kv("size class:", dash(&p.size_class));
    kv(
        "private network:",
        if p.private_network.is_empty() {
            "none".into()
        } else {
            p.private_network.clone()
        },
    );
    kv(
        "timeout:",
        if p.timeout_secs == 0 {
            "-".into()
        } else {
            format!("{}s", p.timeout_secs)
        },
    );
    kv(
        "secret:",
        if p.has_secret {
            "set".into()
        } else {
            "none (built only through the API; webhooks cannot verify)".into()
        },
    );
    kv("created:", when(p.created_at_ms, now));
    for k in &p.env_names {
        kv("env:", format!("{k} (value not shown)"));
    }
    for (i, step) in p.steps.iter().enumerate() {
        kv(&format!("step {}:", i + 1), step.clone());
    }
    s
}

// ---------------------------------------------------------------------------------------------
// Builds

pub fn build_json(b: &Build) -> Value {
    json!({
        "id": b.id,
        "project_id": b.project_id,
        "project": b.project_name,
        "state": state_name(b.state),
        "revision": b.revision,
        "ref": b.git_ref,
        "box_id": b.box_id,
        "cell_id": b.cell_id,
        "size_class": b.size_class,
        "warm_start": b.warm_start,
        "backend": b.backend,
        "attempt": b.attempt,
        "exit_code": b.exit_code,
        "message": b.message,
        "trigger": b.trigger,
        "created_at_ms": b.created_at_ms,
        "created_at": time_json(b.created_at_ms),
        "updated_at_ms": b.updated_at_ms,
        "updated_at": time_json(b.updated_at_ms),
        "transitions": b.transitions.iter().map(|t| json!({
            "state": state_name(t.state),
            "at_ms": t.at_ms,
            "at": time_json(t.at_ms),
            "reason": t.reason,
        })).collect::<Vec<_>>(),
    })
}

pub fn builds_table(bs: &[Build], now: i64) -> String {
    let rows: Vec<Vec<String>> = bs
        .iter()
        .map(|b| {
            vec![
                b.id.clone(),
                dash(&b.project_name),
                state_name(b.state).to_string(),
                dash(b.git_ref.trim_start_matches("refs/heads/")),
                short_rev(&b.revision),
                dash(&b.box_id),
                ago(b.created_at_ms, now),
                ago(b.updated_at_ms, now),
            ]
        })
        .collect();
    table(
        &[
            "ID", "PROJECT", "STATE", "REF", "REVISION", "BOX", "CREATED", "UPDATED",
        ],
        &rows,
    )
}

pub fn build_text(b: &Build, now: i64) -> String {
    let mut s = String::new();
    let mut kv = |k: &str, v: String| s.push_str(&format!("{k:<12}{v}\n"));
    kv("id:", b.id.clone());
    kv(
        "project:",
        format!("{} ({})", dash(&b.project_name), dash(&b.project_id)),
    );
    kv("state:", state_name(b.state).to_string());
    if !b.message.is_empty() {
        kv("message:", b.message.clone());
    }
    kv("ref:", dash(&b.git_ref));
    kv("revision:", dash(&b.revision));
    kv("trigger:", dash(&b.trigger));
    kv("size class:", dash(&b.size_class));
    kv("box:", dash(&b.box_id));
    kv(
        "cell:",
        if b.cell_id.is_empty() {
            "-".into()
        } else {
            format!(
                "{} ({}, {})",
                b.cell_id,
                dash(&b.backend),
                if b.warm_start { "warm" } else { "cold" }
            )
        },
    );
    kv("attempt:", b.attempt.to_string());
    kv(
        "exit code:",
        if b.exit_code < 0 {
            "-".into()
        } else {
            b.exit_code.to_string()
        },
    );
    kv("created:", when(b.created_at_ms, now));
    kv("updated:", when(b.updated_at_ms, now));
    if !b.transitions.is_empty() {
        s.push_str("transitions:\n");
        let rows: Vec<Vec<String>> = b
            .transitions
            .iter()
            .map(|t| {
                vec![
                    iso(t.at_ms),
                    state_name(t.state).to_string(),
                    t.reason.clone(),
                ]
            })
            .collect();
        for line in table(&["AT", "STATE", "REASON"], &rows).lines() {
            s.push_str("  ");
            s.push_str(line);
            s.push('\n');
        }
    }
    s
}

/// One line of `watch`, the same for a state from the build's history and for a change seen
/// live: `<ISO>  <state>  [box=..  cell=..  attempt=..  exit=..]  <reason>`; with `--json` an
/// object `{"kind": "state", "id", "state", "at_ms", "reason"}` plus `box_id`, `cell_id`,
/// `attempt`, `exit_code` on the line of the build's current state (the only one they are
/// known for). `now` is the build as it is when `t` is its current state.
pub fn watch_line(t: &StateTransition, build_id: &str, now: Option<&Build>, json: bool) -> String {
    let mut reason = t.reason.clone();
    if let Some(b) = now {
        if reason.is_empty() {
            reason = b.message.clone();
        }
    }
    let exit = now.filter(|b| {
        BuildState::try_from(b.state).is_ok_and(BuildState::is_terminal) && b.exit_code >= 0
    });
    if json {
        let mut v = json!({
            "kind": "state",
            "id": build_id,
            "state": state_name(t.state),
            "at_ms": t.at_ms,
            "reason": reason,
        });
        if let (Some(b), Some(o)) = (now, v.as_object_mut()) {
            o.insert("box_id".into(), b.box_id.clone().into());
            o.insert("cell_id".into(), b.cell_id.clone().into());
            o.insert("attempt".into(), b.attempt.into());
            if let Some(b) = exit {
                o.insert("exit_code".into(), b.exit_code.into());
            }
        }
        return v.to_string();
    }
    let mut details = Vec::new();
    if let Some(b) = now {
        if !b.box_id.is_empty() {
            details.push(format!("box={}", b.box_id));
        }
        if !b.cell_id.is_empty() {
            details.push(format!("cell={}", b.cell_id));
        }
        if b.attempt > 0 {
            details.push(format!("attempt={}", b.attempt));
        }
    }
    if let Some(b) = exit {
        details.push(format!("exit={}", b.exit_code));
    }
    if !reason.is_empty() {
        details.push(reason);
    }
    format!(
        "{}  {:<9}  {}",
        iso(t.at_ms),
        state_name(t.state),
        details.join("  ")
    )
    .trim_end()
    .to_string()
}

/// The build's current state as a transition: its last recorded one, or (a build whose
/// history does not reach its state yet) the state at its last update.
pub fn current_transition(b: &Build) -> StateTransition {
    match b.transitions.last() {
        Some(t) if t.state == b.state => t.clone(),
        _ => StateTransition {
            state: b.state,
            at_ms: if b.updated_at_ms > 0 {
                b.updated_at_ms
            } else {
                hive_sys::now_ms()
            },
            reason: String::new(),
        },
    }
}

pub fn log_json(c: &LogChunk) -> Value {
    json!({
        "build_id": c.build_id,
        "seq": c.seq,
        "stream": stream_name(c.stream),
        "step": c.step,
        "data": String::from_utf8_lossy(&c.data),
        "at_ms": c.at_ms,
    })
}

// ---------------------------------------------------------------------------------------------
// Boxes, cells, classes

fn pool_summary(b: &BoxInfo) -> String {
    if b.pools.is_empty() {
        return "-".to_string();
    }
    b.pools
        .iter()
        .map(|p| format!("{}:{}w/{}b/{}c", p.size_class, p.warm, p.busy, p.capacity))
        .collect::<Vec<_>>()
        .join(" ")
}

pub fn box_json(b: &BoxInfo) -> Value {
    json!({
        "id": b.id,
        "hostname": b.hostname,
        "state": box_state_name(b.state),
        "backend": b.backend,
        "pools": b.pools.iter().map(|p| json!({
            "size_class": p.size_class,
            "warm": p.warm,
            "booting": p.booting,
            "busy": p.busy,
            "target": p.target,
            "capacity": p.capacity,
        })).collect::<Vec<_>>(),
        "running_builds": b.running_builds,
        "last_heartbeat_ms": b.last_heartbeat_ms,
        "last_heartbeat": time_json(b.last_heartbeat_ms),
        "registered_at_ms": b.registered_at_ms,
        "registered_at": time_json(b.registered_at_ms),
    })
}

pub fn boxes_table(bs: &[BoxInfo], now: i64) -> String {
    let rows: Vec<Vec<String>> = bs
        .iter()
        .map(|b| {
            vec![
                b.id.clone(),
                dash(&b.hostname),
                box_state_name(b.state).to_string(),
                dash(&b.backend),
                b.running_builds.len().to_string(),
                ago(b.last_heartbeat_ms, now),
                pool_summary(b),
            ]
        })
        .collect();
    table(
        &[
            "ID",
            "HOSTNAME",
            "STATE",
            "BACKEND",
            "BUILDS",
            "HEARTBEAT",
            "POOLS (warm/busy/cap)",
        ],
        &rows,
    )
}

pub fn box_text(b: &BoxInfo, now: i64) -> String {
    format!(
        "box {} ({}): {}, backend {}, {} running build(s), last heartbeat {}, pools {}\n",
        b.id,
        dash(&b.hostname),
        box_state_name(b.state),
        dash(&b.backend),
        b.running_builds.len(),
        ago(b.last_heartbeat_ms, now),
        pool_summary(b)
    )
}

pub fn cell_json(c: &CellInfo) -> Value {
    json!({
        "id": c.id,
        "box_id": c.box_id,
        "size_class": c.size_class,
        "state": c.state,
        "build_id": c.build_id,
        "updated_at_ms": c.updated_at_ms,
        "updated_at": time_json(c.updated_at_ms),
    })
}

pub fn cells_table(cs: &[CellInfo], now: i64) -> String {
    let rows: Vec<Vec<String>> = cs
        .iter()
        .map(|c| {
            vec![
                c.id.clone(),
                dash(&c.box_id),
                dash(&c.size_class),
                dash(&c.state),
                dash(&c.build_id),
                ago(c.updated_at_ms, now),
            ]
        })
        .collect();
    table(&["ID", "BOX", "SIZE", "STATE", "BUILD", "UPDATED"], &rows)
}

pub fn class_json(c: &SizeClass) -> Value {
    json!({
        "name": c.name,
        "vcpus": c.vcpus,
        "memory_mib": c.memory_mib,
        "disk_mib": c.disk_mib,
        "net_bytes_per_sec": c.net_bytes_per_sec,
        "disk_bytes_per_sec": c.disk_bytes_per_sec,
        "disk_ops_per_sec": c.disk_ops_per_sec,
        "pids_max": c.pids_max,
    })
}

fn rate(v: u64, unit: &str) -> String {
    if v == 0 {
        "unlimited".to_string()
    } else if v >= 1 << 20 && unit == "B/s" {
        format!("{} MiB/s", v >> 20)
    } else {
        format!("{v} {unit}")
    }
}

pub fn classes_table(cs: &[SizeClass]) -> String {
    let rows: Vec<Vec<String>> = cs
        .iter()
        .map(|c| {
            vec![
                c.name.clone(),
                c.vcpus.to_string(),
                format!("{} MiB", c.memory_mib),
                format!("{} MiB", c.disk_mib),
                rate(c.net_bytes_per_sec, "B/s"),
                rate(c.disk_bytes_per_sec, "B/s"),
                rate(c.disk_ops_per_sec, "op/s"),
                if c.pids_max == 0 {
                    "-".into()
                } else {
                    c.pids_max.to_string()
                },
            ]
        })
        .collect();
    table(
        &[
            "NAME",
            "VCPUS",
            "MEMORY",
            "DISK",
            "NET",
            "DISK BW",
            "DISK IOPS",
            "PIDS",
        ],
        &rows,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn watch_prints_history_and_live_changes_in_one_format() {
        let queued = StateTransition {
            state: BuildState::Queued as i32,
            at_ms: 1_795_757_665_000,
            reason: "submitted".into(),
        };
        let failed = StateTransition {
            state: BuildState::Failed as i32,
            at_ms: 1_795_757_666_000,
            reason: "step 1 exited with 3".into(),
        };
        let b = Build {
            id: "b1".into(),
            state: BuildState::Failed as i32,
            box_id: "box-a".into(),
            cell_id: "c1".into(),
            attempt: 1,
            exit_code: 3,
            transitions: vec![queued.clone(), failed.clone()],
            ..Default::default()
        };
        let history = watch_line(&queued, "b1", None, false);
        let live = watch_line(&current_transition(&b), "b1", Some(&b), false);
        assert_eq!(history, "2026-11-27T05:34:25Z  queued     submitted");
        assert_eq!(
            live,
            "2026-11-27T05:34:26Z  failed     box=c1  cell=c1  attempt=1  exit=3  step 1 exited with 3"
                .replace("box=c1", "box=box-a")
        );
        let h: Value = serde_json::from_str(&watch_line(&queued, "b1", None, true)).unwrap();
        let l: Value = serde_json::from_str(&watch_line(&failed, "b1", Some(&b), true)).unwrap();
        for v in [&h, &l] {
            assert_eq!(v["kind"], "state");
            assert_eq!(v["id"], "b1");
            assert!(v["at_ms"].is_i64() && v["state"].is_string() && v["reason"].is_string());
        }
        assert_eq!(l["exit_code"], 3);
        assert_eq!(l["box_id"], "box-a");
    }

    #[test]
    fn iso_dates() {
        assert_eq!(iso(0), "");
        assert_eq!(iso(1), "1970-01-01T00:00:00Z");
        assert_eq!(iso(951_782_400_000), "2000-02-29T00:00:00Z");
        assert_eq!(iso(1_795_757_665_000), "2026-11-27T05:34:25Z");
    }

    #[test]
    fn relative_times() {
        assert_eq!(ago(0, 5), "-");
        assert_eq!(ago(1000, 13_000), "12s ago");
        assert_eq!(ago(1000, 1000 + 5 * 60_000), "5m ago");
        assert_eq!(ago(1000, 1000 + 50 * 3_600_000), "2d ago");
        // Clock skew never prints a negative age.
        assert_eq!(ago(10_000, 1000), "0s ago");
    }

    #[test]
    fn tables_align() {
        let t = table(
            &["A", "LONG"],
            &[
                vec!["xxx".into(), "1".into()],
                vec!["é".into(), "22".into()],
            ],
        );
        assert_eq!(t, "A    LONG\nxxx  1\né    22\n");
    }
}
