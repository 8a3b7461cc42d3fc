//! Scoring and learning cost: `make bench` (or `cargo bench -p runwarden-detector`).
//!
//! - `score/known`: calls to endpoints the job learned (the common case on the agent's hot path).
//! - `score/new`: calls to endpoints it did not (full evidence, reasons allocated), with the
//!   baseline's and the cluster's indexes built (they are, after the first call of a version).
//! - `score/new-large-cluster`: the same beside 2,000 other jobs calling 3,000 domains.
//! - `index/build`: what the first scored call after a merge pays to index the baseline.
//! - `learn/run`: merging a finished run of 25 calls into the baseline.

use std::hint::black_box;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use runwarden_detector::{Baseline, Call, Cluster, Config, Job, Proto, Run, Services};

fn hosts() -> Vec<String> {
    let mut h: Vec<String> = [
        "github.com",
        "api.github.com",
        "codeload.github.com",
        "objects.githubusercontent.com",
        "release-assets.githubusercontent.com",
        "registry.npmjs.org",
        "pypi.org",
        "files.pythonhosted.org",
        "proxy.golang.org",
        "sum.golang.org",
        "ghcr.io",
        "pkg-containers.githubusercontent.com",
        "registry-1.docker.io",
        "auth.docker.io",
        "production.cloudflare.docker.com",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    h.extend((0..45).map(|i| format!("svc{}.internal-{}.example.com", char::from(b'a' + (i % 26) as u8), i)));
    h
}

fn calls(hosts: &[String]) -> Vec<Call<'_>> {
    hosts
        .iter()
        .map(|h| Call { host: Some(h), ip: None, port: 443, proto: Proto::Tcp, process: Some("curl") })
        .collect()
}

fn learned(config: &Config, hosts: &[String]) -> Baseline {
    let mut b = Baseline::default();
    let calls = calls(hosts);
    let scored: Vec<_> = calls.iter().map(|c| (*c, None)).collect();
    for n in 0..20 {
        let id = n.to_string();
        b.learn(config, &Run { id: &id, time: n * 3600, trigger: "push", git_ref: None }, &scored);
    }
    b
}

fn bench(c: &mut Criterion) {
    let config = Config::default();
    let hosts = hosts();
    let baseline = learned(&config, &hosts);
    let mut cluster = Cluster::default();
    for (i, h) in hosts.iter().enumerate() {
        cluster.add_host(&format!("org{}/repo", i % 7), h);
    }
    let job = Job {
        repository: "acme/web",
        baseline: &baseline,
        config: &config,
        cluster: &cluster,
        services: Services::builtin(),
    };
    let run = Run { id: "99", time: 99 * 3600, trigger: "push", git_ref: None };
    let known = calls(&hosts);

    let mut g = c.benchmark_group("score");
    g.throughput(Throughput::Elements(known.len() as u64));
    g.bench_function("known", |b| {
        b.iter(|| {
            for call in &known {
                black_box(job.score(&run, black_box(call)));
            }
        })
    });
    let unknown: Vec<String> = (0..20).map(|i| format!("new{i}.unknown-domain.example")).collect();
    let new_calls = calls(&unknown);
    g.throughput(Throughput::Elements(new_calls.len() as u64));
    g.bench_function("new", |b| {
        b.iter(|| {
            for call in &new_calls {
                black_box(job.score(&run, black_box(call)));
            }
        })
    });
    let mut large = Cluster::default();
    for job in 0..2000 {
        for k in 0..40 {
            large.add_host(
                &format!("org{}/repo{}", job % 300, job % 7),
                &format!("api.vendor{}.com", (job * 7 + k * 13) % 3000),
            );
        }
    }
    let job_large = Job { cluster: &large, ..job };
    g.bench_function("new-large-cluster", |b| {
        b.iter(|| {
            for call in &new_calls {
                black_box(job_large.score(&run, black_box(call)));
            }
        })
    });
    g.finish();

    let mut g = c.benchmark_group("index");
    g.throughput(Throughput::Elements(1));
    g.bench_function("build", |b| b.iter(|| black_box(runwarden_detector::index::BaselineIndex::build(&baseline))));
    g.finish();

    let mut g = c.benchmark_group("learn");
    let run_calls: Vec<_> = known.iter().take(25).map(|c| (*c, None)).collect();
    g.throughput(Throughput::Elements(1));
    g.bench_function("run", |b| {
        b.iter_batched_ref(
            || baseline.clone(),
            |bl| black_box(bl.learn(&config, &run, &run_calls)),
            criterion::BatchSize::SmallInput,
        )
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
