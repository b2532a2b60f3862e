//! A misbehaving friend, for tests: `rogue peer-id SEED` prints its peer id;
//! `rogue attack SEED MULTIADDR/p2p/PEER` sends malformed and unauthorised messages and prints
//! the answers as JSON (`[{"case": …, "answer": …}]`).

use anyhow::{Context, Result, bail};

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let seed = |s: Option<&String>| -> Result<u8> {
        s.context("missing SEED")?
            .parse()
            .context("SEED is a number 0-255")
    };
    match args.first().map(String::as_str) {
        Some("peer-id") => println!(
            "{}",
            obnam_node::testing::rogue_peer_id(seed(args.get(1))?)?
        ),
        Some("attack") => {
            let target = args.get(2).context("missing MULTIADDR")?;
            let answers = obnam_node::testing::rogue_attack(seed(args.get(1))?, target)?;
            let v: Vec<_> = answers
                .into_iter()
                .map(|(case, answer)| serde_json::json!({"case": case, "answer": answer}))
                .collect();
            println!("{}", serde_json::Value::Array(v));
        }
        _ => bail!("usage: rogue peer-id SEED | rogue attack SEED MULTIADDR"),
    }
    Ok(())
}
