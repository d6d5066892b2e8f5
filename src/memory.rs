//! How much memory a stage may plan to use: what the machine, the container and the
//! process's own limits leave, so that a table too large for them is refused with a
//! sentence instead of an allocation abort (or the OOM killer) minutes into a run.

/// The least of: the kernel's `MemAvailable`, the cgroup's memory limit less its current
/// use, and the address-space limit (`ulimit -v`) less this process's current size.
/// `u64::MAX` where none of them can be read.
pub fn available_bytes() -> u64 {
    let mut limits = Vec::new();
    if let Some(kb) = proc_field("/proc/meminfo", "MemAvailable:") {
        limits.push(kb * 1024);
    }
    if let (Some(max), Some(current)) = (
        read_number("/sys/fs/cgroup/memory.max"),
        read_number("/sys/fs/cgroup/memory.current"),
    ) {
        limits.push(max.saturating_sub(current));
    }
    let mut rlimit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct we own.
    if unsafe { libc::getrlimit(libc::RLIMIT_AS, &mut rlimit) } == 0
        && rlimit.rlim_cur != libc::RLIM_INFINITY
    {
        let used = proc_field("/proc/self/status", "VmSize:").unwrap_or(0) * 1024;
        // rlim_t is u64 here, not on every target.
        #[allow(clippy::unnecessary_cast)]
        limits.push((rlimit.rlim_cur as u64).saturating_sub(used));
    }
    limits.into_iter().min().unwrap_or(u64::MAX)
}

fn proc_field(path: &str, field: &str) -> Option<u64> {
    let text = std::fs::read_to_string(path).ok()?;
    let line = text.lines().find(|l| l.starts_with(field))?;
    line[field.len()..].split_whitespace().next()?.parse().ok()
}

fn read_number(path: &str) -> Option<u64> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// `4096`, `512K`, `512M`, `8G`, `1T` (powers of 1024; a trailing `B` or `iB` is allowed).
pub fn parse_size(text: &str) -> Result<u64, String> {
    let bad = || format!("'{text}' is not a size (say 8G, 512M or a number of bytes)");
    let upper = text.trim().to_ascii_uppercase();
    let trimmed = upper
        .strip_suffix("IB")
        .or_else(|| upper.strip_suffix('B'))
        .unwrap_or(&upper);
    let split = trimmed
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(trimmed.len());
    let (number, unit) = trimmed.split_at(split);
    let number: f64 = number.parse().map_err(|_| bad())?;
    let scale = match unit {
        "" => 1u64,
        "K" => 1 << 10,
        "M" => 1 << 20,
        "G" => 1 << 30,
        "T" => 1 << 40,
        _ => return Err(bad()),
    };
    let bytes = number * scale as f64;
    if !(bytes.is_finite() && bytes >= 1.0 && bytes < u64::MAX as f64) {
        return Err(bad());
    }
    Ok(bytes as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("8G").unwrap(), 8 << 30);
        assert_eq!(parse_size("512MiB").unwrap(), 512 << 20);
        assert_eq!(parse_size("1.5k").unwrap(), 1536);
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert!(parse_size("lots").is_err());
        assert!(parse_size("0").is_err());
        assert!(parse_size("99999999T").is_err());
    }

    #[test]
    fn this_machine_has_some_memory() {
        let bytes = available_bytes();
        assert!(bytes > 1 << 20, "{bytes}");
    }
}
