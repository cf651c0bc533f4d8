//! How both binaries print an error at their edge: each cause once.
//!
//! Error types here and in the libraries they wrap often put their source's text into their own
//! message *and* name it as their source (`"{path}: {source}"` with `#[source]`, hyper's
//! "tcp connect error" over an io error saying the same), so printing the chain naively says
//! each cause twice ("No such file or directory (os error 2): No such file or directory (os
//! error 2)").

/// The error and its causes joined with ": ", leaving out a cause whose text the line already
/// holds.
pub fn error_chain(error: &(dyn std::error::Error + 'static)) -> String {
    with_causes(error.to_string(), error.source())
}

/// `line` followed by `cause` and its own causes, joined with ": ", each left out when the line
/// already holds its text (for errors whose own text is not their `Display`, such as a gRPC
/// status's message).
pub fn with_causes(mut line: String, cause: Option<&(dyn std::error::Error + 'static)>) -> String {
    let mut cause = cause;
    while let Some(current) = cause {
        let text = current.to_string();
        if !text.is_empty() && !line.contains(&text) {
            line.push_str(": ");
            line.push_str(&text);
        }
        cause = current.source();
    }
    line
}

/// True when the error or one of its causes is an I/O error of kind `BrokenPipe`: the reader of
/// the output went away (`coordinator logs … | head`), which ends a command quietly.
pub fn is_broken_pipe(error: &(dyn std::error::Error + 'static)) -> bool {
    let mut cause = Some(error);
    while let Some(current) = cause {
        if current.downcast_ref::<std::io::Error>().is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe) {
            return true;
        }
        cause = current.source();
    }
    false
}

/// Makes a write to a closed stdout end the process quietly with status 0: `println!` panics
/// with "failed printing to stdout: Broken pipe" when the reader of a pipe went away (Rust
/// ignores SIGPIPE, so the write fails instead of killing the process). Other panics keep the
/// default report.
pub fn exit_quietly_on_broken_pipe() {
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let payload = info.payload();
        let message =
            payload.downcast_ref::<String>().map(String::as_str).or_else(|| payload.downcast_ref::<&str>().copied()).unwrap_or_default();
        if message.contains("failed printing to stdout") && message.contains("Broken pipe") {
            std::process::exit(0);
        }
        default_hook(info);
    }));
}

/// Whether log lines on stderr may carry colour: only on a terminal, and never when `NO_COLOR`
/// is set (https://no-color.org).
pub fn colour_on_stderr() -> bool {
    use std::io::IsTerminal;
    std::env::var_os("NO_COLOR").is_none_or(|value| value.is_empty()) && std::io::stderr().is_terminal()
}

/// The metadata key under which the coordinator says, for a program to read, why it refused a
/// call. The status's message stays for people; a caller that acts on the reason reads this.
pub const REASON_KEY: &str = "cohort-reason";

/// [`REASON_KEY`]'s value when the coordinator does not know the calling worker (it restarted,
/// or declared the worker dead): the worker registers again.
pub const UNKNOWN_WORKER: &str = "unknown-worker";

/// `status` marked with `reason` under [`REASON_KEY`].
pub fn with_reason(mut status: tonic::Status, reason: &'static str) -> tonic::Status {
    status.metadata_mut().insert(REASON_KEY, tonic::metadata::MetadataValue::from_static(reason));
    status
}

/// The reason the coordinator attached to `status` under [`REASON_KEY`], if any.
pub fn reason(status: &tonic::Status) -> Option<&str> {
    status.metadata().get(REASON_KEY).and_then(|value| value.to_str().ok())
}

/// Whether the coordinator refused the call because it does not know the calling worker.
pub fn is_unknown_worker(status: &tonic::Status) -> bool {
    reason(status) == Some(UNKNOWN_WORKER)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("{path}: {source}")]
    struct Repeating {
        path: String,
        #[source]
        source: std::io::Error,
    }

    #[derive(Debug, thiserror::Error)]
    #[error("cannot read the token")]
    struct Outer(#[source] Repeating);

    #[test]
    fn each_cause_is_printed_once() {
        let io = std::io::Error::from(std::io::ErrorKind::NotFound);
        let text = io.to_string();
        let error = Outer(Repeating { path: "/x/token".into(), source: io });
        assert_eq!(error_chain(&error), format!("cannot read the token: /x/token: {text}"));
        assert!(!is_broken_pipe(&error));
        let pipe = Repeating { path: "stdout".into(), source: std::io::Error::from(std::io::ErrorKind::BrokenPipe) };
        assert!(is_broken_pipe(&pipe));
    }

    #[test]
    fn a_reason_travels_apart_from_the_message() {
        let marked = with_reason(tonic::Status::not_found("unknown worker w-1"), UNKNOWN_WORKER);
        assert!(is_unknown_worker(&marked));
        assert_eq!(marked.message(), "unknown worker w-1", "the text for people is kept");
        // Through the wire form (headers and trailers) as a client receives it.
        let mut headers = tonic::codegen::http::HeaderMap::new();
        marked.add_header(&mut headers).unwrap();
        let received = tonic::Status::from_header_map(&headers).unwrap();
        assert!(is_unknown_worker(&received));
        assert!(!is_unknown_worker(&tonic::Status::not_found("unknown worker w-1")), "the message alone says nothing");
        assert_eq!(reason(&tonic::Status::not_found("unknown task t-1")), None);
    }
}
