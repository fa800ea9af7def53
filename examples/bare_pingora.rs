//! Pingora with nothing of the gateway in it: the floor the gateway is built on. Plain
//! requests go to one upstream, WebSocket upgrades to another (Pingora's own upgrade
//! proxying, no frame observer); every other hook keeps Pingora's default. `bench/run.sh`
//! measures it beside the gateway as the "pingora" target, so that the gateway's own cost
//! can be told apart from Pingora's.
//!
//!     cargo run --release --example bare_pingora -- LISTEN HTTP_UPSTREAM WS_UPSTREAM

use async_trait::async_trait;
use pingora::prelude::*;
use pingora::server::configuration::ServerConf;

/// The gateway's allocator, so that the comparison is of the code alone.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

struct Bare {
    http_upstream: String,
    ws_upstream: String,
}

#[async_trait]
impl ProxyHttp for Bare {
    type CTX = ();

    fn new_ctx(&self) {}

    async fn upstream_peer(&self, session: &mut Session, _ctx: &mut ()) -> Result<Box<HttpPeer>> {
        let upstream = if session.is_upgrade_req() {
            &self.ws_upstream
        } else {
            &self.http_upstream
        };
        Ok(Box::new(HttpPeer::new(
            upstream.as_str(),
            false,
            String::new(),
        )))
    }
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [listen, http_upstream, ws_upstream] = <[String; 3]>::try_from(args).unwrap_or_else(|_| {
        eprintln!("usage: bare_pingora LISTEN HTTP_UPSTREAM WS_UPSTREAM");
        std::process::exit(2);
    });
    // One worker thread, as the gateway under benchmark has.
    let conf = ServerConf {
        threads: 1,
        ..ServerConf::default()
    };
    let mut server = Server::new_with_opt_and_conf(None, conf);
    let mut proxy = http_proxy_service(
        &server.configuration,
        Bare {
            http_upstream,
            ws_upstream,
        },
    );
    proxy.add_tcp(&listen);
    server.add_service(proxy);
    println!("bare pingora listening on http://{listen}");
    server.run_forever();
}
