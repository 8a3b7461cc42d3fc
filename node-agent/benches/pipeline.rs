//! Userspace pipeline throughput: ring-buffer records (synthetic, in the kernel's layout)
//! decoded, named from each pod's DNS answers and attributed to pods through the cgroup index,
//! per second on one core. `cargo bench -p runwarden-agent --bench pipeline`.

use std::net::{IpAddr, Ipv4Addr};
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use runwarden_agent::cgroups::CgroupIndex;
use runwarden_agent::events::{Call, DnsMessage, Hook, Proto, Verdict, decode, dedupe_key, encode_call, encode_dns};
use runwarden_agent::pipeline::{Pipeline, PipelineConfig};

const PODS: u32 = 64;
const DESTINATIONS: u32 = 50;
const RECORDS: usize = 100_000;

/// A DNS answer naming `ip` `name` (A record, compressed owner).
fn dns_message(name: &str, ip: Ipv4Addr) -> Vec<u8> {
    let mut m = vec![0, 1, 0x81, 0x80, 0, 1, 0, 1, 0, 0, 0, 0];
    for label in name.split('.') {
        m.push(label.len() as u8);
        m.extend(label.as_bytes());
    }
    m.extend([0, 0, 1, 0, 1, 0xc0, 12, 0, 1, 0, 1, 0, 0, 0x0e, 0x10, 0, 4]);
    m.extend(ip.octets());
    m
}

/// Container cgroup ids (inode numbers of a kubelet-style tree in a temporary directory) and
/// the index of that tree.
fn tree() -> (PathBuf, Vec<(u64, u64)>, CgroupIndex) {
    let root = std::env::temp_dir().join(format!("runwarden-bench-pipeline-{}", std::process::id()));
    let mut ids = Vec::new();
    for p in 0..PODS {
        let pod = root.join(format!(
            "kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{p:08x}_1111_4222_8333_000000000000.slice"
        ));
        let container = pod.join(format!("cri-containerd-{p:064x}.scope"));
        std::fs::create_dir_all(&container).unwrap();
        ids.push((std::fs::metadata(&pod).unwrap().ino(), std::fs::metadata(&container).unwrap().ino()));
    }
    let index = CgroupIndex::scan(&root).unwrap();
    assert_eq!(index.len(), 2 * PODS as usize);
    (root, ids, index)
}

fn records(ids: &[(u64, u64)]) -> Vec<Vec<u8>> {
    let mut out = Vec::with_capacity(RECORDS);
    let mut seed = 0x2545_f491_4f6c_dd1du64;
    let mut rand = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    let ip = |p: u32, d: u32| Ipv4Addr::new(10, p as u8, d as u8, 1);
    // A query and its answer, as the pod's DNS filters see them.
    let exchange = |p: u32, d: u32, at: u64| {
        let answer = DnsMessage {
            query: false,
            timestamp_ns: at,
            cgroup_id: ids[p as usize].1,
            pod_cgroup_id: ids[p as usize].0,
            ifindex: 2,
            server: IpAddr::V4(Ipv4Addr::new(10, 96, 0, 10)),
            client_port: 40_000,
            length: 0,
            message: dns_message(&format!("svc{d}.pod{p}.example.com"), ip(p, d)),
        };
        let mut query = DnsMessage { query: true, timestamp_ns: at - 1000, ..answer.clone() };
        query.message[2] = 0x01; // QR clear: the query, its question as in the answer
        query.message[7] = 0; // no answer records
        query.message.truncate(12 + format!("svc{d}.pod{p}.example.com").len() + 2 + 4);
        [encode_dns(&query), encode_dns(&answer)]
    };
    let call = |p: u32, dest: IpAddr, port: u16, proto: Proto, total: u64, at: u64| {
        let (pod, cgroup) = ids[p as usize];
        encode_call(&Call {
            timestamp_ns: at,
            cgroup_id: cgroup,
            pod_cgroup_id: pod,
            total,
            first: total == 1,
            pid: 1000 + p,
            tid: 1000 + p,
            comm: "node".into(),
            ip: dest,
            port,
            proto,
            hook: Hook::Connect,
            verdict: Verdict::Allowed,
            key: dedupe_key(cgroup, pod, dest, port, proto),
        })
    };
    for p in 0..PODS {
        for d in 0..DESTINATIONS {
            out.extend(exchange(p, d, 1_000_000_000));
        }
    }
    let mut total = 1;
    while out.len() < RECORDS {
        let (p, d) = ((rand() % u64::from(PODS)) as u32, (rand() % u64::from(DESTINATIONS)) as u32);
        let at = 2_000_000_000 + out.len() as u64 * 1000;
        // One record in ten is a DNS query or answer, the rest calls.
        if rand() % 20 == 0 {
            out.extend(exchange(p, d, at));
            continue;
        }
        total += 1;
        out.push(call(p, IpAddr::V4(ip(p, d)), 443, Proto::Tcp, total, at));
    }
    out
}

fn bench(c: &mut Criterion) {
    let (root, ids, index) = tree();
    let records = records(&ids);
    let mut group = c.benchmark_group("pipeline");
    group.throughput(Throughput::Elements(records.len() as u64));
    group.sample_size(20);
    group.bench_function("decode", |b| {
        b.iter(|| {
            for r in &records {
                std::hint::black_box(decode(r).ok());
            }
        })
    });
    let mut pipeline = Pipeline::new(PipelineConfig { attribute_pods: true, ..PipelineConfig::default() });
    assert!(pipeline.set_index(index).is_empty());
    group.bench_function("decode, name and attribute", |b| {
        b.iter(|| {
            for r in &records {
                std::hint::black_box(pipeline.record(r));
            }
        })
    });
    group.finish();
    let named =
        records.iter().filter_map(|r| pipeline.record(r)).filter(|o| !o.hosts.is_empty() && o.pod.is_some()).count();
    println!("calls named and attributed: {named} of {} records", records.len());
    let _ = std::fs::remove_dir_all(root);
}

criterion_group!(benches, bench);
criterion_main!(benches);
