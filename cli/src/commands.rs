//! One function per command: build the request, send it, print the reply.

use crate::args::{
    BackupArgs, ChangeArgs, Cli, Command, Global, IndexCommand, InitArgs, KeysCommand, LsArgs,
    PassphraseArgs, PassphraseCommand, PeerAddArgs, PeerCommand, RestoreArgs, VerifyArgs,
};
use crate::exit;
use crate::output::{self, Reporter, bytes, print_json, time};
use anyhow::{Context, anyhow};
use obnam_node::config::Paths;
use obnam_node::control;
use obnam_protocol::control::{
    BackupRequest, ControlError, Event, InitRequest, LsEntry, LsRequest, Reply, Request,
    RestoreRequest,
};
use obnam_protocol::tree::EntryKind;
use serde_bytes::ByteBuf;
use serde_json::json;
use std::io::IsTerminal;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

/// A failure with the kind the JSON error shows.
#[derive(Debug)]
pub struct Failure {
    /// Machine-readable kind.
    pub kind: String,
    /// Message.
    pub message: String,
    /// More fields for the JSON document (e.g. a partial restore's report).
    pub details: Option<serde_json::Value>,
}

impl Failure {
    fn new(kind: &str, message: String) -> Self {
        Self {
            kind: kind.into(),
            message,
            details: None,
        }
    }
}

impl From<ControlError> for Failure {
    fn from(e: ControlError) -> Self {
        Self::new(&e.kind, e.message)
    }
}

impl From<anyhow::Error> for Failure {
    fn from(e: anyhow::Error) -> Self {
        Self::new("usage", format!("{e:#}"))
    }
}

fn abs(p: &Path) -> anyhow::Result<PathBuf> {
    std::path::absolute(p).with_context(|| format!("resolving {}", p.display()))
}

fn bytes_of(p: &Path) -> ByteBuf {
    ByteBuf::from(p.as_os_str().as_bytes().to_vec())
}

fn call(g: &Global, req: Request, what: &str) -> Result<Reply, Failure> {
    let paths =
        Paths::resolve(g.data_dir.as_deref()).map_err(|e| Failure::new(e.kind(), e.to_string()))?;
    let mut reporter = Reporter::new(g.quiet, what);
    let result = control::call(&paths, g.data_dir.is_some(), &req, |ev| reporter.event(ev));
    reporter.finish();
    Ok(result?)
}

fn unexpected(r: Reply) -> Failure {
    Failure::new("control", format!("unexpected reply from the node: {r:?}"))
}

/// Reads a passphrase: from a file, from OBNAM_PASSPHRASE, or from the terminal (twice when
/// `confirm`).
fn passphrase(file: Option<&Path>, confirm: bool) -> anyhow::Result<String> {
    if let Some(f) = file {
        let text = std::fs::read_to_string(f)
            .with_context(|| format!("reading passphrase file {}", f.display()))?;
        return Ok(text.lines().next().unwrap_or("").to_owned());
    }
    if let Ok(p) = std::env::var("OBNAM_PASSPHRASE") {
        return Ok(p);
    }
    if !std::io::stdin().is_terminal() {
        return Err(anyhow!(
            "no passphrase: not on a terminal, so set OBNAM_PASSPHRASE or pass --passphrase-file"
        ));
    }
    let p = rpassword::prompt_password("Passphrase: ")?;
    if confirm {
        let again = rpassword::prompt_password("Passphrase again: ")?;
        if again != p {
            return Err(anyhow!("the passphrases differ"));
        }
    }
    Ok(p)
}

