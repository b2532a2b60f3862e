//! The churn simulator: owners and friends over simulated years, driving the node's own
//! placement ([`choose_replica_set`]), repair trigger ([`is_lost`]: a friend unseen for longer
//! than `lost_after` no longer counts, and its share is sent elsewhere) and audit schedule
//! ([`audit_interval`]: how soon a silently lost copy is found).
//!
//! Time advances in steps of one hour, the period of the policy (the node's replication round is
//! far shorter, but nothing here changes faster than an hour). Each node's availability is a
//! trace of events:
//! - **two classes**: a share `share_on` of nodes is always on (short outages, online about 99%
//!   of the time); the rest are laptops, online in a daily window of 4 to 12 hours that starts at
//!   a time of their own, with an hour of jitter, and sometimes away for 1 to 21 days;
//! - **correlated groups**: nodes live in households of two, households in cities of 50 nodes. A
//!   household outage (power, internet) or a city outage takes all of its nodes offline at once;
//!   a household disaster (fire, theft) destroys both nodes for good;
//! - **permanent loss**: a node dies (disk death, its user quits) at `death_per_year`. Its copies
//!   are gone; it comes back as a new, empty machine. As an owner it recovers its data from its
//!   friends (or finds it unrecoverable when none holds a copy); the friends who had it lost a
//!   friend and, after `replace_friend_days` without seeing it, add a new one;
//! - **silent loss**: a friend loses a copy without a word (`silent_loss_per_year` per copy);
//!   the owner finds out at the first audit that reaches the friend while both are online;
//! - **bandwidth**: a repair sends the owner's data from the owner (which holds it) at its
//!   uplink speed, only while owner and friend are both online, and within its monthly cap.
//!
//! An owner that is online runs the policy every hour: it notes which friends it sees,
//! counts as eligible every friend not lost by [`is_lost`], asks [`choose_replica_set`] for the
//! replica set and sends its data to each member that does not hold it. With **reintegration**
//! (the node's behaviour), a friend that comes back after being counted lost still holds its
//! copy, and the copy counts again. Without, the owner forgets the copy when it declares the
//! friend lost, so a friend that comes back has to be sent everything again.
//!
//! The **oracle** knows which failures are permanent: a friend is eligible until it has died,
//! however long it is away, so it repairs only permanent losses (and silent ones, once audited).
//! Its repair traffic is the floor that the overhead of a policy is measured against, as in
//! Carbonite (Chun et al., NSDI 2006).

use obnam_node::audit::audit_interval;
use obnam_node::replication::{Candidate, choose_replica_set, is_lost};
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};

/// Nanoseconds per hour, for the node's functions.
const HOUR_NS: i64 = 3_600_000_000_000;
/// Nodes per household and per city.
const HOUSEHOLD: usize = 2;
const CITY: usize = 50;

/// Which repair policy runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Policy {
    /// The node's: `lost_after`, with or without reintegration of returning friends.
    Node {
        /// Whether a returning friend's copy counts again.
        reintegrate: bool,
    },
    /// Repairs permanent losses only (knows which friends died).
    Oracle,
}

