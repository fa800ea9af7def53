//! Orders to an open connection from outside its pump: the gateway's drain, or the move of
//! its instance to another node.

use tokio::sync::watch;

/// What the gateway may ask of an open connection from outside its pump.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopOrder {
    /// Keep pumping.
    Run,
    /// The gateway is draining: Close 1001 to both sides.
    Drain,
    /// The instance's home moved to another node: Close 1012 to both sides, so the client
    /// reconnects and lands on the new home.
    Migrate(MigrationReason),
}

/// Why an instance's home moved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MigrationReason {
    /// A node went down or came back.
    Health,
    /// A reload changed the node list or the checks.
    Reload,
    /// DNS listed other nodes.
    Discovery,
}

impl MigrationReason {
    pub const ALL: [MigrationReason; 3] = [
        MigrationReason::Health,
        MigrationReason::Reload,
        MigrationReason::Discovery,
    ];

    pub fn label(self) -> &'static str {
        match self {
            MigrationReason::Health => "health",
            MigrationReason::Reload => "reload",
            MigrationReason::Discovery => "discovery",
        }
    }
}

/// Orders from outside the pump: the whole gateway's drain for most connections; for an
/// instance on a `local` node, its instance's own channel, which also carries the drain.
pub type StopSignal = watch::Receiver<StopOrder>;
