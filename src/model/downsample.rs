//! Server-side downsampling of a series for playback: Largest-Triangle-Three-Buckets (keeps
//! the visual shape: peaks and turns survive) and min/max per bucket (keeps every extreme).
//! Both keep the first and last point and return indexes into the input, in order.

/// Indexes of at most `n` points chosen by LTTB over `(x, y)` (x ascending).
pub fn lttb(xy: &[(f64, f64)], n: usize) -> Vec<usize> {
    let len = xy.len();
    if n >= len || len <= 2 {
        return (0..len).collect();
    }
    if n <= 2 {
        return if n == 0 {
            vec![]
        } else if n == 1 {
            vec![0]
        } else {
            vec![0, len - 1]
        };
    }
    let mut out = Vec::with_capacity(n);
    out.push(0);
    // Buckets over the interior points [1, len - 1).
    let every = (len - 2) as f64 / (n - 2) as f64;
    let mut a = 0usize;
    for i in 0..n - 2 {
        let start = (i as f64 * every) as usize + 1;
        let end = (((i + 1) as f64 * every) as usize + 1).min(len - 1);
        // The average of the next bucket (or the last point).
        let (ns, ne) = (end, (((i + 2) as f64 * every) as usize + 1).min(len - 1));
        let (avg_x, avg_y) = if ns < ne {
            let m = (ne - ns) as f64;
            let (sx, sy) = xy[ns..ne].iter().fold((0.0, 0.0), |(sx, sy), (x, y)| (sx + x, sy + y));
            (sx / m, sy / m)
        } else {
            xy[len - 1]
        };
        let (ax, ay) = xy[a];
        let mut best = (start, -1.0f64);
        for (j, &(x, y)) in xy.iter().enumerate().take(end.max(start + 1)).skip(start) {
            let area = ((ax - avg_x) * (y - ay) - (ax - x) * (avg_y - ay)).abs();
            if area > best.1 {
                best = (j, area);
            }
        }
        out.push(best.0);
        a = best.0;
    }
    out.push(len - 1);
    out.dedup();
    out
}

/// Indexes of the minimum and maximum `y` of each of `n / 2` buckets (plus the ends).
pub fn min_max(xy: &[(f64, f64)], n: usize) -> Vec<usize> {
    let len = xy.len();
    if n >= len || len <= 2 {
        return (0..len).collect();
    }
    let buckets = (n / 2).max(1);
    let every = len as f64 / buckets as f64;
    let mut out = vec![0];
    for b in 0..buckets {
        let (s, e) = ((b as f64 * every) as usize, (((b + 1) as f64 * every) as usize).min(len));
        if s >= e {
            continue;
        }
        let mut lo = s;
        let mut hi = s;
        for j in s..e {
            if xy[j].1 < xy[lo].1 {
                lo = j;
            }
            if xy[j].1 > xy[hi].1 {
                hi = j;
            }
        }
        out.push(lo.min(hi));
        out.push(lo.max(hi));
    }
    out.push(len - 1);
    out.sort_unstable();
    out.dedup();
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn series(n: usize) -> Vec<(f64, f64)> {
        (0..n).map(|i| (i as f64, ((i as f64) / 10.0).sin())).collect()
    }

    #[test]
    fn lttb_keeps_ends_order_and_the_budget() {
        let s = series(1000);
        let idx = lttb(&s, 50);
        assert_eq!(idx.len(), 50);
        assert_eq!((idx[0], *idx.last().unwrap()), (0, 999));
        assert!(idx.windows(2).all(|w| w[0] < w[1]));
        assert_eq!(lttb(&s[..10], 50), (0..10).collect::<Vec<_>>());
    }

    #[test]
    fn lttb_keeps_a_single_spike() {
        let mut s: Vec<(f64, f64)> = (0..1000).map(|i| (i as f64, 0.0)).collect();
        s[517].1 = 100.0;
        assert!(lttb(&s, 20).contains(&517));
    }

    #[test]
    fn min_max_keeps_every_bucket_extreme() {
        let mut s = series(1000);
        s[333].1 = -50.0;
        s[777].1 = 50.0;
        let idx = min_max(&s, 40);
        assert!(idx.contains(&333) && idx.contains(&777));
        assert!(idx.len() <= 42);
        assert!(idx.windows(2).all(|w| w[0] < w[1]));
    }
}