/// A run's settings.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Nodes (each is an owner and a friend).
    pub nodes: usize,
    /// Friends per owner.
    pub friends: usize,
    /// Replicas per owner.
    pub replicas: usize,
    /// Simulated years.
    pub years: f64,
    /// Seed.
    pub seed: u64,
    /// Share of always-on nodes.
    pub share_on: f64,
    /// Each owner's backup, in GB.
    pub data_gb: f64,
    /// Upload speed, in Mbit/s.
    pub uplink_mbps: f64,
    /// Upload cap per 30 days, in GB (`f64::INFINITY`: none).
    pub monthly_cap_gb: f64,
    /// Permanent losses per node per year.
    pub death_per_year: f64,
    /// Household disasters (both nodes lost) per household per year.
    pub disaster_per_year: f64,
    /// Household outages per household per year, and their mean length in hours.
    pub outage_per_year: f64,
    /// Mean household outage, hours.
    pub outage_hours: f64,
    /// City outages per city per year (12 hours on average).
    pub city_outage_per_year: f64,
    /// Times a laptop is away for days, per year.
    pub away_per_year: f64,
    /// Silent losses per copy per year.
    pub silent_loss_per_year: f64,
    /// Audits per friend per day.
    pub audits_per_day: u32,
    /// The node's `lost_after`, seconds.
    pub lost_after_secs: u64,
    /// Days a dead friend goes unseen before its owner adds another friend.
    pub replace_friend_days: f64,
    /// The repair policy.
    pub policy: Policy,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            nodes: 200,
            friends: 5,
            replicas: 3,
            years: 2.0,
            seed: 1,
            share_on: 0.3,
            data_gb: 100.0,
            uplink_mbps: 20.0,
            monthly_cap_gb: f64::INFINITY,
            death_per_year: 0.1,
            disaster_per_year: 0.002,
            outage_per_year: 4.0,
            outage_hours: 6.0,
            city_outage_per_year: 1.0,
            away_per_year: 3.0,
            silent_loss_per_year: 0.02,
            audits_per_day: 16,
            lost_after_secs: 14 * 86_400,
            replace_friend_days: 30.0,
            policy: Policy::Node { reintegrate: true },
        }
    }
}

/// What a run measured.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Outcome {
    /// Repair traffic per node per year, GB (uploads after the start, recoveries excluded).
    pub repair_gb_per_node_year: f64,
    /// Repairs started in all (a friend newly given a copy to hold).
    pub repairs: u64,
    /// Of them, repairs that no permanent loss explains (no friend died, no audit found a
    /// loss): they make up for a friend that was only away.
    pub transient_repairs: u64,
    /// Share of owner-hours with fewer than `replicas` live, complete copies on friends.
    pub under_replicated: f64,
    /// Share of owner-hours with no live, complete copy on any friend.
    pub no_copy: f64,
    /// Owners whose machine died while no friend held a complete copy: data lost.
    pub unrecoverable: u64,
    /// Owner machine deaths in all.
    pub owner_deaths: u64,
    /// Mean availability of the nodes, measured.
    pub availability: f64,
    /// Mean complete copies of an owner's data on live friends (the storage it takes at its
    /// friends, in backups): above `replicas` when friends that were counted lost came back.
    pub copies: f64,
}

#[derive(Debug, Clone)]
struct FriendEntry {
    node: usize,
    /// The node's generation when it was added: a dead node comes back as a new one.
    gen_: u32,
    added_h: u64,
    last_seen_h: u64,
    /// Bytes of the owner's data it holds (`data` when complete).
    held: f64,
    /// It lost its copy silently: the owner still believes `held`.
    silently_lost: bool,
    /// When the next audit may find the silent loss.
    next_audit_h: f64,
    /// Whether the owner counted it as lost (for the reintegration rule and the statistics).
    declared_lost: bool,
    /// Whether a repair to it has started (and was counted).
    sending: bool,
    /// An audit found its copy gone (the repair it needs is explained by a real loss).
    audit_found: bool,
}

#[derive(Debug, Clone)]
struct Node {
    gen_: u32,
    always_on: bool,
    online_base: bool,
    next_change_h: f64,
    /// Laptops: start of the daily window (hours) and its length.
    window_start: f64,
    window_len: f64,
    away_until_h: f64,
    forced_off_until_h: f64,
    friends: Vec<FriendEntry>,
    uploaded_month_gb: f64,
}

struct Sim<'a> {
    s: &'a Settings,
    rng: StdRng,
    nodes: Vec<Node>,
    data_bytes: f64,
    bytes_per_hour: f64,
    cap_bytes: f64,
}

fn exp(rng: &mut StdRng, mean: f64) -> f64 {
    -mean * (1.0 - rng.random::<f64>()).ln()
}

