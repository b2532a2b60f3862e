//! One node: backup and restore round trips, excludes, skipped files, crashes.

use crate::util::{Fixture, TestResult, is_root, noise, restored};
use obnam_simulations::{compare_trees, shared_bench};
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt, symlink};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

fn write(path: &Path, data: &[u8]) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, data).unwrap();
}

fn chmod(path: &Path, mode: u32) {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

/// A tree with every awkward thing the restore must get right.
fn awkward_tree(root: &Path) {
    std::fs::create_dir_all(root).unwrap();
    write(
        &root.join(OsStr::from_bytes(b"caf\xe9-latin1")),
        b"not utf-8 name",
    );
    write(&root.join("new\nline"), b"newline in name");
    write(&root.join("with spaces and 'quotes'"), b"spaces");
    write(&root.join("-rf"), b"leading dash");
    write(&root.join("ünïcødé ✓"), b"unicode");
    write(&root.join("empty"), b"");
    std::fs::create_dir_all(root.join("empty-dir")).unwrap();
    std::fs::create_dir_all(root.join("nested/empty/dirs")).unwrap();
    symlink("with spaces and 'quotes'", root.join("link-to-file")).unwrap();
    symlink("does/not/exist", root.join("dangling")).unwrap();
    symlink("nested", root.join("link-to-dir")).unwrap();
    symlink("/etc/hostname", root.join("absolute-link")).unwrap();
    write(&root.join("hard/a"), b"hard-linked content");
    std::fs::hard_link(root.join("hard/a"), root.join("hard/b")).unwrap();
    std::fs::hard_link(root.join("hard/a"), root.join("nested/c-elsewhere")).unwrap();
    write(&root.join("ro/readonly"), b"read only");
    chmod(&root.join("ro/readonly"), 0o444);
    write(&root.join("ro/exec"), b"#!/bin/sh\n");
    chmod(&root.join("ro/exec"), 0o755);
    write(&root.join("ro/private"), b"private");
    chmod(&root.join("ro/private"), 0o600);
    chmod(&root.join("ro"), 0o555);
    nix::unistd::mkfifo(
        &root.join("fifo"),
        nix::sys::stat::Mode::from_bits_truncate(0o640),
    )
    .unwrap();
    if is_root() {
        // A character device like /dev/null (1, 3).
        nix::sys::stat::mknod(
            &root.join("null-device"),
            nix::sys::stat::SFlag::S_IFCHR,
            nix::sys::stat::Mode::from_bits_truncate(0o620),
            nix::sys::stat::makedev(1, 3),
        )
        .unwrap();
    }
    // Files at and around the chunker's boundaries: min 256 KiB, avg 1 MiB, max 4 MiB.
    for (i, size) in [
        1usize,
        262_143,
        262_144,
        262_145,
        1 << 20,
        (4 << 20) - 1,
        4 << 20,
        (4 << 20) + 1,
        (8 << 20) + 3,
    ]
    .into_iter()
    .enumerate()
    {
        write(
            &root.join(format!("sizes/{size}")),
            &noise(size, i as u64 + 1),
        );
    }
    // Identical content twice: deduplicated within one backup.
    let dup = noise(3 << 20, 99);
    write(&root.join("dup/one"), &dup);
    write(&root.join("dup/two"), &dup);
    // A fixed old mtime, and one before the epoch.
    let old = filetime_of(1_000_000_000, 123_456_789);
    set_mtime(&root.join("empty"), old);
    set_mtime(&root.join("-rf"), filetime_of(-86_400, 5));
}

fn filetime_of(secs: i64, nanos: u32) -> (i64, u32) {
    (secs, nanos)
}

fn set_mtime(path: &Path, (secs, nanos): (i64, u32)) {
    let ts = nix::sys::time::TimeSpec::new(secs, i64::from(nanos));
    nix::sys::stat::utimensat(
        nix::fcntl::AT_FDCWD,
        path,
        &ts,
        &ts,
        nix::sys::stat::UtimensatFlags::NoFollowSymlink,
    )
    .unwrap();
}

#[test]
fn awkward_tree_restores_identically() -> TestResult {
    let f = Fixture::ready()?;
    let src = f.path("src");
    awkward_tree(&src);
    if let Some(bench) = shared_bench() {
        let status = std::process::Command::new(bench.join("make-dataset"))
            .arg(src.join("dataset"))
            .arg("tiny")
            .status()?;
        assert!(status.success(), "make-dataset failed");
    }
    let report = f.node.backup(&[&src], &[], 0)?;
    assert_eq!(report["failed_files"], 0, "{report}");
    let bytes = report["bytes"].as_u64().unwrap();
    let new_bytes = report["new_bytes"].as_u64().unwrap();
    // The duplicated 3 MiB and the hard links are stored once.
    assert!(
        new_bytes + (3 << 20) <= bytes + 64 * 1024,
        "no dedup: bytes {bytes}, new {new_bytes}"
    );

    let target = f.path("restore");
    let r = f.node.json(
        &["restore", "latest", "--target", target.to_str().unwrap()],
        0,
    )?;
    assert!(r["problems"].as_array().unwrap().is_empty(), "{r}");
    let out = restored(&target, &src);
    let n = compare_trees(&src, &out, &[])?;
    assert!(n > 30, "compared only {n} entries");

    // Hard links are links again, FIFOs are FIFOs, non-UTF-8 names survive.
    let ino = |p: PathBuf| std::fs::metadata(p).unwrap().ino();
    assert_eq!(ino(out.join("hard/a")), ino(out.join("hard/b")));
    assert_eq!(ino(out.join("hard/a")), ino(out.join("nested/c-elsewhere")));
    assert!(
        std::fs::symlink_metadata(out.join("fifo"))?
            .file_type()
            .is_fifo()
    );
    assert_eq!(
        std::fs::read(out.join(OsStr::from_bytes(b"caf\xe9-latin1")))?,
        b"not utf-8 name"
    );
    assert_eq!(
        std::fs::read_link(out.join("dangling"))?,
        PathBuf::from("does/not/exist")
    );
    if is_root() {
        let dev = std::fs::symlink_metadata(out.join("null-device"))?;
        assert!(dev.file_type().is_char_device());
        assert_eq!(dev.rdev(), nix::sys::stat::makedev(1, 3));
    }

    // The shared manifest tool agrees (type, mode, size, content, link target, mtime).
    if let Some(bench) = shared_bench() {
        let cmp = std::process::Command::new(bench.join("manifest"))
            .arg("--compare")
            .arg(&src)
            .arg(&out)
            .output()?;
        assert!(
            cmp.status.success(),
            "manifest --compare: {}",
            String::from_utf8_lossy(&cmp.stdout)
        );
    }
    // Owners are restored when run as root.
    if is_root() {
        assert_eq!(
            std::fs::metadata(out.join("sizes/1"))?.uid(),
            std::fs::metadata(src.join("sizes/1"))?.uid()
        );
    }
    Ok(())
}

#[test]
fn snapshots_ls_prefixes_and_partial_restore() -> TestResult {
    let f = Fixture::ready()?;
    let src = f.path("src");
    write(&src.join("docs/a.txt"), b"alpha");
    write(&src.join("docs/b.txt"), b"beta");
    write(&src.join("music/song"), &noise(300_000, 3));
    let quiet = crate::util::quiet_tmp();
    let first = f
        .node
        .backup(&[&src], &["--tag", "daily", "--tag", "first"], 0)?;
    let second = f.node.backup(&[&src], &[], 0)?;
    drop(quiet);
    assert_eq!(
        second["new_bytes"], 0,
        "unchanged backup stored data: {second}"
    );
    assert_eq!(
        second["stored_bytes"], 0,
        "unchanged backup wrote a pack: {second}"
    );

    let snaps = f.node.json(&["snapshots"], 0)?;
    let list = snaps.as_array().unwrap();
    assert_eq!(list.len(), 2);
    assert_eq!(list[0]["id"], first["snapshot"], "oldest first");
    assert_eq!(list[0]["tags"], serde_json::json!(["daily", "first"]));
    assert_eq!(list[0]["paths"], serde_json::json!([src.to_str().unwrap()]));
    assert_eq!(list[0]["files"], 3);
    assert!(list[0]["time"].as_str().unwrap().ends_with('Z'));
    for key in ["id", "time", "host", "paths", "tags", "files", "bytes"] {
        assert!(list[1].get(key).is_some(), "missing {key}");
    }

    let id = first["snapshot"].as_str().unwrap();
    let ls = f
        .node
        .json(&["ls", &id[..8], src.join("docs").to_str().unwrap()], 0)?;
    let paths: Vec<&str> = ls
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["path"].as_str().unwrap())
        .collect();
    let docs = src.join("docs");
    assert_eq!(
        paths,
        vec![
            docs.to_str().unwrap(),
            docs.join("a.txt").to_str().unwrap(),
            docs.join("b.txt").to_str().unwrap()
        ]
    );
    assert_eq!(ls[1]["type"], "file");
    assert_eq!(ls[1]["size"], 5);

    // Too-short prefixes are refused with a clear message.
    let short = f.node.json(&["ls", &id[..7]], 1)?;
    assert_eq!(short["error"]["kind"], "no_such_snapshot");

    let target = f.path("partial");
    f.node.json(
        &[
            "restore",
            &id[..12],
            "--target",
            target.to_str().unwrap(),
            "--path",
            docs.join("a.txt").to_str().unwrap(),
        ],
        0,
    )?;
    let out = restored(&target, &src);
    assert_eq!(std::fs::read(out.join("docs/a.txt"))?, b"alpha");
    assert!(!out.join("docs/b.txt").exists());
    assert!(!out.join("music").exists());
    Ok(())
}

