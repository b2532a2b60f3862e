//! Friends behind NAT: real `obnam-node` processes in network namespaces that the test makes
//! (`obnam_simulations::netns`): a public friend R and two homes, H1 and H2, each behind its own
//! MASQUERADE router. Root only (with `ip` and `iptables`); elsewhere each test says why it
//! skips and passes. Intervals are shortened through the config; the tests poll with generous
//! limits and never assert a latency.

use crate::util::{TestResult, bins, noise, restored};
use obnam_simulations::netns::{Nat, R_ADDR, Topology, unavailable};
use obnam_simulations::{Node, compare_trees, wait_until};
use serde_json::Value;
use std::path::Path;
use std::time::Duration;

/// Short intervals, so the tests do in seconds what takes minutes by default.
const FAST: &str = "replication_interval_secs = 1\nrequest_timeout_secs = 20\n\
network_upkeep_secs = 1\nautonat_probe_secs = 1\nidentify_interval_secs = 5\n\
ping_interval_secs = 2\nping_timeout_secs = 6\nidle_connection_timeout_secs = 60\n";

const LIMIT: Duration = Duration::from_secs(60);

fn skip() -> bool {
    match unavailable() {
        Some(why) => {
            eprintln!("SKIPPED: the NAT tests need network namespaces: {why}");
            true
        }
        None => false,
    }
}

fn node(t: &Topology, dir: &Path, role: &str, extra: &str) -> anyhow::Result<Node> {
    let mut n = Node::new_in_netns(
        &bins(),
        role,
        &dir.join(role),
        &t.ns(role),
        &format!("{FAST}{extra}"),
    )?;
    n.start()?;
    Ok(n)
}

/// R: publicly reachable, serves relays and AutoNAT to its friends.
fn relay_config() -> String {
    format!(
        "relay_server = true\nautonat_server = true\nexternal_addresses = [\"/ip4/{R_ADDR}/tcp/4411\", \"/ip4/{R_ADDR}/udp/4411/quic-v1\"]\n"
    )
}

fn peer<'a>(list: &'a Value, id: &str) -> Option<&'a Value> {
    list.as_array()?.iter().find(|p| p["peer_id"] == id)
}

fn path_to(from: &Node, to: &Node) -> anyhow::Result<Option<String>> {
    let list = from.json(&["peer", "list"], 0)?;
    Ok(peer(&list, &to.peer_id).and_then(|p| p["path"].as_str().map(str::to_owned)))
}

fn has_relay_addr(n: &Node) -> anyhow::Result<bool> {
    let v = n.json(&["id"], 0)?;
    Ok(v["addrs"].as_array().is_some_and(|a| {
        a.iter()
            .any(|x| x.as_str().is_some_and(|s| s.contains("p2p-circuit")))
    }))
}

/// Befriends R with both homes, waits for both homes to hold a reservation at R (their tickets
/// then carry a relayed address), and befriends the homes with each other.
fn pair_up(r: &Node, h1: &Node, h2: &Node, wait_for_relay: bool) -> TestResult {
    for h in [h1, h2] {
        h.add_peer(r, &[])?;
        r.add_peer(h, &[])?;
    }
    if wait_for_relay {
        for h in [h1, h2] {
            wait_until(&format!("{} to reserve at R", h.name), LIMIT, || {
                has_relay_addr(h)
            })?;
        }
    }
    h1.add_peer(h2, &[])?;
    h2.add_peer(h1, &[])?;
    Ok(())
}

fn tree(root: &Path, seed: u64) {
    std::fs::create_dir_all(root.join("docs")).unwrap();
    std::fs::write(
        root.join("docs/a.txt"),
        format!("notes {seed} ").repeat(500),
    )
    .unwrap();
    std::fs::write(root.join("docs/big.bin"), noise(6 << 20, seed)).unwrap();
}

/// (a) and (b): with endpoint-independent NAT on both homes, H1 and H2 first meet through R's
/// relay and DCUtR turns that into a direct, hole-punched connection. H1 backs up to H2 and R,
/// then R goes away and H1 restores everything from H2 alone.
#[test]
fn hole_punching_makes_homes_direct_and_restore_comes_from_a_home() -> TestResult {
    if skip() {
        return Ok(());
    }
    let t = Topology::new(Nat::EndpointIndependent, None)?;
    let dir = crate::util::tempdir("obnam-nat-")?;
    let mut r = node(&t, dir.path(), "r", &relay_config())?;
    let h1 = node(&t, dir.path(), "h1", "replicas = 2\n")?;
    let h2 = node(&t, dir.path(), "h2", "")?;
    pair_up(&r, &h1, &h2, true)?;
    wait_until("H1 and H2 to be hole-punched", LIMIT, || {
        Ok(path_to(&h1, &h2)?.is_some_and(|p| p.starts_with("hole-punched")))
    })
    .map_err(|e| anyhow::anyhow!("{e}; H1 log: {}\nH2 log: {}", h1.log(), h2.log()))?;
    assert!(
        path_to(&h2, &h1)?.is_some_and(|p| !p.starts_with("relayed")),
        "H2 reaches H1 directly too"
    );
    h1.init("alice")?;
    let src = dir.path().join("src");
    tree(&src, 1);
    let report = h1.backup(&[&src], &[], 0)?;
    assert_eq!(report["replicas"], 2, "{report}");
    assert_eq!(
        h1.status()?["outbox_packs"],
        0,
        "both friends hold every pack"
    );
    // R leaves; only H2 holds the data now, and only the direct path to it is left.
    r.kill();
    let target = dir.path().join("restore");
    h1.json(
        &["restore", "latest", "--target", target.to_str().unwrap()],
        0,
    )?;
    compare_trees(&src, &restored(&target, &src), &[])?;
    let p = path_to(&h1, &h2)?.unwrap_or_default();
    assert!(p.starts_with("hole-punched"), "restored over {p}");
    eprintln!(
        "H1 reaches H2: {p}; H1's peer list: {}",
        h1.json(&["peer", "list"], 0)?
    );
    Ok(())
}

