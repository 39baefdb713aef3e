//! The simulator's network model: where peers are, what their access lines carry, how
//! messages are lost. Every number here is a default a flag can change (`p2plive-sim --help`);
//! `docs/SIMULATOR.md` gives their sources.

use serde::Serialize;

/// A seeded pseudo-random generator (SplitMix64, Steele et al., OOPSLA 2014): the
/// simulator's only source of randomness, so one seed gives one run.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed ^ 0x853c_49e6_748f_ea9b)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `[0, 1)`.
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Uniform in `[lo, hi)`.
    pub fn uniform(&mut self, lo: f64, hi: f64) -> f64 {
        lo + (hi - lo) * self.unit()
    }

    /// Log-uniform in `[lo, hi]` (both > 0): as many peers per doubling of the rate.
    pub fn log_uniform(&mut self, lo: f64, hi: f64) -> f64 {
        if hi <= lo {
            return lo;
        }
        (lo.ln() + (hi.ln() - lo.ln()) * self.unit()).exp()
    }

    /// Exponential with mean `mean` (Poisson inter-arrival times).
    pub fn exponential(&mut self, mean: f64) -> f64 {
        -mean * (1.0 - self.unit()).ln()
    }

    /// Uniform index below `n` (> 0).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }
}

/// Regions peers are placed in, and the share of peers in each.
pub const REGIONS: [(&str, f64); 4] = [
    ("north-america", 0.30),
    ("europe", 0.30),
    ("asia", 0.30),
    ("south-america", 0.10),
];

/// One-way delay between the cores of two regions (ms): about half the round trip between
/// their main cities in public ping tables (e.g. WonderNetwork's global ping statistics:
/// New York–London ≈ 75 ms, New York–Tokyo ≈ 170, London–Singapore ≈ 170, New York–São
/// Paulo ≈ 120, London–São Paulo ≈ 190, Tokyo–São Paulo ≈ 260 ms). Within a region, 5 to
/// 25 ms by distance (see [`NetworkModel::propagation_ms`]).
pub const CORE_ONE_WAY_MS: [[f64; 4]; 4] = [
    [0.0, 38.0, 85.0, 60.0],
    [38.0, 0.0, 85.0, 95.0],
    [85.0, 85.0, 0.0, 130.0],
    [60.0, 95.0, 130.0, 0.0],
];

/// A class of access lines: its share of the viewers, upload and download ranges
/// (Mbit/s, log-uniform) and one-way access delay range (ms, uniform).
#[derive(Debug, Clone, Serialize)]
pub struct LineClass {
    pub name: String,
    pub share: f64,
    /// Upload the viewer offers (its `upload-capacity`), Mbit/s; 0 is receive only.
    pub upload_mbps: (f64, f64),
    pub download_mbps: (f64, f64),
    pub access_ms: (f64, f64),
}

/// The residential mix (see `docs/SIMULATOR.md` for where the numbers come from):
/// - 15 % receive-only (phones on cellular: `upload-capacity=0`), 10–50 Mbit/s down, 15–40
///   ms to the core;
/// - 80 % home lines, 2–20 Mbit/s up and 25–300 down, 2–15 ms;
/// - 5 % well-provisioned (fibre, offices, relays), 100 Mbit/s up, 500 down, 1–5 ms.
pub fn residential_mix() -> Vec<LineClass> {
    vec![
        LineClass {
            name: "cellular (receive only)".into(),
            share: 0.15,
            upload_mbps: (0.0, 0.0),
            download_mbps: (10.0, 50.0),
            access_ms: (15.0, 40.0),
        },
        LineClass {
            name: "home".into(),
            share: 0.80,
            upload_mbps: (2.0, 20.0),
            download_mbps: (25.0, 300.0),
            access_ms: (2.0, 15.0),
        },
        LineClass {
            name: "well-provisioned".into(),
            share: 0.05,
            upload_mbps: (100.0, 100.0),
            download_mbps: (500.0, 500.0),
            access_ms: (1.0, 5.0),
        },
    ]
}

