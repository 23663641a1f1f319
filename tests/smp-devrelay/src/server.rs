//! The listeners: accept TCP, run TLS (and the WebSocket upgrade), hand the block stream to
//! a connection task.

use std::net::SocketAddr;
use std::sync::Arc;

use muxd_transport::server::{Acceptor, ServerOptions};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};

use crate::stats::Counters;
use crate::{RelayError, RelayHandle, Shared, conn};

/// Binds the listeners and spawns their accept loops.
pub(crate) async fn start(shared: Arc<Shared>) -> Result<RelayHandle, RelayError> {
    let acceptor = Acceptor::new(&shared.identity, &ServerOptions::default())?;
    let listener = bind(shared.config.listen).await?;
    let local_addr = local(&listener, shared.config.listen)?;
    let ws = match shared.config.ws_listen {
        Some(addr) => {
            let l = bind(addr).await?;
            let a = local(&l, addr)?;
            Some((l, a))
        }
        None => None,
    };
    let ws_addr = ws.as_ref().map(|(_, a)| *a);

    let (stop, stop_rx) = watch::channel(0u64);
    let (kick, kick_rx) = watch::channel(0u64);
    let (done_tx, done) = mpsc::channel(1);
    let ctx = AcceptContext {
        acceptor,
        shared: shared.clone(),
        stop: Trigger::new(stop_rx),
        kick: kick_rx,
        done: done_tx,
    };
    if let Some((l, _)) = ws {
        tokio::spawn(accept_loop(l, ctx.clone(), true));
    }
    tokio::spawn(accept_loop(listener, ctx, false));
    tracing::info!(%local_addr, ?ws_addr, key_hash = %shared.identity.key_hash(), "SMP relay listening");
    Ok(RelayHandle {
        shared,
        local_addr,
        ws_addr,
        stop,
        kick,
        done,
    })
}

async fn bind(addr: SocketAddr) -> Result<TcpListener, RelayError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| RelayError::Bind { addr, source })
}

fn local(l: &TcpListener, addr: SocketAddr) -> Result<SocketAddr, RelayError> {
    l.local_addr()
        .map_err(|source| RelayError::Bind { addr, source })
}

/// Fires once its watch channel changes after creation, or its sender is dropped (so a
/// dropped [`RelayHandle`] stops everything).
#[derive(Debug, Clone)]
pub(crate) struct Trigger(watch::Receiver<u64>);

impl Trigger {
    fn new(mut rx: watch::Receiver<u64>) -> Self {
        // Only changes from now on count.
        rx.borrow_and_update();
        Self(rx)
    }

    /// Waits for the next change (or the sender's end).
    pub(crate) async fn fired(&mut self) {
        let _ = self.0.changed().await;
    }
}

#[derive(Debug, Clone)]
struct AcceptContext {
    acceptor: Acceptor,
    shared: Arc<Shared>,
    stop: Trigger,
    kick: watch::Receiver<u64>,
    /// Held by every task so that shutdown can wait for all of them.
    done: mpsc::Sender<()>,
}

async fn accept_loop(listener: TcpListener, mut ctx: AcceptContext, websocket: bool) {
    loop {
        let (tcp, peer) = tokio::select! {
            () = ctx.stop.fired() => break,
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    // EMFILE and friends: keep accepting once the pressure is gone.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        Counters::inc(&ctx.shared.counters.accepted);
        let _ = tcp.set_nodelay(true);
        let mut token = Trigger::new(ctx.kick.clone());
        let acceptor = ctx.acceptor.clone();
        let shared = ctx.shared.clone();
        let done = ctx.done.clone();
        tokio::spawn(async move {
            let _done = done;
            let setup = async {
                let tls = acceptor.accept(tcp).await?;
                if websocket {
                    tls.accept_websocket().await
                } else {
                    Ok(tls.into_blocks())
                }
            };
            let blocks = tokio::select! {
                () = token.fired() => return,
                r = tokio::time::timeout(shared.config.handshake_timeout, setup) => r,
            };
            match blocks {
                Ok(Ok(blocks)) => {
                    if websocket {
                        Counters::inc(&shared.counters.websocket);
                    }
                    conn::serve(blocks, shared, token).await;
                }
                Ok(Err(e)) => {
                    Counters::inc(&shared.counters.handshake_failures);
                    tracing::debug!(%peer, error = %e, "TLS setup failed");
                }
                Err(_) => {
                    Counters::inc(&shared.counters.handshake_failures);
                    tracing::debug!(%peer, "TLS setup timed out");
                }
            }
        });
    }
}
