//! Parsing shared by the benchmarks' command lines (benches/mesh, benches/sim).

use std::time::Duration;

/// `30s`, `500ms`, `2m` or a number of seconds, between 0 and 1 h.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (digits, unit) = if let Some(d) = s.strip_suffix("ms") {
        (d, 0.001)
    } else if let Some(d) = s.strip_suffix('s') {
        (d, 1.0)
    } else if let Some(d) = s.strip_suffix('m') {
        (d, 60.0)
    } else {
        (s, 1.0)
    };
    let value: f64 = digits
        .parse()
        .map_err(|_| format!("bad duration {s:?}: expected e.g. 30s, 500ms, 2m"))?;
    let secs = value * unit;
    if !(0.0..=3600.0).contains(&secs) {
        return Err(format!("duration {s} outside 0..1h"));
    }
    Ok(Duration::from_secs_f64(secs))
}
