//! What a backup leaves out.
//!
//! - **Glob patterns** (`--exclude`, `--exclude-file`): `*` and `?` stay within one path
//!   component, `**` crosses components, `[...]` is a class.
//!   - A pattern that starts with `/` matches the whole absolute path (`/home/*/.cache`).
//!   - A pattern with a `/` elsewhere matches the end of the path (`build/*.o`).
//!   - A pattern without `/` matches the file name anywhere (`*.log`).
//!
//!   A matched directory is skipped with everything below it.
//! - **Caches** (`--exclude-caches`): a directory that holds a `CACHEDIR.TAG` starting with
//!   the standard signature is skipped (<https://bford.info/cachedir/>).
//! - **The node's own data directory** is always skipped.
//! - Exclude files hold one pattern a line; blank lines and lines starting with `#` are ignored.

use crate::error::NodeError;
use globset::{GlobBuilder, GlobSet, GlobSetBuilder};
use std::io::Read;
use std::path::{Path, PathBuf};

const CACHEDIR_SIGNATURE: &[u8] = b"Signature: 8a477f597d28d172789f06886806bc55";

/// The exclusion rules of one backup.
pub struct Excluder {
    full: GlobSet,
    names: GlobSet,
    caches: bool,
    always: Vec<PathBuf>,
}

impl Excluder {
    /// Builds the rules.
    ///
    /// # Errors
    /// [`NodeError::Usage`] for an invalid pattern or an unreadable exclude file.
    pub fn new(
        patterns: &[String],
        files: &[PathBuf],
        caches: bool,
        always: &[PathBuf],
    ) -> Result<Self, NodeError> {
        let mut all: Vec<String> = patterns.to_vec();
        for f in files {
            let text = std::fs::read_to_string(f).map_err(|e| {
                NodeError::Usage(format!("cannot read exclude file {}: {e}", f.display()))
            })?;
            all.extend(
                text.lines()
                    .map(str::trim)
                    .filter(|l| !l.is_empty() && !l.starts_with('#'))
                    .map(str::to_owned),
            );
        }
        let mut full = GlobSetBuilder::new();
        let mut names = GlobSetBuilder::new();
        for p in &all {
            let trimmed = p.trim_end_matches('/');
            let (builder, glob) = if trimmed.starts_with('/') {
                (&mut full, trimmed.to_owned())
            } else if trimmed.contains('/') {
                (&mut full, format!("**/{trimmed}"))
            } else {
                (&mut names, trimmed.to_owned())
            };
            let g = GlobBuilder::new(&glob)
                .literal_separator(true)
                .backslash_escape(true)
                .build()
                .map_err(|e| NodeError::Usage(format!("invalid exclude pattern {p:?}: {e}")))?;
            builder.add(g);
        }
        let build = |b: GlobSetBuilder| {
            b.build()
                .map_err(|e| NodeError::Usage(format!("invalid exclude patterns: {e}")))
        };
        let mut always_all = Vec::new();
        for a in always {
            always_all.push(a.clone());
            if let Ok(c) = std::fs::canonicalize(a) {
                always_all.push(c);
            }
        }
        Ok(Self {
            full: build(full)?,
            names: build(names)?,
            caches,
            always: always_all,
        })
    }

    /// Whether `path` is excluded by a pattern or is the node's own data.
    pub fn excludes(&self, path: &Path) -> bool {
        if self.always.iter().any(|a| a == path) {
            return true;
        }
        if self.full.is_match(path) {
            return true;
        }
        path.file_name()
            .is_some_and(|n| self.names.is_match(Path::new(n)))
    }

    /// Whether `dir` is a cache directory to skip.
    pub fn is_excluded_cache(&self, dir: &Path) -> bool {
        if !self.caches {
            return false;
        }
        let mut buf = [0u8; CACHEDIR_SIGNATURE.len()];
        std::fs::File::open(dir.join("CACHEDIR.TAG"))
            .and_then(|mut f| f.read_exact(&mut buf))
            .is_ok_and(|()| buf == CACHEDIR_SIGNATURE)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ex(patterns: &[&str]) -> Excluder {
        let p: Vec<String> = patterns.iter().map(|s| s.to_string()).collect();
        Excluder::new(&p, &[], false, &[PathBuf::from("/data/obnam")]).unwrap()
    }

    #[test]
    fn pattern_kinds() {
        let e = ex(&["*.log", "/home/*/.cache", "build/*.o"]);
        assert!(e.excludes(Path::new("/x/y/a.log")));
        assert!(!e.excludes(Path::new("/x/y/a.log.txt")));
        assert!(e.excludes(Path::new("/home/al/.cache")));
        assert!(!e.excludes(Path::new("/home/al/x/.cache")));
        assert!(e.excludes(Path::new("/src/build/m.o")));
        assert!(!e.excludes(Path::new("/src/build/sub/m.o")));
        assert!(e.excludes(Path::new("/data/obnam")));
        assert!(!e.excludes(Path::new("/data/obnam2")));
    }

    #[test]
    fn bad_patterns_and_files_are_clear_errors() {
        let err = Excluder::new(&["a[".into()], &[], false, &[])
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("a["), "{err}");
        let err = Excluder::new(&[], &[PathBuf::from("/no/such/file")], false, &[])
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("/no/such/file"), "{err}");
    }

    #[test]
    fn exclude_files_and_caches() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("ex");
        std::fs::write(&f, "# comment\n\n*.tmp\n").unwrap();
        let cache = dir.path().join("c");
        std::fs::create_dir(&cache).unwrap();
        std::fs::write(
            cache.join("CACHEDIR.TAG"),
            b"Signature: 8a477f597d28d172789f06886806bc55\n",
        )
        .unwrap();
        let fake = dir.path().join("f");
        std::fs::create_dir(&fake).unwrap();
        std::fs::write(fake.join("CACHEDIR.TAG"), b"not a signature").unwrap();
        let e = Excluder::new(&[], std::slice::from_ref(&f), true, &[]).unwrap();
        assert!(e.excludes(Path::new("/a/b.tmp")));
        assert!(!e.excludes(Path::new("/a/# comment")));
        assert!(e.is_excluded_cache(&cache));
        assert!(!e.is_excluded_cache(&fake));
        let off = Excluder::new(&[], &[], false, &[]).unwrap();
        assert!(!off.is_excluded_cache(&cache));
    }
}