impl Sim<'_> {
    fn online(&self, i: usize, now: f64) -> bool {
        let n = &self.nodes[i];
        n.online_base && now >= n.away_until_h && now >= n.forced_off_until_h
    }

    /// The next base availability change of node `i` after `now`.
    fn schedule(&mut self, i: usize, now: f64) {
        let n = &mut self.nodes[i];
        if n.always_on {
            // About 99% online: outages of 2 hours on average every 200 hours.
            let mean = if n.online_base { 198.0 } else { 2.0 };
            n.next_change_h = now + exp(&mut self.rng, mean).max(0.01);
        } else if n.online_base {
            n.next_change_h = now + (n.window_len + self.rng.random_range(-1.0..1.0)).max(1.0);
        } else {
            let day = (now / 24.0).floor();
            let mut start = day * 24.0 + n.window_start + self.rng.random_range(-1.0..1.0);
            while start <= now {
                start += 24.0;
            }
            n.next_change_h = start;
        }
    }

    /// Applies node `i`'s availability changes up to the end of hour `now`, and maybe starts an
    /// absence of a laptop.
    fn advance(&mut self, i: usize, now: f64) {
        while self.nodes[i].next_change_h <= now + 1.0 {
            let t = self.nodes[i].next_change_h;
            self.nodes[i].online_base = !self.nodes[i].online_base;
            self.schedule(i, t);
        }
        if !self.nodes[i].always_on && self.rng.random::<f64>() < self.s.away_per_year / 8766.0 {
            self.nodes[i].away_until_h = now + self.rng.random_range(24.0..21.0 * 24.0);
        }
    }

    fn new_node(rng: &mut StdRng, s: &Settings, now: f64) -> Node {
        let always_on = rng.random::<f64>() < s.share_on;
        Node {
            gen_: 0,
            always_on,
            online_base: always_on,
            next_change_h: now,
            window_start: rng.random_range(6.0..14.0),
            window_len: rng.random_range(4.0..12.0),
            away_until_h: 0.0,
            forced_off_until_h: 0.0,
            friends: Vec::new(),
            uploaded_month_gb: 0.0,
        }
    }

    /// A friend for `owner`: a random node of another household, not already a friend.
    fn pick_friend(&mut self, owner: usize, now_h: u64) -> Option<FriendEntry> {
        for _ in 0..1000 {
            let f = self.rng.random_range(0..self.nodes.len());
            let taken = self.nodes[owner]
                .friends
                .iter()
                .any(|e| e.node == f && e.gen_ == self.nodes[f].gen_);
            if f / HOUSEHOLD != owner / HOUSEHOLD && !taken {
                return Some(FriendEntry {
                    node: f,
                    gen_: self.nodes[f].gen_,
                    added_h: now_h,
                    last_seen_h: now_h,
                    held: 0.0,
                    silently_lost: false,
                    next_audit_h: 0.0,
                    declared_lost: false,
                    sending: false,
                    audit_found: false,
                });
            }
        }
        None
    }

    /// Node `i` dies: its copies are gone, and it comes back empty, as a new generation.
    fn kill(&mut self, i: usize, now: f64, out: &mut Outcome) {
        out.owner_deaths += 1;
        let live = self.live_copies(i);
        if live == 0 {
            out.unrecoverable += 1;
            // The owner starts over: a new first backup to its replica set (not repair).
            for e in &mut self.nodes[i].friends {
                e.held = 0.0;
                e.sending = false;
            }
        }
        self.nodes[i].gen_ += 1;
        self.nodes[i].online_base = true;
        self.nodes[i].away_until_h = 0.0;
        self.schedule(i, now);
    }

    /// Complete copies of `owner`'s data on friends that are alive, whatever the owner believes.
    fn live_copies(&self, owner: usize) -> usize {
        self.nodes[owner]
            .friends
            .iter()
            .filter(|e| {
                e.gen_ == self.nodes[e.node].gen_ && !e.silently_lost && e.held >= self.data_bytes
            })
            .count()
    }
}

