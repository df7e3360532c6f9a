//! The adaptive prefetch of a worker started without `--prefetch` (and without
//! `--max-fragments`).
//!
//! A fragment holds a run slot only while its operations run; its report's confirm and its
//! acknowledgement complete without one, but it stays *held* (delivered, not acknowledged)
//! until acknowledged. With short fragments the settlement round trip (a quorum queue's
//! publisher confirm, a few ms) dominates, and what a worker holds, not what it runs, bounds
//! its throughput; with long fragments holding more than it runs only strands work that
//! another worker could take. So the worker runs [`DEFAULT_PREFETCH`] at once and holds what
//! keeps those slots busy: by Little's law `slots × (1 + settle / run)` fragments, measured
//! per operation queue, between [`DEFAULT_PREFETCH`] and [`MAX_HELD`] over all its queues.
//!
//! A work queue is a quorum queue, whose prefetch is per consumer and fixed at
//! `basic.consume`, so a queue's share grows by adding a consumer (a new `basic.qos`, then
//! `basic.consume` on the same channel) and shrinks by cancelling one. A consumer is
//! cancelled only when it has no room (every delivery it may hold is in hand, acks held): a
//! quorum queue returns a delivery in flight at a cancellation, marked redelivered, which
//! counts against the delivery limit. See `session.rs`.

use std::sync::Mutex;
use std::time::Duration;

/// The prefetch of a worker without `--prefetch`, and what it runs at once.
pub(crate) const DEFAULT_PREFETCH: u16 = 4;

/// The most an adaptive worker holds over all its operation queues, and so the most a worker
/// that dies hands back. With the built-ins (three queues of 4 to start with), a busy queue
/// reaches 24: two workers then hold 48 no-op fragments of a job window of 64 and ran 3,200 to
/// 3,600 fragments/s on the development machine, against ~1,500 at a fixed 4; a bound of 64
/// measured no better (3,150 to 3,400), while it doubles what a dying worker strands.
pub(crate) const MAX_HELD: u16 = 32;

/// How often a worker re-evaluates its prefetch.
pub(crate) const TICK: Duration = Duration::from_millis(500);

/// How long a consumer being retired may take to fill up (so that it can be cancelled with
/// no delivery in flight) before the retirement is given up and its acks released.
pub(crate) const RETIRE_PATIENCE: Duration = Duration::from_secs(2);

/// Consecutive evaluations that must call for a smaller share before one is given up.
const SHRINK_AFTER: u8 = 2;

/// What one operation queue's fragments did since the last evaluation.
#[derive(Debug, Default, Clone, Copy, PartialEq)]
pub(crate) struct LoadCounts {
    /// Deliveries in hand (not yet acknowledged) now.
    pub held: u32,
    /// The most in hand at once since the last evaluation.
    pub peak: u32,
    /// Fragments acknowledged since the last evaluation.
    pub finished: u32,
    /// Their time running.
    pub run: Duration,
    /// Their time from the end of their run to their report's confirm (the wait for a run
    /// slot is in neither).
    pub settle: Duration,
}

/// The load of one operation queue, as its fragment tasks record it.
#[derive(Debug, Default)]
pub(crate) struct QueueLoad {
    counts: Mutex<LoadCounts>,
}

impl QueueLoad {
    fn counts(&self) -> std::sync::MutexGuard<'_, LoadCounts> {
        self.counts.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A delivery came.
    pub(crate) fn taken(&self) {
        let mut counts = self.counts();
        counts.held += 1;
        counts.peak = counts.peak.max(counts.held);
    }

    /// A delivery is being acknowledged.
    pub(crate) fn released(&self) {
        let mut counts = self.counts();
        counts.held = counts.held.saturating_sub(1);
    }

    /// A fragment was settled: it ran for `run`, then settled in `settle`.
    pub(crate) fn finished(&self, run: Duration, settle: Duration) {
        let mut counts = self.counts();
        counts.finished += 1;
        counts.run += run;
        counts.settle += settle;
    }

    /// What happened since the last call, which starts a new period.
    pub(crate) fn take_period(&self) -> LoadCounts {
        let mut counts = self.counts();
        let period = *counts;
        *counts = LoadCounts {
            held: counts.held,
            peak: counts.held,
            ..LoadCounts::default()
        };
        period
    }
}

/// What a queue's share should do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Decision {
    Keep,
    /// Add a consumer of this prefetch.
    Grow(u16),
    /// Retire one added consumer.
    Shrink,
}

/// The held fragments that keep `slots` run slots busy when a fragment runs for `run` and then
/// settles for `settle`, within `[floor, ceiling]`.
pub(crate) fn target(slots: u16, run: Duration, settle: Duration, floor: u16, ceiling: u16) -> u16 {
    let run = run.as_secs_f64().max(1e-6);
    let wanted = f64::from(slots) * (1.0 + settle.as_secs_f64() / run);
    let wanted = if wanted.is_finite() {
        wanted.floor().min(f64::from(u16::MAX)) as u16
    } else {
        u16::MAX
    };
    wanted.clamp(floor, ceiling.max(floor))
}

/// The decisions of one worker session, per operation queue.
#[derive(Debug)]
pub(crate) struct Controller {
    slots: u16,
    /// A queue's share never goes below its first consumer's prefetch.
    base: u16,
    ceiling: u16,
    /// Evaluations in a row that called for a smaller share, per queue.
    shrink_streak: Vec<u8>,
}

impl Controller {
    pub(crate) fn new(slots: u16, base: u16, ceiling: u16, queues: usize) -> Self {
        Self {
            slots,
            base,
            ceiling,
            shrink_streak: vec![0; queues],
        }
    }

