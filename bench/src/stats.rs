//! What a run measured: the consumer's tracker (latency histogram, loss and
//! duplicate accounting by sequence number), the publishers' counters, and
//! the report printed per run, as text or JSON.

use std::fmt::Write as _;

use hdrhistogram::Histogram;

use super::payload;

/// Latencies above this many nanoseconds are recorded as this value.
const MAX_LATENCY_NS: u64 = 3_600_000_000_000;

/// Accounts every message the consumer receives.
#[derive(Debug)]
pub struct Tracker {
    run_tag: u32,
    expected: u64,
    seen: Vec<u64>,
    hist: Histogram<u64>,
    pub received: u64,
    pub duplicates: u64,
    /// Payloads that are not this run's: too short, another run's tag, or a
    /// sequence number out of range.
    pub stray: u64,
    pub first_ns: Option<u64>,
    pub last_ns: Option<u64>,
}

impl Tracker {
    pub fn new(run_tag: u32, expected: u64) -> Self {
        let words = usize::try_from(expected.div_ceil(64)).unwrap_or(usize::MAX);
        Tracker {
            run_tag,
            expected,
            seen: vec![0; words],
            hist: Histogram::new_with_bounds(1, MAX_LATENCY_NS, 3)
                .expect("constant histogram bounds are valid"),
            received: 0,
            duplicates: 0,
            stray: 0,
            first_ns: None,
            last_ns: None,
        }
    }

    /// Records one received payload at `now_ns`.
    pub fn record(&mut self, data: &[u8], now_ns: u64) {
        let Some(h) = payload::parse(data) else {
            self.stray += 1;
            return;
        };
        if h.run_tag != self.run_tag || h.seq >= self.expected {
            self.stray += 1;
            return;
        }
        let word = (h.seq / 64) as usize;
        let bit = 1u64 << (h.seq % 64);
        if self.seen[word] & bit != 0 {
            self.duplicates += 1;
            return;
        }
        self.seen[word] |= bit;
        self.received += 1;
        self.hist.saturating_record(now_ns.saturating_sub(h.sent_ns).max(1));
        self.first_ns.get_or_insert(now_ns);
        self.last_ns = Some(now_ns);
    }

    /// Whether every expected message arrived.
    pub fn complete(&self) -> bool {
        self.received >= self.expected
    }

    pub fn finish(self) -> RecvStats {
        let q = |quantile: f64| self.hist.value_at_quantile(quantile) as f64 / 1e6;
        RecvStats {
            received: self.received,
            duplicates: self.duplicates,
            stray: self.stray,
            last_ns: self.last_ns,
            p50_ms: q(0.5),
            p99_ms: q(0.99),
            max_ms: self.hist.max() as f64 / 1e6,
        }
    }
}

/// The consumer's side of a run.
#[derive(Clone, Debug, Default)]
pub struct RecvStats {
    pub received: u64,
    pub duplicates: u64,
    pub stray: u64,
    pub last_ns: Option<u64>,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
}

/// One publisher's side of a run.
#[derive(Clone, Debug, Default)]
pub struct PubStats {
    pub sent: u64,
    /// QoS 1: PUBACKs or AMQP confirms received (acks only).
    pub acked: u64,
    /// AMQP nacks, unexpected PUBACKs, failed sends.
    pub errors: u64,
    pub done_ns: u64,
}

impl PubStats {
    pub fn merge(&mut self, o: &PubStats) {
        self.sent += o.sent;
        self.acked += o.acked;
        self.errors += o.errors;
        self.done_ns = self.done_ns.max(o.done_ns);
    }
}

/// Everything reported for one run.
#[derive(Clone, Debug)]
pub struct RunReport {
    pub mode: &'static str,
    pub qos: u8,
    pub messages: u64,
    pub publishers: usize,
    pub payload: usize,
    pub target_rate: u64,
    /// Delivered messages per second, first send to last message consumed.
    pub rate: f64,
    /// Sent messages per second, first send to the last publisher done
    /// (QoS 1: last ack).
    pub publish_rate: f64,
    pub recv: RecvStats,
    pub publish: PubStats,
    pub lost: u64,
    pub seconds: f64,
    /// Remarks on how the run was made.
    pub notes: Vec<String>,
    /// A failure that cut the run short.
    pub error: Option<String>,
}

impl RunReport {
    pub fn text_header() -> String {
        format!(
            "{:<9} {:>3} {:>9} {:>10} {:>8} {:>8} {:>8} {:>7} {:>5}  {}",
            "mode",
            "qos",
            "messages",
            "msgs/s",
            "p50 ms",
            "p99 ms",
            "max ms",
            "lost",
            "dup",
            "notes"
        )
    }

