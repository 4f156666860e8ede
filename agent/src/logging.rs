//! Log output: a `tracing` subscriber in human-readable text or JSON lines, and the
//! one-line error chains the binaries print.

use tracing_subscriber::EnvFilter;

use crate::config::LogFormat;

/// Installs the global subscriber. `RUST_LOG`, when set, wins over the configured filter.
pub fn init(filter: &str, format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(filter));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().flatten_event(true).with_current_span(false).init(),
    }
}

/// An error chain on one line, without repeating a cause its parent already quoted.
pub fn one_line(err: &anyhow::Error) -> String {
    let mut message = String::new();
    for cause in err.chain() {
        let text = cause.to_string();
        if !message.contains(&text) {
            if !message.is_empty() {
                message.push_str(": ");
            }
            message.push_str(&text);
        }
    }
    message.replace('\n', " ")
}

#[cfg(test)]
mod tests {
    #[test]
    fn one_line_skips_causes_already_quoted() {
        let io = std::io::Error::other("address in use");
        let err = anyhow::Error::new(io).context("cannot listen on :6001: address in use").context("bai-agent failed");
        assert_eq!(super::one_line(&err), "bai-agent failed: cannot listen on :6001: address in use");
    }
}
