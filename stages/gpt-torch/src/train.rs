//! One training step as the record takes it (§3): a window of consecutive tokens from
//! a wrapping stream, cross-entropy over every position, global clipping at 0.3, Muon
//! for the banks, AdamW "tok" for the embedding tables, AdamW "scalar" for the rest,
//! then the EMA update.

use tch::{nn, Kind, Tensor};

use crate::model::Gpt;
use crate::optim::{clip_grad_norm, AdamW, Ema, Muon};

#[derive(Debug, Clone, PartialEq)]
pub struct TrainConfig {
    pub matrix_lr: f64,
    pub tied_embed_lr: f64,
    pub scalar_lr: f64,
    pub weight_decay: f64,
    pub grad_clip: f64,
    pub ema_decay: f64,
    pub momentum_warmup_steps: usize,
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            matrix_lr: 0.025,
            tied_embed_lr: 0.035,
            scalar_lr: 0.025,
            weight_decay: 0.04,
            grad_clip: 0.3,
            ema_decay: 0.997,
            momentum_warmup_steps: 1500,
        }
    }
}

/// Which optimiser owns a variable (§2.9's last column).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Group {
    Muon,
    Tok,
    Scalar,
}

pub fn group_of(name: &str) -> Group {
    match name {
        "qo_bank" | "kv_bank" | "mlp_up_bank" | "mlp_down_bank" => Group::Muon,
        "tok_emb.weight" | "bigram.embed.weight" | "ve_shared.embed.weight" => Group::Tok,
        _ => Group::Scalar,
    }
}

/// The consecutive-token stream of §3.1: each batch takes `batch · seq_len + 1` tokens,
/// x the first `batch · seq_len`, y the same shifted by one; the next batch starts where
/// this one's x ended plus one, and the stream wraps at the end.
pub struct TokenStream {
    tokens: Vec<i64>,
    position: usize,
}

impl TokenStream {
    pub fn new(tokens: &[u16]) -> TokenStream {
        TokenStream {
            tokens: tokens.iter().map(|&t| t as i64).collect(),
            position: 0,
        }
    }

    pub fn next_batch(&mut self, batch: i64, seq_len: i64) -> (Tensor, Tensor) {
        let want = (batch * seq_len) as usize + 1;
        let chunk: Vec<i64> = (0..want)
            .map(|k| self.tokens[(self.position + k) % self.tokens.len()])
            .collect();
        self.position = (self.position + want) % self.tokens.len();
        let x = Tensor::from_slice(&chunk[..want - 1]).view([batch, seq_len]);
        let y = Tensor::from_slice(&chunk[1..]).view([batch, seq_len]);
        (x, y)
    }
}

pub struct Trainer {
    params: Vec<Tensor>,
    groups: [Vec<Tensor>; 3],
    muon: Muon,
    tok: AdamW,
    scalar: AdamW,
    ema: Ema,
    config: TrainConfig,
    step: usize,
}

impl Trainer {
    pub fn new(vs: &nn::VarStore, config: &TrainConfig) -> Trainer {
        let mut named: Vec<(String, Tensor)> = vs.variables().into_iter().collect();
        named.sort_by(|a, b| a.0.cmp(&b.0));
        let pick = |g: Group| -> Vec<Tensor> {
            named
                .iter()
                .filter(|(n, _)| group_of(n) == g)
                .map(|(_, t)| t.shallow_clone())
                .collect()
        };
        let groups = [pick(Group::Muon), pick(Group::Tok), pick(Group::Scalar)];
        let mut muon = Muon::new(&groups[0], config.matrix_lr, config.weight_decay);
        muon.momentum_warmup_steps = config.momentum_warmup_steps;
        let tok = AdamW::new(&groups[1], config.tied_embed_lr, config.weight_decay);
        let scalar = AdamW::new(&groups[2], config.scalar_lr, config.weight_decay);
        let params: Vec<Tensor> = named.iter().map(|(_, t)| t.shallow_clone()).collect();
        Trainer {
            ema: Ema::new(&params, config.ema_decay),
            params,
            groups,
            muon,
            tok,
            scalar,
            config: config.clone(),
            step: 0,
        }
    }

    /// One optimiser step on (x, y) at learning-rate multiplier `scale`; returns the
    /// mean cross-entropy (nats) before the step.
    pub fn step(&mut self, model: &Gpt, x: &Tensor, y: &Tensor, scale: f64) -> f64 {
        for p in &self.params {
            let mut grad = p.grad();
            if grad.defined() {
                let _ = grad.zero_();
            }
        }
        let vocab = model.config().vocab_size;
        let logits = model.forward(x).to_kind(Kind::Float);
        let loss = logits
            .view([-1, vocab])
            .cross_entropy_for_logits(&y.view([-1]));
        loss.backward();
        clip_grad_norm(&self.params, self.config.grad_clip);
        self.muon.step(&self.groups[0], self.step, scale);
        self.tok.step(&self.groups[1], scale);
        self.scalar.step(&self.groups[2], scale);
        self.ema.update(&self.params);
        self.step += 1;
        loss.double_value(&[])
    }

    /// Replaces the weights by their EMA (the record's final weights).
    pub fn finish(&self) {
        self.ema.apply(&self.params);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{seeded, small};
    use crate::Gpt;
    use tch::{nn, Device, Tensor};

    #[test]
    fn optimiser_groups_follow_the_inventory() {
        use crate::train::{group_of, Group};
        assert_eq!(group_of("mlp_up_bank"), Group::Muon);
        assert_eq!(group_of("bigram.embed.weight"), Group::Tok);
        assert_eq!(group_of("bigram.proj.weight"), Group::Scalar);
        assert_eq!(group_of("blocks.3.attn.q_gain"), Group::Scalar);
    }

    /// A few steps on a repetitive stream: the loss falls a lot, and two seeded runs
    /// give the same weights bit for bit.
    fn train_small(seed: i64, steps: usize) -> (Vec<f64>, Vec<Tensor>) {
        let _seeded = seeded(seed);
        let config = small();
        let vs = nn::VarStore::new(Device::Cpu);
        let model = Gpt::new(&vs.root(), &config).unwrap();
        let mut trainer = Trainer::new(&vs, &TrainConfig::default());
        let text: Vec<u16> = (0..4000)
            .map(|i| ((i * 7) % 61 + (i / 200) % 3) as u16)
            .collect();
        let mut stream = TokenStream::new(&text);
        let losses = (0..steps)
            .map(|_| {
                let (x, y) = stream.next_batch(4, 32);
                trainer.step(&model, &x, &y, 1.0)
            })
            .collect();
        trainer.finish();
        let mut named: Vec<_> = vs.variables().into_iter().collect();
        named.sort_by(|a, b| a.0.cmp(&b.0));
        (
            losses,
            named.into_iter().map(|(_, t)| t.detach().copy()).collect(),
        )
    }

    #[test]
    fn training_learns_and_is_deterministic() {
        let (losses, weights) = train_small(11, 60);
        let first = losses[0];
        let last = losses[losses.len() - 5..].iter().sum::<f64>() / 5.0;
        assert!(first > 6.0, "starts near ln 1024: {first}");
        assert!(last < first / 2.0, "loss {first} -> {last}");
        let (again, weights_again) = train_small(11, 60);
        assert_eq!(losses, again);
        for (a, b) in weights.iter().zip(&weights_again) {
            assert!(a.equal(b));
        }
    }
}
