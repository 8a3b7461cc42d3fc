//! DNS answer parsing and the per-pod name cache: real wire-format messages, CNAME chains,
//! compression, truncation, hostile input.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use proptest::prelude::*;
use runwarden_agent::dns::{DnsCache, DnsError, RecordData, TtlBounds, parse, parse_prefix, resolutions};

mod common;

/// A response to an A query for `question` with `answers` (name, ttl, data).
fn response(question: &str, answers: &[(&str, u32, RecordData)], compress: bool, tc: bool) -> Vec<u8> {
    common::dns_response(0x1234, question, 1, answers, compress, tc)
}

fn a(ip: [u8; 4]) -> RecordData {
    RecordData::A(Ipv4Addr::from(ip))
}

#[test]
fn an_a_answer_names_its_address() {
    let msg = parse(&response("registry.npmjs.org", &[("registry.npmjs.org", 300, a([104, 16, 1, 34]))], true, false))
        .unwrap();
    let r = resolutions(&msg);
    assert_eq!(r.len(), 1);
    assert_eq!(r[0].ip, IpAddr::from([104, 16, 1, 34]));
    assert_eq!(r[0].names, vec!["registry.npmjs.org"]);
    assert_eq!(r[0].ttl, 300);
}

#[test]
fn a_cname_chain_names_the_address_with_every_alias() {
    let answers = [
        ("objects.githubusercontent.com", 60, RecordData::Cname("objects.github.map.fastly.net".into())),
        ("objects.github.map.fastly.net", 30, RecordData::Cname("fastly-edge.example.net".into())),
        ("fastly-edge.example.net", 20, RecordData::Aaaa(Ipv6Addr::new(0x2a04, 0x4e42, 0, 0, 0, 0, 0, 0x133))),
    ];
    let msg = parse(&response("objects.githubusercontent.com", &answers, true, false)).unwrap();
    let r = resolutions(&msg);
    assert_eq!(r.len(), 1);
    assert_eq!(
        r[0].names,
        vec!["objects.githubusercontent.com", "objects.github.map.fastly.net", "fastly-edge.example.net"]
    );
}

#[test]
fn records_unrelated_to_the_question_name_nothing() {
    let answers = [("github.com", 60, a([140, 82, 112, 3])), ("attacker.example", 60, a([203, 0, 113, 9]))];
    let msg = parse(&response("github.com", &answers, false, false)).unwrap();
    let ips: Vec<IpAddr> = resolutions(&msg).into_iter().map(|r| r.ip).collect();
    assert_eq!(ips, vec![IpAddr::from([140, 82, 112, 3])]);
}

#[test]
fn names_are_lowercased_and_the_truncation_bit_is_read() {
    let msg = parse(&response("API.GitHub.com", &[("API.GitHub.com", 60, a([1, 2, 3, 4]))], false, true)).unwrap();
    assert!(msg.truncated);
    assert_eq!(msg.questions, vec!["api.github.com"]);
}

#[test]
fn a_cut_off_message_is_an_error_not_a_panic() {
    let full = response("github.com", &[("github.com", 60, a([140, 82, 112, 3]))], true, false);
    for len in 0..full.len() {
        assert!(parse(&full[..len]).is_err(), "a prefix of {len} bytes parsed");
    }
    assert!(parse(&full).is_ok());
}

#[test]
fn a_captured_prefix_yields_the_records_that_fit_whole() {
    let answers = [("github.com", 60, a([140, 82, 112, 3])), ("github.com", 60, a([140, 82, 112, 4]))];
    let full = response("github.com", &answers, true, false);
    let header_and_question = 12 + 12 + 4;
    let one_record = 16;
    for len in 0..full.len() {
        let prefix = parse_prefix(&full[..len]);
        if len < header_and_question {
            assert!(prefix.is_err(), "{len}");
            continue;
        }
        let msg = prefix.unwrap();
        assert!(msg.truncated);
        assert_eq!(msg.answers.len(), (len - header_and_question) / one_record, "{len} bytes");
    }
}

#[test]
fn compression_loops_and_forward_pointers_are_refused() {
    let mut m = vec![0, 1, 0x81, 0x80, 0, 1, 0, 0, 0, 0, 0, 0];
    m.extend([0xc0, 12]); // a question name pointing at itself
    m.extend([0, 1, 0, 1]);
    assert_eq!(parse(&m), Err(DnsError::BadPointer(12)));
    let mut m = vec![0, 1, 0x81, 0x80, 0, 1, 0, 0, 0, 0, 0, 0];
    m.extend([0xc0, 40]);
    assert_eq!(parse(&m), Err(DnsError::BadPointer(12)));
    let mut query = response("github.com", &[], false, false);
    query[2] = 0x01; // QR bit clear: a query, not a response
    assert_eq!(parse(&query), Err(DnsError::NotAResponse));
}

