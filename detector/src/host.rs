//! What can be told about a destination from its name or address alone: its registrable domain
//! (from the public suffix list, private section included, so `gist.githubusercontent.com` and
//! `x.blob.core.windows.net` are domains of their own), the shape of a rotating name, signs of
//! DNS tunnelling, lookalikes, and special addresses.

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
    if candidate == known {
        return None;
    }
    let (a, b) = (domain_stem(candidate), domain_stem(known));
    if a.len() < 4 || b.len() < 4 {
        return None;
    }
    if a == b {
        // `npmjs.com.co`: a generic label right after the name makes it read as the original.
        let mut rest = candidate[a.len()..].trim_start_matches('.').split('.');
        let reads_generic = matches!(rest.next(), Some("com" | "net" | "org" | "co" | "gov" | "edu"));
        return Some(if reads_generic && rest.next().is_some() {
            Resemblance::Imitation
        } else {
            Resemblance::OtherSuffix
        });
    }
    let squashed = |s: &str| s.replace(['-', '.'], "");
    if squashed(candidate).starts_with(&squashed(known)) || squashed(a) == squashed(b) {
        return Some(Resemblance::Imitation);
    }
    let max_edits = if b.len() >= 8 { 2 } else { 1 };
    (a.len().abs_diff(b.len()) <= max_edits && edit_distance(a, b) <= max_edits).then_some(Resemblance::Imitation)
}

fn edit_distance(a: &str, b: &str) -> usize {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    let mut cur = vec![0; b.len() + 1];
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
