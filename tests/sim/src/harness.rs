//! The single-server harness of muxd-core's own tests: a pool wired to one
//! [`FakeServer`] without latency, virtual time, a seeded RNG.

#![allow(missing_docs)]

use std::collections::{BTreeMap, VecDeque};
use std::time::{Duration, Instant};

use muxd_core::{
    Action, Pool, PoolConfig, PoolError, PoolEvent, PoolReply, PoolRequest, RequestToken, ServerKey,
};
use rand_chacha::ChaCha20Rng;
use rand_chacha::rand_core::SeedableRng;

use crate::server::{FakeServer, HOST};

/// A pool, one fake server and the wiring between them, on a virtual clock; blocks move
/// without latency. [`crate::sim::Sim`] is the multi-server network with time on the wire.
#[derive(Debug)]
pub struct Net {
    pub now: Instant,
    pub rng: ChaCha20Rng,
    pub pool: Pool,
    pub server: FakeServer,
    links: BTreeMap<ServerKey, u64>,
    inbox: VecDeque<(ServerKey, Vec<u8>)>,
    pub replies: BTreeMap<RequestToken, Result<PoolReply, PoolError>>,
    /// Reply tokens in the order the replies came.
    pub reply_order: Vec<RequestToken>,
    pub events: Vec<PoolEvent>,
    pub connects: usize,
    pub disconnects: usize,
    /// When set, transport connects fail with this reason.
    pub refuse_connect: Option<String>,
    next_token: u64,
}

impl Net {
    pub fn new(max_version: u16, seed: u64) -> Self {
        Self::with_config(max_version, seed, PoolConfig::default())
    }

    pub fn with_config(max_version: u16, seed: u64, config: PoolConfig) -> Self {
        Self {
            now: Instant::now(),
            rng: ChaCha20Rng::seed_from_u64(seed),
            pool: Pool::new(config),
            server: FakeServer::new(max_version, seed),
            links: BTreeMap::new(),
            inbox: VecDeque::new(),
            replies: BTreeMap::new(),
            reply_order: Vec::new(),
            events: Vec::new(),
            connects: 0,
            disconnects: 0,
            refuse_connect: None,
            next_token: 1,
        }
    }

    /// Hands a request to the pool and runs until quiet; returns its token.
    pub fn request(&mut self, app: &str, request: PoolRequest) -> RequestToken {
        let token = self.submit(app, request);
        self.run();
        token
    }

    /// Hands a request to the pool without running.
    pub fn submit(&mut self, app: &str, request: PoolRequest) -> RequestToken {
        let token = RequestToken(self.next_token);
        self.next_token += 1;
        self.pool
            .handle_request(self.now, &mut self.rng, app, token, request);
        token
    }

    /// Carries out the pool's actions and delivers the server's blocks until nothing moves.
    pub fn run(&mut self) {
        loop {
            while let Some(action) = self.pool.poll_action() {
                self.act(action);
            }
            let Some((key, block)) = self.inbox.pop_front() else {
                break;
            };
            if self.links.contains_key(&key) {
                self.pool
                    .handle_block(self.now, &mut self.rng, &key, &block);
            }
        }
    }

    fn act(&mut self, action: Action) {
        match action {
            Action::Connect {
                server,
                key_hash,
                host,
                ..
            } => {
                assert_eq!(host, HOST);
                assert_eq!(key_hash, self.server.key_hash());
                self.connects += 1;
                if let Some(reason) = self.refuse_connect.clone() {
                    self.pool.handle_disconnected(self.now, &server, reason);
                    return;
                }
                let (conn, hello, info) = self.server.accept();
                self.links.insert(server.clone(), conn);
                self.pool
                    .handle_connected(self.now, &mut self.rng, &server, info);
                self.inbox.push_back((server, hello));
            }
            Action::Transmit { server, block } => {
                assert_eq!(block.len(), muxd_smp::block::BLOCK_SIZE);
                let Some(&conn) = self.links.get(&server) else {
                    return;
                };
                let out = self.server.handle_block(conn, &block);
                self.route(out);
            }
            Action::Disconnect { server } => {
                self.disconnects += 1;
                if let Some(conn) = self.links.remove(&server) {
                    self.server.close(conn);
                }
            }
            Action::Reply { token, result } => {
                assert!(
                    self.replies.insert(token, result).is_none(),
                    "second reply for {token:?}"
                );
                self.reply_order.push(token);
            }
            Action::Event(e) => self.events.push(e),
            other => panic!("unexpected action {other:?}"),
        }
    }

    /// Delivers server blocks (from a scripted server event) to the pool.
    pub fn route(&mut self, blocks: Vec<(u64, Vec<u8>)>) {
        for (conn, block) in blocks {
            if let Some((key, _)) = self.links.iter().find(|(_, c)| **c == conn) {
                self.inbox.push_back((key.clone(), block));
            }
        }
    }

    /// The transport of `key` broke.
    pub fn break_link(&mut self, reason: &str) {
        let links: Vec<(ServerKey, u64)> =
            self.links.iter().map(|(k, c)| (k.clone(), *c)).collect();
        for (key, conn) in links {
            self.links.remove(&key);
            self.server.close(conn);
            self.pool
                .handle_disconnected(self.now, &key, reason.to_owned());
        }
        self.inbox.clear();
        self.run();
    }

    /// Moves the clock forward, firing timers on the way.
    pub fn advance(&mut self, by: Duration) {
        let end = self.now + by;
        while let Some(t) = self.pool.poll_timeout().filter(|t| *t <= end) {
            self.now = self.now.max(t);
            self.pool.handle_timeout(self.now, &mut self.rng);
            self.run();
        }
        self.now = end;
        self.pool.handle_timeout(self.now, &mut self.rng);
        self.run();
    }

    /// The reply to `token`, which must have come.
    pub fn reply(&self, token: RequestToken) -> &Result<PoolReply, PoolError> {
        self.replies
            .get(&token)
            .unwrap_or_else(|| panic!("no reply for {token:?}"))
    }

    /// Creates a queue for `app` and returns (queue id, URI).
    pub fn create_queue(&mut self, app: &str) -> (String, String) {
        let server = self.server.address();
        let token = self.request(
            app,
            PoolRequest::CreateQueue {
                server,
                websocket: false,
            },
        );
        match self.reply(token) {
            Ok(PoolReply::QueueCreated(info)) => (info.queue_id.clone(), info.queue_uri.clone()),
            other => panic!("create queue: {other:?}"),
        }
    }

    pub fn send(&mut self, app: &str, uri: &str, body: &[u8]) -> RequestToken {
        self.request(
            app,
            PoolRequest::Send {
                queue_uri: uri.to_owned(),
                body: body.to_vec(),
                wait: true,
            },
        )
    }

    /// The raw recipient id of a queue id.
    pub fn rcv_id(queue_id: &str) -> Vec<u8> {
        muxd_smp::encoding::base64url_decode(queue_id).unwrap()
    }

    /// base64url, as queue ids are written.
    pub fn b64(bytes: &[u8]) -> String {
        muxd_smp::encoding::base64url_encode(bytes)
    }
}