    /// Decides for queue `queue`, which may hold `share` now (its consumers that are not being
    /// retired), given its last period and the `headroom` left in the worker's bound.
    ///
    /// It grows only on a clear signal: its fragments came as fast as it let them (it held
    /// all its share at some point), and keeping the run slots busy needs at least a quarter
    /// more (two at least). It shrinks only after [`SHRINK_AFTER`] periods in a row that
    /// need half of its share or less. A period with nothing finished says nothing.
    pub(crate) fn decide(
        &mut self,
        queue: usize,
        period: LoadCounts,
        share: u16,
        headroom: u16,
    ) -> Decision {
        let streak = &mut self.shrink_streak[queue];
        if period.finished == 0 {
            *streak = 0;
            return Decision::Keep;
        }
        let run = period.run / period.finished;
        let settle = period.settle / period.finished;
        let wanted = target(self.slots, run, settle, self.base, self.ceiling);
        let saturated = period.peak >= u32::from(share);
        if saturated && headroom > 0 && wanted >= share.saturating_add((share / 4).max(2)) {
            *streak = 0;
            return Decision::Grow((wanted - share).min(headroom));
        }
        if share > self.base && wanted.saturating_mul(2) <= share {
            *streak += 1;
            if *streak >= SHRINK_AFTER {
                *streak = 0;
                return Decision::Shrink;
            }
        } else {
            *streak = 0;
        }
        Decision::Keep
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(ms: f64) -> Duration {
        Duration::from_secs_f64(ms / 1000.0)
    }

    fn period(finished: u32, run_ms: f64, settle_ms: f64, peak: u32) -> LoadCounts {
        LoadCounts {
            held: peak,
            peak,
            finished,
            run: ms(run_ms) * finished,
            settle: ms(settle_ms) * finished,
        }
    }

    #[test]
    fn the_target_keeps_the_run_slots_busy() {
        // Fragments of ~0 ms settling in 5 ms: as many as the bound allows.
        assert_eq!(target(4, ms(0.02), ms(5.0), 4, 32), 32);
        // As long running as settling: twice the slots.
        assert_eq!(target(4, ms(5.0), ms(5.0), 4, 32), 8);
        // Long fragments: the slots, no more.
        assert_eq!(target(4, ms(100.0), ms(5.0), 4, 32), 4);
        assert_eq!(target(4, Duration::ZERO, Duration::ZERO, 4, 32), 4);
        assert_eq!(target(4, Duration::ZERO, ms(5.0), 4, 32), 32);
    }

    #[test]
    fn a_saturated_queue_of_short_fragments_grows_within_the_headroom() {
        let mut controller = Controller::new(4, 4, 32, 2);
        assert_eq!(
            controller.decide(0, period(500, 0.02, 5.0, 4), 4, 24),
            Decision::Grow(24)
        );
        assert_eq!(
            controller.decide(0, period(500, 0.02, 5.0, 4), 4, 10),
            Decision::Grow(10)
        );
        assert_eq!(
            controller.decide(0, period(500, 0.02, 5.0, 4), 4, 0),
            Decision::Keep,
            "no headroom"
        );
        // Not saturated: the queue, not the prefetch, bounds it.
        assert_eq!(
            controller.decide(0, period(500, 0.02, 5.0, 3), 4, 24),
            Decision::Keep
        );
    }

    #[test]
    fn long_fragments_do_not_grow_and_shrink_only_after_a_clear_signal() {
        let mut controller = Controller::new(4, 4, 32, 1);
        assert_eq!(
            controller.decide(0, period(8, 100.0, 5.0, 4), 4, 28),
            Decision::Keep
        );
        // A share grown for short fragments, now running long ones.
        assert_eq!(
            controller.decide(0, period(8, 100.0, 5.0, 28), 28, 0),
            Decision::Keep,
            "one period is not enough"
        );
        assert_eq!(
            controller.decide(0, period(0, 0.0, 0.0, 28), 28, 0),
            Decision::Keep,
            "an idle period breaks the streak"
        );
        assert_eq!(
            controller.decide(0, period(8, 100.0, 5.0, 28), 28, 0),
            Decision::Keep
        );
        assert_eq!(
            controller.decide(0, period(8, 100.0, 5.0, 28), 28, 0),
            Decision::Shrink
        );
        // Never below the base.
        for _ in 0..4 {
            assert_eq!(
                controller.decide(0, period(8, 100.0, 5.0, 4), 4, 28),
                Decision::Keep
            );
        }
    }

    #[test]
    fn fragments_as_long_as_their_settlement_ask_for_a_little_more_and_stay() {
        let mut controller = Controller::new(4, 4, 32, 1);
        assert_eq!(
            controller.decide(0, period(400, 5.0, 5.0, 4), 4, 28),
            Decision::Grow(4)
        );
        for _ in 0..4 {
            assert_eq!(
                controller.decide(0, period(800, 5.0, 5.0, 8), 8, 24),
                Decision::Keep
            );
        }
    }

    #[test]
    fn a_period_starts_from_what_is_held() {
        let load = QueueLoad::default();
        load.taken();
        load.taken();
        load.taken();
        load.released();
        load.finished(ms(1.0), ms(4.0));
        let first = load.take_period();
        assert_eq!((first.held, first.peak, first.finished), (2, 3, 1));
        assert_eq!((first.run, first.settle), (ms(1.0), ms(4.0)));
        let second = load.take_period();
        assert_eq!(
            second,
            LoadCounts {
                held: 2,
                peak: 2,
                ..LoadCounts::default()
            }
        );
    }
}
