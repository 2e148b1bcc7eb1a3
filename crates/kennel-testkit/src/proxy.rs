//! [`FaultProxy`]: a TCP proxy in front of a server that a test can cut (every connection
//! through it dropped, new ones closed at once: a network partition for whoever connects
//! through it) and heal. It counts the bytes it carries each way.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use anyhow::Context;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

pub struct FaultProxy {
    addr: SocketAddr,
    /// `true` while cut.
    cut: Arc<watch::Sender<bool>>,
    /// Bytes carried to the target, and back.
    carried: Arc<[AtomicU64; 2]>,
    accept: tokio::task::JoinHandle<()>,
}

/// Copies `from` to `to`, adding what it copies to `count`, until either side ends.
async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    carried: Arc<[AtomicU64; 2]>,
    way: usize,
) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
        carried[way].fetch_add(n as u64, Ordering::Relaxed);
    }
}

impl FaultProxy {
    /// Listens on a free loopback port and forwards each connection to `target`.
    pub async fn start(target: SocketAddr) -> anyhow::Result<FaultProxy> {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .context("failed to bind the proxy")?;
        let addr = listener.local_addr()?;
        let cut = Arc::new(watch::channel(false).0);
        let carried = Arc::new([AtomicU64::new(0), AtomicU64::new(0)]);
        let state = cut.clone();
        let counts = carried.clone();
        let accept = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                if *state.borrow() {
                    drop(client);
                    continue;
                }
                let mut cut = state.subscribe();
                let counts = counts.clone();
                tokio::spawn(async move {
                    let Ok(server) = TcpStream::connect(target).await else {
                        return;
                    };
                    let (client_in, client_out) = client.into_split();
                    let (server_in, server_out) = server.into_split();
                    tokio::select! {
                        () = pump(client_in, server_out, counts.clone(), 0) => {}
                        () = pump(server_in, client_out, counts, 1) => {}
                        _ = cut.wait_for(|c| *c) => {}
                    }
                });
            }
        });
        Ok(FaultProxy {
            addr,
            cut,
            carried,
            accept,
        })
    }

    /// `http://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Drops every connection through the proxy and refuses new ones until [`Self::heal`].
    pub fn cut(&self) {
        self.cut.send_replace(true);
    }

    pub fn heal(&self) {
        self.cut.send_replace(false);
    }

    /// Bytes carried so far: to the target, and back.
    pub fn carried(&self) -> (u64, u64) {
        (
            self.carried[0].load(Ordering::Relaxed),
            self.carried[1].load(Ordering::Relaxed),
        )
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.cut.send_replace(true);
        self.accept.abort();
    }
}
