//! Maglev consistent hashing: the per-service lookup table that lets every node pick the
//! same backend for the same 5-tuple and moves only about 1/N of flows when one of N
//! backends comes or goes.
//!
//! The algorithm is the one of D. E. Eisenbud et al., "Maglev: A Fast and Reliable
//! Software Network Load Balancer", NSDI 2016, section 3.4 ("Pseudocode 1"): each backend
//! has a permutation of the `M` slots, `permutation[j] = (offset + j * skip) mod M` with
//! `offset = h1(key) mod M` and `skip = h2(key) mod (M - 1) + 1`, and backends take turns
//! claiming the next still-empty slot of their permutation until the table is full. `M`
//! is prime, so every permutation visits every slot.
//!
//! **Weights** (an extension; Envoy's weighted Maglev works the same way): every round each
//! backend adds its weight to a credit and takes a turn when the credit reaches the
//! largest weight `W`, which it then subtracts. A backend of weight `W` takes one turn
//! per round, one of weight `w` takes `w / W` turns per round on average, so slot counts
//! are proportional to weights (within one slot of rounding per backend). With equal
//! weights every backend takes exactly one turn per round: the paper's algorithm.
//!
//! **Determinism**: the table depends only on the set of `(key, weight)` pairs and `M`.
//! Backends are ordered by key internally, and `h1`/`h2` are this module's own hash (FNV-1a
//! 64 over a seed and the key, then murmur3's 64-bit finaliser), fixed forever: every node
//! and every agent version must compute identical tables, so changing the hash, the seeds
//! or the weight scheme changes the datapath's choices during a rolling upgrade (the
//! `golden_*` tests guard this).

/// Prime table sizes (Cilium's list).
pub const PRIMES: &[u32] = &[
    251, 509, 1021, 2039, 4093, 8191, 16381, 32749, 65521, 131071,
];

/// The smallest prime in [`PRIMES`] that is at least `100 * backends` (the Maglev paper's
/// `M >= 100 N` for about 1% imbalance), clamped to `[min, max]`; `min` for no backends.
/// `min` and `max` should be members of [`PRIMES`] (the agent's configurable bounds).
pub fn table_size(backends: usize, min: u32, max: u32) -> u32 {
    if backends == 0 {
        return min;
    }
    let want = backends.saturating_mul(100);
    let p = PRIMES
        .iter()
        .copied()
        .find(|&p| p as usize >= want)
        .unwrap_or(max);
    // Not `clamp`: it panics when min > max; here max wins.
    p.max(min).min(max)
}

/// One backend as the table sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MaglevBackend<'a> {
    /// Identity bytes that are the same on every node (e.g. `b"10.0.1.11:8080"`), never
    /// a node-local id. Keys should be unique within one table.
    pub key: &'a [u8],
    /// Relative weight; 0 keeps the backend out of the table.
    pub weight: u32,
}

/// A table entry no backend has claimed yet.
const EMPTY: u32 = u32::MAX;

const SEED_OFFSET: u64 = 0x6d61_676c_6576_2d31; // "maglev-1"
const SEED_SKIP: u64 = 0x6d61_676c_6576_2d32; // "maglev-2"

/// FNV-1a 64 over the seed's little-endian bytes and then `key`, finished with murmur3's
/// `fmix64` so that every bit of the result depends on every input bit.
fn hash(key: &[u8], seed: u64) -> u64 {
    let mut h = fnv1a(fnv1a(FNV_OFFSET, &seed.to_le_bytes()), key);
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^ (h >> 33)
}

const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;

