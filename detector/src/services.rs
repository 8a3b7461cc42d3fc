//! Abused services: paste hosts, IP-echo services, request catchers, tunnels, mining pools, file
//! drops, secret-validation APIs and dynamic DNS, read from the curated lists in
//! `detector/services/` (one file per category, every entry with its public sources). A call
//! to one of them that the job has not learned is at least `High` (see [`crate::score`]).
//!
//! Lookups walk the suffixes of a name (a handful of hash lookups), so a list of any length
//! keeps scoring fast.

use std::collections::{HashMap, HashSet};
use std::sync::LazyLock;

use serde::{Deserialize, Serialize};

/// What kind of abused service a domain is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Category {
    /// Paste and gist hosts.
    Paste,
    /// Services that tell a process its public address.
    IpEcho,
    /// Request catchers, out-of-band testing hosts, bot and webhook APIs.
    RequestCatcher,
    /// Tunnel services.
    Tunnel,
    /// Cryptocurrency mining pools.
    MiningPool,
    /// Anonymous file drops.
    FileDrop,
    /// APIs that tell whether a stolen key works.
    SecretValidation,
    /// Dynamic DNS and address-in-name services.
    DynamicDns,
}

impl Category {
    /// Every category, with its list's file name and text.
    const LISTS: [(Category, &'static str, &'static str); 8] = [
        (Category::Paste, "paste.txt", include_str!("../services/paste.txt")),
        (Category::IpEcho, "ip-echo.txt", include_str!("../services/ip-echo.txt")),
        (Category::RequestCatcher, "request-catchers.txt", include_str!("../services/request-catchers.txt")),
        (Category::Tunnel, "tunnels.txt", include_str!("../services/tunnels.txt")),
        (Category::MiningPool, "mining-pools.txt", include_str!("../services/mining-pools.txt")),
        (Category::FileDrop, "file-drops.txt", include_str!("../services/file-drops.txt")),
        (Category::SecretValidation, "secret-validation.txt", include_str!("../services/secret-validation.txt")),
        (Category::DynamicDns, "dynamic-dns.txt", include_str!("../services/dynamic-dns.txt")),
    ];

    /// What the category is and why attackers use it, for a verdict's reason.
    pub fn describe(self) -> &'static str {
        match self {
            Category::Paste => "a paste host (used to stage payloads and exfiltrate)",
            Category::IpEcho => "an IP-echo service (reconnaissance: a build never needs its public address)",
            Category::RequestCatcher => "a request catcher (whatever is sent is kept for the sender to read)",
            Category::Tunnel => "a tunnel service (a public name in front of a machine anyone runs)",
            Category::MiningPool => "a cryptocurrency mining pool",
            Category::FileDrop => "an anonymous file drop (used to exfiltrate archives)",
            Category::SecretValidation => "a secret-validation target (credential stealers check stolen keys there)",
            Category::DynamicDns => "a dynamic DNS name (points wherever its owner wants)",
        }
    }
}

/// A built-in list: its category, file name and entries.
pub type List = (Category, &'static str, Vec<Entry>);

/// A line of a list that does not parse.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{file}:{line}: {message}")]
pub struct ListError {
    /// The list's file name.
    pub file: String,
    /// 1-based line number.
    pub line: usize,
    /// What is wrong.
    pub message: String,
}

/// One entry of a list: a domain and the keys of its sources.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    /// The domain; it matches itself and every name below it.
    pub domain: String,
    /// Its sources, each with its URL.
    pub sources: Vec<(String, String)>,
}

