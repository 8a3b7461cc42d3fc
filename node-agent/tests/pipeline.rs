//! The decoder on hostile bytes, and the pipeline's naming and counting on records encoded as
//! the kernel writes them.

use std::net::{IpAddr, Ipv4Addr};
use std::time::{Duration, SystemTime};

use proptest::prelude::*;
use runwarden_agent::dns::RecordData;
use runwarden_agent::events::{
    Call, DecodeError, DnsMessage, Exec, Hook, Proto, Record, Verdict, decode, dedupe_key, encode_call, encode_dns,
    encode_exec,
};
use runwarden_agent::pipeline::{Pipeline, PipelineConfig};
use runwarden_ebpf_common::DedupeValue;

mod common;

fn call(pod: u64, ip: IpAddr, port: u16, total: u64, first: bool, at_secs: u64) -> Call {
    Call {
        timestamp_ns: at_secs * 1_000_000_000,
        cgroup_id: pod + 1,
        pod_cgroup_id: pod,
        total,
        first,
        pid: 4242,
        tid: 4243,
        comm: "npm install".into(),
        ip,
        port,
        proto: Proto::Tcp,
        hook: Hook::Connect,
        verdict: Verdict::Allowed,
        key: dedupe_key(pod + 1, pod, ip, port, Proto::Tcp),
    }
}

/// The cluster's resolver, which [`answer`]s come from.
const CLUSTER_DNS: IpAddr = IpAddr::V4(Ipv4Addr::new(10, 96, 0, 10));
/// The pod's port its resolver library asks from (and transaction id 1).
const CLIENT_PORT: u16 = 40_000;
/// The pod's own interface (its veth to the node), where the cluster's answers arrive.
const UPLINK: u32 = 2;
/// The loopback device.
const LOOPBACK: u32 = 1;

/// The cluster resolver's answer to pod `pod`: `name` is `ip`.
fn answer(pod: u64, name: &str, ip: Ipv4Addr, at_secs: u64) -> DnsMessage {
    DnsMessage {
        query: false,
        timestamp_ns: at_secs * 1_000_000_000,
        cgroup_id: pod + 1,
        pod_cgroup_id: pod,
        ifindex: UPLINK,
        server: CLUSTER_DNS,
        client_port: CLIENT_PORT,
        length: 0,
        message: common::dns_response(1, name, 1, &[(name, 60, RecordData::A(ip))], true, false),
    }
}

fn pipeline() -> Pipeline {
    Pipeline::new(PipelineConfig { boot_time: SystemTime::UNIX_EPOCH, ..PipelineConfig::default() })
}

/// The query of pod `pod` to `server` for `name` (id 1, from [`CLIENT_PORT`]) at `at_secs`:
/// an answer names something only when it matches one.
fn ask_at(p: &mut Pipeline, pod: u64, server: IpAddr, name: &str, at_secs: u64) {
    let q = DnsMessage {
        query: true,
        server,
        message: common::dns_query(1, name),
        ..answer(pod, name, Ipv4Addr::UNSPECIFIED, at_secs)
    };
    p.record(&encode_dns(&q));
}

/// [`ask_at`] the cluster's resolver, at 0 s.
fn ask(p: &mut Pipeline, pod: u64, name: &str) {
    ask_at(p, pod, CLUSTER_DNS, name, 0);
}

#[test]
fn records_round_trip_through_the_kernel_layout() {
    let c = call(7, IpAddr::V4(Ipv4Addr::new(104, 16, 1, 34)), 443, 3, true, 12);
    assert_eq!(decode(&encode_call(&c)), Ok(Record::Call(c.clone())));
    let v6 = call(7, "2606:4700::6810:122".parse().unwrap(), 443, 1, false, 12);
    assert_eq!(decode(&encode_call(&v6)), Ok(Record::Call(v6)));
    let mut a = answer(7, "registry.npmjs.org", Ipv4Addr::new(104, 16, 1, 34), 5);
    a.length = a.message.len() as u32;
    assert_eq!(decode(&encode_dns(&a)), Ok(Record::Dns(a)));
}

