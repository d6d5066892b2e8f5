//! A rolling polynomial fingerprint of a window of tokens, modulo the Mersenne prime
//! 2^61 − 1. The mass audit uses it to find, in one pass over the stream, the windows
//! equal to the ones it asks about; it then compares their tokens, so a collision can
//! cost time but never a wrong count. (The causal-normalised counts themselves need no
//! fingerprint: see [`crate::classes`].)

const MERSENNE_61: u64 = (1 << 61) - 1;
/// The base: fixed, so the audit's work (and every artifact) is reproducible.
pub(crate) const BASE_KEY: u64 = 0x0A3B_1C5D_7E9F_2468 % MERSENNE_61;
#[inline(always)]
fn mul_mod(a: u64, b: u64) -> u64 {
    let product = a as u128 * b as u128;
    let folded = (product as u64 & MERSENNE_61) + (product >> 61) as u64;
    let folded = (folded & MERSENNE_61) + (folded >> 61);
    if folded >= MERSENNE_61 {
        folded - MERSENNE_61
    } else {
        folded
    }
}

#[inline(always)]
fn add_mod(a: u64, b: u64) -> u64 {
    let sum = a + b;
    if sum >= MERSENNE_61 {
        sum - MERSENNE_61
    } else {
        sum
    }
}

fn pow_mod(base: u64, exponent: usize) -> u64 {
    (0..exponent).fold(1, |acc, _| mul_mod(acc, base))
}

/// A rolling polynomial fingerprint of the last `width` tokens (token + 1, so that
/// token 0 is not the zero polynomial).
pub(crate) struct Rolling {
    base: u64,
    /// base^(width − 1): the weight of the token leaving the window.
    top: u64,
    pub(crate) value: u64,
}

impl Rolling {
    pub(crate) fn new(window: &[u16], base: u64) -> Rolling {
        let value = window
            .iter()
            .fold(0, |h, &t| add_mod(mul_mod(h, base), t as u64 + 1));
        Rolling {
            base,
            top: pow_mod(base, window.len().saturating_sub(1)),
            value,
        }
    }

    /// Slide by one token: `leaving` drops out at the old end, `entering` comes in.
    #[inline(always)]
    pub(crate) fn slide(&mut self, leaving: u16, entering: u16) {
        let without = add_mod(
            self.value,
            MERSENNE_61 - mul_mod(leaving as u64 + 1, self.top),
        );
        self.value = add_mod(mul_mod(without, self.base), entering as u64 + 1);
    }
}
