//! Retry policy: exponential backoff with full jitter, bounded by attempts and age, never
//! sooner than a provider's `Retry-After`, and a throttled channel's wait that costs the
//! delivery no attempt. Every time computed here saturates: nothing a provider sends can make
//! it overflow.

use crate::clock;
use crate::config::DeliveryPolicy;
use crate::delivery::{DeliveryError, DeliveryRecord, FailureKind, Outcome};
use chrono::{DateTime, Utc};
use rand::Rng;
use std::time::Duration;

/// Decides what happens after a failed attempt. `delivery.attempts` counts the one that failed.
pub fn after_failure(
    policy: &DeliveryPolicy,
    delivery: &DeliveryRecord,
    error: &DeliveryError,
    now: DateTime<Utc>,
    rng: &mut impl Rng,
) -> Outcome {
    let gave_up = |why: String| Outcome::Dead {
        failure: error
            .clone()
            .with_reason(format!("{why}: {}", error.reason)),
    };
    let ceiling = backoff_ceiling(policy, delivery.attempts);
    let wait = match error.kind {
        FailureKind::Permanent | FailureKind::RecipientGone | FailureKind::EndpointGone => {
            return Outcome::Dead {
                failure: error.clone(),
            };
        }
        // Waiting for a provider's rate limit is not the message's fault: no attempt is spent.
        // Without a wait from the provider, throttles in a row back off like attempts do (the
        // leases count them), so a provider that keeps answering 429 is not asked every second.
        FailureKind::Throttled => error.retry_after.unwrap_or_else(|| {
            let ceiling = backoff_ceiling(policy, delivery.leases.max(delivery.attempts));
            ceiling.mul_f64(rng.random_range(0.5..=1.0))
        }),
        FailureKind::Transient => {
            if delivery.attempts >= policy.max_attempts {
                return gave_up(format!("gave up after {} attempts", delivery.attempts));
            }
            let jittered = match policy.schedule {
                Some(schedule) => scheduled_wait(schedule, delivery.attempts, rng),
                None => {
                    let ceiling_ms = u64::try_from(ceiling.as_millis()).unwrap_or(u64::MAX);
                    Duration::from_millis(rng.random_range(0..=ceiling_ms))
                }
            };
            error
                .retry_after
                .map_or(jittered, |asked| asked.max(jittered))
        }
    };
    let at = clock::after(now, wait);
    let deadline = clock::after(delivery.queued_at, policy.max_age);
    if at > deadline {
        let max_age = crate::render::duration_text(policy.max_age);
        return gave_up(match error.retry_after {
            Some(asked) => format!(
                "gave up: the provider asked to wait {} (Retry-After), which ends past this \
                 channel's max_age of {max_age}; raise max_age to wait that long",
                crate::render::duration_text(Duration::from_secs(asked.as_secs()))
            ),
            None => format!(
                "gave up: the next attempt would be more than {max_age} after it was queued"
            ),
        });
    }
    Outcome::Retry {
        at,
        failure: error.clone(),
        counts_as_attempt: error.kind != FailureKind::Throttled,
    }
}

/// The schedule's wait after failed attempt number `attempt` (the last wait repeats), within
/// 20 % either way, so retries of many messages do not arrive together.
fn scheduled_wait(schedule: &[Duration], attempt: u32, rng: &mut impl Rng) -> Duration {
    let index = (attempt.saturating_sub(1) as usize).min(schedule.len().saturating_sub(1));
    let Some(wait) = schedule.get(index) else {
        return Duration::ZERO;
    };
    wait.mul_f64(rng.random_range(0.8..=1.2))
}

