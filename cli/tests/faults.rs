//! A flaky network (the integrity issue): every byte between two real nodes goes through a
//! fault-injecting TCP proxy that resets, drops and stalls connections at seeded times; backup,
//! replication and restore still complete, with nothing lost.

use crate::util::{TestResult, bins, noise, restored};
use obnam_simulations::proxy::{FaultPlan, FaultyProxy};
use obnam_simulations::{Node, compare_trees, wait_until};
use std::net::SocketAddr;
use std::time::Duration;

/// Nodes that dial friends only at the `peer add` address (the proxy), with short timeouts so
/// that broken transfers are noticed and tried again quickly.
const CONFIG: &str = "learn_addresses = false\nreplication_interval_secs = 1\nrequest_timeout_secs = 10\nstream_idle_secs = 5\nidle_connection_timeout_secs = 30\naudits_per_day = 0\n";

fn socket_addr(n: &Node) -> anyhow::Result<SocketAddr> {
    // "/ip4/127.0.0.1/tcp/PORT"
    let a = n
        .addrs
        .first()
        .ok_or_else(|| anyhow::anyhow!("no address"))?;
    let parts: Vec<&str> = a.split('/').collect();
    Ok(format!("{}:{}", parts[2], parts[4]).parse()?)
}

/// Owner A (`replicas = 1`) and friend B, each reaching the other only through a proxy with its
/// own fault plan; A is initialised.
struct Pair {
    a: Node,
    b: Node,
    to_b: FaultyProxy,
    to_a: FaultyProxy,
}

fn pair(
    dir: &std::path::Path,
    extra: &str,
    to_b: FaultPlan,
    to_a: FaultPlan,
) -> anyhow::Result<Pair> {
    let cfg = format!("{CONFIG}{extra}");
    let mut a = Node::new(
        &bins(),
        "a",
        &dir.join("a"),
        &format!("replicas = 1\n{cfg}"),
    )?;
    let mut b = Node::new(&bins(), "b", &dir.join("b"), &cfg)?;
    a.start()?;
    b.start()?;
    let to_b = FaultyProxy::start(socket_addr(&b)?, to_b)?;
    let to_a = FaultyProxy::start(socket_addr(&a)?, to_a)?;
    for (from, to, via) in [(&a, &b, &to_b), (&b, &a, &to_a)] {
        let addr = via.multiaddr();
        from.json(
            &[
                "peer",
                "add",
                &to.peer_id,
                "--addr",
                &addr,
                "--name",
                &to.name,
            ],
            0,
        )?;
    }
    a.init("alice")?;
    Ok(Pair { a, b, to_b, to_a })
}

#[test]
fn backup_and_restore_complete_through_a_flaky_network() -> TestResult {
    let dir = crate::util::tempdir("obnam-faults-")?;
    let plan = FaultPlan {
        seed: 11,
        every: Duration::from_millis(50)..Duration::from_millis(500),
        stall: Duration::from_millis(200)..Duration::from_millis(1500),
        max_faults: 20,
    };
    let Pair {
        mut a,
        mut b,
        to_b,
        to_a,
    } = pair(dir.path(), "", plan.clone(), FaultPlan { seed: 12, ..plan })?;
    let src = dir.path().join("src");
    std::fs::create_dir_all(src.join("docs"))?;
    for i in 0..3 {
        std::fs::write(src.join(format!("big{i}.bin")), noise(8 << 20, 20 + i))?;
    }
    for i in 0..50 {
        std::fs::write(
            src.join(format!("docs/{i}.txt")),
            format!("note {i}\n").repeat(300),
        )?;
    }
    let run = a.obnam(&[
        "backup",
        src.to_str().unwrap(),
        "--json",
        "--timeout",
        "120s",
    ])?;
    assert!(run.code == 0 || run.code == 4, "{run:?}\n{}", a.log());
    wait_until("B holds everything", Duration::from_secs(180), || {
        let s = a.status()?;
        Ok(s["replicated_to"] == 1 && s["outbox_packs"] == 0)
    })?;
    // Every pack left A's outbox: the restore fetches them all from B, through the proxy.
    let target = dir.path().join("restore");
    let mut restore = None;
    for _ in 0..5 {
        let r = a.obnam(&[
            "restore",
            "latest",
            "--target",
            target.to_str().unwrap(),
            "--force",
            "--json",
        ])?;
        if r.code == 0 {
            restore = Some(r);
            break;
        }
    }
    let restore = restore.ok_or_else(|| anyhow::anyhow!("no restore completed in 5 tries"))?;
    assert_eq!(
        restore.json()?["problems"].as_array().map(Vec::len),
        Some(0)
    );
    compare_trees(&src, &restored(&target, &src), &[])?;
    let (sb, sa) = (to_b.stats(), to_a.stats());
    eprintln!("faults injected: to B {sb:?}, to A {sa:?}");
    assert!(
        sb.faults() + sa.faults() > 0,
        "no fault was injected: {sb:?} {sa:?}"
    );
    b.stop();
    a.stop();
    Ok(())
}

#[test]
fn a_friend_that_stays_connected_and_silent_fails_its_audits() -> TestResult {
    let dir = crate::util::tempdir("obnam-faults-")?;
    // No scheduled faults: the test holds the traffic itself.
    let calm = FaultPlan {
        seed: 1,
        every: Duration::from_secs(3600)..Duration::from_secs(3601),
        stall: Duration::from_millis(1)..Duration::from_millis(2),
        max_faults: 0,
    };
    let Pair {
        mut a,
        mut b,
        to_b,
        to_a,
    } = pair(dir.path(), "audit_deadline_secs = 2\n", calm.clone(), calm)?;
    let src = dir.path().join("src");
    std::fs::create_dir_all(&src)?;
    std::fs::write(src.join("f.bin"), noise(3 << 20, 30))?;
    a.backup(&[&src], &[], 0)?;
    assert_eq!(a.json(&["verify"], 0)?["failed"], 0);
    // B stays connected but answers nothing: past audit_deadline_secs, that is a failure.
    to_b.hold(true);
    to_a.hold(true);
    let run = a.obnam(&["verify", "--json"])?;
    to_b.hold(false);
    to_a.hold(false);
    assert_eq!(run.code, 1, "{run:?}");
    let v = run.json()?;
    assert!(
        v["audits"]
            .as_array()
            .unwrap()
            .iter()
            .any(|x| x["outcome"] == "failed"
                && x["detail"]
                    .as_str()
                    .unwrap_or("")
                    .contains("no answer in time")),
        "{v}"
    );
    b.stop();
    a.stop();
    Ok(())
}
