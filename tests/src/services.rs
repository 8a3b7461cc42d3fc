//! What runner pods on the test node call: a DNS server and HTTP listeners on the node's bridge
//! (`node::NODE_IP` and the test addresses), so that no test traffic leaves the machine.

use std::collections::{HashMap, VecDeque};
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, UdpSocket};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use simple_dns::rdata::{A, RData};
use simple_dns::{CLASS, Packet, PacketFlag, QTYPE, RCODE, ResourceRecord, TYPE};

/// A DNS server answering A queries for the names it was given (NXDOMAIN for others), on UDP.
#[derive(Debug, Clone)]
pub struct Dns {
    names: Arc<Mutex<HashMap<String, Ipv4Addr>>>,
    /// Names whose answers are sent this much later (from a thread of their own).
    delays: Arc<Mutex<HashMap<String, Duration>>>,
    /// Queries answered.
    pub queries: Arc<AtomicU64>,
    /// The last [`LOG_LINES`] packets received, one line each, for a failing test to print.
    log: Arc<Mutex<VecDeque<String>>>,
}

/// How many received packets [`Dns::recent`] keeps.
const LOG_LINES: usize = 400;

impl Dns {
    /// Serves on `addr` (e.g. the node's address, port 53) from a thread that lives as long as
    /// the process.
    pub fn start(addr: SocketAddr) -> std::io::Result<Dns> {
        let socket = UdpSocket::bind(addr)?;
        let dns = Dns { names: Arc::default(), delays: Arc::default(), queries: Arc::default(), log: Arc::default() };
        let served = dns.clone();
        let started = std::time::Instant::now();
        std::thread::Builder::new().name("test-dns".into()).spawn(move || {
            let mut buf = [0u8; 1500];
            loop {
                let (n, from) = match socket.recv_from(&mut buf) {
                    Ok(got) => got,
                    Err(e) => {
                        served.note(format!("{:9.3}s receive failed: {e}", started.elapsed().as_secs_f64()));
                        continue;
                    }
                };
                let (reply, what) = served.answer(&buf[..n]);
                if let (Some(reply), Some(delay)) = (&reply, served.delay_of(&buf[..n]))
                    && let Ok(later) = socket.try_clone()
                {
                    let reply = reply.clone();
                    std::thread::spawn(move || {
                        std::thread::sleep(delay);
                        let _ = later.send_to(&reply, from);
                    });
                    served.note(format!(
                        "{:9.3}s {from} {what}: answered {delay:?} later",
                        started.elapsed().as_secs_f64()
                    ));
                    continue;
                }
                let sent = match reply.map(|r| socket.send_to(&r, from)) {
                    Some(Ok(_)) => "answered".to_string(),
                    Some(Err(e)) => format!("answer not sent: {e}"),
                    None => "not answered".to_string(),
                };
                served.note(format!("{:9.3}s {from} {what}: {sent}", started.elapsed().as_secs_f64()));
            }
        })?;
        Ok(dns)
    }

    /// Makes `name` resolve to `ip` (TTL 30 s).
    pub fn insert(&self, name: &str, ip: Ipv4Addr) {
        self.names.lock().unwrap().insert(name.trim_end_matches('.').to_ascii_lowercase(), ip);
    }

    /// Answers queries for `name` `delay` later (a slow upstream), without holding up others.
    pub fn delay(&self, name: &str, delay: Duration) {
        self.delays.lock().unwrap().insert(name.trim_end_matches('.').to_ascii_lowercase(), delay);
    }

    /// How much later `query` is to be answered, if its name is delayed.
    fn delay_of(&self, query: &[u8]) -> Option<Duration> {
        let query = Packet::parse(query).ok()?;
        let delays = self.delays.lock().unwrap();
        query
            .questions
            .iter()
            .find_map(|q| delays.get(q.qname.to_string().to_ascii_lowercase().trim_end_matches('.')).copied())
    }

    /// The packets received lately, oldest first, one line each (time since start, sender,
    /// query id, questions, outcome): what a test prints when a pod's lookup failed.
    pub fn recent(&self) -> String {
        let log = self.log.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        log.iter().map(|l| format!("{l}\n")).collect()
    }

