//! A small real DNS server for the tests (hickory-server, UDP and TCP on one 127.0.0.1 port)
//! answering from records the test sets and changes while it runs. It runs on a thread and
//! runtime of its own, so it answers while a test blocks, e.g. waiting for a gateway child
//! process that resolves at startup.

use hickory_server::net::runtime::Time;
use hickory_server::proto::op::{Edns, Header, HeaderCounts, Metadata, ResponseCode};
use hickory_server::proto::rr::rdata::SRV;
use hickory_server::proto::rr::{Name, RData, Record, RecordType};
use hickory_server::server::{Request, RequestHandler, ResponseHandler, ResponseInfo};
use hickory_server::zone_handler::MessageResponseBuilder;
use hickory_server::Server;
use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

/// A DNS server on 127.0.0.1, stopped when dropped. Every record has TTL 0, and a change
/// is seen by the very next query.
pub struct TestDns {
    /// UDP and TCP on this one address.
    pub addr: SocketAddr,
    zone: Arc<Zone>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

#[derive(Default)]
struct Zone {
    records: Mutex<Records>,
    queries: AtomicUsize,
}

#[derive(Default)]
struct Records {
    /// By lowercase name without the root dot.
    addresses: HashMap<String, Vec<IpAddr>>,
    srv: HashMap<String, Vec<(String, u16)>>,
    failing: bool,
    /// Whether SRV answers carry their targets' addresses (true unless a test says not).
    glue: bool,
}

impl TestDns {
    /// Starts the server, answering before it returns.
    pub fn start() -> TestDns {
        let zone = Arc::new(Zone::default());
        zone.lock().glue = true;
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let (bound, addr) = std::sync::mpsc::channel();
        let handler = Handler(Arc::clone(&zone));
        let thread = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("a runtime");
            runtime.block_on(async move {
                let (udp, tcp) = bind_pair().await;
                bound
                    .send(udp.local_addr().expect("address"))
                    .expect("sent");
                let mut server = Server::new(handler);
                server.register_socket(udp);
                server.register_listener(tcp, Duration::from_secs(5), 64);
                let _ = stopped.await;
                // Dropping the runtime after this aborts the server's tasks.
                drop(server);
            });
        });
        let addr = addr
            .recv_timeout(Duration::from_secs(10))
            .expect("the DNS server bound");
        TestDns {
            addr,
            zone,
            stop: Some(stop),
            thread: Some(thread),
        }
    }

    /// A and AAAA records of `name`, by each address's family; replaces its addresses (an
    /// empty list leaves the name with none, answered NOERROR without records).
    pub fn set_a(&self, name: &str, ips: &[IpAddr]) {
        self.zone.lock().addresses.insert(key(name), ips.to_vec());
    }

    /// SRV records of `name`, each `(target, port)`; replaces its SRV records. The targets'
    /// addresses come from `set_a`.
    pub fn set_srv(&self, name: &str, targets: &[(&str, u16)]) {
        let targets = targets.iter().map(|(t, p)| (key(t), *p)).collect();
        self.zone.lock().srv.insert(key(name), targets);
    }

    /// Forgets every record of `name`: NXDOMAIN afterwards.
    pub fn remove(&self, name: &str) {
        let mut records = self.zone.lock();
        records.addresses.remove(&key(name));
        records.srv.remove(&key(name));
    }

    /// While on, every query is answered SERVFAIL (a broken DNS server).
    pub fn fail(&self, on: bool) {
        self.zone.lock().failing = on;
    }

    /// Whether SRV answers carry the targets' A/AAAA in the additional section (on at
    /// start); off, a client must look each target up.
    pub fn glue(&self, on: bool) {
        self.zone.lock().glue = on;
    }

    /// How many queries it has received, so a test can wait for a re-resolution. Counted
    /// before the answer is sent: a client holding an answer finds its query counted.
    pub fn queries(&self) -> usize {
        self.zone.queries.load(Ordering::SeqCst)
    }
}