#[test]
fn a_call_names_the_program_its_process_executed() {
    let exec = Exec { timestamp_ns: 1, pid: 4242, cgroup_id: 8, pod_cgroup_id: 7, path: "/usr/bin/node".into() };
    assert_eq!(decode(&encode_exec(&exec)), Ok(Record::Exec(exec.clone())));
    let mut p = pipeline();
    let ip = IpAddr::V4(Ipv4Addr::LOCALHOST);
    assert_eq!(p.record(&encode_call(&call(7, ip, 80, 1, true, 1))).unwrap().executable, None, "exec not seen yet");
    p.record(&encode_exec(&exec));
    let o = p.record(&encode_call(&call(7, ip, 81, 1, true, 2))).unwrap();
    assert_eq!(o.executable.as_deref(), Some("/usr/bin/node"));
    assert_eq!(o.process, "npm install", "comm is kept as the process set it");
}

#[test]
fn short_and_unknown_records_are_errors() {
    let c = encode_call(&call(7, IpAddr::V4(Ipv4Addr::LOCALHOST), 80, 1, true, 1));
    assert!(matches!(decode(&c[..c.len() - 1]), Err(DecodeError::Short { .. })));
    assert!(matches!(decode(&[]), Err(DecodeError::Short { .. })));
    assert_eq!(decode(&[9, 0, 0, 0, 1, 2]), Err(DecodeError::Kind(9)));
    let mut bad_family = c.clone();
    bad_family[66] = 3;
    assert_eq!(decode(&bad_family), Err(DecodeError::Field("family")));
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 20_000, ..ProptestConfig::default() })]

    #[test]
    fn garbage_never_panics(kind in 0u32..4, bytes in prop::collection::vec(any::<u8>(), 0..1200)) {
        let mut record = kind.to_ne_bytes().to_vec();
        record.extend(bytes);
        let _ = decode(&record);
        let _ = pipeline().record(&record);
    }

    #[test]
    fn cut_records_are_errors(cut in 0usize..88) {
        let c = encode_call(&call(7, IpAddr::V4(Ipv4Addr::LOCALHOST), 80, 1, true, 1));
        prop_assert!(decode(&c[..cut]).is_err());
    }
}

#[test]
fn a_call_is_named_from_its_own_pods_answers_only() {
    let mut p = pipeline();
    let ip = Ipv4Addr::new(104, 16, 1, 34);
    // Before the pod asked its resolver anything, an answer names nothing.
    assert_eq!(p.record(&encode_dns(&answer(1, "registry.npmjs.org", ip, 10))), None);
    assert!(p.record(&encode_call(&call(1, IpAddr::V4(ip), 443, 1, true, 10))).unwrap().hosts.is_empty());
    assert_eq!(p.stats().unsolicited_dns, 1);
    ask(&mut p, 1, "registry.npmjs.org");
    // Pod 2 asks its resolver too, but not for this name.
    ask(&mut p, 2, "example.org");
    assert_eq!(p.record(&encode_dns(&answer(1, "registry.npmjs.org", ip, 10))), None);
    let mine = p.record(&encode_call(&call(1, IpAddr::V4(ip), 443, 1, true, 11))).unwrap();
    let theirs = p.record(&encode_call(&call(2, IpAddr::V4(ip), 443, 1, true, 11))).unwrap();
    assert_eq!(mine.hosts, ["registry.npmjs.org"]);
    assert!(theirs.hosts.is_empty());
    assert_eq!(mine.time, SystemTime::UNIX_EPOCH + Duration::from_secs(11));
    assert_eq!(mine.process, "npm install");
    // The name outlives its 60 s TTL by nothing: at 71 s it is gone.
    assert!(p.record(&encode_call(&call(1, IpAddr::V4(ip), 443, 2, false, 71))).unwrap().hosts.is_empty());
}

