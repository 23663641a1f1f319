//! A simulated network of many [`FakeServer`]s around one [`Pool`], on a virtual clock.
//!
//! Blocks take `latency` each way; a transport takes two one-way trips to set up (TCP and
//! TLS). Links can be cut (both ends see a reset), blackholed (everything, connects included,
//! silently vanishes and nobody is told) and servers can be stopped (connects are refused).
//! Apps are simulated too: whatever arrives is read and acknowledged at once and recorded
//! per queue, so tests can check delivery and order. Everything is deterministic: the pool's
//! RNG is seeded and events at the same instant run in the order they were scheduled.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use muxd_core::{
    Action, Pool, PoolConfig, PoolError, PoolEvent, PoolReply, PoolRequest, RequestToken, ServerKey,
};
use rand_chacha::ChaCha20Rng;
use rand_chacha::rand_core::SeedableRng;

use crate::server::FakeServer;

/// One server of the simulation and the state of the path to it.
#[derive(Debug)]
pub struct SimServer {
    /// The scripted server.
    pub fake: FakeServer,
    /// The relay is stopped: connection attempts are refused.
    pub down: bool,
    /// The path is blackholed: blocks and connection attempts vanish without a trace.
    pub blackholed: bool,
    /// One-way latency of the path.
    pub latency: Duration,
    /// When the server took in each entry of `fake.seen` (its arrival, or later when
    /// `processing` delays it).
    pub seen_at: Vec<Instant>,
    /// How long the server takes to answer each block it is sent (a slow or overloaded
    /// relay). Blocks are still processed in arrival order, as the server's per-client
    /// thread does, each `processing` after it arrived; messages to the client's
    /// subscriptions ([`Sim::inject`]) go out meanwhile.
    pub processing: Duration,
    /// When the last block sent to the server will have been processed.
    busy_until: Option<Instant>,
}

/// A transport the pool holds.
#[derive(Debug, Clone)]
struct Link {
    server: usize,
    conn: u64,
}

#[derive(Debug)]
enum Packet {
    /// The transport setup of connection attempt `attempt` finished.
    ConnectDone {
        key: ServerKey,
        server: usize,
        attempt: u64,
    },
    ToServer {
        server: usize,
        conn: u64,
        block: Vec<u8>,
    },
    /// A block that reached a slow server is processed now.
    Processed {
        server: usize,
        conn: u64,
        block: Vec<u8>,
    },
    ToPool {
        server: usize,
        conn: u64,
        block: Vec<u8>,
    },
}

/// The simulation: a pool, its servers, the network between them and the apps on top.
#[derive(Debug)]
pub struct Sim {
    /// The virtual clock.
    pub now: Instant,
    /// When the simulation started.
    pub start: Instant,
    /// The pool's RNG (seeded).
    pub rng: ChaCha20Rng,
    /// The pool under test.
    pub pool: Pool,
    /// The servers, by index.
    pub servers: Vec<SimServer>,
    /// Every `Action::Connect`: when and for which server.
    pub connects: Vec<(Instant, ServerKey)>,
    /// Every `Action::Disconnect` the pool asked for.
    pub disconnects: Vec<(Instant, ServerKey)>,
    /// Replies by token, with the time they came.
    pub replies: BTreeMap<RequestToken, (Instant, Result<PoolReply, PoolError>)>,
    /// Every event, with the time it came.
    pub events: Vec<(Instant, PoolEvent)>,
    /// What the apps read, per queue id, in the order they read it.
    pub received: BTreeMap<String, Vec<Vec<u8>>>,
    /// Every `Transmit`, with the time and server.
    pub transmits: Vec<(Instant, ServerKey)>,
    queue: BTreeMap<(Instant, u64), Packet>,
    seq: u64,
    links: BTreeMap<ServerKey, Link>,
    attempts: BTreeMap<ServerKey, u64>,
    /// Connections that lost a block to a blackhole. A byte stream cannot skip a block (and
    /// the block cipher chain would not let it), so such a connection stays silent for good,
    /// as a TCP connection whose peer vanished does.
    stuck: std::collections::BTreeSet<(usize, u64)>,
    next_token: u64,
}

