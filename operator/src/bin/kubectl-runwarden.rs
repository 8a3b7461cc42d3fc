//! `kubectl runwarden` (installed as `kubectl-runwarden` on PATH, kubectl finds it as a plugin):
//! turns a job's WorkflowBaseline into an EgressPolicy for Git, shows what a policy leaves out,
//! approves an endpoint, and lists runs and what each called. See `runwarden_operator::cli`.
//!
//! Uses the current kubeconfig context and its namespace unless `-n` says otherwise. Exit 0,
//! 1 (`diff`: the policy leaves something out), 2 (a usage or API error, said on stderr).

use anyhow::Context;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, ListParams, Patch, PatchParams};
use runwarden_crds::{EgressPolicy, PolicyMode, Preset, WorkflowBaseline, WorkflowRun};
use runwarden_operator::cli::{self, Promotion};

/// From what runwarden learned to an EgressPolicy in Git, and what each run called.
#[derive(clap::Parser, Debug)]
#[command(name = "kubectl-runwarden", bin_name = "kubectl runwarden", version)]
struct Flags {
    /// The namespace (default: the kubeconfig context's).
    #[arg(short, long, global = true)]
    namespace: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(clap::Subcommand, Debug)]
enum Command {
    /// Print an EgressPolicy (YAML) allowing what BASELINE learned or had approved.
    Policy {
        /// The WorkflowBaseline (`kubectl get wfb`).
        baseline: String,
        /// The policy's name (default: the baseline's).
        #[arg(long)]
        name: Option<String>,
        /// `audit` reports what it would refuse; `block` refuses it.
        #[arg(long, value_enum, default_value_t = Mode::Audit)]
        mode: Mode,
        /// Presets the policy names; endpoints they cover are left to them.
        #[arg(long, value_enum)]
        preset: Vec<PresetName>,
        /// Runner scale sets the policy selects (default: any of the job's runners).
        #[arg(long)]
        scale_set: Vec<String>,
    },
    /// List what BASELINE learned or had approved that POLICY does not allow (exit 1 if any).
    Diff {
        /// The WorkflowBaseline.
        baseline: String,
        /// The EgressPolicy.
        policy: String,
    },
    /// Approve ENDPOINT (`HOST:PORT/PROTO`, `ADDRESS:PORT/PROTO`) in BASELINE: it stops alerting.
    Approve {
        /// The WorkflowBaseline.
        baseline: String,
        /// What to approve, e.g. `api.example.com:443/TCP`.
        endpoint: String,
    },
    /// List recent runs (WorkflowRun records), newest first.
    Runs {
        /// Only this job's runs (its WorkflowBaseline).
        #[arg(long)]
        job: Option<String>,
        /// Runs of every namespace.
        #[arg(short = 'A', long)]
        all_namespaces: bool,
        /// `wide` adds the workflow and the runner; `json` and `yaml` print the records.
        #[arg(short, long, value_enum, default_value_t = Output::Table)]
        output: Output,
    },
    /// Show what run RUN_ID called: every destination, anomalies first with why.
    Run {
        /// The GitHub workflow run id (each runner of a matrix job has its record).
        run_id: String,
        /// `json` and `yaml` print the records.
        #[arg(short, long, value_enum, default_value_t = Output::Table)]
        output: Output,
    },
    /// Print a completion script for SHELL.
    Completions {
        /// bash, zsh, fish, elvish or powershell.
        shell: clap_complete::Shell,
    },
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum Output {
    Table,
    Wide,
    Json,
    Yaml,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug)]
enum Mode {
    Audit,
    Block,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug)]