    fn note(&self, line: String) {
        let mut log = self.log.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if log.len() == LOG_LINES {
            log.pop_front();
        }
        log.push_back(line);
    }

    /// The reply to `query`, if it parses, and what it was, for the log.
    fn answer(&self, query: &[u8]) -> (Option<Vec<u8>>, String) {
        let query = match Packet::parse(query) {
            Ok(q) => q,
            Err(e) => return (None, format!("{} bytes that do not parse ({e})", query.len())),
        };
        let mut what = format!("id {}", query.id());
        for q in &query.questions {
            what.push_str(&format!(" {:?} {}", q.qtype, q.qname));
        }
        let mut reply = query.into_reply();
        reply.set_flags(PacketFlag::AUTHORITATIVE_ANSWER);
        let names = self.names.lock().unwrap();
        let mut known = false;
        for q in reply.questions.clone() {
            let name = q.qname.to_string().to_ascii_lowercase();
            if let Some(ip) = names.get(name.trim_end_matches('.')) {
                known = true;
                if q.qtype == QTYPE::TYPE(TYPE::A) {
                    reply.answers.push(ResourceRecord::new(q.qname.clone(), CLASS::IN, 30, RData::A(A::from(*ip))));
                }
            }
        }
        if !known {
            *reply.rcode_mut() = RCODE::NameError;
            what.push_str(" NXDOMAIN");
        }
        self.queries.fetch_add(1, Ordering::Relaxed);
        match reply.build_bytes_vec() {
            Ok(bytes) => (Some(bytes), what),
            Err(e) => (None, format!("{what}, reply not built ({e})")),
        }
    }
}

/// An HTTP listener that answers every request with `200 ok` and counts connections.
#[derive(Debug, Clone)]
pub struct Listener {
    /// Where it listens.
    pub addr: SocketAddr,
    /// Connections accepted.
    pub connections: Arc<AtomicU64>,
    /// When the first connection was accepted.
    first: Arc<Mutex<Option<std::time::SystemTime>>>,
}

impl Listener {
    /// Listens on `addr` from a thread that lives as long as the process.
    pub fn start(addr: SocketAddr) -> std::io::Result<Listener> {
        let listener = TcpListener::bind(addr)?;
        let addr = listener.local_addr()?;
        let connections = Arc::new(AtomicU64::new(0));
        let counted = connections.clone();
        let first = Arc::new(Mutex::new(None));
        let first_seen = first.clone();
        std::thread::Builder::new().name(format!("test-http-{addr}")).spawn(move || {
            for stream in listener.incoming().flatten() {
                first_seen.lock().unwrap().get_or_insert_with(std::time::SystemTime::now);
                counted.fetch_add(1, Ordering::Relaxed);
                std::thread::spawn(move || {
                    let mut stream = stream;
                    let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
                    let mut buf = [0u8; 1024];
                    let _ = stream.read(&mut buf);
                    let _ = stream.write_all(b"HTTP/1.0 200 OK\r\nContent-Length: 3\r\n\r\nok\n");
                });
            }
        })?;
        Ok(Listener { addr, connections, first })
    }

    /// When the first connection was accepted, if one was.
    pub fn first_accept(&self) -> Option<std::time::SystemTime> {
        *self.first.lock().unwrap()
    }

    /// Connections accepted so far.
    pub fn count(&self) -> u64 {
        self.connections.load(Ordering::Relaxed)
    }
}

/// A request an [`HttpSink`] received.
#[derive(Clone, Debug)]
pub struct Received {
    /// Request line, e.g. `POST /hooks/x HTTP/1.1`.
    pub line: String,
    /// Headers, names lowercased.
    pub headers: HashMap<String, String>,
    /// The body.
    pub body: Vec<u8>,
}

/// An HTTP receiver of webhooks (plain HTTP/1.1 with `Content-Length` bodies): records every
/// request and answers `200`, or `503` to the first [`HttpSink::fail_next`] requests.
#[derive(Debug, Clone)]
pub struct HttpSink {
    /// Where it listens.
    pub addr: SocketAddr,
    received: Arc<Mutex<Vec<Received>>>,
    failures: Arc<AtomicU64>,
}

