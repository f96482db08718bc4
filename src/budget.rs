//! A process-wide memory budget for upload buffers (and decoded images): a reservation is taken
//! before bytes are held and returned when they are released, so many concurrent uploads make
//! each other wait instead of the process running out of memory.
//!
//! Memory is reserved as bytes arrive, never ahead of them, without letting half-filled buffers
//! wait on each other forever. The budget has two pools:
//! - the *first-bytes* pool (an eighth of the budget) serves the first [`FIRST_BYTES_LIMIT`] of
//!   every buffer unit by unit as they arrive (a stalled stream that sent one byte holds one KiB),
//!   and never waits;
//! - the *main* pool serves whole buffers: once a buffer outgrows its first bytes (or the
//!   first-bytes pool is empty), [`MemoryBudget::grow`] reserves the most that buffer can hold
//!   (a part, an image body) in one step and gives its first-bytes units back.
//!
//! So a buffer waiting for memory never holds main memory another waiter needs to finish (it
//! holds at most first bytes, from a pool main waits never depend on), and whole buffers in the
//! main pool always complete and release: every wait ends when someone finishes, as with
//! whole-buffer reservations, while idle or slow streams hold only what they sent.

use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Reservations are counted in KiB so a budget of many GiB fits the semaphore's permit count.
const UNIT: u64 = 1024;

/// How much of a buffer is reserved byte by byte (in KiB units) before it takes a whole buffer.
pub const FIRST_BYTES_LIMIT: u64 = 1024 * 1024;

#[derive(Debug)]
pub struct MemoryBudget {
    main: Arc<Semaphore>,
    main_units: u32,
    first_bytes: Arc<Semaphore>,
    first_bytes_units: u32,
    wait_timeout: Duration,
    /// Reservations of bytes returned so far (see [`MemoryBudget::releases`]).
    releases: Arc<AtomicU64>,
}

/// Bytes held against the budget until this is dropped.
#[derive(Debug)]
pub struct MemoryReservation {
    /// Units of the first-bytes pool, while the buffer is small.
    first_bytes: Option<OwnedSemaphorePermit>,
    /// Units of the main pool: a whole buffer's worth once it outgrew its first bytes.
    main: Option<OwnedSemaphorePermit>,
    bytes: u64,
    releases: Arc<AtomicU64>,
}

impl Drop for MemoryReservation {
    fn drop(&mut self) {
        if self.first_bytes.is_some() || self.main.is_some() {
            self.releases.fetch_add(1, Ordering::Relaxed);
        }
    }
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
        let first_bytes_units = total_units / 8;
        let main_units = total_units - first_bytes_units;
        Arc::new(Self {
            main: Arc::new(Semaphore::new(main_units as usize)),
            main_units,
            first_bytes: Arc::new(Semaphore::new(first_bytes_units as usize)),
            first_bytes_units,
            wait_timeout,
            releases: Arc::new(AtomicU64::new(0)),
        })
    }

    /// How many reservations holding memory were returned so far: a change means buffers were
    /// freed since the last look.
    pub fn releases(&self) -> u64 {
        self.releases.load(Ordering::Relaxed)
    }

    /// Whether nothing is reserved.
    pub fn is_idle(&self) -> bool {
        self.main.available_permits() == self.main_units as usize
            && self.first_bytes.available_permits() == self.first_bytes_units as usize
    }

    /// Reserves `bytes` from the main pool at once, waiting up to the configured timeout for
    /// others to release theirs. A request larger than the whole pool is capped to it, so it can
    /// still proceed alone.
    pub async fn reserve(&self, bytes: u64) -> Result<MemoryReservation, BudgetExhausted> {
        let permit = self.acquire_main(bytes).await?;
        Ok(MemoryReservation {
            first_bytes: None,
            main: Some(permit),
            bytes,
            releases: self.releases.clone(),
        })
    }

    /// Reserves `bytes` from the main pool only if they are free now.
    pub fn try_reserve(&self, bytes: u64) -> Option<MemoryReservation> {
        let permit = self
            .main
            .clone()
            .try_acquire_many_owned(self.main_units_for(bytes))
            .ok()?;
        Some(MemoryReservation {
            first_bytes: None,
            main: Some(permit),
            bytes,
            releases: self.releases.clone(),
        })
    }

    /// A reservation of nothing yet, for a buffer that [`MemoryBudget::grow`]s it as it fills.
    pub fn empty(&self) -> MemoryReservation {
        MemoryReservation {
            first_bytes: None,
            main: None,
            bytes: 0,
            releases: self.releases.clone(),
        }
    }

    /// Grows `reservation` to cover `bytes` of a buffer that will never hold more than
    /// `capacity`: from the first-bytes pool while the buffer is small and that pool has room
    /// (never waiting), else `capacity` at once from the main pool (waiting up to the configured
    /// timeout). On failure the reservation keeps what it had.
    pub async fn grow(
        &self,
        reservation: &mut MemoryReservation,
        bytes: u64,
        capacity: u64,
    ) -> Result<(), BudgetExhausted> {
        if bytes <= reservation.bytes || reservation.main.is_some() {
            reservation.bytes = reservation.bytes.max(bytes);
            return Ok(());
        }
        let wanted = units(bytes);
        let held = reservation
            .first_bytes
            .as_ref()
            .map_or(0, |permit| permit.num_permits() as u32);
        if bytes <= FIRST_BYTES_LIMIT.min(capacity.max(1))
            && let Ok(permit) = self
                .first_bytes
                .clone()
                .try_acquire_many_owned(wanted.saturating_sub(held))
        {
            match &mut reservation.first_bytes {
                Some(first_bytes) => first_bytes.merge(permit),
                None => reservation.first_bytes = Some(permit),
            }
            reservation.bytes = bytes;
            return Ok(());
        }
        let permit = self.acquire_main(capacity.max(bytes)).await?;
        reservation.main = Some(permit);
        // Given back only now: a failed wait keeps the buffer's bytes covered.
        reservation.first_bytes = None;
        reservation.bytes = bytes;
        Ok(())
    }

    /// The main pool's units for `bytes`: at least one, at most the whole pool (a larger
    /// reservation waits for all of it rather than for ever).
    fn main_units_for(&self, bytes: u64) -> u32 {
        units(bytes).clamp(1, self.main_units.max(1))
    }

    async fn acquire_main(&self, bytes: u64) -> Result<OwnedSemaphorePermit, BudgetExhausted> {
        let acquire = self
            .main
            .clone()
            .acquire_many_owned(self.main_units_for(bytes));
        match tokio::time::timeout(self.wait_timeout, acquire).await {
            Ok(Ok(permit)) => Ok(permit),
            // The semaphore is never closed; treat it like a timeout all the same.
            Ok(Err(_)) | Err(_) => Err(BudgetExhausted {
                waited: self.wait_timeout,
            }),
        }
    }

    /// Bytes currently free, in both pools.
    pub fn available_bytes(&self) -> u64 {
        (self.main.available_permits() + self.first_bytes.available_permits()) as u64 * UNIT
    }

    /// Bytes the main pool (whole buffers, decodes) has in all.
    pub fn main_bytes(&self) -> u64 {
        u64::from(self.main_units) * UNIT
    }

    /// Bytes the first-bytes pool has in all.
    pub fn first_bytes_bytes(&self) -> u64 {
        u64::from(self.first_bytes_units) * UNIT
    }
}