enum PresetName {
    GithubActions,
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> std::process::ExitCode {
    match run(<Flags as clap::Parser>::parse()).await {
        Ok(code) => code,
        Err(e) => {
            eprintln!("kubectl runwarden: {e:#}");
            std::process::ExitCode::from(2)
        }
    }
}

/// Prints records as kubectl's `-o json|yaml` does: a `List`.
fn print_list(runs: &[WorkflowRun], output: Output) -> anyhow::Result<()> {
    let list = serde_json::json!({"apiVersion": "v1", "kind": "List", "items": runs, "metadata": {}});
    if output == Output::Json {
        println!("{}", serde_json::to_string_pretty(&list)?);
    } else {
        print!("{}", serde_yaml::to_string(&list)?);
    }
    Ok(())
}

async fn run(flags: Flags) -> anyhow::Result<std::process::ExitCode> {
    if let Command::Completions { shell } = flags.command {
        let mut command = <Flags as clap::CommandFactory>::command();
        clap_complete::generate(shell, &mut command, "kubectl-runwarden", &mut std::io::stdout());
        return Ok(std::process::ExitCode::SUCCESS);
    }
    let client = kube::Client::try_default().await.context("connecting to the cluster (kubeconfig)")?;
    let ns = flags.namespace.unwrap_or_else(|| client.default_namespace().to_string());
    let baselines: Api<WorkflowBaseline> = Api::namespaced(client.clone(), &ns);
    let get_baseline = |name: String| {
        let baselines = baselines.clone();
        let ns = ns.clone();
        async move { baselines.get(&name).await.with_context(|| format!("WorkflowBaseline {name} in namespace {ns}")) }
    };
    match flags.command {
        Command::Policy { baseline, name, mode, preset, scale_set } => {
            let b = get_baseline(baseline.clone()).await?;
            let promotion = Promotion {
                name: name.unwrap_or(baseline),
                mode: match mode {
                    Mode::Audit => PolicyMode::Audit,
                    Mode::Block => PolicyMode::Block,
                },
                presets: preset
                    .iter()
                    .map(|p| match p {
                        PresetName::GithubActions => Preset::GithubActions,
                    })
                    .collect(),
                scale_sets: scale_set,
            };
            let policy = cli::policy_from_baseline(&b, &promotion);
            print!("{}", serde_yaml::to_string(&policy)?);
            Ok(std::process::ExitCode::SUCCESS)
        }
        Command::Diff { baseline, policy } => {
            let b = get_baseline(baseline).await?;
            let p = Api::<EgressPolicy>::namespaced(client, &ns)
                .get(&policy)
                .await
                .with_context(|| format!("EgressPolicy {policy} in namespace {ns}"))?;
            let missing = cli::not_allowed(&b, &p);
            for line in &missing {
                println!("{line}");
            }
            Ok(if missing.is_empty() { std::process::ExitCode::SUCCESS } else { std::process::ExitCode::from(1) })
        }
        Command::Approve { baseline, endpoint } => {
            let rule = cli::approval(&endpoint).map_err(anyhow::Error::msg)?;
            get_baseline(baseline.clone()).await?;
            // `spec.approved` defaults to a list, so appending always works (the Events' command).
            let patch = serde_json::json!([{"op": "add", "path": "/spec/approved/-", "value": rule}]);
            let patch: json_patch::Patch = serde_json::from_value(patch)?;
            baselines
                .patch(&baseline, &PatchParams::default(), &Patch::<()>::Json(patch))
                .await
                .with_context(|| format!("approving {endpoint} in WorkflowBaseline {baseline}"))?;
            println!("workflowbaseline.runwarden.dev/{baseline} approved {endpoint}");
            Ok(std::process::ExitCode::SUCCESS)
        }
        Command::Runs { job, all_namespaces, output } => {
            let api: Api<WorkflowRun> = if all_namespaces { Api::all(client) } else { Api::namespaced(client, &ns) };
            let mut params = ListParams::default().limit(100);
            if let Some(job) = &job {
                params = params.labels(&format!("{}={job}", runwarden_crds::run::BASELINE_LABEL));
            }
            // Page by page, keeping each run's summary only (a record lists up to 1,000
            // destinations).
            let mut runs = Vec::new();
            loop {
                let page = api.list(&params).await.context("listing WorkflowRuns")?;
                for mut run in page.items {
                    if !matches!(output, Output::Json | Output::Yaml) {
                        run.spec.endpoints.clear();
                    }
                    runs.push(run);
                }
                match page.metadata.continue_ {
                    Some(token) if !token.is_empty() => params = params.continue_token(&token),
                    _ => break,
                }
            }
            match output {
                Output::Json | Output::Yaml => print_list(&runs, output)?,
                _ if runs.is_empty() => {
                    eprintln!(
                        "No runs found{}.",
                        if all_namespaces { String::new() } else { format!(" in {ns} namespace") }
                    )
                }
                _ => print!("{}", cli::runs_table(&runs, Timestamp::now(), output == Output::Wide, all_namespaces)),
            }
            Ok(std::process::ExitCode::SUCCESS)
        }
        Command::Run { run_id, output } => {
            let api: Api<WorkflowRun> = Api::namespaced(client, &ns);
            let selector = format!("{}={run_id}", runwarden_crds::run::RUN_ID_LABEL);
            let mut runs = api
                .list(&ListParams::default().labels(&selector))
                .await
                .with_context(|| format!("listing the WorkflowRuns of run {run_id}"))?
                .items;
            if runs.is_empty() {
                anyhow::bail!("no WorkflowRun of run {run_id} in namespace {ns} (`kubectl runwarden runs` lists them)");
            }
            runs.sort_by(|a, b| a.spec.runner.cmp(&b.spec.runner));
            match output {
                Output::Json | Output::Yaml => print_list(&runs, output)?,
                _ => {
                    let now = Timestamp::now();
                    let shown: Vec<String> = runs.iter().map(|r| cli::run_details(r, now)).collect();
                    print!("{}", shown.join("\n"));
                }
            }
            Ok(std::process::ExitCode::SUCCESS)
        }
        Command::Completions { .. } => unreachable!("handled above"),
    }
}
