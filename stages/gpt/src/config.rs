//! The model's shape (algorithm.md §2.1). The defaults are the record's; the demo
//! pipeline uses a smaller shape that trains on two CPU cores in minutes.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GptConfig {
    pub vocab_size: i64,
    pub layers: i64,
    pub d_model: i64,
    pub heads: i64,
    pub kv_heads: i64,
    pub mlp_mult: i64,
    /// Leading dims of each head that RoPE rotates; the rest pass through.
    pub rope_dims: i64,
    pub rope_base: f64,
    /// The length the rotary module was built for: a longer `seq_len` rescales the base
    /// (NTK-aware, §2.3).
    pub rope_train_len: i64,
    /// The window length training and pass-1 use.
    pub seq_len: i64,
    pub qk_gain_init: f64,
    pub logit_softcap: f64,
    /// XSA on this many last layers.
    pub xsa_last: i64,
    pub bigram_rows: i64,
    pub bigram_dim: i64,
    pub bigram_scale_init: f64,
    /// The record's ValueEmbedding: built, stored and counted, never applied (§2.6).
    /// Its table is vocab × kv_dim; `ve_layer_scales` is how many layers it names.
    pub value_embedding: bool,
    pub ve_layer_scales: i64,
}

impl Default for GptConfig {
    fn default() -> Self {
        GptConfig {
            vocab_size: 1024,
            layers: 6,
            d_model: 256,
            heads: 4,
            kv_heads: 2,
            mlp_mult: 3,
            rope_dims: 16,
            rope_base: 10000.0,
            rope_train_len: 1024,
            seq_len: 2048,
            qk_gain_init: 1.5,
            logit_softcap: 30.0,
            xsa_last: 4,
            bigram_rows: 2048,
            bigram_dim: 128,
            bigram_scale_init: 0.05,
            value_embedding: true,
            ve_layer_scales: 2,
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq)]
#[error("model shape: {0}")]
pub struct ShapeError(pub String);

impl GptConfig {
    pub fn head_dim(&self) -> i64 {
        self.d_model / self.heads
    }

    pub fn kv_dim(&self) -> i64 {
        self.kv_heads * self.head_dim()
    }

    pub fn mlp_hidden(&self) -> i64 {
        self.mlp_mult * self.d_model
    }

    /// Encoder layers; the decoder has the rest, and the first min(encoder, decoder)
    /// decoder layers each receive a U-Net skip.
    pub fn encoder_layers(&self) -> i64 {
        self.layers / 2
    }

    /// The RoPE base after NTK rescaling for `seq_len` (§2.3: 10000 → 22081.79… for 2048
    /// over 1024 with 16 rotated dims).
    pub fn effective_rope_base(&self) -> f64 {
        if self.seq_len > self.rope_train_len && self.rope_dims > 2 {
            let ratio = self.seq_len as f64 / self.rope_train_len as f64;
            self.rope_base * libm::pow(ratio, self.rope_dims as f64 / (self.rope_dims as f64 - 2.0))
        } else {
            self.rope_base
        }
    }

    pub fn validate(&self) -> Result<(), ShapeError> {
        let fail = |m: String| Err(ShapeError(m));
        if self.vocab_size < 2 || self.vocab_size > 65536 {
            return fail(format!(
                "vocab_size {} is outside 2..=65536",
                self.vocab_size
            ));
        }
        if self.layers < 1 || self.d_model < 1 || self.heads < 1 || self.kv_heads < 1 {
            return fail("layers, d_model, heads and kv_heads must be positive".into());
        }
        if self.d_model % self.heads != 0 {
            return fail(format!(
                "heads ({}) do not divide d_model ({})",
                self.heads, self.d_model
            ));
        }
        if self.heads % self.kv_heads != 0 {
            return fail(format!(
                "kv_heads ({}) do not divide heads ({})",
                self.kv_heads, self.heads
            ));
        }
        if self.rope_dims % 2 != 0 || self.rope_dims > self.head_dim() {
            return fail(format!(
                "rope_dims {} must be even and at most the head dim {}",
                self.rope_dims,
                self.head_dim()
            ));
        }
        if self.xsa_last > self.layers || self.xsa_last < 0 {
            return fail(format!(
                "xsa_last {} is outside 0..={}",
                self.xsa_last, self.layers
            ));
        }
        if self.bigram_rows < 2 || self.seq_len < 1 || self.mlp_mult < 1 {
            return fail("bigram_rows ≥ 2, seq_len ≥ 1 and mlp_mult ≥ 1 are required".into());
        }
        Ok(())
    }
}
