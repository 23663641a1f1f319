//! The central task: one loop owns the daemon state and serves every session's commands.
//!
//! Sessions only parse frames and forward requests here over a bounded channel; the answers go
//! back through each client's non-blocking [`ClientHandle`]. [`Hub`] holds the state and the
//! decisions with time passed in, so it is tested without a runtime; [`drive`] is the thin
//! async loop around it. The upstream pool joins this loop later (STYLE practice 2): its inputs
//! become more `select!` arms and its deadlines fold into [`Hub::poll_timeout`].

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use muxd_ipc_proto::{
    ErrorCode, ErrorFrame, Event, Op, Reply, Request, Response, ServerMessage, StatusReport,
};
use tokio::sync::mpsc;

use crate::ipc::client::{ClientHandle, ClientId, Flush, SLOW_CONSUMER_BUDGET, SendError, encode};
use crate::shutdown::{ShutdownReason, ShutdownSignal};
use crate::status::UpstreamSource;

/// Bound on a client-chosen `watch` interval. Below it a single watcher could keep the driver
/// busy serialising status reports; above it the value is surely a mistake.
const WATCH_INTERVAL_BOUNDS: (Duration, Duration) =
    (Duration::from_millis(10), Duration::from_secs(86_400));

/// What sessions ask of the driver.
#[derive(Debug)]
pub(crate) enum Command {
    /// A client finished its hello.
    Connect { handle: ClientHandle, app: String },
    /// A client's session ended.
    Disconnect { client: ClientId },
    /// A client's request.
    Request { client: ClientId, request: Request },
}

/// The daemon state that IPC requests see.
#[derive(Debug)]
pub(crate) struct Hub {
    started: Instant,
    pid: u32,
    default_watch_interval: Duration,
    clients: BTreeMap<ClientId, Client>,
    upstreams: Box<dyn UpstreamSource>,
    /// Set when the client count changed and watchers have not been told yet.
    status_dirty: bool,
    shutdown_requested: bool,
}

#[derive(Debug)]
struct Client {
    handle: ClientHandle,
    app: String,
    watch: Option<Watch>,
}

#[derive(Debug)]
struct Watch {
    interval: Duration,
    next_due: Instant,
}

impl Hub {
    pub(crate) fn new(
        now: Instant,
        pid: u32,
        default_watch_interval: Duration,
        upstreams: Box<dyn UpstreamSource>,
    ) -> Self {
        Self {
            started: now,
            pid,
            default_watch_interval,
            clients: BTreeMap::new(),
            upstreams,
            status_dirty: false,
            shutdown_requested: false,
        }
    }

    /// Clients that completed their hello and are still connected.
    pub(crate) fn client_count(&self) -> usize {
        self.clients.len()
    }

    pub(crate) fn handle_command(&mut self, now: Instant, cmd: Command) {
        match cmd {
            Command::Connect { handle, app } => {
                tracing::debug!(client = %handle.id(), %app, "client registered");
                self.clients.insert(
                    handle.id(),
                    Client {
                        handle,
                        app,
                        watch: None,
                    },
                );
                self.status_dirty = true;
            }
            Command::Disconnect { client } => {
                if let Some(c) = self.clients.remove(&client) {
                    tracing::debug!(%client, app = %c.app, "client unregistered");
                    self.status_dirty = true;
                }
            }
            Command::Request { client, request } => self.handle_request(now, client, request),
        }
        self.publish_changes(now);
    }

    /// Sends the periodic status events that are due.
    pub(crate) fn handle_timeout(&mut self, now: Instant) {
        let due: Vec<ClientId> = self
            .clients
            .iter()
            .filter(|(_, c)| c.watch.as_ref().is_some_and(|w| w.next_due <= now))
            .map(|(id, _)| *id)
            .collect();
        if !due.is_empty() {
            let frame = encode(&ServerMessage::Event(Event::Status(self.status(now))));
            for id in due {
                self.send_status(now, id, frame.clone());
            }
        }
        self.publish_changes(now);
    }

