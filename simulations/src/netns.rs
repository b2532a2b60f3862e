//! Network namespaces for the NAT tests: a small internet made with `ip netns`, veth pairs, a
//! bridge and iptables NAT, all inside namespaces this module creates and deletes again.
//!
//! ```text
//!                      ns "inet": bridge br0, 198.51.100.0/24
//!         ┌────────────────────┼─────────────────────┐
//!  ns "r": 198.51.100.1   ns "nat1": wan .11      ns "nat2": wan .12
//!  (public friend R)       lan 10.0.1.1/24          lan 10.0.2.1/24
//!                             │ MASQUERADE              │ MASQUERADE
//!                          ns "h1": 10.0.1.2        ns "h2": 10.0.2.2
//! ```
//!
//! The routers drop every packet addressed to themselves from the WAN side, as home routers do,
//! so only replies to traffic that left a home get in ([`Nat::EndpointIndependent`]: Linux keeps
//! the source port, so a home has the same public port towards every peer and hole punching
//! works). [`Nat::Symmetric`] uses `MASQUERADE --random-fully`: every connection gets a random
//! public port, so the port a peer saw is useless to another and hole punching fails.
//!
//! Nothing leaves the namespaces: they have no link to the host's network. [`Topology`] deletes
//! them in `Drop`; processes running inside must be killed first (declare the topology before
//! the nodes, so it is dropped after them).

use anyhow::{Context, Result, bail};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};

/// How the two home routers translate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Nat {
    /// Port-preserving MASQUERADE: the same public port towards every peer.
    EndpointIndependent,
    /// `MASQUERADE --random-fully`: a random public port per connection.
    Symmetric,
}

/// The public address of R.
pub const R_ADDR: &str = "198.51.100.1";
/// The public (WAN) address of home `n` (1 or 2) at first.
pub fn wan_addr(home: u8) -> String {
    format!("198.51.100.{}", 10 + home)
}

/// The namespaces of one test. Deleted on drop.
pub struct Topology {
    prefix: String,
    made: Vec<String>,
    forward_h2: Option<(u16, u16)>,
}

/// Why the NAT tests cannot run here, if they cannot: not root, or `ip`/`iptables` missing.
pub fn unavailable() -> Option<String> {
    if !nix::unistd::geteuid().is_root() {
        return Some("not root: network namespaces need CAP_SYS_ADMIN and CAP_NET_ADMIN".into());
    }
    for tool in ["ip", "iptables", "conntrack"] {
        let found = Command::new(tool)
            .arg("-V")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok();
        if !found {
            return Some(format!(
                "`{tool}` is not installed (apt-get install iproute2 iptables conntrack)"
            ));
        }
    }
    None
}

