//! Where a training step's time goes: `qlora train --profile` and `cargo bench --bench train`
//! time the parts of a step with [`part`] guards placed in the fused ops, the loss head and the
//! optimizer. Time is exclusive: a part entered inside another (the base product inside the
//! fused LoRA op) is taken out of the outer one, so the parts add up to at most the step time,
//! and the rest of the step is candle's graph work (gradient bookkeeping, casts, adds, copies,
//! embedding and rotary ops). Guards cost one relaxed atomic load when profiling is off.

use std::cell::Cell;
use std::cell::RefCell;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

/// A part of the training step.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Part {
    /// `x · W0ᵀ` and `dy · W0` with the frozen (NF4 or dense) weight.
    BaseProduct,
    /// The low-rank terms of the fused LoRA op: `(x · Aᵀ) · Bᵀ`, its gradients, dropout.
    AdapterProduct,
    /// Fused attention, forward and backward.
    Attention,
    /// RMSNorm and SwiGLU, forward and backward.
    NormActivation,
    /// Final hidden state to loss: head product, cross-entropy, and their backward.
    LossHead,
    /// Gradient clipping and the optimizer update.
    Optimizer,
}

impl Part {
    /// Every part, in the order printed (and of their discriminants, which index the totals).
    pub const ALL: [Part; 6] = [
        Part::BaseProduct,
        Part::AdapterProduct,
        Part::Attention,
        Part::NormActivation,
        Part::LossHead,
        Part::Optimizer,
    ];

    /// The name printed in the table.
    pub fn name(self) -> &'static str {
        match self {
            Part::BaseProduct => "base products",
            Part::AdapterProduct => "adapter products",
            Part::Attention => "attention",
            Part::NormActivation => "norms, activation",
            Part::LossHead => "loss head",
            Part::Optimizer => "optimizer",
        }
    }
}

static ENABLED: AtomicBool = AtomicBool::new(false);
thread_local! {
    /// Nanoseconds per part on this thread (the step's parts all run on the thread that calls
    /// the ops; their kernels' worker threads time nothing).
    static NANOS: Cell<[u64; 6]> = const { Cell::new([0; 6]) };
    /// The parts entered on this thread, innermost last, with the instant each (re)started.
    static STACK: RefCell<Vec<(Part, Instant)>> = const { RefCell::new(Vec::new()) };
}

/// Start or stop collecting.
pub fn enable(on: bool) {
    ENABLED.store(on, Ordering::Relaxed);
}

/// Whether parts are being timed.
pub fn enabled() -> bool {
    ENABLED.load(Ordering::Relaxed)
}

fn add(part: Part, since: Instant, now: Instant) {
    NANOS.with(|n| {
        let mut v = n.get();
        v[part as usize] += (now - since).as_nanos() as u64;
        n.set(v);
    });
}

/// Time `part` until the guard drops (nothing when profiling is off).
#[must_use = "the part is timed until the guard drops"]
pub fn part(part: Part) -> Guard {
    if !enabled() {
        return Guard(false);
    }
    let now = Instant::now();
    STACK.with(|s| {
        let mut s = s.borrow_mut();
        if let Some((outer, since)) = s.last_mut() {
            add(*outer, *since, now);
            *since = now;
        }
        s.push((part, now));
    });
    Guard(true)
}

/// Ends the timing of a [`part`].
pub struct Guard(bool);

impl Drop for Guard {
    fn drop(&mut self) {
        if !self.0 {
            return;
        }
        let now = Instant::now();
        STACK.with(|s| {
            let mut s = s.borrow_mut();
            if let Some((p, since)) = s.pop() {
                add(p, since, now);
            }
            if let Some((_, since)) = s.last_mut() {
                *since = now;
            }
        });
    }
}

/// Seconds per part collected so far on this thread, and reset to zero.
pub fn take() -> [(Part, f64); 6] {
    let v = NANOS.with(|n| n.replace([0; 6]));
    std::array::from_fn(|i| (Part::ALL[i], v[i] as f64 * 1e-9))
}

/// CPU seconds this process has used (user + system, all threads), from `/proc/self/stat`;
/// `None` where that file is not there.
pub fn process_cpu_seconds() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // The fields after the parenthesised command name; utime and stime are fields 14 and 15.
    let rest = stat.rsplit_once(')')?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i)?.parse::<f64>().ok();
    // USER_HZ is 100 on Linux.
    Some((ticks(11)? + ticks(12)?) / 100.0)
}