impl Sim {
    /// An empty network around a pool with `config`, seeded with `seed`.
    pub fn new(seed: u64, config: PoolConfig) -> Self {
        // The only clock read of the simulation: an arbitrary origin for virtual time.
        let start = Instant::now();
        Self {
            now: start,
            start,
            rng: ChaCha20Rng::seed_from_u64(seed),
            pool: Pool::new(config),
            servers: Vec::new(),
            connects: Vec::new(),
            disconnects: Vec::new(),
            replies: BTreeMap::new(),
            events: Vec::new(),
            received: BTreeMap::new(),
            transmits: Vec::new(),
            queue: BTreeMap::new(),
            seq: 0,
            links: BTreeMap::new(),
            attempts: BTreeMap::new(),
            stuck: std::collections::BTreeSet::new(),
            next_token: 1,
        }
    }

    /// Adds a server (`relay<N>.test`) offering versions up to `max_version`; returns its
    /// index.
    pub fn add_server(&mut self, max_version: u16, latency: Duration) -> usize {
        let idx = self.servers.len();
        let mut fake = FakeServer::new(max_version, 1000 + idx as u64);
        fake.host = format!("relay{idx}.test");
        self.servers.push(SimServer {
            fake,
            down: false,
            blackholed: false,
            latency,
            seen_at: Vec::new(),
            processing: Duration::ZERO,
            busy_until: None,
        });
        idx
    }

    /// Virtual time since the start.
    pub fn elapsed(&self) -> Duration {
        self.now - self.start
    }

    /// Hands a request to the pool; returns its token.
    pub fn submit(&mut self, app: &str, request: PoolRequest) -> RequestToken {
        let token = RequestToken(self.next_token);
        self.next_token += 1;
        self.pool
            .handle_request(self.now, &mut self.rng, app, token, request);
        self.drain();
        token
    }

    /// Runs until `token` is answered (at most `limit` of virtual time).
    pub fn wait_reply(
        &mut self,
        token: RequestToken,
        limit: Duration,
    ) -> Result<PoolReply, PoolError> {
        let end = self.now + limit;
        while !self.replies.contains_key(&token) {
            assert!(self.step(end), "no reply for {token:?} within {limit:?}");
        }
        self.replies[&token].1.clone()
    }

    /// Creates a queue for `app` on server `idx` and waits for it: (queue id, URI).
    pub fn create_queue(&mut self, app: &str, idx: usize) -> (String, String) {
        let server = self.servers[idx].fake.address();
        let token = self.submit(
            app,
            PoolRequest::CreateQueue {
                server,
                websocket: false,
            },
        );
        match self.wait_reply(token, Duration::from_secs(300)) {
            Ok(PoolReply::QueueCreated(info)) => (info.queue_id, info.queue_uri),
            other => panic!("create queue: {other:?}"),
        }
    }

    /// Asks the pool to send `body` to `uri`; returns the token.
    pub fn send(&mut self, app: &str, uri: &str, body: &[u8]) -> RequestToken {
        self.submit(
            app,
            PoolRequest::Send {
                queue_uri: uri.to_owned(),
                body: body.to_vec(),
                wait: true,
            },
        )
    }

    /// The pool's key for server `idx` over TLS (as the pool normalises it).
    pub fn key(&self, idx: usize) -> ServerKey {
        let host = &self.servers[idx].fake.host;
        self.pool
            .status()
            .into_iter()
            .map(|s| s.server)
            .find(|k| k.address().contains(&format!("@{host}:")))
            .unwrap_or_else(|| panic!("the pool does not know server {idx}"))
    }

    /// Connection attempts to server `idx`, in order.
    pub fn connect_times(&self, idx: usize) -> Vec<Instant> {
        let host = format!("@{}:", self.servers[idx].fake.host);
        self.connects
            .iter()
            .filter(|(_, k)| k.address().contains(&host))
            .map(|(t, _)| *t)
            .collect()
    }

    /// Whether the pool currently holds a transport to server `idx`.
    pub fn linked(&self, idx: usize) -> bool {
        self.links.values().any(|l| l.server == idx)
    }

