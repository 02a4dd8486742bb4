//! What `ptxas -v` says about each kernel: registers, spills, stack and shared memory, read from the
//! report [`crate::toolchain::ptxas_check`] returns.
//!
//! The report is a sequence of blocks, one per entry function:
//!
//! ```text
//! ptxas info    : Compiling entry function 'k_linear_0a1b2c3d4e5f' for 'sm_90a'
//! ptxas info    : Function properties for k_linear_0a1b2c3d4e5f
//!     0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
//! ptxas info    : Used 40 registers, used 1 barriers, 8448 bytes smem, 424 bytes cmem[0]
//! ```
//!
//! ptxas leaves out the `smem` item when a kernel has no shared memory; the parser reads what is
//! there and counts the rest as 0. Lines it does not know are skipped, so a newer ptxas that adds
//! items still parses.

use std::collections::BTreeMap;

/// Resource use of one kernel as ptxas reports it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PtxasStats {
    pub registers: u32,
    pub stack_bytes: u64,
    pub spill_store_bytes: u64,
    pub spill_load_bytes: u64,
    /// Static shared memory per block.
    pub shared_bytes: u64,
}

/// The stats of every entry function in a `ptxas -v` report, by name.
pub fn parse_report(report: &str) -> BTreeMap<String, PtxasStats> {
    let mut stats: BTreeMap<String, PtxasStats> = BTreeMap::new();
    let mut current: Option<String> = None;
    for line in report.lines() {
        let text = line.split_once(": ").map_or(line, |(_, rest)| rest).trim();
        if let Some(rest) = text.strip_prefix("Compiling entry function '") {
            let name = rest.split('\'').next().unwrap_or_default().to_string();
            stats.entry(name.clone()).or_default();
            current = Some(name);
            continue;
        }
        if let Some(rest) = text.strip_prefix("Function properties for ") {
            let name = rest.trim().to_string();
            current = stats.contains_key(&name).then_some(name);
            continue;
        }
        let Some(s) = current.as_ref().and_then(|n| stats.get_mut(n)) else { continue };
        // Comma-separated items, each `<number> <what>` or `Used <number> registers`.
        for item in text.split(',') {
            let words: Vec<&str> = item.split_whitespace().collect();
            let (n, what) = match words.as_slice() {
                ["Used", n, rest @ ..] => (n, rest.join(" ")),
                [n, rest @ ..] => (n, rest.join(" ")),
                [] => continue,
            };
            let Ok(n) = n.parse::<u64>() else { continue };
            match what.as_str() {
                "registers" => s.registers = n as u32,
                "bytes stack frame" => s.stack_bytes = n,
                "bytes spill stores" => s.spill_store_bytes = n,
                "bytes spill loads" => s.spill_load_bytes = n,
                "bytes smem" => s.shared_bytes = n,
                _ => {}
            }
        }
    }
    stats
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_each_entry_and_defaults_missing_items() {
        let report = "\
ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function 'k_linear_0a' for 'sm_90a'
ptxas info    : Function properties for k_linear_0a
    8 bytes stack frame, 4 bytes spill stores, 12 bytes spill loads
ptxas info    : Used 40 registers, used 1 barriers, 8448 bytes smem, 424 bytes cmem[0]
ptxas info    : Compiling entry function 'k_exp_1b' for 'sm_90a'
ptxas info    : Function properties for k_exp_1b
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 10 registers, used 0 barriers, 380 bytes cmem[0]
";
        let s = parse_report(report);
        assert_eq!(s.len(), 2);
        assert_eq!(
            s["k_linear_0a"],
            PtxasStats {
                registers: 40,
                stack_bytes: 8,
                spill_store_bytes: 4,
                spill_load_bytes: 12,
                shared_bytes: 8448
            }
        );
        assert_eq!(s["k_exp_1b"], PtxasStats { registers: 10, ..PtxasStats::default() });
        assert!(parse_report("").is_empty());
    }
}
