//! Fault injection for tests: named points in the node that a test arms through the
//! `SHALE_FAILPOINTS` environment variable (comma-separated names). Unarmed, a point costs one
//! load of a process-wide flag; nothing in a production configuration arms one.
//!
//! Points: `crash-after-publish`, `crash-after-journal`, `crash-after-register` end the process
//! (as a power cut would: no cleanup) at those steps of a flush; `request-header` lets a request
//! carrying `x-shale-failpoint: panic` panic its shard, or `x-shale-failpoint: stall-ms=N`
//! block its shard's thread for N ms; `reject-registration=<measurement>` makes the manifest's
//! answer to that measurement's registrations a refusal.

use std::sync::OnceLock;

/// The environment variable that arms failpoints.
pub const ENV: &str = "SHALE_FAILPOINTS";

fn armed_points() -> &'static [String] {
    static ARMED: OnceLock<Vec<String>> = OnceLock::new();
    ARMED.get_or_init(|| {
        std::env::var(ENV)
            .unwrap_or_default()
            .split(',')
            .map(str::trim)
            .filter(|p| !p.is_empty())
            .map(str::to_string)
            .collect()
    })
}

/// Whether the point `name` is armed.
pub fn armed(name: &str) -> bool {
    let points = armed_points();
    !points.is_empty() && points.iter().any(|p| p == name)
}

/// The value of an armed `name=value` point.
pub fn value(name: &str) -> Option<&'static str> {
    armed_points()
        .iter()
        .find_map(|p| p.strip_prefix(name)?.strip_prefix('='))
}

/// Ends the process at once if `name` is armed, like a crash: no destructors, no flushes.
pub fn crash_if_armed(name: &str) {
    if armed(name) {
        tracing::warn!(failpoint = name, "failpoint: crashing");
        // SAFETY: `_exit` only ends the process.
        unsafe { libc::_exit(86) };
    }
}