#[test]
fn excludes_leave_out_what_they_match() -> TestResult {
    let f = Fixture::ready()?;
    let src = f.path("src");
    write(&src.join("keep.txt"), b"keep");
    write(&src.join("debug.log"), b"log");
    write(&src.join("deep/er/trace.log"), b"log");
    write(&src.join("build/main.o"), b"obj");
    write(&src.join("build/sub/keep.o"), b"obj in sub");
    write(
        &src.join("cache/CACHEDIR.TAG"),
        b"Signature: 8a477f597d28d172789f06886806bc55\n# a cache\n",
    );
    write(&src.join("cache/blob"), b"cached");
    write(&src.join("fakecache/CACHEDIR.TAG"), b"no signature here");
    write(&src.join("secret/key"), b"listed in the exclude file");
    let ex = f.path("excludes");
    std::fs::write(
        &ex,
        format!("# comment\n\n{}\n", src.join("secret").display()),
    )?;
    let report = f.node.backup(
        &[&src],
        &[
            "--exclude",
            "*.log",
            "--exclude",
            "build/*.o",
            "--exclude-file",
            ex.to_str().unwrap(),
            "--exclude-caches",
        ],
        0,
    )?;
    assert_eq!(report["files"], 3, "{report}"); // keep.txt, build/sub/keep.o, fakecache/CACHEDIR.TAG
    let ls = f.node.json(&["ls", "latest", src.to_str().unwrap()], 0)?;
    let rel: Vec<String> = ls
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            e["path"]
                .as_str()
                .unwrap()
                .strip_prefix(src.to_str().unwrap())
                .unwrap()
                .to_owned()
        })
        .collect();
    for gone in [
        "/debug.log",
        "/deep/er/trace.log",
        "/build/main.o",
        "/cache",
        "/cache/blob",
        "/secret",
        "/secret/key",
    ] {
        assert!(
            !rel.contains(&gone.to_owned()),
            "{gone} should be excluded: {rel:?}"
        );
    }
    for kept in [
        "/keep.txt",
        "/build/sub/keep.o",
        "/fakecache/CACHEDIR.TAG",
        "/deep/er",
    ] {
        assert!(
            rel.contains(&kept.to_owned()),
            "{kept} should be kept: {rel:?}"
        );
    }
    Ok(())
}

