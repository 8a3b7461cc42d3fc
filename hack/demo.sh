#!/usr/bin/env bash
# `make demo`: runwarden on a real single-node cluster on this machine, installed as a user would,
# then a short story with simulated ARC runners: five runs of a job calling the same hosts, then
# a run that calls somewhere new. Leaves the cluster up; `make demo-down` removes it.
#
# Needs root (a kubelet, containerd, eBPF). `make demo` runs `make setup images` first.
set -euo pipefail
cd "$(dirname "$0")/.."
cache="${RUNWARDEN_CACHE:-$HOME/.cache/runwarden}"
target="${CARGO_TARGET_DIR:-$cache/target}"
dir="$cache/demo"
ready="$dir.ready"
bin="$(ls -d "$cache"/k8s-*/bin | head -1)"
helm_dir="$(ls -d "$cache"/tools/helm-* | head -1)"
export KUBECONFIG="$dir/kubeconfig" PATH="$bin:$helm_dir:$PATH"

say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

if [[ "${1:-}" == down ]]; then
  if [[ -f "$ready" ]] && kill -0 "$(cat "$ready")" 2>/dev/null; then
    pid=$(cat "$ready")
    echo "stopping the demo node (process $pid) and removing what it put on this machine"
    kill "$pid"
    while kill -0 "$pid" 2>/dev/null; do sleep 0.5; done
  else
    echo "no demo node is running"
  fi
  rm -rf "$dir" "$ready" "$dir.log"
  exit 0
fi

[[ $EUID -eq 0 ]] || { echo "make demo needs root (it runs a kubelet, containerd and the eBPF agent)" >&2; exit 1; }
if [[ -f "$ready" ]] && kill -0 "$(cat "$ready")" 2>/dev/null; then
  echo "the demo node is already running; \`make demo-down\` first" >&2
  exit 1
fi

say "starting a single-node cluster: etcd, kube-apiserver, controller-manager, scheduler, containerd, kubelet, kube-proxy"
cargo build --locked -q -p runwarden-tests --bin runwarden-node
rm -rf "$dir" "$ready"
mkdir -p "$dir"
setsid nohup "$target/debug/runwarden-node" --no-crds --dir "$dir" --ready-file "$ready" \
  --serve api.github.test:443 --serve cdn.packages.test:443 --serve new.exfil.test:8080 \
  > "$dir.log" 2>&1 < /dev/null &
node_pid=$!
until [[ -f "$ready" ]]; do
  kill -0 "$node_pid" 2>/dev/null || { echo "the node did not start:" >&2; tail -20 "$dir.log" >&2; exit 1; }
  sleep 0.5
done
grep -E "^(node|serving)" "$dir.log" | sed 's/^/  /'

say "installing runwarden as a user would: the images, ARC's CRDs, then helm install"
for image in runwarden-agent runwarden-operator; do
  ctr --address "$dir/containerd/containerd.sock" --namespace k8s.io images import "$cache/images/$image.tar" | sed 's/^/  /'
done
kubectl apply --server-side -f "$cache"/arc-*/crds/ | sed 's/^/  /'
# The local images; the agent keeps its state inside the demo's directory, so that `make
# demo-down` removes it. The run pages are on, and Events link to them where port-forward puts
# them.
helm install runwarden charts/runwarden --namespace runwarden-system --create-namespace \
  -f charts/runwarden/ci/local-values.yaml --set agent.stateDir="$dir/agent-state" \
  --set operator.ui.enabled=true --set operator.ui.url=http://localhost:8090 | sed 's/^/  /'
kubectl -n runwarden-system rollout status deployment/runwarden-operator --timeout=120s | sed 's/^/  /'
until kubectl -n runwarden-system get daemonset/runwarden-agent >/dev/null 2>&1; do sleep 0.5; done
kubectl -n runwarden-system rollout status daemonset/runwarden-agent --timeout=120s | sed 's/^/  /'
kubectl -n runwarden-system get pods -o wide | sed 's/^/  /'
kubectl create namespace arc-runners >/dev/null

