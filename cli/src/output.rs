//! Printing: human text on a terminal, or exactly one JSON document with `--json`.

use indicatif::{ProgressBar, ProgressStyle};
use obnam_protocol::control::{Event, Progress};
use serde_json::{Value, json};
use std::time::Duration;

/// Human-readable byte counts (binary units).
pub fn bytes(n: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

/// RFC 3339 (UTC, seconds) of nanoseconds since the epoch.
pub fn time(ns: i64) -> String {
    let secs = u64::try_from(ns.div_euclid(1_000_000_000)).unwrap_or(0);
    humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + Duration::from_secs(secs)).to_string()
}

/// Prints a JSON document on stdout.
pub fn print_json(v: &Value) {
    println!(
        "{}",
        serde_json::to_string_pretty(v).unwrap_or_else(|_| "null".into())
    );
}

/// Prints an error: JSON on stdout with `--json`, otherwise a line on stderr.
pub fn print_error(json_mode: bool, kind: &str, message: &str) {
    if json_mode {
        print_json(&json!({"error": {"kind": kind, "message": message}}));
    } else {
        eprintln!("obnam: error: {message}");
    }
}

/// Shows progress and problems on stderr while a request runs.
pub struct Reporter {
    bar: Option<ProgressBar>,
    quiet: bool,
}

impl Reporter {
    /// A reporter; the progress bar shows only when stderr is a terminal and not `quiet`.
    pub fn new(quiet: bool, what: &str) -> Self {
        let bar = if quiet {
            None
        } else {
            let bar = ProgressBar::with_draw_target(None, indicatif::ProgressDrawTarget::stderr());
            if bar.is_hidden() {
                None
            } else {
                bar.set_style(
                    ProgressStyle::with_template("{spinner} {prefix} {elapsed_precise} {msg}")
                        .unwrap_or_else(|_| ProgressStyle::default_spinner()),
                );
                bar.set_prefix(what.to_owned());
                bar.enable_steady_tick(Duration::from_millis(120));
                Some(bar)
            }
        };
        Self { bar, quiet }
    }

    /// Handles one event.
    pub fn event(&mut self, ev: Event) {
        match ev {
            Event::Progress(p) => self.progress(&p),
            Event::Notice(text) if !self.quiet => self.line(&text),
            Event::Warning(text) if !self.quiet => self.line(&format!("warning: {text}")),
            _ => {}
        }
    }

    fn progress(&self, p: &Progress) {
        if let Some(bar) = &self.bar {
            let mut cur = p.current.clone();
            if cur.len() > 60 {
                let cut = cur.len() - 57;
                let cut = (cut..cur.len())
                    .find(|i| cur.is_char_boundary(*i))
                    .unwrap_or(cut);
                cur = format!("...{}", &cur[cut..]);
            }
            bar.set_message(format!("{} files, {}  {cur}", p.files, bytes(p.bytes)));
        }
    }

    fn line(&self, text: &str) {
        match &self.bar {
            Some(bar) => bar.suspend(|| eprintln!("{text}")),
            None => eprintln!("{text}"),
        }
    }

    /// Removes the bar.
    pub fn finish(self) {
        if let Some(bar) = self.bar {
            bar.finish_and_clear();
        }
    }
}
