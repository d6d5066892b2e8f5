//! Fidelity to the record's own numpy code: `tests/fixtures/golden/` (outputs of the
//! record's code, kept in the repository) holds its tables' SHA-256,
//! its per-position lookups, its calibrated pair and its val_bpb on a 300,001-token
//! stream, at small and at the record's full table sizes.

use std::path::PathBuf;

use arrow::array::AsArray;
use arrow::compute::cast;
use arrow::datatypes::{DataType, Float32Type, Float64Type, Int64Type, UInt16Type};
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use sha2::{Digest, Sha256};

use cachemoney_cache::figures::Waterfall;
use cachemoney_cache::{
    calibrate, BlendParams, CalibrationGrid, Entry, NgramConfig, NgramTables, PhraseConfig,
    PhraseTables,
};

fn golden_dir(case: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/golden")
        .join(case)
}

/// Reads one column of a Parquet file, cast to `to`.
fn column(case: &str, file: &str, name: &str, to: &DataType) -> Vec<arrow::array::ArrayRef> {
    let path = golden_dir(case).join(file);
    let reader = ParquetRecordBatchReaderBuilder::try_new(std::fs::File::open(&path).unwrap())
        .unwrap()
        .build()
        .unwrap();
    reader
        .map(|b| {
            let b = b.unwrap();
            let col = b
                .column_by_name(name)
                .unwrap_or_else(|| panic!("{file}: no column {name}"));
            cast(col, to).unwrap()
        })
        .collect()
}

fn f64s(case: &str, file: &str, name: &str) -> Vec<f64> {
    column(case, file, name, &DataType::Float64)
        .iter()
        .flat_map(|a| a.as_primitive::<Float64Type>().values().to_vec())
        .collect()
}

fn f32s(case: &str, file: &str, name: &str) -> Vec<f32> {
    column(case, file, name, &DataType::Float32)
        .iter()
        .flat_map(|a| a.as_primitive::<Float32Type>().values().to_vec())
        .collect()
}

fn ints(case: &str, file: &str, name: &str) -> Vec<i64> {
    column(case, file, name, &DataType::Int64)
        .iter()
        .flat_map(|a| a.as_primitive::<Int64Type>().values().to_vec())
        .collect()
}

fn bools(case: &str, file: &str, name: &str) -> Vec<bool> {
    column(case, file, name, &DataType::Boolean)
        .iter()
        .flat_map(|a| {
            let a = a.as_boolean();
            (0..a.len()).map(move |i| a.value(i)).collect::<Vec<_>>()
        })
        .collect()
}

