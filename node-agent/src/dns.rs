//! DNS answers: what names a pod looked up for the addresses it then calls.
//!
//! The kernel program copies a bounded prefix of every UDP reply from port 53 a monitored pod
//! receives; [`parse`] reads it (RFC 1035 wire format: header, questions, answers; names with
//! compression pointers) and [`resolutions`] follows CNAME chains from the question to the
//! addresses. Input comes from the network: every length and pointer is checked, pointers may
//! only point backwards, and a malformed or cut-off message is an error, never a panic.
//!
//! [`DnsCache`] keeps, per pod, which names each address was answered for, until the record's
//! TTL (clamped to a floor and a cap) runs out. An address answered for several names keeps all
//! of them.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// Longest DNS name in text form.
const MAX_NAME: usize = 253;
/// Most compression jumps followed in one name (a loop guard besides "backwards only").
const MAX_JUMPS: usize = 32;
/// Most records read from one message.
const MAX_RECORDS: usize = 256;

/// Why a message could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DnsError {
    /// The message ends before a field it announces.
    #[error("message cut off at byte {0}")]
    Truncated(usize),
    /// A compression pointer points forwards or at itself, or there are too many.
    #[error("bad compression pointer at byte {0}")]
    BadPointer(usize),
    /// A label type other than a plain label or a pointer.
    #[error("unsupported label type at byte {0}")]
    BadLabel(usize),
    /// A name longer than 253 characters.
    #[error("name too long at byte {0}")]
    NameTooLong(usize),
    /// Not a response.
    #[error("not a DNS response")]
    NotAResponse,
    /// Not a query.
    #[error("not a DNS query")]
    NotAQuery,
}

/// What a record says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RecordData {
    /// An IPv4 address.
    A(Ipv4Addr),
    /// An IPv6 address.
    Aaaa(Ipv6Addr),
    /// An alias: the canonical name.
    Cname(String),
    /// Any other type (kept as its number).
    Other(u16),
}

/// One answer record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// Owner name, lowercase, without the trailing dot.
    pub name: String,
    /// Time to live, seconds.
    pub ttl: u32,
    /// The data.
    pub data: RecordData,
}

/// A parsed response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    /// Transaction id.
    pub id: u16,
    /// Response code (0: no error, 3: NXDOMAIN).
    pub rcode: u8,
    /// The TC bit: the server cut the answer (the client retries over TCP).
    pub truncated: bool,
    /// Names asked for.
    pub questions: Vec<String>,
    /// Answer records, in order.
    pub answers: Vec<Record>,
}

/// An address and every name it was answered for: the question and the CNAMEs leading to it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resolution {
    /// The address.
    pub ip: IpAddr,
    /// TTL of the address record.
    pub ttl: u32,
    /// The question name first, then each alias on the way to the address.
    pub names: Vec<String>,
}

struct Reader<'a> {
    msg: &'a [u8],
    pos: usize,
}

impl Reader<'_> {
    fn u8(&mut self) -> Result<u8, DnsError> {
        let b = *self.msg.get(self.pos).ok_or(DnsError::Truncated(self.pos))?;
        self.pos += 1;
        Ok(b)
    }

    fn u16(&mut self) -> Result<u16, DnsError> {
        Ok(u16::from(self.u8()?) << 8 | u16::from(self.u8()?))
    }

    fn u32(&mut self) -> Result<u32, DnsError> {
        Ok(u32::from(self.u16()?) << 16 | u32::from(self.u16()?))
    }

    fn bytes(&mut self, n: usize) -> Result<&[u8], DnsError> {
        let end =
            self.pos.checked_add(n).filter(|&e| e <= self.msg.len()).ok_or(DnsError::Truncated(self.msg.len()))?;
        let out = &self.msg[self.pos..end];
        self.pos = end;
        Ok(out)
    }

    /// Reads a name at the current position, following compression pointers.
    fn name(&mut self) -> Result<String, DnsError> {
        let mut out = String::new();
        let mut at = self.pos;
        let mut jumped = false;
        let mut jumps = 0;
        loop {
            let len = *self.msg.get(at).ok_or(DnsError::Truncated(at))?;
            match len & 0xc0 {
                0x00 if len == 0 => {
                    if !jumped {
                        self.pos = at + 1;
                    }
                    return Ok(out);
                }
                0x00 => {
                    let start = at + 1;
                    let label =
                        self.msg.get(start..start + usize::from(len)).ok_or(DnsError::Truncated(self.msg.len()))?;
                    if !out.is_empty() {
                        out.push('.');
                    }
                    out.extend(label.iter().map(|b| b.to_ascii_lowercase() as char));
                    if out.len() > MAX_NAME {
                        return Err(DnsError::NameTooLong(at));
                    }
                    at = start + usize::from(len);
                }
                0xc0 => {
                    let low = *self.msg.get(at + 1).ok_or(DnsError::Truncated(at + 1))?;
                    let target = usize::from(len & 0x3f) << 8 | usize::from(low);
                    // Only backwards: a pointer to itself or ahead could loop.
                    if target >= at || jumps == MAX_JUMPS {
                        return Err(DnsError::BadPointer(at));
                    }
                    if !jumped {
                        self.pos = at + 2;
                        jumped = true;
                    }
                    jumps += 1;
                    at = target;
                }
                _ => return Err(DnsError::BadLabel(at)),
            }
        }
    }
}

