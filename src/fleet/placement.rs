//! Placement: which node is an agent instance's home. A pure function of the node set and
//! its health, so that gateway replicas with the same view agree without talking.
//!
//! Rendezvous (highest random weight) hashing: every node scores every key and the highest
//! healthy score wins. A node going down moves only the keys it won (each to its next
//! choice); a node coming back, or a new one, takes only the keys whose first choice it is.
//! Each node's hash is computed once when the set is built, so a decision costs one mix per
//! healthy node: about 1.2 µs for 1,000 nodes here, against a budget of 2 µs (measured by
//! `benches/placement.rs`; the figures are in `docs/benchmarks.md`).

use std::sync::Arc;

/// One node as placement sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlacedNode {
    /// Its identity in placement: the configured `host:port`, an `ip:port` from A/AAAA
    /// records or a `target:port` from SRV records.
    pub id: Arc<str>,
    /// Where to connect: `host:port`.
    pub connect: Arc<str>,
    pub healthy: bool,
    seed: u64,
}

impl PlacedNode {
    pub fn new(id: &str, connect: &str, healthy: bool) -> Self {
        PlacedNode {
            id: Arc::from(id),
            connect: Arc::from(connect),
            healthy,
            seed: stable_hash(id.as_bytes()),
        }
    }
}

/// A node set with its health, ready to place keys.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Placement {
    /// Sorted by id: equal sets compare equal whatever order they were found in.
    nodes: Vec<PlacedNode>,
    /// The seeds of the healthy nodes, ascending (and, for equal seeds, in `nodes`' order),
    /// side by side so that a decision scans one contiguous array; and where each of those
    /// nodes is in `nodes`.
    up_seeds: Vec<u64>,
    up_nodes: Vec<usize>,
}

/// Why no node can take a key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NoHome {
    /// The set is empty (discovery has found nothing yet).
    NoNodes,
    /// Every node is down.
    AllDown,
}

impl Placement {
    pub fn new(mut nodes: Vec<PlacedNode>) -> Self {
        nodes.sort_by(|a, b| a.id.cmp(&b.id));
        nodes.dedup_by(|a, b| a.id == b.id);
        let mut up: Vec<(u64, usize)> = (nodes.iter().enumerate())
            .filter(|(_, node)| node.healthy)
            .map(|(i, node)| (node.seed, i))
            .collect();
        up.sort_unstable();
        let (up_seeds, up_nodes) = up.into_iter().unzip();
        Placement {
            nodes,
            up_seeds,
            up_nodes,
        }
    }

    pub fn nodes(&self) -> &[PlacedNode] {
        &self.nodes
    }

    /// The home of `key` (an agent's `(slug, instance)`, or a fallback request's path).
    pub fn home(&self, key: &[&str]) -> Result<&PlacedNode, NoHome> {
        self.home_of(key_hash(key))
    }

    /// The home of a key already hashed with [`key_hash`].
    pub fn home_of(&self, key: u64) -> Result<&PlacedNode, NoHome> {
        if self.nodes.is_empty() {
            return Err(NoHome::NoNodes);
        }
        // Of healthy nodes with the same seed (ids whose hashes collide, which score the same)
        // the last in id order wins, as it always has.
        let at = if self.up_seeds.len() <= FEW {
            (self.up_seeds.iter().enumerate())
                .max_by_key(|(_, seed)| mix(key ^ **seed))
                .map(|(at, _)| at)
        } else {
            // `mix` is a bijection: the top score says which seed scored it.
            highest_score(key, &self.up_seeds).map(|top| {
                let seed = unmix(top) ^ key;
                self.up_seeds.partition_point(|s| *s <= seed) - 1
            })
        };
        Ok(&self.nodes[self.up_nodes[at.ok_or(NoHome::AllDown)?]])
    }

    /// The node `id`, if it is in the set.
    pub fn node(&self, id: &str) -> Option<&PlacedNode> {
        self.nodes
            .binary_search_by(|n| (*n.id).cmp(id))
            .ok()
            .map(|i| &self.nodes[i])
    }
}

/// The hash placement gives a key: its parts, each followed by a separator byte that no UTF-8
/// text contains, so that `("ab", "c")` and `("a", "bc")` differ.
pub fn key_hash(key: &[&str]) -> u64 {
    key.iter().fold(FNV_OFFSET, |h, part| {
        fnv1a(fnv1a(h, part.as_bytes()), &[0xff])
    })
}

const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;

/// A hash that is the same on every build and machine (FNV-1a, 64 bits), fixed here rather
/// than `std`'s unspecified one so that replicas built by different compilers agree: for
/// placement and for fingerprints in logs, never for security.
pub fn stable_hash(bytes: &[u8]) -> u64 {
    fnv1a(FNV_OFFSET, bytes)
}

