//! `runwarden-agent`: the node agent. Without a subcommand it runs in the cluster (what the
//! DaemonSet runs); `trace` works without Kubernetes; `--print-rbac` writes its RBAC.

use std::process::ExitCode;

use clap::{CommandFactory, Parser, Subcommand};
use runwarden_agent::{agent, trace};

/// runwarden's node agent: every outbound call of this node's GitHub Actions runner pods,
/// scored against each job's baseline and reported as Kubernetes Events and metrics.
#[derive(Parser, Debug)]
#[command(name = "runwarden-agent", version, args_conflicts_with_subcommands = true)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    /// Print the agent's ServiceAccount and RBAC for NAMESPACE as YAML and exit.
    #[arg(long, value_name = "NAMESPACE")]
    print_rbac: Option<String>,
    /// Print the Helm chart's template of the agent's RBAC and exit.
    #[arg(long, hide = true)]
    print_rbac_chart: bool,
    /// Print a completion script for SHELL and exit.
    #[arg(long, value_name = "SHELL")]
    completions: Option<clap_complete::Shell>,
    #[command(flatten)]
    agent: agent::AgentArgs,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Every outbound call of one command, or of a cgroup tree, without Kubernetes.
    Trace(trace::Args),
}

fn runtime(threads: bool) -> Result<tokio::runtime::Runtime, std::io::Error> {
    if threads {
        tokio::runtime::Runtime::new()
    } else {
        tokio::runtime::Builder::new_current_thread().enable_all().build()
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Some(shell) = cli.completions {
        clap_complete::generate(shell, &mut Cli::command(), "runwarden-agent", &mut std::io::stdout());
        return ExitCode::SUCCESS;
    }
    if let Some(ns) = &cli.print_rbac {
        print!("{}", runwarden_agent::rbac::RBAC.yaml(ns));
        return ExitCode::SUCCESS;
    }
    if cli.print_rbac_chart {
        print!("{}", runwarden_agent::rbac::RBAC.chart_yaml());
        return ExitCode::SUCCESS;
    }
    match cli.command {
        Some(Command::Trace(args)) => {
            if args.command.is_empty() && args.cgroup.is_none() {
                Cli::command()
                    .error(
                        clap::error::ErrorKind::MissingRequiredArgument,
                        "nothing to trace: give a command after `--`, or --cgroup PATH",
                    )
                    .exit();
            }
            let rt = match runtime(false) {
                Ok(rt) => rt,
                Err(e) => {
                    eprintln!("runwarden-agent: starting the runtime: {e}");
                    return ExitCode::FAILURE;
                }
            };
            let mut stdout = std::io::stdout().lock();
            match rt.block_on(trace::run(&args, &mut stdout)) {
                Ok(code) => ExitCode::from(code.clamp(0, 255) as u8),
                Err(e) => {
                    eprintln!("runwarden-agent trace: {e}");
                    ExitCode::from(1)
                }
            }
        }
        None => {
            let args = cli.agent;
            if args.node_name.as_deref().is_none_or(str::is_empty) {
                Cli::command()
                    .error(
                        clap::error::ErrorKind::MissingRequiredArgument,
                        "--node-name (or the environment variable NODE_NAME) is required: the agent watches its own node's pods",
                    )
                    .exit();
            }
            init_logs(args.json_logs);
            let rt = match runtime(true) {
                Ok(rt) => rt,
                Err(e) => {
                    eprintln!("runwarden-agent: starting the runtime: {e}");
                    return ExitCode::FAILURE;
                }
            };
            match rt.block_on(agent::run(args)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    tracing::error!(error = %e, "runwarden-agent stopped");
                    ExitCode::from(e.exit_code())
                }
            }
        }
    }
}

fn init_logs(json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("RUNWARDEN_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    if json {
        builder.json().flatten_event(true).init();
    } else {
        builder.init();
    }
}
