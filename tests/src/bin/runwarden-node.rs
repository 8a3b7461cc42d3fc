//! Starts the single-node test cluster by hand (`make demo` uses it): the
//! control plane, kube-controller-manager, kube-scheduler, containerd, a kubelet and kube-proxy
//! on this machine (see `runwarden_tests::node`), the runwarden CRDs installed, a kubeconfig
//! written. Runs until SIGTERM or Ctrl-C, then removes everything it put on the host.
//!
//! `runwarden-node [--no-crds] [--dir DIR] [--kubeconfig PATH] [--ready-file PATH] [--serve HOST:PORT]...`
//! (defaults: `~/.cache/runwarden/node`, `DIR/kubeconfig`; the ready file is written once the
//! node is Ready, for scripts that start it in the background). Each `--serve` gives HOST an
//! address of its own on the node's bridge, an A record in the DNS server every pod uses, and an
//! HTTP listener on PORT: what `make demo`'s runners call.

use std::path::PathBuf;

use anyhow::Context;
use runwarden_tests::services::{Dns, Listener};
use runwarden_tests::{Node, cluster, node};

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let cache = PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cache/runwarden");
    let mut dir = std::env::var_os("RUNWARDEN_CACHE").map_or(cache, PathBuf::from).join("node");
    let mut kubeconfig = None;
    let mut ready_file = None;
    let mut serve = Vec::new();
    let mut install_crds = true;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--no-crds" => install_crds = false,
            "--dir" => dir = args.next().context("--dir needs a path")?.into(),
            "--kubeconfig" => kubeconfig = Some(PathBuf::from(args.next().context("--kubeconfig needs a path")?)),
            "--ready-file" => ready_file = Some(PathBuf::from(args.next().context("--ready-file needs a path")?)),
            "--serve" => {
                let spec = args.next().context("--serve needs HOST:PORT")?;
                let (host, port) = spec.rsplit_once(':').context("--serve needs HOST:PORT")?;
                let port: u16 = port.parse().with_context(|| format!("--serve {spec}: not a port"))?;
                serve.push((host.to_string(), port));
            }
            "-h" | "--help" => {
                println!(
                    "usage: runwarden-node [--dir DIR] [--kubeconfig PATH] [--ready-file PATH] [--serve HOST:PORT]..."
                );
                return Ok(());
            }
            other => anyhow::bail!("unknown argument {other:?}; see --help"),
        }
    }
    let kubeconfig = kubeconfig.unwrap_or_else(|| dir.join("kubeconfig"));

    let start_dir = dir.clone();
    let node = tokio::task::spawn_blocking(move || Node::start(Some(start_dir))).await??;
    let client = node.client().await;
    if install_crds {
        cluster::ensure_crds(&client).await;
    }
    let dns = Dns::start((node::NODE_IP, 53).into()).context("serving DNS on the node's address")?;
    let mut listeners = Vec::new();
    let addresses = node::TEST_ADDRESSES.collect::<Vec<_>>();
    anyhow::ensure!(serve.len() <= addresses.len(), "at most {} --serve hosts", addresses.len());
    for ((host, port), n) in serve.iter().zip(addresses) {
        let ip = node.add_address(n)?;
        dns.insert(host, ip);
        listeners.push(Listener::start((ip, *port).into()).with_context(|| format!("listening on {ip}:{port}"))?);
        println!("serving {host} at {ip}:{port} (DNS at {}:53)", node::NODE_IP);
    }
    std::fs::copy(&node.control_plane.kubeconfig, &kubeconfig)
        .with_context(|| format!("writing {}", kubeconfig.display()))?;
    println!(
        "node {} Ready (Kubernetes {}) in {:.1}s{}",
        runwarden_tests::node::NODE_NAME,
        node.control_plane.binaries.kubernetes,
        node.start_time.as_secs_f64(),
        if install_crds { format!("; CRDs from {} installed", cluster::crd_dir().display()) } else { String::new() }
    );
    println!("\n  export KUBECONFIG={}", kubeconfig.display());
    println!(
        "  export PATH={}:$PATH   # kubectl {}\n",
        node.control_plane.binaries.dir.display(),
        node.control_plane.binaries.kubernetes
    );
    if let Some(f) = &ready_file {
        std::fs::write(f, format!("{}\n", std::process::id())).with_context(|| format!("writing {}", f.display()))?;
    }

    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
    eprintln!("stopping the node");
    if let Some(f) = &ready_file {
        let _ = std::fs::remove_file(f);
    }
    // Exit through libc's exit so the harness's atexit hooks stop the node and the control plane.
    std::process::exit(0);
}
