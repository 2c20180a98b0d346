//! Where a build goes: the placement policy and the choice among the boxes that could take it
//! (warm cells first, then room to boot one; `spread` prefers the emptiest box, `binpack` the
//! fullest). Pure: it works on the registry's [`Candidate`] snapshot, so it is tested alone.

use crate::registry::boxes::{Candidate, Room};

/// How the scheduler picks among boxes that could take a build.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Policy {
    /// Prefer the box with the most free (warm) cells: spreads load.
    Spread,
    /// Prefer the fullest box that still fits: packs builds onto few boxes.
    Binpack,
}

/// Picks a box for one build of `class` and takes the place from `candidates`.
/// Returns the box and whether a warm cell was taken.
pub fn choose(candidates: &mut [Candidate], class: &str, policy: Policy) -> Option<(String, bool)> {
    // Warm cells first: the build starts at once.
    let warm = best(candidates, class, policy, |r| r.warm);
    let (idx, is_warm) = match warm {
        Some(i) => (i, true),
        None => (best(candidates, class, policy, |r| r.cold)?, false),
    };
    let room = candidates[idx].rooms.get_mut(class)?;
    if is_warm {
        room.warm -= 1;
    } else {
        room.cold -= 1;
    }
    room.busy += 1;
    Some((candidates[idx].box_id.clone(), is_warm))
}

fn best(
    candidates: &[Candidate],
    class: &str,
    policy: Policy,
    free: impl Fn(&Room) -> i64,
) -> Option<usize> {
    let mut best: Option<(usize, i64, i64)> = None;
    for (i, c) in candidates.iter().enumerate() {
        let Some(room) = c.rooms.get(class) else {
            continue;
        };
        let n = free(room);
        if n <= 0 {
            continue;
        }
        let better = match (policy, best) {
            (_, None) => true,
            // Most free, then least busy.
            (Policy::Spread, Some((_, bn, bb))) => n > bn || (n == bn && room.busy < bb),
            // Least free, then most busy.
            (Policy::Binpack, Some((_, bn, bb))) => n < bn || (n == bn && room.busy > bb),
        };
        if better {
            best = Some((i, n, room.busy));
        }
    }
    best.map(|(i, _, _)| i)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn cand(id: &str, warm: i64, cold: i64, busy: i64) -> Candidate {
        let mut rooms = HashMap::new();
        rooms.insert("small".to_string(), Room { warm, cold, busy });
        Candidate {
            box_id: id.to_string(),
            backend: "sandbox".into(),
            rooms,
        }
    }

    #[test]
    fn warm_first_then_room_then_nothing() {
        let mut c = vec![cand("a", 0, 1, 0), cand("b", 1, 0, 3)];
        assert_eq!(
            choose(&mut c, "small", Policy::Spread),
            Some(("b".into(), true))
        );
        assert_eq!(
            choose(&mut c, "small", Policy::Spread),
            Some(("a".into(), false))
        );
        assert_eq!(choose(&mut c, "small", Policy::Spread), None);
        assert_eq!(choose(&mut c, "large", Policy::Spread), None);
    }

    #[test]
    fn spread_versus_binpack() {
        let mut c = vec![cand("a", 3, 0, 0), cand("b", 1, 0, 0)];
        assert_eq!(choose(&mut c, "small", Policy::Spread).unwrap().0, "a");
        let mut c = vec![cand("a", 3, 0, 0), cand("b", 1, 0, 0)];
        assert_eq!(choose(&mut c, "small", Policy::Binpack).unwrap().0, "b");
        // Spread keeps balancing as it takes places.
        let mut c = vec![cand("a", 2, 0, 0), cand("b", 2, 0, 0)];
        let picks: Vec<String> = (0..4)
            .map(|_| choose(&mut c, "small", Policy::Spread).unwrap().0)
            .collect();
        assert_eq!(picks, vec!["a", "b", "a", "b"]);
    }
}
