//! `runwarden-agent`: the node agent. `trace` works without Kubernetes.

use std::process::ExitCode;

use runwarden_agent::trace;

const USAGE: &str = "usage: runwarden-agent trace [--json] -- COMMAND [ARGS...]   (see `runwarden-agent trace --help`)";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("trace") => {
            let parsed = match trace::parse_args(&args[1..]) {
                Ok(parsed) => parsed,
                Err(e) if e.is_empty() => {
                    print!("{}", trace::USAGE);
                    return ExitCode::SUCCESS;
                }
                Err(e) => {
                    eprintln!("runwarden-agent trace: {e}\n\n{}", trace::USAGE);
                    return ExitCode::from(2);
                }
            };
            let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
                Ok(rt) => rt,
                Err(e) => {
                    eprintln!("runwarden-agent: starting the runtime: {e}");
                    return ExitCode::FAILURE;
                }
            };
            let mut stdout = std::io::stdout().lock();
            match runtime.block_on(trace::run(&parsed, &mut stdout)) {
                Ok(code) => ExitCode::from(code.clamp(0, 255) as u8),
                Err(e) => {
                    eprintln!("runwarden-agent trace: {e}");
                    ExitCode::from(1)
                }
            }
        }
        Some("-h" | "--help") => {
            println!("{USAGE}");
            ExitCode::SUCCESS
        }
        _ => {
            eprintln!("{USAGE}");
            ExitCode::from(2)
        }
    }
}