/// One policy round of online owner `i` at hour `h`, as the node runs it; returns the bytes
/// sent.
#[allow(clippy::too_many_arguments)]
fn policy_round(
    sim: &mut Sim<'_>,
    i: usize,
    h: u64,
    online: &[bool],
    gens: &[u32],
    ids: &[[u8; 8]],
    households: &[String],
    out: &mut Outcome,
) -> f64 {
    let s = sim.s;
    let data = sim.data_bytes;
    let now = h as f64;
    let audit_every_h = audit_interval(s.audits_per_day).as_secs_f64() / 3600.0;
    let to_ns = |hours: u64| {
        i64::try_from(hours)
            .unwrap_or(i64::MAX)
            .saturating_mul(HOUR_NS)
    };
    let node = &mut sim.nodes[i];
    for e in &mut node.friends {
        let seen = e.gen_ == gens[e.node] && online[e.node];
        if seen {
            e.last_seen_h = h;
            e.declared_lost = false;
        }
        if e.silently_lost && now >= e.next_audit_h {
            if seen {
                // The audit finds the loss: the copy no longer counts, and is sent again.
                e.silently_lost = false;
                e.held = 0.0;
                e.sending = false;
                e.audit_found = true;
            } else {
                e.next_audit_h = now + audit_every_h;
            }
        }
    }
    let eligible: Vec<bool> = node
        .friends
        .iter()
        .map(|e| match s.policy {
            Policy::Oracle => e.gen_ == gens[e.node],
            Policy::Node { .. } => !is_lost(to_ns(h), to_ns(e.last_seen_h), s.lost_after_secs),
        })
        .collect();
    for (e, ok) in node.friends.iter_mut().zip(&eligible) {
        if !ok && !e.declared_lost {
            e.declared_lost = true;
            if s.policy == (Policy::Node { reintegrate: false }) {
                // The owner forgets the copy: a return means sending everything again.
                e.held = 0.0;
                e.sending = false;
            }
        }
    }
    let set = {
        let candidates: Vec<Candidate<'_>> = node
            .friends
            .iter()
            .zip(&eligible)
            .map(|(e, ok)| Candidate {
                added_ns: to_ns(e.added_h),
                id: &ids[e.node],
                household: &households[e.node],
                eligible: *ok,
            })
            .collect();
        choose_replica_set(&candidates, s.replicas)
    };
    let mut sent = 0.0;
    for k in set {
        let e = &node.friends[k];
        if e.silently_lost || e.held >= data {
            continue;
        }
        if !e.sending {
            // A repair is explained by a permanent loss when the copy it makes up for is gone:
            // found by an audit here, or held by a friend that died (each such copy explains
            // one repair).
            let explained = if e.audit_found {
                true
            } else if let Some(x) = node
                .friends
                .iter_mut()
                .find(|x| x.gen_ != gens[x.node] && x.held >= data)
            {
                x.held = 0.0;
                true
            } else {
                false
            };
            let e = &mut node.friends[k];
            e.sending = true;
            e.audit_found = false;
            out.repairs += 1;
            out.transient_repairs += u64::from(!explained);
        }
        let e = &mut node.friends[k];
        let room = (sim.cap_bytes - node.uploaded_month_gb * 1e9).max(0.0);
        if !online[e.node] || room <= 0.0 {
            continue;
        }
        let step = sim.bytes_per_hour.min(data - e.held).min(room);
        e.held += step;
        node.uploaded_month_gb += step / 1e9;
        sent += step;
    }
    sent
}

