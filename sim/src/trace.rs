//! The run's trace: a hash of every event (for the determinism check: the
//! same seed must give the same hash on any machine) and, when asked for,
//! readable lines.

use kivaloo::contract::Instant;

/// FNV-1a, 64-bit: stable across platforms and versions, unlike std's
/// hasher.
#[derive(Debug, Clone)]
pub struct TraceHash(u64);

impl Default for TraceHash {
    fn default() -> Self {
        TraceHash(0xcbf2_9ce4_8422_2325)
    }
}

impl TraceHash {
    /// Mixes bytes in.
    pub fn bytes(&mut self, data: &[u8]) {
        for b in data {
            self.0 ^= *b as u64;
            self.0 = self.0.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }

    /// Mixes a number in.
    pub fn u64(&mut self, x: u64) {
        self.bytes(&x.to_le_bytes());
    }

    /// The hash so far.
    pub fn value(&self) -> u64 {
        self.0
    }
}

/// Hash always; lines only when tracing.
#[derive(Debug, Default)]
pub struct Trace {
    hash: TraceHash,
    lines: Option<Vec<String>>,
}

impl Trace {
    /// A trace that keeps readable lines if `keep_lines`.
    pub fn new(keep_lines: bool) -> Trace {
        Trace { hash: TraceHash::default(), lines: keep_lines.then(Vec::new) }
    }

    /// Records an event: `tag` and `numbers` go into the hash; `line` (only
    /// built when lines are kept) is for people.
    pub fn event(&mut self, now: Instant, tag: &str, numbers: &[u64], line: impl FnOnce() -> String) {
        self.hash.u64(now.nanos);
        self.hash.bytes(tag.as_bytes());
        for n in numbers {
            self.hash.u64(*n);
        }
        if let Some(lines) = &mut self.lines {
            let ms = now.nanos as f64 / 1e6;
            lines.push(format!("{ms:12.6} ms  {tag:<14} {}", line()));
        }
    }

    /// Whether readable lines are kept.
    pub fn keeps_lines(&self) -> bool {
        self.lines.is_some()
    }

    /// The hash of everything recorded.
    pub fn hash(&self) -> u64 {
        self.hash.value()
    }

    /// The readable lines, if kept.
    pub fn lines(&self) -> &[String] {
        self.lines.as_deref().unwrap_or(&[])
    }
}
