//! What can be told about a destination from its name or address alone: its registrable domain
//! (from the public suffix list, private section included, so `gist.githubusercontent.com` and
//! `x.blob.core.windows.net` are domains of their own), the shape of a rotating name, signs of
//! DNS tunnelling, lookalikes, and special addresses.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// The registrable domain of `host` (`api.github.com` → `github.com`;
/// `x.blob.core.windows.net` → itself, because `blob.core.windows.net` serves any customer).
/// Names under an unknown suffix (e.g. `svc.cluster.local`) return the last two labels.
pub fn registrable_domain(host: &str) -> &str {
    match psl::domain(host.as_bytes()) {
        Some(d) if d.suffix().is_known() => &host[host.len() - d.as_bytes().len()..],
        _ => last_labels(host, 2),
    }
}

/// Whether `host` is a registrable domain of its own, i.e. its first label sits directly on a
/// public suffix (`x.blob.core.windows.net`, `paste.rs`). Siblings of such a name belong to
/// other owners unless evidence says otherwise.
pub fn is_own_domain(host: &str) -> bool {
    registrable_domain(host) == host
}

fn last_labels(host: &str, n: usize) -> &str {
    let mut dots = host.rmatch_indices('.').map(|(i, _)| i);
    match dots.nth(n - 1) {
        Some(i) => &host[i + 1..],
        None => host,
    }
}

/// The shape of a rotating host: its first label with digit runs replaced by `#` and long hex
/// runs by `%`, followed by the rest of the name (`productionresultssa17.blob.core.windows.net`
/// → `productionresultssa#.blob.core.windows.net`). `None` when the first label has no
/// variable part. Whether a shape may be trusted is for the caller to judge from how many
/// siblings it saw (see [`is_own_domain`]).
pub fn rotating_shape(host: &str) -> Option<String> {
    let (first, rest) = host.split_once('.')?;
    let shape = label_shape(first);
    if shape == first { None } else { Some(format!("{shape}.{rest}")) }
}

fn label_shape(label: &str) -> String {
    let bytes = label.as_bytes();
    let mut out = String::with_capacity(label.len());
    let mut i = 0;
    while i < bytes.len() {
        // A long run of hex digits containing a digit: an id or hash.
        let hex_end = bytes[i..].iter().position(|b| !b.is_ascii_hexdigit()).map_or(bytes.len(), |p| i + p);
        if hex_end - i >= 8 && bytes[i..hex_end].iter().any(u8::is_ascii_digit) {
            out.push('%');
            i = hex_end;
            continue;
        }
        if bytes[i].is_ascii_digit() {
            while i < bytes.len() && bytes[i].is_ascii_digit() {
                i += 1;
            }
            out.push('#');
            continue;
        }
        out.push(bytes[i] as char);
        i += 1;
    }
    out
}

/// The family a learned destination may be generalised into, and how many distinct members
/// must be seen before it is: a host's rotating shape (two siblings under an owner's domain,
/// three when each is a domain of its own under a shared suffix, where anyone can register a
/// sibling), or an address's block (`/24` for IPv4, `/64` for IPv6; three addresses).
pub fn family(target: &str) -> Option<(String, usize)> {
    match target.parse::<IpAddr>() {
        Ok(ip) => Some((address_block(ip), 3)),
        Err(_) => {
            let shape = rotating_shape(target)?;
            Some((shape, if is_own_domain(target) { 3 } else { 2 }))
        }
    }
}

/// The `/24` (IPv4) or `/64` (IPv6) block of an address, in CIDR notation.
pub fn address_block(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(v4) => {
            let [a, b, c, _] = v4.octets();
            format!("{a}.{b}.{c}.0/24")
        }
        IpAddr::V6(v6) => {
            let s = v6.segments();
            format!("{}/64", Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
        }
    }
}

/// Shannon entropy of `s` in bits per character.
pub fn entropy(s: &str) -> f64 {
    let mut counts = [0u32; 256];
    for b in s.bytes() {
        counts[b as usize] += 1;
    }
    let n = s.len() as f64;
    counts.iter().filter(|&&c| c > 0).map(|&c| c as f64 / n).map(|p| -p * p.log2()).sum()
}

/// The label of `host` that looks like encoded data (DNS tunnelling): long, varied and not
/// made of words. `None` for ordinary names, including rotating ids such as CDN shards, whose
/// labels are short or pure hex.
pub fn tunnel_label(host: &str) -> Option<&str> {
    let domain = registrable_domain(host);
    let sub = host.strip_suffix(domain)?.trim_end_matches('.');
    sub.split('.').find(|l| {
        let digits = l.bytes().filter(u8::is_ascii_digit).count();
        let pure_hex = l.bytes().all(|b| b.is_ascii_hexdigit());
        l.len() >= 20 && digits >= 2 && !pure_hex && entropy(l) >= 3.5 && vowel_share(l) < 0.3
    })
}

