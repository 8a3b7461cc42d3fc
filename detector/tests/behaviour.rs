//! What a user of the detector relies on, as scenarios and properties.

use std::net::IpAddr;

use proptest::prelude::*;
use runwarden_detector::{
    Approved, ApprovedRule, Baseline, Call, Cluster, Config, Job, Mode, Phase, Proto, Run, Services, Severity, State,
    Verdict,
};

fn call(host: &str, port: u16) -> Call<'_> {
    Call { host: Some(host), ip: None, port, proto: Proto::Tcp, process: Some("curl") }
}

fn bare(ip: &str, port: u16) -> Call<'static> {
    let ip: IpAddr = ip.parse().unwrap();
    Call { host: None, ip: Some(ip), port, proto: Proto::Tcp, process: Some("sh") }
}

fn run(n: u32) -> Run<'static> {
    let id: &'static str = Box::leak(n.to_string().into_boxed_str());
    Run { id, time: 1_767_225_600 + i64::from(n) * 3600, trigger: "push", git_ref: None }
}

const USUAL: [&str; 5] =
    ["github.com", "api.github.com", "registry.npmjs.org", "objects.githubusercontent.com", "nodejs.org"];

/// A job that called the usual hosts in `runs` runs, scored and learned as the agent does.
fn grown(config: &Config, runs: u32) -> Baseline {
    let mut b = Baseline::default();
    let cluster = Cluster::default();
    for n in 0..runs {
        observe(&mut b, config, &cluster, &run(n), &USUAL.map(|h| call(h, 443)));
    }
    b
}