impl HttpSink {
    /// Listens on `addr` from a thread that lives as long as the process.
    pub fn start(addr: SocketAddr) -> std::io::Result<HttpSink> {
        let listener = TcpListener::bind(addr)?;
        let sink = HttpSink { addr: listener.local_addr()?, received: Arc::default(), failures: Arc::default() };
        let served = sink.clone();
        std::thread::Builder::new().name(format!("test-sink-{}", sink.addr)).spawn(move || {
            for stream in listener.incoming().flatten() {
                let served = served.clone();
                std::thread::spawn(move || served.serve(stream));
            }
        })?;
        Ok(sink)
    }

    /// Answers `503 Service Unavailable` to the next `n` requests (they are still recorded).
    pub fn fail_next(&self, n: u64) {
        self.failures.store(n, Ordering::Relaxed);
    }

    /// What it received so far, oldest first.
    pub fn received(&self) -> Vec<Received> {
        self.received.lock().unwrap().clone()
    }

    fn serve(&self, mut stream: std::net::TcpStream) {
        let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
        let mut reader = std::io::BufReader::new(stream.try_clone().expect("cloning a TCP stream"));
        loop {
            let mut line = String::new();
            if std::io::BufRead::read_line(&mut reader, &mut line).unwrap_or(0) == 0 {
                return;
            }
            let mut headers = HashMap::new();
            loop {
                let mut header = String::new();
                if std::io::BufRead::read_line(&mut reader, &mut header).unwrap_or(0) == 0 {
                    return;
                }
                let header = header.trim_end();
                if header.is_empty() {
                    break;
                }
                if let Some((k, v)) = header.split_once(':') {
                    headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
                }
            }
            let length = headers.get("content-length").and_then(|l| l.parse().ok()).unwrap_or(0);
            let mut body = vec![0; length];
            if reader.read_exact(&mut body).is_err() {
                return;
            }
            self.received.lock().unwrap().push(Received { line: line.trim_end().to_string(), headers, body });
            let fail = self.failures.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1)).is_ok();
            let answer: &[u8] = if fail {
                b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 5\r\n\r\nbusy\n"
            } else {
                b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nok\n"
            };
            if stream.write_all(answer).is_err() {
                return;
            }
        }
    }
}

/// An SMTP relay with STARTTLS and AUTH required (`tests/smtp/relay.py` on Debian's aiosmtpd),
/// on 127.0.0.1, with a certificate of its own for `localhost`. Stops when dropped.
#[derive(Debug)]
pub struct SmtpRelay {
    /// Its port on 127.0.0.1.
    pub port: u16,
    /// The PEM certificate of the CA that signed its certificate (what a client trusts).
    pub certificate: String,
    dir: std::path::PathBuf,
    child: std::process::Child,
}

