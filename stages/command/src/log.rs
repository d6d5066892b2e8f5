//! A program's log: what it printed, capped, and its last line for an error message.

use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::Path;

/// The log keeps this many bytes from the start and as many from the end of what the
/// program printed, and says how much it dropped between.
pub const LOG_CAP: usize = 512 * 1024;

/// What a program printed, at most [`LOG_CAP`] bytes from its start and as many from its
/// end: a program that prints gigabytes must not fill the store (or a remote).
pub(crate) struct CappedLog {
    /// "scorer", "command": what the drop notice calls it.
    what: String,
    head: Vec<u8>,
    tail: std::collections::VecDeque<u8>,
    dropped: u64,
}

impl CappedLog {
    pub(crate) fn new(what: &str) -> CappedLog {
        CappedLog {
            what: what.to_string(),
            head: Vec::new(),
            tail: Default::default(),
            dropped: 0,
        }
    }

    pub(crate) fn push(&mut self, mut bytes: &[u8]) {
        let room = LOG_CAP - self.head.len();
        let now = bytes.len().min(room);
        self.head.extend_from_slice(&bytes[..now]);
        bytes = &bytes[now..];
        self.tail.extend(bytes);
        let over = self.tail.len().saturating_sub(LOG_CAP);
        self.tail.drain(..over);
        self.dropped += over as u64;
    }

    pub(crate) fn finish(&self) -> Vec<u8> {
        let mut out = self.head.clone();
        if self.dropped > 0 {
            out.extend_from_slice(
                format!(
                    "\n[cachemoney: {} bytes of the {}'s output dropped here; the log keeps the first and the last {} KiB]\n",
                    self.dropped,
                    self.what,
                    LOG_CAP / 1024
                )
                .as_bytes(),
            );
        }
        out.extend(self.tail.iter());
        out
    }
}

/// `: LAST LINE` of the log, or `: (empty)`.
pub(crate) fn last_line(log: &Path) -> String {
    let last = File::open(log).ok().and_then(|f| {
        BufReader::new(f)
            .lines()
            .map_while(Result::ok)
            .filter(|l| !l.trim().is_empty())
            .last()
    });
    match last {
        Some(line) => format!(": {}", line.trim()),
        None => " (empty)".into(),
    }
}