    pub fn text_line(&self) -> String {
        if let (Some(e), 0) = (&self.error, self.recv.received) {
            return format!(
                "{:<9} {:>3} {:>9} {:>10} {:>8} {:>8} {:>8} {:>7} {:>5}  ERROR: {e}",
                self.mode, self.qos, self.messages, "-", "-", "-", "-", "-", "-"
            );
        }
        let mut notes = Vec::new();
        if self.qos == 1 {
            notes.push(format!("acked {}/{}", self.publish.acked, self.publish.sent));
        }
        if self.publish.errors > 0 {
            notes.push(format!("{} publish errors", self.publish.errors));
        }
        if self.recv.stray > 0 {
            notes.push(format!("{} stray", self.recv.stray));
        }
        notes.push(format!("sent {:.0}/s", self.publish_rate));
        notes.extend(self.notes.iter().cloned());
        if let Some(e) = &self.error {
            notes.push(format!("ERROR: {e}"));
        }
        format!(
            "{:<9} {:>3} {:>9} {:>10.0} {:>8.3} {:>8.3} {:>8.3} {:>7} {:>5}  {}",
            self.mode,
            self.qos,
            self.messages,
            self.rate,
            self.recv.p50_ms,
            self.recv.p99_ms,
            self.recv.max_ms,
            self.lost,
            self.recv.duplicates,
            notes.join(", ")
        )
    }

    pub fn json(&self) -> String {
        let mut s = String::from("{");
        let _ = write!(
            s,
            "\"mode\":{},\"qos\":{},\"messages\":{},\"publishers\":{},\"payload\":{},\
             \"target_rate\":{},\"rate\":{:.1},\"publish_rate\":{:.1},\"seconds\":{:.3},\
             \"p50_ms\":{:.3},\"p99_ms\":{:.3},\"max_ms\":{:.3},\"received\":{},\"lost\":{},\
             \"duplicates\":{},\"stray\":{},\"sent\":{},\"acked\":{},\"publish_errors\":{},\"notes\":[{}],\"error\":{}",
            json_str(self.mode),
            self.qos,
            self.messages,
            self.publishers,
            self.payload,
            self.target_rate,
            self.rate,
            self.publish_rate,
            self.seconds,
            self.recv.p50_ms,
            self.recv.p99_ms,
            self.recv.max_ms,
            self.recv.received,
            self.lost,
            self.recv.duplicates,
            self.recv.stray,
            self.publish.sent,
            self.publish.acked,
            self.publish.errors,
            self.notes.iter().map(|n| json_str(n)).collect::<Vec<_>>().join(","),
            self.error.as_deref().map_or_else(|| "null".to_owned(), json_str),
        );
        s.push('}');
        s
    }
}

/// A gateway-vs-direct comparison for one QoS.
#[derive(Clone, Debug)]
pub struct Comparison {
    pub qos: u8,
    /// The mode compared against: `direct`, or `mosquitto` in the fan-in runs.
    pub base: &'static str,
    pub other: &'static str,
    /// Runs of each of the two modes behind the medians.
    pub runs: usize,
    /// Median rate of `other` over median rate of `base`.
    pub ratio: f64,
    pub p50_delta_ms: f64,
    pub p99_delta_ms: f64,
    pub fixed_rate: bool,
}

/// Targets from the issue: throughput ≥ 0.9× direct; at a fixed rate, under
/// 1 ms added to p99.
const RATIO_TARGET: f64 = 0.9;
/// Target of the MQTT→MQTT fan-in: at least Mosquitto's throughput.
const FANIN_RATIO_TARGET: f64 = 1.0;
const P99_DELTA_TARGET_MS: f64 = 1.0;

/// The median of some values (the mean of the middle two for an even count).
/// `--mode spool`'s target: QoS 1 messages acknowledged into the spool per second.
pub const SPOOL_ACK_TARGET: f64 = 50_000.0;

