//! Peak resident memory of one phase of this process.
//!
//! Linux keeps the high-water mark of the resident set as `VmHWM` in `/proc/self/status`, and
//! writing `5` to `/proc/self/clear_refs` resets it to the current resident size (Linux 4.0+).
//! So a phase's peak is: reset at its start, read at its end. Memory the allocator kept from
//! an earlier phase (freed but not returned to the system) still counts as resident. Where
//! either step is not possible (another OS, a locked-down `/proc`), the peak is unknown (`None`)
//! rather than an error: the measurement is a report, not a requirement of the run.

use std::path::Path;

const CLEAR_REFS: &str = "/proc/self/clear_refs";
const STATUS: &str = "/proc/self/status";

/// A phase whose peak resident memory is being measured.
#[derive(Debug)]
pub struct PeakMemory {
    reset: bool,
}

impl PeakMemory {
    /// Reset the process's resident high-water mark; the phase starts now.
    pub fn start() -> Self {
        Self {
            reset: std::fs::write(CLEAR_REFS, "5").is_ok(),
        }
    }

    /// Peak resident bytes since [`PeakMemory::start`], or `None` when it cannot be known.
    pub fn peak_bytes(&self) -> Option<u64> {
        if !self.reset {
            return None;
        }
        high_water_mark(Path::new(STATUS))
    }
}

/// `VmHWM` of a `/proc/<pid>/status` file, in bytes.
fn high_water_mark(status: &Path) -> Option<u64> {
    let text = std::fs::read_to_string(status).ok()?;
    parse_vm_hwm(&text)
}

fn parse_vm_hwm(status: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let mut parts = line["VmHWM:".len()..].split_whitespace();
    let value: u64 = parts.next()?.parse().ok()?;
    match parts.next() {
        Some("kB") => Some(value * 1024),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vm_hwm_is_read_in_bytes() {
        let status = "Name:\tx\nVmPeak:\t  9000 kB\nVmHWM:\t    1672 kB\nVmRSS:\t 1000 kB\n";
        assert_eq!(parse_vm_hwm(status), Some(1672 * 1024));
        assert_eq!(parse_vm_hwm("VmRSS:\t1 kB\n"), None);
        assert_eq!(parse_vm_hwm("VmHWM:\t12 MB\n"), None);
    }

    #[test]
    fn a_phase_that_allocates_sees_its_peak() {
        let phase = PeakMemory::start();
        let Some(before) = phase.peak_bytes() else {
            // Not Linux, or /proc is locked down: the contract is `None`, checked here.
            assert!(std::fs::write(CLEAR_REFS, "5").is_err() || !Path::new(STATUS).exists());
            return;
        };
        let big = vec![1u8; 64 << 20];
        let after = phase.peak_bytes().unwrap_or(0);
        assert!(big.iter().step_by(4096).all(|&b| b == 1));
        assert!(after >= before + (60 << 20), "{before} -> {after}");
    }
}
