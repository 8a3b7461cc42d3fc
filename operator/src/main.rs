//! `runwarden-operator`: wires flags, logs, the metrics endpoint, leader election and the
//! controllers from the library.
//!
//! `runwarden-operator [--config FILE] [--metrics-addr ADDR] [--no-leader-elect] [--json-logs]`
//! checks the CRDs and its permissions first (exit 2: CRDs missing, 3: permissions missing, 4:
//! API unreachable), then runs. `runwarden-operator --print-rbac NAMESPACE` prints its RBAC.
//! Environment: `POD_NAMESPACE` (Lease and DaemonSet namespace), `POD_NAME` (replica
//! identity), `RUNWARDEN_LOG` (log filter, default `info`).

use std::sync::Arc;

use anyhow::Context;
use runwarden_operator::metrics::{self, Metrics};
use runwarden_operator::{Config, Stopped};
use tracing::{error, info};
use tracing_subscriber::EnvFilter;

struct Flags {
    print_rbac: Option<String>,
    config: Option<String>,
    metrics_addr: String,
    leader_elect: bool,
    json_logs: bool,
}

fn flags() -> anyhow::Result<Flags> {
    let mut f = Flags {
        print_rbac: None,
        config: None,
        metrics_addr: "0.0.0.0:8080".into(),
        leader_elect: true,
        json_logs: false,
    };
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--json-logs" => f.json_logs = true,
            "--no-leader-elect" => f.leader_elect = false,
            "--print-rbac" => f.print_rbac = Some(args.next().context("--print-rbac needs the operator's namespace")?),
            "--config" => f.config = Some(args.next().context("--config needs a path")?),
            "--metrics-addr" => f.metrics_addr = args.next().context("--metrics-addr needs an address")?,
            "-h" | "--help" => {
                println!(
                    "usage: runwarden-operator [--config FILE] [--metrics-addr ADDR] [--no-leader-elect] [--json-logs]\n       \
                     runwarden-operator --print-rbac NAMESPACE   (the ServiceAccount and roles it needs, as YAML)"
                );
                std::process::exit(0);
            }
            other => anyhow::bail!("unknown argument {other:?}; see --help"),
        }
    }
    Ok(f)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let flags = flags()?;
    if let Some(ns) = &flags.print_rbac {
        print!("{}", runwarden_operator::rbac::yaml(ns));
        return Ok(());
    }
    let filter = EnvFilter::try_from_env("RUNWARDEN_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    let logs = tracing_subscriber::fmt().with_env_filter(filter);
    if flags.json_logs {
        logs.json().init()
    } else {
        logs.init()
    }

    let mut config: Config = match &flags.config {
        Some(p) => {
            let text = std::fs::read_to_string(p).with_context(|| format!("reading {p}"))?;
            serde_yaml::from_str(&text).with_context(|| format!("{p} is not a valid operator configuration"))?
        }
        None => Config::default(),
    };
    let namespace = std::env::var("POD_NAMESPACE").unwrap_or_else(|_| config.agent.namespace.clone());
    config.agent.namespace = namespace.clone();
    let identity = std::env::var("POD_NAME")
        .or_else(|_| std::fs::read_to_string("/proc/sys/kernel/hostname").map(|h| h.trim().to_string()))
        .unwrap_or_else(|_| format!("runwarden-operator-{}", std::process::id()));

    let metrics = Arc::new(Metrics::default());
    let listener = tokio::net::TcpListener::bind(&flags.metrics_addr)
        .await
        .with_context(|| format!("listening on {}", flags.metrics_addr))?;
    tokio::spawn(metrics::serve(listener, metrics.clone()));

    let client = kube::Client::try_default().await.context("connecting to the Kubernetes API")?;
    if let Err(e) = runwarden_operator::preflight::check(&client, &namespace).await {
        error!("{e}");
        std::process::exit(e.exit_code());
    }
    metrics.set_ready();

    let shutdown = futures::FutureExt::shared(Box::pin(async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("installing a SIGTERM handler");
        tokio::select! {
            _ = term.recv() => info!("SIGTERM: shutting down"),
            _ = tokio::signal::ctrl_c() => info!("interrupted: shutting down"),
        }
    }));
    if !flags.leader_elect {
        runwarden_operator::run(client, config, metrics, shutdown).await;
        return Ok(());
    }
    match runwarden_operator::run_elected(client, config, metrics, &namespace, &identity, shutdown).await {
        Ok(Stopped::Shutdown) => Ok(()),
        Ok(Stopped::LostLease) => {
            error!("leadership lost; exiting so this replica restarts as a standby");
            std::process::exit(1);
        }
        Err(e) => Err(e).context("leader election"),
    }
}
