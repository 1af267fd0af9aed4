//! The event loop: the one task that owns the `Swarm`.
//!
//! Membership: the first thing on a new connection is a `Hello` each way, carrying each side's
//! membership proof. A node in a fleet serves nothing else to a peer (no sync answer, no chunk,
//! no gossip is taken from it) until the peer's proof checks out, and disconnects a peer whose
//! proof does not, however it was found (mDNS, the DHT, `--peer`); it does not dial that peer
//! again for a while. When the access state changes (a policy arrives, the node joins a fleet)
//! every connected peer is checked again, so a revoked member is cut off at once.
//!
//! Healing: bootstrap peers and the peers of the last run are dialled at start, and bootstrap
//! peers again with backoff while the node is not connected to them ([`redial`](super::redial));
//! the peers seen are written to the data directory now and then and at the end
//! ([`peer_store`](super::peer_store)); a node alone for a while says so at warn.
//!
//! Gossip is validated before gossipsub forwards it (see `on_gossip`).
//!
//! It serves [`Command`]s from the handles, reacts to swarm events (connections, identify,
//! mDNS, gossip, sync requests, DHT results) and runs the periodic work (Kademlia refresh, a
//! record sync with a random peer). Work that may wait (answering a sync request, ingesting a
//! gossiped record, anti-entropy, closing a replaced QUIC connection after its grace period)
//! runs in tasks the loop owns in a `JoinSet`: they end when the loop ends, and they talk back
//! through the loop's own command channel, never through a handle, so the loop stops once the
//! last handle is dropped.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use libp2p::core::transport::ListenerId;
use libp2p::request_response::{self, OutboundRequestId, ResponseChannel};
use libp2p::swarm::SwarmEvent;
use libp2p::swarm::dial_opts::{DialOpts, PeerCondition};
use libp2p::{PeerId, Swarm, gossipsub, identify, mdns};
use libp2p::{kad, ping};
use shoal_protocol::codec;
use shoal_protocol::message::{Gossip, SyncRequest, SyncResponse, TAGS_TOPIC};
use tokio::sync::{Semaphore, mpsc, oneshot};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use super::behaviour::{Behaviour, BehaviourEvent, site_of};
use super::handle::{Command, Shared, sync_request};
use super::peer_store::PeerStore;
use super::redial::Redial;
use super::{NetError, PeerInfo, links, sync};
use crate::auth::{Auth, ingest};
use crate::store::Store;
use crate::tags::Tags;

/// Capacity of the channel on which the loop's own tasks talk back to it.
const INTERNAL_CAPACITY: usize = 256;
/// Most inbound requests and gossip messages processed at once; past that, gossip is dropped
/// (anti-entropy repairs it) and sync requests are answered with an error.
const MAX_INBOUND_WORK: usize = 64;
/// Most `HaveWait` long polls parked at once (a few per downloading peer and blob). Past that a
/// long poll is answered at once, like a plain `Have`.
const MAX_HAVE_WAITS: usize = 1024;
/// Most anti-entropy exchanges at once.
const MAX_CONCURRENT_SYNCS: usize = 8;
/// How long a QUIC connection that TCP replaces stays open. Closed at once, it loses what
/// gossipsub had queued on it, such as the subscriptions exchanged on a new connection (a peer
/// that missed them never forwards this node a record).
const QUIC_CLOSE_GRACE: Duration = Duration::from_secs(2);
/// How often Kademlia refreshes its routing table.
const KAD_BOOTSTRAP_INTERVAL: Duration = Duration::from_secs(300);
/// How long a new peer has to prove membership.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a peer that failed to prove membership is not dialled again (mDNS keeps reporting
/// it, and a neighbour in another fleet should not cost a handshake every few seconds).
const REFUSED_FOR: Duration = Duration::from_secs(600);
/// How long a peer's clock offset counts toward the fleet's time after it was measured (each
/// periodic sync measures one peer's again).
const CLOCK_OFFSET_TTL: Duration = Duration::from_secs(3600);
/// Most peers' clock offsets kept; past it the oldest measurement goes.
const MAX_CLOCK_OFFSETS: usize = 256;
/// Most refused peers remembered.
const MAX_REFUSED: usize = 4096;
/// How long a node with peers to dial may stay alone before it says so at warn.
const NO_PEERS_WARN_AFTER: Duration = Duration::from_secs(30);
/// How often it says so again while it stays alone.
const NO_PEERS_WARN_EVERY: Duration = Duration::from_secs(300);
/// How often the list of known peers is written to disk when it changed.
const PEER_STORE_SAVE_INTERVAL: Duration = Duration::from_secs(30);
/// How often ended bans are lifted (a ban lasts at least ten minutes; this is its granularity).
const BAN_CHECK_INTERVAL: Duration = Duration::from_secs(30);
/// Pings in a row a connection may fail before it is closed (a ping every
/// [`super::behaviour::PING_INTERVAL`], each given as long to come back).
const PING_FAILURES_TO_CLOSE: u8 = 2;

/// What the event loop is started with besides its swarm and its handles.
pub(super) struct LoopSettings {
    /// See [`NetConfig::sync_interval`](super::NetConfig::sync_interval).
    pub sync_interval: Duration,
    /// The bootstrap and remembered peers to dial.
    pub redial: Redial,
    /// The peers of the last run, and where to keep them.
    pub known: PeerStore,
    pub peers_path: PathBuf,
}

