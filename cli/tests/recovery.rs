//! Recovering a lost machine with only the owner name, the passphrase and one friend.

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

/// Whether `owner`'s log says `friend` stored head `seq` (or a newer one).
fn holds_head(owner: &Node, friend: &Node, seq: u64) -> bool {
    owner.log().lines().map(plain).any(|l| {
        l.contains("head stored at friend")
            && l.contains(&friend.peer_id)
            && l.rsplit("seq=")
                .next()
                .and_then(|n| n.trim().parse::<u64>().ok())
                .is_some_and(|n| n >= seq)
    })
}

/// A log line without its colour codes.
fn plain(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c == 'm' {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// Whether a recovery report lists `peer_id` among the friends it learned.
fn learned(rec: &serde_json::Value, peer_id: &str) -> bool {
    rec["friends_added"].as_array().is_some_and(|a| {
        a.iter()
            .any(|f| f.as_str().is_some_and(|f| f.contains(peer_id)))
    })
}

/// Restores `node`'s latest snapshot into `target` and checks it against `src`.
fn restore_latest(node: &Node, target: &Path, src: &Path) -> anyhow::Result<()> {
    node.json(
        &[
            "restore",
            "latest",
            "--target",
            target.to_str().unwrap_or_default(),
        ],
        0,
    )?;
    compare_trees(src, &restored(target, src), &[])?;
    Ok(())
}

fn copy_dir(from: &Path, to: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(to)?;
    for e in std::fs::read_dir(from)? {
        let e = e?;
        let p = e.path();
        let meta = std::fs::symlink_metadata(&p)?;
        if meta.is_dir() {
            copy_dir(&p, &to.join(e.file_name()))?;
        } else if meta.is_file() {
            std::fs::copy(&p, to.join(e.file_name()))?;
        }
    }
    Ok(())
}

#[test]
fn a_lost_machine_comes_back_with_name_passphrase_and_one_friend() -> TestResult {
    let dir = crate::util::tempdir("obnam-recovery-")?;
    let mut a = node(dir.path(), "a", "replicas = 2\n")?;
    let mut b = node(dir.path(), "b", "")?;
    let c = node(dir.path(), "c", "")?;
    befriend_all(&[&a, &b, &c])?;
    a.init("alice")?;
    // 1. Two backups with a change in between.
    let src = dir.path().join("src");
    std::fs::create_dir_all(src.join("docs"))?;
    std::fs::write(src.join("docs/big.bin"), noise(12 << 20, 1))?;
    std::fs::write(src.join("docs/notes.txt"), b"first version")?;
    a.backup(&[&src], &[], 0)?;
    std::fs::write(src.join("docs/notes.txt"), b"second version, longer")?;
    std::fs::write(src.join("docs/new.bin"), noise(3 << 20, 2))?;
    let second = a.backup(&[&src], &[], 0)?;
    assert_eq!(second["replicas"], 2);
    let old_peer = a.peer_id.clone();

    // 2. The machine is lost (a copy is kept only to play the old node later); B is offline.
    a.stop();
    let old_copy = dir.path().join("a-old");
    copy_dir(&a.data_dir, &old_copy)?;
    std::fs::remove_dir_all(&a.data_dir)?;
    b.stop();

    // 3. A new node with the name, the passphrase and C's ticket only.
    let a2 = node(dir.path(), "a2", "presence_interval_secs = 1\n")?;
    a2.add_peer(&c, &[])?;
    let wrong = a2
        .command(&["init", "--recover", "--name", "alice", "--json"])
        .env("OBNAM_PASSPHRASE", "not the passphrase at all")
        .output()?;
    assert_eq!(wrong.status.code(), Some(1));
    let v: serde_json::Value = serde_json::from_slice(&wrong.stdout)?;
    assert_eq!(v["error"]["kind"], "no_slot", "{v}");
    let wrong_name = a2.json(&["init", "--recover", "--name", "alicia"], 1)?;
    assert_eq!(wrong_name["error"]["kind"], "no_slot");
    let rec = a2.json(&["init", "--recover", "--name", "alice"], 0)?;
    assert_eq!(rec["snapshots"], 2, "{rec}");
    assert!(rec["packs"].as_u64().unwrap() >= 2, "{rec}");
    assert!(
        learned(&rec, &b.peer_id),
        "B is learned from the head: {rec}"
    );
    let snaps = a2.json(&["snapshots"], 0)?;
    assert_eq!(snaps.as_array().unwrap().len(), 2);
    let target = dir.path().join("restore");
    a2.json(
        &["restore", "latest", "--target", target.to_str().unwrap()],
        0,
    )?;
    compare_trees(&src, &restored(&target, &src), &[])?;
    // Recovered snapshots come without pack sets: the node reads their trees for them, and
    // then C holds all of each.
    wait_until(
        "the recovered snapshots' health",
        Duration::from_secs(60),
        || {
            let snaps = a2.json(&["snapshots"], 0)?;
            Ok(snaps.as_array().is_some_and(|l| {
                l.iter().all(|s| {
                    s["health"]["unknown"] == false && s["health"]["friends_holding_all"] == 1
                })
            }))
        },
    )
    .map_err(|e| anyhow::anyhow!("{e}\nA2:\n{}", a2.log()))?;
    assert!(
        a2.log().contains("worked out from its trees"),
        "{}",
        a2.log()
    );
    // Audits work with no local copy of anything: only pack ids and lengths from the friend.
    let v = a2.json(&["verify"], 0)?;
    assert!(v["passed"].as_u64().unwrap() >= 1, "{v}");
    assert_eq!(v["failed"], 0, "{v}");

    // 4. Backing up the same tree again sends almost nothing.
    let again = a2.backup(&[&src], &["--timeout", "3s"], 4)?; // B is still away: pending
    let bytes = again["bytes"].as_u64().unwrap();
    let sent = again["sent_bytes"].as_u64().unwrap();
    assert!(
        sent * 50 < bytes,
        "sent {sent} of {bytes} bytes: more than 2%"
    );

    // 5. B comes back, accepts A2 through the takeover, and catches up with the new head.
    b.start()?;
    wait_until(
        "B to hold the new snapshot",
        Duration::from_secs(90),
        || Ok(a2.status()?["replicated_to"] == 2),
    )
    .map_err(|e| anyhow::anyhow!("{e}\nA2:\n{}\nB:\n{}", a2.log(), b.log()))?;
    let at_b = b.json(&["peer", "list"], 0)?;
    assert!(
        at_b.as_array()
            .unwrap()
            .iter()
            .any(|p| p["peer_id"] == a2.peer_id.as_str()),
        "B shows the new node: {at_b}"
    );
    assert!(
        !at_b
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p["peer_id"] == old_peer.as_str()),
        "and not the old one: {at_b}"
    );
    assert!(b.log().contains("takeover"), "B logs the takeover");

    // 6. The old node is refused writes.
    let mut old = Node::new(&bins(), "a-old", &old_copy, "")?;
    old.start()?;
    std::fs::write(src.join("docs/from-the-thief.txt"), b"x")?;
    let stale = old.backup(&[&src], &["--timeout", "3s"], 4)?;
    assert_eq!(stale["replicas"], 0, "{stale}");
    let snaps = a2.json(&["snapshots"], 0)?;
    assert_eq!(
        snaps.as_array().unwrap().len(),
        3,
        "the old node's snapshot reached no friend"
    );
    old.stop();
    Ok(())
}

#[test]
fn packs_only_an_absent_friend_holds_join_the_index_when_it_is_back() -> TestResult {
    let dir = crate::util::tempdir("obnam-recovery-")?;
    // One replica, and friends count as lost after 3 s, so the second backup goes to C alone.
    let fast =
        "replicas = 1\nlost_after_secs = 3\npresence_interval_secs = 1\naudits_per_day = 0\n";
    let mut a = node(dir.path(), "a", fast)?;
    let mut b = node(dir.path(), "b", "")?;
    let c = node(dir.path(), "c", "")?;
    befriend_all(&[&a, &b, &c])?;
    a.init("alice")?;
    let src = dir.path().join("src");
    std::fs::create_dir_all(&src)?;
    std::fs::write(src.join("first.bin"), noise(4 << 20, 31))?;
    a.backup(&[&src], &[], 0)?;
    let first_at_b = obnam_simulations::files_below(&b.data_dir.join("hosted"), "pack").len();
    assert!(first_at_b >= 1, "B holds the first backup");
    // B goes away for longer than lost_after: the second backup's new packs go to C only.
    b.stop();
    std::thread::sleep(Duration::from_secs(5));
    std::fs::write(src.join("second.bin"), noise(4 << 20, 32))?;
    // C cannot get the first backup's pack (only B holds it), so the backup ends pending; C
    // gets the new pack and the head all the same.
    let second = a.backup(&[&src], &["--timeout", "5s"], 4)?;
    assert!(
        second["pending"][0].as_str().unwrap().contains("1 packs"),
        "{second}"
    );
    let seq = second["head_seq"].as_u64().unwrap();
    wait_until("C to hold the new head", Duration::from_secs(30), || {
        Ok(holds_head(&a, &c, seq))
    })?;
    // The machine is lost while B is still away; the new node knows only C.
    a.stop();
    std::fs::remove_dir_all(&a.data_dir)?;
    let a2 = node(dir.path(), "a2", "presence_interval_secs = 1\n")?;
    a2.add_peer(&c, &[])?;
    let rec = a2.json(&["init", "--recover", "--name", "alice"], 0)?;
    assert_eq!(rec["snapshots"], 2, "{rec}");
    assert!(
        rec["warnings"].as_array().unwrap().iter().any(|w| w
            .as_str()
            .unwrap()
            .contains("added to the index when it is back")),
        "the recovery says B could not be asked: {rec}"
    );
    // Without B the first file cannot be restored: its chunks are in packs only B holds.
    let target = dir.path().join("restore");
    let early = a2.obnam(&[
        "restore",
        "latest",
        "--target",
        target.to_str().unwrap(),
        "--json",
    ])?;
    assert_ne!(early.code, 0, "{early:?}");
    // B comes back: the node asks it which packs it holds, and the restore works.
    b.start()?;
    wait_until(
        "the index to be completed from B",
        Duration::from_secs(90),
        || Ok(a2.log().contains("index completed from a friend")),
    )
    .map_err(|e| anyhow::anyhow!("{e}\nA2:\n{}", a2.log()))?;
    let _ = std::fs::remove_dir_all(&target);
    a2.json(
        &["restore", "latest", "--target", target.to_str().unwrap()],
        0,
    )?;
    compare_trees(&src, &restored(&target, &src), &[])?;
    Ok(())
}

#[test]
fn a_friend_away_during_recovery_with_a_newer_head_loses_nothing() -> TestResult {
    let dir = crate::util::tempdir("obnam-recovery-")?;
    let mut a = node(dir.path(), "a", "replicas = 2\n")?;
    let mut b = node(dir.path(), "b", "")?;
    let mut c = node(dir.path(), "c", "")?;
    befriend_all(&[&a, &b, &c])?;
    a.init("alice")?;
    let src = dir.path().join("src");
    std::fs::create_dir_all(&src)?;
    std::fs::write(src.join("one.bin"), noise(2 << 20, 41))?;
    a.backup(&[&src], &[], 0)?;
    // C goes away; the second backup's head reaches B only (C holds the first backup's).
    c.stop();
    std::fs::write(src.join("two.bin"), noise(2 << 20, 42))?;
    let second = a.backup(&[&src], &["--timeout", "5s"], 4)?;
    let second_id = second["snapshot"].as_str().unwrap().to_owned();
    let second_copy = dir.path().join("second-copy");
    copy_dir(&src, &second_copy)?;
    let seq = second["head_seq"].as_u64().unwrap();
    wait_until(
        "B to hold the second backup's head",
        Duration::from_secs(30),
        || Ok(holds_head(&a, &b, seq)),
    )
    .map_err(|e| anyhow::anyhow!("{e}\nA:\n{}", a.log()))?;
    // The machine is lost while B is away; the new node recovers through C, which holds the first backup's head.
    a.stop();
    std::fs::remove_dir_all(&a.data_dir)?;
    b.stop();
    c.start()?;
    let a2 = node(dir.path(), "a2", "presence_interval_secs = 1\n")?;
    a2.add_peer(&c, &[])?;
    let rec = a2.json(&["init", "--recover", "--name", "alice"], 0)?;
    assert_eq!(
        rec["snapshots"], 1,
        "C knows only the first snapshot: {rec}"
    );
    // A backup on the new node: its head has the same sequence number as B's, and differs.
    std::fs::write(src.join("three.bin"), noise(1 << 20, 43))?;
    let third = a2.backup(&[&src], &["--timeout", "3s"], 4)?;
    let third_id = third["snapshot"].as_str().unwrap().to_owned();
    // B comes back: it refuses the takeover (it holds a newer head than the one the new node
    // started from), so the new node merges B's head into its own, and B accepts.
    b.start()?;
    wait_until(
        "the new node to list the snapshot only B knew",
        Duration::from_secs(90),
        || Ok(a2.snapshot_ids()?.contains(&second_id)),
    )
    .map_err(|e| anyhow::anyhow!("{e}\nA2:\n{}\nB:\n{}", a2.log(), b.log()))?;
    let ids = a2.snapshot_ids()?;
    assert_eq!(ids.len(), 3, "{ids:?}");
    assert!(ids.contains(&third_id), "{ids:?}");
    wait_until("B to take the merged head", Duration::from_secs(90), || {
        Ok(a2.status()?["replicated_to"] == 2)
    })
    .map_err(|e| anyhow::anyhow!("{e}\nA2:\n{}\nB:\n{}", a2.log(), b.log()))?;
    assert!(a2.log().contains("merged"), "{}", a2.log());
    let target = dir.path().join("restore-second");
    a2.json(
        &["restore", &second_id, "--target", target.to_str().unwrap()],
        0,
    )?;
    let got = restored(&target, &src);
    for f in ["one.bin", "two.bin"] {
        assert!(
            std::fs::read(got.join(f))? == std::fs::read(second_copy.join(f))?,
            "{f} differs"
        );
    }
    assert!(
        !got.join("three.bin").exists(),
        "the second snapshot came before three.bin"
    );
    let target = dir.path().join("restore-third");
    a2.json(
        &["restore", &third_id, "--target", target.to_str().unwrap()],
        0,
    )?;
    compare_trees(&src, &restored(&target, &src), &[])?;
    Ok(())
}

#[test]
fn recovery_through_a_friend_outside_the_replica_set_finds_every_snapshot() -> TestResult {
    let dir = crate::util::tempdir("obnam-recovery-")?;
    // One replica: one of B and C holds the packs; both get the head.
    let mut a = node(dir.path(), "a", "replicas = 1\n")?;
    let b = node(dir.path(), "b", "")?;
    let c = node(dir.path(), "c", "")?;
    befriend_all(&[&a, &b, &c])?;
    a.init("alice")?;
    let src = dir.path().join("src");
    std::fs::create_dir_all(&src)?;
    std::fs::write(src.join("data.bin"), noise(3 << 20, 51))?;
    a.backup(&[&src], &[], 0)?;
    let packs_at =
        |n: &Node| obnam_simulations::files_below(&n.data_dir.join("hosted"), "pack").len();
    let (holder, other) = if packs_at(&b) > 0 { (&b, &c) } else { (&c, &b) };
    assert_eq!(packs_at(other), 0, "one replica only");
    wait_until(
        "the other friend to hold the head",
        Duration::from_secs(30),
        || {
            Ok(a.log()
                .lines()
                .any(|l| l.contains("head stored at friend") && l.contains(&other.peer_id)))
        },
    )
    .map_err(|e| anyhow::anyhow!("{e}\nA:\n{}", a.log()))?;
    a.stop();
    std::fs::remove_dir_all(&a.data_dir)?;
    // The new node knows only the friend that holds no pack of ours.
    let a2 = node(dir.path(), "a2", "")?;
    a2.add_peer(other, &[])?;
    let rec = a2.json(&["init", "--recover", "--name", "alice"], 0)?;
    assert_eq!(rec["snapshots"], 1, "{rec}");
    assert!(
        learned(&rec, &holder.peer_id),
        "the pack holder is learned from the head: {rec}"
    );
    restore_latest(&a2, &dir.path().join("restore"), &src)
}

#[test]
fn recovery_through_a_friend_that_missed_every_backup_finds_them_through_the_others() -> TestResult
{
    let dir = crate::util::tempdir("obnam-recovery-")?;
    let mut a = node(dir.path(), "a", "replicas = 1\n")?;
    let b = node(dir.path(), "b", "")?;
    let mut c = node(dir.path(), "c", "")?;
    befriend_all(&[&a, &b, &c])?;
    a.init("alice")?;
    // C gets the key slot (and the head `init` wrote, which names B), then goes away before
    // the first backup: every backup's head and pack goes to B alone.
    wait_until("C to hold the key slot", Duration::from_secs(30), || {
        Ok(a.log()
            .lines()
            .any(|l| l.contains("key slot stored at friend") && l.contains(&c.peer_id)))
    })
    .map_err(|e| anyhow::anyhow!("{e}\nA:\n{}", a.log()))?;
    assert!(
        holds_head(&a, &c, 1),
        "the head goes before the slot:\n{}",
        a.log()
    );
    c.stop();
    let src = dir.path().join("src");
    std::fs::create_dir_all(&src)?;
    std::fs::write(src.join("one.bin"), noise(1 << 20, 61))?;
    a.backup(&[&src], &[], 0)?;
    std::fs::write(src.join("two.bin"), noise(1 << 20, 62))?;
    let second = a.backup(&[&src], &[], 0)?;
    assert!(holds_head(&a, &b, second["head_seq"].as_u64().unwrap()));
    a.stop();
    std::fs::remove_dir_all(&a.data_dir)?;
    // The new machine knows only C, which holds no snapshot.
    c.start()?;
    let a2 = node(dir.path(), "a2", "")?;
    a2.add_peer(&c, &[])?;
    let rec = a2.json(&["init", "--recover", "--name", "alice"], 0)?;
    assert_eq!(
        rec["snapshots"], 2,
        "both snapshots, learned through B: {rec}"
    );
    assert!(
        learned(&rec, &b.peer_id),
        "B is learned from the head C holds: {rec}"
    );
    restore_latest(&a2, &dir.path().join("restore"), &src)
}