#[test]
fn an_address_answered_for_two_names_carries_both_as_candidates() {
    let mut p = pipeline();
    let shared = Ipv4Addr::new(104, 16, 1, 35);
    ask(&mut p, 1, "registry.npmjs.org");
    ask(&mut p, 1, "drop.exfil-example.net");
    // A name the job knows, then the pod's own, on one shared (CDN) address.
    p.record(&encode_dns(&answer(1, "registry.npmjs.org", shared, 10)));
    p.record(&encode_dns(&answer(1, "drop.exfil-example.net", shared, 11)));
    let o = p.record(&encode_call(&call(1, IpAddr::V4(shared), 443, 1, true, 12))).unwrap();
    assert_eq!(o.hosts, ["registry.npmjs.org", "drop.exfil-example.net"]);
    assert_eq!(o.questions, 2, "both are names the pod asked for: the call is ambiguous");
}

fn entry(total: u64, last_event_secs: u64) -> DedupeValue {
    DedupeValue { last_event_ns: last_event_secs * 1_000_000_000, total }
}

#[test]
fn counts_add_the_calls_the_kernel_folded() {
    let mut p = pipeline();
    let ip = IpAddr::V4(Ipv4Addr::new(140, 82, 112, 3));
    let first = call(1, ip, 443, 1, true, 1);
    p.record(&encode_call(&first));
    // The kernel folded 40 more, then reported the 42nd, then folded 8 more.
    p.record(&encode_call(&call(1, ip, 443, 42, false, 7)));
    assert!(p.totals(&[(first.key, entry(50, 7))], 0).is_empty());
    // Reading the table again adds nothing new.
    p.totals(&[(first.key, entry(50, 7))], 0);
    assert_eq!(p.calls()[0].calls, 50);
    // The entry was evicted and started again: the new count adds on.
    p.record(&encode_call(&call(1, ip, 443, 1, true, 20)));
    p.totals(&[(first.key, entry(5, 20))], 0);
    assert_eq!(p.calls()[0].calls, 55);
}

#[test]
fn a_destination_whose_record_was_lost_is_recovered_from_the_kernel_table() {
    let mut p = pipeline();
    ask(&mut p, 2, "exfil.example");
    let ip = Ipv4Addr::new(198, 51, 100, 99);
    p.record(&encode_dns(&answer(2, "exfil.example", ip, 29)));
    let lost = dedupe_key(3, 2, IpAddr::V4(ip), 443, Proto::Tcp);
    // Its record may still be in the ring buffer: nothing yet.
    assert!(p.totals(&[(lost, entry(9, 30))], 30_050_000_000).is_empty());
    // A record written a second later has been read: the one for `lost` is not coming.
    p.record(&encode_call(&call(1, IpAddr::V4(Ipv4Addr::LOCALHOST), 80, 1, true, 31)));
    let recovered = p.totals(&[(lost, entry(9, 30))], 0);
    assert_eq!(recovered.len(), 1);
    let o = &recovered[0];
    assert_eq!((o.ip, o.port, o.proto, o.hook), (IpAddr::V4(ip), 443, Proto::Tcp, Hook::Unknown));
    assert_eq!((o.cgroup_id, o.pod_cgroup_id, o.pid), (3, 2, 0));
    assert_eq!(o.hosts, ["exfil.example"], "named from its pod's answers");
    assert_eq!(p.stats().recovered, 1);
    // Once: the next read of the table only updates its count.
    assert!(p.totals(&[(lost, entry(12, 30))], 0).is_empty());
    // Or: everything written up to a time well after it has been read.
    let other = dedupe_key(3, 2, IpAddr::V4(ip), 8443, Proto::Tcp);
    assert_eq!(p.totals(&[(other, entry(1, 31))], 40_000_000_000).len(), 1);
    let count = p.calls().into_iter().find(|c| c.last.port == 443).unwrap();
    assert_eq!(count.calls, 12);
}

