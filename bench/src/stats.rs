//! Medians, spreads and percentiles of samples.

/// The median (upper middle for an even count); NaN for no samples.
pub fn median(samples: &[f64]) -> f64 {
    percentile(samples, 0.5)
}

/// The `p` quantile (0..=1, nearest rank); NaN for no samples.
pub fn percentile(samples: &[f64], p: f64) -> f64 {
    let mut v: Vec<f64> = samples.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    let i = ((v.len() as f64 - 1.0) * p).round() as usize;
    v[i.min(v.len() - 1)]
}

/// (max − min) / median: how much the rounds disagree.
pub fn spread(samples: &[f64]) -> f64 {
    let m = median(samples);
    let (lo, hi) = samples
        .iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), &x| {
            (lo.min(x), hi.max(x))
        });
    if m.is_finite() && m != 0.0 {
        (hi - lo) / m
    } else {
        f64::NAN
    }
}

/// A finite number as JSON, else `null`.
pub fn num(x: f64) -> serde_json::Value {
    if x.is_finite() {
        serde_json::json!(x)
    } else {
        serde_json::Value::Null
    }
}

/// `x` rounded to `digits` decimals (for readable JSON), NaN kept.
pub fn round(x: f64, digits: i32) -> f64 {
    let f = 10f64.powi(digits);
    (x * f).round() / f
}
