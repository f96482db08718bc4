//! A process-wide memory budget for upload buffers (and decoded images): a reservation is taken
//! before bytes are held and returned when they are released, so many concurrent uploads make
//! each other wait instead of the process running out of memory.

use std::{sync::Arc, time::Duration};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Reservations are counted in KiB so a budget of many GiB fits the semaphore's permit count.
const UNIT: u64 = 1024;

#[derive(Debug)]
pub struct MemoryBudget {
    permits: Arc<Semaphore>,
    total_units: u32,
    wait_timeout: Duration,
}

/// Bytes held against the budget until this is dropped.
#[derive(Debug)]
pub struct MemoryReservation {
    _permit: OwnedSemaphorePermit,
    bytes: u64,
}

impl MemoryReservation {
    pub fn bytes(&self) -> u64 {
        self.bytes
    }
}

/// The budget stayed full for the whole wait.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the upload memory budget stayed exhausted for {waited:?}")]
pub struct BudgetExhausted {
    pub waited: Duration,
}

impl MemoryBudget {
    pub fn new(bytes: u64, wait_timeout: Duration) -> Arc<Self> {
        let total_units = u32::try_from(bytes.div_ceil(UNIT)).unwrap_or(u32::MAX);
        Arc::new(Self {
            permits: Arc::new(Semaphore::new(total_units as usize)),
            total_units,
            wait_timeout,
        })
    }

    /// Reserves `bytes`, waiting up to the configured timeout for others to release theirs.
    /// A request larger than the whole budget is capped to it, so it can still proceed alone.
    pub async fn reserve(&self, bytes: u64) -> Result<MemoryReservation, BudgetExhausted> {
        let units = u32::try_from(bytes.div_ceil(UNIT))
            .unwrap_or(u32::MAX)
            .clamp(1, self.total_units.max(1));
        let acquire = self.permits.clone().acquire_many_owned(units);
        match tokio::time::timeout(self.wait_timeout, acquire).await {
            Ok(Ok(permit)) => Ok(MemoryReservation {
                _permit: permit,
                bytes,
            }),
            // The semaphore is never closed; treat it like a timeout all the same.
            Ok(Err(_)) | Err(_) => Err(BudgetExhausted {
                waited: self.wait_timeout,
            }),
        }
    }

    /// Bytes of the whole budget.
    pub fn total_bytes(&self) -> u64 {
        u64::from(self.total_units) * UNIT
    }

    /// Bytes currently free.
    pub fn available_bytes(&self) -> u64 {
        self.permits.available_permits() as u64 * UNIT
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn reservations_wait_for_each_other_and_time_out() {
        let budget = MemoryBudget::new(10 * 1024, Duration::from_millis(100));
        let first = budget.reserve(8 * 1024).await.unwrap();
        assert_eq!(budget.available_bytes(), 2 * 1024);
        assert!(
            budget.reserve(4 * 1024).await.is_err(),
            "over budget: times out"
        );
        drop(first);
        let second = budget.reserve(4 * 1024).await.unwrap();
        assert_eq!(second.bytes(), 4 * 1024);
        // Larger than the whole budget: capped, so it can run alone.
        drop(second);
        assert!(budget.reserve(1 << 40).await.is_ok());
    }
}