/// Makes everything below `path` owned by `uid`.
fn chown_all(path: &Path, uid: u32) {
    std::os::unix::fs::lchown(path, Some(uid), Some(uid)).unwrap();
    if std::fs::symlink_metadata(path).unwrap().is_dir() {
        for e in std::fs::read_dir(path).unwrap() {
            chown_all(&e.unwrap().path(), uid);
        }
    }
}

#[test]
fn unreadable_file_is_reported_and_the_backup_goes_on() -> TestResult {
    const NOBODY: u32 = 65534;
    let dir = crate::util::tempdir("obnam-test-")?;
    let mut node =
        obnam_simulations::Node::new(&crate::util::bins(), "node", &dir.path().join("node"), "")?;
    let src = dir.path().join("src");
    write(&src.join("fine.txt"), b"readable");
    write(&src.join("sub/also-fine"), b"readable too");
    write(&src.join("sub/locked"), b"no access");
    if is_root() {
        // Root reads everything: run the node as nobody, and lock the file away from it.
        chown_all(dir.path(), NOBODY);
        std::os::unix::fs::lchown(src.join("sub/locked"), Some(0), Some(0))?;
        node.run_as = Some((NOBODY, NOBODY));
    }
    chmod(&src.join("sub/locked"), 0o000);
    node.start()?;
    node.init("alice")?;
    let report = node.backup(&[&src], &[], 3)?;
    assert_eq!(report["failed_files"], 1, "{report}");
    assert_eq!(report["files"], 2, "{report}");
    let problems = report["problems"].as_array().unwrap();
    assert!(
        problems[0]["path"]
            .as_str()
            .unwrap()
            .ends_with("sub/locked"),
        "{report}"
    );
    assert!(
        problems[0]["error"]
            .as_str()
            .unwrap()
            .to_lowercase()
            .contains("permission"),
        "{report}"
    );
    // Without --json the skipped file is named on stderr.
    let human = node.obnam(&["backup", src.to_str().unwrap()])?;
    assert_eq!(human.code, 3);
    assert!(human.stderr.contains("sub/locked"), "{human:?}");
    let target = dir.path().join("restore");
    node.json(
        &["restore", "latest", "--target", target.to_str().unwrap()],
        0,
    )?;
    let out = restored(&target, &src);
    assert_eq!(std::fs::read(out.join("fine.txt"))?, b"readable");
    assert_eq!(std::fs::read(out.join("sub/also-fine"))?, b"readable too");
    assert!(!out.join("sub/locked").exists());
    Ok(())
}