/// Parses `share:up:down[:access]` classes separated by commas; each of `up`, `down` and
/// `access` is `x` or `lo-hi` (Mbit/s, Mbit/s, ms). Example: `0.2:0:20,0.8:2-20:50-300:2-15`.
pub fn parse_mix(spec: &str) -> Result<Vec<LineClass>, String> {
    fn range(s: &str) -> Result<(f64, f64), String> {
        let parse = |v: &str| {
            v.trim()
                .parse::<f64>()
                .map_err(|e| format!("{v:?}: {e}"))
                .and_then(|x| {
                    if x.is_finite() && x >= 0.0 {
                        Ok(x)
                    } else {
                        Err(format!("{v:?}: not a rate"))
                    }
                })
        };
        match s.split_once('-') {
            Some((lo, hi)) => {
                let (lo, hi) = (parse(lo)?, parse(hi)?);
                if hi < lo {
                    return Err(format!("{s:?}: range upside down"));
                }
                Ok((lo, hi))
            }
            None => parse(s).map(|x| (x, x)),
        }
    }
    let mut classes = Vec::new();
    for (i, class) in spec.split(',').enumerate() {
        let parts: Vec<&str> = class.split(':').collect();
        if !(3..=4).contains(&parts.len()) {
            return Err(format!("class {class:?}: expected share:up:down[:access]"));
        }
        let share = range(parts[0])?.0;
        let download = range(parts[2])?;
        if download.0 <= 0.0 {
            return Err(format!("class {class:?}: download must be above 0"));
        }
        classes.push(LineClass {
            name: format!("class {i}"),
            share,
            upload_mbps: range(parts[1])?,
            download_mbps: download,
            access_ms: match parts.get(3) {
                Some(a) => range(a)?,
                None => (2.0, 15.0),
            },
        });
    }
    let total: f64 = classes.iter().map(|c| c.share).sum();
    if total <= 0.0 {
        return Err("the shares add up to 0".into());
    }
    Ok(classes)
}

/// The network as configured.
#[derive(Debug, Clone, Serialize)]
pub struct NetworkModel {
    pub classes: Vec<LineClass>,
    /// The publisher's upload (Mbit/s).
    pub publisher_upload_mbps: f64,
    /// Mean message loss on every access line (0..1).
    pub loss: f64,
    /// Mean length of a loss burst (messages): 1 is independent loss, more is the
    /// Gilbert-Elliott two-state model (Gilbert 1960, Elliott 1963) with a lossless good
    /// state and a bad state that loses everything.
    pub loss_burst: f64,
    /// Multiplies every delay (0 with `loopback`).
    pub delay_scale: f64,
    /// Every delay is this at least (ms): 0.05 on loopback.
    pub min_delay_ms: f64,
    /// Cap per link of the delay added by the path (ms, uniform per pair): routes differ.
    pub path_jitter_ms: f64,
    /// Queued bytes a downlink holds before it drops (as the router buffer of the line),
    /// in milliseconds of its rate.
    pub downlink_buffer_ms: f64,
}

impl NetworkModel {
    /// The default: the residential mix, a 20 Mbit/s publisher, 1 % loss in bursts of 2.
    pub fn residential() -> NetworkModel {
        NetworkModel {
            classes: residential_mix(),
            publisher_upload_mbps: 20.0,
            loss: 0.01,
            loss_burst: 2.0,
            delay_scale: 1.0,
            min_delay_ms: 0.05,
            path_jitter_ms: 5.0,
            downlink_buffer_ms: 500.0,
        }
    }

    /// As the mesh benchmark's 127.0.0.1: no loss, 0.05 ms, 10 Gbit/s every way, every
    /// viewer able to forward.
    pub fn loopback() -> NetworkModel {
        NetworkModel {
            classes: vec![LineClass {
                name: "loopback".into(),
                share: 1.0,
                upload_mbps: (10_000.0, 10_000.0),
                download_mbps: (10_000.0, 10_000.0),
                access_ms: (0.0, 0.0),
            }],
            publisher_upload_mbps: 10_000.0,
            loss: 0.0,
            loss_burst: 1.0,
            delay_scale: 0.0,
            min_delay_ms: 0.05,
            path_jitter_ms: 0.0,
            downlink_buffer_ms: 500.0,
        }
    }

    /// Draws a viewer's line.
    pub fn draw_line(&self, rng: &mut Rng) -> Line {
        let total: f64 = self.classes.iter().map(|c| c.share).sum();
        let mut pick = rng.unit() * total;
        let mut class = self.classes.len() - 1;
        for (i, c) in self.classes.iter().enumerate() {
            if pick < c.share {
                class = i;
                break;
            }
            pick -= c.share;
        }
        let c = &self.classes[class];
        let upload = if c.upload_mbps.1 <= 0.0 {
            0.0
        } else {
            rng.log_uniform(c.upload_mbps.0.max(0.01), c.upload_mbps.1)
        };
        let download = rng.log_uniform(c.download_mbps.0, c.download_mbps.1);
        self.line(rng, class as u8, upload, download, c.access_ms)
    }

    /// The publisher's line (a home or studio line in the first region).
    pub fn publisher_line(&self, rng: &mut Rng) -> Line {
        let mut line = self.line(
            rng,
            u8::MAX,
            self.publisher_upload_mbps,
            self.publisher_upload_mbps.max(100.0),
            (2.0, 5.0),
        );
        line.region = 0;
        line
    }

