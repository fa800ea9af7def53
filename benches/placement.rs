//! What choosing an agent instance's home costs per WebSocket upgrade: `Placement::home` on
//! `("coder-agent", instance)`, the key's hash and the rendezvous ranking of every node, for
//! fleets of 3, 100 and 1,000 nodes, all up and with every tenth one down (one of 3). The
//! key's hash alone is measured beside it. The scan for up to 32 healthy nodes differs from
//! the one beyond (see `Placement::home_of`): 3 nodes take the first, 100 and 1,000 the second.
//! Instances cycle through 4,096 precomputed names, so that neither the key nor the winner is
//! the same from one decision to the next.

use agent_gateway::fleet::placement::{key_hash, PlacedNode, Placement};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use std::hint::black_box;

const INSTANCES: usize = 4096;

/// `count` nodes with ids like a discovered fleet's, every tenth one down if `some_down`.
fn fleet(count: usize, some_down: bool) -> Placement {
    Placement::new(
        (0..count)
            .map(|i| {
                let id = format!("10.0.{}.{}:8787", i / 256, i % 256);
                PlacedNode::new(&id, &id, !(some_down && i % 10 == 0))
            })
            .collect(),
    )
}

fn instances() -> Vec<String> {
    (0..INSTANCES).map(|i| format!("room-{i}")).collect()
}

fn place(c: &mut Criterion) {
    let instances = instances();
    let mut group = c.benchmark_group("placement");
    group.throughput(Throughput::Elements(1));

    let mut next = 0;
    group.bench_function("key_hash", |b| {
        b.iter(|| {
            next = (next + 1) % INSTANCES;
            key_hash(black_box(&["coder-agent", &instances[next]]))
        })
    });

    for count in [3, 100, 1000] {
        for (health, some_down) in [("all_up", false), ("tenth_down", true)] {
            let placement = fleet(count, some_down);
            let up = placement.nodes().iter().filter(|n| n.healthy).count();
            assert!(up > 0 && (some_down || up == count));
            assert!(placement.home(&["coder-agent", "room-1"]).is_ok());
            let mut next = 0;
            group.bench_with_input(
                BenchmarkId::new(format!("home_{health}"), count),
                &placement,
                |b, placement| {
                    b.iter(|| {
                        next = (next + 1) % INSTANCES;
                        let key = black_box(["coder-agent", instances[next].as_str()]);
                        placement.home(&key).map(|node| node.connect.len())
                    })
                },
            );
        }
    }
    group.finish();
}

criterion_group!(benches, place);
criterion_main!(benches);
