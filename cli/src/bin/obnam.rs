//! `obnam`: the command-line client. It talks to the running `obnam-node` over its socket.

use clap::Parser;
use obnam_cli::args::Cli;
use obnam_cli::commands;
use std::process::ExitCode;

fn main() -> ExitCode {
    quiet_on_closed_stdout();
    let cli = Cli::parse();
    obnam_cli::init_logging(&cli.global, "warn");
    let json = cli.global.json;
    match commands::run(cli) {
        Ok(code) => ExitCode::from(code),
        Err(f) => ExitCode::from(commands::report_failure(json, &f)),
    }
}

/// `obnam snapshots | head`: when whoever reads stdout goes away, printing panics with
/// "failed printing to stdout: Broken pipe". Exit quietly instead, with 141 (128 + SIGPIPE), as
/// a Unix tool killed by SIGPIPE would. SIGPIPE itself stays ignored, so that a node that goes
/// away mid-request is still reported as an error, not a silent exit.
fn quiet_on_closed_stdout() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let message = info
            .payload()
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| info.payload().downcast_ref::<&str>().copied())
            .unwrap_or("");
        if message.starts_with("failed printing to stdout") && message.contains("Broken pipe") {
            std::process::exit(141);
        }
        default(info);
    }));
}