fn fnv1a(mut hash: u64, bytes: &[u8]) -> u64 {
    for b in bytes {
        hash ^= u64::from(*b);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    hash
}

/// Up to this many healthy nodes, a decision keeps the best node's place as it scans; beyond,
/// it scans for the best score alone and finds its node afterwards, which costs some 20 ns
/// once and saves about a third of every node's share (see `benches/placement.rs`).
const FEW: usize = 32;

/// The highest `mix(key ^ seed)` over `seeds`, none if there are none. The cost of a decision
/// on a large fleet, so: scores only (which node scored it is found afterwards, once), in four
/// interleaved lanes each keeping its maximum without a branch, so that the multiplies of
/// neighbouring seeds overlap rather than wait on one running maximum.
fn highest_score(key: u64, seeds: &[u64]) -> Option<u64> {
    const LANES: usize = 4;
    let mut top = [mix(key ^ *seeds.first()?); LANES];
    let chunks = seeds.chunks_exact(LANES);
    for (top, &seed) in top.iter_mut().zip(chunks.remainder()) {
        *top = (*top).max(mix(key ^ seed));
    }
    for chunk in chunks {
        for (top, &seed) in top.iter_mut().zip(chunk) {
            *top = (*top).max(mix(key ^ seed));
        }
    }
    Some(top[0].max(top[1]).max(top[2].max(top[3])))
}

const MIX_1: u64 = 0xbf58_476d_1ce4_e5b9;
const MIX_2: u64 = 0x94d0_49bb_1331_11eb;
const UNMIX_1: u64 = inverse(MIX_1);
const UNMIX_2: u64 = inverse(MIX_2);

/// splitmix64's finaliser: a bijection that spreads every input bit over the whole word, so
/// `key ^ seed` scores each node independently enough for an even spread.
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(MIX_1);
    z = (z ^ (z >> 27)).wrapping_mul(MIX_2);
    z ^ (z >> 31)
}

/// The inverse of [`mix`]: `unmix(mix(z)) == z`.
fn unmix(mut z: u64) -> u64 {
    z = unshift(z, 31).wrapping_mul(UNMIX_2);
    z = unshift(z, 27).wrapping_mul(UNMIX_1);
    unshift(z, 30)
}

/// The `x` whose `x ^ (x >> by)` is `y`: `y ^ (y >> by) ^ (y >> 2 * by) ^ ...`.
fn unshift(y: u64, by: u32) -> u64 {
    let mut x = y;
    let mut shift = by;
    while shift < u64::BITS {
        x ^= y >> shift;
        shift += by;
    }
    x
}

/// The multiplicative inverse of an odd `a` modulo 2^64, by Newton's iteration (each step
/// doubles the correct low bits; `a` itself is right in the low 3).
const fn inverse(a: u64) -> u64 {
    let mut x = a;
    let mut step = 0;
    while step < 5 {
        x = x.wrapping_mul(2u64.wrapping_sub(a.wrapping_mul(x)));
        step += 1;
    }
    x
}

#[cfg(test)]
mod tests {
    use super::*;

    fn placement(ids: &[&str], down: &[&str]) -> Placement {
        Placement::new(
            ids.iter()
                .map(|id| PlacedNode::new(id, id, !down.contains(id)))
                .collect(),
        )
    }

    fn homes(placement: &Placement) -> Vec<Arc<str>> {
        (0..3000)
            .map(|i| {
                let instance = format!("room-{i}");
                let home = placement.home(&["coder-agent", &instance]);
                home.map(|n| n.id.clone()).expect("a home")
            })
            .collect()
    }

    const THREE: [&str; 3] = ["10.0.0.1:80", "10.0.0.2:80", "10.0.0.3:80"];

    #[test]
    fn homes_are_stable_and_spread() {
        let three = placement(&THREE, &[]);
        let first = homes(&three);
        assert_eq!(
            first,
            homes(&placement(&[THREE[2], THREE[0], THREE[1]], &[]))
        );
        for id in THREE {
            let count = first.iter().filter(|h| ***h == *id).count();
            assert!((850..=1150).contains(&count), "{id} has {count} of 3000");
        }
    }

    #[test]
    fn a_node_going_down_moves_only_its_instances_and_takes_them_back() {
        let up = homes(&placement(&THREE, &[]));
        let down = homes(&placement(&THREE, &[THREE[1]]));
        for (before, after) in up.iter().zip(&down) {
            if **before == *THREE[1] {
                assert_ne!(**after, *THREE[1]);
            } else {
                assert_eq!(before, after, "an instance moved off a healthy node");
            }
        }
        assert_eq!(
            homes(&placement(&THREE, &[])),
            up,
            "back home when it returns"
        );
    }

