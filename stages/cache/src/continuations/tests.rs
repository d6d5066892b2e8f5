use std::collections::HashMap;

use proptest::prelude::*;

use super::*;

/// The definition, directly: every context of every order kept by its tokens in a hash
/// map, walked in stream order; the highest qualifying order wins.
fn direct(tokens: &[u16], config: &NgramConfig) -> Continuations {
    let min_count = config.min_count.max(1);
    let orders: Vec<usize> = (config.min_order..=config.max_order).collect();
    direct_gated(tokens, &orders, &|_, _, seen| seen >= min_count)
}

fn direct_gated(
    tokens: &[u16],
    orders: &[usize],
    gate: &dyn Fn(usize, u32, u32) -> bool,
) -> Continuations {
    let n = tokens.len();
    let mut out = Continuations::none(n);
    let mut orders = orders.to_vec();
    orders.sort();
    for order in orders {
        let width = order - 1;
        // context -> (seen, top count, top token, counts by token)
        type Context = (u32, u32, u16, HashMap<u16, u32>);
        let mut contexts: HashMap<&[u16], Context> = HashMap::new();
        for p in width..n {
            let state = contexts.entry(&tokens[p - width..p]).or_default();
            if state.0 > 0 && gate(order, state.1, state.0) {
                out.token[p] = state.2;
                out.top[p] = state.1;
                out.seen[p] = state.0;
                out.order[p] = order as u8;
            }
            let count = state.3.entry(tokens[p]).or_default();
            *count += 1;
            state.0 += 1;
            if *count > state.1 {
                state.1 = *count;
                state.2 = tokens[p];
            }
        }
    }
    out
}

fn unchecked(min_order: usize, max_order: usize, min_count: u32) -> NgramConfig {
    NgramConfig {
        min_order,
        max_order,
        min_count,
        ..NgramConfig::default()
    }
}

fn config(min_order: usize, max_order: usize, min_count: u32) -> Valid<NgramConfig> {
    unchecked(min_order, max_order, min_count)
        .validated()
        .unwrap()
}

#[test]
fn a_worked_stream() {
    // Order 2 only: context = the token before.
    //   p:      0  1  2  3  4  5  6  7
    //   token:  1  2  1  3  1  3  1  2
    // At p = 3 (after a 1): the 1s before were followed by 2 once: hint 2, 1 of 1.
    // At p = 5: 2 and 3 once each; 2 reached 1 first: hint 2, 1 of 2.
    // At p = 6 (after a 3): the 3 before was followed by 1: hint 1, 1 of 1.
    // At p = 7: 3 passed 2 at p = 5: hint 3, 2 of 3.
    let tokens = [1, 2, 1, 3, 1, 3, 1, 2];
    let got = top_continuations(&tokens, &config(2, 2, 1));
    assert_eq!(got.token, [0, 0, 0, 2, 0, 2, 1, 3]);
    assert_eq!(got.top, [0, 0, 0, 1, 0, 1, 1, 2]);
    assert_eq!(got.seen, [0, 0, 0, 1, 0, 2, 1, 3]);
    assert_eq!(got, direct(&tokens, &config(2, 2, 1)));
    // min_count 2: only contexts seen twice before qualify.
    let two = top_continuations(&tokens, &config(2, 2, 2));
    assert_eq!(two.token, [0, 0, 0, 0, 0, 2, 0, 3]);
    assert_eq!(two.order, [0, 0, 0, 0, 0, 2, 0, 2]);
}

#[test]
fn the_longest_qualifying_context_wins() {
    // "a b c" then "x b c": at the last position the order-3 context "b c" has been seen
    // once (followed by d), the order-4 contexts never.
    let tokens = [1, 2, 3, 4, 9, 2, 3, 5, 7, 2, 3];
    let got = top_continuations(&tokens, &config(2, 4, 1));
    assert_eq!((got.token[7], got.order[7], got.seen[7]), (4, 3, 1));
    // At p = 10 the order-3 context "7 2" is new; "2" was followed by 3 both times.
    assert_eq!(
        (got.token[10], got.top[10], got.seen[10], got.order[10]),
        (3, 2, 2, 2)
    );
    assert_eq!(got, direct(&tokens, &config(2, 4, 1)));
}

#[test]
fn a_stream_with_nothing_repeated_has_no_hint() {
    let tokens: Vec<u16> = (0..300).collect();
    let got = top_continuations(&tokens, &NgramConfig::default().validated().unwrap());
    assert!(got.order.iter().all(|&o| o == 0));
    assert!(
        top_continuations(&[], &NgramConfig::default().validated().unwrap())
            .token
            .is_empty()
    );
}

#[test]
fn orders_out_of_range_are_refused() {
    assert!(unchecked(1, 4, 1).validated().is_err());
    assert!(unchecked(2, 17, 1).validated().is_err());
}

/// Text-like streams: a small alphabet and a repeated base with drift, so that contexts
/// of every order recur and their continuations disagree.
fn text_like() -> impl Strategy<Value = Vec<u16>> {
    (
        proptest::collection::vec(0u16..6, 5..60),
        proptest::collection::vec((0usize..4, 0u16..6), 0..300),
    )
        .prop_map(|(base, drift)| {
            drift
                .iter()
                .enumerate()
                .map(|(i, &(flip, t))| if flip == 0 { t } else { base[i % base.len()] })
                .collect()
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    #[test]
    fn equals_the_definition(
        tokens in text_like(),
        min_order in 2usize..5,
        extra in 0usize..12,
        min_count in 0u32..4,
    ) {
        let config = config(min_order, (min_order + extra).min(16), min_count);
        prop_assert_eq!(top_continuations(&tokens, &config), direct(&tokens, &config));
    }

    /// #1514's shape: a few orders, each with its own share threshold and count.
    #[test]
    fn gated_orders_equal_the_definition(
        tokens in text_like(),
        orders in proptest::collection::btree_set(2usize..10, 1..4),
        thresholds in proptest::collection::vec((0.0f32..1.0, 1u32..4), 10),
    ) {
        let orders: Vec<usize> = orders.into_iter().collect();
        let gate = |order: usize, top: u32, seen: u32| {
            let (share, minimum) = thresholds[order];
            seen >= minimum && top as f32 / seen as f32 >= share
        };
        prop_assert_eq!(
            gated_continuations(&tokens, &orders, gate),
            direct_gated(&tokens, &orders, &gate)
        );
    }

    #[test]
    fn a_position_reads_only_its_prefix(tokens in text_like(), cut in 0usize..300) {
        let cut = cut.min(tokens.len());
        let config = NgramConfig::default().validated().unwrap();
        let whole = top_continuations(&tokens, &config);
        let prefix = top_continuations(&tokens[..cut], &config);
        prop_assert_eq!(&whole.token[..cut], &prefix.token[..]);
        prop_assert_eq!(&whole.top[..cut], &prefix.top[..]);
        prop_assert_eq!(&whole.seen[..cut], &prefix.seen[..]);
    }
}
