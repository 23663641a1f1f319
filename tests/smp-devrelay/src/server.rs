//! The listeners: accept TCP, run TLS (and the WebSocket upgrade), hand the block stream to
//! a connection task.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};

use muxd_transport::server::{Acceptor, ServerOptions};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

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

    let cancel = CancellationToken::new();
    let conns = Arc::new(Mutex::new(cancel.child_token()));
    let tracker = TaskTracker::new();
    let ctx = AcceptContext {
        acceptor,
        shared: shared.clone(),
        cancel: cancel.clone(),
        conns: conns.clone(),
        tracker: tracker.clone(),
    };
    if let Some((l, _)) = ws {
        tracker.spawn(accept_loop(l, ctx.clone(), true));
    }
    tracker.spawn(accept_loop(listener, ctx, false));
    tracing::info!(%local_addr, ?ws_addr, key_hash = %shared.identity.key_hash(), "SMP relay listening");
    Ok(RelayHandle {
        shared,
        local_addr,
        ws_addr,
        cancel,
        conns,
        tracker,
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

#[derive(Debug, Clone)]
struct AcceptContext {
    acceptor: Acceptor,
    shared: Arc<Shared>,
    cancel: CancellationToken,
    conns: Arc<Mutex<CancellationToken>>,
    tracker: TaskTracker,
}

async fn accept_loop(listener: TcpListener, ctx: AcceptContext, websocket: bool) {
    loop {
        let (tcp, peer) = tokio::select! {
            () = ctx.cancel.cancelled() => break,
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
        let token = ctx
            .conns
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        let acceptor = ctx.acceptor.clone();
        let shared = ctx.shared.clone();
        ctx.tracker.spawn(async move {
            let setup = async {
                let tls = acceptor.accept(tcp).await?;
                if websocket {
                    tls.accept_websocket().await
                } else {
                    Ok(tls.into_blocks())
                }
            };
            let blocks = tokio::select! {
                () = token.cancelled() => return,
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
