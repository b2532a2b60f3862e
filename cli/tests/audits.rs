//! Audits and repair (the integrity issue): friends prove they hold our packs without sending
//! them, and what a friend lost or let rot is found and sent to it again.

use crate::util::{TestResult, bins, noise, restored};
use obnam_simulations::{Node, befriend_all, compare_trees, files_below, wait_until};
use std::path::{Path, PathBuf};
use std::time::Duration;

const BASE: &str =
    "replication_interval_secs = 1\nrequest_timeout_secs = 20\npresence_interval_secs = 1\n";
/// Scheduled audits every 5 seconds, with a short deadline.
const AUDITS: &str =
    "audits_per_day = 17280\naudit_deadline_secs = 10\naudit_answers_per_minute = 1000\n";

fn node(dir: &Path, name: &str, extra: &str) -> anyhow::Result<Node> {
    let mut n = Node::new(&bins(), name, &dir.join(name), &format!("{BASE}{extra}"))?;
    n.start()?;
    Ok(n)
}

fn hosted_packs(n: &Node) -> Vec<PathBuf> {
    files_below(&n.data_dir.join("hosted"), "pack")
}

/// Whether every hosted pack file is there and hashes to its name.
fn all_good(n: &Node, count: usize) -> bool {
    let packs = hosted_packs(n);
    packs.len() == count
        && packs.iter().all(|p| {
            let stem = p.file_stem().and_then(|s| s.to_str()).unwrap_or("");
            std::fs::read(p).is_ok_and(|b| blake3::hash(&b).to_hex().as_str() == stem)
        })
}

fn health(a: &Node, name: &str) -> anyhow::Result<serde_json::Value> {
    let s = a.status()?;
    s["friend_health"]
        .as_array()
        .and_then(|l| l.iter().find(|f| f["name"] == name).cloned())
        .ok_or_else(|| anyhow::anyhow!("no health for {name}: {s}"))
}

