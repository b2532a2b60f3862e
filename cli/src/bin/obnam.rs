//! `obnam`: the command-line client. It talks to the running `obnam-node` over its socket.

use clap::Parser;
use obnam_cli::args::Cli;
use obnam_cli::commands;
use std::process::ExitCode;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let json = cli.global.json;
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            obnam_cli::output::print_error(json, "io", &format!("cannot start: {e}"));
            return ExitCode::from(obnam_cli::exit::ERROR);
        }
    };
    match runtime.block_on(commands::run(cli)) {
        Ok(code) => ExitCode::from(code),
        Err(f) => ExitCode::from(commands::report_failure(json, &f)),
    }
}