/// Parses one list (see `detector/services/README.md` for the format).
pub fn parse_list(file: &str, text: &str) -> Result<Vec<Entry>, ListError> {
    let error = |line: usize, message: String| ListError { file: file.to_string(), line: line + 1, message };
    let mut sources: HashMap<&str, &str> = HashMap::new();
    let mut entries = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let (content, comment) = line.split_once('#').unwrap_or((line, ""));
        if let Some(source) = comment.trim().strip_prefix("source:") {
            let mut words = source.split_whitespace();
            let (Some(key), Some(url), None) = (words.next(), words.next(), words.next()) else {
                return Err(error(n, "a source line is 'source: <key> <https URL>'".into()));
            };
            if !url.starts_with("https://") {
                return Err(error(n, format!("source {key}: '{url}' is not an https URL")));
            }
            if sources.insert(key, url).is_some() {
                return Err(error(n, format!("source {key} is defined twice")));
            }
        }
        let mut words = content.split_whitespace();
        let Some(domain) = words.next() else { continue };
        if let Err(why) = check_domain(domain) {
            return Err(error(n, why));
        }
        let keys: Vec<&str> = words.collect();
        if keys.is_empty() {
            return Err(error(n, format!("{domain} names no source")));
        }
        let mut entry = Entry { domain: domain.to_string(), sources: Vec::new() };
        for key in keys {
            let Some(url) = sources.get(key) else {
                return Err(error(n, format!("{domain}: source '{key}' is not defined above it")));
            };
            entry.sources.push((key.to_string(), url.to_string()));
        }
        entries.push(entry);
    }
    Ok(entries)
}

/// Whether `domain` can be a list entry: a lowercase DNS name of at least two labels, no
/// wildcard (an entry already covers every name below it).
pub fn check_domain(domain: &str) -> Result<(), String> {
    let labels: Vec<&str> = domain.split('.').collect();
    let label_ok = |l: &&str| {
        !l.is_empty()
            && l.len() <= 63
            && !l.starts_with('-')
            && !l.ends_with('-')
            && l.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    };
    if domain.len() > 253 || labels.len() < 2 || !labels.iter().all(label_ok) {
        return Err(format!(
            "'{domain}' is not a lowercase domain name of two or more labels (an entry covers every name below it: no '*.')"
        ));
    }
    Ok(())
}

/// A set of abused-service domains: the built-in lists, possibly extended or overridden by a
/// policy.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Services {
    by_domain: HashMap<String, Category>,
    /// Domains (and the names below them) that never match, whatever the lists say.
    ignored: HashSet<String>,
}

/// The built-in lists' version (`detector/services/VERSION`, a date).
pub const LISTS_VERSION: &str = include_str!("../services/VERSION").trim_ascii();

static BUILTIN: LazyLock<Services> = LazyLock::new(|| {
    let mut services = Services::default();
    for (category, file, text) in Category::LISTS {
        // The lists are checked by the tests; a broken one cannot be built into a release.
        let entries = parse_list(file, text).unwrap_or_else(|e| panic!("built-in list: {e}"));
        for e in entries {
            services.by_domain.insert(e.domain, category);
        }
    }
    services
});

impl Services {
    /// The lists shipped in `detector/services/`.
    pub fn builtin() -> &'static Services {
        &BUILTIN
    }

    /// Every built-in list as (category, file name, entries).
    pub fn builtin_lists() -> Result<Vec<List>, ListError> {
        Category::LISTS.iter().map(|&(c, file, text)| Ok((c, file, parse_list(file, text)?))).collect()
    }

    /// These services with `add` added and every domain in `ignore` (and the names below it)
    /// taken out. Entries are lowercased.
    pub fn with<'a>(
        &self,
        add: impl IntoIterator<Item = (&'a str, Category)>,
        ignore: impl IntoIterator<Item = &'a str>,
    ) -> Services {
        let mut out = self.clone();
        for (domain, category) in add {
            out.by_domain.insert(normal(domain), category);
        }
        for domain in ignore {
            out.ignored.insert(normal(domain));
        }
        out
    }

    /// The listed domain `host` is (or is below) and its category, unless ignored.
    pub fn find<'h>(&self, host: &'h str) -> Option<(&'h str, Category)> {
        if self.by_domain.is_empty() {
            return None;
        }
        let host = host.strip_suffix('.').unwrap_or(host);
        let mut found = None;
        for suffix in suffixes(host) {
            if self.ignored.contains(suffix) {
                return None;
            }
            if found.is_none()
                && let Some(&c) = self.by_domain.get(suffix)
            {
                found = Some((suffix, c));
            }
        }
        found
    }

    /// Number of domains listed.
    pub fn len(&self) -> usize {
        self.by_domain.len()
    }

    /// Whether nothing is listed.
    pub fn is_empty(&self) -> bool {
        self.by_domain.is_empty()
    }
}

