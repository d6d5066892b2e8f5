//! What `pass1` reports, typed: its two writers (this crate for the bigram, an import and
//! a scorer; the GPT worker for the GPT) and whoever reads it back share one shape.

use serde::{Deserialize, Serialize};
use stage_api::windows::Tail;

/// The figures every `pass1` reports, whichever model scored: the table's size and the
/// model's own BPB over it.
#[derive(Debug, Serialize, Deserialize)]
pub struct Pass1Summary {
    pub entries: u64,
    pub bytes: u64,
    pub neural_bpb: f64,
}

/// What `pass1` reports about the recipe.
#[derive(Debug, Serialize, Deserialize)]
pub struct Pass1Report {
    #[serde(flatten)]
    pub summary: Pass1Summary,
    /// `bigram`, `import`, `gpt` or `command`.
    pub model: String,
}

/// What a GPT `pass1` reports besides [`Pass1Report`]: the windows it scored.
#[derive(Debug, Serialize, Deserialize)]
pub struct GptScoring {
    pub windows: u64,
    pub n_ctx: u64,
    pub stride: u64,
    pub tail: Tail,
    pub device: gpt::Device,
}

/// What an in-process `pass1` reports about the build (volatile entries): the kernels a
/// scorer was pinned to ([`stage_api::NUMERICS_KEY`]) and the sandbox it ran in.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct Pass1Build {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub numerics: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sandbox: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_scorers_kernels_are_recorded_under_the_numerics_key() {
        let build = Pass1Build {
            numerics: Some("cpu".into()),
            sandbox: None,
        };
        let report = stage_api::StageReport::default().with_volatile_fields(&build);
        assert_eq!(report.summary[stage_api::NUMERICS_KEY], "cpu");
        assert!(!report.summary.contains_key("sandbox"));
    }
}
