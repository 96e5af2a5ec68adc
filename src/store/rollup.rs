//! Attempt statistics kept as per-minute rollups: for each endpoint and minute, how many
//! attempts were made, how many succeeded, how many were a delivery's first, and a histogram
//! of their durations.
//!
//! Why: the statistics API used to read every attempt of its window from a time-ordered log
//! (capped at 500,000 and flagged `sampled` beyond: a busy endpoint's day did not fit, and
//! one endpoint's view was read through everyone's attempts). A rollup row per endpoint and
//! minute makes a request read at most one row per minute of the window for each endpoint,
//! whatever the traffic, and spares every attempt one insert into a log: the writer folds a
//! batch's attempts in memory and updates each row once per commit.
//!
//! Durations go into log-linear buckets: exact below 64 ms, then 16 buckets per power of two
//! (each at most 6.25% wide); a percentile reports its bucket's upper bound, so it is never
//! lower than the true value and at most 6.25% above it.

use std::ops::Bound;

use redb::ReadableTable;
use serde::{Deserialize, Serialize};

use super::StoreError;
use super::tables::decode;

/// Durations below this are counted exactly, one bucket per millisecond.
const EXACT: u64 = 64;
/// Buckets per power of two above [`EXACT`] (a power of two itself).
const SUB: u64 = 16;
const SUB_BITS: u32 = SUB.trailing_zeros();

/// The bucket of a duration of `ms` milliseconds.
pub fn bucket(ms: u64) -> u16 {
    if ms < EXACT {
        return ms as u16;
    }
    let exp = 63 - ms.leading_zeros(); // ≥ 6
    let sub = (ms >> (exp - SUB_BITS)) & (SUB - 1);
    (EXACT + (exp as u64 - EXACT.trailing_zeros() as u64) * SUB + sub) as u16
}

/// The largest duration that falls in bucket `b`.
pub fn bucket_max(b: u16) -> u64 {
    let b = b as u64;
    if b < EXACT {
        return b;
    }
    let exp = (b - EXACT) / SUB + EXACT.trailing_zeros() as u64;
    let sub = (b - EXACT) % SUB;
    let width = 1u64 << (exp - SUB_BITS as u64);
    // The bucket starts at (SUB + sub) · width; the last one ends at u64::MAX.
    ((SUB + sub + 1) as u128 * width as u128 - 1).min(u64::MAX as u128) as u64
}

/// One endpoint's attempts in one minute (or, summed, in a window).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Rollup {
    pub attempts: u64,
    pub successes: u64,
    /// Attempts that were their delivery's first: how many deliveries were attempted.
    pub first_attempts: u64,
    /// (bucket, attempts) for every bucket with any, in bucket order.
    pub durations: Vec<(u16, u64)>,
}

impl Rollup {
    /// Counts one attempt, and its duration if it made a request (`None`: it made none, and
    /// its zero would only pull the percentiles down).
    pub fn add(&mut self, duration_ms: Option<u64>, success: bool, first: bool) {
        self.attempts += 1;
        self.successes += success as u64;
        self.first_attempts += first as u64;
        let Some(duration_ms) = duration_ms else {
            return;
        };
        let b = bucket(duration_ms);
        match self.durations.binary_search_by_key(&b, |(k, _)| *k) {
            Ok(i) => self.durations[i].1 += 1,
            Err(i) => self.durations.insert(i, (b, 1)),
        }
    }

    /// Adds `other`'s counts to this one.
    pub fn merge(&mut self, other: &Rollup) {
        self.attempts += other.attempts;
        self.successes += other.successes;
        self.first_attempts += other.first_attempts;
        // Both lists are in bucket order: one pass merges them.
        let mine = std::mem::take(&mut self.durations);
        let (mut a, mut b) = (
            mine.iter().copied().peekable(),
            other.durations.iter().copied().peekable(),
        );
        self.durations
            .reserve(mine.len().max(other.durations.len()));
        loop {
            let next = match (a.peek().copied(), b.peek().copied()) {
                (Some(x), Some(y)) if x.0 == y.0 => {
                    a.next();
                    b.next();
                    (x.0, x.1 + y.1)
                }
                (Some(x), Some(y)) if x.0 < y.0 => {
                    a.next();
                    x
                }
                (_, Some(y)) => {
                    b.next();
                    y
                }
                (Some(x), None) => {
                    a.next();
                    x
                }
                (None, None) => break,
            };
            self.durations.push(next);
        }
    }

    /// The duration at quantile `q` (0–1): the upper bound of the bucket holding the attempt
    /// ranked `round((n − 1) · q)`; `None` without attempts.
    pub fn percentile(&self, q: f64) -> Option<u64> {
        let n: u64 = self.durations.iter().map(|(_, c)| c).sum();
        if n == 0 {
            return None;
        }
        let rank = ((n - 1) as f64 * q).round() as u64;
        let mut seen = 0;
        for (b, c) in &self.durations {
            seen += c;
            if seen > rank {
                return Some(bucket_max(*b));
            }
        }
        self.durations.last().map(|(b, _)| bucket_max(*b))
    }
}

