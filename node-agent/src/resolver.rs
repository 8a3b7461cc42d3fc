//! The agent's DNS resolver for block-mode pods. The kernel programs send every DNS query of a
//! block-mode pod here instead of to the server it asked (UDP and TCP to port 53, see
//! [`crate::ebpf::Probes::set_resolver`]) and note which pod sent it (by the packet's source
//! address and port, before it leaves the pod: [`crate::ebpf::Clients`]); the resolver asks
//! whether that pod may resolve the name ([`Gate`]): if not, the pod gets a refusal and learns no address; if so, the query goes
//! to the real upstream server, and the answer's addresses for the name are put in the pod's
//! allowed destinations ([`AllowList`]) *before* the answer is handed back, so the connect
//! that follows the answer is never refused. Addresses stay allowed for the answer's TTL, at
//! least [`Resolver::ttl_floor`] (clients keep answers a little longer than they say).
//!
//! Fail closed: a pod in block mode whose queries the resolver cannot answer (the agent is
//! down, the upstream does not answer) gets no answer, never an unfiltered one.
//!
//! Served over UDP and TCP (the kernel sends both to one port): a query that came over TCP
//! goes upstream over TCP.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::Semaphore;
use tracing::{debug, warn};

use crate::dns;
use crate::ebpf::{AllowList, ResolvedKey, monotonic_ns};
use crate::events::Proto;

/// What a pod may call at the addresses of a name it may resolve.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Scope {
    /// `None`: TCP and UDP.
    pub protocol: Option<Proto>,
    /// Empty: every port.
    pub ports: Vec<u16>,
}

impl Scope {
    /// The kernel entries that let a pod call `ip` within this scope: one per protocol and
    /// port (port 0: every port).
    pub fn keys(&self, ip: IpAddr) -> Vec<ResolvedKey> {
        let protocols: &[Proto] = match self.protocol {
            Some(p) => &[p][..],
            None => &[Proto::Tcp, Proto::Udp],
        };
        let ports: &[u16] = if self.ports.is_empty() { &[0] } else { &self.ports };
        let mut keys = Vec::with_capacity(protocols.len() * ports.len());
        for &protocol in protocols {
            for &port in ports {
                keys.push(ResolvedKey { ip, protocol, port });
            }
        }
        keys
    }
}

/// Whether a pod may resolve a name, and what it may then call there.
pub trait Gate: Send + Sync + 'static {
    /// For the query from `client` over `transport`: the block-mode pod that sent it (its cgroup
    /// id) and what the addresses of `name` (lowercase, no trailing dot) allow, or `None` to
    /// refuse it (no block-mode pod sent it, or the name is not allowed).
    fn decide(&self, client: SocketAddr, transport: Transport, name: &str) -> Option<(u64, Vec<Scope>)>;

    /// The kernel entries an answer about `name` just made for `pod`, each with when it
    /// expires (CLOCK_MONOTONIC ns).
    fn resolved(&self, _pod: u64, _name: &str, _allowed: &[(ResolvedKey, u64)]) {}
}

/// How the resolver answers.
pub struct Resolver {
    /// Decides each query.
    pub gate: Arc<dyn Gate>,
    /// The server that answers allowed queries.
    pub upstream: SocketAddr,
    /// Where the addresses go.
    pub allow: AllowList,
    /// Shortest time an address stays allowed, whatever the answer's TTL.
    pub ttl_floor: Duration,
    /// The code of a refusal: 5 (REFUSED) or 3 (NXDOMAIN).
    pub refuse_rcode: u8,
    /// How long to wait for the upstream.
    pub timeout: Duration,
    /// Where the answers given to pods go (pod cgroup, the answer), before the pods get them:
    /// the agent names their calls from them, as it names other pods' calls from the answers
    /// the kernel copies. Full: the answer names nothing (the call is reported by address).
    pub answers: Option<tokio::sync::mpsc::Sender<(u64, Vec<u8>)>>,
}

/// Queries in flight at once; past it a query is dropped (its client asks again).
const IN_FLIGHT: usize = 256;
/// TCP connections at once; past it a connection is closed at once.
const TCP_CONNECTIONS: usize = 64;
/// How long a TCP connection may stay idle between queries.
const TCP_IDLE: Duration = Duration::from_secs(10);

/// How a query reached the resolver, and so how it goes upstream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transport {
    /// A datagram each way.
    Udp,
    /// Length-prefixed messages on a connection.
    Tcp,
}

impl Resolver {
    /// Answers queries on `socket` until it fails.
    pub async fn serve_udp(self: Arc<Self>, socket: UdpSocket) {
        let socket = Arc::new(socket);
        let permits = Arc::new(Semaphore::new(IN_FLIGHT));
        let mut buf = vec![0u8; 65_535];
        loop {
            let (n, client) = match socket.recv_from(&mut buf).await {
                Ok(got) => got,
                Err(e) => {
                    warn!(error = %e, "the DNS resolver's socket failed");
                    return;
                }
            };
            let Ok(permit) = permits.clone().try_acquire_owned() else {
                debug!(%client, "DNS query dropped: too many in flight");
                continue;
            };
            let (query, me, socket) = (buf[..n].to_vec(), self.clone(), socket.clone());
            tokio::spawn(async move {
                if let Some(reply) = me.answer(&query, client, Transport::Udp).await {
                    let _ = socket.send_to(&reply, client).await;
                }
                drop(permit);
            });
        }
    }

