#!/usr/bin/env python3
"""A held-out replay for the detector: a new history of real CI jobs with attacks taken from
public reports of CI supply-chain incidents. `make heldout` generates it and scores the detector
on it; it is a check we do not tune against (see docs/detector.md).

It reads the jobs' real allow-lists (`jobs.jsonl` of the public corpus) and writes, in the same
format as the public replay (`runs.jsonl`, `labels.jsonl`, `phases.jsonl`, scored by its
`score.py`), a history built with its own seed from the repositories the seed puts in the
held-out half. Runs carry their git `ref` as the agent sees it (`jobWorkflowRef`): pull requests
run from `refs/pull/N/merge`, pushes mostly from `refs/heads/main`, some from feature branches,
releases from tags.

The attacks, in 40% of workflows, are what the reports say the compromised step called. An
episode lasts 1-3 runs; a third of the attacked workflows are hit while their baseline is young
(within their first 8 runs) and half of those again later, and a quarter of the attacked
workflows are attacked through pull requests:

| attack | destination | source |
| --- | --- | --- |
| tj-actions-memdump | gist.githubusercontent.com:443 (the memory dumper) | https://nvd.nist.gov/vuln/detail/CVE-2025-30066 |
| shai-hulud-webhook | webhook.site:443 (stolen secrets) | https://www.cisa.gov/news-events/alerts/2025/09/23/widespread-supply-chain-compromise-impacting-npm-ecosystem |
| codecov-uploader | 104.248.94.23:80, a bare address (the build's environment) | https://about.codecov.io/apr-2021-post-mortem/ |
| ghostaction-exfil | bold-dhawan.45-139-104-115.plesk.page:443 | https://blog.pypi.org/posts/2025-09-16-github-actions-token-exfiltration/ |
| ctx-herokuapp-exfil | anti-theft-web.herokuapp.com:443 (AWS keys, the ctx PyPI package) | https://venafi.com/blog/popular-python-package-compromised-dont-blindly-trust-open-source |
| sunburst-dns | encoded label .appsync-api.eu-west-1.avsvmcloud.com, looked up over DNS | https://securelist.com/sunburst-connecting-the-dots-in-the-dns-requests/99862/ |
| torchtriton-dns | encoded labels .h4ck.cfd, looked up over DNS | https://pytorch.org/blog/compromised-nightly-dependency/ |
| ultralytics-miner | connect.consrensys.com:8080, pool.supportxmr.com:8080 | https://github.com/ultralytics/ultralytics/issues/18027 |
| nx-github-exfil | api.github.com:443 (a new public repository holding the secrets) | https://github.com/nrwl/nx/security/advisories/GHSA-cxm3-wv7p-598c |

The last one goes to a host every job calls: no destination-based detector can see it, and it
is kept to say so in the results.
"""
import argparse
import hashlib
import json
import os
import random
from datetime import datetime, timedelta, timezone

ATTACKS = [
    "tj-actions-memdump",
    "shai-hulud-webhook",
    "codecov-uploader",
    "ghostaction-exfil",
    "ctx-herokuapp-exfil",
    "sunburst-dns",
    "torchtriton-dns",
    "ultralytics-miner",
    "nx-github-exfil",
]
RESOLVER = "10.96.0.10"
TRIGGERS = [("push", 0.55), ("pull_request", 0.30), ("schedule", 0.06), ("release", 0.05), ("workflow_dispatch", 0.04)]
# Hosts a job calls only when it publishes.
RELEASE_HINTS = ("upload", "rekor.", "fulcio.", "timestamp.", "tuf-repo")
# Hosts a job may start calling one day (a new tool or action), benign drift.
POPULAR = ["ghcr.io:443", "registry.npmjs.org:443", "pypi.org:443", "files.pythonhosted.org:443",
           "proxy.golang.org:443", "storage.googleapis.com:443", "dl.google.com:443", "nodejs.org:443"]


def ip_of(host, rng_seed):
    h = hashlib.sha256(f"{rng_seed}:{host}".encode()).digest()
    return f"198.{18 + h[0] % 2}.{h[1]}.{h[2] or 1}"