/// The minute a time in ms falls in (rollup rows are keyed by it).
pub fn minute(ms: u64) -> u64 {
    ms / 60_000
}

/// The endpoints with any rollup row, each found with one seek past the previous one's rows
/// (a table holds a row per endpoint and minute; this reads one per endpoint).
pub(crate) fn endpoints(
    t: &impl ReadableTable<(&'static str, u64), &'static [u8]>,
) -> Result<Vec<String>, StoreError> {
    let mut out: Vec<String> = Vec::new();
    loop {
        let next = match out.last() {
            None => t.range::<(&str, u64)>(..)?.next(),
            Some(last) => t
                .range::<(&str, u64)>((
                    Bound::Excluded((last.as_str(), u64::MAX)),
                    Bound::Unbounded,
                ))?
                .next(),
        };
        match next {
            Some(row) => out.push(row?.0.value().0.to_string()),
            None => return Ok(out),
        }
    }
}

/// The sum of the rollups of `endpoint` (every endpoint if `None`) from the minute of
/// `since_ms` on.
pub(crate) fn sum(
    t: &impl ReadableTable<(&'static str, u64), &'static [u8]>,
    endpoint: Option<&str>,
    since_ms: u64,
) -> Result<Rollup, StoreError> {
    let names = match endpoint {
        Some(e) => vec![e.to_string()],
        None => endpoints(t)?,
    };
    let mut total = Rollup::default();
    for name in &names {
        for row in t.range((name.as_str(), minute(since_ms))..=(name.as_str(), u64::MAX))? {
            let (_, v) = row?;
            total.merge(&decode(v.value(), "attempt rollup")?);
        }
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_exact_below_64_ms_and_at_most_a_sixteenth_wide_above() {
        for ms in 0..64 {
            assert_eq!(bucket_max(bucket(ms)), ms);
        }
        let mut last = 63;
        for ms in (64..5_000_000u64).chain([u64::MAX / 3, u64::MAX - 1, u64::MAX]) {
            let b = bucket(ms);
            let max = bucket_max(b);
            assert!(max >= ms, "{ms} in bucket {b} ending at {max}");
            assert!((max - ms) as f64 <= ms as f64 / 16.0, "{ms}: {max}");
            assert!(b >= bucket(last));
            last = ms;
        }
        assert_eq!(bucket_max(bucket(u64::MAX)), u64::MAX);
        // Consecutive buckets leave no gap.
        for b in 0..bucket(u64::MAX) {
            assert_eq!(bucket(bucket_max(b) + 1), b + 1);
        }
    }

    #[test]
    fn percentiles_of_a_rollup_match_the_exact_ones_below_64_ms() {
        let mut r = Rollup::default();
        for ms in 1..=50 {
            r.add(Some(ms), ms % 10 != 0, ms <= 25);
        }
        assert_eq!(r.attempts, 50);
        assert_eq!(r.successes, 45);
        assert_eq!(r.first_attempts, 25);
        let v: Vec<u64> = (1..=50).collect();
        for q in [0.0, 0.5, 0.95, 0.99, 1.0] {
            let exact = v[((v.len() - 1) as f64 * q).round() as usize];
            assert_eq!(r.percentile(q), Some(exact), "q = {q}");
        }
        assert_eq!(Rollup::default().percentile(0.5), None);
    }

    #[test]
    fn a_slow_tail_shows_in_p99_within_a_sixteenth() {
        let mut r = Rollup::default();
        for _ in 0..98 {
            r.add(Some(5), true, true);
        }
        r.add(Some(1_000), false, true);
        r.add(Some(2_500), false, false);
        assert_eq!(r.percentile(0.5), Some(5));
        let p99 = r.percentile(0.99).unwrap();
        assert!((1_000..=1_000 + 1_000 / 16).contains(&p99), "{p99}");
        let max = r.percentile(1.0).unwrap();
        assert!((2_500..=2_500 + 2_500 / 16).contains(&max), "{max}");
    }

    #[test]
    fn merged_rollups_count_like_one() {
        let (mut a, mut b, mut all) = (Rollup::default(), Rollup::default(), Rollup::default());
        for ms in [3, 70, 70, 900, 12] {
            a.add(Some(ms), true, false);
            all.add(Some(ms), true, false);
        }
        for ms in [70, 4, 100_000] {
            b.add(Some(ms), false, true);
            all.add(Some(ms), false, true);
        }
        a.merge(&b);
        assert_eq!(a, all);
    }
}