    /// Answers queries on TCP connections accepted from `listener` until it fails: each
    /// length-prefixed, as many as the client sends, until it closes or idles.
    pub async fn serve_tcp(self: Arc<Self>, listener: TcpListener) {
        let permits = Arc::new(Semaphore::new(TCP_CONNECTIONS));
        loop {
            let (conn, client) = match listener.accept().await {
                Ok(got) => got,
                Err(e) => {
                    warn!(error = %e, "the DNS resolver's TCP listener failed");
                    return;
                }
            };
            let Ok(permit) = permits.clone().try_acquire_owned() else {
                debug!(%client, "DNS connection closed: too many open");
                continue;
            };
            let me = self.clone();
            tokio::spawn(async move {
                let _ = tokio::time::timeout(Duration::from_secs(600), me.connection(conn, client)).await;
                drop(permit);
            });
        }
    }

    async fn connection(&self, mut conn: TcpStream, client: SocketAddr) {
        loop {
            let Ok(Ok(query)) = tokio::time::timeout(TCP_IDLE, read_message(&mut conn)).await else {
                return;
            };
            let Some(reply) = self.answer(&query, client, Transport::Tcp).await else {
                return;
            };
            if write_message(&mut conn, &reply).await.is_err() {
                return;
            }
        }
    }

    /// The reply to one query from `client`, or `None` to send nothing.
    pub async fn answer(&self, query: &[u8], client: SocketAddr, transport: Transport) -> Option<Vec<u8>> {
        let parsed = dns::parse_query(query).ok()?;
        // One question, as every resolver library sends; anything else is refused.
        let [name] = parsed.questions.as_slice() else {
            return dns::refusal(query, 5).ok();
        };
        let Some((pod, scopes)) = self.gate.decide(client, transport, name) else {
            debug!(%client, name, "DNS query refused: not allowed");
            return dns::refusal(query, self.refuse_rcode).ok();
        };
        let reply = match transport {
            Transport::Udp => self.ask_upstream(query, parsed.id).await?,
            Transport::Tcp => self.ask_upstream_tcp(query, parsed.id).await?,
        };
        // Addresses first, then the answer: the pod's connect cannot overtake them.
        let mut allowed = Vec::new();
        if let Ok(message) = dns::parse(&reply) {
            let now = monotonic_ns();
            for resolution in dns::resolutions(&message) {
                if resolution.names.first() != Some(name) {
                    continue;
                }
                let ttl = Duration::from_secs(u64::from(resolution.ttl)).max(self.ttl_floor);
                let expires_ns = now.saturating_add(u64::try_from(ttl.as_nanos()).unwrap_or(u64::MAX));
                for scope in &scopes {
                    for key in scope.keys(resolution.ip) {
                        if let Err(e) = self.allow.allow_resolved(pod, name, key, expires_ns) {
                            // Not allowed, so the pod's connect is refused: closed, and said.
                            warn!(error = %e, ip = %resolution.ip, name, "could not allow a resolved address");
                            continue;
                        }
                        allowed.push((key, expires_ns));
                    }
                }
            }
        }
        if !allowed.is_empty() {
            self.gate.resolved(pod, name, &allowed);
        }
        if let Some(answers) = &self.answers {
            let _ = answers.try_send((pod, reply.clone()));
        }
        Some(reply)
    }

    /// Sends `query` to the upstream from a fresh socket (a port of its own per query) and
    /// waits for the reply with the same id.
    async fn ask_upstream(&self, query: &[u8], id: u16) -> Option<Vec<u8>> {
        let local: SocketAddr = if self.upstream.is_ipv4() { ([0, 0, 0, 0], 0).into() } else { ([0u16; 8], 0).into() };
        let socket = UdpSocket::bind(local).await.ok()?;
        socket.connect(self.upstream).await.ok()?;
        socket.send(query).await.ok()?;
        let mut buf = vec![0u8; 65_535];
        let wait = async {
            loop {
                let n = socket.recv(&mut buf).await.ok()?;
                if n >= 2 && u16::from_be_bytes([buf[0], buf[1]]) == id {
                    return Some(buf[..n].to_vec());
                }
            }
        };
        match tokio::time::timeout(self.timeout, wait).await {
            Ok(reply) => reply,
            Err(_) => {
                debug!(upstream = %self.upstream, "the upstream DNS server did not answer in time");
                None
            }
        }
    }

    /// Sends `query` to the upstream over a TCP connection of its own and reads the reply.
    async fn ask_upstream_tcp(&self, query: &[u8], id: u16) -> Option<Vec<u8>> {
        let exchange = async {
            let mut conn = TcpStream::connect(self.upstream).await.ok()?;
            write_message(&mut conn, query).await.ok()?;
            let reply = read_message(&mut conn).await.ok()?;
            (reply.len() >= 2 && u16::from_be_bytes([reply[0], reply[1]]) == id).then_some(reply)
        };
        tokio::time::timeout(self.timeout, exchange).await.ok().flatten()
    }
}

/// One length-prefixed DNS message from a TCP stream.
async fn read_message(conn: &mut TcpStream) -> std::io::Result<Vec<u8>> {
    let len = conn.read_u16().await?;
    let mut message = vec![0u8; usize::from(len)];
    conn.read_exact(&mut message).await?;
    Ok(message)
}

async fn write_message(conn: &mut TcpStream, message: &[u8]) -> std::io::Result<()> {
    let len = u16::try_from(message.len()).map_err(|_| std::io::Error::other("a DNS message over 64 KiB"))?;
    let mut framed = Vec::with_capacity(message.len() + 2);
    framed.extend(len.to_be_bytes());
    framed.extend(message);
    conn.write_all(&framed).await
}