    #[test]
    fn a_new_node_takes_only_what_it_wins_about_a_quarter() {
        let before = homes(&placement(&THREE, &[]));
        let four = [THREE[0], THREE[1], THREE[2], "10.0.0.4:80"];
        let after = homes(&placement(&four, &[]));
        let moved = before.iter().zip(&after).filter(|(b, a)| b != a).count();
        assert!(after
            .iter()
            .zip(&before)
            .all(|(a, b)| a == b || **a == *"10.0.0.4:80"));
        assert!((600..=900).contains(&moved), "{moved} of 3000 moved");
    }

    #[test]
    fn no_home_when_empty_or_all_down() {
        assert_eq!(Placement::default().home(&["a", "b"]), Err(NoHome::NoNodes));
        let down = placement(&THREE, &THREE);
        assert_eq!(down.home(&["a", "b"]), Err(NoHome::AllDown));
    }

    #[test]
    fn key_parts_are_separated() {
        assert_ne!(key_hash(&["ab", "c"]), key_hash(&["a", "bc"]));
    }

    #[test]
    fn the_mapping_is_fixed_across_builds() {
        // Pinned so that a change of hash, which would re-home every instance on a rolling
        // upgrade, cannot pass unnoticed. (Changed once, when node hashes began to be
        // computed ahead: builds before the fleet placed instances differently.)
        let three = placement(&THREE, &[]);
        let homes: Vec<&str> = ["default", "alice", "bob", "Default"]
            .iter()
            .map(|i| &*three.home(&["coder-agent", i]).expect("a node").id)
            .collect();
        assert_eq!(homes, PINNED_HOMES);
    }

    const PINNED_HOMES: [&str; 4] = ["10.0.0.1:80", "10.0.0.3:80", "10.0.0.3:80", "10.0.0.1:80"];

    #[test]
    fn unmix_undoes_mix() {
        assert_eq!(MIX_1.wrapping_mul(UNMIX_1), 1);
        assert_eq!(MIX_2.wrapping_mul(UNMIX_2), 1);
        let edges = [0, 1, u64::MAX, 1 << 63, FNV_OFFSET];
        let spread = (0..100_000u64).map(|i| i.wrapping_mul(0x9e37_79b9_7f4a_7c15));
        for z in edges.into_iter().chain(spread) {
            assert_eq!(unmix(mix(z)), z, "{z:#x}");
        }
    }

    /// The scan as it was first written: every healthy node in id order, the last of the
    /// highest scores.
    fn plain_home(placement: &Placement, key: u64) -> Option<&PlacedNode> {
        (placement.nodes.iter())
            .filter(|node| node.healthy)
            .max_by_key(|node| mix(key ^ node.seed))
    }

    #[test]
    fn the_scan_answers_as_the_plain_one_does() {
        for count in [1, 2, 3, 4, 5, 7, 8, 9, 32, 33, 34, 37, 40, 100, 1000] {
            let nodes = (0..count)
                .map(|i| {
                    let id = format!("10.0.{}.{}:8787", i / 256, i % 256);
                    PlacedNode::new(&id, &id, i % 10 != 3)
                })
                .collect();
            let placement = Placement::new(nodes);
            for i in 0..2000 {
                let key = key_hash(&["coder-agent", &format!("room-{i}")]);
                let home = placement.home_of(key).ok().map(|n| &n.id);
                assert_eq!(home, plain_home(&placement, key).map(|n| &n.id));
            }
        }
    }

    #[test]
    fn of_nodes_whose_seeds_collide_the_last_healthy_one_wins_as_ever() {
        // Ids whose hashes collide cannot be found, so the seeds are forced: node i gets seed
        // i / 3, and some of the last of each three are down. A few nodes and many.
        for count in [12, 120] {
            let nodes = (0..count)
                .map(|i| PlacedNode {
                    seed: i / 3,
                    ..PlacedNode::new(&format!("n{i:03}"), "x:1", i % 3 != 2 || i % 2 == 0)
                })
                .collect();
            let placement = Placement::new(nodes);
            for key in (0..5000u64).map(|i| i.wrapping_mul(0x9e37_79b9_7f4a_7c15)) {
                let home = placement.home_of(key).ok().map(|n| &n.id);
                assert_eq!(home, plain_home(&placement, key).map(|n| &n.id));
            }
        }
    }

    #[test]
    fn nodes_are_found_by_id() {
        let three = placement(&THREE, &[THREE[0]]);
        assert_eq!(three.node(THREE[0]).map(|n| n.healthy), Some(false));
        assert!(three.node("10.9.9.9:80").is_none());
    }
}
