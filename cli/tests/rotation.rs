//! `obnam keys rotate`: a new master secret, everything re-encrypted, the old key forgotten.

use crate::util::{TestResult, bins, noise, restored};
use obnam_simulations::{Node, befriend_all, compare_trees, wait_until};
use std::path::Path;
use std::time::Duration;

const FAST: &str = "replication_interval_secs = 1\nrequest_timeout_secs = 20\n";

fn node(dir: &Path, name: &str, extra: &str) -> anyhow::Result<Node> {
    let mut n = Node::new(&bins(), name, &dir.join(name), &format!("{FAST}{extra}"))?;
    n.start()?;
    Ok(n)
}

/// The owner ids a node hosts data for (the directories under `hosted/`).
fn hosted(n: &Node) -> anyhow::Result<Vec<String>> {
    let dir = n.data_dir.join("hosted");
    let mut out = Vec::new();
    if dir.exists() {
        for e in std::fs::read_dir(dir)? {
            out.push(e?.file_name().to_string_lossy().into_owned());
        }
    }
    out.sort();
    Ok(out)
}

#[test]
fn keys_rotate_re_encrypts_everything_and_friends_forget_the_old_key() -> TestResult {
    let dir = crate::util::tempdir("obnam-rotate-")?;
    let a = node(
        dir.path(),
        "a",
        "replicas = 2\npresence_interval_secs = 1\n",
    )?;
    let b = node(dir.path(), "b", "")?;
    let c = node(dir.path(), "c", "")?;
    befriend_all(&[&a, &b, &c])?;
    a.init("alice")?;
    let src = dir.path().join("src");
    std::fs::create_dir_all(src.join("docs"))?;
    std::fs::write(src.join("docs/big.bin"), noise(12 << 20, 1))?;
    std::fs::write(src.join("docs/notes.txt"), b"first version")?;
    a.backup(&[&src], &[], 0)?;
    std::fs::write(src.join("docs/notes.txt"), b"second version, longer")?;
    let second = a.backup(&[&src], &[], 0)?;
    assert_eq!(second["replicas"], 2, "{second}");
    let old_owner = hosted(&b)?;
    assert_eq!(old_owner.len(), 1, "B hosts alice: {old_owner:?}");
    let old_owner = old_owner[0].clone();

    // A wrong passphrase changes nothing.
    let wrong = a
        .command(&["keys", "rotate", "--json"])
        .env("OBNAM_PASSPHRASE", "not the passphrase at all")
        .output()?;
    assert_eq!(wrong.status.code(), Some(1));
    let v: serde_json::Value = serde_json::from_slice(&wrong.stdout)?;
    assert_eq!(v["error"]["kind"], "wrong_passphrase", "{v}");

    let r = a.json(&["keys", "rotate"], 0)?;
    assert_eq!(r["snapshots"], 2, "{r}");
    assert_eq!(r["old_owner"], old_owner.as_str(), "{r}");
    let new_owner = r["new_owner"].as_str().unwrap_or_default().to_owned();
    assert_ne!(new_owner, old_owner);
    assert_eq!(a.json(&["snapshots"], 0)?.as_array().unwrap().len(), 2);
    let target = dir.path().join("restore-a");
    a.json(
        &["restore", "latest", "--target", target.to_str().unwrap()],
        0,
    )?;
    compare_trees(&src, &restored(&target, &src), &[])?;

    // Friends get the new set, then switch, then delete the old key's data.
    wait_until(
        "the old key to be retired everywhere",
        Duration::from_secs(120),
        || {
            let s = a.status()?;
            Ok(s["rotation_pending"]
                .as_array()
                .is_some_and(|p| p.is_empty())
                && !a.data_dir.join("secrets.retired").exists()
                && s["replicated_to"] == 2)
        },
    )
    .map_err(|e| anyhow::anyhow!("{e}\nA:\n{}", a.log()))?;
    for f in [&b, &c] {
        let owners = hosted(f)?;
        assert!(!owners.contains(&old_owner), "{}: {owners:?}", f.name);
        assert!(owners.contains(&new_owner), "{}: {owners:?}", f.name);
    }
    assert!(b.log().contains("retired"), "B logs the retirement");
    // The rotated snapshots' pack sets come from their trees: both friends hold all of each.
    wait_until(
        "the rotated snapshots' health",
        Duration::from_secs(60),
        || {
            let snaps = a.json(&["snapshots"], 0)?;
            Ok(snaps.as_array().is_some_and(|l| {
                l.iter().all(|s| {
                    s["health"]["unknown"] == false && s["health"]["friends_holding_all"] == 2
                })
            }))
        },
    )
    .map_err(|e| anyhow::anyhow!("{e}\nA:\n{}", a.log()))?;

    // The next backup deduplicates against the rotated data.
    let again = a.backup(&[&src], &[], 0)?;
    let bytes = again["bytes"].as_u64().unwrap_or(0);
    let sent = again["sent_bytes"].as_u64().unwrap_or(u64::MAX);
    assert!(sent * 50 < bytes, "sent {sent} of {bytes} bytes");

    // Recovery with the passphrase finds the new key.
    let a2 = node(dir.path(), "a2", "")?;
    a2.add_peer(&c, &[])?;
    let rec = a2.json(&["init", "--recover", "--name", "alice"], 0)?;
    assert_eq!(rec["owner"], new_owner.as_str(), "{rec}");
    let target = dir.path().join("restore-a2");
    a2.json(
        &["restore", "latest", "--target", target.to_str().unwrap()],
        0,
    )?;
    compare_trees(&src, &restored(&target, &src), &[])?;
    Ok(())
}