    /// Cuts every transport to server `idx`: both ends see a reset, blocks on the wire are
    /// lost.
    pub fn cut(&mut self, idx: usize, reason: &str) {
        let keys: Vec<ServerKey> = self
            .links
            .iter()
            .filter(|(_, l)| l.server == idx)
            .map(|(k, _)| k.clone())
            .collect();
        for key in keys {
            if let Some(link) = self.links.remove(&key) {
                self.servers[idx].fake.close(link.conn);
            }
            self.pool
                .handle_disconnected(self.now, &key, reason.to_owned());
            self.drain();
        }
    }

    /// Starts or ends a blackhole on the path to server `idx`. Nobody is told.
    pub fn set_blackhole(&mut self, idx: usize, on: bool) {
        self.servers[idx].blackholed = on;
    }

    /// Stops or starts relay `idx`. Stopping cuts its connections.
    pub fn set_down(&mut self, idx: usize, down: bool) {
        self.servers[idx].down = down;
        if down {
            self.cut(idx, "connection reset by peer");
        }
    }

    /// Another client's SEND lands in queue `rcv_id` of server `idx` (see
    /// [`FakeServer::inject`]); the MSG travels to the pool with the path's latency.
    pub fn inject(&mut self, idx: usize, rcv_id: &[u8], body: Vec<u8>) {
        let out = self.servers[idx].fake.inject(rcv_id, body);
        let at = self.now + self.servers[idx].latency;
        for (conn, block) in out {
            self.schedule(
                at,
                Packet::ToPool {
                    server: idx,
                    conn,
                    block,
                },
            );
        }
    }

    /// Runs for `d` of virtual time.
    pub fn run_for(&mut self, d: Duration) {
        let end = self.now + d;
        self.run_until(end);
    }

    /// Runs until virtual time `end`.
    pub fn run_until(&mut self, end: Instant) {
        while self.step(end) {}
        self.now = self.now.max(end);
    }

    /// Runs until `done` holds (checked after every event), at most until `limit` passed.
    /// Returns whether it held.
    pub fn run_while(&mut self, limit: Duration, mut done: impl FnMut(&Self) -> bool) -> bool {
        let end = self.now + limit;
        loop {
            if done(self) {
                return true;
            }
            if !self.step(end) {
                self.now = self.now.max(end);
                return done(self);
            }
        }
    }

    /// Handles the next event (a packet or the pool's timer) due by `end`; `false` when
    /// there is none.
    pub fn step(&mut self, end: Instant) -> bool {
        self.drain();
        let packet = self.queue.keys().next().map(|(t, _)| *t);
        let timer = self.pool.poll_timeout();
        let next = match (packet, timer) {
            (Some(p), Some(t)) => p.min(t),
            (p, t) => match p.or(t) {
                Some(n) => n,
                None => return false,
            },
        };
        if next > end {
            return false;
        }
        self.now = self.now.max(next);
        if packet.is_some_and(|p| p <= next)
            && let Some((_, packet)) = self.queue.pop_first()
        {
            self.deliver(packet);
        } else {
            self.pool.handle_timeout(self.now, &mut self.rng);
        }
        self.drain();
        true
    }

    fn schedule(&mut self, at: Instant, packet: Packet) {
        self.seq += 1;
        self.queue.insert((at, self.seq), packet);
    }

    fn deliver(&mut self, packet: Packet) {
        match packet {
            Packet::ConnectDone {
                key,
                server,
                attempt,
            } => {
                if self.attempts.get(&key) != Some(&attempt) || self.servers[server].blackholed {
                    return;
                }
                if self.servers[server].down {
                    self.pool
                        .handle_disconnected(self.now, &key, "connection refused".to_owned());
                    return;
                }
                let (conn, hello, info) = self.servers[server].fake.accept();
                self.links.insert(key.clone(), Link { server, conn });
                self.pool
                    .handle_connected(self.now, &mut self.rng, &key, info);
                let at = self.now + self.servers[server].latency;
                self.schedule(
                    at,
                    Packet::ToPool {
                        server,
                        conn,
                        block: hello,
                    },
                );
            }
            Packet::ToServer {
                server,
                conn,
                block,
            } => {
                let s = &mut self.servers[server];
                if s.blackholed {
                    self.stuck.insert((server, conn));
                }
                if self.stuck.contains(&(server, conn)) || !s.fake.is_open(conn) {
                    return;
                }
                if !s.processing.is_zero() || s.busy_until.is_some_and(|t| t > self.now) {
                    // Never before a block that came earlier: the cipher chain is ordered.
                    let at = (self.now + s.processing).max(s.busy_until.unwrap_or(self.now));
                    s.busy_until = Some(at);
                    self.schedule(
                        at,
                        Packet::Processed {
                            server,
                            conn,
                            block,
                        },
                    );
                    return;
                }
                self.process(server, conn, &block);
            }
            Packet::Processed {
                server,
                conn,
                block,
            } => {
                if self.servers[server].fake.is_open(conn) {
                    self.process(server, conn, &block);
                }
            }
            Packet::ToPool {
                server,
                conn,
                block,
            } => {
                if self.servers[server].blackholed {
                    self.stuck.insert((server, conn));
                }
                if self.stuck.contains(&(server, conn)) {
                    return;
                }
                let key = self
                    .links
                    .iter()
                    .find(|(_, l)| l.server == server && l.conn == conn)
                    .map(|(k, _)| k.clone());
                if let Some(key) = key {
                    self.pool
                        .handle_block(self.now, &mut self.rng, &key, &block);
                }
            }
        }
    }

