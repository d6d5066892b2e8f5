//! Stage kinds the binary knows. Adding a stage means implementing
//! [`stage_api::Stage`] (its declaration, `SPEC`, says what it reads and writes) in a stage crate and adding one line to
//! [`Registry::with_builtin_stages`]; the runner itself never names a stage.

use std::collections::BTreeMap;

use stage_api::{AnyStage, Column, Produced, Product, Read, ReadKind};

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

    /// Every registered stage's outputs that are declared under a product's name but
    /// lack what makes them that product ([`stage_api::products`]).
    pub fn product_problems(&self) -> Vec<String> {
        let mut problems = Vec::new();
        for (kind, stage) in &self.stages {
            for output in stage.spec().outputs {
                let Some(product) = Product::named(output.name) else {
                    continue;
                };
                if let Some(lack) = product.lacks(output) {
                    problems.push(format!("stage '{kind}' declares {}: {lack}", output.name));
                }
            }
        }
        problems
    }

    /// Checks reads made by SQL (the report's, say) at load: each reads a product that
    /// some registered stage produces, and only columns of the product's own, which every
    /// producer declares (derived columns included: SQL computes them).
    pub fn check_sql_reads(&self, reads: &[Read]) -> Result<(), String> {
        if let Some(problem) = self.product_problems().into_iter().next() {
            return Err(problem);
        }
        for read in reads {
            let product = Product::named(read.name).ok_or_else(|| {
                format!("{}: not a product (stage_api::products)", read.signature())
            })?;
            if let ReadKind::Table(columns) = read.what {
                if let Some(c) = columns.iter().find(|c| !product.columns.contains(c)) {
                    return Err(format!(
                        "{}: column {c} is not one of {}'s own ({}), which every producer declares",
                        read.signature(),
                        product.name,
                        product.columns.join(", ")
                    ));
                }
            }
            let produced = self
                .stages
                .values()
                .any(|s| s.spec().output(product.name).is_some());
            if !produced {
                return Err(format!(
                    "{}: no stage produces {}",
                    read.signature(),
                    product.name
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A stage that renames a product's column breaks this test, not a figure of the
    /// report or a chain of `compare` at run time.
    #[test]
    fn every_product_is_declared_with_its_columns_by_every_producer() {
        assert_eq!(
            Registry::with_builtin_stages().product_problems(),
            Vec::<String>::new()
        );
    }

    /// The inputs a judge declares `by_pipeline` are exactly those its re-runs wire: the
    /// cuts, the guides and the companion's. The pipeline refuses the declared ones in
    /// `pipeline.toml`, so a wired input missing from the declaration could be written
    /// by hand, and a declared one never wired would be listed for nothing.
    #[test]
    fn inputs_wired_by_the_pipeline_are_declared_so() {
        let registry = Registry::with_builtin_stages();
        for kind in registry.kinds() {
            let spec = registry.get(kind).expect("listed").spec();
            let declared: std::collections::BTreeSet<&str> = spec
                .inputs
                .iter()
                .filter(|i| i.by_pipeline)
                .map(|i| i.name)
                .collect();
            let mut wired = std::collections::BTreeSet::new();
            if let Some(reruns) = &spec.reruns {
                wired.extend(reruns.wired_as.iter().copied());
                wired.extend(reruns.guides.iter().map(|(_, input)| *input));
                if let Some((_, original, copies)) = reruns.companion {
                    wired.insert(original);
                    wired.extend(copies.iter().copied());
                }
            }
            assert_eq!(declared, wired, "{}", spec.kind);
        }
    }

    #[test]
    fn a_read_of_a_column_outside_the_product_is_refused_at_load() {
        let registry = Registry::with_builtin_stages();
        let reads = [stage_api::products::SCORES.read(&["position", "bits"])];
        assert_eq!(registry.check_sql_reads(&reads), Ok(()));
        let reads = [Read::table("scores", &["position", "p_final"])];
        let problem = registry.check_sql_reads(&reads).unwrap_err();
        assert!(
            problem.contains("column p_final is not one of scores's own"),
            "{problem}"
        );
        let reads = [Read::table("nonsense", &["x"])];
        assert!(registry.check_sql_reads(&reads).is_err());
    }
}
