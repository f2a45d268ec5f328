//! Logging: a tracing subscriber writing to stderr, as text or JSON lines.
//! `RUST_LOG` overrides the configured level. Metrics arrive with the
//! gateway.

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

use crate::config::{LogConfig, LogFormat};

/// hickory-server logs every TCP query at `info`; muster logs no query at
/// `info`, so hickory is held to warnings unless a filter names it.
const QUIET_HICKORY: &str = "hickory_server=warn";

/// The filter for `level` (from the config) unless `RUST_LOG` is set.
pub fn filter(level: &str) -> EnvFilter {
    if let Ok(filter) = EnvFilter::try_from_default_env() {
        return filter;
    }
    let level = if level.contains("hickory") {
        level.to_string()
    } else {
        format!("{level},{QUIET_HICKORY}")
    };
    EnvFilter::builder()
        .parse(&level)
        .unwrap_or_else(|_| EnvFilter::new("info"))
}

/// Installs the global subscriber; call once, before anything logs.
pub fn init(log: &LogConfig) {
    let filter = filter(&log.level);
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let installed = match log.format {
        LogFormat::Json => builder.json().try_init(),
        LogFormat::Text => builder
            .with_ansi(std::io::stderr().is_terminal())
            .try_init(),
    };
    // A second init (tests in one process) keeps the first subscriber.
    let _ = installed;
}
