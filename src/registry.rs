//! Stage kinds the binary knows. Adding a stage means implementing
//! [`stage_api::Stage`] (its declaration, `SPEC`, says what it reads and writes) in a stage crate and adding one line to
//! [`Registry::with_builtin_stages`]; the runner itself never names a stage.

use std::collections::BTreeMap;

use stage_api::{AnyStage, Column, Produced};

#[derive(Default)]
pub struct Registry {
    stages: BTreeMap<&'static str, Box<dyn AnyStage>>,
}

impl Registry {
    pub fn with_builtin_stages() -> Registry {
        let mut registry = Registry::default();
        registry.register(Box::new(text::TokenizeStage));
        registry.register(Box::new(text::TokenStatsStage));
        registry.register(Box::new(gpt::TrainStage));
        registry.register(Box::new(pass1::Pass1Stage));
        registry.register(Box::new(cache::stages::CacheStage));
        registry.register(Box::new(cache::stages::CalibrateStage));
        registry.register(Box::new(cache::stages::Pass2Stage));
        registry.register(Box::new(cache::stages::AuditMassStage));
        registry.register(Box::new(legality::PerturbStage));
        registry.register(Box::new(legality::LegalityStage));
        registry.register(Box::new(legality::OverlapStage));
        registry.register(Box::new(legality::ArtifactStage));
        registry.register(Box::new(tilt::HintsStage));
        registry.register(Box::new(tilt::TiltStage));
        registry.register(Box::new(command::CommandStage));
        registry
    }

    pub fn register(&mut self, stage: Box<dyn AnyStage>) {
        self.stages.insert(stage.spec().kind, stage);
    }

    pub fn get(&self, kind: &str) -> Option<&dyn AnyStage> {
        self.stages.get(kind).map(|s| s.as_ref())
    }

    /// The declared columns of a stage's table (`pass2`, `scores`), if both exist.
    pub fn table_columns(&self, kind: &str, table: &str) -> Option<&'static [Column]> {
        match self.get(kind)?.spec().output(table)?.what {
            Produced::Table(columns) => Some(columns),
            Produced::File { .. } => None,
        }
    }

    pub fn kinds(&self) -> Vec<&'static str> {
        self.stages.keys().copied().collect()
    }
}