def process_of(host):
    if "npm" in host or "yarn" in host or "nodejs" in host:
        return "node"
    if "pypi" in host or "pythonhosted" in host:
        return "pip"
    if "golang" in host or host.startswith("go."):
        return "go"
    if "docker" in host or "ghcr" in host or "quay" in host:
        return "docker"
    if host.endswith("github.com"):
        return "git"
    return "curl"


def encoded_label(rng, n):
    return "".join(rng.choice("abcdefghijklmnopqrstuvwxyz234567") for _ in range(n))


def attack_calls(kind, rng):
    """The calls an attack adds to a run: (host, ip, port, proto, process)."""
    if kind == "tj-actions-memdump":
        return [("gist.githubusercontent.com", "185.199.108.133", 443, "tcp", "curl")]
    if kind == "shai-hulud-webhook":
        return [("webhook.site", "46.4.105.116", 443, "tcp", "node")]
    if kind == "codecov-uploader":
        return [(None, "104.248.94.23", 80, "tcp", "curl")]
    if kind == "ghostaction-exfil":
        return [("bold-dhawan.45-139-104-115.plesk.page", "45.139.104.115", 443, "tcp", "curl")]
    if kind == "ctx-herokuapp-exfil":
        return [("anti-theft-web.herokuapp.com", "54.243.9.2", 443, "tcp", "python3")]
    if kind == "sunburst-dns":
        host = f"{encoded_label(rng, 23)}.appsync-api.eu-west-1.avsvmcloud.com"
        return [(host, RESOLVER, 53, "udp", "SolarWinds.BusinessLayerHost")]
    if kind == "torchtriton-dns":
        host = f"{encoded_label(rng, 28)}.{encoded_label(rng, 10)}.h4ck.cfd"
        return [(host, RESOLVER, 53, "udp", "python3")]
    if kind == "ultralytics-miner":
        return [("connect.consrensys.com", "185.244.149.40", 8080, "tcp", "ultralytics_runner"),
                ("pool.supportxmr.com", "141.94.96.71", 8080, "tcp", "xmrig")]
    if kind == "nx-github-exfil":
        return [("api.github.com", "140.82.112.6", 443, "tcp", "node")]
    raise ValueError(kind)


def valid(endpoint):
    """`host:port` as the allow-lists write it (a few are malformed: skipped)."""
    host, _, port = endpoint.rpartition(":")
    return bool(host) and port.isdigit()