fn outbox_packs(data_dir: &Path) -> usize {
    let Ok(subs) = std::fs::read_dir(data_dir.join("outbox")) else {
        return 0;
    };
    subs.filter_map(Result::ok)
        .filter_map(|s| std::fs::read_dir(s.path()).ok())
        .flatten()
        .filter_map(Result::ok)
        .filter(|e| e.path().extension() == Some(OsStr::new("pack")))
        .count()
}

fn random_file(path: &Path, len: u64) {
    use std::io::Read;
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    let mut src = std::fs::File::open("/dev/urandom").unwrap().take(len);
    let mut dst = std::fs::File::create(path).unwrap();
    std::io::copy(&mut src, &mut dst).unwrap();
}

fn wait_for(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn sigkill_mid_backup_loses_nothing() -> TestResult {
    let mut f = Fixture::ready()?;
    let src = f.path("src");
    random_file(&src.join("big"), 256 << 20);
    write(&src.join("small/a"), b"small file");
    let data_dir = f.node.data_dir.clone();
    let mut client = f.node.command(&["backup", src.to_str().unwrap(), "--json"]);
    client
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    let mut client = client.spawn()?;
    wait_for("the first pack", Duration::from_secs(120), || {
        outbox_packs(&data_dir) >= 1
    });
    f.node.kill();
    let status = client.wait()?;
    assert!(
        !status.success(),
        "the client must report the interrupted backup"
    );

    f.node.start()?;
    let snaps = f.node.json(&["snapshots"], 0)?;
    assert_eq!(
        snaps.as_array().unwrap().len(),
        0,
        "no snapshot may survive a crash mid-backup: {snaps}"
    );
    let status = f.node.json(&["status"], 0)?;
    assert!(
        status["outbox_packs"].as_u64().unwrap() >= 1,
        "packs written before the crash are kept: {status}"
    );

    let report = f.node.backup(&[&src], &[], 0)?;
    let bytes = report["bytes"].as_u64().unwrap();
    let new_bytes = report["new_bytes"].as_u64().unwrap();
    assert!(
        new_bytes + (4 << 20) <= bytes,
        "the second backup must reuse what was written: {report}"
    );
    let target = f.path("restore");
    f.node.json(
        &["restore", "latest", "--target", target.to_str().unwrap()],
        0,
    )?;
    compare_trees(&src, &restored(&target, &src), &[])?;
    Ok(())
}

#[test]
fn a_second_backup_waits_for_the_first_and_says_so() -> TestResult {
    let f = Fixture::ready()?;
    let big = f.path("big");
    random_file(&big.join("file"), 256 << 20);
    let small = f.path("small");
    write(&small.join("x"), b"x");
    let data_dir = f.node.data_dir.clone();
    let mut first = f.node.command(&["backup", big.to_str().unwrap(), "--json"]);
    first
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null());
    let first = first.spawn()?;
    wait_for(
        "the first backup to write a pack",
        Duration::from_secs(120),
        || outbox_packs(&data_dir) >= 1,
    );
    let second = f.node.obnam(&["backup", small.to_str().unwrap()])?;
    assert_eq!(second.code, 0, "{second:?}");
    let out = first.wait_with_output()?;
    assert!(out.status.success());
    assert!(
        second.stderr.contains("waiting for it to finish"),
        "the second backup must say it waits: {second:?}"
    );
    let snaps = f.node.json(&["snapshots"], 0)?;
    assert_eq!(snaps.as_array().unwrap().len(), 2);
    Ok(())
}