impl SmtpRelay {
    /// Starts it, accepting `user` with `password`; panics with the reason when it cannot.
    pub fn start(user: &str, password: &str) -> SmtpRelay {
        use std::io::BufRead;
        let dir = std::env::temp_dir().join(format!("runwarden-smtp-{}-{}", std::process::id(), unique()));
        let out = dir.join("mail");
        std::fs::create_dir_all(&out).unwrap();
        // A CA of its own and the relay's certificate for localhost, signed by it.
        let (ca, ca_key) = (dir.join("ca.crt"), dir.join("ca.key"));
        let (cert, key, csr) = (dir.join("relay.crt"), dir.join("relay.key"), dir.join("relay.csr"));
        let ext = dir.join("relay.ext");
        std::fs::write(&ext, "basicConstraints=critical,CA:FALSE\nsubjectAltName=DNS:localhost\n").unwrap();
        let openssl = |args: &[&std::ffi::OsStr]| {
            let made = std::process::Command::new("openssl")
                .args(args)
                .output()
                .expect("running openssl (make setup installs it)");
            assert!(made.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&made.stderr));
        };
        let ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"].map(std::ffi::OsStr::new);
        let os = |s: &'static str| std::ffi::OsStr::new(s);
        openssl(
            &[&[os("req"), os("-x509")], &ec[..], &[os("-days"), os("1"), os("-subj"), os("/CN=runwarden test CA")]]
                .concat()
                .into_iter()
                .chain([os("-keyout"), ca_key.as_os_str(), os("-out"), ca.as_os_str()])
                .collect::<Vec<_>>(),
        );
        openssl(
            &[&[os("req")], &ec[..], &[os("-subj"), os("/CN=localhost")]]
                .concat()
                .into_iter()
                .chain([os("-keyout"), key.as_os_str(), os("-out"), csr.as_os_str()])
                .collect::<Vec<_>>(),
        );
        openssl(&[
            os("x509"),
            os("-req"),
            os("-days"),
            os("1"),
            os("-in"),
            csr.as_os_str(),
            os("-CA"),
            ca.as_os_str(),
            os("-CAkey"),
            ca_key.as_os_str(),
            os("-CAcreateserial"),
            os("-extfile"),
            ext.as_os_str(),
            os("-out"),
            cert.as_os_str(),
        ]);
        let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/smtp/relay.py");
        let mut child = std::process::Command::new("/usr/bin/python3")
            .arg(script)
            .arg(port.to_string())
            .arg(&cert)
            .arg(&key)
            .args([user, password])
            .arg(&out)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            // Its session errors (a client that refuses its certificate, on purpose) go to a log.
            .stderr(std::fs::File::create(dir.join("relay.log")).unwrap())
            .spawn()
            .expect("running /usr/bin/python3 (make setup installs python3-aiosmtpd)");
        let mut line = String::new();
        std::io::BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
        assert_eq!(line.trim(), "ready", "tests/smtp/relay.py did not start (is python3-aiosmtpd installed?)");
        let certificate = std::fs::read_to_string(&ca).unwrap();
        SmtpRelay { port, certificate, dir, child }
    }

    /// The messages it accepted, oldest first, as a person reads them: `X-Envelope-From`,
    /// `X-Envelope-To`, `X-Authenticated`, then `From`, `To` and `Subject` decoded, a blank line
    /// and the decoded text.
    pub fn messages(&self) -> Vec<String> {
        let mut names: Vec<_> = std::fs::read_dir(self.dir.join("mail"))
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter_map(|n| n.strip_suffix(".txt").and_then(|n| n.parse::<u32>().ok()))
            .collect();
        names.sort_unstable();
        names
            .into_iter()
            .map(|n| std::fs::read_to_string(self.dir.join("mail").join(format!("{n}.txt"))).unwrap())
            .collect()
    }
}

impl Drop for SmtpRelay {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A number no other call in this process returns.
fn unique() -> u64 {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

/// A DNS query (type A) for `name` with transaction id `id`, as a resolver library sends it.
pub fn dns_query(id: u16, name: &str) -> Vec<u8> {
    let mut query = Packet::new_query(id);
    query.set_flags(PacketFlag::RECURSION_DESIRED);
    query.questions.push(simple_dns::Question::new(
        simple_dns::Name::new_unchecked(name),
        QTYPE::TYPE(TYPE::A),
        simple_dns::QCLASS::CLASS(CLASS::IN),
        false,
    ));
    query.build_bytes_vec().expect("a query builds")
}

/// The answer to [`dns_query`] `id`/`name` saying `name` is `ip` (TTL 30 s).
pub fn dns_answer(id: u16, name: &str, ip: Ipv4Addr) -> Vec<u8> {
    let mut reply = Packet::new_reply(id);
    let qname = simple_dns::Name::new_unchecked(name);
    reply.questions.push(simple_dns::Question::new(
        qname.clone(),
        QTYPE::TYPE(TYPE::A),
        simple_dns::QCLASS::CLASS(CLASS::IN),
        false,
    ));
    reply.answers.push(ResourceRecord::new(qname, CLASS::IN, 30, RData::A(A::from(ip))));
    reply.build_bytes_vec().expect("an answer builds")
}
