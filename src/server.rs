//! Server wiring: the Pingora server, its listener and the gateway service.

use crate::config::GatewayConfig;
use crate::proxy::Gateway;
use crate::websocket::pump::PumpSettings;
use pingora::server::configuration::{Opt, ServerConf};
use pingora::server::Server;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;

/// How long a closing WebSocket may take to finish its Close handshake.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);

/// Starts the gateway and serves until the process is told to stop.
pub fn run(config: GatewayConfig, upgrade: bool) -> ! {
    let conf = ServerConf {
        threads: config.threads,
        // Pingora's defaults wait minutes on SIGTERM; agent sockets are drained by the gateway.
        grace_period_seconds: Some(0),
        graceful_shutdown_timeout_seconds: Some(5),
        ..ServerConf::default()
    };
    let opt = Opt {
        upgrade,
        ..Opt::default()
    };
    let mut server = Server::new_with_opt_and_conf(opt, conf);
    server.bootstrap();

    let listen = config.listen.clone();
    // The sender lives as long as the process; drain is wired to it by the lifecycle work.
    let (drain_sender, drain) = watch::channel(false);
    std::mem::forget(drain_sender);
    let gateway = Gateway::new(
        Arc::new(config),
        drain,
        PumpSettings {
            idle_timeout: None,
            close_timeout: CLOSE_TIMEOUT,
        },
    );
    let mut service = pingora::proxy::http_proxy_service(&server.configuration, gateway);
    service.add_tcp(&listen);
    server.add_service(service);
    log::info!("agent-gateway listening on http://{listen}");
    server.run_forever()
}