#[test]
fn lost_and_rotten_packs_are_found_by_audits_and_repaired() -> TestResult {
    let dir = crate::util::tempdir("obnam-audit-")?;
    let a = node(dir.path(), "a", &format!("replicas = 2\n{AUDITS}"))?;
    let b = node(dir.path(), "b", AUDITS)?;
    let c = node(dir.path(), "c", AUDITS)?;
    befriend_all(&[&a, &b, &c])?;
    a.init("alice")?;
    let src = dir.path().join("src");
    std::fs::create_dir_all(src.join("d"))?;
    std::fs::write(src.join("d/big.bin"), noise(20 << 20, 11))?;
    std::fs::write(src.join("d/small.txt"), b"small file".repeat(50))?;
    let report = a.backup(&[&src], &[], 0)?;
    assert_eq!(report["replicas"], 2, "{report}");
    let count = hosted_packs(&b).len();
    assert!(count >= 3, "several packs: {count}");
    assert!(all_good(&b, count) && all_good(&c, count));
    // Both friends hold all of the snapshot: `snapshots` and `status` say so.
    let snaps = a.json(&["snapshots"], 0)?;
    let h = &snaps[0]["health"];
    assert_eq!(h["friends_holding_all"], 2, "{snaps}");
    assert_eq!(h["single_friend_share"], 0.0, "{snaps}");
    let s = a.status()?;
    assert_eq!(s["latest_snapshot_health"]["friends_holding_all"], 2, "{s}");

    // Healthy friends pass `verify`, and the scheduled audits and presence show in `status`.
    let v = a.json(&["verify"], 0)?;
    assert_eq!(v["failed"], 0, "{v}");
    assert!(
        v["passed"].as_u64().unwrap() >= 8,
        "4 audits for each of 2 friends: {v}"
    );
    for kind in ["newest", "root", "random"] {
        assert!(
            v["audits"]
                .as_array()
                .unwrap()
                .iter()
                .any(|x| x["kind"] == kind),
            "{v}"
        );
    }
    wait_until(
        "scheduled audits and presence",
        Duration::from_secs(60),
        || {
            let h = health(&a, "b")?;
            Ok(h["audits"]["passed"].as_u64().unwrap_or(0) > 4
                && h["audits"]["online_fraction_30d"]
                    .as_f64()
                    .is_some_and(|x| x > 0.5)
                && h["audits"]["last_seen"].is_string())
        },
    )?;

    // Behind their backs: B loses 1% of its packs (at least one) and one byte flips in another
    // pack at C, so each pack still has one good copy somewhere.
    let at_b = hosted_packs(&b);
    let lost = at_b.len().div_ceil(100);
    for p in &at_b[..lost] {
        std::fs::remove_file(p)?;
    }
    let rotten = hosted_packs(&c)[lost].clone();
    let mut bytes = std::fs::read(&rotten)?;
    let mid = bytes.len() / 3;
    bytes[mid] ^= 0x01;
    std::fs::write(&rotten, bytes)?;

    // `verify` (four audits of each friend) and the scheduled audits find both faults; a
    // `verify` that meets one exits 1 and names it; repair sends every lost or rotten pack again,
    // from the friend that still has it.
    let mut verify_failed = None;
    let waited = wait_until(
        "both faults found and repaired",
        Duration::from_secs(120),
        || {
            let run = a.obnam(&["verify", "--json"])?;
            if run.code == 1 && verify_failed.is_none() {
                verify_failed = Some(run.json()?);
            }
            let hb = health(&a, "b")?;
            let hc = health(&a, "c")?;
            Ok(hb["audits"]["failed"].as_u64().unwrap_or(0) >= 1
                && hc["audits"]["failed"].as_u64().unwrap_or(0) >= 1
                && all_good(&b, count)
                && all_good(&c, count))
        },
    );
    if let Err(e) = waited {
        anyhow::bail!(
            "{e}\nb: {} of {count} packs good? {}; c good? {}\nstatus {}\nA's log:\n{}",
            hosted_packs(&b).len(),
            all_good(&b, count),
            all_good(&c, count),
            a.status()?,
            a.log(),
        );
    }
    let v = verify_failed.ok_or_else(|| anyhow::anyhow!("no verify run met a fault"))?;
    assert!(v["failed"].as_u64().unwrap() >= 1, "{v}");
    assert_eq!(v["error"]["kind"], "audit_failed", "{v}");
    let hc = health(&a, "c")?;
    assert!(hc["audits"]["last_failure"].is_string(), "{hc}");
    assert!(a.log().contains("AUDIT FAILED"), "a failed audit is logged");
    assert!(
        c.log().contains("dropped a hosted pack"),
        "C dropped its rotten copy"
    );
    let s = a.status()?;
    assert_eq!(s["replicated_to"], 2, "{s}");

    // Friends keep passing afterwards, and a restore is byte-identical.
    wait_until("clean audits after repair", Duration::from_secs(60), || {
        let v = a.json(&["verify"], 0)?;
        Ok(v["failed"] == 0)
    })?;
    // `verify --sample 100` downloads every pack from both friends and opens every chunk.
    let v = a.json(&["verify", "--sample", "100"], 0)?;
    let samples: Vec<_> = v["audits"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|x| x["kind"] == "sample")
        .collect();
    assert_eq!(samples.len(), 2 * count, "{v}");
    for x in &samples {
        assert_eq!(x["outcome"], "passed", "{x}");
        assert!(
            x["detail"]
                .as_str()
                .unwrap()
                .ends_with("chunks decrypted and checked"),
            "{x}"
        );
    }
    let bad = a.obnam(&["verify", "--sample", "0"])?;
    assert_eq!(bad.code, 2, "a sample of 0% is a usage error: {bad:?}");
    let target = dir.path().join("restore");
    let r = a.json(
        &["restore", "latest", "--target", target.to_str().unwrap()],
        0,
    )?;
    assert_eq!(r["problems"].as_array().unwrap().len(), 0, "{r}");
    compare_trees(&src, &restored(&target, &src), &[])?;
    Ok(())
}

/// The health of each snapshot in `snapshots --json`, oldest first: (friends holding all of
/// it, share held by nobody, sealed bytes).
fn snapshot_health(a: &Node) -> anyhow::Result<Vec<(u64, f64, u64)>> {
    let snaps = a.json(&["snapshots"], 0)?;
    snaps
        .as_array()
        .ok_or_else(|| anyhow::anyhow!("not a list: {snaps}"))?
        .iter()
        .map(|s| {
            let h = &s["health"];
            anyhow::ensure!(h["unknown"] == false, "unknown health: {snaps}");
            Ok((
                h["friends_holding_all"].as_u64().unwrap_or(99),
                h["unheld_share"].as_f64().unwrap_or(-1.0),
                h["pack_bytes"].as_u64().unwrap_or(0),
            ))
        })
        .collect()
}

