//! A remote's failures as one line: what went wrong in words, and what to do about it.

use anyhow::anyhow;

use super::Remote;

impl Remote {
    /// A failure of the remote as one line: the URL, what went wrong in words, and what
    /// to do about it.
    pub(super) fn explain(&self, error: object_store::Error) -> anyhow::Error {
        use object_store::Error as E;
        // Classified on the whole chain, shown clipped.
        let detail = chain_of(&error);
        let reason = match &error {
            _ if detail.contains("NoSuchBucket") => {
                "the bucket does not exist (create it, or fix the URL)".to_string()
            }
            E::NotFound { .. } => format!("not found ({}); does the bucket exist?", clip(&detail)),
            // With no keys in the environment, the S3 client asks the instance metadata
            // service, which a laptop does not have.
            _ if detail.contains("169.254.169.254") => {
                "no credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (no instance profile answered either)".to_string()
            }
            _ if is_denied(&error, &detail) => {
                return anyhow::Error::new(super::Denied {
                    url: self.url.clone(),
                    code: s3_error_code(&detail).map_or_else(|| innermost(&error), str::to_string),
                })
            }
            _ if is_unreachable(&detail) => format!(
                "cannot reach the server ({}); check the endpoint (AWS_ENDPOINT for an S3-compatible server), or pass --offline to work without the remote",
                innermost(&error)
            ),
            _ => clip(&detail),
        };
        anyhow!("remote {}: {reason}", self.url)
    }
}

/// The deepest cause of an error (the I/O error under the HTTP error under the retry),
/// on one line and not too long (an XML error body is long).
fn innermost(error: &(dyn std::error::Error + 'static)) -> String {
    let mut deepest: &(dyn std::error::Error + 'static) = error;
    while let Some(source) = deepest.source() {
        deepest = source;
    }
    clip(&deepest.to_string())
}

pub(super) fn one_line(error: &(dyn std::error::Error + 'static)) -> String {
    clip(&chain_of(error))
}

/// An error and its causes, each said once, joined on one line.
fn chain_of(error: &(dyn std::error::Error + 'static)) -> String {
    let mut parts = vec![error.to_string()];
    let mut current = error.source();
    while let Some(source) = current {
        let text = source.to_string();
        if !parts.iter().any(|p| p.contains(&text)) {
            parts.push(text);
        }
        current = source.source();
    }
    parts.join(": ")
}

pub(super) fn clip(text: &str) -> String {
    let text = text.split_whitespace().collect::<Vec<_>>().join(" ");
    match text.char_indices().nth(300) {
        Some((at, _)) => format!("{}…", &text[..at]),
        None => text,
    }
}

/// The `<Code>` of an S3 error body quoted in a message (`SignatureDoesNotMatch`).
fn s3_error_code(detail: &str) -> Option<&str> {
    let start = detail.find("<Code>")? + "<Code>".len();
    let length = detail[start..].find("</Code>")?;
    Some(&detail[start..start + length])
}

/// 401 and 403, whichever way the client reports them (object_store maps some to
/// `PermissionDenied`, and leaves a listing's as a generic error with the status).
fn is_denied(error: &object_store::Error, detail: &str) -> bool {
    matches!(
        error,
        object_store::Error::PermissionDenied { .. } | object_store::Error::Unauthenticated { .. }
    ) || [
        "403 Forbidden",
        "401 Unauthorized",
        "SignatureDoesNotMatch",
        "InvalidAccessKeyId",
        "AccessDenied",
    ]
    .iter()
    .any(|needle| detail.contains(needle))
}

fn is_unreachable(detail: &str) -> bool {
    let detail = detail.to_ascii_lowercase();
    [
        "connection refused",
        "error sending request",
        "connection reset",
        "dns error",
        "timed out",
        "connection closed",
        "broken pipe",
    ]
    .iter()
    .any(|needle| detail.contains(needle))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_stay_on_one_line_and_short() {
        let long = format!("a\n{}", "b ".repeat(400));
        let clipped = clip(&long);
        assert!(!clipped.contains('\n'));
        assert!(clipped.chars().count() <= 301, "{}", clipped.len());
    }

    #[test]
    fn a_refused_connection_reads_as_unreachable() {
        assert!(is_unreachable(
            "Generic S3 error: error sending request for url: Connection refused (os error 111)"
        ));
        assert!(!is_unreachable("access denied"));
    }
}
