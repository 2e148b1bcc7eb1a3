//! Deadlines for waits in tests. A test that waits on an event must give up with a message
//! naming what it waited for, rather than hang until the harness kills it.

use std::future::Future;
use std::time::Duration;

/// Runs `fut` for at most `d`; on expiry the error says what was being waited for.
pub async fn within<T>(d: Duration, what: &str, fut: impl Future<Output = T>) -> anyhow::Result<T> {
    tokio::time::timeout(d, fut)
        .await
        .map_err(|_| anyhow::anyhow!("timed out after {d:?} waiting for {what}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn names_what_timed_out() {
        let err = within(
            Duration::from_millis(1),
            "the moon",
            std::future::pending::<()>(),
        )
        .await
        .unwrap_err();
        assert_eq!(err.to_string(), "timed out after 1ms waiting for the moon");
        let v = within(Duration::from_secs(1), "a value", async { 7 })
            .await
            .unwrap();
        assert_eq!(v, 7);
    }
}
