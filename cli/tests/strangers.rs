//! What a node that is not a friend can and cannot do, and the key slot's life.

use crate::util::{TestResult, bins, restored};
use obnam_simulations::{Node, PASSPHRASE, befriend_all, compare_trees, wait_until};
use std::path::Path;
use std::time::Duration;

const FAST: &str = "replication_interval_secs = 1\nrequest_timeout_secs = 20\n";

fn node(dir: &Path, name: &str, extra: &str) -> anyhow::Result<Node> {
    let mut n = Node::new(&bins(), name, &dir.join(name), &format!("{FAST}{extra}"))?;
    n.start()?;
    Ok(n)
}

#[test]
fn a_stranger_may_only_look_up_slots_and_learns_nothing_from_probes() -> TestResult {
    let dir = crate::util::tempdir("obnam-strangers-")?;
    let a = node(dir.path(), "a", "replicas = 1\n")?;
    let b = node(dir.path(), "b", "")?;
    befriend_all(&[&a, &b])?;
    let init = a.init("alice")?;
    wait_until("B to hold the key slot", Duration::from_secs(30), || {
        Ok(a.json(&["peer", "list"], 0)?[0]["holds_slot"] == true)
    })?;
    let owner: obnam_protocol::OwnerId = init["owner"].as_str().unwrap().parse()?;
    let real = obnam_node::keys::stretch(PASSPHRASE, "alice", 1)?.lookup;
    let unknown = obnam_protocol::LookupId([7; 32]);
    let mut lookups = vec![real, unknown, unknown];
    lookups.extend(std::iter::repeat_n(obnam_protocol::LookupId([8; 32]), 10));
    let target = format!("{}/p2p/{}", b.addrs[0], b.peer_id);
    let answers: Vec<(String, String)> =
        obnam_node::testing::stranger_probe(9, &target, &lookups, owner)?;
    let get = |case: &str| {
        answers
            .iter()
            .find(|(c, _)| c == case)
            .map(|(_, a)| a.clone())
            .unwrap_or_default()
    };
    let size = |a: &str| a.split(' ').nth(1).unwrap_or_default().to_owned();
    // A probe for an unknown lookup id gets an answer shaped like the real slot, and the same
    // answer every time.
    assert!(get("lookup 0").starts_with("slot "), "{answers:?}");
    assert_eq!(
        size(&get("lookup 0")),
        size(&get("lookup 1")),
        "{answers:?}"
    );
    assert_ne!(get("lookup 0"), get("lookup 1"));
    assert_eq!(
        get("lookup 1"),
        get("lookup 2"),
        "stable answers: {answers:?}"
    );
    // Lookups are rate-limited: 10 a minute per node.
    assert_eq!(get("lookup 12"), "Busy", "{answers:?}");
    assert!(b.log().contains("rate limit"));
    // Everything else is refused.
    assert_eq!(get("get_head"), "Unproven", "{answers:?}");
    assert_eq!(get("list_packs"), "Unproven", "{answers:?}");
    assert_eq!(get("put_slot"), "NotFriend", "{answers:?}");
    assert_eq!(get("get_pack"), "Unproven", "{answers:?}");
    Ok(())
}

#[test]
fn a_changed_passphrase_replaces_the_slot_at_every_friend() -> TestResult {
    let dir = crate::util::tempdir("obnam-strangers-")?;
    let a = node(dir.path(), "a", "replicas = 1\n")?;
    let b = node(dir.path(), "b", "")?;
    let mut c = node(dir.path(), "c", "")?;
    befriend_all(&[&a, &b, &c])?;
    a.init("alice")?;
    let src = dir.path().join("src");
    std::fs::create_dir_all(&src)?;
    std::fs::write(src.join("f"), b"data")?;
    a.backup(&[&src], &[], 0)?;
    c.stop();
    let new_pass = "amber harbour whistles seven crooked bells";
    let mut cmd = a.command(&["passphrase", "change", "--json"]);
    cmd.env("OBNAM_NEW_PASSPHRASE", new_pass);
    let run = obnam_simulations::run_with_timeout(cmd, Duration::from_secs(60))?;
    assert_eq!(run.code, 0, "{run:?}");
    // B gets the new slot; C, away, is listed until it is reached.
    wait_until("B to hold the new slot", Duration::from_secs(30), || {
        Ok(a.status()?["slot_pending"] == serde_json::json!(["c"]))
    })?;
    c.start()?;
    wait_until("C to hold the new slot", Duration::from_secs(60), || {
        Ok(a.status()?["slot_pending"] == serde_json::json!([]))
    })?;
    // The old passphrase no longer opens anything at the friends; the new one does.
    let a2 = node(dir.path(), "a2", "")?;
    a2.add_peer(&b, &[])?;
    let old = a2.json(&["init", "--recover", "--name", "alice"], 1)?;
    assert_eq!(old["error"]["kind"], "no_slot", "{old}");
    let mut cmd = a2.command(&["init", "--recover", "--name", "alice", "--json"]);
    cmd.env("OBNAM_PASSPHRASE", new_pass);
    let run = obnam_simulations::run_with_timeout(cmd, Duration::from_secs(60))?;
    assert_eq!(run.code, 0, "{run:?}");
    // The wrong current passphrase is refused.
    let mut cmd = a2.command(&["passphrase", "change", "--json"]);
    cmd.env("OBNAM_PASSPHRASE", "wrong")
        .env("OBNAM_NEW_PASSPHRASE", new_pass);
    let run = obnam_simulations::run_with_timeout(cmd, Duration::from_secs(60))?;
    assert_eq!(run.code, 1);
    assert_eq!(run.json()?["error"]["kind"], "wrong_passphrase");
    Ok(())
}