fn run(args: &[&str]) -> Result<()> {
    let out = Command::new(args[0])
        .args(&args[1..])
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {args:?}"))?;
    if !out.status.success() {
        bail!(
            "{args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

static NEXT: AtomicU32 = AtomicU32::new(0);

impl Topology {
    /// Builds R, two homes behind NAT routers of kind `nat`, and the bridge between them.
    /// With `forward_h2`, home 2's router forwards `tcp_port` and `udp_port` to H2 (a port
    /// forward, as a user sets up on a router), so H2 is reachable from outside.
    ///
    /// # Errors
    /// When a command fails (the namespaces made so far are deleted again).
    pub fn new(nat: Nat, forward_h2: Option<(u16, u16)>) -> Result<Self> {
        let prefix = format!(
            "obn{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        let mut t = Self {
            prefix,
            made: Vec::new(),
            forward_h2,
        };
        t.build(nat, forward_h2)?;
        Ok(t)
    }

    /// The name of namespace `role` (`r`, `h1`, `h2`, `nat1`, `nat2`, `inet`).
    pub fn ns(&self, role: &str) -> String {
        format!("{}-{role}", self.prefix)
    }

    fn ip(&self, role: &str, args: &[&str]) -> Result<()> {
        let ns = self.ns(role);
        let mut all = vec!["ip", "-n", ns.as_str()];
        all.extend_from_slice(args);
        run(&all)
    }

    /// Runs a command inside namespace `role`.
    ///
    /// # Errors
    /// When it fails.
    pub fn exec(&self, role: &str, args: &[&str]) -> Result<()> {
        let ns = self.ns(role);
        let mut all = vec!["ip", "netns", "exec", ns.as_str()];
        all.extend_from_slice(args);
        run(&all)
    }

    fn build(&mut self, nat: Nat, forward_h2: Option<(u16, u16)>) -> Result<()> {
        for role in ["inet", "r", "nat1", "nat2", "h1", "h2"] {
            let ns = self.ns(role);
            run(&["ip", "netns", "add", &ns])?;
            self.made.push(ns);
            self.ip(role, &["link", "set", "lo", "up"])?;
        }
        self.ip("inet", &["link", "add", "br0", "type", "bridge"])?;
        self.ip("inet", &["link", "set", "br0", "up"])?;
        // R on the bridge.
        self.veth("r", "eth0", "inet", "r-br")?;
        self.ip("inet", &["link", "set", "r-br", "master", "br0", "up"])?;
        self.ip(
            "r",
            &["addr", "add", &format!("{R_ADDR}/24"), "dev", "eth0"],
        )?;
        self.ip("r", &["link", "set", "eth0", "up"])?;
        for home in [1u8, 2] {
            let router = format!("nat{home}");
            let host = format!("h{home}");
            let br_end = format!("n{home}-br");
            self.veth(&router, "wan", "inet", &br_end)?;
            self.ip("inet", &["link", "set", &br_end, "master", "br0", "up"])?;
            self.ip(
                &router,
                &[
                    "addr",
                    "add",
                    &format!("{}/24", wan_addr(home)),
                    "dev",
                    "wan",
                ],
            )?;
            self.ip(&router, &["link", "set", "wan", "up"])?;
            self.veth(&router, "lan", &host, "eth0")?;
            self.ip(
                &router,
                &["addr", "add", &format!("10.0.{home}.1/24"), "dev", "lan"],
            )?;
            self.ip(&router, &["link", "set", "lan", "up"])?;
            self.ip(
                &host,
                &["addr", "add", &format!("10.0.{home}.2/24"), "dev", "eth0"],
            )?;
            self.ip(&host, &["link", "set", "eth0", "up"])?;
            self.ip(
                &host,
                &["route", "add", "default", "via", &format!("10.0.{home}.1")],
            )?;
            self.exec(&router, &["sysctl", "-qw", "net.ipv4.ip_forward=1"])?;
            let mut masq = vec![
                "iptables",
                "-t",
                "nat",
                "-A",
                "POSTROUTING",
                "-o",
                "wan",
                "-j",
                "MASQUERADE",
            ];
            if nat == Nat::Symmetric {
                masq.push("--random-fully");
            }
            self.exec(&router, &masq)?;
            // A home router: nothing from outside reaches the router itself, and only replies
            // (and forwarded ports) reach the home.
            self.exec(
                &router,
                &["iptables", "-A", "INPUT", "-i", "wan", "-j", "DROP"],
            )?;
            if home == 2
                && let Some(ports) = forward_h2
            {
                self.forward(&wan_addr(2), ports)?;
            }
        }
        Ok(())
    }

    /// Home 2's port forward: `ports` (TCP, UDP) on the router's public address `wan` go to H2.
    fn forward(&self, wan: &str, (tcp, udp): (u16, u16)) -> Result<()> {
        for (proto, port) in [("tcp", tcp), ("udp", udp)] {
            let port = port.to_string();
            let to = format!("10.0.2.2:{port}");
            self.exec(
                "nat2",
                &[
                    "iptables",
                    "-t",
                    "nat",
                    "-A",
                    "PREROUTING",
                    "-i",
                    "wan",
                    "-d",
                    wan,
                    "-p",
                    proto,
                    "--dport",
                    &port,
                    "-j",
                    "DNAT",
                    "--to-destination",
                    &to,
                ],
            )?;
        }
        Ok(())
    }

    fn veth(&self, a: &str, a_name: &str, b: &str, b_name: &str) -> Result<()> {
        let (na, nb) = (self.ns(a), self.ns(b));
        run(&[
            "ip", "link", "add", a_name, "netns", &na, "type", "veth", "peer", "name", b_name,
            "netns", &nb,
        ])
    }

    /// Gives home `home`'s router a new public address (as an ISP does). The WAN link goes down
    /// and up around the change, which drops the router's NAT mappings (MASQUERADE forgets them
    /// when its device goes down), so connections made through the old address are dead, as
    /// they are when an ISP hands the old address to somebody else.
    ///
    /// # Errors
    /// When a command fails.
    pub fn renumber_wan(&self, home: u8, new_last_octet: u8) -> Result<()> {
        let router = format!("nat{home}");
        self.ip(&router, &["link", "set", "wan", "down"])?;
        self.ip(
            &router,
            &[
                "addr",
                "del",
                &format!("{}/24", wan_addr(home)),
                "dev",
                "wan",
            ],
        )?;
        self.ip(
            &router,
            &[
                "addr",
                "add",
                &format!("198.51.100.{new_last_octet}/24"),
                "dev",
                "wan",
            ],
        )?;
        self.ip(&router, &["link", "set", "wan", "up"])?;
        let new = format!("198.51.100.{new_last_octet}");
        // The port forward follows the router's address.
        if home == 2
            && let Some(ports) = self.forward_h2
        {
            self.exec(&router, &["iptables", "-t", "nat", "-F", "PREROUTING"])?;
            self.forward(&new, ports)?;
        }
        // Whatever the kernel kept of the old mappings goes too, as when the router restarts,
        // and the rest of the internet forgets where the old address was.
        self.exec(&router, &["conntrack", "-F"])?;
        for other in ["r", "nat1", "nat2"] {
            self.ip(other, &["neigh", "flush", "all"])?;
        }
        Ok(())
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        for ns in self.made.iter().rev() {
            let _ = run(&["ip", "netns", "del", ns]);
        }
    }
}