#[test]
fn malformed_answers_are_counted() {
    let mut p = pipeline();
    ask(&mut p, 1, "x.example");
    let mut bad = answer(1, "x.example", Ipv4Addr::LOCALHOST, 1);
    bad.message.truncate(20);
    p.record(&encode_dns(&bad));
    p.record(&[1, 2, 3]);
    let stats = p.stats();
    assert_eq!((stats.malformed_dns, stats.undecodable, stats.dns_answers), (1, 1, 1));
}

/// A pipeline that trusts only the cluster's resolver (10.96.0.10), as the agent does.
fn trusting_the_cluster_resolver() -> Pipeline {
    Pipeline::new(PipelineConfig {
        boot_time: SystemTime::UNIX_EPOCH,
        trusted_resolvers: Some(vec![IpAddr::V4(Ipv4Addr::new(10, 96, 0, 10))]),
        ..PipelineConfig::default()
    })
}

/// What a process in pod `pod` that runs its own DNS server on `server` (and queried it)
/// receives from it: `name` is `ip`.
fn from_own_server(pod: u64, server: IpAddr, ifindex: u32, name: &str, ip: Ipv4Addr, at_secs: u64) -> Vec<u8> {
    encode_dns(&DnsMessage { server, ifindex, ..answer(pod, name, ip, at_secs) })
}

#[test]
fn a_resolver_inside_the_pod_names_nothing_by_itself() {
    let mut p = trusting_the_cluster_resolver();
    let exfil = Ipv4Addr::new(203, 0, 113, 66);
    let own = IpAddr::V4(Ipv4Addr::LOCALHOST);
    // The attack: query your own server, have it answer github.com with your address, call it.
    ask_at(&mut p, 1, own, "github.com", 9);
    p.record(&from_own_server(1, own, LOOPBACK, "github.com", exfil, 10));
    let o = p.record(&encode_call(&call(1, IpAddr::V4(exfil), 443, 1, true, 11))).unwrap();
    assert!(o.hosts.is_empty(), "the address stays a bare address: {o:?}");
    assert_eq!((p.stats().uncorroborated_dns, p.stats().contradicting_dns), (1, 0));
    // Claiming to be the cluster's resolver does not help when the packet came over loopback.
    ask_at(&mut p, 1, CLUSTER_DNS, "github.com", 11);
    p.record(&from_own_server(1, CLUSTER_DNS, LOOPBACK, "github.com", exfil, 12));
    assert!(p.record(&encode_call(&call(1, IpAddr::V4(exfil), 443, 1, true, 13))).unwrap().hosts.is_empty());
    assert_eq!(p.stats().uncorroborated_dns, 2);
    assert!(p.take_suspicious().is_empty(), "nothing contradicted yet: the pod never asked the cluster");
}

#[test]
fn an_inside_answer_that_contradicts_the_cluster_resolver_is_suspicious() {
    let mut p = trusting_the_cluster_resolver();
    let (real, exfil) = (Ipv4Addr::new(140, 82, 112, 3), Ipv4Addr::new(203, 0, 113, 66));
    ask(&mut p, 1, "github.com");
    p.record(&encode_dns(&answer(1, "github.com", real, 10)));
    let own = IpAddr::V4(Ipv4Addr::LOCALHOST);
    ask_at(&mut p, 1, own, "github.com", 11);
    p.record(&from_own_server(1, own, LOOPBACK, "github.com", exfil, 11));
    assert!(p.record(&encode_call(&call(1, IpAddr::V4(exfil), 443, 1, true, 12))).unwrap().hosts.is_empty());
    assert_eq!(p.record(&encode_call(&call(1, IpAddr::V4(real), 443, 1, true, 12))).unwrap().hosts, ["github.com"]);
    let suspicious = p.take_suspicious();
    assert_eq!(suspicious.len(), 1, "{suspicious:?}");
    assert_eq!(suspicious[0].name, "github.com");
    assert_eq!(
        (suspicious[0].claimed.clone(), suspicious[0].trusted.clone()),
        (vec![IpAddr::V4(exfil)], vec![IpAddr::V4(real)])
    );
    assert_eq!(p.stats().contradicting_dns, 1);
}

