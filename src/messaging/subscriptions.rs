//! How many live subscriptions each caller holds on this replica. A slot is taken before a
//! stream starts and given back when the stream is dropped, however it ends (the client
//! cancels, the server ends it with a status, or the server shuts down), so a caller who opens
//! streams without end cannot hold this replica's memory and fan-out work.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex, MutexGuard},
};

use crate::ids::UserId;

/// The live-subscription slots of every caller on this replica.
pub struct SubscriptionSlots {
    per_caller: usize,
    held: Mutex<HashMap<UserId, usize>>,
}

/// One held slot; dropping it gives the slot back.
pub struct SubscriptionSlot {
    slots: Arc<SubscriptionSlots>,
    user: UserId,
}

impl SubscriptionSlots {
    pub fn new(per_caller: usize) -> Arc<Self> {
        Arc::new(Self {
            per_caller,
            held: Mutex::new(HashMap::new()),
        })
    }

    /// Most slots one caller may hold at once.
    pub fn per_caller(&self) -> usize {
        self.per_caller
    }

    /// A slot for `user`, unless they hold every slot they may.
    pub fn try_acquire(self: &Arc<Self>, user: &UserId) -> Option<SubscriptionSlot> {
        let mut held = self.lock();
        let count = held.entry(user.clone()).or_default();
        if *count >= self.per_caller {
            return None;
        }
        *count += 1;
        Some(SubscriptionSlot {
            slots: self.clone(),
            user: user.clone(),
        })
    }

    /// Slots `user` holds now.
    pub fn held_by(&self, user: &UserId) -> usize {
        self.lock().get(user).copied().unwrap_or(0)
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<UserId, usize>> {
        // Counts are updated in single statements: a poisoned lock still holds true counts.
        self.held
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

impl Drop for SubscriptionSlot {
    fn drop(&mut self) {
        let mut held = self.slots.lock();
        if let Some(count) = held.get_mut(&self.user) {
            *count -= 1;
            // Callers without streams take no memory.
            if *count == 0 {
                held.remove(&self.user);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_per_caller_and_come_back_on_drop() {
        let slots = SubscriptionSlots::new(2);
        let alice = UserId::parse("alice").unwrap();
        let bob = UserId::parse("bob").unwrap();
        let first = slots.try_acquire(&alice).unwrap();
        let _second = slots.try_acquire(&alice).unwrap();
        assert!(slots.try_acquire(&alice).is_none());
        assert!(slots.try_acquire(&bob).is_some());
        drop(first);
        assert_eq!(slots.held_by(&alice), 1);
        assert!(slots.try_acquire(&alice).is_some());
    }
}
