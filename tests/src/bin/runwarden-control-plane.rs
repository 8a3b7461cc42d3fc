//! Starts the test control plane by hand (`make dev-control-plane`): etcd and kube-apiserver on
//! loopback, the runwarden CRDs installed, a kubeconfig written. Runs until Ctrl-C.
//!
//! `runwarden-control-plane [--no-crds] [--kubeconfig PATH]`
//! (default kubeconfig: `~/.cache/runwarden/dev/kubeconfig`).

use std::path::PathBuf;

use anyhow::Context;
use runwarden_tests::{ControlPlane, cluster};

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let mut install_crds = true;
    let mut kubeconfig =
        PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cache/runwarden/dev/kubeconfig");
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--no-crds" => install_crds = false,
            "--kubeconfig" => kubeconfig = args.next().context("--kubeconfig needs a path")?.into(),
            "-h" | "--help" => {
                println!("usage: runwarden-control-plane [--no-crds] [--kubeconfig PATH]");
                return Ok(());
            }
            other => anyhow::bail!("unknown argument {other:?}; see --help"),
        }
    }

    let cp = tokio::task::spawn_blocking(ControlPlane::start).await??;
    let client = cp.client().await;
    if install_crds {
        cluster::ensure_crds(&client).await;
        println!("installed the CRDs from {}", cluster::crd_dir().display());
    }
    if let Some(dir) = kubeconfig.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    std::fs::copy(&cp.kubeconfig, &kubeconfig).with_context(|| format!("writing {}", kubeconfig.display()))?;
    println!(
        "kube-apiserver {} at {} (started in {:.1}s)",
        cp.binaries.kubernetes,
        cp.server,
        cp.start_time.as_secs_f64()
    );
    println!("\n  export KUBECONFIG={}", kubeconfig.display());
    println!("  export PATH={}:$PATH   # kubectl {}\n", cp.binaries.dir.display(), cp.binaries.kubernetes);
    println!("Ctrl-C stops it and removes its data.");

    tokio::signal::ctrl_c().await.context("waiting for Ctrl-C")?;
    let _ = std::fs::remove_file(&kubeconfig);
    // Exit through libc's exit so the harness's atexit hook stops the processes and removes data.
    std::process::exit(0);
}