fn vowel_share(l: &str) -> f64 {
    let letters = l.bytes().filter(u8::is_ascii_alphabetic).count().max(1);
    l.bytes().filter(|b| b"aeiou".contains(b)).count() as f64 / letters as f64
}

/// The first label of a registrable domain (`npmjs` of `npmjs.com.co`).
pub fn domain_stem(domain: &str) -> &str {
    domain.split('.').next().unwrap_or(domain)
}

/// How a registrable domain resembles another one.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Resemblance {
    /// The same name under another public suffix (`docker.io` and `docker.com`): organisations
    /// often own their name under several suffixes, so this is weak evidence.
    OtherSuffix,
    /// A stem one or two edits away (`githuh.com`), the known name with punctuation moved
    /// (`pypi-org.com`), or the known name followed by a suffix that reads as `.com`, `.org`,
    /// ... (`npmjs.com.co`): made to be mistaken for it.
    Imitation,
}

/// How registrable domain `candidate` resembles `known` without being it, if it does. Short
/// stems are not compared: too many honest collisions.
pub fn lookalike(candidate: &str, known: &str) -> Option<Resemblance> {
    Prepared::new(candidate).resembles(&Prepared::new(known))
}

/// A registrable domain with the forms the lookalike rules compare, computed once.
#[derive(Clone, Debug)]
struct Prepared {
    domain: String,
    stem_len: usize,
    /// The domain without `-` and `.`.
    squashed: String,
    /// The stem without `-`.
    squashed_stem: String,
    /// Which of 64 byte classes occur in the stem: an edit changes at most two.
    letters: u64,
}

impl Prepared {
    fn new(domain: &str) -> Self {
        let stem = domain_stem(domain);
        let letters = stem.bytes().fold(0u64, |m, b| m | 1 << (b % 64));
        Prepared {
            domain: domain.to_string(),
            stem_len: stem.len(),
            squashed: domain.replace(['-', '.'], ""),
            squashed_stem: stem.replace('-', ""),
            letters,
        }
    }

    fn stem(&self) -> &str {
        &self.domain[..self.stem_len]
    }

    fn resembles(&self, known: &Prepared) -> Option<Resemblance> {
        let (a, b) = (self.stem(), known.stem());
        if self.domain == known.domain || a.len() < 4 || b.len() < 4 {
            return None;
        }
        if a == b {
            // `npmjs.com.co`: a generic label right after the name makes it read as the original.
            let mut rest = self.domain[a.len()..].trim_start_matches('.').split('.');
            let reads_generic = matches!(rest.next(), Some("com" | "net" | "org" | "co" | "gov" | "edu"));
            return Some(if reads_generic && rest.next().is_some() {
                Resemblance::Imitation
            } else {
                Resemblance::OtherSuffix
            });
        }
        if self.squashed.starts_with(&known.squashed) || self.squashed_stem == known.squashed_stem {
            return Some(Resemblance::Imitation);
        }
        let max_edits = if b.len() >= 8 { 2 } else { 1 };
        (a.len().abs_diff(b.len()) <= max_edits
            && (self.letters ^ known.letters).count_ones() <= 2 * max_edits as u32
            && edit_distance(a, b) <= max_edits)
            .then_some(Resemblance::Imitation)
    }
}

/// Registrable domains prepared for lookalike checks: the domains a job calls, or the
/// cluster's popular ones. Built once per baseline (or cluster) version; a check is a few hash
/// lookups for the exact rules and, for the edit-distance rule, a scan of the domains whose
/// stem is within two characters of the candidate's length, filtered by which letters occur.
#[derive(Clone, Debug, Default)]
pub struct Lookalikes {
    known: Vec<Prepared>,
    /// Stem → domains with that stem (the same name under another suffix).
    by_stem: HashMap<String, Vec<u32>>,
    /// Stem without `-` → domains.
    by_squashed_stem: HashMap<String, Vec<u32>>,
    /// Domain without `-` and `.` → domains (a candidate that starts with one imitates it).
    by_squashed: HashMap<String, Vec<u32>>,
    /// Stem length → (letters, domain), for the edit-distance rule.
    by_length: HashMap<usize, Vec<(u64, u32)>>,
    /// Which lengths (below 128) the keys of `by_squashed` have: only those prefixes are looked up.
    squashed_lengths: u128,
}

