//! Starts the single-node test cluster by hand (`make demo` and `make dev-node` use it): the
//! control plane, kube-controller-manager, kube-scheduler, containerd, a kubelet and kube-proxy
//! on this machine (see `runwarden_tests::node`), the runwarden CRDs installed, a kubeconfig
//! written. Runs until SIGTERM or Ctrl-C, then removes everything it put on the host.
//!
//! `runwarden-node [--dir DIR] [--kubeconfig PATH] [--ready-file PATH]`
//! (defaults: `~/.cache/runwarden/node`, `DIR/kubeconfig`; the ready file is written once the
//! node is Ready, for scripts that start it in the background).

use std::path::PathBuf;

use anyhow::Context;
use runwarden_tests::{Node, cluster};

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let cache = PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cache/runwarden");
    let mut dir = std::env::var_os("RUNWARDEN_CACHE").map_or(cache, PathBuf::from).join("node");
    let mut kubeconfig = None;
    let mut ready_file = None;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--dir" => dir = args.next().context("--dir needs a path")?.into(),
            "--kubeconfig" => kubeconfig = Some(PathBuf::from(args.next().context("--kubeconfig needs a path")?)),
            "--ready-file" => ready_file = Some(PathBuf::from(args.next().context("--ready-file needs a path")?)),
            "-h" | "--help" => {
                println!("usage: runwarden-node [--dir DIR] [--kubeconfig PATH] [--ready-file PATH]");
                return Ok(());
            }
            other => anyhow::bail!("unknown argument {other:?}; see --help"),
        }
    }
    let kubeconfig = kubeconfig.unwrap_or_else(|| dir.join("kubeconfig"));

    let start_dir = dir.clone();
    let node = tokio::task::spawn_blocking(move || Node::start(Some(start_dir))).await??;
    let client = node.client().await;
    cluster::ensure_crds(&client).await;
    std::fs::copy(&node.control_plane.kubeconfig, &kubeconfig)
        .with_context(|| format!("writing {}", kubeconfig.display()))?;
    println!(
        "node {} Ready (Kubernetes {}) in {:.1}s; CRDs from {} installed",
        runwarden_tests::node::NODE_NAME,
        node.control_plane.binaries.kubernetes,
        node.start_time.as_secs_f64(),
        cluster::crd_dir().display()
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