/// Runs one simulation.
pub fn run(s: &Settings) -> Outcome {
    let mut rng = StdRng::seed_from_u64(s.seed);
    let nodes = (0..s.nodes)
        .map(|_| Sim::new_node(&mut rng, s, 0.0))
        .collect();
    let data_bytes = s.data_gb * 1e9;
    let mut sim = Sim {
        s,
        rng,
        nodes,
        data_bytes,
        bytes_per_hour: s.uplink_mbps * 1e6 / 8.0 * 3600.0,
        cap_bytes: s.monthly_cap_gb * 1e9,
    };
    let mut out = Outcome::default();
    for i in 0..s.nodes {
        sim.schedule(i, 0.0);
        for _ in 0..s.friends.min(s.nodes.saturating_sub(HOUSEHOLD)) {
            if let Some(e) = sim.pick_friend(i, 0) {
                sim.nodes[i].friends.push(e);
            }
        }
        // At the start every owner's replica set, as the node picks it, holds everything.
        let set = {
            let ids: Vec<[u8; 8]> = sim.nodes[i]
                .friends
                .iter()
                .map(|e| (e.node as u64).to_le_bytes())
                .collect();
            let households: Vec<String> = sim.nodes[i]
                .friends
                .iter()
                .map(|e| (e.node / HOUSEHOLD).to_string())
                .collect();
            let candidates: Vec<Candidate<'_>> = (0..ids.len())
                .map(|k| Candidate {
                    added_ns: 0,
                    id: &ids[k],
                    household: &households[k],
                    eligible: true,
                })
                .collect();
            choose_replica_set(&candidates, s.replicas)
        };
        for k in set {
            sim.nodes[i].friends[k].held = data_bytes;
        }
    }
    let hours = (s.years * 8766.0).ceil() as u64;
    let per_hour = |per_year: f64| per_year / 8766.0;
    let audit_every_h = audit_interval(s.audits_per_day).as_secs_f64() / 3600.0;
    let ids: Vec<[u8; 8]> = (0..s.nodes as u64).map(u64::to_le_bytes).collect();
    let households: Vec<String> = (0..s.nodes).map(|i| (i / HOUSEHOLD).to_string()).collect();
    let mut repair_bytes = 0.0;
    let (mut under, mut none, mut online_hours, mut copies) = (0u64, 0u64, 0u64, 0u64);
    for h in 0..hours {
        let now = h as f64;
        if h % 720 == 0 {
            for n in &mut sim.nodes {
                n.uploaded_month_gb = 0.0;
            }
        }
        // Availability events.
        for i in 0..s.nodes {
            sim.advance(i, now);
            if sim.rng.random::<f64>() < per_hour(s.death_per_year) {
                sim.kill(i, now, &mut out);
            }
        }
        for hh in 0..s.nodes.div_ceil(HOUSEHOLD) {
            let members = hh * HOUSEHOLD..((hh + 1) * HOUSEHOLD).min(s.nodes);
            if sim.rng.random::<f64>() < per_hour(s.outage_per_year) {
                let until = now + exp(&mut sim.rng, s.outage_hours);
                for i in members.clone() {
                    sim.nodes[i].forced_off_until_h = sim.nodes[i].forced_off_until_h.max(until);
                }
            }
            if sim.rng.random::<f64>() < per_hour(s.disaster_per_year) {
                for i in members {
                    sim.kill(i, now, &mut out);
                }
            }
        }
        for c in 0..s.nodes.div_ceil(CITY) {
            if sim.rng.random::<f64>() < per_hour(s.city_outage_per_year) {
                let until = now + exp(&mut sim.rng, 12.0);
                for i in c * CITY..((c + 1) * CITY).min(s.nodes) {
                    sim.nodes[i].forced_off_until_h = sim.nodes[i].forced_off_until_h.max(until);
                }
            }
        }
        let online: Vec<bool> = (0..s.nodes).map(|i| sim.online(i, now)).collect();
        online_hours += online.iter().filter(|o| **o).count() as u64;
        // Silent losses.
        for i in 0..s.nodes {
            for k in 0..sim.nodes[i].friends.len() {
                let e = &sim.nodes[i].friends[k];
                if e.held >= data_bytes
                    && !e.silently_lost
                    && sim.rng.random::<f64>() < per_hour(s.silent_loss_per_year)
                {
                    // The next audit of this friend comes at a random point of the interval.
                    let wait = audit_every_h * sim.rng.random::<f64>();
                    let e = &mut sim.nodes[i].friends[k];
                    e.silently_lost = true;
                    e.next_audit_h = now + wait;
                }
            }
        }
        // Each online owner's policy round.
        let gens: Vec<u32> = sim.nodes.iter().map(|n| n.gen_).collect();
        for i in 0..s.nodes {
            let live = sim.live_copies(i);
            copies += live as u64;
            under += u64::from(live < s.replicas);
            none += u64::from(live == 0);
            // A dead friend, unseen for long, is replaced by its owner.
            for k in 0..sim.nodes[i].friends.len() {
                let e = &sim.nodes[i].friends[k];
                let dead = e.gen_ != gens[e.node];
                if dead
                    && (h - e.last_seen_h) as f64 > s.replace_friend_days * 24.0
                    && let Some(new) = sim.pick_friend(i, h)
                {
                    sim.nodes[i].friends[k] = new;
                }
            }
            if online[i] {
                repair_bytes +=
                    policy_round(&mut sim, i, h, &online, &gens, &ids, &households, &mut out);
            }
        }
    }
    let node_years = s.nodes as f64 * s.years;
    let owner_hours = (s.nodes as u64 * hours).max(1) as f64;
    out.repair_gb_per_node_year = repair_bytes / 1e9 / node_years;
    out.under_replicated = under as f64 / owner_hours;
    out.no_copy = none as f64 / owner_hours;
    out.availability = online_hours as f64 / owner_hours;
    out.copies = copies as f64 / owner_hours;
    out
}

