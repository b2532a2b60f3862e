//! A fault-injecting TCP proxy for the flaky-network tests (the integrity issue).
//!
//! [`FaultyProxy::start`] listens on 127.0.0.1 (a free port) and forwards every connection to a
//! target address, with one thread per direction. Each connection gets a schedule from a seeded
//! generator: after a random time it suffers one fault, chosen at random:
//!
//! - **reset**: both sockets are closed with `SO_LINGER` 0, so each peer gets a TCP RST;
//! - **drop**: both sockets are shut down cleanly, in the middle of whatever was in flight;
//! - **stall**: nothing moves for a while (both directions), then forwarding resumes.
//!
//! After a stall the connection gets its next fault later. Once `max_faults` faults have been
//! injected in all, the proxy forwards without faults, so a run always ends. [`FaultyProxy::stats`]
//! counts the faults by kind, the connections and the bytes forwarded.

use anyhow::Result;
use rand::{RngExt, SeedableRng};
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// When faults happen.
#[derive(Debug, Clone)]
pub struct FaultPlan {
    /// Seed of the schedule.
    pub seed: u64,
    /// A connection's next fault comes after a time drawn from this range.
    pub every: std::ops::Range<Duration>,
    /// How long a stall lasts, drawn from this range.
    pub stall: std::ops::Range<Duration>,
    /// Faults in all, after which the proxy behaves.
    pub max_faults: u64,
}

/// What the proxy did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ProxyStats {
    /// Connections accepted.
    pub connections: u64,
    /// Connections reset (RST).
    pub resets: u64,
    /// Connections closed in mid-flight.
    pub drops: u64,
    /// Stalls.
    pub stalls: u64,
    /// Bytes forwarded, both directions.
    pub bytes: u64,
}

impl ProxyStats {
    /// Faults injected in all.
    pub fn faults(&self) -> u64 {
        self.resets + self.drops + self.stalls
    }
}

#[derive(Default)]
struct Counters {
    /// Set by [`FaultyProxy::hold`]: nothing moves on any connection.
    held: AtomicBool,
    connections: AtomicU64,
    resets: AtomicU64,
    drops: AtomicU64,
    stalls: AtomicU64,
    bytes: AtomicU64,
}

/// A running proxy; stops (and closes its listener) on drop.
pub struct FaultyProxy {
    /// Where it listens.
    pub addr: SocketAddr,
    counters: Arc<Counters>,
    stop: Arc<AtomicBool>,
}

impl FaultyProxy {
    /// Starts a proxy to `target`.
    ///
    /// # Errors
    /// When it cannot listen.
    pub fn start(target: SocketAddr, plan: FaultPlan) -> Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let counters = Arc::new(Counters::default());
        let stop = Arc::new(AtomicBool::new(false));
        let (c, s) = (Arc::clone(&counters), Arc::clone(&stop));
        std::thread::spawn(move || accept_loop(listener, target, plan, c, s));
        Ok(Self {
            addr,
            counters,
            stop,
        })
    }

    /// The libp2p address of the proxy.
    pub fn multiaddr(&self) -> String {
        format!("/ip4/{}/tcp/{}", self.addr.ip(), self.addr.port())
    }

    /// Holds every byte (a friend that stays connected and says nothing) until released.
    pub fn hold(&self, on: bool) {
        self.counters.held.store(on, Ordering::Relaxed);
    }

    /// What it did so far.
    pub fn stats(&self) -> ProxyStats {
        let c = &self.counters;
        ProxyStats {
            connections: c.connections.load(Ordering::Relaxed),
            resets: c.resets.load(Ordering::Relaxed),
            drops: c.drops.load(Ordering::Relaxed),
            stalls: c.stalls.load(Ordering::Relaxed),
            bytes: c.bytes.load(Ordering::Relaxed),
        }
    }
}

impl Drop for FaultyProxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