/// The task that owns the swarm.
pub(super) struct EventLoop {
    swarm: Swarm<Behaviour>,
    /// Commands from the handles; closed when the last handle is dropped.
    commands: mpsc::Receiver<Command>,
    /// The loop's own tasks send their commands here (answers, anti-entropy requests, delayed
    /// closes), so that they hold no handle that would keep `commands` open.
    internal: mpsc::Sender<Command>,
    internal_inbox: mpsc::Receiver<Command>,
    /// The tasks the loop started; aborted when it stops.
    tasks: JoinSet<()>,
    pending_syncs: HashMap<OutboundRequestId, oneshot::Sender<Result<SyncResponse, NetError>>>,
    pending_providers: HashMap<kad::QueryId, (HashSet<PeerId>, oneshot::Sender<Vec<PeerId>>)>,
    shared: Arc<Shared>,
    auth: Auth,
    /// Peers with a `Hello` exchange under way.
    hellos: HashSet<PeerId>,
    /// Peers that failed to prove membership, and when.
    refused: HashMap<PeerId, std::time::Instant>,
    /// The offset of each peer's clock from this node's, in milliseconds, and when it was
    /// measured. Kept after the peer leaves (a node whose peers go keeps the fleet's time it
    /// knew), for [`CLOCK_OFFSET_TTL`].
    clock_offsets: HashMap<PeerId, (i64, Instant)>,
    store: Store,
    tags: Tags,
    inbound: Arc<Semaphore>,
    have_waits: Arc<Semaphore>,
    syncs: Arc<Semaphore>,
    /// Warnings about peers whose syncs broke the rules, rate-limited.
    sync_warnings: Arc<sync::Warnings>,
    links: links::Links,
    /// While starting: the listeners yet to report an address, and whom to tell when none is.
    starting: Option<(HashSet<ListenerId>, oneshot::Sender<()>)>,
    sync_interval: Duration,
    /// Bootstrap and remembered peers to dial again while they cannot be reached.
    redial: Redial,
    /// The peers seen in this run (and the last), written to `peers_path` now and then.
    known: PeerStore,
    peers_path: PathBuf,
    /// Since when the node has had no peer, and when it last said so.
    alone_since: Option<Instant>,
    warned_alone: Option<Instant>,
    /// Pings in a row each connection failed; at [`PING_FAILURES_TO_CLOSE`] it is closed.
    ping_failures: HashMap<libp2p::swarm::ConnectionId, u8>,
}

impl EventLoop {
    /// A loop over `swarm`, serving the commands that arrive on `commands`. With listeners to
    /// wait for, also returns a receiver that is told once each has reported an address.
    pub fn new(
        swarm: Swarm<Behaviour>,
        commands: mpsc::Receiver<Command>,
        shared: Arc<Shared>,
        store: Store,
        tags: Tags,
        listeners: HashSet<ListenerId>,
        settings: LoopSettings,
    ) -> (EventLoop, Option<oneshot::Receiver<()>>) {
        let LoopSettings {
            sync_interval,
            redial,
            known,
            peers_path,
        } = settings;
        let (internal, internal_inbox) = mpsc::channel(INTERNAL_CAPACITY);
        let (starting, ready) = if listeners.is_empty() {
            (None, None)
        } else {
            let (tx, rx) = oneshot::channel();
            (Some((listeners, tx)), Some(rx))
        };
        let auth = shared.auth.clone();
        let event_loop = EventLoop {
            swarm,
            commands,
            internal,
            internal_inbox,
            tasks: JoinSet::new(),
            pending_syncs: HashMap::new(),
            pending_providers: HashMap::new(),
            shared,
            auth,
            hellos: HashSet::new(),
            refused: HashMap::new(),
            clock_offsets: HashMap::new(),
            ping_failures: HashMap::new(),
            store,
            tags,
            inbound: Arc::new(Semaphore::new(MAX_INBOUND_WORK)),
            have_waits: Arc::new(Semaphore::new(MAX_HAVE_WAITS)),
            syncs: Arc::new(Semaphore::new(MAX_CONCURRENT_SYNCS)),
            sync_warnings: Arc::default(),
            links: links::Links::default(),
            starting,
            sync_interval,
            redial,
            known,
            peers_path,
            alone_since: None,
            warned_alone: None,
        };
        (event_loop, ready)
    }

    /// Runs until `cancel` fires or the last handle is dropped; then aborts the loop's tasks and
    /// waits for them, so nothing it started outlives it.
    pub async fn run(mut self, cancel: CancellationToken) {
        let mut bootstrap = tokio::time::interval(KAD_BOOTSTRAP_INTERVAL);
        let every = self.sync_interval.max(Duration::from_millis(100));
        let mut sync = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
        sync.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut access = self.auth.changes();
        let mut expire_bans = tokio::time::interval(BAN_CHECK_INTERVAL);
        let mut redial = tokio::time::interval(self.redial.min().min(Duration::from_secs(1)));
        redial.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut save_peers = tokio::time::interval(PEER_STORE_SAVE_INTERVAL);
        let shared = self.shared.clone();
        loop {
            tokio::select! {
                () = cancel.cancelled() => break,
                event = self.swarm.select_next_some() => self.on_swarm_event(event),
                command = self.commands.recv() => match command {
                    Some(c) => self.on_command(c),
                    None => break,
                },
                Some(command) = self.internal_inbox.recv() => self.on_command(command),
                Some(done) = self.tasks.join_next(), if !self.tasks.is_empty() => {
                    if let Err(e) = done
                        && e.is_panic()
                    {
                        tracing::error!(error = &e as &dyn std::error::Error, "a network task panicked");
                    }
                }
                _ = bootstrap.tick() => {
                    // Fails only when the routing table is empty, which is fine.
                    let _ = self.swarm.behaviour_mut().kad.bootstrap();
                }
                _ = sync.tick() => self.sync_with_a_random_peer(),
                Ok(()) = access.changed() => self.check_peers_again(),
                () = shared.conduct.banned_some() => self.cut_off_banned(),
                _ = expire_bans.tick() => self.lift_ended_bans(),
                _ = redial.tick() => self.redial_and_check_alone(),
                _ = save_peers.tick() => {
                    if let Some(save) = self.save_peers() {
                        self.tasks.spawn(save);
                    }
                }
            }
        }
        self.tasks.shutdown().await;
        if let Some(save) = self.save_peers() {
            save.await;
        }
        tracing::debug!("network event loop stopped");
    }

