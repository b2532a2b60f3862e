//! A local demo: one real `obnam-node` on 127.0.0.1 backs up a directory (by default this
//! repository's source, without `target/` and `.git/`), backs it up again unchanged, restores
//! it into a temporary directory and checks that the result is identical.
//!
//! `cargo run --release -p obnam-simulations --bin demo [-- DIR]`
//!
//! Friends (three nodes replicating to each other) join this demo with the friends issue.

use anyhow::{Context, Result, bail};
use obnam_simulations::{Bins, Node, compare_trees};
use std::path::PathBuf;
use std::time::Instant;

fn step(n: u32, text: &str) {
    println!("\n[{n}] {text}");
}

fn main() -> Result<()> {
    let source = match std::env::args_os().nth(1) {
        Some(p) => std::path::absolute(PathBuf::from(p))?,
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .parent()
            .context("workspace root")?
            .to_owned(),
    };
    if !source.is_dir() {
        bail!("{} is not a directory", source.display());
    }
    let bins = Bins::beside_current_exe()?;
    let work = tempfile::Builder::new().prefix("obnam-demo-").tempdir()?;
    println!("obnam demo: working in {}", work.path().display());

    step(1, "start obnam-node (alice) on 127.0.0.1");
    let mut alice = Node::new(&bins, "alice", &work.path().join("alice"), "")?;
    alice.start()?;
    println!("    peer id {}", alice.peer_id);

    step(
        2,
        "obnam init --name alice (Argon2id, 256 MiB: about a second)",
    );
    let init = alice.init("alice")?;
    println!("    owner key {}", init["owner"].as_str().unwrap_or("?"));

    step(
        3,
        &format!(
            "obnam backup {} --exclude target --exclude .git",
            source.display()
        ),
    );
    let src = source.to_str().context("source path is not UTF-8")?;
    let t = Instant::now();
    let b1 = alice.json(
        &["backup", src, "--exclude", "target", "--exclude", ".git"],
        0,
    )?;
    println!(
        "    snapshot {}: {} files, {} bytes, {} new, {} stored in the outbox ({:.2} s)",
        &b1["snapshot"].as_str().unwrap_or("?")[..8],
        b1["files"],
        b1["bytes"],
        b1["new_bytes"],
        b1["stored_bytes"],
        t.elapsed().as_secs_f64()
    );

    step(4, "back up again, unchanged: nothing new is stored");
    let b2 = alice.json(
        &["backup", src, "--exclude", "target", "--exclude", ".git"],
        0,
    )?;
    println!(
        "    snapshot {}: {} new bytes, {} stored bytes",
        &b2["snapshot"].as_str().unwrap_or("?")[..8],
        b2["new_bytes"],
        b2["stored_bytes"]
    );
    if b2["new_bytes"] != 0 || b2["stored_bytes"] != 0 {
        bail!("an unchanged backup stored new data: {b2}");
    }

    step(5, "obnam snapshots");
    let snaps = alice.obnam(&["snapshots"])?;
    print!(
        "{}",
        snaps
            .stdout
            .lines()
            .map(|l| format!("    {l}\n"))
            .collect::<String>()
    );

    step(6, "obnam restore latest --target <tmp>/restore");
    let target = work.path().join("restore");
    let r = alice.json(
        &[
            "restore",
            "latest",
            "--target",
            target.to_str().context("UTF-8")?,
        ],
        0,
    )?;
    println!(
        "    restored {} files, {} directories, {} bytes",
        r["files"], r["dirs"], r["bytes"]
    );

    step(7, "compare the restored tree with the source");
    let restored = target.join(source.strip_prefix("/").unwrap_or(&source));
    let n = compare_trees(&source, &restored, &["target", ".git"])?;
    println!("    {n} entries identical: contents, modes, symlinks and mtimes");

    step(8, "stop the node");
    alice.stop();
    println!("\ndemo OK");
    Ok(())
}