fn accept_loop(
    listener: TcpListener,
    target: SocketAddr,
    plan: FaultPlan,
    counters: Arc<Counters>,
    stop: Arc<AtomicBool>,
) {
    let mut n = 0u64;
    while !stop.load(Ordering::Relaxed) {
        match listener.accept() {
            Ok((client, _)) => {
                n += 1;
                counters.connections.fetch_add(1, Ordering::Relaxed);
                let Ok(server) = TcpStream::connect_timeout(&target, Duration::from_secs(5)) else {
                    continue;
                };
                let (plan, counters, stop) =
                    (plan.clone(), Arc::clone(&counters), Arc::clone(&stop));
                std::thread::spawn(move || connection(client, server, n, plan, counters, stop));
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(_) => std::thread::sleep(Duration::from_millis(10)),
        }
    }
}

/// Forwards one direction until either side closes, or `closed` is set.
fn pump(
    mut from: TcpStream,
    mut to: TcpStream,
    paused: Arc<AtomicBool>,
    closed: Arc<AtomicBool>,
    counters: Arc<Counters>,
) {
    let _ = from.set_read_timeout(Some(Duration::from_millis(50)));
    let mut buf = vec![0u8; 64 * 1024];
    while !closed.load(Ordering::Relaxed) {
        if paused.load(Ordering::Relaxed) || counters.held.load(Ordering::Relaxed) {
            std::thread::sleep(Duration::from_millis(20));
            continue;
        }
        match from.read(&mut buf) {
            Ok(0) => break,
            Ok(k) => {
                if to.write_all(&buf[..k]).is_err() {
                    break;
                }
                counters.bytes.fetch_add(k as u64, Ordering::Relaxed);
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(_) => break,
        }
    }
    // A close that came from either end is passed on; a fault closes the sockets itself (a reset
    // must not send a FIN first).
    if !closed.swap(true, Ordering::Relaxed) {
        let _ = to.shutdown(Shutdown::Both);
        let _ = from.shutdown(Shutdown::Both);
    }
}

fn reset(s: &TcpStream) {
    let _ = nix::sys::socket::setsockopt(
        &s.as_fd(),
        nix::sys::socket::sockopt::Linger,
        &nix::libc::linger {
            l_onoff: 1,
            l_linger: 0,
        },
    );
}

/// The kinds of fault.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fault {
    Reset,
    Drop,
    Stall,
}

/// The schedule of the `n`-th connection.
fn schedule(seed: u64, n: u64) -> rand::rngs::StdRng {
    rand::rngs::StdRng::seed_from_u64(seed ^ n.wrapping_mul(0x9E37_79B9_7F4A_7C15))
}

/// When the next fault comes, and which.
fn next_fault(rng: &mut rand::rngs::StdRng, plan: &FaultPlan) -> (Duration, Fault) {
    let wait = rng.random_range(plan.every.clone());
    let kind = match rng.random_range(0..3u8) {
        0 => Fault::Reset,
        1 => Fault::Drop,
        _ => Fault::Stall,
    };
    (wait, kind)
}

fn connection(
    client: TcpStream,
    server: TcpStream,
    n: u64,
    plan: FaultPlan,
    counters: Arc<Counters>,
    stop: Arc<AtomicBool>,
) {
    let paused = Arc::new(AtomicBool::new(false));
    let closed = Arc::new(AtomicBool::new(false));
    let clones = (|| {
        Some([
            (client.try_clone().ok()?, server.try_clone().ok()?),
            (server.try_clone().ok()?, client.try_clone().ok()?),
        ])
    })();
    let Some(directions) = clones else {
        return;
    };
    for (from, to) in directions {
        let (p, c, k) = (
            Arc::clone(&paused),
            Arc::clone(&closed),
            Arc::clone(&counters),
        );
        std::thread::spawn(move || pump(from, to, p, c, k));
    }
    let mut rng = schedule(plan.seed, n);
    loop {
        let (wait, kind) = next_fault(&mut rng, &plan);
        let until = Instant::now() + wait;
        while Instant::now() < until {
            if closed.load(Ordering::Relaxed) || stop.load(Ordering::Relaxed) {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let total = counters.resets.load(Ordering::Relaxed)
            + counters.drops.load(Ordering::Relaxed)
            + counters.stalls.load(Ordering::Relaxed);
        if total >= plan.max_faults {
            return;
        }
        match kind {
            Fault::Reset => {
                // The pumps stop within 50 ms and drop their handles; the last close sends RST.
                counters.resets.fetch_add(1, Ordering::Relaxed);
                reset(&client);
                reset(&server);
                closed.store(true, Ordering::Relaxed);
                return;
            }
            Fault::Drop => {
                counters.drops.fetch_add(1, Ordering::Relaxed);
                closed.store(true, Ordering::Relaxed);
                let _ = client.shutdown(Shutdown::Both);
                let _ = server.shutdown(Shutdown::Both);
                return;
            }
            Fault::Stall => {
                counters.stalls.fetch_add(1, Ordering::Relaxed);
                paused.store(true, Ordering::Relaxed);
                std::thread::sleep(rng.random_range(plan.stall.clone()));
                paused.store(false, Ordering::Relaxed);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedules_are_seeded_and_use_every_kind() {
        let plan = FaultPlan {
            seed: 11,
            every: Duration::from_millis(50)..Duration::from_millis(500),
            stall: Duration::from_millis(1)..Duration::from_millis(2),
            max_faults: 1,
        };
        let first: Vec<Fault> = (1..=30)
            .map(|n| next_fault(&mut schedule(plan.seed, n), &plan).1)
            .collect();
        for kind in [Fault::Reset, Fault::Drop, Fault::Stall] {
            assert!(first.contains(&kind), "{first:?}");
        }
        let again: Vec<Fault> = (1..=30)
            .map(|n| next_fault(&mut schedule(plan.seed, n), &plan).1)
            .collect();
        assert_eq!(first, again);
    }

    #[test]
    fn a_proxy_forwards_and_counts() {
        let echo = TcpListener::bind("127.0.0.1:0").unwrap();
        let target = echo.local_addr().unwrap();
        std::thread::spawn(move || {
            if let Ok((mut s, _)) = echo.accept() {
                let mut buf = [0u8; 5];
                s.read_exact(&mut buf).unwrap();
                s.write_all(&buf).unwrap();
            }
        });
        let plan = FaultPlan {
            seed: 1,
            every: Duration::from_secs(60)..Duration::from_secs(61),
            stall: Duration::from_millis(1)..Duration::from_millis(2),
            max_faults: 0,
        };
        let proxy = FaultyProxy::start(target, plan).unwrap();
        let mut c = TcpStream::connect(proxy.addr).unwrap();
        c.write_all(b"hello").unwrap();
        let mut back = [0u8; 5];
        c.read_exact(&mut back).unwrap();
        assert_eq!(&back, b"hello");
        // The proxy counts a write after it is made: the echo can arrive first.
        let until = std::time::Instant::now() + Duration::from_secs(5);
        while proxy.stats().bytes < 10 && std::time::Instant::now() < until {
            std::thread::sleep(Duration::from_millis(10));
        }
        let s = proxy.stats();
        assert_eq!((s.connections, s.bytes, s.faults()), (1, 10, 0));
    }
}