# One workflow run as ARC runs it: an EphemeralRunner given the job (its status filled in as ARC's
# listener would), its pod calling the hosts, then both deleted when the job is done.
run() { # run_id hosts...
  local id=$1 name="arc-runner-set-$1"; shift
  local script=""
  for url in "$@"; do script+="wget -q -O /dev/null $url && "; done
  kubectl -n arc-runners apply -f - >/dev/null <<EOF
apiVersion: actions.github.com/v1alpha1
kind: EphemeralRunner
metadata: {name: $name, labels: {actions.github.com/scale-set-name: arc-runner-set}}
spec: {githubConfigUrl: "https://github.com/acme", githubConfigSecret: github-app, runnerScaleSetId: 1,
       spec: {containers: [{name: runner, image: runner}]}}
EOF
  kubectl -n arc-runners patch ephemeralrunner "$name" --subresource=status --type=merge -p "{\"status\": {
    \"phase\": \"Running\", \"runnerName\": \"$name\", \"jobRequestId\": $((id * 10)), \"jobRepositoryName\": \"acme/web\",
    \"jobWorkflowRef\": \"acme/web/.github/workflows/ci.yml@refs/heads/main\", \"workflowRunId\": $id, \"jobDisplayName\": \"build\"}}" >/dev/null
  local uid
  uid=$(kubectl -n arc-runners get ephemeralrunner "$name" -o jsonpath='{.metadata.uid}')
  kubectl -n arc-runners apply -f - >/dev/null <<EOF
apiVersion: v1
kind: Pod
metadata:
  name: $name
  labels: {actions.github.com/scale-set-name: arc-runner-set, actions-ephemeral-runner: "True"}
  ownerReferences: [{apiVersion: actions.github.com/v1alpha1, kind: EphemeralRunner, name: $name, uid: "$uid", controller: true}]
spec:
  restartPolicy: Never
  automountServiceAccountToken: false
  terminationGracePeriodSeconds: 1
  containers:
  - {name: runner, image: "localhost/runwarden/test-busybox:1", imagePullPolicy: Never, command: ["sh", "-c", "${script}true"]}
EOF
  kubectl -n arc-runners wait "pod/$name" --for=jsonpath='{.status.phase}'=Succeeded --timeout=60s >/dev/null
  kubectl -n arc-runners delete pod "$name" --wait=true >/dev/null
  kubectl -n arc-runners delete ephemeralrunner "$name" >/dev/null
  for _ in $(seq 1 120); do
    kubectl -n arc-runners get wfb -o jsonpath='{.items[*].status.recentRuns[*].runId}' 2>/dev/null | tr ' ' '\n' | grep -qx "$id" && return 0
    sleep 0.5
  done
  echo "run $id did not reach the baseline; agent log:" >&2
  kubectl -n runwarden-system logs -l app.kubernetes.io/component=agent --tail=20 >&2
  return 1
}

say "five runs of acme/web ci.yml job build, each calling api.github.test and cdn.packages.test"
for id in 101 102 103 104 105; do
  run "$id" http://api.github.test:443/ http://cdn.packages.test:443/
  echo "  run $id: done, merged into the job's baseline"
done
kubectl -n arc-runners get wfb | sed 's/^/  /'
echo "  AnomalousEgress events so far: $(kubectl -n arc-runners get events --field-selector reason=AnomalousEgress -o name | wc -l)"

say "run 106 also calls new.exfil.test:8080, which this job never called"
run 106 http://api.github.test:443/ http://cdn.packages.test:443/ http://new.exfil.test:8080/
echo "  run 106: done"

say "kubectl get wfb -n arc-runners"
kubectl -n arc-runners get wfb
say "kubectl get events -n arc-runners --field-selector reason=AnomalousEgress"
kubectl -n arc-runners get events --field-selector reason=AnomalousEgress \
  -o custom-columns='OBJECT:.involvedObject.kind,NAME:.involvedObject.name,MESSAGE:.message'
say "the baseline's endpoints (kubectl get wfb -o yaml, status.endpoints)"
kubectl -n arc-runners get wfb -o jsonpath='{range .items[0].status.endpoints[*]}  {.host}{.cidr}:{.port}/{.protocol}{"\t"}{.state}{"\t"}seen in {.runsSeen} runs{"\n"}{end}'

say "kubectl get wfr -n arc-runners (each run's record; kubectl get wfr NAME -o yaml lists every destination)"
kubectl -n arc-runners get wfr

say "the cluster stays up"
echo "  run pages: kubectl -n runwarden-system port-forward deploy/runwarden-operator 8090, then http://localhost:8090"
echo "  (the AnomalousEgress Events above link to each run's page there)"
echo "  export KUBECONFIG=$KUBECONFIG"
echo "  export PATH=$bin:$helm_dir:\$PATH"
echo "  make demo-down   # stops it and removes everything it put on this machine"