/// Runs `obnam` and returns its exit code.
pub fn run(cli: Cli) -> Result<u8, Failure> {
    let g = cli.global.clone();
    match cli.command {
        Command::Init(a) => init(&g, a),
        Command::Id => id(&g),
        Command::Backup(a) => backup(&g, a),
        Command::Snapshots => snapshots(&g),
        Command::Ls(a) => ls(&g, a),
        Command::Restore(a) => restore(&g, a),
        Command::Status => status(&g),
        Command::Verify(a) => verify(&g, a),
        Command::Passphrase(PassphraseCommand::Check(a)) => check(&g, a),
        Command::Passphrase(PassphraseCommand::Change(a)) => change(&g, a),
        Command::Keys(KeysCommand::Rotate(a)) => rotate(&g, a),
        Command::Peer(PeerCommand::Add(a)) => peer_add(&g, a),
        Command::Index(IndexCommand::Rebuild) => {
            recovered(&g, Request::IndexRebuild, "rebuilding the index")
        }
        Command::Peer(PeerCommand::List) => peer_list(&g),
        Command::Peer(PeerCommand::Remove { peer_id }) => peer_remove(&g, peer_id),
    }
}

fn init(g: &Global, a: InitArgs) -> Result<u8, Failure> {
    let name = match a.name {
        Some(n) => n,
        None => std::env::var("USER")
            .or_else(|_| std::env::var("LOGNAME"))
            .map_err(|_| anyhow!("cannot tell your login name: pass --name"))?,
    };
    let passphrase = passphrase(a.passphrase_file.as_deref(), !a.recover)?;
    if a.recover {
        return recovered(g, Request::Recover { name, passphrase }, "recovering");
    }
    let req = Request::Init(InitRequest {
        name,
        passphrase,
        weak_ok: a.weak_passphrase_ok,
    });
    let Reply::Init(r) = call(g, req, "deriving keys")? else {
        return Err(Failure::new("control", "unexpected reply".into()));
    };
    if g.json {
        print_json(&json!({"name": r.name, "owner": r.owner.to_hex()}));
    } else {
        println!("Owner keys created.\n");
        println!("  RECOVERY SHEET - keep this safe, apart from this machine");
        println!("  owner name: {}", r.name);
        println!("  owner key:  {}", r.owner);
        println!();
        println!("  Your owner name and your passphrase are the only way back to your backups");
        println!("  if this machine is lost. Nobody can reset the passphrase for you.");
    }
    Ok(exit::OK)
}

fn check(g: &Global, a: PassphraseArgs) -> Result<u8, Failure> {
    let passphrase = passphrase(a.passphrase_file.as_deref(), false)?;
    match call(g, Request::CheckPassphrase { passphrase }, "checking")? {
        Reply::PassphraseOk { name } => {
            if g.json {
                print_json(&json!({"ok": true, "name": name}));
            } else {
                println!("The passphrase is right for owner {name:?}.");
            }
            Ok(exit::OK)
        }
        r => Err(unexpected(r)),
    }
}

fn rotate(g: &Global, a: PassphraseArgs) -> Result<u8, Failure> {
    let passphrase = passphrase(a.passphrase_file.as_deref(), false)?;
    match call(
        g,
        Request::RotateKeys { passphrase },
        "re-encrypting every snapshot",
    )? {
        Reply::KeysRotated {
            old_owner,
            new_owner,
            snapshots,
            new_bytes,
            stored_bytes,
        } => {
            if g.json {
                print_json(&json!({
                    "old_owner": old_owner.to_hex(), "new_owner": new_owner.to_hex(),
                    "snapshots": snapshots, "new_bytes": new_bytes, "stored_bytes": stored_bytes,
                }));
            } else {
                println!(
                    "{snapshots} snapshots re-encrypted under a new key ({} sealed again, {} stored)",
                    bytes(new_bytes),
                    bytes(stored_bytes)
                );
                println!(
                    "owner key {} replaces {}",
                    new_owner.short(),
                    old_owner.short()
                );
                println!(
                    "friends delete the old key's data once they hold the new set; `obnam status` shows who is left"
                );
            }
            Ok(exit::OK)
        }
        r => Err(unexpected(r)),
    }
}

fn id(g: &Global) -> Result<u8, Failure> {
    match call(g, Request::Id, "")? {
        Reply::Id(r) => {
            if g.json {
                print_json(&json!({"peer_id": r.peer_id, "addrs": r.addrs, "ticket": r.ticket}));
            } else {
                println!("peer id: {}", r.peer_id);
                for a in &r.addrs {
                    println!("address: {a}");
                }
                println!("ticket:  {}", r.ticket);
            }
            Ok(exit::OK)
        }
        r => Err(unexpected(r)),
    }
}

