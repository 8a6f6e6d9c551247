//! The only place that reads the time.
//!
//! Production code asks a [`Clock`] for wall time (unix ms, for timestamps that are stored or
//! shown) and monotonic time (for idle and timeout decisions). Tests build a manual clock and
//! move it forward instead of sleeping.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

/// A cheap, cloneable source of time.
#[derive(Clone, Debug)]
pub struct Clock(Arc<Inner>);

#[derive(Debug)]
enum Inner {
    System { origin: Instant },
    Manual { wall_ms: AtomicU64, mono_ms: AtomicU64 },
}

impl Clock {
    /// The real clock.
    pub fn system() -> Self {
        Clock(Arc::new(Inner::System { origin: Instant::now() }))
    }

    /// A clock that only moves when told to, starting at `wall_ms`.
    pub fn manual(wall_ms: u64) -> Self {
        Clock(Arc::new(Inner::Manual { wall_ms: AtomicU64::new(wall_ms), mono_ms: AtomicU64::new(0) }))
    }

    /// Wall time in unix milliseconds.
    pub fn now_ms(&self) -> u64 {
        match &*self.0 {
            Inner::System { .. } => {
                SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
            }
            Inner::Manual { wall_ms, .. } => wall_ms.load(Ordering::Acquire),
        }
    }

    /// Monotonic milliseconds since the clock was made; never goes backwards.
    pub fn mono_ms(&self) -> u64 {
        match &*self.0 {
            Inner::System { origin } => origin.elapsed().as_millis() as u64,
            Inner::Manual { mono_ms, .. } => mono_ms.load(Ordering::Acquire),
        }
    }

    /// Moves a manual clock forward; a no-op on the system clock.
    pub fn advance_ms(&self, ms: u64) {
        if let Inner::Manual { wall_ms, mono_ms } = &*self.0 {
            wall_ms.fetch_add(ms, Ordering::AcqRel);
            mono_ms.fetch_add(ms, Ordering::AcqRel);
        }
    }
}

/// Monotonic instant for measuring short durations (latency histograms) in hot paths.
pub fn instant() -> Instant {
    Instant::now()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn manual_clock_moves_only_when_advanced() {
        let c = Clock::manual(1_000);
        assert_eq!(c.now_ms(), 1_000);
        assert_eq!(c.mono_ms(), 0);
        c.advance_ms(250);
        assert_eq!(c.now_ms(), 1_250);
        assert_eq!(c.mono_ms(), 250);
    }

    #[test]
    fn system_clock_is_after_2020() {
        assert!(Clock::system().now_ms() > 1_577_836_800_000);
    }
}
