//! Where the daemon's log goes: human format on a terminal; under systemd
//! (JOURNAL_STREAM set) the native journal protocol, so each line keeps
//! its priority and fields; otherwise plain lines without timestamps (the
//! supervisor stamps them).

/// Installs the global subscriber; `filter` overrides RUST_LOG.
pub fn init(filter: Option<&str>) {
    use std::io::IsTerminal;
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    use tracing_subscriber::EnvFilter;
    let filter = match filter {
        Some(f) => EnvFilter::new(f),
        // libublk logs every control handle it makes at info.
        None => EnvFilter::try_from_default_env()
            .unwrap_or_else(|_| EnvFilter::new("info,libublk=warn")),
    };
    if std::env::var_os("JOURNAL_STREAM").is_some() {
        if let Ok(journald) = tracing_journald::layer() {
            tracing_subscriber::registry()
                .with(filter)
                .with(journald.with_syslog_identifier("hostcryptd".into()))
                .init();
            return;
        }
    }
    let terminal = std::io::stderr().is_terminal();
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(terminal);
    if terminal {
        builder.init();
    } else {
        builder.without_time().init();
    }
}
