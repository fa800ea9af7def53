//! Server wiring: the Pingora server, the public proxy service and the admin service.

use crate::admin::Admin;
use crate::config::GatewayConfig;
use crate::metrics::Metrics;
use crate::proxy::Gateway;
use pingora::server::configuration::{Opt, ServerConf};
use pingora::server::Server;
use pingora::services::listening::Service;
use std::sync::Arc;
use tokio::sync::watch;

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

    let metrics = Arc::new(Metrics::new());
    let (drain_sender, drain) = watch::channel(false);
    let listen = config.listen.clone();
    let admin_listen = config.admin_listen.clone();

    let gateway = Gateway::new(Arc::new(config), metrics.clone(), drain);
    let mut proxy = pingora::proxy::http_proxy_service(&server.configuration, gateway);
    proxy.add_tcp(&listen);

    let mut admin = Service::new("admin".to_owned(), Admin::new(metrics, drain_sender));
    admin.add_tcp(&admin_listen);

    server.add_service(proxy);
    server.add_service(admin);
    log::info!("agent-gateway listening on http://{listen}, admin on http://{admin_listen}");
    server.run_forever()
}