fn sha256_u32(table: &[u32]) -> String {
    let mut hasher = Sha256::new();
    for v in table {
        hasher.update(v.to_le_bytes());
    }
    hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn check_case(case: &str) {
    let expected: serde_json::Value =
        serde_json::from_slice(&std::fs::read(golden_dir(case).join("expected.json")).unwrap())
            .unwrap();
    let tokens: Vec<u16> = column(case, "tokens.parquet", "token", &DataType::UInt16)
        .iter()
        .flat_map(|a| a.as_primitive::<UInt16Type>().values().to_vec())
        .collect();
    assert_eq!(
        tokens.len() as u64,
        expected["tokens_including_position_0"].as_u64().unwrap()
    );

    let ngram_config = NgramConfig {
        buckets: expected["ngram_buckets"].as_u64().unwrap() as usize,
        ..NgramConfig::default()
    };
    let phrase_config = PhraseConfig {
        buckets: expected["phrase_buckets"].as_u64().unwrap() as usize,
        ..PhraseConfig::default()
    };
    let ngram = NgramTables::build(&tokens, &ngram_config.validated().unwrap());
    let phrase = PhraseTables::build(&tokens, &phrase_config.validated().unwrap());

    // Every count table, bit for bit.
    let shas = &expected["table_sha256_uint32_le"];
    for order in 2..=16 {
        assert_eq!(
            sha256_u32(ngram.ctx_table(order)),
            shas[format!("ngram_ctx_{order}")],
            "{case} ctx {order}"
        );
        assert_eq!(
            sha256_u32(&ngram.full_table(order)),
            shas[format!("ngram_full_{order}")],
            "{case} full {order}"
        );
    }
    assert_eq!(
        sha256_u32(&phrase.ctx),
        shas["phrase_ctx"],
        "{case} phrase ctx"
    );
    assert_eq!(
        sha256_u32(&phrase.full),
        shas["phrase_full"],
        "{case} phrase full"
    );

    // Every lookup, exactly.
    let ngram_matches = ngram.lookup_all(&tokens);
    let phrase_matches = phrase.lookup_all(&tokens);
    let (ng_q, ng_m, ng_o) = (
        f64s(case, "lookups.parquet", "ngram_q"),
        bools(case, "lookups.parquet", "ngram_matched"),
        ints(case, "lookups.parquet", "ngram_order"),
    );
    let (ph_q, ph_m, ph_l) = (
        f64s(case, "lookups.parquet", "phrase_q"),
        bools(case, "lookups.parquet", "phrase_matched"),
        ints(case, "lookups.parquet", "phrase_len"),
    );
    assert_eq!(ng_q.len(), tokens.len());
    for p in 0..tokens.len() {
        let (n, ph) = (ngram_matches[p], phrase_matches[p]);
        assert_eq!(
            (n.matched(), n.order as i64),
            (ng_m[p], ng_o[p]),
            "{case} ngram at {p}"
        );
        if n.matched() {
            assert_eq!(n.q(), ng_q[p], "{case} ngram q at {p}");
        }
        assert_eq!(
            (ph.matched(), ph.length as i64),
            (ph_m[p], ph_l[p]),
            "{case} phrase at {p}"
        );
        if ph.matched() {
            assert_eq!(ph.q(), ph_q[p], "{case} phrase q at {p}");
        }
    }
    let ngram_hits = (1..tokens.len())
        .filter(|&p| ngram_matches[p].matched())
        .count();
    let phrase_hits = (1..tokens.len())
        .filter(|&p| phrase_matches[p].matched())
        .count();
    assert_eq!(
        ngram_hits as u64,
        expected["ngram_matched"].as_u64().unwrap()
    );
    assert_eq!(
        phrase_hits as u64,
        expected["phrase_matched"].as_u64().unwrap()
    );

    // Calibration and the final number.
    let positions = ints(case, "pass1.parquet", "position");
    let model_p = f32s(case, "pass1.parquet", "model_p");
    let entropy = f32s(case, "pass1.parquet", "entropy");
    let bytes = f64s(case, "pass1.parquet", "bytes");
    let entries: Vec<Entry> = positions
        .iter()
        .enumerate()
        .map(|(i, &p)| Entry {
            model_p: model_p[i],
            entropy: entropy[i],
            ngram: ngram_matches[p as usize],
            phrase: phrase_matches[p as usize],
        })
        .collect();
    assert_eq!(entries.len() as u64, expected["entries"].as_u64().unwrap());
    let grid = CalibrationGrid::default();
    let sample = &entries[..grid.calibration_entries(entries.len())];
    let result = calibrate(sample, &BlendParams::default(), &grid);
    assert_eq!(
        result.alpha_high,
        expected["calibrated_alpha_high"].as_f64().unwrap(),
        "{case}"
    );
    assert_eq!(
        result.entropy_thresh,
        expected["calibrated_entropy_thresh"].as_f64().unwrap(),
        "{case}"
    );

    let params = BlendParams {
        alpha_high: result.alpha_high,
        entropy_thresh: result.entropy_thresh,
        ..BlendParams::default()
    };
    let nll: f64 = entries.iter().map(|e| params.nll(e)).sum();
    let total_bytes: f64 = bytes.iter().sum();
    let bpb = nll / (std::f64::consts::LN_2 * total_bytes);
    let val_loss = nll / entries.len() as f64;
    let neural: f64 = model_p.iter().map(|&p| -(p as f64).ln()).sum::<f64>()
        / (std::f64::consts::LN_2 * total_bytes);
    let close = |a: f64, b: f64| ((a - b) / b).abs() < 1e-12;
    let want = |k: &str| expected[k].as_f64().unwrap();
    assert!(
        close(bpb, want("val_bpb")),
        "{case}: val_bpb {bpb} vs {}",
        want("val_bpb")
    );
    assert!(
        close(val_loss, want("val_loss_nats")),
        "{case}: val_loss {val_loss}"
    );
    assert!(
        close(neural, want("neural_only_bpb")),
        "{case}: neural {neural}"
    );

    // The waterfall as `pass2` sums it: logs of products, in chunks merged in order.
    let mut waterfall = Waterfall::default();
    for (chunk, chunk_bytes) in entries.chunks(65_536).zip(bytes.chunks(65_536)) {
        let mut part = Waterfall::default();
        for (entry, &b) in chunk.iter().zip(chunk_bytes) {
            let (ngram, last) = params.blend(entry);
            part.add(entry.model_p, ngram, last, b as u8);
        }
        waterfall.merge(&part);
    }
    for (key, got) in [
        ("val_bpb", waterfall.final_bpb()),
        ("val_loss_nats", waterfall.val_loss_nats()),
        ("neural_only_bpb", waterfall.neural_bpb()),
    ] {
        assert!(
            close(got, want(key)),
            "{case}: waterfall {key} {got} vs {}",
            want(key)
        );
    }
}

#[test]
fn golden_reference_small_matches_tables_lookups_calibration_and_bpb() {
    check_case("reference-small");
}

#[test]
fn golden_reference_full_matches_tables_lookups_calibration_and_bpb() {
    check_case("reference-full");
}
