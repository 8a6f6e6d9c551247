//! A token bucket: `rate` tokens per second, at most `burst` saved. Pure: time comes in.

/// One bucket; starts full.
#[derive(Clone, Debug)]
pub struct Bucket {
    tokens: f64,
    last_ms: u64,
}

impl Bucket {
    pub fn new(burst: u32, now_ms: u64) -> Self {
        Bucket { tokens: f64::from(burst), last_ms: now_ms }
    }

    fn refill(&mut self, rate: f64, burst: f64, now_ms: u64) {
        let elapsed = now_ms.saturating_sub(self.last_ms) as f64 / 1000.0;
        self.tokens = (self.tokens + elapsed * rate).min(burst);
        self.last_ms = self.last_ms.max(now_ms);
    }

    /// Takes one token if there is one (`rate` 0: unlimited).
    pub fn take(&mut self, rate: f64, burst: f64, now_ms: u64) -> bool {
        if rate <= 0.0 {
            return true;
        }
        self.refill(rate, burst, now_ms);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// Reserves a token, on credit: returns how long to wait (ms) before using it (0: now).
    /// A caller that will not wait gives it back with [`Bucket::refund`].
    pub fn reserve(&mut self, rate: f64, burst: f64, now_ms: u64) -> u64 {
        if rate <= 0.0 {
            return 0;
        }
        self.refill(rate, burst, now_ms);
        self.tokens -= 1.0;
        if self.tokens >= 0.0 { 0 } else { (-self.tokens / rate * 1000.0).ceil() as u64 }
    }

    pub fn refund(&mut self) {
        self.tokens += 1.0;
    }

    /// Milliseconds until a token is available.
    pub fn wait_ms(&mut self, rate: f64, burst: f64, now_ms: u64) -> u64 {
        if rate <= 0.0 {
            return 0;
        }
        self.refill(rate, burst, now_ms);
        if self.tokens >= 1.0 { 0 } else { ((1.0 - self.tokens) / rate * 1000.0).ceil() as u64 }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bucket_allows_its_burst_then_its_rate() {
        let mut b = Bucket::new(5, 0);
        assert_eq!((0..10).filter(|_| b.take(10.0, 5.0, 0)).count(), 5);
        assert_eq!(b.wait_ms(10.0, 5.0, 0), 100);
        assert!(!b.take(10.0, 5.0, 50));
        assert!(b.take(10.0, 5.0, 100));
        // Long idle: back to the burst, not more.
        assert_eq!((0..10).filter(|_| b.take(10.0, 5.0, 60_000)).count(), 5);
        assert!(Bucket::new(0, 0).take(0.0, 0.0, 0), "rate 0 is unlimited");
    }

    #[test]
    fn reservations_queue_up_behind_each_other() {
        let mut b = Bucket::new(2, 0);
        let waits: Vec<u64> = (0..5).map(|_| b.reserve(10.0, 2.0, 0)).collect();
        assert_eq!(waits, vec![0, 0, 100, 200, 300]);
        b.refund();
        assert_eq!(b.reserve(10.0, 2.0, 0), 300);
    }
}
