//! Friends: real obnam-node processes on 127.0.0.1 replicating to each other over libp2p.

use crate::util::{TestResult, bins, noise, restored};
use obnam_simulations::{Node, befriend_all, compare_trees, tree_contains, wait_until};
use std::path::Path;
use std::time::Duration;

const FAST: &str = "replication_interval_secs = 1\nrequest_timeout_secs = 20\n";

fn node(dir: &Path, name: &str, extra: &str) -> anyhow::Result<Node> {
    let mut n = Node::new(&bins(), name, &dir.join(name), &format!("{FAST}{extra}"))?;
    n.start()?;
    Ok(n)
}

fn tree(root: &Path, marker: &str) {
    std::fs::create_dir_all(root.join("docs/deep")).unwrap();
    std::fs::write(
        root.join(format!("docs/{marker}-name.txt")),
        format!("content {marker}-body").repeat(100),
    )
    .unwrap();
    std::fs::write(root.join("docs/deep/big.bin"), noise(12 << 20, 5)).unwrap();
    std::fs::write(root.join("docs/empty"), b"").unwrap();
    std::os::unix::fs::symlink("deep/big.bin", root.join("docs/link")).unwrap();
    std::fs::hard_link(root.join("docs/empty"), root.join("docs/empty-link")).unwrap();
}

fn outbox_packs(n: &Node) -> anyhow::Result<u64> {
    Ok(n.status()?["outbox_packs"].as_u64().unwrap_or(u64::MAX))
}

#[test]
fn restore_from_another_friend_while_one_is_down() -> TestResult {
    let dir = crate::util::tempdir("obnam-friends-")?;
    let a = node(dir.path(), "a", "replicas = 2\n")?;
    let mut b = node(dir.path(), "b", "")?;
    let c = node(dir.path(), "c", "")?;
    befriend_all(&[&a, &b, &c])?;
    a.init("alice")?;
    let src = dir.path().join("src");
    tree(&src, "m1");
    let report = a.backup(&[&src], &[], 0)?;
    assert_eq!(report["replicas"], 2, "{report}");
    assert!(
        report["sent_bytes"].as_u64().unwrap() >= 2 * (12 << 20),
        "{report}"
    );
    assert_eq!(
        outbox_packs(&a)?,
        0,
        "packs leave the outbox once two friends hold them"
    );
    let status = a.status()?;
    assert_eq!(status["replicated_to"], 2);
    assert_eq!(status["under_replicated"], false);
    let peers = a.json(&["peer", "list"], 0)?;
    for p in peers.as_array().unwrap() {
        for key in [
            "peer_id",
            "name",
            "household",
            "online",
            "addrs",
            "quota_given",
            "used_by_them",
            "used_by_us",
        ] {
            assert!(p.get(key).is_some(), "peer list lacks {key}: {p}");
        }
        assert!(p["used_by_us"].as_u64().unwrap() >= 12 << 20, "{p}");
    }
    let theirs = b.json(&["peer", "list"], 0)?;
    let a_at_b = theirs
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "a")
        .unwrap();
    assert!(
        a_at_b["used_by_them"].as_u64().unwrap() >= 12 << 20,
        "{a_at_b}"
    );

    b.stop();
    let target = dir.path().join("restore");
    let r = a.json(
        &["restore", "latest", "--target", target.to_str().unwrap()],
        0,
    )?;
    assert_eq!(r["problems"].as_array().unwrap().len(), 0, "{r}");
    compare_trees(&src, &restored(&target, &src), &[])?;
    Ok(())
}