impl Lookalikes {
    /// Prepares `domains` (duplicates dropped).
    pub fn new<'a>(domains: impl IntoIterator<Item = &'a str>) -> Self {
        let mut seen = std::collections::HashSet::new();
        let mut out = Lookalikes::default();
        for d in domains.into_iter().filter(|d| seen.insert(*d)) {
            let p = Prepared::new(d);
            let i = out.known.len() as u32;
            out.by_stem.entry(p.stem().to_string()).or_default().push(i);
            out.by_squashed_stem.entry(p.squashed_stem.clone()).or_default().push(i);
            out.by_squashed.entry(p.squashed.clone()).or_default().push(i);
            out.squashed_lengths |= 1u128.checked_shl(p.squashed.len() as u32).unwrap_or(0);
            out.by_length.entry(p.stem_len).or_default().push((p.letters, i));
            out.known.push(p);
        }
        out
    }

    /// The domain `candidate` resembles most (an imitation before another suffix), skipping
    /// those `skip` says to.
    pub fn find(&self, candidate: &str, skip: impl Fn(&str) -> bool) -> Option<(&str, Resemblance)> {
        if self.known.is_empty() {
            return None;
        }
        let c = Prepared::new(candidate);
        if c.stem_len < 4 {
            return None;
        }
        let mut best: Option<(&str, Resemblance)> = None;
        let mut consider = |i: u32| {
            let k = &self.known[i as usize];
            if let Some(r) = c.resembles(k)
                && best.is_none_or(|(_, b)| r > b)
                && !skip(&k.domain)
            {
                best = Some((&k.domain, r));
            }
        };
        let exact = [self.by_stem.get(c.stem()), self.by_squashed_stem.get(&c.squashed_stem)];
        for i in exact.into_iter().flatten().flatten() {
            consider(*i);
        }
        // Every prefix of the candidate's squashed form that could be a known domain's.
        for end in (5..=c.squashed.len().min(127)).filter(|n| self.squashed_lengths >> n & 1 == 1) {
            if let Some(list) = c.squashed.get(..end).and_then(|p| self.by_squashed.get(p)) {
                for i in list {
                    consider(*i);
                }
            }
        }
        for len in c.stem_len.saturating_sub(2)..=c.stem_len + 2 {
            for &(letters, i) in self.by_length.get(&len).into_iter().flatten() {
                if (c.letters ^ letters).count_ones() <= 4 {
                    consider(i);
                }
            }
        }
        best
    }

    /// Number of domains.
    pub fn len(&self) -> usize {
        self.known.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.known.is_empty()
    }
}

fn edit_distance(a: &str, b: &str) -> usize {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    // Labels are at most 63 bytes: two rows on the stack.
    let (mut prev, mut cur) = ([0usize; 64], [0usize; 64]);
    if b.len() >= prev.len() {
        return usize::MAX;
    }
    for (j, p) in prev.iter_mut().enumerate().take(b.len() + 1) {
        *p = j;
    }
    for i in 1..=a.len() {
        cur[0] = i;
        for j in 1..=b.len() {
            let sub = prev[j - 1] + usize::from(a[i - 1] != b[j - 1]);
            cur[j] = sub.min(prev[j] + 1).min(cur[j - 1] + 1);
        }
        std::mem::swap(&mut prev, &mut cur);
    }
    prev[b.len()]
}

/// Cloud instance metadata services: calls to them from CI steal the node's credentials.
pub fn is_metadata_address(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => {
            v4 == Ipv4Addr::new(169, 254, 169, 254)
                || v4 == Ipv4Addr::new(169, 254, 170, 2)
                || v4 == Ipv4Addr::new(100, 100, 100, 200)
        }
        IpAddr::V6(v6) => v6 == Ipv6Addr::new(0xfd00, 0xec2, 0, 0, 0, 0, 0, 0x254),
    }
}

