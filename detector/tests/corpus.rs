//! The detector on the public replay corpus (`../shared/datasets/egress-replay`, or
//! `$RUNWARDEN_REPLAY_CORPUS`): `runwarden-replay` scored by the corpus's own `score.py` meets
//! the goals, and the largest job's baseline stays small after 1,000 runs.
//!
//! Needs `python3` (for `score.py`); `make test` runs it.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::process::Command;

use runwarden_detector::{Baseline, Call, Cluster, Config, Job, Proto, Run};
use serde_json::Value;

fn corpus() -> PathBuf {
    let dir = std::env::var_os("RUNWARDEN_REPLAY_CORPUS").map(PathBuf::from).unwrap_or_else(|| {
        let manifest = std::env::var_os("CARGO_MANIFEST_DIR").unwrap_or_else(|| env!("CARGO_MANIFEST_DIR").into());
        PathBuf::from(manifest).join("../../shared/datasets/egress-replay")
    });
    assert!(
        dir.join("runs.jsonl").is_file(),
        "replay corpus not found at {}; set RUNWARDEN_REPLAY_CORPUS to the egress-replay folder",
        dir.display()
    );
    dir
}

#[test]
fn replay_on_the_public_corpus_meets_the_goals() {
    let dir = corpus();
    let alerts = std::env::temp_dir().join(format!("runwarden-alerts-{}.jsonl", std::process::id()));
    let status = Command::new(env!("CARGO_BIN_EXE_runwarden-replay"))
        .arg("--input")
        .arg(dir.join("runs.jsonl"))
        .arg("--output")
        .arg(&alerts)
        .status()
        .expect("runwarden-replay runs");
    assert!(status.success());
    let out = Command::new("python3")
        .arg(dir.join("score.py"))
        .arg("--traces")
        .arg(&dir)
        .arg("--alerts")
        .arg(&alerts)
        .output()
        .expect("python3 runs score.py");
    let _ = std::fs::remove_file(&alerts);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "score.py failed: {}", String::from_utf8_lossy(&out.stderr));
    eprintln!("{text}");
    let summary: Value = serde_json::from_str(&text[..text.rfind("\nepisode_recall").expect("score.py summary line")])
        .expect("score.py prints a JSON summary");
    let get = |k: &str| summary[k].as_f64().unwrap_or_else(|| panic!("{k} missing from {summary}"));
    assert_eq!(get("episode_recall"), 1.0, "every attack episode alerted in its first run");
    assert!(get("recall") >= 0.95, "call recall {}", get("recall"));
    assert!(get("fp_run_rate") <= 0.02, "false-alarm runs {}", get("fp_run_rate"));
    assert!(get("fp_run_rate") < get("naive_fp_run_rate"));
}

#[test]
fn the_largest_corpus_job_stays_under_256_kib_after_1000_runs() {
    let text = std::fs::read_to_string(corpus().join("runs.jsonl")).unwrap();
    let runs: Vec<Value> = text.lines().filter(|l| !l.is_empty()).map(|l| serde_json::from_str(l).unwrap()).collect();
    let mut endpoints: HashMap<&str, HashSet<(String, u64)>> = HashMap::new();
    for r in &runs {
        let set = endpoints.entry(r["workflow"].as_str().unwrap()).or_default();
        for c in r["calls"].as_array().unwrap() {
            let target = c["host"].as_str().or(c["ip"].as_str()).unwrap().to_string();
            set.insert((target, c["port"].as_u64().unwrap()));
        }
    }
    let (largest, distinct) = endpoints.iter().max_by_key(|(_, s)| s.len()).map(|(w, s)| (*w, s.len())).unwrap();
    let history: Vec<&Value> = runs.iter().filter(|r| r["workflow"] == largest).collect();

    let config = Config::default();
    let cluster = Cluster::default();
    let mut b = Baseline::default();
    for n in 0..1000usize {
        let r = history[n % history.len()];
        let id = n.to_string();
        let run = Run {
            id: &id,
            time: 1_767_225_600 + n as i64 * 3600,
            trigger: r["trigger"].as_str().unwrap(),
            git_ref: None,
        };
        let calls: Vec<Call<'_>> = r["calls"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| Call {
                host: c["host"].as_str(),
                ip: c["ip"].as_str().and_then(|ip| ip.parse().ok()),
                port: c["port"].as_u64().unwrap() as u16,
                proto: if c["proto"] == "udp" { Proto::Udp } else { Proto::Tcp },
                process: c["process"].as_str(),
            })
            .collect();
        let job = Job {
            repository: r["repository"].as_str().unwrap(),
            baseline: &b,
            config: &config,
            cluster: &cluster,
            services: runwarden_detector::Services::builtin(),
        };
        let scored: Vec<_> = calls.iter().map(|c| (*c, job.score(&run, c))).collect();
        b.learn(&config, &run, &scored);
    }
    let size = serde_json::to_vec(&b).unwrap().len();
    eprintln!(
        "largest job {largest}: {distinct} distinct endpoints in the corpus; after 1000 runs {} endpoints, {} patterns, {size} bytes",
        b.endpoint_count(),
        b.patterns.len()
    );
    assert!(size <= 256 * 1024, "{size} bytes");
}