#[test]
fn a_lost_index_is_detected_and_rebuilt_from_friends() -> TestResult {
    let dir = crate::util::tempdir("obnam-strangers-")?;
    let mut a = node(dir.path(), "a", "replicas = 1\n")?;
    let b = node(dir.path(), "b", "")?;
    befriend_all(&[&a, &b])?;
    a.init("alice")?;
    let src = dir.path().join("src");
    std::fs::create_dir_all(&src)?;
    std::fs::write(src.join("f"), crate::util::noise(3 << 20, 4))?;
    // Older than the file cache's margin, so the seed below may trust it.
    std::thread::sleep(Duration::from_millis(2100));
    a.backup(&[&src], &[], 0)?;
    a.stop();
    std::fs::remove_file(a.data_dir.join("index.redb"))?;
    a.start()?;
    let v = a.json(&["snapshots"], 1)?;
    assert_eq!(v["error"]["kind"], "index_missing", "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("obnam index rebuild")
    );
    // A key rotation of a lost index would rotate nothing and then delete the old data.
    let v = a.json(&["keys", "rotate"], 1)?;
    assert_eq!(v["error"]["kind"], "index_missing", "{v}");
    // The friend list was in the lost index: the rebuild says to add one friend first.
    let v = a.json(&["index", "rebuild"], 1)?;
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("obnam peer add"),
        "{v}"
    );
    a.add_peer(&b, &[])?;
    let rebuilt = a.json(&["index", "rebuild"], 0)?;
    assert!(rebuilt["packs"].as_u64().unwrap() >= 1, "{rebuilt}");
    assert!(rebuilt["seeded_dirs"].as_u64().unwrap() >= 1, "{rebuilt}");
    assert_eq!(a.json(&["snapshots"], 0)?.as_array().unwrap().len(), 1);
    // The file cache was seeded from the snapshot: the unchanged file is not read again.
    let again = a.backup(&[&src], &[], 0)?;
    assert_eq!(again["cached_files"], 1, "{again}");
    // (Only directory trees may be new: /tmp changes as other tests run.)
    assert!(again["new_bytes"].as_u64().unwrap() < 4096, "{again}");
    let target = dir.path().join("restore");
    a.json(
        &["restore", "latest", "--target", target.to_str().unwrap()],
        0,
    )?;
    compare_trees(&src, &restored(&target, &src), &[])?;
    // A damaged index is kept aside and reported the same way.
    a.stop();
    std::fs::write(a.data_dir.join("index.redb"), vec![0x42u8; 10_000])?;
    a.start()?;
    let v = a.json(&["snapshots"], 1)?;
    assert_eq!(v["error"]["kind"], "index_missing", "{v}");
    assert!(
        v["error"]["message"].as_str().unwrap().contains("damaged"),
        "{v}"
    );
    Ok(())
}

#[test]
fn strangers_cannot_crowd_out_friends() -> TestResult {
    let dir = crate::util::tempdir("obnam-strangers-")?;
    let mut a = node(dir.path(), "a", "replicas = 1\n")?;
    let b = node(dir.path(), "b", "")?;
    befriend_all(&[&a, &b])?;
    a.init("alice")?;
    a.stop();
    let target = format!("{}/p2p/{}", b.addrs[0], b.peer_id);
    let (kept_tx, kept_rx) = std::sync::mpsc::channel();
    let (release_tx, release_rx) = std::sync::mpsc::channel();
    let flood = std::thread::spawn(move || {
        obnam_node::testing::stranger_flood(150, 40, &target, kept_tx, release_rx)
    });
    let kept = kept_rx.recv_timeout(Duration::from_secs(120))?;
    assert_eq!(
        kept,
        obnam_node::net::MAX_STRANGER_CONNECTIONS,
        "of 40 strangers, the node keeps only its cap"
    );
    // With the strangers' connections full, a friend still gets in and stores a backup.
    a.start()?;
    let src = dir.path().join("src");
    std::fs::create_dir_all(&src)?;
    std::fs::write(src.join("letter.txt"), b"friends first")?;
    std::fs::write(src.join("noise.bin"), crate::util::noise(200_000, 11))?;
    let report = a.backup(&[&src], &[], 0)?;
    assert_eq!(report["replicas"], 1, "{report}");
    drop(release_tx);
    flood
        .join()
        .map_err(|_| anyhow::anyhow!("the flood thread panicked"))??;
    Ok(())
}
