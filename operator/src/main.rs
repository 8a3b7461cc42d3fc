//! `runwarden-operator`: wires flags, logs and the controllers from the library.

use anyhow::Context;
use tracing_subscriber::EnvFilter;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let json = std::env::args().skip(1).any(|a| a == "--json-logs");
    let filter = EnvFilter::try_from_env("RUNWARDEN_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    let logs = tracing_subscriber::fmt().with_env_filter(filter);
    if json {
        logs.json().init()
    } else {
        logs.init()
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
    runwarden_operator::run(client, shutdown).await;
    Ok(())
}
