//! `cachemoney sql` without a query: the interactive prompt, and scripts piped in.

use std::io::IsTerminal;

use anyhow::{anyhow, bail, Result};

use crate::sql::{self, Format, SqlSession};

/// Gathers input lines into statements: a backslash command is one line, SQL runs when a
/// line ends with `;`.
#[derive(Default)]
struct StatementBuffer {
    text: String,
    /// The line the statement in progress started on (1-based).
    first_line: usize,
    lines: usize,
}

impl StatementBuffer {
    fn is_empty(&self) -> bool {
        self.text.is_empty()
    }

    /// Adds a line; returns a complete statement and the line it started on.
    fn push(&mut self, line: &str) -> Option<(String, usize)> {
        self.lines += 1;
        let trimmed = line.trim();
        if trimmed.is_empty() || (self.text.is_empty() && trimmed.starts_with("--")) {
            return None;
        }
        if self.text.is_empty() {
            self.first_line = self.lines;
        } else {
            self.text.push('\n');
        }
        self.text.push_str(trimmed);
        let complete = self.text.starts_with('\\') || self.text.ends_with(';');
        complete.then(|| self.take()).flatten()
    }

    /// What is left, as a statement (input ended without its `;`).
    fn take(&mut self) -> Option<(String, usize)> {
        let text = std::mem::take(&mut self.text);
        (!text.trim().is_empty()).then_some((text, self.first_line))
    }
}

fn is_quit(line: &str) -> bool {
    matches!(line.trim(), "\\q" | "exit" | "quit")
}

/// `cachemoney sql` without a query: a prompt on a terminal; otherwise a script read from
/// standard input, which stops at the first error (so a failing script fails).
pub(super) async fn interactive(session: &SqlSession, format: Format) -> Result<()> {
    if !std::io::stdin().is_terminal() {
        return script(session, format).await;
    }
    outln!(
        "cachemoney sql: {} tables; \\d lists them, \\q quits, statements end with ';'",
        session.tables.len()
    );
    let mut editor =
        rustyline::DefaultEditor::new().map_err(|e| anyhow!("cannot start the prompt: {e}"))?;
    let mut buffer = StatementBuffer::default();
    loop {
        let prompt = if buffer.is_empty() {
            "cachemoney> "
        } else {
            "        ...> "
        };
        let line = match editor.readline(prompt) {
            Ok(line) => line,
            Err(rustyline::error::ReadlineError::Interrupted) => {
                buffer = StatementBuffer::default();
                continue;
            }
            Err(rustyline::error::ReadlineError::Eof) => break,
            Err(e) => bail!("prompt failed: {e}"),
        };
        if buffer.is_empty() && is_quit(&line) {
            break;
        }
        let Some((statement, _)) = buffer.push(&line) else {
            continue;
        };
        let _ = editor.add_history_entry(statement.as_str());
        match sql::execute(session, &statement, format).await {
            Ok(text) => outln!("{text}"),
            Err(e) => eprintln!("error: {e:#}"),
        }
    }
    Ok(())
}

async fn script(session: &SqlSession, format: Format) -> Result<()> {
    use std::io::BufRead;
    let mut buffer = StatementBuffer::default();
    let mut statements = Vec::new();
    for line in std::io::stdin().lock().lines() {
        let line = line.map_err(|e| anyhow!("standard input: {e}"))?;
        if buffer.is_empty() && is_quit(&line) {
            break;
        }
        statements.extend(buffer.push(&line));
        for (statement, first_line) in statements.drain(..) {
            run_statement(session, &statement, first_line, format).await?;
        }
    }
    if let Some((statement, first_line)) = buffer.take() {
        run_statement(session, &statement, first_line, format).await?;
    }
    Ok(())
}

async fn run_statement(
    session: &SqlSession,
    statement: &str,
    first_line: usize,
    format: Format,
) -> Result<()> {
    let text = sql::execute(session, statement, format)
        .await
        .map_err(|e| anyhow!("standard input, line {first_line}: {e:#}"))?;
    outln!("{text}");
    Ok(())
}

/// DataFusion runs on tokio; its pool is sized like the stages' (`--threads`).
pub(super) fn sql_runtime() -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .worker_threads(rayon::current_num_threads().max(1))
        .enable_all()
        .build()?)
}