fn backup(g: &Global, a: BackupArgs) -> Result<u8, Failure> {
    let mut paths = a.paths.clone();
    if paths.is_empty() {
        let home = std::env::var_os("HOME")
            .ok_or_else(|| anyhow!("no path given and $HOME is not set"))?;
        paths.push(PathBuf::from(home));
    }
    let paths = paths
        .iter()
        .map(|p| abs(p).map(|p| bytes_of(&p)))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let exclude_files = a
        .exclude_file
        .iter()
        .map(|p| abs(p).map(|p| bytes_of(&p)))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let req = Request::Backup(BackupRequest {
        paths,
        excludes: a.exclude,
        exclude_files,
        exclude_caches: a.exclude_caches,
        one_file_system: a.one_file_system,
        tags: a.tag,
        timeout_secs: a.timeout.map(|d| d.as_secs().max(1)).unwrap_or(0),
        force: a.force,
    });
    let Reply::Backup(r) = call(g, req, "backing up")? else {
        return Err(Failure::new("control", "unexpected reply".into()));
    };
    if g.json {
        print_json(&json!({
            "snapshot": r.snapshot.to_hex(),
            "files": r.files,
            "failed_files": r.failed_files,
            "bytes": r.bytes,
            "new_bytes": r.new_bytes,
            "cached_files": r.cached_files,
            "stored_bytes": r.stored_bytes,
            "replicas": r.replicas,
            "sent_bytes": r.sent_bytes,
            "head_seq": r.head_seq,
            "pending": r.pending,
            "problems": r.problems.iter().map(|p| json!({"path": p.path, "error": p.error})).collect::<Vec<_>>(),
        }));
    } else if !g.quiet {
        println!(
            "snapshot {} saved: {} files ({} unchanged, not read), {} ({} new, {} stored)",
            r.snapshot.short(),
            r.files,
            r.cached_files,
            bytes(r.bytes),
            bytes(r.new_bytes),
            bytes(r.stored_bytes)
        );
        if r.failed_files > 0 {
            println!(
                "{} files could not be read and were skipped (listed above)",
                r.failed_files
            );
        }
        if r.replicas > 0 || !r.pending.is_empty() {
            println!(
                "{} friends hold the snapshot ({} sent)",
                r.replicas,
                bytes(r.sent_bytes)
            );
        }
        if !r.pending.is_empty() {
            println!("replication is pending; obnam-node goes on in the background:");
            for p in &r.pending {
                println!("  waiting for {p}");
            }
        }
    }
    Ok(if !r.pending.is_empty() {
        exit::PENDING
    } else if r.failed_files > 0 {
        exit::PARTIAL
    } else {
        exit::OK
    })
}

fn snapshots(g: &Global) -> Result<u8, Failure> {
    let Reply::Snapshots(list) = call(g, Request::Snapshots, "")? else {
        return Err(Failure::new("control", "unexpected reply".into()));
    };
    if g.json {
        let v: Vec<_> = list
            .iter()
            .map(|s| {
                json!({"id": s.id.to_hex(), "time": time(s.time_ns), "host": s.host, "paths": s.paths,
                       "tags": s.tags, "files": s.files, "bytes": s.bytes, "health": health_json(&s.health)})
            })
            .collect();
        print_json(&json!(v));
    } else if list.is_empty() {
        println!("no snapshots yet");
    } else {
        println!(
            "{:<10} {:<21} {:<16} {:>8} {:>10} {:>7} {:>6}  {:<12} paths",
            "id", "time", "host", "files", "size", "friends", "1-only", "tags"
        );
        for s in &list {
            println!(
                "{:<10} {:<21} {:<16} {:>8} {:>10} {:>7} {:>6}  {:<12} {}",
                s.id.short(),
                time(s.time_ns),
                s.host,
                s.files,
                bytes(s.bytes),
                if s.health.unknown {
                    "?".to_owned()
                } else {
                    s.health.friends_holding_all.to_string()
                },
                if s.health.unknown {
                    "?".to_owned()
                } else {
                    percent(s.health.single_friend_bytes, s.health.pack_bytes)
                },
                s.tags.join(","),
                s.paths.join(" ")
            );
        }
        println!(
            "friends: how many friends hold every pack of the snapshot; 1-only: share of its data that only one friend holds; ?: not known yet"
        );
    }
    Ok(exit::OK)
}

