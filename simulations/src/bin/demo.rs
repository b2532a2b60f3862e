//! A local demo of the exchange: three real `obnam-node` processes on 127.0.0.1 become friends;
//! alice backs up a directory (by default this repository's source, without `target/` and
//! `.git/`) to bob and carol, bob goes offline, and alice restores from carol and checks that
//! the result is identical.
//!
//! `cargo run --release -p obnam-simulations --bin demo [-- DIR]`

use anyhow::{Context, Result, bail};
use obnam_simulations::{Bins, Node, befriend_all, compare_trees};
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
    println!(
        "obnam demo: three nodes on 127.0.0.1, working in {}",
        work.path().display()
    );

    step(1, "start three nodes: alice, bob and carol");
    let config = "replicas = 2\nreplication_interval_secs = 2\n";
    let mut nodes = Vec::new();
    for name in ["alice", "bob", "carol"] {
        let mut n = Node::new(&bins, name, &work.path().join(name), config)?;
        n.start()?;
        println!(
            "    {name:<6} peer id {}  listening on {}",
            n.peer_id,
            n.addrs.join(" ")
        );
        nodes.push(n);
    }
    let (alice, rest) = nodes.split_first_mut().context("three nodes")?;
    let (bob, carol) = rest.split_first_mut().context("three nodes")?;
    let carol = &carol[0];

    step(
        2,
        "they become friends: each runs `obnam peer add <ticket>` for the other two",
    );
    befriend_all(&[alice, bob, carol])?;
    println!("    alice's ticket: {}", alice.ticket()?);

    step(
        3,
        "alice runs `obnam init` (Argon2id, 256 MiB: about a second)",
    );
    let init = alice.init("alice")?;
    println!("    owner key {}", init["owner"].as_str().unwrap_or("?"));

    step(
        4,
        &format!(
            "alice backs up {} (without target/ and .git/), to 2 friends",
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
        "    snapshot {}: {} files, {} bytes; {} stored, {} sent to friends, held by {} friends ({:.2} s)",
        &b1["snapshot"].as_str().unwrap_or("?")[..8],
        b1["files"],
        b1["bytes"],
        b1["stored_bytes"],
        b1["sent_bytes"],
        b1["replicas"],
        t.elapsed().as_secs_f64()
    );

    step(
        5,
        "alice backs up again, unchanged: nothing new is stored or sent",
    );
    let b2 = alice.json(
        &["backup", src, "--exclude", "target", "--exclude", ".git"],
        0,
    )?;
    println!(
        "    {} new bytes, {} stored, {} sent; {} friends hold it",
        b2["new_bytes"], b2["stored_bytes"], b2["sent_bytes"], b2["replicas"]
    );
    if b2["stored_bytes"] != 0 || b2["sent_bytes"] != 0 {
        bail!("an unchanged backup stored or sent data: {b2}");
    }

    step(6, "what the friends see");
    for n in [&*bob, carol] {
        let s = n.status()?;
        println!(
            "    {:<6} hosts {} sealed bytes for {} owner(s); no file names, no plaintext",
            n.name, s["hosted_bytes"], s["hosted_owners"]
        );
    }
    let st = alice.status()?;
    println!(
        "    alice: {} of {} replicas hold everything; {} packs left in her outbox",
        st["replicated_to"], st["replicas"], st["outbox_packs"]
    );

    step(7, "bob goes offline");
    bob.stop();

    step(8, "alice restores the latest snapshot from carol");
    let target = work.path().join("restore");
    let t = Instant::now();
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
        "    restored {} files, {} directories, {} bytes ({:.2} s)",
        r["files"],
        r["dirs"],
        r["bytes"],
        t.elapsed().as_secs_f64()
    );

    step(9, "compare the restored tree with the source");
    let restored = target.join(source.strip_prefix("/").unwrap_or(&source));
    let n = compare_trees(&source, &restored, &["target", ".git"])?;
    println!("    {n} entries identical: contents, modes, symlinks and mtimes");

    step(10, "stop the nodes");
    alice.stop();
    println!("\ndemo OK");
    Ok(())
}