/// Scores `calls` of `r` and learns from them; returns the verdicts.
fn observe(
    b: &mut Baseline,
    config: &Config,
    cluster: &Cluster,
    r: &Run<'_>,
    calls: &[Call<'_>],
) -> Vec<Option<Verdict>> {
    let job =
        Job { repository: "acme/web", baseline: b, config, cluster, services: runwarden_detector::Services::builtin() };
    let scored: Vec<_> = calls.iter().map(|c| (*c, job.score(r, c))).collect();
    b.learn(config, r, &scored);
    scored.into_iter().map(|(_, v)| v).collect()
}

fn score(b: &Baseline, config: &Config, cluster: &Cluster, c: &Call<'_>) -> Option<Verdict> {
    Job { repository: "acme/web", baseline: b, config, cluster, services: runwarden_detector::Services::builtin() }
        .score(&run(10_000), c)
}

#[test]
fn a_young_baseline_learns_quietly_and_then_reports_a_new_domain() {
    let config = Config::default();
    let mut b = Baseline::default();
    let cluster = Cluster::default();
    let first = observe(&mut b, &config, &cluster, &run(0), &USUAL.map(|h| call(h, 443)));
    assert!(first.iter().flatten().all(|v| v.severity < Severity::Medium), "{first:?}");
    for n in 1..12 {
        observe(&mut b, &config, &cluster, &run(n), &USUAL.map(|h| call(h, 443)));
    }
    assert_eq!(b.phase(&config), Phase::Monitoring);
    let v = score(&b, &config, &cluster, &call("telemetry-collect.xyz", 443)).expect("a new host is scored");
    assert!(v.severity >= Severity::Medium, "{v:?}");
    assert!(v.reasons.iter().any(|r| r.contains("no job in this cluster")), "{v:?}");
}

#[test]
fn cloud_metadata_is_critical_even_while_learning() {
    let config = Config::default();
    let b = grown(&config, 1);
    let v = score(&b, &config, &Cluster::default(), &bare("169.254.169.254", 80)).unwrap();
    assert_eq!(v.severity, Severity::Critical, "{v:?}");
    assert!(v.reasons[0].contains("metadata"));
}

#[test]
fn a_reverse_shell_to_a_bare_address_on_an_odd_port_is_high() {
    let config = Config::default();
    let b = grown(&config, 20);
    let v = score(&b, &config, &Cluster::default(), &bare("203.0.113.77", 4444)).unwrap();
    assert!(v.severity >= Severity::High, "{v:?}");
}

#[test]
fn dns_tunnelling_and_typosquats_are_high() {
    let config = Config::default();
    let b = grown(&config, 20);
    let cluster = Cluster::default();
    let tunnel = Call { port: 53, proto: Proto::Udp, ..call("m5ztqmrqgi3tkmbrgmzdsnzv.d.exfil.example", 53) };
    let v = score(&b, &config, &cluster, &tunnel).unwrap();
    assert!(v.severity >= Severity::High, "{v:?}");
    let v = score(&b, &config, &cluster, &call("registry.npmjs.org.co", 443)).unwrap();
    assert!(v.severity >= Severity::High, "{v:?}");
    assert!(v.reasons.iter().any(|r| r.contains("looks like npmjs.org")), "{v:?}");
}

#[test]
fn a_host_other_jobs_of_the_repository_use_is_not_reported() {
    let config = Config::default();
    let b = grown(&config, 20);
    let mut cluster = Cluster::default();
    cluster.add_host("acme/web", "ghcr.io");
    let v = score(&b, &config, &cluster, &call("ghcr.io", 443)).unwrap();
    assert!(v.severity < Severity::Medium, "{v:?}");
    assert!(v.reasons.iter().any(|r| r.contains("other job(s) of acme/web")));
}

#[test]
fn a_new_subdomain_of_a_shared_hosting_parent_is_not_trusted() {
    let config = Config::default();
    let mut b = grown(&config, 20);
    let cluster = Cluster::default();
    observe(&mut b, &config, &cluster, &run(20), &[call("release-assets.githubusercontent.com", 443)]);
    // githubusercontent.com serves anyone's gists: gist.githubusercontent.com is its own domain.
    let v = score(&b, &config, &cluster, &call("gist.githubusercontent.com", 443)).unwrap();
    assert!(v.severity >= Severity::Medium, "{v:?}");
}

#[test]
fn rotating_hosts_become_a_pattern_after_enough_siblings() {
    let config = Config::default();
    let mut b = Baseline::default();
    let cluster = Cluster::default();
    for (n, shard) in [3, 11, 17, 3, 11].into_iter().enumerate() {
        let host = format!("productionresultssa{shard}.blob.core.windows.net");
        let mut calls: Vec<Call<'_>> = USUAL.iter().map(|h| call(h, 443)).collect();
        calls.push(call(&host, 443));
        observe(&mut b, &config, &cluster, &run(n as u32), &calls);
    }
    assert!(b.patterns.iter().any(|p| p.shape == "productionresultssa#.blob.core.windows.net"), "{:?}", b.patterns);
    assert!(b.endpoint("productionresultssa3.blob.core.windows.net", 443, Proto::Tcp).is_none(), "folded");
    assert!(score(&b, &config, &cluster, &call("productionresultssa42.blob.core.windows.net", 443)).is_none());
    // Another customer of the same shared suffix is still new.
    assert!(score(&b, &config, &cluster, &call("attacker.blob.core.windows.net", 443)).is_some());
}

#[test]
fn two_siblings_under_a_shared_suffix_are_not_yet_a_pattern() {
    let config = Config::default();
    let mut b = Baseline::default();
    let cluster = Cluster::default();
    for (n, shard) in [3, 11].into_iter().enumerate() {
        let host = format!("productionresultssa{shard}.blob.core.windows.net");
        observe(&mut b, &config, &cluster, &run(n as u32), &[call(&host, 443)]);
    }
    assert!(b.patterns.is_empty());
    // Under an owner's domain two siblings suffice, once the family recurred in enough runs (no
    // job of this empty cluster knows ubuntu.com, so its hosts must be confirmed first).
    for (n, node) in [4, 21, 4].into_iter().enumerate() {
        let host = format!("node{node}.archive.ubuntu.com");
        observe(&mut b, &config, &cluster, &run(2 + n as u32), &[call(&host, 80)]);
    }
    assert_eq!(b.patterns.len(), 1);
    assert_eq!(b.patterns[0].shape, "node#.archive.ubuntu.com");
}

#[test]
fn an_anomaly_keeps_being_reported_until_it_is_approved() {
    let mut config = Config::default();
    let mut b = grown(&config, 20);
    let cluster = Cluster::default();
    let paste = call("paste.example", 443);
    for n in 20..30 {
        let v = observe(&mut b, &config, &cluster, &run(n), &[paste]);
        let v = v[0].as_ref().expect("still reported");
        assert!(v.severity >= Severity::Medium, "run {n}: {v:?}");
    }
    assert_eq!(b.endpoint("paste.example", 443, Proto::Tcp).unwrap().state, State::Anomalous);
    config.approved.push(ApprovedRule { target: Approved::Host("*.example".into()), ports: vec![443], proto: None });
    assert!(score(&b, &config, &cluster, &paste).is_none());
    observe(&mut b, &config, &cluster, &run(30), &[paste]);
    assert_eq!(b.endpoint("paste.example", 443, Proto::Tcp).unwrap().state, State::Approved);
}

#[test]
fn endpoints_expire_after_both_runs_and_days() {
    let config = Config { expire_after_runs: 5, expire_after_days: 2, ..Config::default() };
    let mut b = grown(&config, 12);
    let cluster = Cluster::default();
    // Five more runs within a day without nodejs.org: not yet expired (days).
    let fewer: Vec<Call<'_>> = USUAL[..4].iter().map(|h| call(h, 443)).collect();
    for n in 12..17 {
        observe(&mut b, &config, &cluster, &Run { time: run(12).time + i64::from(n), ..run(n) }, &fewer);
    }
    assert!(b.endpoint("nodejs.org", 443, Proto::Tcp).is_some());
    observe(&mut b, &config, &cluster, &Run { time: run(12).time + 3 * 86_400, ..run(17) }, &fewer);
    assert!(b.endpoint("nodejs.org", 443, Proto::Tcp).is_none());
    assert!(b.endpoint("github.com", 443, Proto::Tcp).is_some());
}

#[test]
fn the_baseline_stays_within_its_endpoint_cap() {
    let config = Config { max_endpoints: 50, mode: Mode::Learning, ..Config::default() };
    let mut b = Baseline::default();
    let cluster = Cluster::default();
    for n in 0..40 {
        // Names without digits: no rotating family to fold them into.
        let word = |k: u32| (0..3).map(|d| char::from(b'a' + ((k / 26u32.pow(d)) % 26) as u8)).collect::<String>();
        let hosts: Vec<String> = (0..10).map(|i| format!("{}.{}.org", word(n * 10 + i), word(i + 500))).collect();
        let calls: Vec<Call<'_>> = hosts.iter().map(|h| call(h, 443)).collect();
        observe(&mut b, &config, &cluster, &run(n), &calls);
    }
    assert!(b.endpoint_count() <= 50, "{}", b.endpoint_count());
    assert_eq!(b.evicted, 400 - 50);
}

#[test]
fn a_baseline_after_1000_churning_runs_serializes_under_256_kib() {
    let config = Config::default();
    let mut b = Baseline::default();
    let cluster = Cluster::default();
    for n in 0..1000u32 {
        let shard = format!("productionresultssa{}.blob.core.windows.net", n % 40);
        let node = format!("node{}.archive.ubuntu.com", n % 30);
        let drift = format!("dep{}.registry.example", n / 10);
        let mut calls: Vec<Call<'_>> = USUAL.iter().map(|h| call(h, 443)).collect();
        calls.extend([call(&shard, 443), call(&node, 80), call(&drift, 443)]);
        observe(&mut b, &config, &cluster, &run(n), &calls);
    }
    let size = serde_json::to_vec(&b).unwrap().len();
    assert!(size <= 256 * 1024, "{size} bytes");
}

fn host_strategy() -> impl Strategy<Value = String> {
    ("[a-z]{3,10}", "[a-z]{3,8}", prop::sample::select(vec!["com", "org", "io", "dev"]))
        .prop_map(|(a, b, tld)| format!("{a}.{b}.{tld}"))
}

proptest! {
    #[test]
    fn a_learned_endpoint_never_alerts(hosts in prop::collection::vec(host_strategy(), 1..20), port in 1u16..) {
        let config = Config { mode: Mode::Learning, ..Config::default() };
        let mut b = Baseline::default();
        let cluster = Cluster::default();
        let calls: Vec<Call<'_>> = hosts.iter().map(|h| call(h, port)).collect();
        observe(&mut b, &config, &cluster, &run(0), &calls);
        let monitoring = Config { mode: Mode::Monitoring, ..config };
        for c in &calls {
            prop_assert!(score(&b, &monitoring, &cluster, c).is_none(), "{:?}", c.host);
        }
    }

    #[test]
    fn an_approved_endpoint_never_alerts(host in host_strategy(), port in 1u16.., frozen in any::<bool>()) {
        let mode = if frozen { Mode::Frozen } else { Mode::Monitoring };
        let parent = host.split_once('.').unwrap().1.to_string();
        let config = Config {
            mode,
            approved: vec![ApprovedRule { target: Approved::Host(format!("*.{parent}")), ports: vec![port], proto: Some(Proto::Tcp) }],
            ..Config::default()
        };
        let b = grown(&config, 3);
        prop_assert!(score(&b, &config, &Cluster::default(), &call(&host, port)).is_none());
    }

    #[test]
    fn a_frozen_baseline_reports_anything_new(host in host_strategy(), port in 1u16..) {
        let config = Config { mode: Mode::Frozen, ..Config::default() };
        let b = grown(&Config::default(), 20);
        prop_assume!(!USUAL.contains(&host.as_str()));
        let v = score(&b, &config, &Cluster::default(), &call(&host, port));
        prop_assert!(v.is_some_and(|v| v.severity >= config.min_severity));
    }

    #[test]
    fn learning_does_not_depend_on_the_order_of_runs(
        runs in prop::collection::vec(prop::collection::vec(host_strategy(), 1..6), 1..12),
        seed in any::<u64>(),
    ) {
        let config = Config { mode: Mode::Learning, ..Config::default() };
        let learn_all = |order: &[usize]| {
            let mut b = Baseline::default();
            for (n, &i) in order.iter().enumerate() {
                let calls: Vec<Call<'_>> = runs[i].iter().map(|h| call(h, 443)).collect();
                observe(&mut b, &config, &Cluster::default(), &run(n as u32), &calls);
            }
            let mut seen: Vec<(String, u16, u32)> = b.hosts.iter()
                .flat_map(|(h, l)| l.iter().map(move |e| (h.clone(), e.port, e.runs_seen)))
                .collect();
            seen.sort();
            (seen, b.patterns.len(), b.runs)
        };
        let forward: Vec<usize> = (0..runs.len()).collect();
        let mut shuffled = forward.clone();
        let mut s = seed;
        for i in (1..shuffled.len()).rev() {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            shuffled.swap(i, (s >> 33) as usize % (i + 1));
        }
        prop_assert_eq!(learn_all(&forward), learn_all(&shuffled));
    }

    #[test]
    fn more_suspicious_evidence_never_lowers_severity(host in host_strategy(), odd_port in 1024u16..) {
        prop_assume!(odd_port != 9418);
        let config = Config::default();
        let b = grown(&config, 20);
        let mut cluster = Cluster::default();
        let plain = score(&b, &config, &cluster, &call(&host, 443)).unwrap();
        // A non-standard port adds suspicion.
        let odd = score(&b, &config, &cluster, &call(&host, odd_port)).unwrap();
        prop_assert!(odd.severity >= plain.severity && odd.score >= plain.score);
        // Other jobs calling the host removes suspicion.
        cluster.add_host("other/repo", &host);
        cluster.add_host("other/repo", &host);
        cluster.add_host("third/repo", &host);
        let common = score(&b, &config, &cluster, &call(&host, 443)).unwrap();
        prop_assert!(common.severity <= plain.severity && common.score <= plain.score);
        cluster.add_host("acme/web", &host);
        let sibling = score(&b, &config, &cluster, &call(&host, 443)).unwrap();
        prop_assert!(sibling.score <= common.score);
    }

    #[test]
    fn a_baseline_survives_serialization(runs in prop::collection::vec(prop::collection::vec(host_strategy(), 1..6), 1..8)) {
        let config = Config::default();
        let mut b = Baseline::default();
        for (n, hosts) in runs.iter().enumerate() {
            let calls: Vec<Call<'_>> = hosts.iter().map(|h| call(h, 443)).collect();
            observe(&mut b, &config, &Cluster::default(), &run(n as u32), &calls);
        }
        let json = serde_json::to_string(&b).unwrap();
        let back: Baseline = serde_json::from_str(&json).unwrap();
        prop_assert_eq!(back, b);
    }
}

#[test]
fn an_attack_in_a_young_baseline_is_shown_and_not_learned_and_its_return_is_reported() {
    let config = Config::default();
    let cluster = Cluster::default();
    let mut b = grown(&config, 2);
    let exfil = call("collector.exfil-example.net", 443);
    let calls: Vec<Call<'_>> = USUAL.iter().map(|h| call(h, 443)).chain([exfil]).collect();
    let verdicts = observe(&mut b, &config, &cluster, &run(2), &calls);
    let v = verdicts[5].clone().expect("scored");
    assert!(v.severity >= Severity::Low, "never just information, however young the baseline: {v:?}");
    assert!(v.unfamiliar, "{v:?}");
    let e = b.endpoint("collector.exfil-example.net", 443, Proto::Tcp).unwrap();
    assert_eq!(e.state, State::Unconfirmed, "recorded, not learned on first sight");

    // The baseline grows up without it; when it comes back it is not normal: it is reported.
    for n in 3..25 {
        observe(&mut b, &config, &cluster, &run(n), &USUAL.map(|h| call(h, 443)));
    }
    let back = score(&b, &config, &cluster, &exfil).expect("not normal");
    assert!(back.severity >= Severity::Low, "{back:?}");
    assert!(back.reasons.iter().any(|r| r.contains("not yet confirmed")), "{back:?}");
}

#[test]
fn an_endpoint_that_recurs_in_enough_runs_is_confirmed_and_learned() {
    let config = Config::default();
    let cluster = Cluster::default();
    let mut b = grown(&config, 2);
    let mirror = call("mirror.example-cdn.org", 443);
    for n in 2..2 + config.confirm_runs {
        let calls: Vec<Call<'_>> = USUAL.iter().map(|h| call(h, 443)).chain([mirror]).collect();
        observe(&mut b, &config, &cluster, &run(n), &calls);
    }
    assert_eq!(b.endpoint("mirror.example-cdn.org", 443, Proto::Tcp).unwrap().state, State::Learned);
    assert!(score(&b, &config, &cluster, &mirror).is_none(), "normal once confirmed");
}

#[test]
fn what_is_learned_does_not_depend_on_the_reporting_threshold() {
    let history = |min_severity: Severity| {
        let config = Config { min_severity, ..Config::default() };
        let cluster = Cluster::default();
        let mut b = Baseline::default();
        for n in 0..30 {
            let mut calls: Vec<Call<'_>> = USUAL.iter().map(|h| call(h, 443)).collect();
            match n {
                1 => calls.push(call("young.exfil-example.net", 443)),
                12 => calls.push(bare("203.0.113.9", 4444)),
                15 => calls.push(call("new-dependency.example.org", 443)),
                20 => calls.push(call("young.exfil-example.net", 443)),
                _ => {}
            }
            observe(&mut b, &config, &cluster, &run(n), &calls);
        }
        b
    };
    let medium = history(Severity::Medium);
    for other in [Severity::Info, Severity::Low, Severity::High, Severity::Critical] {
        assert_eq!(history(other), medium, "the model at min severity {other:?} differs from Medium's");
    }
    assert_eq!(medium.endpoint("203.0.113.9", 4444, Proto::Tcp).unwrap().state, State::Anomalous);
}

#[test]
fn an_unconfirmed_host_vouches_for_nothing() {
    let config = Config::default();
    let cluster = Cluster::default();
    let mut b = grown(&config, 2);
    observe(&mut b, &config, &cluster, &run(2), &[call("drop.exfil-example.net", 443)]);
    let mut grown_up = b.clone();
    for n in 3..25 {
        observe(&mut grown_up, &config, &cluster, &run(n), &USUAL.map(|h| call(h, 443)));
    }
    let v = score(&grown_up, &config, &cluster, &call("second.exfil-example.net", 443)).unwrap();
    assert!(!v.reasons.iter().any(|r| r.contains("which this job already calls")), "{v:?}");
    assert!(v.severity >= Severity::Medium, "{v:?}");
}

/// Under suffixes where anyone can register a name, a host the job does not call is new, however
/// many of its neighbours the job calls: neither "a subdomain of a domain this job calls" nor
/// "a sibling of a host this job calls" applies to an unrelated name there.
#[test]
fn familiarity_does_not_launder_under_multi_tenant_suffixes() {
    let config = Config::default();
    let cluster = Cluster::default();
    for (mine, theirs) in [
        ("docs-acme.pages.dev", "exfil-drop.pages.dev"),
        ("acme-web.vercel.app", "collector.vercel.app"),
        ("acme-api.herokuapp.com", "c2-relay.herokuapp.com"),
        ("acme.github.io", "attacker.github.io"),
        ("acmebuildcache.blob.core.windows.net", "stealer.blob.core.windows.net"),
        ("acme-artifacts.s3.amazonaws.com", "exfil-bucket.s3.amazonaws.com"),
        ("raw.githubusercontent.com", "gist.githubusercontent.com"),
    ] {
        let mut b = Baseline::default();
        for n in 0..20 {
            let calls: Vec<Call<'_>> = USUAL.iter().map(|h| call(h, 443)).chain([call(mine, 443)]).collect();
            observe(&mut b, &config, &cluster, &run(n), &calls);
        }
        let v = score(&b, &config, &cluster, &call(theirs, 443)).unwrap_or_else(|| panic!("{theirs} is normal"));
        assert!(
            !v.reasons.iter().any(|r| r.contains("which this job already calls") || r.contains("a sibling of")),
            "{theirs} borrowed {mine}'s familiarity: {v:?}"
        );
        assert!(v.severity >= Severity::Medium, "{theirs}: {v:?}");
    }
}

/// A rotating family under a multi-tenant suffix is matched only on its learned shape.
#[test]
fn a_family_under_a_shared_suffix_admits_only_its_own_shape() {
    let config = Config::default();
    let cluster = Cluster::default();
    let mut b = Baseline::default();
    for n in 0..20u32 {
        let shard = format!("productionresultssa{}.blob.core.windows.net", n % 7);
        let calls: Vec<Call<'_>> = USUAL.iter().map(|h| call(h, 443)).chain([call(&shard, 443)]).collect();
        observe(&mut b, &config, &cluster, &run(n), &calls);
    }
    assert!(score(&b, &config, &cluster, &call("productionresultssa42.blob.core.windows.net", 443)).is_none());
    for other in ["productionresultsxx1.blob.core.windows.net", "results7.blob.core.windows.net"] {
        let v = score(&b, &config, &cluster, &call(other, 443)).unwrap_or_else(|| panic!("{other} is normal"));
        assert!(v.severity >= Severity::Medium, "{other}: {v:?}");
    }
}

/// Scores `c` with the given abused services.
fn score_with(
    b: &Baseline,
    config: &Config,
    cluster: &Cluster,
    services: &runwarden_detector::Services,
    c: &Call<'_>,
) -> Option<Verdict> {
    Job { repository: "acme/web", baseline: b, config, cluster, services }.score(&run(10_000), c)
}

#[test]
fn an_abused_service_the_job_never_learned_is_high_whatever_vouches_for_it() {
    let config = Config::default();
    let cluster = {
        let mut c = Cluster::default();
        // Other jobs of the repository (and many others) call the paste host and the IP echo.
        for repo in ["acme/web", "acme/api", "acme/docs", "other/x"] {
            c.add_host(repo, "paste.rs");
            c.add_host(repo, "api.ipify.org");
        }
        c
    };
    // Young and grown baselines alike; a sibling of a learned host (gist beside raw) too.
    for runs in [1, 30] {
        let mut b = grown(&config, runs);
        observe(&mut b, &config, &Cluster::default(), &run(runs), &[call("raw.githubusercontent.com", 443)]);
        for (host, what) in [
            ("paste.rs", "paste host"),
            ("api.ipify.org", "IP-echo"),
            ("gist.githubusercontent.com", "paste host"),
            ("a1b2c3.trycloudflare.com", "tunnel"),
            ("xmr-eu1.nanopool.org", "mining pool"),
            ("abc123.oast.fun", "request catcher"),
        ] {
            let v = score(&b, &config, &cluster, &call(host, 443)).expect("reported");
            assert!(v.severity >= Severity::High, "{runs} runs, {host}: {v:?}");
            assert!(v.reasons[0].contains(what), "the first reason says what it is: {v:?}");
        }
    }
}

#[test]
fn an_abused_service_is_not_learned_but_reported_until_approved() {
    let mut config = Config::default();
    let mut b = grown(&config, 3);
    let cluster = Cluster::default();
    let echo = call("api.ipify.org", 443);
    for n in 3..20 {
        let v = observe(&mut b, &config, &cluster, &run(n), &[echo]);
        assert!(v[0].as_ref().is_some_and(|v| v.severity >= Severity::High), "run {n}: {v:?}");
    }
    assert_eq!(b.endpoint("api.ipify.org", 443, Proto::Tcp).unwrap().state, State::Anomalous);
    // The team decides this job may check its address.
    config.approved.push(ApprovedRule { target: Approved::Host("api.ipify.org".into()), ports: vec![], proto: None });
    assert!(score(&b, &config, &cluster, &echo).is_none());
}

#[test]
fn a_policy_adds_abused_services_and_ignores_listed_ones() {
    let config = Config::default();
    let b = grown(&config, 30);
    let cluster = Cluster::default();
    let services = runwarden_detector::Services::builtin()
        .with([("drop.internal.example", runwarden_detector::Category::FileDrop)], ["ipify.org"]);
    let v = score_with(&b, &config, &cluster, &services, &call("eu.drop.internal.example", 443)).unwrap();
    assert!(v.severity >= Severity::High && v.reasons[0].contains("file drop"), "{v:?}");
    // Ignored: scored like any new host (still reported, as a new domain, not as an IP echo).
    let v = score_with(&b, &config, &cluster, &services, &call("api.ipify.org", 443)).unwrap();
    assert!(v.reasons.iter().all(|r| !r.contains("IP-echo")), "{v:?}");
    let builtin = score(&b, &config, &cluster, &call("api.ipify.org", 443)).unwrap();
    assert!(v.score < builtin.score, "{v:?} vs {builtin:?}");
}

/// A run of `n` from `git_ref` with `trigger`.
fn run_from(n: u32, trigger: &'static str, git_ref: &'static str) -> Run<'static> {
    Run { git_ref: Some(git_ref), trigger, ..run(n) }
}