/// S7's settings for one row: how long a restore of everything takes after a disaster.
#[derive(Debug, Clone)]
pub struct RestoreSettings {
    /// The backup, GB.
    pub data_gb: f64,
    /// Share of friends reachable only through a relay.
    pub relay_share: f64,
    /// Throughput of a relayed connection, Mbit/s.
    pub relay_mbps: f64,
    /// The owner's download speed, Mbit/s.
    pub downlink_mbps: f64,
    /// Restores simulated.
    pub trials: usize,
}

/// Days each simulated restore took (at most 365), sorted. The owner's new machine is always
/// online; the `replicas` friends holding the data follow the availability model of
/// `s` (classes, daily windows, absences, household and city outages). The restore fetches from
/// every online friend at once, each at its uplink speed (or the relay's, for a relayed friend),
/// within the owner's downlink. Each trial starts at a random hour of a random week.
pub fn restore_days(s: &Settings, r: &RestoreSettings) -> Vec<f64> {
    let mut rng = StdRng::seed_from_u64(s.seed ^ 0x5eed_0007);
    let mut out = Vec::with_capacity(r.trials);
    let holders = s.replicas.max(1);
    for _ in 0..r.trials {
        // Friends in distinct households, as the placement puts them: every other node.
        let nodes: Vec<Node> = (0..holders * HOUSEHOLD)
            .map(|_| Sim::new_node(&mut rng, s, 0.0))
            .collect();
        let relayed: Vec<bool> = (0..holders)
            .map(|_| rng.random::<f64>() < r.relay_share)
            .collect();
        let mut sim = Sim {
            s,
            rng: StdRng::seed_from_u64(rng.random()),
            nodes,
            data_bytes: r.data_gb * 1e9,
            bytes_per_hour: s.uplink_mbps * 1e6 / 8.0 * 3600.0,
            cap_bytes: f64::INFINITY,
        };
        let start = f64::from(rng.random_range(0..168u32));
        for i in 0..sim.nodes.len() {
            // A random phase: the trace runs from the start of its week.
            sim.nodes[i].online_base = sim.nodes[i].always_on;
            sim.schedule(i, 0.0);
        }
        let per_hour = |per_year: f64| per_year / 8766.0;
        let mut got = 0.0;
        let mut hours = 0.0;
        let limit = 365.0 * 24.0;
        let mut h = 0.0;
        while got < sim.data_bytes && hours < limit {
            for i in 0..sim.nodes.len() {
                sim.advance(i, h);
            }
            if sim.rng.random::<f64>() < per_hour(s.outage_per_year) {
                let hh = sim.rng.random_range(0..holders);
                let until = h + exp(&mut sim.rng, s.outage_hours);
                for i in hh * HOUSEHOLD..(hh + 1) * HOUSEHOLD {
                    sim.nodes[i].forced_off_until_h = until;
                }
            }
            if h >= start {
                let mut rate = 0.0;
                for (k, relay) in relayed.iter().enumerate() {
                    if sim.online(k * HOUSEHOLD, h) {
                        let mbps = if *relay {
                            r.relay_mbps.min(s.uplink_mbps)
                        } else {
                            s.uplink_mbps
                        };
                        rate += mbps;
                    }
                }
                got += rate.min(r.downlink_mbps) * 1e6 / 8.0 * 3600.0;
                hours += 1.0;
            }
            h += 1.0;
        }
        out.push(hours / 24.0);
    }
    out.sort_by(f64::total_cmp);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn small() -> Settings {
        Settings {
            nodes: 60,
            years: 0.5,
            ..Settings::default()
        }
    }

    #[test]
    fn runs_are_seeded() {
        assert_eq!(run(&small()), run(&small()));
    }

    #[test]
    fn the_oracle_repairs_least_and_no_reintegration_most() {
        let s = small();
        let oracle = run(&Settings {
            policy: Policy::Oracle,
            ..s.clone()
        });
        let hasty = run(&Settings {
            lost_after_secs: 3600,
            policy: Policy::Node { reintegrate: false },
            ..s.clone()
        });
        let node = run(&s);
        assert!(oracle.repair_gb_per_node_year > 0.0, "{oracle:?}");
        assert!(
            oracle.repair_gb_per_node_year <= node.repair_gb_per_node_year * 1.05,
            "{oracle:?} {node:?}"
        );
        assert!(
            hasty.repair_gb_per_node_year > 2.0 * node.repair_gb_per_node_year,
            "{hasty:?} {node:?}"
        );
        assert!(
            hasty.transient_repairs > node.transient_repairs,
            "{hasty:?} {node:?}"
        );
        assert!((0.4..0.9).contains(&node.availability), "{node:?}");
    }

    #[test]
    fn restores_take_longer_with_more_data_and_relays() {
        let s = Settings::default();
        let row = |gb: f64, relay: f64| RestoreSettings {
            data_gb: gb,
            relay_share: relay,
            relay_mbps: 2.0,
            downlink_mbps: 100.0,
            trials: 40,
        };
        let small = restore_days(&s, &row(100.0, 0.0));
        let big = restore_days(&s, &row(1000.0, 0.0));
        let relayed = restore_days(&s, &row(1000.0, 1.0));
        let median = |v: &[f64]| v[v.len() / 2];
        assert_eq!(small.len(), 40);
        assert!(median(&small) < median(&big), "{small:?} {big:?}");
        assert!(median(&big) < median(&relayed), "{big:?} {relayed:?}");
        // Three friends at 20 Mbit/s move 100 GB in about 4.6 hours of joint uptime.
        assert!(
            small[0] >= 100e9 / (3.0 * 20e6 / 8.0) / 86_400.0 * 0.99,
            "{small:?}"
        );
    }

    #[test]
    fn without_churn_nothing_is_repaired_and_nothing_is_under_replicated() {
        let calm = run(&Settings {
            death_per_year: 0.0,
            disaster_per_year: 0.0,
            silent_loss_per_year: 0.0,
            share_on: 1.0,
            outage_per_year: 0.0,
            city_outage_per_year: 0.0,
            ..small()
        });
        assert_eq!(calm.repairs, 0, "{calm:?}");
        assert_eq!(calm.under_replicated, 0.0);
        assert_eq!(calm.unrecoverable, 0);
    }
}