#[test]
fn a_stranger_is_refused() -> TestResult {
    let dir = crate::util::tempdir("obnam-friends-")?;
    let a = node(dir.path(), "a", "")?;
    let d = node(dir.path(), "d", "replicas = 1\n")?;
    // D calls A a friend; A never agreed.
    d.add_peer(&a, &[])?;
    d.init("dave")?;
    let src = dir.path().join("src");
    tree(&src, "m2");
    let report = d.backup(&[&src], &["--timeout", "3s"], 4)?;
    assert_eq!(report["replicas"], 0);
    assert!(
        !report["pending"].as_array().unwrap().is_empty(),
        "{report}"
    );
    let log = a.log();
    assert!(
        log.contains("not a friend") && log.contains(&d.peer_id),
        "A must log the refusal naming D:\n{log}"
    );
    let peers = d.json(&["peer", "list"], 0)?;
    let err = peers[0]["last_error"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    assert!(err.contains("not a friend"), "D must see why: {peers}");
    assert_eq!(a.status()?["hosted_bytes"], 0);
    Ok(())
}

#[test]
fn a_friend_without_room_is_replaced() -> TestResult {
    let dir = crate::util::tempdir("obnam-friends-")?;
    let a = node(dir.path(), "a", "replicas = 2\n")?;
    let b = node(dir.path(), "b", "")?;
    let c = node(dir.path(), "c", "")?;
    let d = node(dir.path(), "d", "")?;
    // B grants A only 100 KiB; C and D are generous.
    a.add_peer(&b, &[])?;
    a.add_peer(&c, &[])?;
    a.add_peer(&d, &[])?;
    b.add_peer(&a, &["--quota", "100KiB"])?;
    c.add_peer(&a, &[])?;
    d.add_peer(&a, &[])?;
    a.init("alice")?;
    let src = dir.path().join("src");
    tree(&src, "m3");
    let report = a.backup(&[&src], &["--timeout", "30s"], 0)?;
    assert_eq!(report["replicas"], 2, "{report}");
    assert_eq!(
        b.status()?["hosted_bytes"],
        0,
        "B must not store beyond its quota"
    );
    assert!(c.status()?["hosted_bytes"].as_u64().unwrap() > 12 << 20);
    assert!(d.status()?["hosted_bytes"].as_u64().unwrap() > 12 << 20);
    let peers = a.json(&["peer", "list"], 0)?;
    let b_row = peers
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "b")
        .unwrap();
    assert!(
        b_row["last_error"]
            .as_str()
            .unwrap_or_default()
            .contains("quota"),
        "{b_row}"
    );
    Ok(())
}

#[test]
fn an_unchanged_backup_sends_no_new_packs() -> TestResult {
    let dir = crate::util::tempdir("obnam-friends-")?;
    let a = node(dir.path(), "a", "replicas = 1\n")?;
    let b = node(dir.path(), "b", "")?;
    befriend_all(&[&a, &b])?;
    a.init("alice")?;
    let src = dir.path().join("src");
    tree(&src, "m4");
    let first = a.backup(&[&src], &[], 0)?;
    assert!(first["sent_bytes"].as_u64().unwrap() > 0);
    let quiet = crate::util::quiet_tmp();
    let _ = a.backup(&[&src], &[], 0)?; // records /tmp as it is now
    let hosted = b.status()?["hosted_bytes"].as_u64().unwrap();
    let second = a.backup(&[&src], &[], 0)?;
    drop(quiet);
    assert_eq!(second["sent_bytes"], 0, "{second}");
    assert_eq!(second["stored_bytes"], 0, "{second}");
    assert_eq!(
        second["replicas"], 1,
        "the new head reached the friend: {second}"
    );
    assert_eq!(b.status()?["hosted_bytes"].as_u64().unwrap(), hosted);
    Ok(())
}

#[test]
fn an_offline_friend_gets_the_snapshot_when_it_returns() -> TestResult {
    let dir = crate::util::tempdir("obnam-friends-")?;
    let mut a = node(dir.path(), "a", "replicas = 1\n")?;
    let mut b = node(dir.path(), "b", "")?;
    befriend_all(&[&a, &b])?;
    a.init("alice")?;
    b.stop();
    let src = dir.path().join("src");
    tree(&src, "m5");
    let report = a.backup(&[&src], &["--timeout", "2s"], 4)?;
    assert_eq!(report["replicas"], 0);
    assert!(!report["pending"].as_array().unwrap().is_empty());
    let human = a.obnam(&["backup", src.to_str().unwrap(), "--timeout", "1s"])?;
    assert_eq!(human.code, 4, "{human:?}");
    assert!(human.stdout.contains("pending"), "{human:?}");
    // A restarts while B is away; B comes back; nobody runs another command.
    a.stop();
    a.start()?;
    b.start()?;
    wait_until("the snapshot to reach b", Duration::from_secs(90), || {
        Ok(a.status()?["replicated_to"] == 1)
    })
    .map_err(|e| anyhow::anyhow!("{e}\nA:\n{}\nB:\n{}", a.log(), b.log()))?;
    assert!(b.status()?["hosted_bytes"].as_u64().unwrap() > 12 << 20);
    Ok(())
}