#[test]
fn pull_requests_cannot_poison_a_release_jobs_baseline() {
    let config = Config::default();
    let cluster = Cluster::default();
    // A young release job: two runs from tags.
    let mut b = Baseline::default();
    for n in 0..2 {
        observe(&mut b, &config, &cluster, &run_from(n, "release", "refs/tags/v1.0.0"), &USUAL.map(|h| call(h, 443)));
    }
    let evil = call("telemetry-collect.xyz", 443);
    // The same call from a trusted run would be excused by the young baseline ...
    let from_tag =
        Job { repository: "acme/web", baseline: &b, config: &config, cluster: &cluster, services: Services::builtin() }
            .score(&run_from(2, "release", "refs/tags/v1.0.1"), &evil)
            .unwrap();
    assert!(from_tag.severity < Severity::Medium, "{from_tag:?}");
    // ... but pull requests get no allowance: each of their runs reports it.
    for n in 2..8 {
        let v = observe(&mut b, &config, &cluster, &run_from(n, "pull_request", "refs/pull/7/merge"), &[evil]);
        let v = v[0].as_ref().expect("reported");
        assert!(v.severity >= Severity::Medium, "pull request run {n}: {v:?}");
        assert!(v.reasons.iter().any(|r| r.contains("untrusted ref (refs/pull/7/merge)")), "{v:?}");
    }
    // Six pull request runs taught the release job nothing: the next release run that calls it
    // is judged as new, and says why.
    assert_eq!(b.endpoint("telemetry-collect.xyz", 443, Proto::Tcp).unwrap().state, State::Untrusted);
    let release = run_from(8, "release", "refs/tags/v1.1.0");
    let job =
        Job { repository: "acme/web", baseline: &b, config: &config, cluster: &cluster, services: Services::builtin() };
    let v = job.score(&release, &evil).expect("not normal for a release run");
    assert!(v.reasons.iter().any(|r| r.contains("only by runs of untrusted refs")), "{v:?}");
}

