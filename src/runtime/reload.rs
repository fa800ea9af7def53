//! What a reload can and cannot change in a running process.

use crate::config::GatewayConfig;

/// The settings that differ between `old` and `new` but take effect only after a restart:
/// the listeners are bound once, and the thread count is fixed at start.
pub(crate) fn restart_needed(old: &GatewayConfig, new: &GatewayConfig) -> Vec<&'static str> {
    let mut fields = Vec::new();
    if new.listen != old.listen {
        fields.push("server.listen");
    }
    if new.admin_listen != old.admin_listen {
        fields.push("admin.listen");
    }
    if new.threads != old.threads {
        fields.push("server.threads");
    }
    if new.tls.as_ref().map(|t| &t.listen) != old.tls.as_ref().map(|t| &t.listen) {
        fields.push("tls.listen");
    }
    fields
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::fixtures::{parse, CODER_AND_CHAT, UPSTREAMS};

    const SERVER: &str = "[server]\nlisten = \"127.0.0.1:8080\"\nthreads = 2\n";

    #[test]
    fn listeners_and_threads_need_a_restart_routes_do_not() {
        let base = format!("{SERVER}{UPSTREAMS}[[routes]]{CODER_AND_CHAT}");
        let old = parse(&base);
        assert!(restart_needed(&old, &parse(&base.replace("CoderAgent", "Other"))).is_empty());
        let moved = base
            .replace("127.0.0.1:8080", "127.0.0.1:8081")
            .replace("threads = 2", "threads = 4");
        assert_eq!(
            restart_needed(&old, &parse(&moved)),
            vec!["server.listen", "server.threads"]
        );
    }
}
