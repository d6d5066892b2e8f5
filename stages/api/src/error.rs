use std::path::PathBuf;

/// Errors a stage reports. Every variant renders as one line that names the file or the
/// node and says what is wrong, because that line is what the user sees.
#[derive(Debug, thiserror::Error)]
pub enum StageError {
    /// A raw input file or an input artifact is unusable.
    #[error("{}: {message}", path.display())]
    Input { path: PathBuf, message: String },

    /// A parameter value is invalid (found while canonicalising, before the runner has
    /// placed the stage in a node; it adds the node and the pipeline location).
    #[error("{0}")]
    InvalidParams(String),

    /// One parameter's value is invalid; `param` is its path in the node's `params`
    /// (`seed`, `model.layers`), which the runner uses to point at its line.
    #[error("params.{param}: {message}")]
    InvalidParam { param: String, message: String },

    /// Something about the node itself (its parameters together, its wiring, its
    /// files) is wrong, found while running it.
    #[error("node '{node}': {message}")]
    Node { node: String, message: String },

    /// Reading or writing failed at the OS level.
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// Arrow or Parquet failed on a file.
    #[error("{}: {message}", path.display())]
    Format { path: PathBuf, message: String },
}

impl StageError {
    pub fn input(path: impl Into<PathBuf>, message: impl Into<String>) -> Self {
        StageError::Input {
            path: path.into(),
            message: message.into(),
        }
    }

    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        StageError::Io {
            path: path.into(),
            source,
        }
    }

    pub fn invalid_param(param: impl Into<String>, message: impl Into<String>) -> Self {
        StageError::InvalidParam {
            param: param.into(),
            message: message.into(),
        }
    }

    pub fn format(path: impl Into<PathBuf>, err: impl std::fmt::Display) -> Self {
        StageError::Format {
            path: path.into(),
            message: err.to_string(),
        }
    }
}
