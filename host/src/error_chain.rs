//! An error and its chain of causes as one line of text.
//!
//! Where an error ends up as text (a warning in the log, the string a guest gets back from a
//! host import), the top-level message alone is often the least useful part: "cannot open
//! the cache" says less than its cause, "Permission denied". `Display` of this crate's errors
//! shows one level and leaves the cause to `source()`, so the places that flatten errors to
//! text walk the chain here.

/// `error`, then each of its causes, joined by `": "`.
pub fn one_line(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::one_line;

    #[derive(Debug, thiserror::Error)]
    #[error("cannot open the cache")]
    struct Outer(#[source] std::io::Error);

    #[test]
    fn joins_every_cause() {
        let error = Outer(std::io::Error::other("Permission denied"));
        assert_eq!(one_line(&error), "cannot open the cache: Permission denied");
        assert_eq!(
            one_line(&std::io::Error::other("alone")),
            "alone",
            "an error without a cause is its message"
        );
    }
}