fn kind_name(k: EntryKind) -> &'static str {
    match k {
        EntryKind::File => "file",
        EntryKind::Dir => "dir",
        EntryKind::Symlink => "symlink",
        EntryKind::Fifo => "fifo",
        EntryKind::CharDevice => "chardev",
        EntryKind::BlockDevice => "blockdev",
        EntryKind::Socket => "socket",
    }
}

fn mode_string(k: EntryKind, mode: u32) -> String {
    let t = match k {
        EntryKind::Dir => 'd',
        EntryKind::Symlink => 'l',
        EntryKind::Fifo => 'p',
        EntryKind::CharDevice => 'c',
        EntryKind::BlockDevice => 'b',
        EntryKind::Socket => 's',
        EntryKind::File => '-',
    };
    let mut s = String::from(t);
    for shift in [6, 3, 0] {
        let bits = (mode >> shift) & 7;
        s.push(if bits & 4 != 0 { 'r' } else { '-' });
        s.push(if bits & 2 != 0 { 'w' } else { '-' });
        s.push(if bits & 1 != 0 { 'x' } else { '-' });
    }
    s
}

fn ls(g: &Global, a: LsArgs) -> Result<u8, Failure> {
    let path = a
        .path
        .as_ref()
        .map(|p| abs(p).map(|p| bytes_of(&p)))
        .transpose()?;
    let paths =
        Paths::resolve(g.data_dir.as_deref()).map_err(|e| Failure::new(e.kind(), e.to_string()))?;
    let mut entries: Vec<LsEntry> = Vec::new();
    let json_mode = g.json;
    let reply = control::call(
        &paths,
        g.data_dir.is_some(),
        &Request::Ls(LsRequest {
            snapshot: a.snapshot,
            path,
        }),
        |ev| {
            if let Event::Entry(e) = ev {
                if json_mode {
                    entries.push(e);
                } else {
                    let p = String::from_utf8_lossy(&e.path);
                    let target = if e.kind == EntryKind::Symlink {
                        format!(" -> {}", String::from_utf8_lossy(&e.target))
                    } else {
                        String::new()
                    };
                    println!(
                        "{} {:>5} {:>5} {:>12} {} {p}{target}",
                        mode_string(e.kind, e.mode),
                        e.uid,
                        e.gid,
                        e.size,
                        time(e.mtime_ns)
                    );
                }
            }
        },
    )?;
    if json_mode {
        let v: Vec<_> = entries
            .iter()
            .map(|e| {
                json!({"path": String::from_utf8_lossy(&e.path), "type": kind_name(e.kind), "mode": e.mode,
                       "uid": e.uid, "gid": e.gid, "size": e.size, "mtime": time(e.mtime_ns),
                       "target": if e.kind == EntryKind::Symlink { Some(String::from_utf8_lossy(&e.target)) } else { None }})
            })
            .collect();
        print_json(&json!(v));
    }
    match reply {
        Reply::Ls { .. } => Ok(exit::OK),
        r => Err(unexpected(r)),
    }
}

