//! One-line error reports for the binaries' edges. Library errors print
//! their cause in their own message (so a log line is complete on its own)
//! and also expose it as `source()`; walking the chain naively would repeat
//! it. This keeps each cause once, in order.

/// `outer: cause: root cause`, skipping causes already in the text.
pub fn error_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut cause = error.source();
    while let Some(e) = cause {
        let message = e.to_string();
        if !text.contains(&message) {
            text.push_str(": ");
            text.push_str(&message);
        }
        cause = e.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("outer: {0}")]
    struct Repeats(#[source] std::io::Error);

    #[derive(Debug, thiserror::Error)]
    #[error("outer")]
    struct Silent(#[source] std::io::Error);

    #[test]
    fn causes_appear_once() {
        let io = || std::io::Error::other("disk on fire");
        assert_eq!(error_chain(&Repeats(io())), "outer: disk on fire");
        assert_eq!(error_chain(&Silent(io())), "outer: disk on fire");
    }
}
