//! The outcome rules: given what an attempt produced and where the delivery is in its
//! schedule, decide the next state. Pure functions, so the whole retry policy is testable
//! without a network or a clock.

use std::time::Duration;

use crate::deliver::AttemptResult;
use crate::store::Next;

/// Longest delay a `Retry-After` may ask for.
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(24 * 3600);

/// Error classes that will not get better by retrying.
const PERMANENT_ERRORS: &[&str] = &["ssrf_blocked"];

/// Decides what follows an attempt. `done_before` is the number of attempts already made in
/// this round (so this one was attempt `done_before + 1`); `schedule[i]` is the delay before
/// attempt `i + 1`.
pub fn decide(
    result: &AttemptResult,
    done_before: u32,
    schedule: &[Duration],
    jitter: f64,
    now_ms: u64,
) -> Next {
    final_answer(result).unwrap_or_else(|| scheduled(result, done_before, schedule, jitter, now_ms))
}

/// The outcomes no retry policy can change: success, 410, `webhook-delivery: abort`, and
/// permanent errors. `None` means the attempt failed in a way that may be retried.
pub fn final_answer(result: &AttemptResult) -> Option<Next> {
    if result.success() {
        return Some(Next::Delivered);
    }
    if result.status == Some(410) {
        return Some(Next::Dead {
            reason: "endpoint answered 410 Gone".into(),
        });
    }
    if result.abort {
        return Some(Next::Dead {
            reason: format!(
                "receiver answered {} with webhook-delivery: abort",
                result.label()
            ),
        });
    }
    if let Some(class) = result.error
        && PERMANENT_ERRORS.contains(&class)
    {
        return Some(Next::Dead {
            reason: format!(
                "{class}: {}",
                result.error_detail.as_deref().unwrap_or_default()
            ),
        });
    }
    None
}

/// The wait a 429's or 503's `Retry-After` asks for (zero without one). It lengthens the
/// schedule's delay, never shortens it: a `Retry-After: 0` from a load balancer in the middle
/// of a deploy, or a date the receiver's slow clock puts in the past, would otherwise spend a
/// schedule meant to last hours in a second.
fn retry_after(result: &AttemptResult) -> Duration {
    match (result.status, result.retry_after) {
        (Some(429 | 503), Some(after)) => after.min(MAX_RETRY_AFTER),
        _ => Duration::ZERO,
    }
}

/// The retry the schedule gives a failed attempt (or dead when it is exhausted).
pub fn scheduled(
    result: &AttemptResult,
    done_before: u32,
    schedule: &[Duration],
    jitter: f64,
    now_ms: u64,
) -> Next {
    let made = done_before as usize + 1;
    let error = describe_failure(result);
    if made >= schedule.len() {
        return Next::Dead {
            reason: format!("gave up after {made} attempts; last: {error}"),
        };
    }
    let delay = jittered(schedule[made], jitter).max(retry_after(result));
    Next::Retry {
        due_ms: now_ms + delay.as_millis() as u64,
        error: Some(error),
    }
}

/// The retry when an endpoint's backoff plugin could not be asked (it failed or timed out):
/// the schedule's, while the round is within it; past it, the schedule's last delay (at
/// least 1 s), not dead. The round is the plugin's to end, and a plugin that fails for a
/// moment must not end a long round it was running; one that keeps failing keeps the
/// delivery pending at that pace, every failure logged and counted.
pub fn fallback(
    result: &AttemptResult,
    done_before: u32,
    schedule: &[Duration],
    jitter: f64,
    now_ms: u64,
) -> Next {
    if (done_before as usize + 1) < schedule.len() {
        return scheduled(result, done_before, schedule, jitter, now_ms);
    }
    let last = schedule.last().copied().unwrap_or_default();
    let delay = jittered(last.max(Duration::from_secs(1)), jitter).max(retry_after(result));
    Next::Retry {
        due_ms: now_ms + delay.as_millis() as u64,
        error: Some(describe_failure(result)),
    }
}

/// The delay before the first attempt (never jittered).
pub fn first_delay(schedule: &[Duration]) -> Duration {
    schedule.first().copied().unwrap_or_default()
}

/// `delay` moved by a random amount within ±`jitter` of itself.
pub fn jittered(delay: Duration, jitter: f64) -> Duration {
    if jitter <= 0.0 || delay.is_zero() {
        return delay;
    }
    let factor = 1.0 + rand::random_range(-jitter..=jitter);
    delay.mul_f64(factor.max(0.0))
}

