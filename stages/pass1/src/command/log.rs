//! The scorer's log: what it printed, capped, and its last line for an error message.

use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::Path;

use super::LOG_CAP;

/// What a scorer printed, at most [`LOG_CAP`] bytes from its start and as many from its
/// end: a scorer that prints gigabytes must not fill the store (or a remote).
#[derive(Default)]
pub(super) struct CappedLog {
    head: Vec<u8>,
    tail: std::collections::VecDeque<u8>,
    dropped: u64,
}

impl CappedLog {
    pub(super) fn push(&mut self, mut bytes: &[u8]) {
        let room = LOG_CAP - self.head.len();
        let now = bytes.len().min(room);
        self.head.extend_from_slice(&bytes[..now]);
        bytes = &bytes[now..];
        self.tail.extend(bytes);
        let over = self.tail.len().saturating_sub(LOG_CAP);
        self.tail.drain(..over);
        self.dropped += over as u64;
    }

    pub(super) fn finish(&self) -> Vec<u8> {
        let mut out = self.head.clone();
        if self.dropped > 0 {
            out.extend_from_slice(
                format!(
                    "\n[cachemoney: {} bytes of the scorer's output dropped here; the log keeps the first and the last {} KiB]\n",
                    self.dropped,
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
pub(super) fn last_line(log: &Path) -> String {
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