/// `min(backoff_max, backoff_base * 2^(attempt - 1))`.
pub fn backoff_ceiling(policy: &DeliveryPolicy, attempt: u32) -> Duration {
    let exponent = attempt.saturating_sub(1).min(31);
    policy
        .backoff_base
        .checked_mul(1u32 << exponent)
        .unwrap_or(policy.backoff_max)
        .min(policy.backoff_max)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::delivery::Recipient;
    use proptest::prelude::*;
    use rand::SeedableRng;
    use rand::rngs::StdRng;
    use ulid::Ulid;

    fn policy() -> DeliveryPolicy {
        DeliveryPolicy {
            concurrency: 1,
            max_attempts: 5,
            max_age: Duration::from_secs(600),
            timeout: Duration::from_secs(5),
            backoff_base: Duration::from_secs(1),
            backoff_max: Duration::from_secs(60),
            rate: None,
            schedule: None,
        }
    }

    fn delivery(attempts: u32, now: DateTime<Utc>) -> DeliveryRecord {
        let mut record =
            DeliveryRecord::new(Ulid::new(), "partners", Recipient::Broadcast, vec![], now);
        record.attempts = attempts;
        record
    }

    fn transient(reason: &str, retry_after: Option<Duration>) -> DeliveryError {
        DeliveryError::transient(reason).with_retry_after(retry_after)
    }

    #[test]
    fn the_backoff_ceiling_doubles_per_attempt_up_to_the_maximum() {
        let ceilings: Vec<u64> = (1..=8)
            .map(|a| backoff_ceiling(&policy(), a).as_secs())
            .collect();
        assert_eq!(ceilings, [1, 2, 4, 8, 16, 32, 60, 60]);
    }

    #[test]
    fn full_jitter_spreads_retries_between_now_and_the_ceiling() {
        let now = Utc::now();
        let mut rng = StdRng::seed_from_u64(7);
        let waits: Vec<i64> = (0..200)
            .map(|_| {
                match after_failure(
                    &policy(),
                    &delivery(4, now),
                    &transient("503", None),
                    now,
                    &mut rng,
                ) {
                    Outcome::Retry { at, .. } => (at - now).num_milliseconds(),
                    other => panic!("expected a retry, got {other:?}"),
                }
            })
            .collect();
        assert!(waits.iter().all(|w| (0..=8_000).contains(w)));
        assert!(waits.iter().any(|w| *w < 2_000) && waits.iter().any(|w| *w > 6_000));
    }

    #[test]
    fn retry_after_is_honoured_even_when_longer_than_the_backoff() {
        let now = Utc::now();
        let error = transient("429", Some(Duration::from_secs(120)));
        let outcome = after_failure(
            &policy(),
            &delivery(1, now),
            &error,
            now,
            &mut StdRng::seed_from_u64(1),
        );
        let Outcome::Retry { at, .. } = outcome else {
            panic!("expected a retry, got {outcome:?}")
        };
        assert!((at - now).num_seconds() >= 120);
    }

    #[test]
    fn a_permanent_failure_goes_to_dead_letters_at_once() {
        let now = Utc::now();
        let error = DeliveryError::permanent("400").with_status(400);
        let outcome = after_failure(
            &policy(),
            &delivery(1, now),
            &error,
            now,
            &mut StdRng::seed_from_u64(1),
        );
        assert_eq!(outcome, Outcome::Dead { failure: error });
    }

    #[test]
    fn the_attempt_limit_and_the_age_limit_end_retries() {
        let now = Utc::now();
        let mut rng = StdRng::seed_from_u64(1);
        let out_of_attempts = after_failure(
            &policy(),
            &delivery(5, now),
            &transient("503", None),
            now,
            &mut rng,
        );
        assert!(matches!(out_of_attempts, Outcome::Dead { .. }));

        let mut old = delivery(1, now);
        old.queued_at = now - chrono::Duration::seconds(599);
        let error = transient("503", Some(Duration::from_secs(30)));
        assert!(matches!(
            after_failure(&policy(), &old, &error, now, &mut rng),
            Outcome::Dead { .. }
        ));
    }

    #[test]
    fn throttles_in_a_row_without_a_wait_back_off_instead_of_coming_back_every_second() {
        let now = Utc::now();
        let error = DeliveryError::new(FailureKind::Throttled, "429");
        let mut rng = StdRng::seed_from_u64(7);
        let waits: Vec<Duration> = (1..=8)
            .map(|leases| {
                let mut record = delivery(0, now);
                record.leases = leases;
                match after_failure(&policy(), &record, &error, now, &mut rng) {
                    Outcome::Retry {
                        at,
                        counts_as_attempt,
                        ..
                    } => {
                        assert!(!counts_as_attempt, "a throttle costs no attempt");
                        (at - now).to_std().unwrap()
                    }
                    other => panic!("throttle {leases}: {other:?}"),
                }
            })
            .collect();
        // Each wait lies between half its ceiling and the ceiling: 1 s, 2 s, 4 s … up to 60 s.
        for (leases, wait) in (1..=8).zip(&waits) {
            let ceiling = backoff_ceiling(&policy(), leases);
            assert!(
                *wait >= ceiling / 2 && *wait <= ceiling,
                "{leases}: {wait:?}"
            );
        }
        assert!(waits[7] >= Duration::from_secs(30), "{waits:?}");
    }

    #[test]
    fn a_retry_after_past_max_age_gives_up_saying_why_and_what_to_change() {
        let now = Utc::now();
        let error = DeliveryError::new(FailureKind::Throttled, "the provider answered 429")
            .with_retry_after(Some(Duration::from_secs(2 * 3600)));
        let Outcome::Dead { failure } = after_failure(
            &policy(),
            &delivery(0, now),
            &error,
            now,
            &mut StdRng::seed_from_u64(1),
        ) else {
            panic!("a wait past max_age cannot be kept");
        };
        assert_eq!(
            failure.reason,
            "gave up: the provider asked to wait 2 hours (Retry-After), which ends past this \
             channel's max_age of 10 minutes; raise max_age to wait that long: the provider answered 429"
        );
    }

    #[test]
    fn a_throttled_attempt_waits_for_the_provider_and_costs_no_attempt() {
        let now = Utc::now();
        let error = DeliveryError::new(FailureKind::Throttled, "429")
            .with_retry_after(Some(Duration::from_secs(30)));
        // Even on its last attempt, a throttled delivery is not given up.
        let outcome = after_failure(
            &policy(),
            &delivery(5, now),
            &error,
            now,
            &mut StdRng::seed_from_u64(1),
        );
        let Outcome::Retry {
            at,
            counts_as_attempt,
            ..
        } = outcome
        else {
            panic!("expected a retry, got {outcome:?}")
        };
        assert_eq!((at - now).num_seconds(), 30);
        assert!(!counts_as_attempt);
    }

    #[test]
    fn an_absurd_retry_after_or_max_age_ends_in_a_dead_letter_not_a_panic() {
        let now = Utc::now();
        let mut absurd = policy();
        absurd.max_age = Duration::from_secs(u64::MAX / 2);
        let error = transient("503", Some(Duration::MAX));
        let outcome = after_failure(
            &absurd,
            &delivery(1, now),
            &error,
            now,
            &mut StdRng::seed_from_u64(1),
        );
        assert!(matches!(
            outcome,
            Outcome::Retry { .. } | Outcome::Dead { .. }
        ));
        let outcome = after_failure(
            &policy(),
            &delivery(1, now),
            &error,
            now,
            &mut StdRng::seed_from_u64(1),
        );
        assert!(matches!(outcome, Outcome::Dead { .. }), "{outcome:?}");
    }

    #[test]
    fn a_schedule_sets_each_retrys_wait_within_a_fifth_and_ends_after_its_last_step() {
        const SCHEDULE: &[Duration] = &[Duration::from_secs(5), Duration::from_secs(300)];
        let scheduled =
            DeliveryPolicy::with_concurrency(1).with_schedule(SCHEDULE, Duration::from_secs(3600));
        assert_eq!(scheduled.max_attempts, 3);
        let now = Utc::now();
        let mut rng = StdRng::seed_from_u64(3);
        for (attempt, expected) in [(1, 5.0), (2, 300.0)] {
            let outcome = after_failure(
                &scheduled,
                &delivery(attempt, now),
                &transient("503", None),
                now,
                &mut rng,
            );
            let Outcome::Retry { at, .. } = outcome else {
                panic!("expected a retry, got {outcome:?}")
            };
            let waited = (at - now).num_milliseconds() as f64 / 1000.0;
            assert!(
                (expected * 0.8..=expected * 1.2).contains(&waited),
                "{waited}"
            );
        }
        let last = after_failure(
            &scheduled,
            &delivery(3, now),
            &transient("503", None),
            now,
            &mut rng,
        );
        assert!(matches!(last, Outcome::Dead { .. }));
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        /// Whatever a provider answers, in any header, the policy decides without panicking,
        /// and never schedules a retry past the delivery's age limit.
        #[test]
        fn any_retry_after_header_gives_an_outcome_within_the_age_limit(
            header in ".{0,40}|[0-9]{1,40}",
            attempts in 0u32..20,
            throttled in any::<bool>(),
            seed in any::<u64>(),
        ) {
            let now = Utc::now();
            let retry_after = crate::channel::http::parse_retry_after(&header, now);
            let kind = if throttled { FailureKind::Throttled } else { FailureKind::Transient };
            let error = DeliveryError::new(kind, "answered").with_retry_after(retry_after);
            let record = delivery(attempts, now);
            let outcome = after_failure(&policy(), &record, &error, now, &mut StdRng::seed_from_u64(seed));
            if let Outcome::Retry { at, .. } = outcome {
                prop_assert!(at <= clock::after(record.queued_at, policy().max_age));
                prop_assert!(at >= now);
            }
        }
    }
}