    /// The earliest moment [`handle_timeout`](Self::handle_timeout) has work.
    pub(crate) fn poll_timeout(&self) -> Option<Instant> {
        self.clients
            .values()
            .filter_map(|c| c.watch.as_ref().map(|w| w.next_due))
            .min()
    }

    /// Whether a client asked for shutdown since the last call.
    pub(crate) fn poll_shutdown_request(&mut self) -> bool {
        std::mem::take(&mut self.shutdown_requested)
    }

    /// Tells every client the daemon is going away and closes them after their queued frames.
    pub(crate) fn close_all(&mut self, reason: ShutdownReason, budget: Duration) {
        let frame = encode(&ServerMessage::Event(Event::ShuttingDown {
            reason: reason.as_str().to_owned(),
        }));
        for (_, c) in std::mem::take(&mut self.clients) {
            c.handle.close(crate::ipc::client::LastWords {
                frame: frame.clone(),
                flush: Flush::Pending(budget),
            });
        }
    }

    fn handle_request(&mut self, now: Instant, client: ClientId, request: Request) {
        let Some(c) = self.clients.get_mut(&client) else {
            // Raced with its own disconnect (e.g. dropped as a slow consumer).
            return;
        };
        let id = request.id;
        let reply = match request.op {
            Op::Status => Reply::Status(self.status(now)),
            Op::Ping { data } => Reply::Pong { data },
            Op::Watch { interval_ms } => {
                let interval = interval_ms.map_or(self.default_watch_interval, |ms| {
                    Duration::from_millis(ms)
                        .clamp(WATCH_INTERVAL_BOUNDS.0, WATCH_INTERVAL_BOUNDS.1)
                });
                c.watch = Some(Watch {
                    interval,
                    next_due: now,
                });
                if self.reply(
                    client,
                    Response {
                        id,
                        reply: Reply::Watching,
                    },
                ) {
                    // The first snapshot goes out at once, right behind `watching`.
                    let frame = encode(&ServerMessage::Event(Event::Status(self.status(now))));
                    self.send_status(now, client, frame);
                }
                return;
            }
            Op::Shutdown => {
                tracing::info!(%client, app = %c.app, "shutdown requested by a client");
                self.shutdown_requested = true;
                Reply::ShuttingDown
            }
            // `Op` may grow; an older daemon answers the new op with an error, not a hang.
            _ => {
                let err = ErrorFrame {
                    id: Some(id),
                    code: ErrorCode::InvalidArgument,
                    message: "operation not supported by this daemon".to_owned(),
                };
                self.deliver(client, &ServerMessage::Error(err));
                return;
            }
        };
        self.reply(client, Response { id, reply });
    }

    fn reply(&mut self, client: ClientId, response: Response) -> bool {
        self.deliver(client, &ServerMessage::Response(response))
    }

    /// Queues `msg` for `client`, dropping the client if it cannot take it. Returns whether the
    /// client is still connected.
    fn deliver(&mut self, client: ClientId, msg: &ServerMessage) -> bool {
        let Some(frame) = encode(msg) else {
            return true;
        };
        self.deliver_frame(client, frame)
    }

    fn deliver_frame(&mut self, client: ClientId, frame: bytes::Bytes) -> bool {
        let Some(c) = self.clients.get(&client) else {
            return false;
        };
        match c.handle.send_frame(frame) {
            Ok(()) => true,
            Err(SendError::Full) => {
                tracing::warn!(%client, app = %c.app, "client not reading; disconnecting slow consumer");
                c.handle.close_with_error(
                    ErrorCode::SlowConsumer,
                    "outbound buffer full: the client did not read its frames fast enough",
                    Flush::Discard(SLOW_CONSUMER_BUDGET),
                );
                self.clients.remove(&client);
                self.status_dirty = true;
                false
            }
            Err(SendError::Closed | SendError::Encode) => {
                self.clients.remove(&client);
                self.status_dirty = true;
                false
            }
        }
    }

    fn send_status(&mut self, now: Instant, client: ClientId, frame: Option<bytes::Bytes>) {
        // The deadline moves on even if encoding failed, or the timer would fire in a loop.
        if let Some(w) = self.clients.get_mut(&client).and_then(|c| c.watch.as_mut()) {
            w.next_due = now + w.interval;
        }
        if let Some(frame) = frame {
            self.deliver_frame(client, frame);
        }
    }