#[test]
fn snapshot_health_counts_exactly_the_packs_each_snapshot_uses() -> TestResult {
    let dir = crate::util::tempdir("obnam-audit-")?;
    let off = "audits_per_day = 0\n";
    let a = node(dir.path(), "a", &format!("replicas = 1\n{off}"))?;
    let mut b = node(dir.path(), "b", off)?;
    befriend_all(&[&a, &b])?;
    a.init("alice")?;
    let x = dir.path().join("x");
    let y = dir.path().join("y");
    std::fs::create_dir_all(&x)?;
    std::fs::create_dir_all(&y)?;
    std::fs::write(x.join("big.bin"), noise(10 << 20, 21))?;
    std::fs::write(y.join("other.bin"), noise(3 << 20, 22))?;
    a.backup(&[&x], &[], 0)?;
    // B goes away: what A backs up now stays in its outbox, held by nobody.
    b.stop();
    a.backup(&[&y], &["--timeout", "2s"], 4)?;
    let h = snapshot_health(&a)?;
    assert_eq!((h[0].0, h[0].1), (1, 0.0), "B holds all of X: {h:?}");
    // The snapshot of Y uses none of X's packs, though they were written before it.
    assert_eq!((h[1].0, h[1].1), (0, 1.0), "nobody holds Y: {h:?}");
    assert!(h[1].2 < h[0].2 / 2, "Y's packs only: {h:?}");
    // A snapshot of both uses X's packs (held) and Y's (not).
    a.backup(&[&x, &y], &["--timeout", "2s"], 4)?;
    let h = snapshot_health(&a)?;
    assert_eq!(h[2].0, 0, "{h:?}");
    assert!(h[2].1 > 0.0 && h[2].1 < 0.5, "{h:?}");
    assert!(h[2].2 > h[0].2 && h[2].2 > h[1].2, "{h:?}");
    let s = a.status()?;
    assert_eq!(
        s["latest_snapshot_health"]["pack_bytes"].as_u64(),
        Some(h[2].2),
        "{s}"
    );
    // B is back and takes the rest: every snapshot is held in full.
    b.start()?;
    wait_until("B holds every snapshot", Duration::from_secs(60), || {
        Ok(snapshot_health(&a)?.iter().all(|h| h.0 == 1 && h.1 == 0.0))
    })?;
    Ok(())
}

#[test]
fn verify_without_friends_or_owner_is_a_clear_error() -> TestResult {
    let dir = crate::util::tempdir("obnam-audit-")?;
    let a = node(dir.path(), "a", AUDITS)?;
    let run = a.obnam(&["verify"])?;
    assert_eq!(run.code, 1, "{run:?}");
    assert!(run.stderr.contains("init"), "{run:?}");
    a.init("alice")?;
    // No friend: nothing to audit, nothing failed.
    let v = a.json(&["verify"], 0)?;
    assert_eq!(
        (v["passed"].as_u64(), v["failed"].as_u64()),
        (Some(0), Some(0))
    );
    Ok(())
}

#[test]
fn a_friends_scrub_drops_rot_and_the_owner_repairs_it_without_audits() -> TestResult {
    let dir = crate::util::tempdir("obnam-audit-")?;
    let no_audits = "audits_per_day = 0\n";
    let scrub = "audits_per_day = 0\nscrub_bytes_per_sec = 1000000000\nscrub_interval_secs = 1\n";
    let a = node(dir.path(), "a", &format!("replicas = 2\n{no_audits}"))?;
    let b = node(dir.path(), "b", scrub)?;
    let c = node(dir.path(), "c", no_audits)?;
    befriend_all(&[&a, &b, &c])?;
    a.init("alice")?;
    let src = dir.path().join("src");
    std::fs::create_dir_all(&src)?;
    std::fs::write(src.join("big.bin"), noise(10 << 20, 12))?;
    a.backup(&[&src], &[], 0)?;
    let count = hosted_packs(&b).len();
    let victim = hosted_packs(&b)[0].clone();
    let mut bytes = std::fs::read(&victim)?;
    bytes[100] ^= 0x80;
    std::fs::write(&victim, bytes)?;
    wait_until(
        "B's scrub drops the rotten pack and A sends it again",
        Duration::from_secs(60),
        || Ok(b.log().contains("scrub: it hashes to") && all_good(&b, count)),
    )?;
    assert!(a.log().contains("dropped our packs"), "A was told");
    let h = health(&a, "b")?;
    assert_eq!(
        h["audits"]["passed"].as_u64(),
        Some(0),
        "no audit was involved: {h}"
    );
    Ok(())
}