    fn on_command(&mut self, command: Command) {
        let b = self.swarm.behaviour_mut();
        match command {
            Command::Publish(bytes) => {
                if let Err(e) = b
                    .gossipsub
                    .publish(gossipsub::IdentTopic::new(TAGS_TOPIC), bytes)
                {
                    // No subscribed peer yet, or a duplicate: anti-entropy delivers it later.
                    tracing::debug!(error = &e as &dyn std::error::Error, "gossip publish");
                }
            }
            Command::Provide(digest, keys) => {
                for key in keys {
                    if let Err(e) = b.kad.start_providing(key.record_key(&digest)) {
                        tracing::warn!(error = &e as &dyn std::error::Error, %digest, "cannot announce a blob on the DHT");
                    }
                }
            }
            Command::FindProviders(digest, holding, reply) => {
                let id = b.kad.get_providers(holding.record_key(&digest));
                self.pending_providers.insert(id, (HashSet::new(), reply));
            }
            Command::Sync(peer, request, reply) => {
                let id = b.sync.send_request(&peer, request);
                self.pending_syncs.insert(id, reply);
            }
            Command::Respond(channel, response) => {
                // Fails when the requester went away; nothing to do then.
                let _ = b.sync.send_response(channel, response);
            }
            Command::Peers(reply) => {
                let mut peers: HashMap<PeerId, Vec<String>> = HashMap::new();
                for peer in self.swarm.connected_peers() {
                    peers.entry(*peer).or_default();
                }
                let _ = reply.send(
                    peers
                        .into_keys()
                        .map(|p| PeerInfo {
                            peer_id: p,
                            addresses: self.addresses_of(&p),
                            connections: self.links.connections(&p),
                        })
                        .collect(),
                );
            }
            Command::ListenAddrs(reply) => {
                let _ = reply.send(self.swarm.listeners().cloned().collect());
            }
            Command::Dial(addr) => {
                if let Err(e) = self.swarm.dial(addr.clone()) {
                    tracing::warn!(%addr, error = &e as &dyn std::error::Error, "dial failed");
                }
            }
            Command::Disconnect(peer) => {
                let _ = self.swarm.disconnect_peer_id(peer);
            }
            Command::PushPrivate(record) => {
                let repo = match record.verify() {
                    Ok(v) => v.record().repo.clone(),
                    Err(_) => return,
                };
                let readers: Vec<PeerId> = self
                    .swarm
                    .connected_peers()
                    .filter(|p| {
                        super::publisher_of(p).is_some_and(|k| self.auth.peer_may_read(&k, &repo))
                    })
                    .copied()
                    .collect();
                for peer in readers {
                    // The answer is only an acknowledgement; it is dropped unread.
                    let _ = self
                        .swarm
                        .behaviour_mut()
                        .sync
                        .send_request(&peer, SyncRequest::Push(record.clone()));
                }
            }
            Command::Admitted(peer) => {
                self.hellos.remove(&peer);
                // Back to a neutral score: gossip flows both ways.
                self.swarm
                    .behaviour_mut()
                    .gossipsub
                    .set_application_score(&peer, 0.0);
                if self.swarm.is_connected(&peer) {
                    self.spawn_clock_probe(peer);
                    self.spawn_anti_entropy(peer);
                }
            }
            Command::ClockOffset(peer, offset) => {
                let now = Instant::now();
                self.clock_offsets
                    .retain(|_, (_, at)| now.duration_since(*at) < CLOCK_OFFSET_TTL);
                if self.clock_offsets.len() >= MAX_CLOCK_OFFSETS
                    && !self.clock_offsets.contains_key(&peer)
                    && let Some(oldest) = self
                        .clock_offsets
                        .iter()
                        .min_by_key(|(_, (_, at))| *at)
                        .map(|(p, _)| *p)
                {
                    self.clock_offsets.remove(&oldest);
                }
                self.clock_offsets.insert(peer, (offset, now));
                self.correct_clock();
            }
            Command::Refuse(peer) => {
                self.hellos.remove(&peer);
                let admitted = super::publisher_of(&peer).is_some_and(|k| self.auth.admits(&k));
                if self.auth.in_fleet() && !admitted {
                    tracing::info!(%peer, "disconnecting a peer that is not a member of the fleet");
                    if self.refused.len() >= MAX_REFUSED {
                        self.refused.retain(|_, at| at.elapsed() < REFUSED_FOR);
                    }
                    self.refused.insert(peer, std::time::Instant::now());
                    // A configured peer stays a target: it is skipped while refused, and tried
                    // again afterwards (the fleet's policies may have reached this node by then).
                    self.known.forget(&peer);
                    self.swarm.behaviour_mut().kad.remove_peer(&peer);
                    let _ = self.swarm.disconnect_peer_id(peer);
                }
            }
            Command::CloseQuic(peer, id) => {
                // The TCP connection may have gone in the meantime: then QUIC stays.
                if self.links.has_tcp(&peer) && self.swarm.close_connection(id) {
                    tracing::debug!(%peer, "closed a QUIC connection: TCP is kept");
                    // A record gossiped over the closed connection as it closed is lost; a
                    // sync catches up on it.
                    self.spawn_anti_entropy(peer);
                }
            }
        }
    }

    fn addresses_of(&mut self, peer: &PeerId) -> Vec<String> {
        self.swarm
            .behaviour_mut()
            .kad
            .kbuckets()
            .flat_map(|b| {
                b.iter()
                    .filter(|e| e.node.key.preimage() == peer)
                    .flat_map(|e| e.node.value.iter().map(ToString::to_string))
                    .collect::<Vec<_>>()
            })
            .collect()
    }

