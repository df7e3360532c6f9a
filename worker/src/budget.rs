//! `--max-fragments`: a worker that runs at most N fragments, then retires as on SIGTERM.
//!
//! A fragment counts when the worker took it within its budget and settled it (reported and
//! acknowledged), whatever became of it: run to its end, cut at its lifespan, dropped because
//! its job was cancelled, or kept on the dead-letter queue. Each of those is one delivery taken
//! off the work queue for good, which is what bounds the life of an instance. A fragment in
//! hand when a session breaks is not acknowledged, goes back to the broker, and is not counted.
//!
//! The worker must not take more than it will run: a delivery the broker sent and the worker
//! hands back unrun costs a round trip, and one returned by the broker counts against the work
//! queue's delivery limit. A work queue is a quorum queue, whose prefetch is per consumer and
//! fixed when the consumer starts, so it cannot be narrowed as the budget shrinks. Instead the
//! broker is never given room for more: it sends at most `window` (the prefetch of every
//! consumer) plus one delivery per acknowledgement, so an acknowledgement that would let it
//! send past the budget waits until the consumers are cancelled.

use std::sync::Mutex;

use tokio_util::sync::CancellationToken;

/// The prefetch of each of `consumers` consumers: the worker's `prefetch`, lowered so that all
/// of them together hold no more than the `remaining` budget where that can be (a consumer
/// holds at least one).
pub(crate) fn consumer_prefetch(prefetch: u16, remaining: u64, consumers: usize) -> u16 {
    let consumers = consumers.max(1) as u64;
    let share = (remaining / consumers).max(1);
    u16::try_from(share).map_or(prefetch, |share| share.min(prefetch))
}

/// What a delivery is to the budget.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Taken {
    /// Within the budget: run it, and count it once it is settled.
    Counted,
    /// Past the budget (only when the worker consumes more queues than it has fragments
    /// left, each consumer holding one): hand it back unrun.
    Excess,
}

/// The budget of one broker session.
#[derive(Debug)]
pub(crate) struct SessionBudget {
    counts: Mutex<Counts>,
    /// Fires when the session must stop consuming: every fragment left is in hand.
    exhausted: CancellationToken,
}

#[derive(Debug)]
struct Counts {
    /// Fragments this session may still take.
    remaining: u64,
    /// Deliveries the broker may send before any acknowledgement: the prefetch of every
    /// consumer.
    window: u64,
    /// Deliveries received in this session.
    taken: u64,
    /// Acknowledgements sent while the consumers were still consuming.
    acks_released: u64,
}

impl SessionBudget {
    pub(crate) fn new(remaining: u64, window: u64) -> Self {
        let budget = Self {
            counts: Mutex::new(Counts {
                remaining,
                window,
                taken: 0,
                acks_released: 0,
            }),
            exhausted: CancellationToken::new(),
        };
        if remaining == 0 {
            budget.exhausted.cancel();
        }
        budget
    }

    fn counts(&self) -> std::sync::MutexGuard<'_, Counts> {
        self.counts.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Fires when the session must stop consuming.
    pub(crate) fn exhausted(&self) -> &CancellationToken {
        &self.exhausted
    }

    /// Accounts for one delivery. The one that takes the last fragment of the budget ends
    /// the consuming.
    pub(crate) fn take(&self) -> Taken {
        let mut counts = self.counts();
        counts.taken += 1;
        if counts.taken >= counts.remaining {
            self.exhausted.cancel();
        }
        if counts.taken <= counts.remaining {
            Taken::Counted
        } else {
            Taken::Excess
        }
    }

    /// Whether an acknowledgement may go now, while the consumers consume: only if the room
    /// it gives the broker stays within the budget. Otherwise it waits for the consumers'
    /// cancellation, which comes once the broker has filled the room it already has (the
    /// delivery that takes the last fragment) or on a shutdown. Cancelling earlier, with room
    /// left, would race a delivery the broker is sending: a quorum queue returns one in flight
    /// at the cancellation, marked redelivered, counting against its delivery limit.
    pub(crate) fn release_ack(&self) -> bool {
        let mut counts = self.counts();
        if counts.window + counts.acks_released < counts.remaining {
            counts.acks_released += 1;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_prefetch_shrinks_to_the_budget_shared_by_the_consumers() {
        assert_eq!(consumer_prefetch(4, 40, 1), 4);
        assert_eq!(consumer_prefetch(10, 5, 1), 5, "prefetch > N: hold only N");
        assert_eq!(consumer_prefetch(4, 5, 3), 1);
        assert_eq!(consumer_prefetch(4, 12, 3), 4);
        assert_eq!(consumer_prefetch(4, 2, 3), 1, "every consumer holds one");
        assert_eq!(consumer_prefetch(4, u64::MAX, 2), 4);
    }

    /// A broker with one queue of `ready` fragments and a consumer window of `window`
    /// deliveries, sending as eagerly as it can: all the window allows before the worker gets
    /// a turn. At each turn the worker cancels its consumers if the budget says so (the
    /// broker sends nothing after that), then finishes its oldest fragment and acknowledges
    /// it if the budget lets it (a held acknowledgement gives the broker no room, and goes
    /// once the consumers are cancelled).
    /// Returns (deliveries sent, counted, excess, whether it stopped consuming).
    fn simulate(remaining: u64, window: u64, ready: u64) -> (u64, u64, u64, bool) {
        let budget = SessionBudget::new(remaining, window);
        let (mut sent, mut counted, mut excess) = (0, 0, 0);
        let (mut ready, mut unacked, mut finished) = (ready, 0, 0);
        let mut cancelled = false;
        loop {
            while !cancelled && unacked < window && ready > 0 {
                ready -= 1;
                unacked += 1;
                sent += 1;
                match budget.take() {
                    Taken::Counted => counted += 1,
                    Taken::Excess => excess += 1,
                }
            }
            cancelled |= budget.exhausted().is_cancelled();
            if finished == unacked {
                break;
            }
            finished += 1;
            if !cancelled && budget.release_ack() {
                finished -= 1;
                unacked -= 1;
            }
        }
        (sent, counted, excess, cancelled)
    }

    #[test]
    fn the_broker_never_sends_past_the_budget() {
        for remaining in 1..=12 {
            for window in 1..=remaining {
                for ready in [0, remaining / 2, remaining, remaining + 1, 3 * remaining] {
                    let (sent, counted, excess, stopped) = simulate(remaining, window, ready);
                    let case = format!("N={remaining} window={window} ready={ready}");
                    assert!(sent <= remaining, "{case}: sent {sent}");
                    assert_eq!(excess, 0, "{case}");
                    assert_eq!(counted, sent, "{case}");
                    if ready >= remaining {
                        assert_eq!(counted, remaining, "{case}: a full queue gives all N");
                        assert!(stopped, "{case}");
                    } else {
                        // A queue that ran dry: the worker waits for the rest, consuming.
                        assert_eq!(counted, ready, "{case}");
                        assert!(!stopped, "{case}");
                    }
                }
            }
        }
    }

    #[test]
    fn a_window_wider_than_the_budget_hands_the_excess_back() {
        // Three consumers of one prefetch each, two fragments left.
        let (sent, counted, excess, stopped) = simulate(2, 3, 10);
        assert_eq!((sent, counted, excess, stopped), (3, 2, 1, true));
    }

    #[test]
    fn a_spent_budget_stops_at_once() {
        let budget = SessionBudget::new(0, 1);
        assert!(budget.exhausted().is_cancelled());
        assert_eq!(budget.take(), Taken::Excess);
    }
}