/// FNV-1a 64, continuing from state `h`.
fn fnv1a(mut h: u64, bytes: &[u8]) -> u64 {
    for &b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// One backend's progress through its permutation.
struct Walker {
    /// Index into the caller's slice (the value written into the table).
    index: u32,
    weight: u64,
    credit: u64,
    /// `permutation[next]`, kept incrementally.
    slot: u32,
    skip: u32,
    /// How many permutation entries this backend has consumed.
    next: u32,
}

impl Walker {
    /// Moves to the next permutation entry: `(slot + skip) mod size` without overflow.
    fn advance(&mut self, size: u32) {
        self.slot = if self.slot >= size - self.skip {
            self.slot - (size - self.skip)
        } else {
            self.slot + self.skip
        };
        self.next += 1;
        if self.next == size {
            // Only reachable when `size` is not prime (a prime-sized permutation covers
            // every slot, so the table fills first): fall back to linear probing, which
            // visits every slot, so the build always terminates.
            self.next = 0;
            self.skip = 1;
        }
    }
}

/// Builds a Maglev table of `size` entries (`size` should be prime, e.g. from
/// [`table_size`]); entry `i` is an index into `backends`. The result depends only on
/// the set of `(key, weight)` pairs, not their order. No backend with a weight, or
/// `size == 0`, gives an empty table.
pub fn build(backends: &[MaglevBackend<'_>], size: u32) -> Vec<u32> {
    let mut order: Vec<u32> = backends
        .iter()
        .enumerate()
        .filter(|(_, b)| b.weight > 0)
        .filter_map(|(i, _)| u32::try_from(i).ok().filter(|&i| i != EMPTY))
        .collect();
    if order.is_empty() || size == 0 {
        return Vec::new();
    }
    // Order by key (then weight, then position, only to be total on duplicate keys).
    order.sort_unstable_by(|&a, &b| {
        let (x, y) = (&backends[a as usize], &backends[b as usize]);
        x.key
            .cmp(y.key)
            .then(x.weight.cmp(&y.weight))
            .then(a.cmp(&b))
    });
    let mut walkers: Vec<Walker> = order
        .iter()
        .map(|&index| {
            let b = &backends[index as usize];
            let offset = (hash(b.key, SEED_OFFSET) % u64::from(size)) as u32;
            let skip = if size > 1 {
                (hash(b.key, SEED_SKIP) % u64::from(size - 1)) as u32 + 1
            } else {
                1
            };
            Walker {
                index,
                weight: u64::from(b.weight),
                credit: 0,
                slot: offset,
                skip,
                next: 0,
            }
        })
        .collect();
    let max_weight = walkers.iter().map(|w| w.weight).max().unwrap_or(1);

    let mut table = vec![EMPTY; size as usize];
    let mut filled: u32 = 0;
    loop {
        for w in walkers.iter_mut() {
            // credit < max_weight before this, so at most one turn per round.
            w.credit += w.weight;
            if w.credit < max_weight {
                continue;
            }
            w.credit -= max_weight;
            loop {
                let slot = w.slot as usize;
                w.advance(size);
                if table[slot] == EMPTY {
                    table[slot] = w.index;
                    break;
                }
            }
            filled += 1;
            if filled == size {
                return table;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A small deterministic generator for the property-style tests (splitmix64).
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^ (z >> 31)
        }

        fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }

        fn shuffle<T>(&mut self, v: &mut [T]) {
            for i in (1..v.len()).rev() {
                let j = self.below(i + 1);
                v.swap(i, j);
            }
        }
    }

    /// Pod-like keys "10.<a>.<b>.<c>:8080" for backend numbers `0..n`.
    fn keys(n: usize) -> Vec<Vec<u8>> {
        (0..n)
            .map(|i| format!("10.{}.{}.{}:8080", i / 65536, (i / 256) % 256, i % 256).into_bytes())
            .collect()
    }

    fn equal(keys: &[Vec<u8>]) -> Vec<MaglevBackend<'_>> {
        keys.iter()
            .map(|k| MaglevBackend { key: k, weight: 1 })
            .collect()
    }

    /// The table with each entry replaced by its backend's key (comparable across inputs).
    fn by_key<'a>(backends: &[MaglevBackend<'a>], table: &[u32]) -> Vec<&'a [u8]> {
        table.iter().map(|&i| backends[i as usize].key).collect()
    }

    /// Slots per backend index.
    fn counts(n: usize, table: &[u32]) -> Vec<usize> {
        let mut c = vec![0; n];
        for &i in table {
            c[i as usize] += 1;
        }
        c
    }

    #[test]
    fn table_size_examples() {
        let (min, max) = (251, 65521);
        assert_eq!(table_size(0, min, max), 251);
        assert_eq!(table_size(1, min, max), 251);
        assert_eq!(table_size(2, min, max), 251);
        assert_eq!(table_size(3, min, max), 509);
        assert_eq!(table_size(10, min, max), 1021);
        assert_eq!(table_size(100, min, max), 16381);
        assert_eq!(table_size(500, min, max), 65521);
        assert_eq!(table_size(1000, min, max), 65521);
        assert_eq!(table_size(1000, min, 131071), 131071);
        assert_eq!(table_size(usize::MAX, min, 131071), 131071);
        // Bounds respected.
        assert_eq!(table_size(1, 4093, max), 4093);
        assert_eq!(table_size(0, 4093, max), 4093);
        assert_eq!(table_size(100, min, 2039), 2039);
        // Degenerate bounds never panic; max wins.
        assert_eq!(table_size(10, 8191, 2039), 2039);
        for w in PRIMES.windows(2) {
            assert!(w[0] < w[1]);
        }
    }

    #[test]
    fn empty_inputs() {
        assert!(build(&[], 251).is_empty());
        let zero = [
            MaglevBackend {
                key: b"a",
                weight: 0,
            },
            MaglevBackend {
                key: b"b",
                weight: 0,
            },
        ];
        assert!(build(&zero, 251).is_empty());
        assert!(
            build(
                &[MaglevBackend {
                    key: b"a",
                    weight: 1
                }],
                0
            )
            .is_empty()
        );
    }

    #[test]
    fn single_backend_takes_everything() {
        let b = [
            MaglevBackend {
                key: b"off",
                weight: 0,
            },
            MaglevBackend {
                key: b"only",
                weight: 7,
            },
        ];
        assert_eq!(build(&b, 251), vec![1; 251]);
        assert_eq!(build(&b, 1), vec![1]);
    }

    #[test]
    fn deterministic_and_order_independent() {
        let mut rng = Rng(1);
        for &(n, m) in &[(1, 251), (3, 251), (10, 1021), (100, 16381), (257, 32749)] {
            let ks = keys(n);
            let mut backends: Vec<MaglevBackend<'_>> = ks
                .iter()
                .map(|k| MaglevBackend {
                    key: k,
                    weight: 1 + rng.below(4) as u32,
                })
                .collect();
            let t1 = build(&backends, m);
            assert_eq!(t1, build(&backends, m), "two builds differ");
            let reference = by_key(&backends, &t1);
            for _ in 0..5 {
                rng.shuffle(&mut backends);
                let t = build(&backends, m);
                assert_eq!(by_key(&backends, &t), reference, "order changed the table");
            }
        }
    }

    #[test]
    fn every_slot_filled_with_valid_index() {
        let mut rng = Rng(2);
        for _ in 0..50 {
            let n = 1 + rng.below(40);
            let m = PRIMES[rng.below(5)];
            let ks = keys(n);
            let backends: Vec<MaglevBackend<'_>> = ks
                .iter()
                .map(|k| MaglevBackend {
                    key: k,
                    weight: rng.below(4) as u32,
                })
                .collect();
            let t = build(&backends, m);
            if backends.iter().all(|b| b.weight == 0) {
                assert!(t.is_empty());
                continue;
            }
            assert_eq!(t.len(), m as usize);
            for &i in &t {
                assert!((i as usize) < n);
                assert!(
                    backends[i as usize].weight > 0,
                    "zero-weight backend in table"
                );
            }
        }
    }

    #[test]
    fn non_prime_sizes_terminate_and_fill() {
        let ks = keys(7);
        let backends = equal(&ks);
        for m in [2, 4, 100, 256, 1000, 4096] {
            let t = build(&backends, m);
            assert_eq!(t.len(), m as usize);
            assert!(t.iter().all(|&i| i < 7));
        }
    }

    #[test]
    fn equal_weights_balanced() {
        for &(n, m) in &[(2, 251), (10, 1021), (100, 16381), (650, 65521)] {
            let ks = keys(n);
            let backends = equal(&ks);
            let c = counts(n, &build(&backends, m));
            let (lo, hi) = (c.iter().min().copied(), c.iter().max().copied());
            let (lo, hi) = (lo.unwrap_or(0), hi.unwrap_or(0));
            // Round-robin filling: every backend gets floor or ceil of M/N.
            assert!(hi - lo <= 1, "n={n} m={m}: {lo}..{hi}");
            assert!(hi as f64 / lo as f64 <= 1.02, "n={n} m={m}: {lo}..{hi}");
        }
    }

    #[test]
    fn weights_proportional() {
        // Half the backends have weight 2, the rest 1.
        for &(n, m) in &[(10, 4093), (100, 32749)] {
            let ks = keys(n);
            let backends: Vec<MaglevBackend<'_>> = ks
                .iter()
                .enumerate()
                .map(|(i, k)| MaglevBackend {
                    key: k,
                    weight: 1 + (i % 2) as u32,
                })
                .collect();
            let c = counts(n, &build(&backends, m));
            let one: Vec<f64> = c.iter().step_by(2).map(|&x| x as f64).collect();
            let two: Vec<f64> = c.iter().skip(1).step_by(2).map(|&x| x as f64).collect();
            let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
            let ratio = mean(&two) / mean(&one);
            assert!((ratio - 2.0).abs() <= 0.04, "n={n} m={m}: ratio {ratio}");
            let total: f64 = 1.5 * n as f64;
            for (i, &x) in c.iter().enumerate() {
                let ideal = m as f64 * (1 + i % 2) as f64 / total;
                assert!(
                    (x as f64 - ideal).abs() <= 1.0 + ideal * 0.01,
                    "{i}: {x} vs {ideal}"
                );
            }
        }
        // Arbitrary weights: each share within one slot (+1%) of M * w / sum(w).
        let mut rng = Rng(3);
        let ks = keys(20);
        let backends: Vec<MaglevBackend<'_>> = ks
            .iter()
            .map(|k| MaglevBackend {
                key: k,
                weight: 1 + rng.below(100) as u32,
            })
            .collect();
        let m = 16381;
        let c = counts(20, &build(&backends, m));
        let sum: u32 = backends.iter().map(|b| b.weight).sum();
        for (b, &x) in backends.iter().zip(&c) {
            let ideal = f64::from(m) * f64::from(b.weight) / f64::from(sum);
            assert!(
                (x as f64 - ideal).abs() <= 1.0 + ideal * 0.01,
                "{x} vs {ideal}"
            );
        }
        // Huge weight ratios stay correct (and bounded: at most M rounds).
        let skewed = [
            MaglevBackend {
                key: b"big",
                weight: u32::MAX,
            },
            MaglevBackend {
                key: b"small",
                weight: 1,
            },
        ];
        let c = counts(2, &build(&skewed, 251));
        assert_eq!(c, vec![251, 0]);
    }

    /// Fraction of slots whose backend differs, and the fraction that differs although
    /// it belonged in `before` to a backend other than `moved` (which is in only one).
    fn disruption(before: &[&[u8]], after: &[&[u8]], moved: &[u8]) -> (f64, f64) {
        let m = before.len() as f64;
        let changed = before.iter().zip(after).filter(|(a, b)| a != b).count();
        let collateral = before
            .iter()
            .zip(after)
            .filter(|(a, b)| a != b && **a != moved && **b != moved)
            .count();
        (changed as f64 / m, collateral as f64 / m)
    }

    /// Removing one of N moves the removed backend's slots (1/N) plus some collateral:
    /// with M ~ 100-160 N about 1-3% of the table moves between surviving backends
    /// (N = 10: up to 3%, N = 100: up to 1.5%; the paper's trade of some disruption for
    /// balance). Checked for every removal; the worst at N = 100 is 0.0244 against 0.025.
    #[test]
    fn minimal_disruption() {
        for &n in &[10usize, 20, 100] {
            let m = table_size(n, 251, 65521);
            let ks = keys(n + 5);
            let all = equal(&ks);
            let full = &all[..n];
            let before = by_key(full, &build(full, m));
            let bound = |ideal: f64| ideal * 1.5 + 0.01;
            for gone in 0..n {
                let fewer: Vec<MaglevBackend<'_>> = full
                    .iter()
                    .enumerate()
                    .filter(|&(i, _)| i != gone)
                    .map(|(_, b)| *b)
                    .collect();
                let after = by_key(&fewer, &build(&fewer, m));
                let (changed, collateral) = disruption(&before, &after, full[gone].key);
                let ideal = 1.0 / n as f64;
                assert!(changed <= bound(ideal), "remove {gone} of {n}: {changed}");
                assert!(changed >= ideal * 0.98, "remove {gone} of {n}: {changed}");
                assert!(collateral <= 0.035, "remove {gone} of {n}: {collateral}");
            }
            for new in &all[n..] {
                let mut more = full.to_vec();
                more.push(*new);
                let after = by_key(&more, &build(&more, m));
                let (changed, collateral) = disruption(&before, &after, new.key);
                let ideal = 1.0 / (n + 1) as f64;
                assert!(changed <= bound(ideal), "add to {n}: {changed}");
                assert!(changed >= ideal * 0.98, "add to {n}: {changed}");
                assert!(collateral <= 0.035, "add to {n}: {collateral}");
            }
        }
    }

    #[test]
    fn golden_hash() {
        // Pinned forever: every node and agent version must agree.
        // Published FNV-1a 64 test vectors.
        assert_eq!(fnv1a(FNV_OFFSET, b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a(FNV_OFFSET, b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(fnv1a(FNV_OFFSET, b"foobar"), 0x8594_4171_f739_67e8);
        assert_eq!(hash(b"", 0), 0x7bd3_144f_29c0_cc9e);
        assert_eq!(hash(b"10.0.1.11:8080", SEED_OFFSET), 0x277e_8e7f_98ff_b07f);
        assert_eq!(hash(b"10.0.1.11:8080", SEED_SKIP), 0x51bc_77f0_5f8d_7739);
    }

    #[test]
    fn golden_table() {
        // Pinned forever: a change here means nodes on different versions disagree.
        let ks = keys(5);
        let mut backends = equal(&ks);
        backends[4].weight = 3;
        let t = build(&backends, 251);
        assert_eq!(
            &t[..32],
            &[
                2, 4, 0, 4, 0, 1, 4, 2, 4, 2, 1, 4, 1, 3, 1, 4, 0, 2, 4, 3, 4, 3, 4, 4, 3, 1, 0, 4,
                0, 4, 4, 3
            ]
        );
        let bytes: Vec<u8> = t.iter().flat_map(|i| i.to_le_bytes()).collect();
        assert_eq!(hash(&bytes, 0), 0x61cd_6322_9cfe_68a4);
    }

    #[test]
    #[ignore = "timing; run in release with --ignored --nocapture"]
    fn maglev_build_time_1000_backends() {
        let ks = keys(1000);
        let backends = equal(&ks);
        let m = table_size(1000, 251, 65521);
        let mut times: Vec<std::time::Duration> = (0..11)
            .map(|_| {
                let start = std::time::Instant::now();
                let t = build(std::hint::black_box(&backends), m);
                let d = start.elapsed();
                assert_eq!(t.len(), m as usize);
                d
            })
            .collect();
        times.sort();
        println!(
            "maglev build, M={m}, 1000 backends: median {:?} (min {:?}, max {:?}) over {} builds",
            times[times.len() / 2],
            times[0],
            times[times.len() - 1],
            times.len()
        );
    }
}
