//! CPU time used by the broker (from /proc/<pid>/stat) and by this process
//! (getrusage), sampled at the start and end of the measured phase.

use std::time::Duration;

use anyhow::{bail, Context};

/// User + system CPU time of another process, from `/proc/<pid>/stat`.
/// Resolution is one clock tick (usually 10 ms).
pub fn process_cpu(pid: u32) -> anyhow::Result<Duration> {
    let path = format!("/proc/{pid}/stat");
    let stat = std::fs::read_to_string(&path)
        .with_context(|| format!("cannot read {path} (is process {pid} running?)"))?;
    let ticks = parse_stat_ticks(&stat).with_context(|| format!("unexpected format of {path}"))?;
    Ok(ticks_to_duration(ticks, clock_ticks_per_second()))
}

/// utime + stime, in clock ticks, from the text of `/proc/<pid>/stat`.
/// The command name (field 2) is in parentheses and may hold spaces or
/// parentheses itself, so fields are counted from the last `)`.
pub fn parse_stat_ticks(stat: &str) -> anyhow::Result<u64> {
    let Some(close) = stat.rfind(')') else {
        bail!("no ')' after the command name");
    };
    // After ") " come field 3 (state), 4, ...; utime is field 14, stime 15.
    let rest: Vec<&str> = stat[close + 1..].split_whitespace().collect();
    let field = |n: usize| -> anyhow::Result<u64> {
        rest.get(n - 3)
            .with_context(|| format!("field {n} missing"))?
            .parse::<u64>()
            .with_context(|| format!("field {n} is not a number"))
    };
    Ok(field(14)? + field(15)?)
}

fn ticks_to_duration(ticks: u64, per_second: u64) -> Duration {
    Duration::from_nanos((ticks as u128 * 1_000_000_000 / per_second.max(1) as u128) as u64)
}

fn clock_ticks_per_second() -> u64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        t as u64
    } else {
        100
    }
}

/// User + system CPU time of this process so far (every thread).
pub fn self_cpu() -> Duration {
    // SAFETY: getrusage writes into the struct we pass and nothing else.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    let rc = unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
    if rc != 0 {
        return Duration::ZERO;
    }
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

/// Samples the broker (when its pid is known) and this process.
#[derive(Debug, Clone, Copy)]
pub struct CpuSample {
    pub broker: Option<Duration>,
    pub client: Duration,
}

impl CpuSample {
    pub fn take(broker_pid: Option<u32>) -> CpuSample {
        CpuSample {
            broker: broker_pid.and_then(|p| process_cpu(p).ok()),
            client: self_cpu(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_fields_are_counted_after_the_command_name() {
        // A command name with a space and a ')' must not shift the fields.
        let stat = "4242 (nats) server) S 1 4242 4242 0 -1 4194560 2412 0 0 0 \
                    731 269 0 0 20 0 7 0 1234 1000000 2000 18446744073709551615";
        assert_eq!(parse_stat_ticks(stat).unwrap(), 731 + 269);
    }

    #[test]
    fn truncated_stat_is_an_error_not_a_zero() {
        assert!(parse_stat_ticks("1 (x) S 1 2 3").is_err());
        assert!(parse_stat_ticks("garbage").is_err());
    }

    #[test]
    fn ticks_convert_at_the_kernel_rate() {
        assert_eq!(ticks_to_duration(250, 100), Duration::from_millis(2500));
        assert_eq!(ticks_to_duration(3, 1000), Duration::from_millis(3));
    }

    #[test]
    fn own_process_is_readable_both_ways() {
        let pid = std::process::id();
        // Burn a little CPU so both clocks move past zero.
        let mut x = 0u64;
        for i in 0..20_000_000u64 {
            x = x.wrapping_mul(31).wrapping_add(i);
        }
        std::hint::black_box(x);
        assert!(process_cpu(pid).is_ok());
        assert!(self_cpu() > Duration::ZERO);
    }
}