impl Drop for TestDns {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// UDP and TCP sockets on one free port of 127.0.0.1 (a client falls back from one to the
/// other at the same address); retried when the TCP side of a UDP port is taken.
async fn bind_pair() -> (tokio::net::UdpSocket, tokio::net::TcpListener) {
    for _ in 0..20 {
        let udp = tokio::net::UdpSocket::bind("127.0.0.1:0")
            .await
            .expect("a UDP port");
        let address = udp.local_addr().expect("address");
        if let Ok(tcp) = tokio::net::TcpListener::bind(address).await {
            return (udp, tcp);
        }
    }
    panic!("no port free for both UDP and TCP on 127.0.0.1");
}

/// The map key of a name: lowercase, without the root dot.
fn key(name: &str) -> String {
    name.trim_end_matches('.').to_ascii_lowercase()
}

fn absolute(name: &str) -> Name {
    let mut name = Name::from_ascii(name).expect("a DNS name");
    name.set_fqdn(true);
    name
}

impl Zone {
    fn lock(&self) -> MutexGuard<'_, Records> {
        self.records.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The response code, answers and additional records for one question.
    fn answer(&self, name: &Name, kind: RecordType) -> (ResponseCode, Vec<Record>, Vec<Record>) {
        let records = self.lock();
        if records.failing {
            return (ResponseCode::ServFail, vec![], vec![]);
        }
        let wanted = key(&name.to_ascii());
        let addresses = |owner: &Name, of: &str, kind: RecordType| -> Vec<Record> {
            let ips = records.addresses.get(of).map(Vec::as_slice).unwrap_or(&[]);
            ips.iter()
                .filter(|ip| match kind {
                    RecordType::A => ip.is_ipv4(),
                    RecordType::AAAA => ip.is_ipv6(),
                    _ => false,
                })
                .map(|ip| Record::from_rdata(owner.clone(), 0, RData::from(*ip)))
                .collect()
        };
        let (answers, additionals) = match kind {
            RecordType::A | RecordType::AAAA => (addresses(name, &wanted, kind), vec![]),
            RecordType::SRV => {
                let targets = records.srv.get(&wanted).map(Vec::as_slice).unwrap_or(&[]);
                let answers = targets
                    .iter()
                    .map(|(target, port)| {
                        let srv = SRV::new(0, 10, *port, absolute(target));
                        Record::from_rdata(name.clone(), 0, RData::SRV(srv))
                    })
                    .collect();
                let mut additionals = Vec::new();
                if records.glue {
                    for (target, _) in targets {
                        let owner = absolute(target);
                        additionals.extend(addresses(&owner, target, RecordType::A));
                        additionals.extend(addresses(&owner, target, RecordType::AAAA));
                    }
                }
                (answers, additionals)
            }
            _ => (vec![], vec![]),
        };
        let known = records.addresses.contains_key(&wanted) || records.srv.contains_key(&wanted);
        let code = match known {
            true => ResponseCode::NoError,
            false => ResponseCode::NXDomain,
        };
        (code, answers, additionals)
    }
}

struct Handler(Arc<Zone>);

#[async_trait::async_trait]
impl RequestHandler for Handler {
    async fn handle_request<R: ResponseHandler, T: Time>(
        &self,
        request: &Request,
        mut response_handle: R,
    ) -> ResponseInfo {
        self.0.queries.fetch_add(1, Ordering::SeqCst);
        let mut metadata = Metadata::response_from_request(&request.metadata);
        metadata.authoritative = true;
        let (code, answers, additionals) = match request.queries.queries() {
            [query] => self.0.answer(query.original().name(), query.query_type()),
            _ => (ResponseCode::FormErr, vec![], vec![]),
        };
        metadata.response_code = code;
        // A client that sent EDNS expects it back.
        let mut edns = Edns::new();
        let mut builder = MessageResponseBuilder::from_message_request(request);
        if let Some(asked) = &request.edns {
            edns.set_max_payload(asked.max_payload().max(512));
            builder.edns(&edns);
        }
        let response = builder.build(metadata, &answers, [], [], &additionals);
        match response_handle.send_response(response).await {
            Ok(info) => info,
            Err(_) => {
                metadata.response_code = ResponseCode::ServFail;
                ResponseInfo::from(Header {
                    metadata,
                    counts: HeaderCounts::default(),
                })
            }
        }
    }
}