#[test]
fn what_pull_requests_call_is_normal_for_them_and_learned_only_from_a_trusted_run() {
    let config = Config::default();
    let cluster = Cluster::default();
    let mut b = grown(&config, 20);
    // Under a domain the job uses: unremarkable, so not reported to the pull request.
    let docs = call("docs.nodejs.org", 443);
    let pr = |n| run_from(n, "pull_request", "refs/pull/9/merge");
    let v = observe(&mut b, &config, &cluster, &pr(20), &[docs]);
    assert!(v[0].as_ref().is_some_and(|v| v.severity < Severity::Medium), "{v:?}");
    let learned = b.learn(&config, &pr(21), &[(docs, None)]);
    assert!(learned.new_hosts.is_empty(), "other jobs do not count what a pull request taught: {learned:?}");
    assert_eq!(observe(&mut b, &config, &cluster, &pr(22), &[docs]), [None], "normal for pull requests now");
    // Not for a push to main, nor does it vouch for its domain's other names there.
    let main = |n| run_from(n, "push", "refs/heads/main");
    let job =
        Job { repository: "acme/web", baseline: &b, config: &config, cluster: &cluster, services: Services::builtin() };
    assert!(job.score(&main(23), &docs).is_some());
    // A feature branch is not trusted either (only main, master and tags by default).
    assert!(!run_from(23, "push", "refs/heads/feature/x").is_trusted(&config));
    // The push learns it on its own merit; from then on it is normal for every run.
    observe(&mut b, &config, &cluster, &main(23), &[docs]);
    assert_eq!(b.endpoint("docs.nodejs.org", 443, Proto::Tcp).unwrap().state, State::Learned);
    assert_eq!(observe(&mut b, &config, &cluster, &main(24), &[docs]), [None]);
}

#[test]
fn trusted_refs_are_configurable_and_match_exactly_or_by_prefix() {
    let config =
        Config { trusted_refs: vec!["refs/heads/develop".into(), "refs/heads/release/*".into()], ..Config::default() };
    let trusted = |r| run_from(0, "push", r).is_trusted(&config);
    assert!(trusted("refs/heads/develop"));
    assert!(trusted("refs/heads/release/1.x"));
    assert!(!trusted("refs/heads/release"));
    assert!(!trusted("refs/heads/release-1.x"));
    assert!(!trusted("refs/heads/main"));
    // A pull request is untrusted whatever its ref; a run whose ref is unknown, by its trigger.
    assert!(!run_from(0, "pull_request_target", "refs/heads/develop").is_trusted(&config));
    assert!(run(0).is_trusted(&config));
}