fn restore(g: &Global, a: RestoreArgs) -> Result<u8, Failure> {
    let target = bytes_of(&abs(&a.target)?);
    let paths = a
        .path
        .iter()
        .map(|p| abs(p).map(|p| bytes_of(&p)))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let req = Request::Restore(RestoreRequest {
        snapshot: a.snapshot,
        target,
        paths,
        force: a.force,
    });
    let Reply::Restore(r) = call(g, req, "restoring")? else {
        return Err(Failure::new("control", "unexpected reply".into()));
    };
    let doc = json!({
        "snapshot": r.snapshot.to_hex(), "files": r.files, "dirs": r.dirs, "others": r.others, "bytes": r.bytes,
        "problems": r.problems.iter().map(|p| json!({"path": p.path, "error": p.error})).collect::<Vec<_>>(),
    });
    if g.json {
        // With problems, the one JSON document is the error, carrying the report.
        if r.problems.is_empty() {
            print_json(&doc);
        }
    } else if !g.quiet {
        println!(
            "restored snapshot {}: {} files, {} directories, {} other entries, {} to {}",
            r.snapshot.short(),
            r.files,
            r.dirs,
            r.others,
            bytes(r.bytes),
            a.target.display()
        );
        if !r.problems.is_empty() {
            println!(
                "{} entries could not be restored (listed above)",
                r.problems.len()
            );
        }
    }
    if r.problems.is_empty() {
        Ok(exit::OK)
    } else {
        let mut f = Failure::new(
            "restore_incomplete",
            format!("{} entries could not be restored", r.problems.len()),
        );
        f.details = Some(doc);
        Err(f)
    }
}

fn status(g: &Global) -> Result<u8, Failure> {
    let Reply::Status(s) = call(g, Request::Status, "")? else {
        return Err(Failure::new("control", "unexpected reply".into()));
    };
    if g.json {
        print_json(&json!({
            "data_dir": s.data_dir, "peer_id": s.peer_id, "owner_name": s.owner_name,
            "snapshots": s.snapshots, "last_backup": s.last_backup_ns.map(time),
            "outbox_packs": s.outbox_packs, "outbox_bytes": s.outbox_bytes, "outbox_max_bytes": s.outbox_max_bytes,
            "backup_running": s.backup_running, "friends": s.friends, "friends_online": s.friends_online,
            "replicas": s.replicas, "replicated_to": s.replicated_to, "under_replicated": s.under_replicated,
            "waiting": s.waiting, "hosted_owners": s.hosted_owners, "hosted_bytes": s.hosted_bytes,
            "slot_pending": s.slot_pending, "rotation_pending": s.rotation_pending,
            "latest_snapshot_health": s.latest_snapshot_health.as_deref().map(health_json),
            "own_pack_bytes": s.own_pack_bytes, "sent_bytes": s.sent_bytes, "repaired_bytes": s.repaired_bytes,
            "friend_health": s.friend_health.iter().map(|f| json!({
                "peer_id": f.peer_id, "name": f.name, "online": f.online, "audits": audits_json(&f.audits),
            })).collect::<Vec<_>>(),
        }));
    } else {
        println!("data directory: {}", s.data_dir);
        println!("peer id:        {}", s.peer_id);
        println!(
            "owner:          {}",
            s.owner_name
                .as_deref()
                .unwrap_or("(none: run `obnam init`)")
        );
        println!("snapshots:      {}", s.snapshots);
        println!(
            "last backup:    {}",
            s.last_backup_ns.map(time).unwrap_or_else(|| "never".into())
        );
        println!(
            "outbox:         {} packs, {} of {}",
            s.outbox_packs,
            bytes(s.outbox_bytes),
            bytes(s.outbox_max_bytes)
        );
        println!(
            "backup running: {}",
            if s.backup_running { "yes" } else { "no" }
        );
        println!(
            "friends:        {} ({} online)",
            s.friends, s.friends_online
        );
        println!(
            "replication:    {} of {} replicas hold everything{}",
            s.replicated_to,
            s.replicas,
            if s.under_replicated {
                " (UNDER-REPLICATED)"
            } else {
                ""
            }
        );
        for w in &s.waiting {
            println!("                waiting for {w}");
        }
        println!("bytes waiting:  {} in the outbox", bytes(s.outbox_bytes));
        println!(
            "traffic:        {} of packs ({} stored at friends, {} fetched back for repair since start)",
            bytes(s.own_pack_bytes),
            bytes(s.sent_bytes),
            bytes(s.repaired_bytes)
        );
        println!(
            "hosting:        {} for {} owners",
            bytes(s.hosted_bytes),
            s.hosted_owners
        );
        for r in &s.rotation_pending {
            println!("key rotation:   waiting for {r}");
        }
        if s.latest_snapshot_health
            .as_deref()
            .is_some_and(|h| h.unknown)
        {
            println!("newest snapshot: its packs are not known yet (its trees are being read)");
        } else if let Some(h) = &s.latest_snapshot_health {
            println!(
                "newest snapshot: {} hold{} all of it; {} of its data is held by only one friend, {} by none",
                match h.friends_holding_all {
                    1 => "1 friend".to_owned(),
                    n => format!("{n} friends"),
                },
                if h.friends_holding_all == 1 { "s" } else { "" },
                percent(h.single_friend_bytes, h.pack_bytes),
                percent(h.unheld_bytes, h.pack_bytes)
            );
        }
        for f in &s.friend_health {
            println!(
                "friend {}:{} {}",
                f.name,
                if f.online { "" } else { " (offline)" },
                audits_line(&f.audits)
            );
            if let (Some(why), Some(at)) = (&f.audits.last_failure, f.audits.last_failure_ns) {
                println!("    last failed audit {}: {why}", time(at));
            }
        }
    }
    Ok(exit::OK)
}