#[test]
fn an_inside_resolver_that_agrees_with_the_cluster_resolver_is_fine() {
    // Docker's embedded resolver (127.0.0.11) forwards to the pod's resolver: the pod saw the
    // same answer from the cluster, so nothing is wrong and the name stands.
    let mut p = trusting_the_cluster_resolver();
    let ip = Ipv4Addr::new(104, 16, 1, 34);
    ask(&mut p, 1, "registry.npmjs.org");
    p.record(&encode_dns(&answer(1, "registry.npmjs.org", ip, 10)));
    let docker = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 11));
    ask_at(&mut p, 1, docker, "registry.npmjs.org", 10);
    p.record(&from_own_server(1, docker, LOOPBACK, "registry.npmjs.org", ip, 10));
    assert_eq!(
        p.record(&encode_call(&call(1, IpAddr::V4(ip), 443, 1, true, 11))).unwrap().hosts,
        ["registry.npmjs.org"]
    );
    assert_eq!((p.stats().uncorroborated_dns, p.stats().contradicting_dns), (0, 0));
    assert!(p.take_suspicious().is_empty());
}

#[test]
fn an_answer_names_something_only_when_it_matches_a_query_the_pod_sent() {
    let mut p = trusting_the_cluster_resolver();
    let ip = Ipv4Addr::new(104, 16, 1, 34);
    let named = |p: &mut Pipeline, at: u64| {
        !p.record(&encode_call(&call(1, IpAddr::V4(ip), 443, 1, true, at))).unwrap().hosts.is_empty()
    };
    ask_at(&mut p, 1, CLUSTER_DNS, "registry.npmjs.org", 10);
    // What does not match the query names nothing: another transaction id, another question,
    // another port of the pod, another server, another pod, or too late.
    let forged = answer(1, "registry.npmjs.org", ip, 11);
    let mut other_id = forged.clone();
    other_id.message[..2].copy_from_slice(&7u16.to_be_bytes());
    let other_question = DnsMessage {
        message: common::dns_response(1, "github.com", 1, &[("github.com", 60, RecordData::A(ip))], true, false),
        ..forged.clone()
    };
    let other_port = DnsMessage { client_port: CLIENT_PORT + 1, ..forged.clone() };
    let other_server = DnsMessage { server: IpAddr::V4(Ipv4Addr::new(10, 96, 0, 11)), ..forged.clone() };
    let other_pod = answer(2, "registry.npmjs.org", ip, 11);
    let late = answer(1, "registry.npmjs.org", ip, 10 + 31);
    for wrong in [other_id, other_question, other_port, other_server, other_pod] {
        p.record(&encode_dns(&wrong));
        assert!(!named(&mut p, 12), "{wrong:?}");
    }
    p.record(&encode_dns(&late));
    assert!(!named(&mut p, 42), "answered after 30 s");
    assert_eq!(p.stats().unsolicited_dns, 6);
    // The answer to the query names the address, once: the same answer again is unsolicited.
    ask_at(&mut p, 1, CLUSTER_DNS, "registry.npmjs.org", 50);
    p.record(&encode_dns(&answer(1, "registry.npmjs.org", ip, 50)));
    assert!(named(&mut p, 51));
    p.record(&encode_dns(&answer(1, "registry.npmjs.org", Ipv4Addr::new(203, 0, 113, 66), 51)));
    assert_eq!(p.stats().unsolicited_dns, 7, "a second answer to one query");
    assert_eq!(p.stats().dns_queries, 2);
}