/// Parses a DNS response.
pub fn parse(msg: &[u8]) -> Result<Message, DnsError> {
    parse_inner(msg, false)
}

/// Parses the first bytes of a longer DNS response (the kernel copies at most 1,024 bytes of
/// each answer): the answer records that fit whole are returned, the one cut off and any after
/// it are left out, and the message is marked `truncated`.
pub fn parse_prefix(msg: &[u8]) -> Result<Message, DnsError> {
    parse_inner(msg, true)
}

/// A query a pod sent: what its answer must repeat.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Query {
    /// Transaction id.
    pub id: u16,
    /// Names asked for (lowercase, without the trailing dot).
    pub questions: Vec<String>,
}

/// Parses a DNS query (its header and question section).
pub fn parse_query(msg: &[u8]) -> Result<Query, DnsError> {
    let mut r = Reader { msg, pos: 0 };
    let id = r.u16()?;
    if r.u16()? & 0x8000 != 0 {
        return Err(DnsError::NotAQuery);
    }
    let qd = r.u16()?;
    r.bytes(6)?; // answer, authority and additional counts
    let mut questions = Vec::new();
    for _ in 0..qd.min(MAX_RECORDS as u16) {
        questions.push(r.name()?);
        r.bytes(4)?; // type, class
    }
    Ok(Query { id, questions })
}

/// The answer to `query` that says no (`rcode`: 5 REFUSED, 3 NXDOMAIN): its header with the
/// response bit, recursion available and the code, and its question section; nothing else.
pub fn refusal(query: &[u8], rcode: u8) -> Result<Vec<u8>, DnsError> {
    let mut r = Reader { msg: query, pos: 0 };
    let _id = r.u16()?;
    let flags = r.u16()?;
    if flags & 0x8000 != 0 {
        return Err(DnsError::NotAQuery);
    }
    let qd = r.u16()?;
    r.bytes(6)?;
    for _ in 0..qd.min(MAX_RECORDS as u16) {
        r.name()?;
        r.bytes(4)?;
    }
    let mut out = query[..r.pos].to_vec();
    // QR, the query's opcode and RD, RA, the code.
    let flags = 0x8000 | (flags & 0x7900) | 0x0080 | u16::from(rcode & 0x0f);
    out[2..4].copy_from_slice(&flags.to_be_bytes());
    out[4..6].copy_from_slice(&qd.min(MAX_RECORDS as u16).to_be_bytes());
    out[6..12].fill(0);
    Ok(out)
}

fn parse_inner(msg: &[u8], cut: bool) -> Result<Message, DnsError> {
    let mut r = Reader { msg, pos: 0 };
    let id = r.u16()?;
    let flags = r.u16()?;
    if flags & 0x8000 == 0 {
        return Err(DnsError::NotAResponse);
    }
    let (qd, an) = (r.u16()?, r.u16()?);
    let _authority_and_additional = (r.u16()?, r.u16()?);
    let mut questions = Vec::new();
    for _ in 0..qd.min(MAX_RECORDS as u16) {
        questions.push(r.name()?);
        r.bytes(4)?; // type, class
    }
    let mut answers = Vec::new();
    for _ in 0..an.min(MAX_RECORDS as u16) {
        match answer(&mut r) {
            Ok(record) => answers.push(record),
            Err(_) if cut => break,
            Err(e) => return Err(e),
        }
    }
    Ok(Message { id, rcode: (flags & 0x000f) as u8, truncated: cut || flags & 0x0200 != 0, questions, answers })
}

fn answer(r: &mut Reader<'_>) -> Result<Record, DnsError> {
    let name = r.name()?;
    let (rtype, _class, ttl, len) = (r.u16()?, r.u16()?, r.u32()?, r.u16()?);
    let rdata_start = r.pos;
    let data = match (rtype, len) {
        (1, 4) => {
            let b = r.bytes(4)?;
            RecordData::A(Ipv4Addr::new(b[0], b[1], b[2], b[3]))
        }
        (28, 16) => {
            let b: [u8; 16] = r.bytes(16)?.try_into().expect("16 bytes were read");
            RecordData::Aaaa(Ipv6Addr::from(b))
        }
        (5, _) => {
            let target = r.name()?;
            r.pos = rdata_start;
            r.bytes(usize::from(len))?;
            RecordData::Cname(target)
        }
        _ => {
            r.bytes(usize::from(len))?;
            RecordData::Other(rtype)
        }
    };
    Ok(Record { name, ttl, data })
}