    fn on_swarm_event(&mut self, event: SwarmEvent<BehaviourEvent>) {
        match event {
            SwarmEvent::NewListenAddr {
                address,
                listener_id,
            } => {
                tracing::info!(%address, "p2p listening");
                self.listener_settled(listener_id);
            }
            SwarmEvent::ListenerClosed {
                listener_id,
                reason,
                ..
            } => {
                tracing::warn!(?reason, "p2p listener closed");
                self.listener_settled(listener_id);
            }
            SwarmEvent::ConnectionEstablished {
                peer_id,
                connection_id,
                endpoint,
                num_established,
                ..
            } => {
                let addr = endpoint.get_remote_address().clone();
                tracing::info!(peer = %peer_id, %addr, "peer connected");
                self.redial.connected(peer_id, &addr, Instant::now());
                if endpoint.is_dialer() {
                    self.known.seen(peer_id, [addr.clone()]);
                }
                let close =
                    self.links
                        .established(peer_id, connection_id, &addr, endpoint.is_dialer());
                if endpoint.is_dialer() {
                    self.swarm.behaviour_mut().kad.add_address(&peer_id, addr);
                }
                for id in close {
                    let internal = self.internal.clone();
                    self.tasks.spawn(async move {
                        tokio::time::sleep(QUIC_CLOSE_GRACE).await;
                        let _ = internal.send(Command::CloseQuic(peer_id, id)).await;
                    });
                }
                if num_established.get() == 1 {
                    self.hold_gossip_until_admitted(peer_id);
                    self.spawn_hello(peer_id);
                }
            }
            SwarmEvent::ConnectionClosed {
                peer_id,
                connection_id,
                num_established,
                ..
            } => {
                self.links.closed(&peer_id, connection_id);
                self.ping_failures.remove(&connection_id);
                if num_established > 0 {
                    return;
                }
                tracing::info!(peer = %peer_id, "peer disconnected");
                self.shared.peer_sites().remove(&peer_id);
            }
            SwarmEvent::Behaviour(event) => self.on_behaviour_event(event),
            _ => {}
        }
    }

    fn on_behaviour_event(&mut self, event: BehaviourEvent) {
        match event {
            BehaviourEvent::Ping(ping::Event {
                peer,
                connection,
                result,
            }) => {
                // A connection whose pings go unanswered is dead (a partition, a peer's host
                // gone): close it, so that the peer is redialled and anti-entropy runs when it
                // comes back, instead of waiting for the transport to notice.
                if result.is_ok() {
                    self.ping_failures.remove(&connection);
                    return;
                }
                let failures = self.ping_failures.entry(connection).or_insert(0);
                *failures += 1;
                if *failures >= PING_FAILURES_TO_CLOSE {
                    tracing::info!(%peer, "closing a connection whose pings go unanswered");
                    self.ping_failures.remove(&connection);
                    self.swarm.close_connection(connection);
                }
            }
            BehaviourEvent::Identify(identify::Event::Received { peer_id, info, .. }) => {
                if let Some(site) = site_of(&info.agent_version) {
                    self.shared.peer_sites().insert(peer_id, site.to_owned());
                }
                let tcp = self.links.tcp_to_dial(peer_id, &info.listen_addrs);
                if !tcp.is_empty() {
                    tracing::debug!(peer = %peer_id, addrs = ?tcp, "dialling over TCP, not QUIC");
                    let opts = DialOpts::peer_id(peer_id)
                        .condition(PeerCondition::NotDialing)
                        .addresses(tcp)
                        .build();
                    if let Err(e) = self.swarm.dial(opts) {
                        tracing::debug!(peer = %peer_id, error = &e as &dyn std::error::Error, "dialling over TCP");
                    }
                }
                self.known.seen(peer_id, info.listen_addrs.iter().cloned());
                for addr in info.listen_addrs {
                    self.swarm.behaviour_mut().kad.add_address(&peer_id, addr);
                }
            }
            BehaviourEvent::Mdns(mdns::Event::Discovered(found)) => {
                for (peer, addr) in found {
                    let refused = self
                        .refused
                        .get(&peer)
                        .is_some_and(|at| at.elapsed() < REFUSED_FOR);
                    let banned = self.shared.conduct.is_banned(&peer);
                    if !self.swarm.is_connected(&peer) && !refused && !banned {
                        self.swarm
                            .behaviour_mut()
                            .kad
                            .add_address(&peer, addr.clone());
                        if let Err(e) = self.swarm.dial(addr) {
                            tracing::debug!(%peer, error = &e as &dyn std::error::Error, "dialing an mDNS peer");
                        }
                    }
                }
            }
            BehaviourEvent::Gossipsub(gossipsub::Event::Message {
                propagation_source,
                message_id,
                message,
            }) => {
                self.on_gossip(propagation_source, message_id, message.data);
            }
            BehaviourEvent::Sync(request_response::Event::Message { peer, message, .. }) => {
                match message {
                    request_response::Message::Request {
                        request, channel, ..
                    } => self.on_sync_request(peer, request, channel),
                    request_response::Message::Response {
                        request_id,
                        response,
                    } => {
                        if let Some(reply) = self.pending_syncs.remove(&request_id) {
                            let _ = reply.send(Ok(response));
                        }
                    }
                }
            }
            BehaviourEvent::Sync(request_response::Event::OutboundFailure {
                peer,
                request_id,
                error,
                ..
            }) => {
                // An answer over its limit. (A request over its limit is refused by the codec
                // before libp2p reports it to this loop: the stream is closed unread, with no
                // event to score the peer by.)
                if let request_response::OutboundFailure::Io(e) = &error
                    && super::framing::FrameError::is_too_large(e)
                {
                    self.shared
                        .conduct
                        .report(peer, super::conduct::Offence::Malformed);
                }
                if let Some(reply) = self.pending_syncs.remove(&request_id) {
                    let _ = reply.send(Err(NetError::Request(error)));
                }
            }
            BehaviourEvent::Kad(kad::Event::OutboundQueryProgressed {
                id,
                result: kad::QueryResult::GetProviders(result),
                step,
                ..
            }) => {
                {
                    if let Some((found, _)) = self.pending_providers.get_mut(&id) {
                        if let Ok(kad::GetProvidersOk::FoundProviders { providers, .. }) = result {
                            found.extend(providers);
                        }
                    }
                    if step.last {
                        if let Some((found, reply)) = self.pending_providers.remove(&id) {
                            let _ = reply.send(found.into_iter().collect());
                        }
                    } else if self
                        .pending_providers
                        .get(&id)
                        .is_some_and(|(f, _)| !f.is_empty())
                    {
                        // The first providers are enough to start; finish the query early.
                        if let Some(mut q) = self.swarm.behaviour_mut().kad.query_mut(&id) {
                            q.finish();
                        }
                    }
                }
            }
            _ => {}
        }
    }

