//! `obnam-node`: the daemon. `obnam-node start` runs it in the foreground.

use clap::Parser;
use obnam_cli::args::{NodeCli, NodeCommand};
use obnam_node::daemon::{self, StartOptions};
use std::process::ExitCode;

fn main() -> ExitCode {
    let cli = NodeCli::parse();
    obnam_cli::init_logging(&cli.global, "info");
    let json = cli.global.json;
    let NodeCommand::Start { listen } = cli.command;
    let opts = StartOptions {
        data_dir: cli.global.data_dir.clone(),
        listen,
        on_ready: Some(Box::new(move |r: &daemon::Ready| {
            if json {
                let v = serde_json::json!({"peer_id": r.peer_id, "addrs": r.addrs, "socket": r.socket, "data_dir": r.data_dir});
                println!("{v}");
            } else {
                println!(
                    "obnam-node ready: peer id {}, control socket {}",
                    r.peer_id,
                    r.socket.display()
                );
            }
        })),
    };
    match daemon::run_blocking(opts) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            if json {
                println!(
                    "{}",
                    serde_json::json!({"error": {"kind": e.kind(), "message": e.full_message()}})
                );
            } else {
                eprintln!("obnam-node: error: {}", e.full_message());
            }
            ExitCode::FAILURE
        }
    }
}