/// Unmounts on drop, so a failing test leaves no mount behind.
struct Mount(PathBuf);
impl Drop for Mount {
    fn drop(&mut self) {
        let _ = nix::mount::umount2(&self.0, nix::mount::MntFlags::MNT_DETACH);
    }
}

#[test]
fn one_file_system_stops_at_mount_points() -> TestResult {
    if !is_root() {
        eprintln!("skipped: mounting a tmpfs needs root");
        return Ok(());
    }
    let f = Fixture::ready()?;
    let src = f.path("src");
    write(&src.join("here"), b"same file system");
    let mnt = src.join("mnt");
    std::fs::create_dir_all(&mnt)?;
    nix::mount::mount(
        Some("tmpfs"),
        &mnt,
        Some("tmpfs"),
        nix::mount::MsFlags::empty(),
        Some("size=4m"),
    )?;
    let _guard = Mount(mnt.clone());
    write(&mnt.join("elsewhere"), b"another file system");

    let all = f.node.backup(&[&src], &[], 0)?;
    assert_eq!(all["files"], 2, "{all}");
    let one = f.node.backup(&[&src], &["--one-file-system"], 0)?;
    assert_eq!(one["files"], 1, "{one}");
    let ls = f.node.json(
        &[
            "ls",
            one["snapshot"].as_str().unwrap(),
            src.to_str().unwrap(),
        ],
        0,
    )?;
    let paths: Vec<&str> = ls
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["path"].as_str().unwrap())
        .collect();
    assert!(
        paths.contains(&mnt.to_str().unwrap()),
        "the mount point itself is kept: {paths:?}"
    );
    assert!(!paths.iter().any(|p| p.ends_with("elsewhere")), "{paths:?}");
    Ok(())
}

#[test]
fn the_nodes_own_data_directory_is_never_backed_up() -> TestResult {
    let f = Fixture::ready()?;
    // The fixture's directory holds the node's data directory, its log file and a source tree.
    write(&f.path("mine/notes.txt"), b"mine");
    let report = f.node.backup(&[f.dir.path()], &[], 0)?;
    assert_eq!(report["files"], 2, "notes.txt and node.log only: {report}");
    let ls = f
        .node
        .json(&["ls", "latest", f.dir.path().to_str().unwrap()], 0)?;
    let data = &f.node.data_dir;
    let paths: Vec<&str> = ls
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["path"].as_str().unwrap())
        .collect();
    assert!(
        !paths.iter().any(|p| Path::new(p).starts_with(data)),
        "the data directory was backed up: {paths:?}"
    );
    assert!(paths.iter().any(|p| p.ends_with("node.log")));
    assert!(paths.iter().any(|p| p.ends_with("mine/notes.txt")));
    Ok(())
}

