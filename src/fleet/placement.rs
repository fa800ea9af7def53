//! Placement: which node is an agent instance's home. A pure function of the node set and
//! its health, so that gateway replicas with the same view agree without talking.
//!
//! Rendezvous (highest random weight) hashing: every node scores every key and the highest
//! healthy score wins. A node going down moves only the keys it won (each to its next
//! choice); a node coming back, or a new one, takes only the keys whose first choice it is.
//! Each node's hash is computed once when the set is built, so a decision costs one mix per
//! node (about a nanosecond; see `benches/placement.rs`).

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
    /// The seeds of the healthy nodes, in `nodes`' order, side by side so that a decision
    /// scans one contiguous array; and where each of those nodes is in `nodes`.
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
        let (up_nodes, up_seeds) = nodes
            .iter()
            .enumerate()
            .filter(|(_, node)| node.healthy)
            .map(|(i, node)| (i, node.seed))
            .unzip();
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
        // The last of equal scores, as ever: only nodes whose seeds collide score the same.
        let winner = (self.up_seeds.iter().enumerate())
            .max_by_key(|(_, seed)| mix(key ^ **seed))
            .ok_or(NoHome::AllDown)?;
        Ok(&self.nodes[self.up_nodes[winner.0]])
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

/// splitmix64's finaliser: a bijection that spreads every input bit over the whole word, so
/// `key ^ seed` scores each node independently enough for an even spread.
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
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
    fn nodes_are_found_by_id() {
        let three = placement(&THREE, &[THREE[0]]);
        assert_eq!(three.node(THREE[0]).map(|n| n.healthy), Some(false));
        assert!(three.node("10.9.9.9:80").is_none());
    }
}
