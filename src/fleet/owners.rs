//! Which node holds each instance's open connections, so that a placement change can close
//! exactly the connections whose instance moved, and nothing else.
//!
//! Each (upstream, node, agent, instance) with open connections has one watch channel; its
//! connections' pumps hold the receivers. Nothing else is kept per connection: the channel's
//! receiver count is the number of connections, and an entry without receivers is dropped
//! when next seen.

use super::placement::{key_hash, Placement};
use crate::websocket::stop::{MigrationReason, StopOrder, StopSignal};
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};
use tokio::sync::watch;

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct OwnerKey {
    upstream: Arc<str>,
    node: Arc<str>,
    slug: Arc<str>,
    instance: String,
}

#[derive(Default)]
struct Inner {
    draining: bool,
    channels: HashMap<OwnerKey, watch::Sender<StopOrder>>,
}

/// Open connections by instance and node, across every `local` upstream.
#[derive(Default)]
pub struct Owners {
    inner: Mutex<Inner>,
}

/// What one node holds: instances with open connections, and those connections.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct NodeLoad {
    pub instances: usize,
    pub connections: usize,
}

impl Owners {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        // The map stays consistent whatever a panicking holder did: every change is one call.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Registers a connection of `instance` of agent `slug` on `node`; its pump watches
    /// what this returns until the connection ends.
    pub fn subscribe(
        &self,
        upstream: &str,
        node: &Arc<str>,
        slug: &str,
        instance: &str,
    ) -> StopSignal {
        let key = OwnerKey {
            upstream: Arc::from(upstream),
            node: Arc::clone(node),
            slug: Arc::from(slug),
            instance: instance.to_owned(),
        };
        let mut inner = self.lock();
        let initial = if inner.draining {
            StopOrder::Drain
        } else {
            StopOrder::Run
        };
        inner
            .channels
            .entry(key)
            .or_insert_with(|| watch::channel(initial).0)
            .subscribe()
    }

    /// Orders every connection whose instance's home under `placement` is no longer the node
    /// it is on to close with 1012; returns how many connections were ordered (some may be
    /// closing already: each connection counts its own migration when it acts on the order).
    /// An instance with no home at all (every node down) is left where it is: closing it
    /// would only make its clients fail to reconnect.
    pub fn migrate(&self, upstream: &str, placement: &Placement, why: MigrationReason) -> usize {
        let mut inner = self.lock();
        if inner.draining {
            // Every connection is closing with 1001 already.
            return 0;
        }
        let mut moved = 0;
        inner.channels.retain(|key, sender| {
            let live = sender.receiver_count();
            if live == 0 {
                return false;
            }
            if *key.upstream != *upstream {
                return true;
            }
            let home = placement.home_of(key_hash(&[&key.slug, &key.instance]));
            match home {
                Ok(home) if home.id != key.node => {
                    sender.send_replace(StopOrder::Migrate(why));
                    moved += live;
                    // Dropped from the map: a connection of this instance made later on this
                    // node, should it become the home again, gets a fresh channel.
                    false
                }
                _ => true,
            }
        });
        moved
    }

    /// Orders every connection on a node of `upstream` to close with 1012: the upstream is
    /// gone. Returns how many were ordered.
    pub fn evict(&self, upstream: &str, why: MigrationReason) -> usize {
        let mut inner = self.lock();
        if inner.draining {
            return 0;
        }
        let mut moved = 0;
        inner.channels.retain(|key, sender| {
            if *key.upstream != *upstream {
                return sender.receiver_count() > 0;
            }
            moved += sender.receiver_count();
            sender.send_replace(StopOrder::Migrate(why));
            false
        });
        moved
    }

    /// Forgets the entries whose connections have all ended.
    pub fn prune(&self) {
        self.lock()
            .channels
            .retain(|_, sender| sender.receiver_count() > 0);
    }

    /// Orders every registered connection to close with 1001, and every later one at once.
    pub fn drain(&self) {
        let mut inner = self.lock();
        inner.draining = true;
        for sender in inner.channels.values() {
            sender.send_replace(StopOrder::Drain);
        }
    }