/// Ports ordinary CI traffic uses: web, DNS, git, ssh.
pub fn is_standard_port(port: u16) -> bool {
    matches!(port, 80 | 443 | 53 | 22 | 9418)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registrable_domain_respects_shared_hosting_suffixes() {
        assert_eq!(registrable_domain("api.github.com"), "github.com");
        assert_eq!(registrable_domain("gist.githubusercontent.com"), "gist.githubusercontent.com");
        assert_eq!(registrable_domain("a.blob.core.windows.net"), "a.blob.core.windows.net");
        assert_eq!(registrable_domain("registry.npmjs.com.co"), "npmjs.com.co");
        assert_eq!(registrable_domain("kube-dns.kube-system.svc.cluster.local"), "cluster.local");
        assert_eq!(registrable_domain("localhost"), "localhost");
    }

    #[test]
    fn rotating_shapes_generalise_ids_not_words() {
        assert_eq!(rotating_shape("node21.archive.ubuntu.com").as_deref(), Some("node#.archive.ubuntu.com"));
        assert_eq!(
            rotating_shape("pipelinesghubeus8.actions.githubusercontent.com").as_deref(),
            Some("pipelinesghubeus#.actions.githubusercontent.com")
        );
        assert_eq!(
            rotating_shape("9236a389bd48b984df91adc1bc924620.x.r2.cloudflarestorage.com").as_deref(),
            Some("%.x.r2.cloudflarestorage.com")
        );
        assert_eq!(rotating_shape("api.github.com"), None);
        assert_eq!(
            rotating_shape("productionresultssa17.blob.core.windows.net").as_deref(),
            Some("productionresultssa#.blob.core.windows.net")
        );
        assert!(is_own_domain("productionresultssa17.blob.core.windows.net"));
        assert!(!is_own_domain("node21.archive.ubuntu.com"));
        assert_eq!(family("node21.archive.ubuntu.com"), Some(("node#.archive.ubuntu.com".into(), 2)));
        assert_eq!(
            family("productionresultssa17.blob.core.windows.net"),
            Some(("productionresultssa#.blob.core.windows.net".into(), 3))
        );
        assert_eq!(family("203.0.113.77"), Some(("203.0.113.0/24".into(), 3)));
        assert_eq!(family("2001:db8:1:2:3:4:5:6"), Some(("2001:db8:1:2::/64".into(), 3)));
    }

    #[test]
    fn tunnelling_labels_are_found_and_cdn_ids_are_not() {
        assert_eq!(tunnel_label("m5ztqmrqgi3tkmbrgmzdsnzv.d.tunnelhub.top"), Some("m5ztqmrqgi3tkmbrgmzdsnzv"));
        assert_eq!(tunnel_label("9236a389bd48b984df91adc1bc924620.r2.cloudflarestorage.com"), None);
        assert_eq!(tunnel_label("productionresultssa17.blob.core.windows.net"), None);
        assert_eq!(tunnel_label("docker-images-prod.cloudflarestorage.example.com"), None);
    }

    proptest::proptest! {
        /// The index finds what comparing with every domain finds.
        #[test]
        fn the_lookalike_index_finds_what_a_scan_finds(
            known in proptest::collection::vec("[a-z]{3,9}(-[a-z]{1,3})?\\.(com|io|org|com\\.co|dev)", 0..30),
            candidate in "[a-z]{3,9}(-[a-z]{1,3})?\\.(com|io|org|com\\.co|net)",
        ) {
            let index = Lookalikes::new(known.iter().map(String::as_str));
            let scanned = known.iter().filter_map(|k| lookalike(&candidate, k)).max();
            proptest::prop_assert_eq!(index.find(&candidate, |_| false).map(|(_, r)| r), scanned);
        }

        /// The same, for candidates made from a known domain by the edits squatters use.
        #[test]
        fn the_lookalike_index_finds_edited_names(
            known in proptest::collection::vec("[a-z]{4,10}\\.(com|io|org)", 1..30),
            pick in 0usize..30,
            at in 0usize..10,
            letter in "[a-z]",
            edit in 0u8..4,
        ) {
            let original = &known[pick % known.len()];
            let (stem, suffix) = original.split_once('.').unwrap();
            let at = at % stem.len();
            let stem = match edit {
                0 => format!("{}{letter}{}", &stem[..at], &stem[at + 1..]),
                1 => format!("{}{letter}{}", &stem[..at], &stem[at..]),
                2 => format!("{}{}", &stem[..at], &stem[at + 1..]),
                _ => format!("{}-{}", &stem[..at], &stem[at..]),
            };
            let candidate = format!("{stem}.{}", if edit == 3 { "net" } else { suffix });
            let index = Lookalikes::new(known.iter().map(String::as_str));
            let scanned = known.iter().filter_map(|k| lookalike(&candidate, k)).max();
            proptest::prop_assert_eq!(index.find(&candidate, |_| false).map(|(_, r)| r), scanned);
        }
    }

    #[test]
    fn lookalikes_are_caught() {
        use Resemblance::*;
        assert_eq!(lookalike("npmjs.com.co", "npmjs.org"), Some(Imitation));
        assert_eq!(lookalike("githuh.com", "github.com"), Some(Imitation));
        assert_eq!(lookalike("pypi-org.com", "pypi.org"), Some(Imitation));
        assert_eq!(lookalike("docker.io", "docker.com"), Some(OtherSuffix));
        assert_eq!(lookalike("npmjs.org", "npmjs.com"), Some(OtherSuffix));
        assert_eq!(lookalike("github.com", "github.com"), None);
        assert_eq!(lookalike("gitlab.com", "github.com"), None);
        assert_eq!(lookalike("go.dev", "go.org"), None);
    }
}
