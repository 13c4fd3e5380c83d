//! Virtual time and the event queue: events fire in time order, ties in the
//! order they were scheduled, so a run is a pure function of its seed.

use std::cmp::Reverse;
use std::collections::BinaryHeap;

use kivaloo::contract::Instant;

/// One nanosecond, as virtual time counts.
pub const NS: u64 = 1;
/// One microsecond of virtual time.
pub const US: u64 = 1_000;
/// One millisecond of virtual time.
pub const MS: u64 = 1_000_000;
/// One second of virtual time.
pub const SEC: u64 = 1_000_000_000;

/// The heap holds only the ordering key and where the event waits, so that
/// sifting moves 24 bytes, not an event (the run loop's hottest path).
#[derive(PartialEq, Eq, PartialOrd, Ord)]
struct Key {
    at: Instant,
    seq: u64,
    slot: u32,
}

pub struct EventQueue<E> {
    now: Instant,
    seq: u64,
    heap: BinaryHeap<Reverse<Key>>,
    /// Events by slot; `free` lists the empty slots.
    slots: Vec<Option<E>>,
    free: Vec<u32>,
}

impl<E> Default for EventQueue<E> {
    fn default() -> Self {
        EventQueue {
            now: Instant::from_nanos(0),
            seq: 0,
            heap: BinaryHeap::new(),
            slots: Vec::new(),
            free: Vec::new(),
        }
    }
}

impl<E> EventQueue<E> {
    /// The current virtual time.
    pub fn now(&self) -> Instant {
        self.now
    }

    /// Schedules `event` `delay_ns` from now.
    pub fn after(&mut self, delay_ns: u64, event: E) {
        let at = self.now.after_ns(delay_ns);
        self.at(at, event);
    }

    /// Schedules `event` at `at` (not before now).
    pub fn at(&mut self, at: Instant, event: E) {
        let at = at.max(self.now);
        self.seq += 1;
        let slot = match self.free.pop() {
            Some(slot) => {
                self.slots[slot as usize] = Some(event);
                slot
            }
            None => {
                self.slots.push(Some(event));
                u32::try_from(self.slots.len() - 1).expect("fewer than 2^32 events pending")
            }
        };
        self.heap.push(Reverse(Key { at, seq: self.seq, slot }));
    }

    /// Takes the next event (time order, ties in scheduling order),
    /// advancing the clock to it.
    pub fn pop(&mut self) -> Option<E> {
        let Reverse(key) = self.heap.pop()?;
        self.now = key.at;
        self.free.push(key.slot);
        self.slots[key.slot as usize].take()
    }

    /// Events still pending.
    pub fn len(&self) -> usize {
        self.heap.len()
    }

    /// Whether nothing is pending.
    pub fn is_empty(&self) -> bool {
        self.heap.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_fire_in_time_then_schedule_order() {
        let mut q = EventQueue::default();
        q.after(5, "c");
        q.after(1, "a");
        q.after(5, "d");
        q.after(2, "b");
        let order: Vec<_> = std::iter::from_fn(|| q.pop()).collect();
        assert_eq!(order, ["a", "b", "c", "d"]);
        assert_eq!(q.now(), Instant::from_nanos(5));
    }
}