#[test]
fn a_friend_that_removes_us_is_replaced_and_its_copies_are_made_elsewhere() -> TestResult {
    let dir = crate::util::tempdir("obnam-audit-")?;
    let off = "audits_per_day = 0\n";
    let a = node(dir.path(), "a", &format!("replicas = 2\n{off}"))?;
    let b = node(dir.path(), "b", off)?;
    let c = node(dir.path(), "c", off)?;
    befriend_all(&[&a, &b, &c])?;
    a.init("alice")?;
    let src = dir.path().join("src");
    std::fs::create_dir_all(&src)?;
    std::fs::write(src.join("big.bin"), noise(10 << 20, 13))?;
    a.backup(&[&src], &[], 0)?;
    let count = hosted_packs(&b).len();
    assert_eq!(a.status()?["outbox_packs"], 0, "the packs left A's outbox");
    // D joins as a third friend, outside the replica set (it gets the key slot only).
    let d = node(dir.path(), "d", off)?;
    befriend_all(&[&a, &d])?;
    assert_eq!(hosted_packs(&d).len(), 0);
    // B stops being A's friend: A notices, D takes B's place, and gets every pack from C.
    b.json(&["peer", "remove", &a.peer_id], 0)?;
    wait_until("D holds every pack", Duration::from_secs(60), || {
        Ok(all_good(&d, count))
    })?;
    let waited = wait_until(
        "two friends hold everything",
        Duration::from_secs(30),
        || {
            let s = a.status()?;
            Ok(s["replicated_to"] == 2 && s["outbox_packs"] == 0)
        },
    );
    if let Err(e) = waited {
        anyhow::bail!("{e}: {}\n{}", a.status()?, a.log());
    }
    Ok(())
}

#[test]
fn a_friend_unseen_for_lost_after_is_replaced_and_counts_again_when_back() -> TestResult {
    let dir = crate::util::tempdir("obnam-audit-")?;
    let off = "audits_per_day = 0\n";
    let a = node(
        dir.path(),
        "a",
        &format!("replicas = 2\nlost_after_secs = 3\n{off}"),
    )?;
    let mut b = node(dir.path(), "b", off)?;
    let c = node(dir.path(), "c", off)?;
    befriend_all(&[&a, &b, &c])?;
    a.init("alice")?;
    let src = dir.path().join("src");
    std::fs::create_dir_all(&src)?;
    std::fs::write(src.join("big.bin"), noise(10 << 20, 14))?;
    a.backup(&[&src], &[], 0)?;
    let count = hosted_packs(&b).len();
    let d = node(dir.path(), "d", off)?;
    befriend_all(&[&a, &d])?;
    // B goes away. After lost_after_secs its copies no longer count: D takes its place.
    b.stop();
    wait_until("D holds every pack", Duration::from_secs(60), || {
        Ok(all_good(&d, count))
    })?;
    wait_until(
        "two friends hold everything",
        Duration::from_secs(30),
        || {
            let s = a.status()?;
            Ok(s["replicated_to"] == 2 && s["outbox_packs"] == 0)
        },
    )?;
    // B comes back: it is audited, and its copies count again.
    b.start()?;
    wait_until("B counts again", Duration::from_secs(60), || {
        Ok(a.status()?["replicated_to"] == 3)
    })?;
    let v = a.json(&["verify"], 0)?;
    assert!(
        v["audits"]
            .as_array()
            .unwrap()
            .iter()
            .any(|x| x["name"] == "b" && x["outcome"] == "passed"),
        "{v}"
    );
    Ok(())
}