def concrete(endpoint, word, rng):
    """A concrete host for a wildcard entry (`*.blob.core.windows.net` → a rotating name)."""
    host, port = endpoint.rsplit(":", 1)
    if "*" in host:
        suffix = host.split("*", 1)[1].lstrip(".-")
        host = f"{word}{rng.randint(1, 40)}.{suffix}"
    return host, int(port)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--jobs", required=True, help="jobs.jsonl of the public corpus")
    ap.add_argument("--out", required=True)
    ap.add_argument("--seed", type=int, default=2026)
    a = ap.parse_args()
    rng = random.Random(a.seed)
    jobs = [json.loads(l) for l in open(a.jobs) if l.strip()]
    repos = sorted({j["repo"] for j in jobs})
    held_out = set(rng.sample(repos, len(repos) // 2))
    jobs = [j for j in jobs if j["repo"] in held_out]
    start = datetime(2026, 3, 2, tzinfo=timezone.utc)

    events = []  # (time, run line)
    labels, phases = [], []
    by_repo = {}
    for j in jobs:
        by_repo.setdefault(j["repo"], []).append(j)
    for j in jobs:
        wf = f"{j['repo']}/{j['path']}:{j['job']}"
        word = rng.choice(["cdn", "node", "shard", "prod", "assets", "mirror"])
        endpoints = [e for e in j["endpoints"] if valid(e)]
        freq = {}
        for e in endpoints:
            release_only = any(h in e for h in RELEASE_HINTS)
            freq[e] = ("release", 0.9) if release_only else ("any", 1.0 if rng.random() < 0.55 else rng.uniform(0.25, 0.9))
        n_runs = rng.randint(25, 60)
        drift_at = rng.randint(n_runs // 3, n_runs - 2) if rng.random() < 0.25 else None
        drift = None
        if drift_at is not None:
            siblings = [e for s in by_repo[j["repo"]] for e in s["endpoints"]
                        if e not in endpoints and "*" not in e and valid(e)]
            pool = siblings or [p for p in POPULAR if p not in endpoints]
            drift = rng.choice(pool) if pool else None
        test_from = int(n_runs * 0.45)
        # Episodes: (attack, first run, end). A third of them land while the baseline is young
        # (its first runs), and half of those come back later in the test phase; some arrive
        # through pull requests.
        episodes = []
        if rng.random() < 0.4:
            kind = rng.choice(ATTACKS)
            if rng.random() < 0.35:
                first = rng.randint(1, min(8, test_from - 1))
                episodes.append((kind, first, first + rng.randint(1, 2)))
                if rng.random() < 0.5:
                    again = rng.randint(test_from, n_runs - 1)
                    episodes.append((kind, again, min(n_runs, again + rng.randint(1, 3))))
            else:
                first = rng.randint(test_from, n_runs - 1)
                episodes.append((kind, first, min(n_runs, first + rng.randint(1, 3))))
        via_pr = rng.random() < 0.25
        t = start + timedelta(minutes=rng.randint(0, 60 * 24 * 5))
        for seq in range(n_runs):
            t += timedelta(minutes=rng.randint(60, 60 * 30))
            episode = next((e for e in episodes if e[1] <= seq < e[2]), None)
            trigger = rng.choices([x for x, _ in TRIGGERS], [w for _, w in TRIGGERS])[0]
            if episode and via_pr:
                trigger = "pull_request"
            if trigger == "pull_request":
                ref = f"refs/pull/{rng.randint(1, 900)}/merge"
            elif trigger == "release":
                ref = f"refs/tags/v1.{seq}.0"
            elif trigger == "push" and rng.random() < 0.15:
                ref = f"refs/heads/feature-{rng.randint(1, 50)}"
            else:
                ref = "refs/heads/main"
            run_id = str(rng.randint(10**8, 10**10))
            calls = []
            for e in endpoints:
                kind, p = freq[e]
                if kind == "release" and trigger != "release":
                    continue
                if rng.random() <= p:
                    host, port = concrete(e, word, rng)
                    calls.append({"host": host, "ip": ip_of(host, a.seed), "port": port, "proto": "tcp",
                                  "process": process_of(host)})
            if drift and seq >= drift_at and rng.random() < 0.85:
                host, port = concrete(drift, word, rng)
                calls.append({"host": host, "ip": ip_of(host, a.seed), "port": port, "proto": "tcp",
                              "process": process_of(host)})
            if episode:
                for host, ip, port, proto, process in attack_calls(episode[0], rng):
                    calls.append({"host": host, "ip": ip, "port": port, "proto": proto, "process": process})
                    labels.append({"workflow": wf, "run": run_id, "host": host, "ip": ip, "port": port,
                                   "attack": episode[0], "episode_run": seq - episode[1]})
            phases.append({"workflow": wf, "run": run_id, "phase": "test" if seq >= test_from else "train"})
            events.append((t, {"workflow": wf, "repository": j["repo"], "run": run_id, "seq": seq,
                               "time": t.strftime("%Y-%m-%dT%H:%M:%SZ"), "trigger": trigger, "ref": ref,
                               "calls": calls}))
    events.sort(key=lambda e: e[0])
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "runs.jsonl"), "w") as f:
        for _, line in events:
            f.write(json.dumps(line) + "\n")
    for name, rows in (("labels.jsonl", labels), ("phases.jsonl", phases)):
        with open(os.path.join(a.out, name), "w") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")
    print(f"held-out replay: {len(held_out)} repositories, {len(jobs)} jobs, {len(events)} runs, "
          f"{len(labels)} malicious calls in {len({l['workflow'] for l in labels})} workflows -> {a.out}")


if __name__ == "__main__":
    main()