fn share(part: u64, whole: u64) -> f64 {
    if whole == 0 {
        0.0
    } else {
        part as f64 / whole as f64
    }
}

fn percent(part: u64, whole: u64) -> String {
    format!("{:.0}%", 100.0 * share(part, whole))
}

fn health_json(h: &obnam_protocol::control::SnapshotHealth) -> serde_json::Value {
    if h.unknown {
        return json!({"unknown": true});
    }
    json!({
        "unknown": false,
        "friends_holding_all": h.friends_holding_all, "pack_bytes": h.pack_bytes,
        "single_friend_share": share(h.single_friend_bytes, h.pack_bytes),
        "unheld_share": share(h.unheld_bytes, h.pack_bytes),
    })
}

fn audits_json(a: &obnam_protocol::control::FriendAudits) -> serde_json::Value {
    json!({
        "passed": a.passed, "failed": a.failed, "last_audit": a.last_audit_ns.map(time),
        "last_passed": a.last_passed, "last_failure": a.last_failure,
        "last_failure_at": a.last_failure_ns.map(time),
        "online_fraction_30d": a.online_permille_30d.map(|p| f64::from(p) / 1000.0),
        "last_seen": a.last_seen_ns.map(time),
    })
}

fn path_line(p: &obnam_protocol::control::PeerInfo) -> String {
    match (&p.path, p.online) {
        (Some(path), true) => {
            let rtt = p
                .rtt_us
                .map(|u| format!(", rtt {:.1} ms", u as f64 / 1000.0))
                .unwrap_or_default();
            let at = p.path_addr.as_deref().unwrap_or("?");
            format!("{path} at {at}{rtt}")
        }
        _ => match p.audits.last_seen_ns {
            Some(at) => format!("offline; last seen {}", time(at)),
            None => "offline; never seen".into(),
        },
    }
}

fn audits_line(a: &obnam_protocol::control::FriendAudits) -> String {
    let online = a
        .online_permille_30d
        .map(|p| format!("online {:.1}% of 30 days", f64::from(p) / 10.0))
        .unwrap_or_else(|| "online share not known yet".into());
    let last = match (a.last_audit_ns, a.last_passed) {
        (Some(at), Some(true)) => format!("last audit passed {}", time(at)),
        (Some(at), _) => format!("LAST AUDIT FAILED {}", time(at)),
        _ => "not audited yet".into(),
    };
    format!(
        "{online}; audits {} passed, {} failed; {last}",
        a.passed, a.failed
    )
}