    /// Server `server` processes one block of connection `conn`; its answers leave now.
    fn process(&mut self, server: usize, conn: u64, block: &[u8]) {
        let s = &mut self.servers[server];
        let out = s.fake.handle_block(conn, block);
        let arrived = s.fake.seen.len() - s.seen_at.len();
        s.seen_at.extend(std::iter::repeat_n(self.now, arrived));
        let at = self.now + s.latency;
        for (conn, block) in out {
            self.schedule(
                at,
                Packet::ToPool {
                    server,
                    conn,
                    block,
                },
            );
        }
    }

    /// Carries out the pool's actions; apps read and acknowledge what arrived. Call it after
    /// calling the pool directly (`reconnect`, `handle_network_change`).
    pub fn drain(&mut self) {
        while let Some(action) = self.pool.poll_action() {
            match action {
                Action::Connect {
                    server: key, host, ..
                } => {
                    self.connects.push((self.now, key.clone()));
                    let idx = self
                        .servers
                        .iter()
                        .position(|s| s.fake.host == host)
                        .unwrap_or_else(|| panic!("connect to unknown host {host}"));
                    let attempt = self.attempts.entry(key.clone()).or_default();
                    *attempt += 1;
                    let attempt = *attempt;
                    // TCP and TLS: about two one-way trips.
                    let at = self.now + self.servers[idx].latency * 2;
                    self.schedule(
                        at,
                        Packet::ConnectDone {
                            key,
                            server: idx,
                            attempt,
                        },
                    );
                }
                Action::Transmit { server: key, block } => {
                    assert_eq!(block.len(), muxd_smp::block::BLOCK_SIZE);
                    self.transmits.push((self.now, key.clone()));
                    let Some(link) = self.links.get(&key).cloned() else {
                        continue;
                    };
                    let at = self.now + self.servers[link.server].latency;
                    self.schedule(
                        at,
                        Packet::ToServer {
                            server: link.server,
                            conn: link.conn,
                            block,
                        },
                    );
                }
                Action::Disconnect { server: key } => {
                    self.disconnects.push((self.now, key.clone()));
                    // A pending transport setup is abandoned too.
                    *self.attempts.entry(key.clone()).or_default() += 1;
                    if let Some(link) = self.links.remove(&key) {
                        self.servers[link.server].fake.close(link.conn);
                    }
                }
                Action::Reply { token, result } => {
                    let old = self.replies.insert(token, (self.now, result));
                    assert!(old.is_none(), "second reply for {token:?}");
                }
                Action::Event(event) => {
                    if let PoolEvent::MessageArrived { app, queue_id } = &event {
                        self.read(app, queue_id);
                    }
                    self.events.push((self.now, event));
                }
                other => panic!("unexpected action {other:?}"),
            }
        }
    }

    /// The app reads everything waiting in the queue and acknowledges it.
    fn read(&mut self, app: &str, queue_id: &str) {
        let msgs = self.pool.messages(app, queue_id, None).unwrap();
        for m in msgs {
            self.pool.ack(app, queue_id, &m.msg_id).unwrap();
            self.received
                .entry(queue_id.to_owned())
                .or_default()
                .push(m.body);
        }
    }
}