    /// What each node of `upstream` holds now.
    pub fn load(&self, upstream: &str) -> BTreeMap<Arc<str>, NodeLoad> {
        let mut inner = self.lock();
        inner
            .channels
            .retain(|_, sender| sender.receiver_count() > 0);
        let mut load: BTreeMap<Arc<str>, NodeLoad> = BTreeMap::new();
        for (key, sender) in inner
            .channels
            .iter()
            .filter(|(k, _)| *k.upstream == *upstream)
        {
            let node = load.entry(Arc::clone(&key.node)).or_default();
            node.instances += 1;
            node.connections += sender.receiver_count();
        }
        load
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fleet::placement::PlacedNode;

    fn placement(down: &[&str]) -> Placement {
        Placement::new(
            ["n1", "n2", "n3"]
                .iter()
                .map(|id| PlacedNode::new(id, id, !down.contains(id)))
                .collect(),
        )
    }

    /// Registers a connection of each of 300 instances on its home under `placement`.
    fn connect_all(owners: &Owners, placement: &Placement) -> Vec<(String, Arc<str>, StopSignal)> {
        (0..300)
            .map(|i| {
                let instance = format!("room-{i}");
                let home = placement
                    .home(&["coder", &instance])
                    .expect("home")
                    .id
                    .clone();
                let signal = owners.subscribe("local", &home, "coder", &instance);
                (instance, home, signal)
            })
            .collect()
    }

    #[test]
    fn only_connections_whose_home_moved_are_ordered_to_migrate() {
        let owners = Owners::default();
        let all_up = placement(&[]);
        let connections = connect_all(&owners, &all_up);
        assert_eq!(owners.migrate("local", &all_up, MigrationReason::Health), 0);
        let n2_down = placement(&["n2"]);
        let moved = owners.migrate("local", &n2_down, MigrationReason::Health);
        let on_n2 = connections.iter().filter(|(_, n, _)| &**n == "n2").count();
        assert_eq!(moved, on_n2);
        for (_, node, signal) in &connections {
            let expected = if &**node == "n2" {
                StopOrder::Migrate(MigrationReason::Health)
            } else {
                StopOrder::Run
            };
            assert_eq!(*signal.borrow(), expected);
        }
        assert!(!owners.load("local").contains_key("n2"), "n2 holds nothing");
        assert_eq!(
            owners.migrate("other", &n2_down, MigrationReason::Health),
            0,
            "other upstreams untouched"
        );
    }

    #[test]
    fn load_counts_open_connections_and_forgets_closed_ones() {
        let owners = Owners::default();
        let node: Arc<str> = Arc::from("n1");
        let a = owners.subscribe("local", &node, "coder", "a");
        let a2 = owners.subscribe("local", &node, "coder", "a");
        let b = owners.subscribe("local", &node, "coder", "b");
        let load = owners.load("local")["n1"];
        assert_eq!((load.instances, load.connections), (2, 3));
        drop((a, b));
        let load = owners.load("local")["n1"];
        assert_eq!((load.instances, load.connections), (1, 1));
        drop(a2);
        assert!(owners.load("local").is_empty());
    }

    #[test]
    fn an_upstream_that_is_gone_loses_every_connection_and_a_drain_is_not_overridden() {
        let owners = Owners::default();
        let node: Arc<str> = Arc::from("n1");
        let gone = owners.subscribe("old", &node, "coder", "a");
        let kept = owners.subscribe("local", &node, "coder", "b");
        assert_eq!(owners.evict("old", MigrationReason::Reload), 1);
        assert_eq!(*gone.borrow(), StopOrder::Migrate(MigrationReason::Reload));
        assert_eq!(*kept.borrow(), StopOrder::Run);
        owners.drain();
        assert_eq!(owners.evict("local", MigrationReason::Reload), 0);
        assert_eq!(
            owners.migrate("local", &placement(&["n1"]), MigrationReason::Health),
            0
        );
        assert_eq!(*kept.borrow(), StopOrder::Drain);
    }

    #[test]
    fn a_drain_reaches_open_and_later_connections() {
        let owners = Owners::default();
        let node: Arc<str> = Arc::from("n1");
        let open = owners.subscribe("local", &node, "coder", "a");
        owners.drain();
        assert_eq!(*open.borrow(), StopOrder::Drain);
        let later = owners.subscribe("local", &node, "coder", "b");
        assert_eq!(*later.borrow(), StopOrder::Drain);
    }
}