fn units(bytes: u64) -> u32 {
    u32::try_from(bytes.div_ceil(UNIT)).unwrap_or(u32::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn reservations_wait_for_each_other_and_time_out() {
        // 80 KiB: 70 KiB main, 10 KiB first bytes.
        let budget = MemoryBudget::new(80 * 1024, Duration::from_millis(100));
        let first = budget.reserve(60 * 1024).await.unwrap();
        assert_eq!(budget.available_bytes(), 20 * 1024);
        assert!(
            budget.reserve(20 * 1024).await.is_err(),
            "over the main pool: times out"
        );
        drop(first);
        let second = budget.reserve(40 * 1024).await.unwrap();
        assert_eq!(second.bytes(), 40 * 1024);
        // Larger than the whole pool: capped, so it can run alone.
        drop(second);
        assert!(budget.reserve(1 << 40).await.is_ok());
    }

    #[tokio::test]
    async fn try_reserve_takes_only_what_is_free_now() {
        // 80 KiB: 70 KiB main, 10 KiB first bytes.
        let budget = MemoryBudget::new(80 * 1024, Duration::from_secs(60));
        let held = budget.try_reserve(60 * 1024).expect("free");
        let started = std::time::Instant::now();
        assert!(
            budget.try_reserve(20 * 1024).is_none(),
            "over the main pool"
        );
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "it does not wait"
        );
        drop(held);
        assert_eq!(budget.try_reserve(20 * 1024).unwrap().bytes(), 20 * 1024);
    }

    #[tokio::test]
    async fn buffers_hold_their_first_bytes_then_a_whole_buffer() {
        // 16 MiB: 14 MiB main, 2 MiB first bytes.
        const MIB: u64 = 1024 * 1024;
        let budget = MemoryBudget::new(16 * MIB, Duration::from_millis(100));
        assert_eq!(budget.main_bytes(), 14 * MIB);
        let mut growing = budget.empty();
        budget.grow(&mut growing, 1, 8 * MIB).await.unwrap();
        assert_eq!(
            budget.available_bytes(),
            16 * MIB - 1024,
            "one byte holds one unit"
        );
        budget.grow(&mut growing, 1000, 8 * MIB).await.unwrap();
        assert_eq!(
            budget.available_bytes(),
            16 * MIB - 1024,
            "still within the unit"
        );
        budget.grow(&mut growing, MIB, 8 * MIB).await.unwrap();
        assert_eq!(budget.available_bytes(), 15 * MIB);
        // Past its first bytes: the whole buffer, and the first bytes go back.
        budget.grow(&mut growing, MIB + 1, 8 * MIB).await.unwrap();
        assert_eq!(budget.available_bytes(), 8 * MIB);
        budget.grow(&mut growing, 8 * MIB, 8 * MIB).await.unwrap();
        assert_eq!(budget.available_bytes(), 8 * MIB, "covered already");

        // Two stalled buffers of 1 MiB take the first-bytes pool; the next buffer's first byte
        // then needs a whole buffer, which waits for the main pool.
        let mut stalled = [budget.empty(), budget.empty()];
        for buffer in &mut stalled {
            budget.grow(buffer, MIB, 8 * MIB).await.unwrap();
        }
        let mut next = budget.empty();
        assert!(
            budget.grow(&mut next, 1, 8 * MIB).await.is_err(),
            "6 MiB of main left"
        );
        assert_eq!(next.bytes(), 0, "a failed growth keeps what was held");
        drop(growing);
        budget.grow(&mut next, 1, 8 * MIB).await.unwrap();
        drop((stalled, next));
        assert_eq!(budget.available_bytes(), 16 * MIB);
    }
}
