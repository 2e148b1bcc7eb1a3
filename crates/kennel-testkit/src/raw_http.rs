//! [`RawConn`]: plain TCP connections to a kennel listener that misbehave on purpose (send
//! nothing, or half a request line and then nothing) or make one HTTP/1.1 request by hand and
//! then keep the connection open, so a test can watch the listener close them.
//!
//! Closing is observed as a read that ends (EOF or reset), with a deadline; nothing here
//! sleeps. This module knows HTTP only as far as one `GET` and a `Content-Length` response.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// One client connection, opened by the test.
pub struct RawConn {
    stream: TcpStream,
    /// When it was opened or last finished a request.
    pub since: Instant,
}

impl RawConn {
    /// Connects and sends nothing.
    pub async fn idle(addr: SocketAddr) -> anyhow::Result<Self> {
        let stream = TcpStream::connect(addr)
            .await
            .with_context(|| format!("failed to connect to {addr}"))?;
        Ok(RawConn {
            stream,
            since: Instant::now(),
        })
    }

    /// Connects and sends the start of a request line, never finishing it (a slow-header
    /// client).
    pub async fn slow_header(addr: SocketAddr) -> anyhow::Result<Self> {
        let mut c = Self::idle(addr).await?;
        c.send(b"GET /hea").await?;
        Ok(c)
    }

    /// `n` connections made by `open`, all open at once.
    pub async fn many<F, Fut>(n: usize, open: F) -> anyhow::Result<Vec<Self>>
    where
        F: Fn() -> Fut,
        Fut: std::future::Future<Output = anyhow::Result<Self>>,
    {
        let mut out = Vec::with_capacity(n);
        for i in 0..n {
            out.push(
                open()
                    .await
                    .with_context(|| format!("connection {i} of {n}"))?,
            );
        }
        Ok(out)
    }

    /// Writes `bytes` as they are.
    pub async fn send(&mut self, bytes: &[u8]) -> anyhow::Result<()> {
        self.stream
            .write_all(bytes)
            .await
            .context("failed to write to the connection")
    }

    /// Sends `GET path` (keep-alive) and reads the whole response; returns its status code.
    /// Afterwards the connection is idle and kept open, and `since` is now.
    pub async fn get(&mut self, path: &str, deadline: Duration) -> anyhow::Result<u16> {
        let req = format!("GET {path} HTTP/1.1\r\nHost: kennel\r\n\r\n");
        self.send(req.as_bytes()).await?;
        let status = tokio::time::timeout(deadline, self.read_response())
            .await
            .map_err(|_| anyhow!("no response to GET {path} within {deadline:?}"))??;
        self.since = Instant::now();
        Ok(status)
    }

    async fn read_response(&mut self) -> anyhow::Result<u16> {
        let mut buf = Vec::new();
        let head_end = loop {
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            let mut chunk = [0u8; 4096];
            let n = self.stream.read(&mut chunk).await?;
            if n == 0 {
                bail!("the connection closed before a response head arrived");
            }
            buf.extend_from_slice(&chunk[..n]);
        };
        let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
        let status = head
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse::<u16>().ok())
            .ok_or_else(|| anyhow!("not an HTTP response head: {head:?}"))?;
        let length = head
            .lines()
            .find_map(|l| {
                let (k, v) = l.split_once(':')?;
                k.trim()
                    .eq_ignore_ascii_case("content-length")
                    .then(|| v.trim().parse::<usize>().ok())?
            })
            .ok_or_else(|| anyhow!("the response has no Content-Length: {head:?}"))?;
        let mut have = buf.len() - head_end;
        while have < length {
            let mut chunk = [0u8; 4096];
            let n = self.stream.read(&mut chunk).await?;
            if n == 0 {
                bail!("the connection closed in the middle of a response body");
            }
            have += n;
        }
        Ok(status)
    }

    /// Waits until the server closes the connection (EOF or reset) and returns how long after
    /// `since` that was. Bytes the server sends meanwhile are read and dropped.
    pub async fn closed_within(&mut self, deadline: Duration) -> anyhow::Result<Duration> {
        let wait = async {
            let mut chunk = [0u8; 4096];
            loop {
                match self.stream.read(&mut chunk).await {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {}
                }
            }
        };
        tokio::time::timeout(deadline, wait)
            .await
            .map_err(|_| anyhow!("the server kept the connection open for {deadline:?}"))?;
        Ok(self.since.elapsed())
    }

    /// Waits until the server closed every one of `conns`, all within `deadline` (counted from
    /// now); returns the longest time one stayed open after its `since`.
    pub async fn all_closed_within(
        conns: Vec<Self>,
        deadline: Duration,
    ) -> anyhow::Result<Duration> {
        let n = conns.len();
        let end = tokio::time::Instant::now() + deadline;
        let waits = conns.into_iter().map(|mut c| async move {
            let left = end.saturating_duration_since(tokio::time::Instant::now());
            c.closed_within(left).await
        });
        let mut longest = Duration::ZERO;
        let mut open = 0;
        for r in futures_util::future::join_all(waits).await {
            match r {
                Ok(d) => longest = longest.max(d),
                Err(_) => open += 1,
            }
        }
        if open > 0 {
            bail!("{open} of {n} connections were still open after {deadline:?}");
        }
        Ok(longest)
    }
}
