//! The process's peak resident memory, to set against the plan, and the machine's memory.

/// Peak resident set size of this process in bytes (`VmHWM` in `/proc/self/status`); `None`
/// where procfs is absent.
pub fn peak_rss_bytes() -> Option<usize> {
    status_field("VmHWM:")
}

/// Current resident set size in bytes (`VmRSS`).
pub fn current_rss_bytes() -> Option<usize> {
    status_field("VmRSS:")
}

/// Physical memory of the machine in bytes (`MemTotal` in `/proc/meminfo`).
pub fn total_memory_bytes() -> Option<usize> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    parse_kib_field(&text, "MemTotal:")
}

fn status_field(key: &str) -> Option<usize> {
    let text = std::fs::read_to_string("/proc/self/status").ok()?;
    parse_kib_field(&text, key)
}

/// The value of a `Key:   1234 kB` line, in bytes.
fn parse_kib_field(text: &str, key: &str) -> Option<usize> {
    let line = text.lines().find(|l| l.starts_with(key))?;
    let kib: usize = line[key.len()..]
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kib * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_kib_fields() {
        let text = "Name:\tx\nVmHWM:\t  1664 kB\nVmRSS:\t 1000 kB\n";
        assert_eq!(parse_kib_field(text, "VmHWM:"), Some(1664 * 1024));
        assert_eq!(parse_kib_field(text, "VmSwap:"), None);
        if cfg!(target_os = "linux") {
            // Current first: memory touched between the two reads only raises the peak.
            let now = current_rss_bytes().unwrap();
            let peak = peak_rss_bytes().unwrap();
            assert!(peak >= now && now > 0);
        }
    }
}
