//! A process-wide memory budget for upload buffers (and decoded images): a reservation is taken
//! before bytes are held and returned when they are released, so many concurrent uploads make
//! each other wait instead of the process running out of memory.
//!
//! Buffers that fill as bytes arrive start from an empty reservation and [`MemoryBudget::grow`]
//! it chunk by chunk, so a stream that sent one byte holds one unit, not a whole buffer.

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
    permit: OwnedSemaphorePermit,
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
            Ok(Ok(permit)) => Ok(MemoryReservation { permit, bytes }),
            // The semaphore is never closed; treat it like a timeout all the same.
            Ok(Err(_)) | Err(_) => Err(BudgetExhausted {
                waited: self.wait_timeout,
            }),
        }
    }

    /// A reservation of nothing yet, for a buffer that [`MemoryBudget::grow`]s it as it fills.
    pub fn empty(&self) -> MemoryReservation {
        let permit = self
            .permits
            .clone()
            .try_acquire_many_owned(0)
            .expect("zero permits are always available from an open semaphore");
        MemoryReservation { permit, bytes: 0 }
    }

    /// Grows `reservation` to cover `bytes` (no-op when it already does), waiting up to the
    /// configured timeout for the difference. Like [`MemoryBudget::reserve`], a reservation never
    /// grows past the whole budget. On failure the reservation keeps what it had.
    pub async fn grow(
        &self,
        reservation: &mut MemoryReservation,
        bytes: u64,
    ) -> Result<(), BudgetExhausted> {
        if bytes <= reservation.bytes {
            return Ok(());
        }
        let held_units = reservation.permit.num_permits() as u64;
        let wanted_units = bytes.div_ceil(UNIT).min(u64::from(self.total_units.max(1)));
        if wanted_units > held_units {
            let extra = u32::try_from(wanted_units - held_units).unwrap_or(u32::MAX);
            let acquire = self.permits.clone().acquire_many_owned(extra);
            match tokio::time::timeout(self.wait_timeout, acquire).await {
                Ok(Ok(permit)) => reservation.permit.merge(permit),
                Ok(Err(_)) | Err(_) => {
                    return Err(BudgetExhausted {
                        waited: self.wait_timeout,
                    });
                }
            }
        }
        reservation.bytes = bytes;
        Ok(())
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

    #[tokio::test]
    async fn reservations_grow_as_bytes_arrive() {
        let budget = MemoryBudget::new(10 * 1024, Duration::from_millis(100));
        let mut growing = budget.empty();
        assert_eq!(budget.available_bytes(), 10 * 1024);
        budget.grow(&mut growing, 1).await.unwrap();
        assert_eq!(
            budget.available_bytes(),
            9 * 1024,
            "one byte holds one unit"
        );
        budget.grow(&mut growing, 1000).await.unwrap();
        assert_eq!(budget.available_bytes(), 9 * 1024, "still within the unit");
        budget.grow(&mut growing, 6 * 1024).await.unwrap();
        assert_eq!(growing.bytes(), 6 * 1024);
        assert_eq!(budget.available_bytes(), 4 * 1024);
        let other = budget.reserve(4 * 1024).await.unwrap();
        assert!(
            budget.grow(&mut growing, 7 * 1024).await.is_err(),
            "over budget: times out"
        );
        assert_eq!(
            growing.bytes(),
            6 * 1024,
            "a failed growth keeps what was held"
        );
        drop(other);
        budget.grow(&mut growing, 7 * 1024).await.unwrap();
        drop(growing);
        assert_eq!(budget.available_bytes(), 10 * 1024);
    }
}
