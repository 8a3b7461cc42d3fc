//! `runwarden-operator`: wires flags, logs and the controllers from the library.

use anyhow::Context;
use tracing_subscriber::EnvFilter;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut json = false;
    let mut config_path: Option<String> = None;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--json-logs" => json = true,
            "--config" => config_path = Some(args.next().context("--config needs a path")?),
            "-h" | "--help" => {
                println!("usage: runwarden-operator [--config FILE] [--json-logs]   (log filter: RUNWARDEN_LOG)");
                return Ok(());
            }
            other => anyhow::bail!("unknown argument {other:?}; see --help"),
        }
    }
    let filter = EnvFilter::try_from_env("RUNWARDEN_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    let logs = tracing_subscriber::fmt().with_env_filter(filter);
    if json {
        logs.json().init()
    } else {
        logs.init()
    }

    let mut config: runwarden_operator::Config = match &config_path {
        Some(p) => {
            let text = std::fs::read_to_string(p).with_context(|| format!("reading {p}"))?;
            serde_yaml::from_str(&text).with_context(|| format!("{p} is not a valid operator configuration"))?
        }
        None => runwarden_operator::Config::default(),
    };
    if let Ok(ns) = std::env::var("POD_NAMESPACE") {
        config.agent.namespace = ns;
    }

    let client = kube::Client::try_default().await.context("connecting to the Kubernetes API")?;
    let shutdown = async {
        let mut term =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("SIGTERM handler");
        tokio::select! {
            _ = term.recv() => {},
            _ = tokio::signal::ctrl_c() => {},
        }
    };
    let shutdown = futures::FutureExt::shared(Box::pin(shutdown));
    runwarden_operator::run(client, config, shutdown).await;
    Ok(())
}
