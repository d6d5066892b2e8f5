//! A command's results on standard output.
//!
//! `cachemoney sql … | head` closes the pipe before we are done: that is the reader's
//! choice, not a failure. Rust leaves SIGPIPE ignored, so the write fails with
//! `BrokenPipe`; [`outln!`] returns that error like `?` would, it travels up like any
//! other, and `main` ends quietly on it ([`is_broken_pipe`]), as ripgrep does. Resetting
//! SIGPIPE to its default instead would also kill the process, without a word, when a
//! remote's socket closes under a write.

use std::io::Write;

/// Writes one line to standard output.
pub fn write_line(line: std::fmt::Arguments) -> std::io::Result<()> {
    let mut out = std::io::stdout().lock();
    out.write_fmt(line)?;
    out.write_all(b"\n")
}

/// Whether `error` is (or wraps) a write to a reader that went away.
pub fn is_broken_pipe(error: &anyhow::Error) -> bool {
    error.chain().any(|cause| {
        cause
            .downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
    })
}

/// `println!` for results: returns the write's error from the enclosing function, as `?`
/// would (a closed pipe included, see the module's comment), instead of panicking.
#[macro_export]
macro_rules! outln {
    () => {
        $crate::output::write_line(format_args!(""))?
    };
    ($($arg:tt)*) => {
        $crate::output::write_line(format_args!($($arg)*))?
    };
}
