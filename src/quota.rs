//! Per-caller slots: how many of one kind of long-lived call (uploads, live subscriptions) each
//! caller holds on this replica. A slot is taken before the call starts and given back when it
//! is dropped, however the call ends (the client cancels, the server ends it with a status, or
//! the server shuts down), so a caller who opens calls without end cannot hold this replica's
//! memory and attention.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex, MutexGuard},
};

use crate::ids::UserId;

type Counts = Arc<Mutex<HashMap<UserId, usize>>>;

/// The slots of every caller that holds one; see the module docs.
#[derive(Debug)]
pub struct PerCallerSlots {
    per_caller: usize,
    held: Counts,
}

/// One held slot; dropping it gives the slot back.
#[derive(Debug)]
pub struct CallerSlot {
    user: UserId,
    held: Counts,
}

impl PerCallerSlots {
    pub fn new(per_caller: usize) -> Self {
        Self {
            per_caller,
            held: Counts::default(),
        }
    }

    /// Most slots one caller may hold at once.
    pub fn per_caller(&self) -> usize {
        self.per_caller
    }

    /// A slot for `user`, unless they hold every slot they may.
    pub fn try_take(&self, user: &UserId) -> Option<CallerSlot> {
        let mut held = lock(&self.held);
        let count = held.entry(user.clone()).or_default();
        if *count >= self.per_caller {
            return None;
        }
        *count += 1;
        Some(CallerSlot {
            user: user.clone(),
            held: self.held.clone(),
        })
    }

    /// Slots `user` holds now.
    #[cfg(test)]
    pub fn held_by(&self, user: &UserId) -> usize {
        lock(&self.held).get(user).copied().unwrap_or(0)
    }
}

impl Drop for CallerSlot {
    fn drop(&mut self) {
        let mut held = lock(&self.held);
        if let Some(count) = held.get_mut(&self.user) {
            *count -= 1;
            // Callers without a slot take no room in the map.
            if *count == 0 {
                held.remove(&self.user);
            }
        }
    }
}

fn lock(counts: &Counts) -> MutexGuard<'_, HashMap<UserId, usize>> {
    // Counts are updated in single statements: a poisoned lock still holds true counts.
    counts
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_caller_has_their_own_slots_given_back_on_drop() {
        let slots = PerCallerSlots::new(2);
        let alice = UserId::parse("alice").unwrap();
        let bob = UserId::parse("bob").unwrap();
        let first = slots.try_take(&alice).unwrap();
        let _second = slots.try_take(&alice).unwrap();
        assert!(slots.try_take(&alice).is_none());
        let bobs = slots.try_take(&bob);
        assert!(bobs.is_some(), "bob's slots are his own");
        drop(first);
        assert_eq!(slots.held_by(&alice), 1);
        assert!(slots.try_take(&alice).is_some());
        drop(bobs);
        assert!(
            lock(&slots.held).get(&bob).is_none(),
            "no entry left for bob"
        );
    }
}
