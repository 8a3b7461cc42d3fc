//! A model written into a status reads back unchanged, and specs become the right config.

use proptest::prelude::*;
use runwarden_crds::baseline::{BaselineMode, LearningSpec, WorkflowBaselineSpec, WorkflowBaselineStatus};
use runwarden_crds::{EndpointRule, Protocol};
use runwarden_detector::{Approved, Baseline, Call, Cluster, Config, Job, Mode, Proto, Run, Severity};

/// A call's destination: host, address, port.
type Destination = (Option<String>, Option<std::net::IpAddr>, u16);

/// A destination of one of the kinds the model keeps apart.
fn destination() -> impl Strategy<Value = Destination> {
    prop_oneof![
        ("[a-z]{3,8}", prop::sample::select(vec!["com", "org", "dev"]), prop::sample::select(vec![443u16, 80, 8443]))
            .prop_map(|(a, tld, port)| (Some(format!("{a}.example-{tld}.{tld}")), None, port)),
        (0u8..40).prop_map(|n| (Some(format!("productionresultssa{n}.blob.core.windows.net")), None, 443)),
        (0u8..6).prop_map(|n| (Some(format!("node{n}.archive.ubuntu.com")), None, 80)),
        (any::<u8>(), 1u16..).prop_map(|(n, port)| (None, Some(std::net::IpAddr::from([203, 0, 113, n])), port)),
        (any::<u16>()).prop_map(|n| (None, Some(std::net::IpAddr::from([0x2001, 0xdb8, 0, 0, 0, 0, 0, n])), 443)),
    ]
}

fn grow(runs: &[Vec<Destination>], mode: Mode) -> (Baseline, Config) {
    grow_with(runs, mode, &["push", "pull_request", "release", "schedule"])
}

/// Learns `runs`, their triggers taken in turn from `triggers`.
fn grow_with(runs: &[Vec<Destination>], mode: Mode, triggers: &[&str]) -> (Baseline, Config) {
    let config = Config { mode, min_runs: 3, ..Config::default() };
    let mut b = Baseline::default();
    let cluster = Cluster::default();
    for (n, calls) in runs.iter().enumerate() {
        let id = format!("{}", 1000 + n);
        let run = Run {
            id: &id,
            time: 1_767_225_600 + n as i64 * 3600,
            trigger: triggers[n % triggers.len()],
            git_ref: None,
        };
        let calls: Vec<Call<'_>> = calls
            .iter()
            .map(|(h, ip, port)| Call {
                host: h.as_deref(),
                ip: *ip,
                port: *port,
                proto: Proto::Tcp,
                process: Some("curl"),
            })
            .collect();
        let job = Job {
            repository: "acme/web",
            baseline: &b,
            config: &config,
            cluster: &cluster,
            services: runwarden_detector::Services::builtin(),
        };
        let scored: Vec<_> = calls.iter().map(|c| (*c, job.score(&run, c))).collect();
        b.learn(&config, &run, &scored);
    }
    (b, config)
}

proptest! {
    #[test]
    fn a_model_survives_the_status(
        runs in prop::collection::vec(prop::collection::vec(destination(), 1..8), 1..25),
        monitoring in any::<bool>(),
    ) {
        let (b, config) = grow(&runs, if monitoring { Mode::Monitoring } else { Mode::Auto });
        let mut status = WorkflowBaselineStatus::default();
        runwarden_status::write(&b, &config, &mut status);
        prop_assert_eq!(status.endpoint_count as usize, b.endpoint_count());
        let back = runwarden_status::read(&status).unwrap();
        prop_assert_eq!(back, b);
    }
}

