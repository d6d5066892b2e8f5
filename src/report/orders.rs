//! The page's section on where the bits go: BPB by the n-gram order and the phrase
//! length each entry matched, from the chain's scores joined with its cache's matches.

use anyhow::Result;
use stage_api::products::{MATCHES, SCORES};

use super::plots::{self, Series};
use super::{floats, Built, Figure, Section};
use crate::sql::SqlSession;

/// Share of entries and final BPB by n-gram order and by phrase length.
pub(super) async fn by_order_and_length(
    chains: &[&Built<'_>],
    sql: &SqlSession,
) -> Result<Section> {
    let mut by_order: [(Vec<Series>, Vec<Series>); 2] = Default::default();
    let mut queries = [String::new(), String::new()];
    for chain in chains {
        let Some(cache) = chain.cache() else {
            continue;
        };
        let total = chain.pass2().map_or(0.0, |s| s.entries as f64);
        for (slot, column) in ["ngram_order", "phrase_length"].into_iter().enumerate() {
            let query = format!(
                "SELECT m.{column} AS k, count(*) AS n, sum(s.bits) AS bits, sum(CAST(s.bytes AS BIGINT)) AS bytes \
                 FROM \"{}\".\"{}\" s JOIN \"{cache}\".\"{}\" m ON s.position = m.position \
                 GROUP BY m.{column} ORDER BY k",
                chain.node,
                SCORES.name,
                MATCHES.name
            );
            let batches = sql.query(&query).await?;
            let k = floats(&batches, "k")?;
            let n = floats(&batches, "n")?;
            let bits = floats(&batches, "bits")?;
            let bytes = floats(&batches, "bytes")?;
            let name = format!("{} ({})", chain.node, chain.mode());
            let mut rate = Series {
                name: name.clone(),
                points: Vec::new(),
            };
            let mut bpb = Series {
                name,
                points: Vec::new(),
            };
            for i in 0..k.len() {
                let (Some(k), Some(n), Some(bits), Some(bytes)) = (k[i], n[i], bits[i], bytes[i])
                else {
                    continue;
                };
                rate.points.push((k, n / total.max(1.0)));
                if bytes > 0.0 {
                    bpb.points.push((k, bits / bytes));
                }
            }
            by_order[slot].0.push(rate);
            by_order[slot].1.push(bpb);
            queries[slot].push_str(&query);
            queries[slot].push_str(";\n");
        }
    }
    let mut figures = Vec::new();
    for (slot, (what, id)) in [("n-gram order", "ngram"), ("phrase length", "phrase")]
        .into_iter()
        .enumerate()
    {
        let (rates, bpbs) = &mut by_order[slot];
        if rates.iter().all(|s| s.points.is_empty()) {
            continue;
        }
        // A categorical axis of the orders (lengths) that occur: "none", 2, 3, … (16, 32, …).
        let mut present: Vec<f64> = rates
            .iter()
            .flat_map(|s| s.points.iter().map(|p| p.0))
            .collect();
        present.sort_by(f64::total_cmp);
        present.dedup();
        let names: Vec<String> = present
            .iter()
            .map(|&k| {
                if k == 0.0 {
                    "none".to_string()
                } else {
                    format!("{k}")
                }
            })
            .collect();
        for series in rates.iter_mut().chain(bpbs.iter_mut()) {
            for point in &mut series.points {
                point.0 = present.iter().position(|&k| k == point.0).unwrap_or(0) as f64;
            }
        }
        let ticks = Some(names.as_slice());
        figures.push(Figure {
            id: format!("{id}-match-rate"),
            svg: plots::lines(
                &format!("Share of entries by {what}"),
                what,
                "share of entries",
                rates,
                ticks,
            )?,
            caption: format!("The {what} each entry's cache lookup settled on (none: no match), as a share of the chain's entries."),
            query: Some(queries[slot].clone()),
        });
        figures.push(Figure {
            id: format!("{id}-bpb"),
            svg: plots::lines(
                &format!("Final BPB by {what}"),
                what,
                "bits per byte",
                bpbs,
                ticks,
            )?,
            caption: format!(
                "Final bits per byte of the entries at each {what}: where the cache pays."
            ),
            query: Some(queries[slot].clone()),
        });
    }
    Ok(Section {
        title: "By n-gram order and phrase length",
        intro: "How often each order or phrase length is the one used, and how many bits its entries cost after blending. In the reference mode high orders match almost everywhere on repeated text, because each position's own continuation is in the tables.".into(),
        figures,
        missing: None,
    })
}