/// (c): with symmetric NAT (a random public port per connection) hole punching cannot work;
/// the backup still completes, over R's relay, and restores.
#[test]
fn backup_goes_over_a_friend_relay_when_hole_punching_fails() -> TestResult {
    if skip() {
        return Ok(());
    }
    let t = Topology::new(Nat::Symmetric, None)?;
    let dir = crate::util::tempdir("obnam-nat-")?;
    let r = node(&t, dir.path(), "r", &relay_config())?;
    // Both homes try hole punching again every 3 s while they are reached only through R.
    let h1 = node(
        &t,
        dir.path(),
        "h1",
        "replicas = 2\nhole_punch_retry_secs = 3\n",
    )?;
    let h2 = node(&t, dir.path(), "h2", "hole_punch_retry_secs = 3\n")?;
    pair_up(&r, &h1, &h2, true)?;
    wait_until("H1 to reach H2", LIMIT, || Ok(path_to(&h1, &h2)?.is_some()))?;
    h1.init("alice")?;
    let src = dir.path().join("src");
    tree(&src, 2);
    let report = h1.backup(&[&src], &[], 0)?;
    assert_eq!(report["replicas"], 2, "{report}");
    let p = path_to(&h1, &h2)?.unwrap_or_default();
    assert!(
        p.starts_with("relayed via") && p.contains(&r.peer_id),
        "H1 reaches H2 through R: {p}"
    );
    let list = h1.json(&["peer", "list"], 0)?;
    let at_h2 = peer(&list, &h2.peer_id).unwrap();
    assert!(
        at_h2["used_by_us"].as_u64().unwrap_or(0) >= 6 << 20,
        "H2 holds H1's packs: {at_h2}"
    );
    // A direct path is tried again, through a new relayed connection, and fails again here.
    wait_until("a home to try hole punching again", LIMIT, || {
        Ok([&h1, &h2]
            .iter()
            .any(|h| h.log().contains("trying hole punching again")))
    })?;
    let target = dir.path().join("restore");
    h1.json(
        &["restore", "latest", "--target", target.to_str().unwrap()],
        0,
    )?;
    compare_trees(&src, &restored(&target, &src), &[])?;
    let p = path_to(&h1, &h2)?.unwrap_or_default();
    assert!(p.starts_with("relayed via"), "still on the relay: {p}");
    Ok(())
}

/// A topology with H2 behind a port forward and no relay of its own: starts R, H1 (with
/// `h1_extra`) and H2, pairs them up, and waits until AutoNAT confirms H2's forwarded public
/// address and H1 holds H2's signed record with it and reaches H2 (H2's ticket had only private
/// addresses). Returns the nodes and that address.
fn forwarded_h2(
    t: &Topology,
    dir: &Path,
    h1_extra: &str,
) -> anyhow::Result<(Node, Node, Node, String)> {
    let r = node(t, dir, "r", &relay_config())?;
    let h1 = node(t, dir, "h1", &format!("replicas = 2\n{h1_extra}"))?;
    let h2 = node(t, dir, "h2", "max_relays = 0\n")?;
    pair_up(&r, &h1, &h2, false)?;
    let public = obnam_simulations::netns::wan_addr(2);
    let has_public = |v: &Value| {
        v.as_array().is_some_and(|a| {
            a.iter()
                .any(|x| x.as_str().is_some_and(|s| s.contains(&public)))
        })
    };
    wait_until("AutoNAT to confirm H2's forwarded address", LIMIT, || {
        Ok(has_public(&h2.json(&["id"], 0)?["addrs"]))
    })
    .map_err(|e| anyhow::anyhow!("{e}; H2 log: {}", h2.log()))?;
    wait_until("H1 to hold H2's record and reach it", LIMIT, || {
        let list = h1.json(&["peer", "list"], 0)?;
        Ok(peer(&list, &h2.peer_id)
            .is_some_and(|p| p["online"] == true && has_public(&p["record_addrs"])))
    })?;
    Ok((r, h1, h2, public))
}