#[test]
fn the_file_cache_skips_unchanged_files_and_sees_every_change() -> TestResult {
    let f = Fixture::ready()?;
    let src = f.path("src");
    write(&src.join("a.txt"), b"alpha");
    write(&src.join("b.bin"), &noise(300_000, 5));
    write(&src.join("sub/c.txt"), b"gamma");
    // Files changed within the cache's margin before a backup are always read again.
    std::thread::sleep(Duration::from_millis(2100));
    // Backups record /tmp's metadata too: keep other tests from changing it in between.
    let quiet = crate::util::quiet_tmp();
    let first = f.node.backup(&[&src], &[], 0)?;
    assert_eq!(first["cached_files"], 0, "{first}");
    let second = f.node.backup(&[&src], &[], 0)?;
    drop(quiet);
    assert_eq!(second["cached_files"], 3, "{second}");
    assert_eq!(second["new_bytes"], 0, "{second}");
    // Same size, same mtime, different content: only the ctime shows the change.
    let b = src.join("b.bin");
    let before = std::fs::symlink_metadata(&b)?;
    let mut changed = noise(300_000, 5);
    changed[1000] ^= 0xff;
    std::fs::write(&b, &changed)?;
    set_mtime(&b, (before.mtime(), before.mtime_nsec() as u32));
    assert_eq!(std::fs::metadata(&b)?.mtime_nsec(), before.mtime_nsec());
    assert_eq!(std::fs::metadata(&b)?.len(), before.len());
    std::fs::remove_dir_all(src.join("sub"))?;
    let third = f.node.backup(&[&src], &[], 0)?;
    assert_eq!(third["cached_files"], 1, "only a.txt is unchanged: {third}");
    assert!(third["new_bytes"].as_u64().unwrap() > 0, "{third}");
    let target = f.path("restore");
    f.node.json(
        &["restore", "latest", "--target", target.to_str().unwrap()],
        0,
    )?;
    assert_eq!(std::fs::read(restored(&target, &b))?, changed);
    assert!(!restored(&target, &src).join("sub").exists());
    // --force reads everything.
    let forced = f.node.backup(&[&src], &["--force"], 0)?;
    assert_eq!(forced["cached_files"], 0, "{forced}");
    assert_eq!(forced["files"], 2, "{forced}");
    Ok(())
}

#[test]
fn keys_rotate_without_friends_re_encrypts_in_place() -> TestResult {
    let f = Fixture::ready()?;
    let src = f.path("src");
    write(&src.join("a.txt"), b"alpha");
    write(&src.join("b.bin"), &noise(200_000, 9));
    f.node.backup(&[&src], &[], 0)?;
    write(&src.join("c.txt"), b"gamma");
    f.node.backup(&[&src], &[], 0)?;
    let secrets = f.node.data_dir.join("secrets");
    let old_secrets = std::fs::read(&secrets)?;
    let r = f.node.json(&["keys", "rotate"], 0)?;
    assert_eq!(r["snapshots"], 2, "{r}");
    assert_ne!(r["old_owner"], r["new_owner"]);
    assert_ne!(std::fs::read(&secrets)?, old_secrets);
    assert!(!f.node.data_dir.join("secrets.retired").exists());
    assert!(!f.node.data_dir.join("secrets.next").exists());
    assert!(!f.node.data_dir.join("outbox-next").exists());
    let snaps = f.node.json(&["snapshots"], 0)?;
    assert_eq!(snaps.as_array().unwrap().len(), 2);
    for (i, snap) in snaps.as_array().unwrap().iter().enumerate() {
        let target = f.path(&format!("restore-{i}"));
        let id = snap["id"].as_str().unwrap();
        f.node
            .json(&["restore", id, "--target", target.to_str().unwrap()], 0)?;
        let out = restored(&target, &src);
        assert_eq!(std::fs::read(out.join("b.bin"))?, noise(200_000, 9));
        assert_eq!(out.join("c.txt").exists(), i == 1);
    }
    // The passphrase still opens the (new) key slot.
    f.node.json(&["passphrase", "check"], 0)?;
    Ok(())
}