    /// In a fleet, a peer that has not proved membership yet gets no gossip: its application
    /// score puts it below gossipsub's graylist, so it is sent no message, left out of the mesh
    /// and its messages ignored, until `Admitted` sets the score back. Without it a stranger
    /// would read every record gossiped in the seconds its `Hello` may take, and again at each
    /// reconnection under a new peer id.
    fn hold_gossip_until_admitted(&mut self, peer: PeerId) {
        if self.auth.in_fleet() && !self.admitted(&peer) {
            self.swarm
                .behaviour_mut()
                .gossipsub
                .set_application_score(&peer, super::behaviour::NOT_YET_ADMITTED_SCORE);
        }
    }

    fn admitted(&self, peer: &PeerId) -> bool {
        super::publisher_of(peer).is_some_and(|k| self.auth.admits(&k)) || !self.auth.in_fleet()
    }

    /// A gossiped message, validated before gossipsub may forward it: only what this node
    /// accepts itself travels on (a record that verifies, whose publisher it trusts, from no
    /// further in the future than the clock skew allows; a policy or proof that checks out).
    /// A message that breaks the protocol is rejected, which costs the forwarder its gossipsub
    /// score, and is reported to [`conduct`](super::conduct); one this node merely has no use
    /// for (a record it does not trust) is ignored and reported as useless, so that a peer
    /// flooding such records is banned while an honest peer with other trust rules, which
    /// forwards a few, is not.
    fn on_gossip(&mut self, source: PeerId, id: gossipsub::MessageId, data: Vec<u8>) {
        use super::conduct::Offence;
        use gossipsub::MessageAcceptance::{Accept, Ignore, Reject};
        if !self.admitted(&source) {
            // Perhaps a member whose proof is still being checked: not forwarded, not held
            // against it.
            self.report(&id, &source, Ignore);
            return;
        }
        let decoded: Result<Gossip, _> = codec::decode(&data);
        let work: futures::future::BoxFuture<'static, ()> = match decoded {
            Ok(Gossip::Record(record)) => {
                // A private repository's record is never forwarded: it goes only to peers
                // that may read it.
                let (acceptance, offence) = match record.verify() {
                    Err(_) => (Reject, Some(Offence::Malformed)),
                    Ok(v) if self.tags.check(v.record()).is_err() => {
                        (Ignore, Some(Offence::Useless))
                    }
                    Ok(v)
                        if self.auth.settings(&v.record().repo).visibility
                            == shoal_protocol::fleet::Visibility::Private =>
                    {
                        (Ignore, None)
                    }
                    Ok(_) => (Accept, None),
                };
                self.report(&id, &source, acceptance);
                if let Some(offence) = offence {
                    self.offence(source, offence);
                }
                let tags = self.tags.clone();
                Box::pin(async move {
                    if let Err(e) = tags.ingest(record).await {
                        tracing::error!(
                            error = &e as &dyn std::error::Error,
                            "storing a gossiped record"
                        );
                    }
                })
            }
            Ok(Gossip::Policy(policy)) => {
                let acceptance = if self.auth.check_policy(&policy).is_ok() {
                    Accept
                } else {
                    Reject
                };
                self.report(&id, &source, acceptance);
                if acceptance != Accept {
                    self.offence(source, Offence::Useless);
                    return;
                }
                let (auth, store) = (self.auth.clone(), self.store.clone());
                Box::pin(async move {
                    if let Err(e) = ingest::policy(&auth, &store, policy).await {
                        tracing::error!(
                            error = &e as &dyn std::error::Error,
                            "storing a gossiped policy"
                        );
                    }
                })
            }
            Ok(Gossip::Member(proof)) => {
                let valid = self
                    .auth
                    .check_member(&proof, None, self.auth.clock().now_ms())
                    .is_ok();
                self.report(&id, &source, if valid { Accept } else { Reject });
                if !valid {
                    self.offence(source, Offence::Useless);
                    return;
                }
                let (auth, store) = (self.auth.clone(), self.store.clone());
                Box::pin(async move {
                    if let Err(e) = ingest::member(&auth, &store, proof, None).await {
                        tracing::error!(
                            error = &e as &dyn std::error::Error,
                            "storing a gossiped member proof"
                        );
                    }
                })
            }
            Err(_) => {
                tracing::debug!(peer = %source, "rejected a malformed gossip message");
                self.tags
                    .stats()
                    .invalid
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                self.report(&id, &source, Reject);
                self.offence(source, Offence::Malformed);
                return;
            }
        };
        let Ok(permit) = self.inbound.clone().try_acquire_owned() else {
            tracing::debug!(
                "dropping a gossip message: too much inbound work (anti-entropy will repair)"
            );
            return;
        };
        self.tasks.spawn(async move {
            work.await;
            drop(permit);
        });
    }

    /// Starts the `Hello` exchange with a new peer (once at a time per peer): show this node's
    /// proof, check the peer's. The verdict comes back as `Admitted` or `Refuse`.
    fn spawn_hello(&mut self, peer: PeerId) {
        if !self.hellos.insert(peer) {
            return;
        }
        let (internal, auth, store) =
            (self.internal.clone(), self.auth.clone(), self.store.clone());
        self.tasks.spawn(async move {
            let hello = SyncRequest::Hello(auth.own_proof());
            let answer =
                tokio::time::timeout(HELLO_TIMEOUT, sync_request(&internal, peer, hello)).await;
            let verdict = match answer {
                Ok(Ok(SyncResponse::Hello(proof))) => {
                    match admit(&auth, &store, &peer, proof).await {
                        Ok(enrolment) => {
                            publish_enrolment(&internal, enrolment).await;
                            Ok(())
                        }
                        Err(why) => Err(why),
                    }
                }
                Ok(Ok(other)) => Err(format!("answered Hello with {other:?}")),
                Ok(Err(e)) => Err(format!("Hello failed: {e}")),
                Err(_) => Err("no answer to Hello".to_owned()),
            };
            let command = match verdict {
                Ok(()) => Command::Admitted(peer),
                Err(why) => {
                    tracing::debug!(%peer, %why, "peer did not prove membership");
                    Command::Refuse(peer)
                }
            };
            let _ = internal.send(command).await;
        });
    }

    /// Cuts off the peers [`conduct`](super::conduct) banned since the last look: their
    /// connections close, new ones are denied, and the DHT forgets their addresses.
    fn cut_off_banned(&mut self) {
        for peer in self.shared.conduct.take_banned() {
            tracing::warn!(%peer, "cutting off a banned peer");
            let b = self.swarm.behaviour_mut();
            b.blocked.block_peer(peer);
            b.kad.remove_peer(&peer);
            self.known.forget(&peer);
        }
    }

    /// Dials the bootstrap and remembered peers that are due (see [`redial`](super::redial)),
    /// and says so at warn when the node has been alone for a while.
    fn redial_and_check_alone(&mut self) {
        let now = Instant::now();
        let alone = self.swarm.connected_peers().next().is_none();
        let (swarm, refused, conduct) = (&self.swarm, &self.refused, &self.shared.conduct);
        let due = self.redial.due(
            now,
            alone,
            |p| swarm.is_connected(p),
            |p| conduct.is_banned(p) || refused.get(p).is_some_and(|at| at.elapsed() < REFUSED_FOR),
        );
        for addr in due {
            tracing::info!(%addr, "dialling a bootstrap or known peer (not connected)");
            if let Err(e) = self.swarm.dial(addr.clone()) {
                tracing::info!(%addr, error = &e as &dyn std::error::Error, "cannot dial a bootstrap or known peer");
            }
        }
        if !alone {
            self.alone_since = None;
            self.warned_alone = None;
            return;
        }
        let since = *self.alone_since.get_or_insert(now);
        let due_to_warn = now.duration_since(since) >= NO_PEERS_WARN_AFTER
            && self
                .warned_alone
                .is_none_or(|at| now.duration_since(at) >= NO_PEERS_WARN_EVERY);
        if due_to_warn && !self.redial.is_empty() {
            tracing::warn!(
                alone_for_secs = now.duration_since(since).as_secs(),
                "no peers: this node cannot reach any bootstrap or known peer; still trying"
            );
            self.warned_alone = Some(now);
        }
    }

    /// Writing the known peers to disk, if they changed since the last write.
    fn save_peers(&mut self) -> Option<impl std::future::Future<Output = ()> + Send + 'static> {
        let bytes = self.known.take_changes()?;
        let path = self.peers_path.clone();
        Some(async move {
            let written =
                tokio::task::spawn_blocking(move || PeerStore::write(&path, &bytes)).await;
            if let Ok(Err(e)) = written {
                tracing::warn!(
                    error = &e as &dyn std::error::Error,
                    "writing the peer store"
                );
            }
        })
    }

    /// Lets peers whose ban ended connect again.
    fn lift_ended_bans(&mut self) {
        for peer in self.shared.conduct.expire(std::time::Instant::now()) {
            tracing::info!(%peer, "a peer's ban ended");
            self.swarm.behaviour_mut().blocked.unblock_peer(peer);
        }
    }

    /// After a change of the access state: peers that are not admitted any more (revoked, or a
    /// fleet was just joined) prove themselves again or are cut off.
    fn check_peers_again(&mut self) {
        if !self.auth.in_fleet() {
            return;
        }
        let peers: Vec<PeerId> = self.swarm.connected_peers().copied().collect();
        for peer in peers {
            if !self.admitted(&peer) {
                self.hold_gossip_until_admitted(peer);
                self.spawn_hello(peer);
            }
        }
    }

    /// Reports a peer's misbehaviour to [`conduct`](super::conduct); a ban that follows is
    /// carried out when the loop next looks at the bans.
    fn offence(&self, peer: PeerId, offence: super::conduct::Offence) {
        if let super::conduct::Verdict::Banned(length) = self.shared.conduct.report(peer, offence) {
            tracing::warn!(%peer, ?offence, ban = ?length, "banned a peer for its gossip");
        }
    }

    fn report(
        &mut self,
        id: &gossipsub::MessageId,
        source: &PeerId,
        acceptance: gossipsub::MessageAcceptance,
    ) {
        let _ = self
            .swarm
            .behaviour_mut()
            .gossipsub
            .report_message_validation_result(id, source, acceptance);
    }

    fn on_sync_request(
        &mut self,
        peer: PeerId,
        request: SyncRequest,
        channel: ResponseChannel<SyncResponse>,
    ) {
        if let SyncRequest::Hello(proof) = request {
            // Answered once the peer's proof is checked, so that the peer's next requests find
            // it admitted.
            let (internal, auth, store) =
                (self.internal.clone(), self.auth.clone(), self.store.clone());
            self.tasks.spawn(async move {
                let (response, refuse) = match admit(&auth, &store, &peer, proof).await {
                    Ok(enrolment) => {
                        publish_enrolment(&internal, enrolment).await;
                        (SyncResponse::Hello(auth.own_proof()), false)
                    }
                    Err(why) => {
                        tracing::debug!(%peer, %why, "peer did not prove membership");
                        (
                            SyncResponse::Error("not a member of this fleet".into()),
                            true,
                        )
                    }
                };
                let _ = internal.send(Command::Respond(channel, response)).await;
                if refuse {
                    let _ = internal.send(Command::Refuse(peer)).await;
                }
            });
            return;
        }
        if !self.admitted(&peer) {
            let _ = self.swarm.behaviour_mut().sync.send_response(
                channel,
                SyncResponse::Error("not a member of this fleet".into()),
            );
            return;
        }
        // A long poll mostly waits: it takes a permit of its own kind. Past MAX_HAVE_WAITS it is
        // answered at once, like a plain `Have`.
        let parked = match &request {
            SyncRequest::HaveWait { .. } => self.have_waits.clone().try_acquire_owned().ok(),
            _ => None,
        };
        let (request, permit) = match parked {
            Some(permit) => (request, Ok(permit)),
            None => {
                let request = match request {
                    SyncRequest::HaveWait { digest, .. } => SyncRequest::Have { digest },
                    other => other,
                };
                (request, self.inbound.clone().try_acquire_owned())
            }
        };
        let Ok(permit) = permit else {
            let _ = self
                .swarm
                .behaviour_mut()
                .sync
                .send_response(channel, SyncResponse::Error("busy".into()));
            return;
        };
        let (store, shared, internal, tags) = (
            self.store.clone(),
            self.shared.clone(),
            self.internal.clone(),
            self.tags.clone(),
        );
        let reader = sync::Reader::of(&self.auth, &peer);
        self.tasks.spawn(async move {
            if let SyncRequest::Prefetch { repo, reference } = request {
                let answer = prefetch_ask(&shared, peer, repo, reference).await;
                let response = SyncResponse::Prefetch(answer);
                let _ = internal.send(Command::Respond(channel, response)).await;
                drop(permit);
                return;
            }
            if let SyncRequest::Mirror {
                upstream,
                repo,
                digest,
            } = request
            {
                let state = ask_mirror(&shared, &reader, peer, upstream, repo, digest).await;
                let response = SyncResponse::Mirror(state);
                let _ = internal.send(Command::Respond(channel, response)).await;
                drop(permit);
                return;
            }
            if let SyncRequest::Push(record) = request {
                if let Err(e) = tags.ingest(record).await {
                    tracing::error!(error = &e as &dyn std::error::Error, "storing a pushed record");
                }
                let _ = internal.send(Command::Respond(channel, SyncResponse::Pushed)).await;
                drop(permit);
                return;
            }
            let log = &shared.serving.log;
            let response = sync::answer(&store, log, &reader, request)
                .await
                .unwrap_or_else(|e| {
                    tracing::warn!(%peer, error = &e as &dyn std::error::Error, "answering a sync request");
                    SyncResponse::Error("internal error".into())
                });
            let _ = internal.send(Command::Respond(channel, response)).await;
            drop(permit);
        });
    }

    /// Marks a listener as having an address (or as gone); the start waits for all of them.
    fn listener_settled(&mut self, listener: ListenerId) {
        let Some((waiting, _)) = &mut self.starting else {
            return;
        };
        waiting.remove(&listener);
        if waiting.is_empty()
            && let Some((_, ready)) = self.starting.take()
        {
            let _ = ready.send(());
        }
    }

    /// The periodic sync: one peer at random, skipped while syncs already fill their permits
    /// (a slow peer must not pile them up).
    fn sync_with_a_random_peer(&mut self) {
        use rand::seq::IteratorRandom;
        if self.syncs.available_permits() == 0 {
            return;
        }
        let peer = self
            .swarm
            .connected_peers()
            .choose(&mut rand::rng())
            .copied();
        if let Some(peer) = peer {
            self.spawn_clock_probe(peer);
            self.spawn_anti_entropy(peer);
        }
    }

    /// Asks `peer` for its clock; the offset comes back as [`Command::ClockOffset`]. A peer that
    /// predates the request, or does not answer, is left out of the fleet's time.
    fn spawn_clock_probe(&mut self, peer: PeerId) {
        let internal = self.internal.clone();
        self.tasks.spawn(async move {
            let (sent_ms, sent) = (crate::clock::own_now_ms(), Instant::now());
            let answer = tokio::time::timeout(
                HELLO_TIMEOUT,
                sync_request(&internal, peer, SyncRequest::Clock),
            )
            .await;
            if let Ok(Ok(SyncResponse::Clock(theirs))) = answer {
                let offset = crate::clock::peer_offset_ms(theirs, sent_ms, sent.elapsed());
                let _ = internal.send(Command::ClockOffset(peer, offset)).await;
            }
        });
    }

    /// Sets the fleet's time from the peers' clocks (see [`crate::clock`]), and says so when
    /// this node's clock is found off, or back in line.
    fn correct_clock(&mut self) {
        let correction =
            crate::clock::correction_ms(self.clock_offsets.values().map(|(offset, _)| *offset));
        if self.auth.clock().set_offset_ms(correction) {
            if correction == 0 {
                tracing::info!("this node's clock agrees with its peers' again");
            } else {
                tracing::warn!(
                    correction_ms = correction,
                    peers = self.clock_offsets.len(),
                    "this node's clock is off from most of its peers'; stamping and checking \
                     records in the fleet's time (fix the clock: NTP)"
                );
            }
        }
    }

    fn spawn_anti_entropy(&mut self, peer: PeerId) {
        let (internal, store, tags, syncs) = (
            self.internal.clone(),
            self.store.clone(),
            self.tags.clone(),
            self.syncs.clone(),
        );
        let (shared, warnings) = (self.shared.clone(), self.sync_warnings.clone());
        self.tasks.spawn(async move {
            let Ok(_permit) = syncs.acquire_owned().await else {
                return;
            };
            match sync::anti_entropy(&internal, &store, &tags, peer).await {
                Ok(n) if n > 0 => tracing::info!(%peer, accepted = n, "caught up with a peer"),
                Ok(_) => {}
                Err(e @ sync::EntropyError::Violation(_)) => {
                    // Scored and cut off; logged once per peer per interval, however often.
                    shared.conduct.report(peer, super::conduct::Offence::Protocol);
                    let _ = internal.send(Command::Disconnect(peer)).await;
                    if let Some(left_out) = warnings.allow(peer, std::time::Instant::now()) {
                        tracing::warn!(%peer, left_out, error = &e as &dyn std::error::Error, "cut off a peer whose sync broke the rules");
                    }
                }
                Err(e) => {
                    tracing::debug!(%peer, error = &e as &dyn std::error::Error, "anti-entropy")
                }
            }
        });
    }
}