#[test]
fn a_pods_flood_of_queries_keeps_only_its_newest() {
    let mut p = trusting_the_cluster_resolver();
    let ip = Ipv4Addr::new(104, 16, 1, 34);
    ask_at(&mut p, 1, CLUSTER_DNS, "registry.npmjs.org", 10);
    for i in 0..runwarden_agent::pipeline::MAX_QUERIES_PER_POD {
        ask_at(&mut p, 1, CLUSTER_DNS, &format!("n{i}.flood.example"), 10);
    }
    // Pod 2's query is its own: the flood of pod 1 does not push it out.
    ask_at(&mut p, 2, CLUSTER_DNS, "registry.npmjs.org", 10);
    p.record(&encode_dns(&answer(1, "registry.npmjs.org", ip, 11)));
    p.record(&encode_dns(&answer(2, "registry.npmjs.org", ip, 11)));
    let hosts =
        |p: &mut Pipeline, pod| p.record(&encode_call(&call(pod, IpAddr::V4(ip), 443, 1, true, 12))).unwrap().hosts;
    assert!(hosts(&mut p, 1).is_empty(), "the oldest of pod 1's queries was forgotten");
    assert_eq!(hosts(&mut p, 2), ["registry.npmjs.org"]);
}

#[test]
fn an_answer_claiming_the_cluster_resolver_on_another_interface_than_the_pods_own_is_not_believed() {
    // Docker-in-Docker: a nested container behind the pod's docker0 bridge sends the pod a
    // packet claiming the cluster resolver's address, answering a query of the same job.
    let mut p = trusting_the_cluster_resolver();
    let (real, exfil) = (Ipv4Addr::new(140, 82, 112, 3), Ipv4Addr::new(203, 0, 113, 66));
    // The runner's first lookups (before any job) arrive on the pod's uplink: pinned.
    ask_at(&mut p, 1, CLUSTER_DNS, "github.com", 10);
    p.record(&encode_dns(&answer(1, "github.com", real, 10)));
    let docker0 = 5;
    ask_at(&mut p, 1, CLUSTER_DNS, "github.com", 20);
    p.record(&from_own_server(1, CLUSTER_DNS, docker0, "github.com", exfil, 20));
    assert!(p.record(&encode_call(&call(1, IpAddr::V4(exfil), 443, 1, true, 21))).unwrap().hosts.is_empty());
    let suspicious = p.take_suspicious();
    assert_eq!(suspicious.len(), 1, "{suspicious:?}");
    assert!(suspicious[0].other_interface && !suspicious[0].loopback, "{suspicious:?}");
    // Another pod's uplink is its own.
    ask_at(&mut p, 2, CLUSTER_DNS, "github.com", 30);
    p.record(&encode_dns(&DnsMessage { ifindex: 7, ..answer(2, "github.com", real, 30) }));
    assert_eq!(p.record(&encode_call(&call(2, IpAddr::V4(real), 443, 1, true, 31))).unwrap().hosts, ["github.com"]);

    // The agent restarts mid-job: the uplinks it kept come back, so the job's first answer
    // after the restart (through its bridge) does not become the pod's uplink.
    let kept = p.take_changed_uplinks().expect("pinned uplinks are to be kept");
    assert_eq!(kept, std::collections::HashMap::from([(1, UPLINK), (2, 7)]));
    assert_eq!(p.take_changed_uplinks(), None, "nothing new since");
    let mut restarted = trusting_the_cluster_resolver();
    restarted.restore_uplinks(kept);
    ask_at(&mut restarted, 1, CLUSTER_DNS, "github.com", 40);
    restarted.record(&from_own_server(1, CLUSTER_DNS, docker0, "github.com", exfil, 40));
    assert!(restarted.record(&encode_call(&call(1, IpAddr::V4(exfil), 443, 1, true, 41))).unwrap().hosts.is_empty());
    p.forget_pod(2);
    assert_eq!(p.take_changed_uplinks(), Some(std::collections::HashMap::from([(1, UPLINK)])), "pod 2 ended");
}