/// Every address in `msg` with the names it was answered for: the question name and the CNAME
/// chain leading to the address record. Records unrelated to the question are ignored (a
/// resolver has no business adding them, and an attacker could use them to name an address).
pub fn resolutions(msg: &Message) -> Vec<Resolution> {
    let mut out = Vec::new();
    for question in &msg.questions {
        // Follow the chain: question -> alias -> ... ; bounded by the number of records.
        let mut chain = vec![question.clone()];
        for _ in 0..msg.answers.len() {
            let last = chain.last().expect("the chain starts with the question");
            let next = msg.answers.iter().find_map(|r| match &r.data {
                RecordData::Cname(target) if &r.name == last && !chain.contains(target) => Some(target.clone()),
                _ => None,
            });
            match next {
                Some(target) => chain.push(target),
                None => break,
            }
        }
        for r in &msg.answers {
            let ip = match r.data {
                RecordData::A(v4) => IpAddr::V4(v4),
                RecordData::Aaaa(v6) => IpAddr::V6(v6),
                _ => continue,
            };
            if let Some(depth) = chain.iter().position(|n| n == &r.name) {
                out.push(Resolution { ip, ttl: r.ttl, names: chain[..=depth].to_vec() });
            }
        }
    }
    out
}

/// TTL bounds of the cache: short TTLs still name the connect that follows the lookup; long
/// ones do not keep a stale name forever.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TtlBounds {
    /// Seconds a name is kept at least.
    pub floor: u32,
    /// Seconds a name is kept at most.
    pub cap: u32,
}

impl Default for TtlBounds {
    fn default() -> Self {
        Self { floor: 30, cap: 3600 }
    }
}

/// One pod's addresses and the names they were answered for.
#[derive(Debug, Default)]
pub struct DnsCache {
    /// Per address: (name, when it expires, whether a question asked for it) in the order
    /// they were answered.
    by_ip: HashMap<IpAddr, Vec<(String, u64, bool)>>,
    bounds: TtlBounds,
    /// Most addresses kept; past it the entries expiring soonest go first.
    max_addresses: usize,
}

impl DnsCache {
    /// An empty cache with TTL bounds, holding at most `max_addresses` addresses.
    pub fn new(bounds: TtlBounds, max_addresses: usize) -> Self {
        Self { by_ip: HashMap::new(), bounds, max_addresses }
    }

    /// Remembers what `msg` answered, at `now` (seconds on the caller's monotonic clock).
    pub fn insert(&mut self, msg: &Message, now: u64) {
        for res in resolutions(msg) {
            let ttl = res.ttl.clamp(self.bounds.floor, self.bounds.cap);
            let expires = now + u64::from(ttl);
            let names = self.by_ip.entry(res.ip).or_default();
            for (i, name) in res.names.into_iter().enumerate() {
                // The first name of a resolution is its question; the others are aliases.
                let question = i == 0;
                match names.iter_mut().find(|(n, _, _)| *n == name) {
                    Some((_, e, q)) => {
                        *e = (*e).max(expires);
                        *q |= question;
                    }
                    None => names.push((name, expires, question)),
                }
            }
        }
        if self.by_ip.len() > self.max_addresses {
            self.expire(now);
        }
        while self.by_ip.len() > self.max_addresses {
            let soonest = self
                .by_ip
                .iter()
                .map(|(ip, names)| (names.iter().map(|(_, e, _)| *e).max().unwrap_or(0), *ip))
                .min()
                .map(|(_, ip)| ip);
            match soonest {
                Some(ip) => self.by_ip.remove(&ip),
                None => break,
            };
        }
    }

    /// The names `ip` was answered for that are still valid at `now`: the names questions asked
    /// for first (each of them a name the pod may have connected for), then the aliases of their
    /// CNAME chains; and how many of the first are question names.
    pub fn names(&self, ip: IpAddr, now: u64) -> (Vec<&str>, usize) {
        let Some(names) = self.by_ip.get(&ip) else { return (Vec::new(), 0) };
        let valid = || names.iter().filter(|(_, e, _)| *e > now);
        let mut out: Vec<&str> = valid().filter(|(_, _, q)| *q).map(|(n, _, _)| n.as_str()).collect();
        let questions = out.len();
        out.extend(valid().filter(|(_, _, q)| !*q).map(|(n, _, _)| n.as_str()));
        (out, questions)
    }

    /// The addresses `name` was answered with that are still valid at `now`.
    pub fn addresses(&self, name: &str, now: u64) -> Vec<IpAddr> {
        let mut out: Vec<IpAddr> = self
            .by_ip
            .iter()
            .filter(|(_, names)| names.iter().any(|(n, e, _)| n == name && *e > now))
            .map(|(ip, _)| *ip)
            .collect();
        out.sort();
        out
    }

    /// Drops what expired by `now`.
    pub fn expire(&mut self, now: u64) {
        self.by_ip.retain(|_, names| {
            names.retain(|(_, e, _)| *e > now);
            !names.is_empty()
        });
    }

    /// Addresses held.
    pub fn len(&self) -> usize {
        self.by_ip.len()
    }

    /// Whether nothing is held.
    pub fn is_empty(&self) -> bool {
        self.by_ip.is_empty()
    }
}
