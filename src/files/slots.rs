//! How many uploads each caller has open: one caller's streams, however many it opens, cannot
//! take more than their share of the memory budget and the server's attention.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
};

use crate::ids::UserId;

/// Counts the open uploads of every caller that has one; see the module docs.
#[derive(Debug)]
pub struct UploadSlots {
    per_caller: usize,
    open: Arc<Mutex<HashMap<UserId, usize>>>,
}

/// One open upload of a caller, given back when dropped (however the upload ends).
#[derive(Debug)]
pub struct UploadSlot {
    user_id: UserId,
    open: Arc<Mutex<HashMap<UserId, usize>>>,
}

impl UploadSlots {
    pub fn new(per_caller: usize) -> Self {
        Self {
            per_caller,
            open: Arc::default(),
        }
    }

    /// Most uploads one caller may have open.
    pub fn per_caller(&self) -> usize {
        self.per_caller
    }

    /// A slot for `user_id`, or `None` when they already have `per_caller` uploads open.
    pub fn try_take(&self, user_id: &UserId) -> Option<UploadSlot> {
        let mut open = self
            .open
            .lock()
            .unwrap_or_else(|poison| poison.into_inner());
        let count = open.entry(user_id.clone()).or_insert(0);
        if *count >= self.per_caller {
            return None;
        }
        *count += 1;
        Some(UploadSlot {
            user_id: user_id.clone(),
            open: self.open.clone(),
        })
    }

    /// Uploads `user_id` has open.
    pub fn open_uploads(&self, user_id: &UserId) -> usize {
        let open = self
            .open
            .lock()
            .unwrap_or_else(|poison| poison.into_inner());
        open.get(user_id).copied().unwrap_or(0)
    }
}

impl Drop for UploadSlot {
    fn drop(&mut self) {
        let mut open = self
            .open
            .lock()
            .unwrap_or_else(|poison| poison.into_inner());
        if let Some(count) = open.get_mut(&self.user_id) {
            *count -= 1;
            // Callers without an open upload take no room in the map.
            if *count == 0 {
                open.remove(&self.user_id);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_caller_has_their_own_slots_given_back_on_drop() {
        let slots = UploadSlots::new(2);
        let alice = UserId::parse("alice").unwrap();
        let bob = UserId::parse("bob").unwrap();
        let first = slots.try_take(&alice).unwrap();
        let _second = slots.try_take(&alice).unwrap();
        assert!(slots.try_take(&alice).is_none());
        assert!(slots.try_take(&bob).is_some(), "bob's slots are his own");
        drop(first);
        assert_eq!(slots.open_uploads(&alice), 1);
        assert!(slots.try_take(&alice).is_some());
        assert!(
            slots.open.lock().unwrap().get(&bob).is_none(),
            "no entry left for bob"
        );
    }
}
