//! The cache engine at the record's scale: 62,021,632 targets of a synthetic stream with
//! the golden data's kind of repetition (documents that copy spans of a shared base text).
//! Prints each phase's wall time; `cachemoney bench` will fold this in.
//!
//! cargo run --release -p cachemoney-cache --example engine_scale [-- TOKENS]

use std::time::Instant;

use cachemoney_cache::{
    calibrate, BlendParams, CalibrationGrid, Entry, NgramConfig, NgramTables, PhraseConfig,
    PhraseTables,
};

fn main() {
    let targets: usize = std::env::args()
        .nth(1)
        .map(|s| s.parse().unwrap())
        .unwrap_or(62_021_632);
    let tokens = cachemoney_cache::synthetic::copy_span_stream(targets + 1);
    println!(
        "{} tokens, {} threads",
        tokens.len(),
        rayon::current_num_threads()
    );

    let t = Instant::now();
    let ngram = NgramTables::build(&tokens, &NgramConfig::default()).unwrap();
    println!("n-gram build   {:>7.2} s", t.elapsed().as_secs_f64());
    let t = Instant::now();
    let phrase = PhraseTables::build(&tokens, &PhraseConfig::default()).unwrap();
    println!("phrase build   {:>7.2} s", t.elapsed().as_secs_f64());
    let t = Instant::now();
    let ngram_matches = ngram.lookup_all(&tokens);
    println!("n-gram lookup  {:>7.2} s", t.elapsed().as_secs_f64());
    let t = Instant::now();
    let phrase_matches = phrase.lookup_all(&tokens);
    println!("phrase lookup  {:>7.2} s", t.elapsed().as_secs_f64());

    let t = Instant::now();
    let causal_ngram =
        cachemoney_cache::causal::ngram_lookups(&tokens, &NgramConfig::default()).unwrap();
    println!(
        "causal n-gram  {:>7.2} s  (build and lookups in one pass)",
        t.elapsed().as_secs_f64()
    );
    drop(causal_ngram);
    let t = Instant::now();
    let causal_phrase =
        cachemoney_cache::causal::phrase_lookups(&tokens, &PhraseConfig::default()).unwrap();
    println!("causal phrase  {:>7.2} s", t.elapsed().as_secs_f64());
    drop(causal_phrase);

    let entries: Vec<Entry> = (1..tokens.len())
        .map(|p| Entry {
            model_p: 0.01 + (p % 97) as f32 / 100.0,
            entropy: (p % 61) as f32 / 10.0,
            ngram: ngram_matches[p],
            phrase: phrase_matches[p],
        })
        .collect();
    let t = Instant::now();
    let grid = CalibrationGrid::default();
    let sample = &entries[..grid.calibration_entries(entries.len())];
    let result = calibrate(sample, &BlendParams::default(), &grid);
    println!(
        "calibration    {:>7.2} s  -> ({}, {})",
        t.elapsed().as_secs_f64(),
        result.alpha_high,
        result.entropy_thresh
    );
    let params = BlendParams {
        alpha_high: result.alpha_high,
        entropy_thresh: result.entropy_thresh,
        ..BlendParams::default()
    };
    let t = Instant::now();
    let nll: f64 = entries.iter().map(|e| params.nll(e)).sum();
    let secs = t.elapsed().as_secs_f64();
    println!(
        "pass-2 blend   {secs:>7.2} s  ({:.1} M entries/s), mean nll {:.4}",
        entries.len() as f64 / secs / 1e6,
        nll / entries.len() as f64
    );
}