#[test]
fn the_cache_keeps_every_name_of_an_address_within_its_ttl_bounds() {
    let mut cache = DnsCache::new(TtlBounds { floor: 30, cap: 600 }, 100);
    let ip = [185, 199, 108, 133];
    cache.insert(
        &parse(&response("raw.githubusercontent.com", &[("raw.githubusercontent.com", 5, a(ip))], true, false))
            .unwrap(),
        1000,
    );
    cache.insert(
        &parse(&response(
            "objects.githubusercontent.com",
            &[("objects.githubusercontent.com", 86_400, a(ip))],
            true,
            false,
        ))
        .unwrap(),
        1000,
    );
    let ip = IpAddr::from(ip);
    assert_eq!(cache.names(ip, 1001), (vec!["raw.githubusercontent.com", "objects.githubusercontent.com"], 2));
    // The 5 s TTL is raised to the 30 s floor; the day-long one is capped at 600 s.
    assert_eq!(cache.names(ip, 1029), (vec!["raw.githubusercontent.com", "objects.githubusercontent.com"], 2));
    assert_eq!(cache.names(ip, 1031), (vec!["objects.githubusercontent.com"], 1));
    assert!(cache.names(ip, 1601).0.is_empty());
    cache.expire(1601);
    assert!(cache.is_empty());
}

#[test]
fn the_cache_is_bounded() {
    let mut cache = DnsCache::new(TtlBounds::default(), 10);
    for i in 0..50u8 {
        let q = format!("h{i}.example.org");
        cache.insert(&parse(&response(&q, &[(&q, 60 + u32::from(i), a([10, 0, 0, i]))], true, false)).unwrap(), 0);
    }
    assert_eq!(cache.len(), 10);
    // The latest-expiring addresses stay.
    assert_eq!(cache.names(IpAddr::from([10, 0, 0, 49]), 1), (vec!["h49.example.org"], 1));
}

fn label() -> impl Strategy<Value = String> {
    "[a-z0-9]{1,12}"
}

fn domain() -> impl Strategy<Value = String> {
    prop::collection::vec(label(), 2..5).prop_map(|l| l.join("."))
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 20_000, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..600)) {
        let _ = parse(&bytes).map(|m| resolutions(&m));
    }

    #[test]
    fn corrupted_valid_messages_never_panic(
        q in domain(), ips in prop::collection::vec(any::<[u8; 4]>(), 1..6),
        flips in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8),
    ) {
        let answers: Vec<_> = ips.iter().map(|ip| (q.as_str(), 60, a(*ip))).collect();
        let mut m = response(&q, &answers, true, false);
        for (i, b) in flips {
            let i = i.index(m.len());
            m[i] = b;
        }
        let _ = parse(&m).map(|m| resolutions(&m));
    }

    #[test]
    fn encoded_answers_parse_back(
        q in domain(), alias in domain(), compress in any::<bool>(),
        ips in prop::collection::vec(any::<[u8; 4]>(), 1..6), ttl in any::<u32>(),
    ) {
        prop_assume!(alias != q);
        let mut answers = vec![(q.as_str(), ttl, RecordData::Cname(alias.clone()))];
        answers.extend(ips.iter().map(|ip| (alias.as_str(), ttl, a(*ip))));
        let msg = parse(&response(&q, &answers, compress, false)).unwrap();
        let r = resolutions(&msg);
        prop_assert_eq!(r.len(), ips.len());
        for (res, ip) in r.iter().zip(&ips) {
            prop_assert_eq!(res.ip, IpAddr::from(*ip));
            prop_assert_eq!(&res.names, &vec![q.clone(), alias.clone()]);
        }
    }
}

#[test]
fn a_refusal_repeats_the_question_and_nothing_else() {
    let mut query = common::dns_query(0x4242, "exfil.example.net");
    // An EDNS OPT record in the additional section, as most resolver libraries send.
    query[11] = 1;
    query.extend([0, 0, 41, 0x10, 0, 0, 0, 0, 0, 0, 0]);
    for rcode in [5, 3] {
        let reply = runwarden_agent::dns::refusal(&query, rcode).unwrap();
        let msg = parse(&reply).unwrap();
        assert_eq!(
            (msg.id, msg.rcode, msg.questions.as_slice()),
            (0x4242, rcode, &["exfil.example.net".to_string()][..])
        );
        assert!(msg.answers.is_empty() && !msg.truncated);
        assert_eq!(reply.len(), query.len() - 11, "the OPT record is not repeated");
        assert_eq!(reply[2] & 0x01, query[2] & 0x01, "recursion desired, as asked");
    }
    assert_eq!(runwarden_agent::dns::refusal(&reply_of(&query), 5), Err(DnsError::NotAQuery));
    assert!(runwarden_agent::dns::refusal(&query[..20], 5).is_err(), "cut in the question");
}

fn reply_of(query: &[u8]) -> Vec<u8> {
    let mut r = query.to_vec();
    r[2] |= 0x80;
    r
}
