//! `obnam`: the command-line client. It talks to the running `obnam-node` over its socket.

use clap::Parser;
use obnam_cli::args::Cli;
use obnam_cli::commands;
use std::process::ExitCode;

fn main() -> ExitCode {
    let cli = Cli::parse();
    obnam_cli::init_logging(&cli.global, "warn");
    let json = cli.global.json;
    match commands::run(cli) {
        Ok(code) => ExitCode::from(code),
        Err(f) => ExitCode::from(commands::report_failure(json, &f)),
    }
}