    /// Tells every watcher about a changed client count. Dropping a slow watcher changes the
    /// count again, so this repeats until nothing changes (each round removes a client or ends).
    fn publish_changes(&mut self, now: Instant) {
        while std::mem::take(&mut self.status_dirty) {
            let watchers: Vec<ClientId> = self
                .clients
                .iter()
                .filter(|(_, c)| c.watch.is_some())
                .map(|(id, _)| *id)
                .collect();
            if watchers.is_empty() {
                continue;
            }
            let frame = encode(&ServerMessage::Event(Event::Status(self.status(now))));
            for id in watchers {
                self.send_status(now, id, frame.clone());
            }
        }
    }

    fn status(&self, now: Instant) -> StatusReport {
        status_report(
            self.started,
            now,
            self.pid,
            self.clients.len(),
            self.upstreams.as_ref(),
        )
    }
}

fn status_report(
    started: Instant,
    now: Instant,
    pid: u32,
    clients: usize,
    upstreams: &dyn UpstreamSource,
) -> StatusReport {
    StatusReport {
        daemon_version: env!("CARGO_PKG_VERSION").to_owned(),
        pid,
        uptime_ms: u64::try_from(now.saturating_duration_since(started).as_millis())
            .unwrap_or(u64::MAX),
        clients: u32::try_from(clients).unwrap_or(u32::MAX),
        upstreams: upstreams.snapshot(),
    }
}