    fn line(
        &self,
        rng: &mut Rng,
        class: u8,
        upload_mbps: f64,
        download_mbps: f64,
        access: (f64, f64),
    ) -> Line {
        let total: f64 = REGIONS.iter().map(|r| r.1).sum();
        let mut pick = rng.unit() * total;
        let mut region = REGIONS.len() - 1;
        for (i, r) in REGIONS.iter().enumerate() {
            if pick < r.1 {
                region = i;
                break;
            }
            pick -= r.1;
        }
        Line {
            class,
            region: region as u8,
            position: rng.unit(),
            access_ms: rng.uniform(access.0, access.1.max(access.0)),
            // A receive-only peer still sends control (joins, haves, reports): its line
            // carries 2 Mbit/s, of which the data plane offers 0.
            up_bps: if upload_mbps > 0.0 {
                upload_mbps * 1e6
            } else {
                2e6
            },
            down_bps: download_mbps * 1e6,
            capacity_kbps: (upload_mbps * 1000.0).round() as u64,
        }
    }

    /// One-way propagation delay from `a` to `b` (ms): both access delays, the regions'
    /// core delay (within a region 5–25 ms by distance), and a per-pair path term.
    pub fn propagation_ms(&self, a: &Line, b: &Line, pair_hash: u64) -> f64 {
        let core = if a.region == b.region {
            5.0 + 20.0 * (a.position - b.position).abs()
        } else {
            CORE_ONE_WAY_MS[usize::from(a.region)][usize::from(b.region)]
                + 5.0 * (a.position + b.position)
        };
        let path = self.path_jitter_ms * ((pair_hash >> 11) as f64 / (1u64 << 53) as f64);
        ((a.access_ms + b.access_ms + core + path) * self.delay_scale).max(self.min_delay_ms)
    }

    /// Gilbert-Elliott transition probabilities `(good → bad, bad → good)` per message for
    /// the configured mean loss and burst length; `None` without loss.
    pub fn loss_chain(&self) -> Option<(f64, f64)> {
        if self.loss <= 0.0 {
            return None;
        }
        let burst = self.loss_burst.max(1.0);
        let loss = self.loss.min(0.99);
        // Stationary P(bad) = p / (p + r) = loss, with r = 1 / burst.
        let r = 1.0 / burst;
        let p = loss * r / (1.0 - loss);
        Some((p.min(1.0), r))
    }
}

/// One peer's access line.
#[derive(Debug, Clone)]
pub struct Line {
    /// Index into the classes (`u8::MAX`: the publisher).
    pub class: u8,
    pub region: u8,
    /// Place within the region, 0..1.
    pub position: f64,
    pub access_ms: f64,
    pub up_bps: f64,
    pub down_bps: f64,
    /// The `upload-capacity` it offers (kbit/s, 0 receive only).
    pub capacity_kbps: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gilbert_elliott_loses_the_configured_share_in_bursts() {
        let model = NetworkModel::residential();
        let (p, r) = model.loss_chain().unwrap();
        let mut rng = Rng::new(3);
        let (mut bad, mut lost, mut bursts) = (false, 0u32, 0u32);
        let n = 1_000_000;
        for _ in 0..n {
            let was = bad;
            bad = if bad { rng.unit() >= r } else { rng.unit() < p };
            if bad {
                lost += 1;
                if !was {
                    bursts += 1;
                }
            }
        }
        let loss = f64::from(lost) / f64::from(n);
        let burst = f64::from(lost) / f64::from(bursts);
        assert!((loss - 0.01).abs() < 0.002, "loss {loss}");
        assert!((burst - 2.0).abs() < 0.2, "burst {burst}");
    }

    #[test]
    fn the_mix_parses_and_rejects_nonsense() {
        let mix = parse_mix("0.2:0:20,0.8:2-20:50-300:2-15").unwrap();
        assert_eq!(mix.len(), 2);
        assert_eq!(mix[1].upload_mbps, (2.0, 20.0));
        assert!(parse_mix("0.2:0").is_err());
        assert!(parse_mix("0.5:20-2:50").is_err());
        assert!(parse_mix("0.5:2:0").is_err());
        assert!(parse_mix("x:2:50").is_err());
    }

    #[test]
    fn lines_follow_the_mix() {
        let model = NetworkModel::residential();
        let mut rng = Rng::new(9);
        let lines: Vec<Line> = (0..10_000).map(|_| model.draw_line(&mut rng)).collect();
        let receive_only = lines.iter().filter(|l| l.capacity_kbps == 0).count();
        assert!((1300..1700).contains(&receive_only), "{receive_only}");
        let home = lines.iter().filter(|l| l.class == 1);
        assert!(home.clone().all(|l| (2e6..=20e6 + 1.0).contains(&l.up_bps)));
        let a = &lines[0];
        let b = &lines[1];
        let d = model.propagation_ms(a, b, 0);
        assert!(d >= a.access_ms + b.access_ms + 5.0 - 1e-9, "{d}");
    }
}