fn normal(domain: &str) -> String {
    domain.trim().trim_end_matches('.').trim_start_matches("*.").to_ascii_lowercase()
}

/// `a.b.c` → `a.b.c`, `b.c`, `c`.
fn suffixes(host: &str) -> impl Iterator<Item = &str> {
    std::iter::once(host).chain(host.match_indices('.').map(move |(i, _)| &host[i + 1..]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_builtin_list_parses_and_every_entry_has_a_source() {
        let lists = Services::builtin_lists().unwrap();
        assert_eq!(lists.len(), 8);
        let mut seen = HashMap::new();
        for (category, file, entries) in lists {
            assert!(entries.len() >= 8, "{file} has {} entries", entries.len());
            for e in entries {
                assert!(!e.sources.is_empty());
                if let Some(other) = seen.insert(e.domain.clone(), category) {
                    panic!("{} is listed as {other:?} and {category:?}", e.domain);
                }
            }
        }
        assert_eq!(Services::builtin().len(), seen.len());
    }

    #[test]
    fn the_lists_have_a_version() {
        assert!(jiff::civil::Date::strptime("%Y-%m-%d", LISTS_VERSION).is_ok(), "{LISTS_VERSION:?} is not a date");
    }

    #[test]
    fn an_entry_matches_itself_and_names_below_it_and_nothing_else() {
        let s = Services::builtin();
        assert_eq!(s.find("paste.rs"), Some(("paste.rs", Category::Paste)));
        assert_eq!(s.find("a1b2c3.trycloudflare.com"), Some(("trycloudflare.com", Category::Tunnel)));
        assert_eq!(s.find("api64.ipify.org."), Some(("ipify.org", Category::IpEcho)));
        assert_eq!(s.find("gist.githubusercontent.com"), Some(("gist.githubusercontent.com", Category::Paste)));
        assert_eq!(s.find("raw.githubusercontent.com"), None);
        assert_eq!(s.find("notpaste.rs"), None);
        assert_eq!(s.find("paste.rs.example.com"), None);
        assert_eq!(s.find("github.com"), None);
    }

    #[test]
    fn a_policy_adds_entries_and_ignores_domains() {
        let s = Services::builtin().with([("Paste.Internal.Example", Category::Paste)], ["ipify.org"]);
        assert_eq!(s.find("x.paste.internal.example"), Some(("paste.internal.example", Category::Paste)));
        assert_eq!(s.find("api.ipify.org"), None);
        assert_eq!(s.find("paste.rs"), Some(("paste.rs", Category::Paste)));
        // The built-in set is unchanged.
        assert!(Services::builtin().find("api.ipify.org").is_some());
    }

    #[test]
    fn a_broken_list_says_where() {
        let e = parse_list("x.txt", "# source: a https://example.org/\nfoo.example a\nbar.example b\n").unwrap_err();
        assert_eq!((e.line, e.message.contains("'b' is not defined")), (3, true));
        assert!(parse_list("x.txt", "*.foo.example\n").is_err());
        assert!(parse_list("x.txt", "Foo.example x\n").is_err());
        assert!(parse_list("x.txt", "# source: a http://example.org/\n").is_err());
        assert!(parse_list("x.txt", "foo.example\n").unwrap_err().message.contains("no source"));
    }
}
