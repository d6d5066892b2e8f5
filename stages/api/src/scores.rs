//! What a `scores` table's `bits` column means, for every stage that writes or judges
//! one: the final probability's information content, with the record's floor (§7).
//!
//! `pass2` does not store `bits`: it is a function of `p_final`, so the table declares
//! it [derived](crate::Column::derived) with [`BITS_SQL`], and a stage that needs it
//! (the legality probes' byte check) computes it with [`bits`]. Both must give the very
//! same f64; a test compares them on every row of a real table.

/// The final probability's floor before taking the log (§7).
pub const PROBABILITY_FLOOR: f64 = 1e-12;

/// `-log2(max(p_final, floor))`, computed as the record does: the natural log, then a
/// division by ln 2.
#[inline]
pub fn bits(p_final: f64) -> f64 {
    -libm::log(p_final.max(PROBABILITY_FLOOR)) / std::f64::consts::LN_2
}

/// [`bits`] in SQL over a `p_final` column. cachemoney's SQL session replaces
/// DataFusion's `ln` with the same `libm::log`, the floor and ln 2 are written as
/// literals that parse to the same f64s, and negation and division are exact IEEE
/// operations, so the two agree to the bit.
pub const BITS_SQL: &str = "-ln(greatest(p_final, 1e-12)) / 0.6931471805599453";

#[cfg(test)]
mod tests {
    #[test]
    fn the_sql_literals_are_the_constants() {
        assert_eq!("1e-12".parse::<f64>().unwrap(), super::PROBABILITY_FLOOR);
        assert_eq!(
            "0.6931471805599453".parse::<f64>().unwrap(),
            std::f64::consts::LN_2
        );
        assert_eq!(super::bits(0.5), 1.0);
        assert_eq!(super::bits(0.0), super::bits(1e-12));
    }
}
