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

/// The runwarden operator: policies, baselines, runner attribution and the node agent's DaemonSet.
#[derive(clap::Parser, Debug)]
#[command(name = "runwarden-operator", version)]
struct Flags {
    /// Print the ServiceAccount and roles it needs in NAMESPACE, as YAML, and exit.
    #[arg(long, value_name = "NAMESPACE")]
    print_rbac: Option<String>,
    /// Print the Helm chart's template of its RBAC and exit.
    #[arg(long, hide = true)]
    print_rbac_chart: bool,
    /// Print a completion script for SHELL and exit.
    #[arg(long, value_name = "SHELL")]
    completions: Option<clap_complete::Shell>,
    /// Configuration file (YAML): `manageAgent` and the agent's DaemonSet settings.
    #[arg(long, value_name = "FILE")]
    config: Option<String>,
    /// Address of `/metrics`, `/healthz` and `/readyz`.
    #[arg(long, value_name = "ADDR", default_value = "0.0.0.0:8080")]
    metrics_addr: String,
    /// Run the controllers without a leader Lease (one replica only).
    #[arg(long)]
    no_leader_elect: bool,
    /// Log JSON lines instead of text.
    #[arg(long)]
    json_logs: bool,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let flags = <Flags as clap::Parser>::parse();
    if let Some(shell) = flags.completions {
        let mut command = <Flags as clap::CommandFactory>::command();
        clap_complete::generate(shell, &mut command, "runwarden-operator", &mut std::io::stdout());
        return Ok(());
    }
    if let Some(ns) = &flags.print_rbac {
        print!("{}", runwarden_operator::rbac::yaml(ns));
        return Ok(());
    }
    if flags.print_rbac_chart {
        print!("{}", runwarden_operator::rbac::RBAC.chart_yaml());
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
    config.agent.runner_namespaces = config.runner_namespaces.clone();
    if let Some(url) = &config.ui_url {
        config.ui_url = Some(runwarden_crds::run::pages_base(url).map_err(|e| anyhow::anyhow!("uiUrl: {e}"))?);
    }
    config.agent.ui_url = config.ui_url.clone();
    let identity = std::env::var("POD_NAME")
        .or_else(|_| std::fs::read_to_string("/proc/sys/kernel/hostname").map(|h| h.trim().to_string()))
        .unwrap_or_else(|_| format!("runwarden-operator-{}", std::process::id()));

    let metrics = Arc::new(Metrics::default());
    let listener = tokio::net::TcpListener::bind(&flags.metrics_addr)
        .await
        .with_context(|| format!("listening on {}", flags.metrics_addr))?;
    tokio::spawn(metrics::serve(listener, metrics.clone()));

    let client = kube::Client::try_default().await.context("connecting to the Kubernetes API")?;
    if let Err(e) = runwarden_operator::preflight::check(&client, &namespace, &config.runner_namespaces).await {
        error!("{e}");
        std::process::exit(e.exit_code());
    }
    // Every replica serves the run pages, leader or not (port-forward picks any pod).
    if let Some(address) = config.ui_address {
        use runwarden_operator::ui::{self, Access, Reviews};
        ui::check_address(&address, config.ui_token_auth).map_err(anyhow::Error::msg)?;
        if config.ui_token_auth {
            let missing = runwarden_operator::rbac::RBAC.missing_optional(&client).await?;
            if !missing.is_empty() {
                error!(missing = ?missing, "uiTokenAuth needs these permissions (the chart grants them with operator.ui.tokenAuth)");
                std::process::exit(3);
            }
        }
        let listener = tokio::net::TcpListener::bind(address)
            .await
            .with_context(|| format!("listening on {address} (uiAddress)"))?;
        let access = if config.ui_token_auth {
            info!(%address, "serving the run pages to bearer tokens (TokenReview, SubjectAccessReview)");
            Access::Token(Arc::new(Reviews::new(client.clone())))
        } else {
            info!(%address, "serving the run pages (kubectl port-forward)");
            Access::PortForward
        };
        tokio::spawn(ui::run(client.clone(), listener, access));
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
    if flags.no_leader_elect {
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