/// One line saying why an attempt failed.
pub fn describe_failure(result: &AttemptResult) -> String {
    match (result.status, result.error) {
        (Some(s), _) => format!("HTTP {s}"),
        (None, Some(class)) => match &result.error_detail {
            Some(d) => format!("{class}: {d}"),
            None => class.to_string(),
        },
        (None, None) => "unknown failure".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn result(status: Option<u16>, error: Option<&'static str>) -> AttemptResult {
        AttemptResult {
            started_ms: 0,
            duration_ms: 1,
            status,
            error,
            error_detail: None,
            retry_after: None,
            abort: false,
            body_excerpt: String::new(),
            measured: true,
        }
    }

    fn secs(list: &[u64]) -> Vec<Duration> {
        list.iter().map(|s| Duration::from_secs(*s)).collect()
    }

    #[test]
    fn any_2xx_succeeds() {
        for s in [200, 201, 202, 204, 299] {
            assert_eq!(
                decide(&result(Some(s), None), 0, &secs(&[0, 5]), 0.0, 0),
                Next::Delivered
            );
        }
    }

    #[test]
    fn failures_follow_the_schedule_then_die() {
        let sched = secs(&[0, 5, 30]);
        assert_eq!(
            decide(&result(Some(500), None), 0, &sched, 0.0, 1000),
            Next::Retry {
                due_ms: 6000,
                error: Some("HTTP 500".into())
            }
        );
        assert_eq!(
            decide(&result(None, Some("timeout")), 1, &sched, 0.0, 1000),
            Next::Retry {
                due_ms: 31000,
                error: Some("timeout".into())
            }
        );
        assert!(matches!(
            decide(&result(Some(500), None), 2, &sched, 0.0, 0),
            Next::Dead { .. }
        ));
    }

    #[test]
    fn a_failed_backoff_plugin_falls_back_to_the_schedule_but_never_to_dead() {
        let sched = secs(&[0, 5, 30]);
        let r = result(Some(500), None);
        // Within the schedule: as the schedule says.
        assert_eq!(
            fallback(&r, 0, &sched, 0.0, 1000),
            scheduled(&r, 0, &sched, 0.0, 1000)
        );
        // Past it (a round the plugin was running): the last delay, again and again.
        for done in [2, 3, 50] {
            assert_eq!(
                fallback(&r, done, &sched, 0.0, 1000),
                Next::Retry {
                    due_ms: 31_000,
                    error: Some("HTTP 500".into())
                }
            );
        }
        // A schedule ending in 0s still waits a second.
        assert_eq!(
            fallback(&r, 5, &secs(&[0]), 0.0, 1000),
            Next::Retry {
                due_ms: 2000,
                error: Some("HTTP 500".into())
            }
        );
    }

    #[test]
    fn gone_abort_and_ssrf_are_final() {
        let sched = secs(&[0, 5, 30]);
        assert!(matches!(
            decide(&result(Some(410), None), 0, &sched, 0.0, 0),
            Next::Dead { .. }
        ));
        let mut r = result(Some(500), None);
        r.abort = true;
        assert!(matches!(decide(&r, 0, &sched, 0.0, 0), Next::Dead { .. }));
        assert!(matches!(
            decide(&result(None, Some("ssrf_blocked")), 0, &sched, 0.0, 0),
            Next::Dead { .. }
        ));
    }

    /// A `Retry-After` shorter than the schedule's delay (`0`, or a date already past) leaves
    /// the delay as it is: it cannot spend the schedule faster than it was made to go.
    #[test]
    fn retry_after_never_shortens_the_schedule() {
        let sched = secs(&[0, 5, 30]);
        for after in [0, 2] {
            let mut r = result(Some(503), None);
            r.retry_after = Some(Duration::from_secs(after));
            assert_eq!(
                decide(&r, 0, &sched, 0.0, 0),
                Next::Retry {
                    due_ms: 5_000,
                    error: Some("HTTP 503".into())
                }
            );
        }
        // Past the schedule (a backoff plugin failing), its last delay likewise.
        let mut r = result(Some(429), None);
        r.retry_after = Some(Duration::ZERO);
        assert_eq!(
            fallback(&r, 5, &sched, 0.0, 0),
            Next::Retry {
                due_ms: 30_000,
                error: Some("HTTP 429".into())
            }
        );
    }

    #[test]
    fn retry_after_lengthens_the_delay_for_429_and_503() {
        let sched = secs(&[0, 5, 30]);
        for s in [429, 503] {
            let mut r = result(Some(s), None);
            r.retry_after = Some(Duration::from_secs(120));
            assert_eq!(
                decide(&r, 0, &sched, 0.2, 0),
                Next::Retry {
                    due_ms: 120_000,
                    error: Some(format!("HTTP {s}"))
                }
            );
        }
        let mut r = result(Some(500), None);
        r.retry_after = Some(Duration::from_secs(120));
        assert_eq!(
            decide(&r, 0, &sched, 0.0, 0),
            Next::Retry {
                due_ms: 5_000,
                error: Some("HTTP 500".into())
            }
        );
    }

    #[test]
    fn jitter_stays_within_bounds() {
        for _ in 0..1000 {
            let d = jittered(Duration::from_secs(100), 0.2);
            assert!(
                d >= Duration::from_secs(80) && d <= Duration::from_secs(120),
                "{d:?}"
            );
        }
        assert_eq!(jittered(Duration::ZERO, 0.5), Duration::ZERO);
    }
}