#[test]
fn a_friend_never_sees_plaintext() -> TestResult {
    let dir = crate::util::tempdir("obnam-friends-")?;
    let a = node(dir.path(), "a", "replicas = 1\n")?;
    let b = node(dir.path(), "b", "")?;
    befriend_all(&[&a, &b])?;
    a.init("alice")?;
    let src = dir.path().join("src");
    tree(&src, "zq7marker");
    a.backup(&[&src], &[], 0)?;
    assert!(b.status()?["hosted_bytes"].as_u64().unwrap() > 0);
    for needle in [
        &b"zq7marker"[..],
        b"content zq7marker-body",
        b"big.bin",
        b"alice",
        src.to_str().unwrap().as_bytes(),
    ] {
        let hits = tree_contains(&b.data_dir, needle)?;
        assert!(
            hits.is_empty(),
            "{:?} found at the friend in {hits:?}",
            String::from_utf8_lossy(needle)
        );
    }
    // The markers are really in the source, so the grep can find them.
    assert!(!tree_contains(&src, b"zq7marker")?.is_empty());
    Ok(())
}

#[test]
fn malformed_input_gets_errors_and_the_node_keeps_serving() -> TestResult {
    let dir = crate::util::tempdir("obnam-friends-")?;
    let a = node(dir.path(), "a", "replicas = 1\n")?;
    let b = node(dir.path(), "b", "")?;
    befriend_all(&[&a, &b])?;
    // The rogue is a friend of B: it gets past the friend check and must still be refused.
    let rogue_id = obnam_node::testing::rogue_peer_id(7)?;
    b.json(&["peer", "add", &rogue_id, "--name", "rogue"], 0)?;
    let target = format!("{}/p2p/{}", b.addrs[0], b.peer_id);
    let answers: std::collections::HashMap<String, String> =
        obnam_node::testing::rogue_attack(7, &target)?
            .into_iter()
            .collect();
    assert_eq!(answers["oversized"], "TooLarge", "{answers:?}");
    assert_eq!(answers["garbage"], "Malformed", "{answers:?}");
    assert_eq!(answers["truncated"], "Malformed", "{answers:?}");
    assert_eq!(answers["bad_stream_header"], "Malformed", "{answers:?}");
    assert_eq!(answers["unproven_put"], "Unproven", "{answers:?}");
    assert_eq!(answers["forged_proof"], "Unproven", "{answers:?}");
    assert!(
        answers["valid_after_all_that"].starts_with("Nonce"),
        "{answers:?}"
    );
    assert_eq!(answers["real_proof"], "Ok", "{answers:?}");
    assert_eq!(answers["wrong_hash_put"], "BadPack", "{answers:?}");
    assert_eq!(
        answers["good_put"], "Some(Stored { already: false })",
        "{answers:?}"
    );
    assert_eq!(
        answers["same_put_again"], "Some(Stored { already: true })",
        "a stored pack is a no-op without a body: {answers:?}"
    );
    assert_eq!(answers["garbage_head"], "Malformed", "{answers:?}");
    assert_eq!(answers["audit_bad_range"], "Malformed", "{answers:?}");
    assert_eq!(answers["audit_unknown_pack"], "NotFound", "{answers:?}");
    assert_eq!(answers["audit_real"], "verified", "{answers:?}");
    assert!(b.log().contains("bad request"), "B logs the bad input");
    // B still serves its real friend.
    a.init("alice")?;
    let src = dir.path().join("src");
    tree(&src, "m6");
    let report = a.backup(&[&src], &[], 0)?;
    assert_eq!(report["replicas"], 1, "{report}");
    Ok(())
}

fn packs_below(dir: &Path) -> Vec<std::path::PathBuf> {
    obnam_simulations::files_below(dir, "pack")
}