#[test]
fn the_spec_becomes_the_detector_config() {
    let spec = WorkflowBaselineSpec {
        repository: "acme/web".into(),
        workflow: ".github/workflows/ci.yml".into(),
        job: "build".into(),
        mode: BaselineMode::Frozen,
        learning: LearningSpec { min_runs: 7, ..LearningSpec::default() },
        approved: vec![
            EndpointRule { host: Some("*.docker.io".into()), ports: vec![443], ..EndpointRule::default() },
            EndpointRule {
                cidr: Some("2001:db8::/32".into()),
                protocol: Some(Protocol::Udp),
                ..EndpointRule::default()
            },
        ],
    };
    let config = runwarden_status::config(&spec, Severity::High).unwrap();
    assert_eq!(config.mode, Mode::Frozen);
    assert_eq!(config.min_runs, 7);
    assert_eq!(config.min_severity, Severity::High);
    assert_eq!(
        config.confirm_runs,
        runwarden_detector::model::DEFAULT_CONFIRM_RUNS,
        "the CRD's default confirmRuns is the detector's"
    );
    assert_eq!(config.approved[0].target, Approved::Host("*.docker.io".into()));
    assert_eq!(config.approved[1].target, Approved::Cidr("2001:db8::".parse().unwrap(), 32));
    assert_eq!(config.approved[1].proto, Some(Proto::Udp));
}

#[test]
fn an_approved_endpoint_the_schema_should_have_refused_is_a_clear_error() {
    let spec = WorkflowBaselineSpec {
        repository: "acme/web".into(),
        workflow: ".github/workflows/ci.yml".into(),
        job: "build".into(),
        mode: BaselineMode::Auto,
        learning: LearningSpec::default(),
        approved: vec![EndpointRule { cidr: Some("10.0.0.0/99".into()), ..EndpointRule::default() }],
    };
    let err = runwarden_status::config(&spec, Severity::Medium).unwrap_err();
    assert_eq!(err.to_string(), "spec.approved[0]: cidr \"10.0.0.0/99\" is not a CIDR");
}

/// A baseline with every kind of entry: hosts, addresses, a rotating-name pattern, an address
/// block, anomalies, an approval.
fn every_kind() -> (Baseline, Config) {
    let mut runs: Vec<Vec<Destination>> = Vec::new();
    for n in 0..12u8 {
        runs.push(vec![
            (Some("github.com".into()), None, 443),
            (Some(format!("productionresultssa{}.blob.core.windows.net", n % 5)), None, 443),
            (None, Some(std::net::IpAddr::from([198, 51, 100, n % 4])), 443),
            (None, Some("2001:db8::7".parse().unwrap()), 443),
        ]);
    }
    runs.push(vec![(Some("paste.example".into()), None, 443), (None, Some([203, 0, 113, 77].into()), 4444)]);
    // A pull request's own host: untrusted.
    runs.push(vec![(Some("docs.github.com".into()), None, 443)]);
    let mut triggers = vec!["push"; runs.len() - 1];
    triggers.push("pull_request");
    grow_with(&runs, Mode::Auto, &triggers)
}

#[test]
fn every_kind_of_entry_survives_the_status() {
    let (b, config) = every_kind();
    assert!(b.patterns.iter().any(|p| p.shape == "productionresultssa#.blob.core.windows.net"), "{:?}", b.patterns);
    assert!(b.patterns.iter().any(|p| p.shape == "198.51.100.0/24"), "{:?}", b.patterns);
    assert!(b.hosts.values().flatten().any(|e| e.state == runwarden_detector::State::Anomalous));
    assert!(b.hosts.contains_key("2001:db8::7"));
    assert_eq!(
        b.endpoint("docs.github.com", 443, Proto::Tcp).map(|e| e.state),
        Some(runwarden_detector::State::Untrusted)
    );
    let mut status = WorkflowBaselineStatus::default();
    runwarden_status::write(&b, &config, &mut status);
    assert!(status.endpoints.iter().any(|e| e.cidr.as_deref() == Some("2001:db8::7/128")));
    assert!(
        status.endpoints.iter().any(|e| e.pattern.as_deref() == Some("productionresultssa#.blob.core.windows.net"))
    );
    assert_eq!(runwarden_status::read(&status).unwrap(), b);
}