/// Runs the hub until shutdown starts (or every session sender is gone), then sends every
/// client its `shutting_down` event.
pub(crate) async fn drive(
    mut hub: Hub,
    mut commands: mpsc::Receiver<Command>,
    shutdown: ShutdownSignal,
    grace: Duration,
) {
    loop {
        let deadline = hub.poll_timeout();
        let sleep = async {
            match deadline {
                Some(d) => tokio::time::sleep_until(tokio::time::Instant::from_std(d)).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            biased;
            () = shutdown.cancelled() => break,
            // Timers before commands, so a flood of requests cannot starve the watchers.
            () = sleep => hub.handle_timeout(Instant::now()),
            cmd = commands.recv() => match cmd {
                Some(cmd) => hub.handle_command(Instant::now(), cmd),
                None => break,
            },
        }
        if hub.poll_shutdown_request() {
            shutdown.trigger(ShutdownReason::Request);
        }
    }
    tracing::debug!(
        clients = hub.client_count(),
        "telling clients about shutdown"
    );
    hub.close_all(shutdown.reason(), grace);
}

#[cfg(test)]
mod tests {
    use muxd_ipc_proto::decode_frame;

    use super::*;
    use crate::status::NoUpstreams;

    fn hub(now: Instant) -> Hub {
        Hub::new(now, 42, Duration::from_secs(1), Box::new(NoUpstreams))
    }

    fn connect(hub: &mut Hub, now: Instant, id: u64, buf: usize) -> mpsc::Receiver<bytes::Bytes> {
        let (handle, end) = ClientHandle::new(ClientId(id), buf);
        hub.handle_command(
            now,
            Command::Connect {
                handle,
                app: format!("app{id}"),
            },
        );
        end.queue
    }

    fn request(hub: &mut Hub, now: Instant, client: u64, id: u64, op: Op) {
        hub.handle_command(
            now,
            Command::Request {
                client: ClientId(client),
                request: Request { id, op },
            },
        );
    }

    fn drain(rx: &mut mpsc::Receiver<bytes::Bytes>) -> Vec<ServerMessage> {
        let mut out = Vec::new();
        while let Ok(frame) = rx.try_recv() {
            out.push(decode_frame::<ServerMessage>(&frame).unwrap().unwrap().0);
        }
        out
    }

    fn status_clients(msg: &ServerMessage) -> Option<u32> {
        match msg {
            ServerMessage::Event(Event::Status(s)) => Some(s.clients),
            _ => None,
        }
    }

    #[test]
    fn ping_and_status_answer_with_the_request_id() {
        let t0 = Instant::now();
        let mut hub = hub(t0);
        let mut rx = connect(&mut hub, t0, 1, 8);
        request(&mut hub, t0, 1, 7, Op::Ping { data: "abc".into() });
        request(&mut hub, t0 + Duration::from_millis(1500), 1, 8, Op::Status);
        let got = drain(&mut rx);
        assert_eq!(
            got[0],
            ServerMessage::Response(Response {
                id: 7,
                reply: Reply::Pong { data: "abc".into() }
            })
        );
        let ServerMessage::Response(Response {
            id: 8,
            reply: Reply::Status(s),
        }) = &got[1]
        else {
            panic!("{got:?}")
        };
        assert_eq!((s.pid, s.clients, s.uptime_ms), (42, 1, 1500));
        assert!(s.upstreams.is_empty());
    }

    #[test]
    fn watch_sends_snapshot_then_on_change_and_on_interval() {
        let t0 = Instant::now();
        let mut hub = hub(t0);
        let mut rx = connect(&mut hub, t0, 1, 16);
        request(
            &mut hub,
            t0,
            1,
            1,
            Op::Watch {
                interval_ms: Some(500),
            },
        );
        let got = drain(&mut rx);
        assert!(matches!(
            got[0],
            ServerMessage::Response(Response {
                id: 1,
                reply: Reply::Watching
            })
        ));
        assert_eq!(status_clients(&got[1]), Some(1));
        assert_eq!(hub.poll_timeout(), Some(t0 + Duration::from_millis(500)));

        // A second client connects: the watcher hears about it at once.
        let t1 = t0 + Duration::from_millis(100);
        let _rx2 = connect(&mut hub, t1, 2, 16);
        assert_eq!(
            drain(&mut rx)
                .iter()
                .map(status_clients)
                .collect::<Vec<_>>(),
            [Some(2)]
        );
        assert_eq!(hub.poll_timeout(), Some(t1 + Duration::from_millis(500)));

        // Nothing before the deadline, one event at it.
        hub.handle_timeout(t1 + Duration::from_millis(499));
        assert!(drain(&mut rx).is_empty());
        hub.handle_timeout(t1 + Duration::from_millis(500));
        assert_eq!(drain(&mut rx).len(), 1);

        hub.handle_command(
            t1,
            Command::Disconnect {
                client: ClientId(2),
            },
        );
        assert_eq!(
            drain(&mut rx)
                .iter()
                .map(status_clients)
                .collect::<Vec<_>>(),
            [Some(1)]
        );
    }

    #[test]
    fn slow_consumer_is_dropped_without_affecting_others() {
        let t0 = Instant::now();
        let mut hub = hub(t0);
        let slow = connect(&mut hub, t0, 1, 2);
        let mut fast = connect(&mut hub, t0, 2, 64);
        request(&mut hub, t0, 2, 1, Op::Watch { interval_ms: None });
        for i in 0..3 {
            request(
                &mut hub,
                t0,
                1,
                i,
                Op::Ping {
                    data: String::new(),
                },
            );
        }
        assert_eq!(hub.client_count(), 1);
        // The watcher saw the count drop to 1 once the slow client was gone.
        let counts: Vec<_> = drain(&mut fast).iter().filter_map(status_clients).collect();
        assert_eq!(counts.last(), Some(&1));
        request(&mut hub, t0, 2, 9, Op::Ping { data: "x".into() });
        assert!(matches!(
            drain(&mut fast)[..],
            [ServerMessage::Response(Response { id: 9, .. })]
        ));
        drop(slow);
    }

    #[test]
    fn shutdown_request_is_reported_once() {
        let t0 = Instant::now();
        let mut hub = hub(t0);
        let mut rx = connect(&mut hub, t0, 1, 4);
        request(&mut hub, t0, 1, 3, Op::Shutdown);
        assert!(hub.poll_shutdown_request());
        assert!(!hub.poll_shutdown_request());
        assert!(matches!(
            drain(&mut rx)[..],
            [ServerMessage::Response(Response {
                id: 3,
                reply: Reply::ShuttingDown
            })]
        ));
    }
}