#[test]
fn a_damaged_copy_at_one_friend_is_detected_and_named() -> TestResult {
    let dir = crate::util::tempdir("obnam-friends-")?;
    let a = node(dir.path(), "a", "replicas = 2\n")?;
    let b = node(dir.path(), "b", "")?;
    let mut c = node(dir.path(), "c", "")?;
    befriend_all(&[&a, &b, &c])?;
    a.init("alice")?;
    let src = dir.path().join("src");
    tree(&src, "m7");
    a.backup(&[&src], &[], 0)?;
    // Bit rot at B: every pack it holds for A is damaged.
    let packs = packs_below(&b.data_dir.join("hosted"));
    assert!(!packs.is_empty());
    for p in &packs {
        let mut bytes = std::fs::read(p)?;
        let mid = bytes.len() / 2;
        bytes[mid] ^= 0x40;
        std::fs::write(p, bytes)?;
    }
    // With C online the restore is complete and identical, whichever friend is asked first.
    let t1 = dir.path().join("t1");
    a.json(&["restore", "latest", "--target", t1.to_str().unwrap()], 0)?;
    compare_trees(&src, &restored(&t1, &src), &[])?;
    // With only B left, nothing is restored from its damaged copies, and B is named.
    c.stop();
    let t2 = dir.path().join("t2");
    let run = a.obnam(&["restore", "latest", "--target", t2.to_str().unwrap()])?;
    assert_eq!(run.code, 1, "{run:?}");
    assert!(
        run.stderr.contains(&b.peer_id) && run.stderr.contains("damaged"),
        "B must be named: {run:?}"
    );
    assert!(a.log().contains("damaged copy"), "and logged");
    assert!(!restored(&t2, &src).join("docs/deep/big.bin").exists());
    Ok(())
}

#[test]
fn every_friend_gets_the_key_slot() -> TestResult {
    let dir = crate::util::tempdir("obnam-friends-")?;
    let a = node(dir.path(), "a", "replicas = 1\n")?;
    let b = node(dir.path(), "b", "")?;
    let c = node(dir.path(), "c", "")?;
    befriend_all(&[&a, &b, &c])?;
    a.init("alice")?;
    wait_until(
        "both friends to hold the key slot",
        Duration::from_secs(30),
        || {
            let peers = a.json(&["peer", "list"], 0)?;
            Ok(peers
                .as_array()
                .unwrap()
                .iter()
                .all(|p| p["holds_slot"] == true))
        },
    )?;
    Ok(())
}

#[test]
fn replicas_prefer_other_households_and_too_few_friends_is_under_replicated() -> TestResult {
    let dir = crate::util::tempdir("obnam-friends-")?;
    let a = node(dir.path(), "a", "replicas = 2\n")?;
    let b = node(dir.path(), "b", "")?;
    let c = node(dir.path(), "c", "")?;
    let d = node(dir.path(), "d", "")?;
    // B and C share a household; D lives elsewhere. B and C were added first.
    a.add_peer(&b, &["--household", "flat-1"])?;
    a.add_peer(&c, &["--household", "flat-1"])?;
    a.add_peer(&d, &["--household", "house-2"])?;
    for n in [&b, &c, &d] {
        n.add_peer(&a, &[])?;
    }
    a.init("alice")?;
    let src = dir.path().join("src");
    tree(&src, "m8");
    let report = a.backup(&[&src], &[], 0)?;
    assert_eq!(report["replicas"], 2, "{report}");
    assert!(
        b.status()?["hosted_bytes"].as_u64().unwrap() > 0,
        "one of flat-1"
    );
    assert_eq!(
        c.status()?["hosted_bytes"],
        0,
        "not a second copy in flat-1"
    );
    assert!(d.status()?["hosted_bytes"].as_u64().unwrap() > 0, "house-2");
    assert_eq!(a.status()?["under_replicated"], false);

    // With fewer friends than replicas, every friend gets a copy and status says so.
    let e = node(dir.path(), "e", "replicas = 3\n")?;
    befriend_all(&[&e, &b])?;
    e.init("erin")?;
    let report = e.backup(&[&src], &[], 0)?;
    assert_eq!(report["replicas"], 1, "{report}");
    let status = e.status()?;
    assert_eq!(status["under_replicated"], true, "{status}");
    assert_eq!(status["replicated_to"], 1, "{status}");
    Ok(())
}