/// The parts' seconds, wall seconds and CPU seconds summed over the steps timed so far.
#[derive(Clone, Debug, Default)]
pub struct Totals {
    /// Seconds in each part, in [`Part::ALL`]'s order.
    pub parts: [f64; 6],
    steps: usize,
    wall_s: f64,
    /// `None` once a step's CPU time could not be read.
    cpu_s: Option<f64>,
}

impl Totals {
    /// Empty totals.
    pub fn new() -> Self {
        Self {
            cpu_s: Some(0.0),
            ..Default::default()
        }
    }

    /// Add one step of `wall_s` seconds that started at `cpu_start` process CPU seconds, and
    /// the parts timed since the last [`take`].
    pub fn add_step(&mut self, wall_s: f64, cpu_start: Option<f64>) {
        for (total, (_, s)) in self.parts.iter_mut().zip(take()) {
            *total += s;
        }
        self.steps += 1;
        self.wall_s += wall_s;
        self.cpu_s = match (self.cpu_s, cpu_start, process_cpu_seconds()) {
            (Some(c), Some(a), Some(b)) => Some(c + b - a),
            _ => None,
        };
    }

    /// The budget per step on `threads` threads, once a step was added.
    pub fn budget(&self, threads: usize) -> Option<Budget> {
        (self.steps > 0).then(|| {
            Budget::new(
                std::array::from_fn(|i| (Part::ALL[i], self.parts[i])),
                self.steps,
                self.wall_s,
                self.cpu_s.map(|c| (c, threads)),
            )
        })
    }
}

/// A step-time budget: per part, seconds per step and share of the step.
#[derive(Clone, Debug, PartialEq)]
pub struct Budget {
    /// Seconds per step in each part.
    pub parts: Vec<(&'static str, f64)>,
    /// Wall seconds per step.
    pub step_s: f64,
    /// CPU seconds per step over wall seconds × threads: how busy the threads were.
    pub busy: Option<f64>,
}

impl Budget {
    /// From totals over `steps` steps taken in `wall_s` seconds (and `cpu_s` CPU seconds on
    /// `threads` threads, when known).
    pub fn new(
        parts: [(Part, f64); 6],
        steps: usize,
        wall_s: f64,
        cpu: Option<(f64, usize)>,
    ) -> Self {
        let n = steps.max(1) as f64;
        Self {
            parts: parts.iter().map(|(p, s)| (p.name(), s / n)).collect(),
            step_s: wall_s / n,
            busy: cpu.map(|(c, t)| c / (wall_s * t.max(1) as f64)),
        }
    }
}

impl std::fmt::Display for Budget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "step time budget (per step):")?;
        let timed: f64 = self.parts.iter().map(|(_, s)| s).sum();
        let share = |s: f64| 100.0 * s / self.step_s.max(f64::MIN_POSITIVE);
        for (name, s) in &self.parts {
            writeln!(f, "  {name:<22} {s:>8.3} s {:>5.1}%", share(*s))?;
        }
        let rest = (self.step_s - timed).max(0.0);
        writeln!(
            f,
            "  {:<22} {rest:>8.3} s {:>5.1}%",
            "graph and other ops",
            share(rest)
        )?;
        write!(f, "  {:<22} {:>8.3} s", "step", self.step_s)?;
        if let Some(b) = self.busy {
            write!(f, "  (threads busy {:.0}% of the step)", 100.0 * b)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nested_parts_count_exclusive_time() {
        enable(true);
        let _ = take();
        {
            let _outer = part(Part::AdapterProduct);
            std::thread::sleep(std::time::Duration::from_millis(20));
            {
                let _inner = part(Part::BaseProduct);
                std::thread::sleep(std::time::Duration::from_millis(40));
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        enable(false);
        let t = take();
        let (base, adapter) = (t[0].1, t[1].1);
        assert!((0.04..0.08).contains(&base), "{base}");
        assert!((0.04..0.08).contains(&adapter), "{adapter}");
        // Off: nothing is counted.
        {
            let _g = part(Part::Attention);
        }
        assert_eq!(take()[2].1, 0.0);
        let b = Budget::new(t, 1, 0.1, Some((0.15, 2)));
        let s = b.to_string();
        assert!(s.contains("base products"), "{s}");
        assert!(s.contains("threads busy 75%"), "{s}");
    }
}