/// Checks a peer's `Hello` proof: any peer of an open node; in a fleet, a peer whose proof
/// checks out (and is then kept, so its records count), or this node itself. A node that holds
/// an admin key enrols a member that joined with a ticket, so that its membership outlives the
/// ticket; the enrolment is returned, to be gossiped.
/// The answer to a peer's [`SyncRequest::Mirror`]: the node's mirror's, if it has one and the
/// peer may read the repository; else `Unsupported`.
async fn ask_mirror(
    shared: &super::handle::Shared,
    reader: &sync::Reader,
    peer: PeerId,
    upstream: String,
    repo: shoal_protocol::RepoName,
    digest: shoal_protocol::Digest,
) -> shoal_protocol::message::MirrorState {
    use shoal_protocol::message::{MAX_UPSTREAM_NAME_BYTES, MirrorState};
    let Some(asks) = shared.mirror.get() else {
        return MirrorState::Unsupported;
    };
    if upstream.len() > MAX_UPSTREAM_NAME_BYTES || !reader.may_read_repo(&repo) {
        return MirrorState::Unsupported;
    }
    let (reply, answer) = tokio::sync::oneshot::channel();
    let ask = super::handle::MirrorAsk {
        peer,
        upstream,
        repo,
        digest,
        reply,
    };
    // A full queue is a busy mirror: the asker fetches from the upstream itself.
    if asks.try_send(ask).is_err() {
        return MirrorState::Unsupported;
    }
    answer.await.unwrap_or(MirrorState::Unsupported)
}