fn verify(g: &Global, a: VerifyArgs) -> Result<u8, Failure> {
    let req = Request::Verify {
        sample_percent: a.sample,
    };
    let r = match call(g, req, "auditing friends")? {
        Reply::Verified(r) => r,
        r => return Err(unexpected(r)),
    };
    let doc = json!({
        "passed": r.passed, "failed": r.failed, "unreachable": r.unreachable,
        "audits": r.audits.iter().map(|a| json!({
            "peer_id": a.peer_id, "name": a.name, "pack": a.pack, "kind": a.kind,
            "outcome": a.outcome, "detail": a.detail,
        })).collect::<Vec<_>>(),
    });
    if !g.json {
        for a in &r.audits {
            let pack = a
                .pack
                .as_deref()
                .map(|p| &p[..p.len().min(12)])
                .unwrap_or("-");
            print!("{:<16} {:<7} {:<12} {}", a.name, a.kind, pack, a.outcome);
            match &a.detail {
                Some(d) => println!(": {d}"),
                None => println!(),
            }
        }
        println!(
            "{} audits passed, {} failed, {} could not be made",
            r.passed, r.failed, r.unreachable
        );
    }
    let failure = if r.failed > 0 {
        Some(Failure::new(
            "audit_failed",
            format!(
                "{} audits failed: those packs no longer count as held by that friend and are being repaired",
                r.failed
            ),
        ))
    } else if r.passed == 0 && r.unreachable > 0 {
        Some(Failure::new(
            "not_verified",
            "no friend could be audited (offline, busy, or holding nothing yet)".into(),
        ))
    } else {
        None
    };
    match failure {
        Some(mut f) => {
            f.details = Some(doc);
            Err(f)
        }
        None => {
            if g.json {
                print_json(&doc);
            }
            Ok(exit::OK)
        }
    }
}

/// Prints a failure and returns exit code 1.
pub fn report_failure(g_json: bool, f: &Failure) -> u8 {
    match (&f.details, g_json) {
        (Some(serde_json::Value::Object(details)), true) => {
            let mut doc = details.clone();
            doc.insert(
                "error".into(),
                json!({"kind": f.kind, "message": f.message}),
            );
            print_json(&serde_json::Value::Object(doc));
        }
        _ => output::print_error(g_json, &f.kind, &f.message),
    }
    exit::ERROR
}

fn peer_json(p: &obnam_protocol::control::PeerInfo) -> serde_json::Value {
    json!({
        "peer_id": p.peer_id, "name": p.name, "household": p.household, "online": p.online,
        "addrs": p.addrs, "quota_given": p.quota_given, "used_by_them": p.used_by_them,
        "used_by_us": p.used_by_us, "holds_slot": p.holds_slot, "last_error": p.last_error,
        "audits": audits_json(&p.audits), "path": p.path, "path_addr": p.path_addr,
        "rtt_ms": p.rtt_us.map(|u| u as f64 / 1000.0), "record_addrs": p.record_addrs,
        "record_seq": p.record_seq, "last_seen_ns": p.audits.last_seen_ns,
    })
}

fn peer_add(g: &Global, a: PeerAddArgs) -> Result<u8, Failure> {
    let req = Request::PeerAdd(obnam_protocol::control::PeerAddRequest {
        who: a.who,
        addrs: a.addr,
        quota: a.quota,
        name: a.name,
        household: a.household,
    });
    match call(g, req, "")? {
        Reply::PeerAdded(p) => {
            if g.json {
                print_json(&peer_json(&p));
            } else {
                println!(
                    "{} ({}) is now a friend, with {} of quota.",
                    p.name,
                    p.peer_id,
                    bytes(p.quota_given)
                );
                println!(
                    "Data moves once they add this node too: they run `obnam peer add <your ticket>` (see `obnam id`)."
                );
            }
            Ok(exit::OK)
        }
        r => Err(unexpected(r)),
    }
}

fn peer_list(g: &Global) -> Result<u8, Failure> {
    match call(g, Request::PeerList, "")? {
        Reply::Peers(list) => {
            if g.json {
                print_json(&json!(list.iter().map(peer_json).collect::<Vec<_>>()));
            } else if list.is_empty() {
                println!("no friends yet: `obnam peer add <ticket>`");
            } else {
                println!(
                    "{:<16} {:<10} {:<7} {:>10} {:>10} {:>10}  peer id",
                    "name", "household", "online", "quota", "theirs", "ours"
                );
                for p in &list {
                    println!(
                        "{:<16} {:<10} {:<7} {:>10} {:>10} {:>10}  {}",
                        p.name,
                        p.household,
                        if p.online { "yes" } else { "no" },
                        bytes(p.quota_given),
                        bytes(p.used_by_them),
                        bytes(p.used_by_us),
                        p.peer_id
                    );
                    println!("    {}", path_line(p));
                    println!("    {}", audits_line(&p.audits));
                    if let Some(e) = &p.last_error {
                        println!("    last problem: {e}");
                    }
                }
            }
            Ok(exit::OK)
        }
        r => Err(unexpected(r)),
    }
}