/// H2 is reachable through a port forward on its router: AutoNAT (R probes it) confirms the
/// forwarded public address, which H2's ticket did not have. H2 signs a new address record and
/// pushes it to its friends; H1 keeps it and reaches H2 there, directly.
#[test]
fn a_confirmed_public_address_reaches_friends_in_a_signed_record() -> TestResult {
    if skip() {
        return Ok(());
    }
    let t = Topology::new(Nat::EndpointIndependent, Some((4411, 4411)))?;
    let dir = crate::util::tempdir("obnam-nat-")?;
    let (_r, h1, h2, _) = forwarded_h2(&t, dir.path(), "")?;
    h1.init("alice")?;
    let src = dir.path().join("src");
    tree(&src, 3);
    let report = h1.backup(&[&src], &[], 0)?;
    assert_eq!(report["replicas"], 2, "{report}");
    let list = h1.json(&["peer", "list"], 0)?;
    let at_h2 = peer(&list, &h2.peer_id).unwrap();
    assert!(
        at_h2["used_by_us"].as_u64().unwrap_or(0) >= 6 << 20,
        "H2 holds H1's packs: {at_h2}"
    );
    Ok(())
}

/// (d): as above, then H2's router gets a new public address (its port forward follows it, the
/// old mappings are gone). H2 notices through AutoNAT, signs a new address record and pushes it
/// to the friends it reaches (R; H1 is behind NAT without a relay, so H2 cannot reach it); H1,
/// which can no longer reach H2 where it was, asks its other friends for H2's newest record and
/// finds H2 again at the new address.
#[test]
fn a_friend_that_changed_its_address_is_found_again() -> TestResult {
    if skip() {
        return Ok(());
    }
    let t = Topology::new(Nat::EndpointIndependent, Some((4411, 4411)))?;
    let dir = crate::util::tempdir("obnam-nat-")?;
    // No relay for H1 either: H2 cannot reach H1, so H1 must ask R where H2 went.
    let (_r, h1, h2, _) = forwarded_h2(&t, dir.path(), "max_relays = 0\n")?;
    h1.init("alice")?;
    let src = dir.path().join("src");
    tree(&src, 3);
    h1.backup(&[&src], &[], 0)?;
    // The ISP gives home 2 a new address.
    let learned = |n: &Node| {
        n.log()
            .matches("learned a friend's new addresses from another friend")
            .count()
    };
    let before = learned(&h1);
    t.renumber_wan(2, 22)?;
    let new = "198.51.100.22";
    wait_until("H1 to find H2 at its new address", LIMIT, || {
        let list = h1.json(&["peer", "list"], 0)?;
        Ok(peer(&list, &h2.peer_id).is_some_and(|p| {
            p["online"] == true && p["path_addr"].as_str().is_some_and(|a| a.contains(new))
        }))
    })
    .map_err(|e| anyhow::anyhow!("{e}; H1 log: {}\nH2 log: {}", h1.log(), h2.log()))?;
    let list = h1.json(&["peer", "list"], 0)?;
    let rec = &peer(&list, &h2.peer_id).unwrap()["record_addrs"];
    assert!(
        rec.as_array().is_some_and(|a| a
            .iter()
            .any(|x| x.as_str().is_some_and(|s| s.contains(new)))),
        "H1 holds H2's new signed record: {rec}"
    );
    assert!(learned(&h1) > before, "H1 asked R for H2's new record");
    // And the exchange goes on there: a new backup reaches both friends.
    std::fs::write(src.join("docs/new.bin"), noise(3 << 20, 9))?;
    let report = h1.backup(&[&src], &[], 0)?;
    assert_eq!(report["replicas"], 2, "{report}");
    let target = dir.path().join("restore");
    h1.json(
        &["restore", "latest", "--target", target.to_str().unwrap()],
        0,
    )?;
    compare_trees(&src, &restored(&target, &src), &[])?;
    Ok(())
}

/// A friend relay serves friends only: a node that R has not befriended is refused a
/// reservation (its ticket never shows a relayed address), and is served once R adds it. On
/// 127.0.0.1, no namespaces: AutoNAT never probes loopback, so the node counts as unreachable
/// and asks for a reservation.
#[test]
fn a_friend_relay_serves_only_friends() -> TestResult {
    let dir = crate::util::tempdir("obnam-relay-")?;
    let mut r = Node::new(
        &bins(),
        "r",
        &dir.path().join("r"),
        &format!("{FAST}relay_server = true\n"),
    )?;
    r.start()?;
    let mut s = Node::new(&bins(), "s", &dir.path().join("s"), FAST)?;
    s.start()?;
    s.add_peer(&r, &[])?;
    wait_until("R to refuse S a reservation", LIMIT, || {
        Ok(s.log().contains("ResourceLimitExceeded"))
    })?;
    assert!(!has_relay_addr(&s)?, "a stranger got a reservation");
    r.add_peer(&s, &[])?;
    wait_until("S to hold a reservation at R", LIMIT, || has_relay_addr(&s))
        .map_err(|e| anyhow::anyhow!("{e}; S log: {}\nR log: {}", s.log(), r.log()))?;
    Ok(())
}