async fn admit(
    auth: &Auth,
    store: &Store,
    peer: &PeerId,
    proof: Option<shoal_protocol::fleet::MemberProof>,
) -> Result<Option<shoal_protocol::fleet::SignedPolicy>, String> {
    if !auth.in_fleet() {
        return Ok(None);
    }
    let key = super::publisher_of(peer).ok_or("its peer id is not a node key")?;
    if key == auth.own_key() {
        return Ok(None);
    }
    let proof = proof.ok_or("it sent no membership proof")?;
    let groups = proof
        .ticket
        .verify()
        .map(|t| t.statement().groups.clone())
        .unwrap_or_default();
    match ingest::member(auth, store, proof, Some(&key)).await {
        Ok(ingest::Outcome::Accepted | ingest::Outcome::Stale) => {}
        Ok(ingest::Outcome::Refused(why)) => return Err(why.to_string()),
        Err(e) => return Err(format!("keeping its proof: {e}")),
    }
    if !auth.holds_admin_key() || auth.member(&key).is_some_and(|m| m.enrolled) {
        return Ok(None);
    }
    let Some(enrolment) =
        auth.sign_policy(shoal_protocol::fleet::PolicyBody::Member { node: key, groups })
    else {
        return Ok(None);
    };
    match ingest::policy(auth, store, enrolment.clone()).await {
        Ok(ingest::Outcome::Accepted) => Ok(Some(enrolment)),
        _ => Ok(None),
    }
}