fn peer_remove(g: &Global, peer_id: String) -> Result<u8, Failure> {
    match call(g, Request::PeerRemove { peer_id }, "")? {
        Reply::PeerRemoved { peer_id } => {
            if g.json {
                print_json(&json!({"removed": peer_id}));
            } else {
                println!(
                    "{peer_id} is no longer a friend. The data stored for it stays until you delete it."
                );
            }
            Ok(exit::OK)
        }
        r => Err(unexpected(r)),
    }
}

fn recovered(g: &Global, req: Request, what: &str) -> Result<u8, Failure> {
    match call(g, req, what)? {
        Reply::Recovered(r) => {
            if g.json {
                print_json(&json!({
                    "name": r.name, "owner": r.owner.to_hex(), "head_seq": r.head_seq, "snapshots": r.snapshots,
                    "packs": r.packs, "chunks": r.chunks, "seeded_dirs": r.seeded_dirs, "friends_added": r.friends_added,
                    "took_over": r.took_over, "warnings": r.warnings,
                }));
            } else {
                println!("owner {:?} ({})", r.name, r.owner.short());
                println!(
                    "{} snapshots (head {}), {} packs and {} chunks indexed",
                    r.snapshots, r.head_seq, r.packs, r.chunks
                );
                if r.seeded_dirs > 0 {
                    println!(
                        "file cache seeded for {} directories from the newest snapshot",
                        r.seeded_dirs
                    );
                }
                for f in &r.friends_added {
                    println!("friend learned from the head: {f}");
                }
                if !r.took_over.is_empty() {
                    println!(
                        "{} friends accept this node as the owner's writer",
                        r.took_over.len()
                    );
                }
                for w in &r.warnings {
                    eprintln!("warning: {w}");
                }
            }
            Ok(exit::OK)
        }
        r => Err(unexpected(r)),
    }
}

fn change(g: &Global, a: ChangeArgs) -> Result<u8, Failure> {
    let old = passphrase(a.passphrase_file.as_deref(), false)?;
    let new = match (
        &a.new_passphrase_file,
        std::env::var("OBNAM_NEW_PASSPHRASE"),
    ) {
        (Some(f), _) => std::fs::read_to_string(f)
            .with_context(|| format!("reading passphrase file {}", f.display()))?
            .lines()
            .next()
            .unwrap_or("")
            .to_owned(),
        (None, Ok(p)) => p,
        (None, Err(_)) => {
            if !std::io::stdin().is_terminal() {
                return Err(anyhow!(
                    "no new passphrase: set OBNAM_NEW_PASSPHRASE or pass --new-passphrase-file"
                )
                .into());
            }
            let p = rpassword::prompt_password("New passphrase: ").map_err(anyhow::Error::from)?;
            if rpassword::prompt_password("New passphrase again: ").map_err(anyhow::Error::from)?
                != p
            {
                return Err(anyhow!("the new passphrases differ").into());
            }
            p
        }
    };
    match call(
        g,
        Request::ChangePassphrase {
            old,
            new,
            weak_ok: a.weak_passphrase_ok,
        },
        "re-wrapping keys",
    )? {
        Reply::PassphraseChanged { name, pending } => {
            if g.json {
                print_json(&json!({"name": name, "pending": pending}));
            } else {
                println!("The passphrase of owner {name:?} is changed.");
                if !pending.is_empty() {
                    println!(
                        "The new key slot goes to {} friends; `obnam status` lists those not reached yet.",
                        pending.len()
                    );
                }
            }
            Ok(exit::OK)
        }
        r => Err(unexpected(r)),
    }
}