/// `--mode spool`: the median rate at which QoS 1 publishers were acknowledged (`sent`), with
/// `ack: spool` and with `ack: sink`, against [`SPOOL_ACK_TARGET`]; `None` without spool runs.
pub fn spool_ack_rates(reports: &[RunReport]) -> Option<String> {
    let rate = |mode: &str| {
        let v: Vec<f64> = reports
            .iter()
            .filter(|r| r.qos == 1 && r.mode == mode && r.error.is_none())
            .map(|r| r.publish_rate)
            .collect();
        (!v.is_empty()).then(|| (median(v.clone()), v.len()))
    };
    let (spool, n) = rate("spool")?;
    let sink = rate("gateway").map_or("-".to_owned(), |(r, _)| format!("{r:.0}"));
    let ok = if spool >= SPOOL_ACK_TARGET { "ok" } else { "MISSED" };
    Some(format!(
        "acknowledged (QoS 1, median of {n}): ack: spool {spool:.0} msgs/s, ack: sink {sink} msgs/s  [target spool >= {SPOOL_ACK_TARGET:.0}: {ok}]"
    ))
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => 0.0,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

impl Comparison {
    /// Mosquitto and gateway against direct, per QoS, over the runs that
    /// completed without error; without direct runs (fan-in), mqgate against
    /// Mosquitto.
    pub fn from_reports(reports: &[RunReport], fixed_rate: bool) -> Vec<Comparison> {
        let mut out = Vec::new();
        for qos in [0u8, 1] {
            let runs = |mode: &str| -> Vec<&RunReport> {
                reports
                    .iter()
                    .filter(|r| r.qos == qos && r.mode == mode && r.error.is_none() && r.rate > 0.0)
                    .collect()
            };
            let stat = |rs: &[&RunReport], f: fn(&RunReport) -> f64| {
                median(rs.iter().map(|r| f(r)).collect())
            };
            let (base, others): (&'static str, &[&'static str]) =
                if reports.iter().any(|r| r.mode == "templates") {
                    ("gateway", &["templates"])
                } else if reports.iter().any(|r| r.mode == "direct") {
                    ("direct", &["mosquitto", "gateway"])
                } else {
                    ("mosquitto", &["mqgate"])
                };
            let direct = runs(base);
            if direct.is_empty() {
                continue;
            }
            for &other in others {
                let o = runs(other);
                if o.is_empty() {
                    continue;
                }
                out.push(Comparison {
                    qos,
                    base,
                    other,
                    runs: o.len().min(direct.len()),
                    ratio: stat(&o, |r| r.rate) / stat(&direct, |r| r.rate),
                    p50_delta_ms: stat(&o, |r| r.recv.p50_ms) - stat(&direct, |r| r.recv.p50_ms),
                    p99_delta_ms: stat(&o, |r| r.recv.p99_ms) - stat(&direct, |r| r.recv.p99_ms),
                    fixed_rate,
                });
            }
        }
        out
    }

    /// Whether the gateway met its target; `None` for other modes.
    pub fn target_met(&self) -> Option<bool> {
        match self.other {
            "gateway" if self.fixed_rate => Some(self.p99_delta_ms < P99_DELTA_TARGET_MS),
            "gateway" => Some(self.ratio >= RATIO_TARGET),
            "templates" if !self.fixed_rate => Some(self.ratio >= RATIO_TARGET),
            "mqgate" => Some(self.ratio >= FANIN_RATIO_TARGET),
            _ => None,
        }
    }

    pub fn text(&self) -> String {
        let mut line = if self.fixed_rate {
            format!(
                "{}/{} = {:.2}x, p50 {:+.3} ms, p99 {:+.3} ms (qos {})",
                self.other, self.base, self.ratio, self.p50_delta_ms, self.p99_delta_ms, self.qos
            )
        } else {
            format!("{}/{} = {:.2}x (qos {})", self.other, self.base, self.ratio, self.qos)
        };
        if self.runs > 1 {
            let _ = write!(line, " [median of {}]", self.runs);
        }
        if let Some(ok) = self.target_met() {
            let target = if self.other == "mqgate" {
                format!(">= {FANIN_RATIO_TARGET:.2}x")
            } else if self.fixed_rate {
                format!("p99 < +{P99_DELTA_TARGET_MS} ms")
            } else {
                format!(">= {RATIO_TARGET:.2}x")
            };
            let _ = write!(line, "  [target {target}: {}]", if ok { "ok" } else { "MISSED" });
        }
        line
    }

    pub fn json(&self) -> String {
        format!(
            "{{\"qos\":{},\"base\":{},\"mode\":{},\"runs\":{},\"ratio\":{:.3},\"p50_delta_ms\":{:.3},\"p99_delta_ms\":{:.3},\"fixed_rate\":{},\"target_met\":{}}}",
            self.qos,
            json_str(self.base),
            json_str(self.other),
            self.runs,
            self.ratio,
            self.p50_delta_ms,
            self.p99_delta_ms,
            self.fixed_rate,
            self.target_met().map_or_else(|| "null".to_owned(), |ok| ok.to_string())
        )
    }
}

/// A JSON string literal.
pub fn json_str(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if u32::from(c) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", u32::from(c));
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

#[cfg(test)]
mod tests {
    use super::super::payload::PayloadBuilder;
    use super::*;

    #[test]
    fn tracker_counts_loss_duplicates_and_strays() {
        let b = PayloadBuilder::new(16, 3);
        let mut t = Tracker::new(3, 4);
        t.record(&b.build(0, 100), 1_100);
        t.record(&b.build(0, 100), 1_200);
        t.record(&b.build(2, 100), 2_100);
        t.record(&b.build(9, 100), 2_100);
        t.record(&PayloadBuilder::new(16, 4).build(1, 100), 2_100);
        t.record(b"short", 2_100);
        assert!(!t.complete());
        let s = t.finish();
        assert_eq!((s.received, s.duplicates, s.stray), (2, 1, 3));
        assert_eq!(s.last_ns, Some(2_100));
    }

    #[test]
    fn median_of_odd_and_even_counts() {
        assert_eq!(median(vec![3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(vec![4.0, 1.0, 2.0, 3.0]), 2.5);
        assert_eq!(median(Vec::new()), 0.0);
    }

    #[test]
    fn json_escapes() {
        assert_eq!(json_str("a\"b\\\n\u{1}"), "\"a\\\"b\\\\\\n\\u0001\"");
    }
}