/// Gossips an enrolment made by [`admit`].
async fn publish_enrolment(
    internal: &mpsc::Sender<Command>,
    enrolment: Option<shoal_protocol::fleet::SignedPolicy>,
) {
    if let Some(policy) = enrolment
        && let Ok(bytes) = codec::encode(&Gossip::Policy(policy))
    {
        let _ = internal.send(Command::Publish(bytes)).await;
    }
}

/// How long a peer's prefetch ask waits for the prefetcher to say whether it queued it.
const PREFETCH_ASK_TIMEOUT: Duration = Duration::from_secs(5);

/// Hands a peer's ask to prefetch `repo` / `reference` to the prefetcher, if the peer may read
/// the repository (a member with a grant, for a private one; a node of an open fleet otherwise),
/// and says what became of it. A peer that may not read it hears `Denied`, as for a repository
/// that does not exist.
async fn prefetch_ask(
    shared: &Shared,
    peer: PeerId,
    repo: shoal_protocol::RepoName,
    reference: shoal_protocol::Reference,
) -> shoal_protocol::message::PrefetchAnswer {
    use shoal_protocol::message::PrefetchAnswer;
    let may_read = super::publisher_of(&peer).is_some_and(|k| shared.auth.peer_may_read(&k, &repo));
    if !may_read {
        tracing::info!(%peer, %repo, "refused a prefetch ask from a peer that may not read the repository");
        return PrefetchAnswer::Denied;
    }
    let inbox = shared
        .prefetch
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .clone();
    let Some(inbox) = inbox else {
        return PrefetchAnswer::Denied;
    };
    let (answer, heard) = oneshot::channel();
    let ask = super::handle::PrefetchAsk {
        peer,
        repo,
        reference,
        answer,
    };
    match inbox.try_send(ask) {
        Ok(()) => tokio::time::timeout(PREFETCH_ASK_TIMEOUT, heard)
            .await
            .ok()
            .and_then(Result::ok)
            .unwrap_or(PrefetchAnswer::Busy),
        Err(mpsc::error::TrySendError::Full(_)) => PrefetchAnswer::Busy,
        Err(mpsc::error::TrySendError::Closed(_)) => PrefetchAnswer::Denied,
    }
}
