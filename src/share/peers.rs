//! Which node has a digest: a Kademlia DHT of provider records among the cluster's nodes
//! (rust-libp2p), as Spegel keeps one for containerd nodes.
//!
//! - Every node provides a record for each manifest and blob its cache holds, keyed by
//!   the digest (`sha256:…`); libp2p republishes them every [`REPUBLISH`] and other
//!   nodes drop them [`RECORD_TTL`] after the last one. A blob evicted from the cache
//!   stops being provided at once; the records other nodes hold for it expire, and
//!   meanwhile a request for it is answered 404 and the asker moves on.
//! - The network is private: every connection starts with libp2p's pre-shared-key
//!   handshake under the cluster key (XSalsa20), then Noise and yamux, so a host
//!   without the key cannot join, read or answer. Kademlia speaks its own protocol
//!   name, `/longshore/kad/1.0.0`, and runs in server mode on every node.
//! - Nodes find each other through `[share] bootstrap` (`HOST[:PORT]`, a host name may
//!   name several nodes and is looked up again until they answer) and, with
//!   `[share] mdns`, multicast DNS on the local link.
//! - Every node of a cluster uses the same ports: the DHT listens on the peer listener's
//!   port + 1, and a provider's blobs are asked for at its address on the peer port.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result};
use futures_util::StreamExt;
use libp2p::core::upgrade::Version;
use libp2p::multiaddr::Protocol;
use libp2p::swarm::behaviour::toggle::Toggle;
use libp2p::swarm::dial_opts::DialOpts;
use libp2p::swarm::{NetworkBehaviour, SwarmEvent};
use libp2p::{kad, mdns, noise, tcp, yamux, Multiaddr, PeerId, StreamProtocol, Transport};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

use super::auth::ClusterKey;
use crate::oci::digest::Digest;

/// How often this node's provider records are published again.
pub const REPUBLISH: Duration = Duration::from_secs(10 * 60);
/// How long another node keeps a provider record after it was last published.
pub const RECORD_TTL: Duration = Duration::from_secs(25 * 60);
/// How often bootstrap names are looked up and dialled while no node answers there.
const BOOTSTRAP_EVERY: Duration = Duration::from_secs(15);
/// How long a lookup goes on for more providers once it found one.
pub const FIND_GRACE: Duration = Duration::from_millis(300);
/// Provider announcements in flight at once.
const ANNOUNCING: usize = 16;
/// The DHT's protocol name: never mixed with IPFS's.
const KAD_PROTOCOL: &str = "/longshore/kad/1.0.0";

/// How the DHT runs.
#[derive(Debug, Clone)]
pub struct PeerConfig {
    /// Where it listens (the peer listener's address, port + 1).
    pub listen: SocketAddr,
    /// The peer listener's port, the same on every node.
    pub http_port: u16,
    /// `HOST[:PORT]` to join through; the port is the peer listener's.
    pub bootstrap: Vec<String>,
    /// Also find nodes with multicast DNS.
    pub mdns: bool,
}

/// A node as this one knows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerView {
    /// Its libp2p identity.
    pub id: String,
    /// Its peer listener.
    pub address: String,
    /// Whether a connection to it is open now.
    pub connected: bool,
}

enum Command {
    Provide(Vec<Digest>),
    Withdraw(Vec<Digest>),
    Find {
        digest: Digest,
        max: usize,
        reply: mpsc::UnboundedSender<Vec<SocketAddr>>,
    },
}

/// The DHT, running on a task of its own.
#[derive(Clone)]
pub struct Peers {
    tx: mpsc::UnboundedSender<Command>,
    known: Arc<Mutex<BTreeMap<PeerId, PeerView>>>,
    /// This node's own identity.
    pub id: String,
}

#[derive(NetworkBehaviour)]
struct Behaviour {
    kad: kad::Behaviour<kad::store::MemoryStore>,
    mdns: Toggle<mdns::tokio::Behaviour>,
}

fn key_of(d: &Digest) -> kad::RecordKey {
    kad::RecordKey::new(&d.to_string())
}

fn tcp_addr(ip: IpAddr, port: u16) -> Multiaddr {
    Multiaddr::from(ip).with(Protocol::Tcp(port))
}

fn ip_of(a: &Multiaddr) -> Option<IpAddr> {
    a.iter().find_map(|p| match p {
        Protocol::Ip4(ip) => Some(IpAddr::V4(ip)),
        Protocol::Ip6(ip) => Some(IpAddr::V6(ip)),
        _ => None,
    })
}

impl Peers {
    /// Starts the DHT: listens, and joins through the bootstrap names.
    pub fn start(key: &ClusterKey, cfg: PeerConfig) -> Result<Peers> {
        let psk = libp2p::pnet::PreSharedKey::new(key.psk());
        let identity = libp2p::identity::Keypair::generate_ed25519();
        let mdns_on = cfg.mdns;
        let mut swarm = libp2p::SwarmBuilder::with_existing_identity(identity)
            .with_tokio()
            .with_other_transport(|k| {
                let noise = noise::Config::new(k)
                    .map_err(|e| Box::new(e) as Box<dyn std::error::Error + Send + Sync>)?;
                let t = tcp::tokio::Transport::new(tcp::Config::default().nodelay(true))
                    .and_then(move |socket, _| libp2p::pnet::PnetConfig::new(psk).handshake(socket))
                    .upgrade(Version::V1Lazy)
                    .authenticate(noise)
                    .multiplex(yamux::Config::default())
                    .timeout(Duration::from_secs(20));
                Ok(t)
            })
            .context("setting up the DHT's transport")?
            .with_behaviour(|k| {
                let id = k.public().to_peer_id();
                let mut kc = kad::Config::new(StreamProtocol::new(KAD_PROTOCOL));
                kc.set_provider_publication_interval(Some(REPUBLISH))
                    .set_provider_record_ttl(Some(RECORD_TTL))
                    .set_query_timeout(Duration::from_secs(10));
                let store = kad::store::MemoryStore::with_config(
                    id,
                    kad::store::MemoryStoreConfig {
                        max_records: 1024,
                        max_value_bytes: 1024,
                        max_providers_per_key: 20,
                        max_provided_keys: 1 << 20,
                    },
                );
                let mut kad = kad::Behaviour::with_config(id, store, kc);
                kad.set_mode(Some(kad::Mode::Server));
                let mdns = if mdns_on {
                    Some(mdns::tokio::Behaviour::new(mdns::Config::default(), id)?)
                } else {
                    None
                };
                Ok(Behaviour {
                    kad,
                    mdns: Toggle::from(mdns),
                })
            })
            .context("setting up the DHT")?
            .with_swarm_config(|c| c.with_idle_connection_timeout(Duration::from_secs(300)))
            .build();
        swarm
            .listen_on(tcp_addr(cfg.listen.ip(), cfg.listen.port()))
            .with_context(|| format!("listening on {} for the DHT", cfg.listen))?;
        let id = swarm.local_peer_id().to_string();
        let (tx, rx) = mpsc::unbounded_channel();
        let known = Arc::new(Mutex::new(BTreeMap::new()));
        let task = Task {
            cfg,
            known: known.clone(),
            ips: HashMap::new(),
            own_ips: HashSet::new(),
            connected: HashSet::new(),
            finds: HashMap::new(),
            announce: VecDeque::new(),
            announcing: HashSet::new(),
            provided: HashSet::new(),
            ever: HashSet::new(),
        };
        tokio::spawn(task.run(swarm, rx));
        Ok(Peers { tx, known, id })
    }

    /// Provides records for `digests`.
    pub fn provide(&self, digests: Vec<Digest>) {
        if !digests.is_empty() {
            let _ = self.tx.send(Command::Provide(digests));
        }
    }

    /// Stops providing records for `digests`.
    pub fn withdraw(&self, digests: Vec<Digest>) {
        if !digests.is_empty() {
            let _ = self.tx.send(Command::Withdraw(digests));
        }
    }

    /// The peer listeners of up to `max` other nodes that provide `digest`: as soon as
    /// that many are found, or [`FIND_GRACE`] after the first was, or when the lookup
    /// ends; at most `wait`.
    pub async fn find(&self, digest: Digest, max: usize, wait: Duration) -> Vec<SocketAddr> {
        let (reply, mut rx) = mpsc::unbounded_channel();
        if self.tx.send(Command::Find { digest, max, reply }).is_err() {
            return vec![];
        }
        let mut found: Vec<SocketAddr> = Vec::new();
        let end = tokio::time::Instant::now() + wait;
        let mut until = end;
        while let Ok(Some(more)) = tokio::time::timeout_at(until, rx.recv()).await {
            for a in more {
                if !found.contains(&a) {
                    found.push(a);
                }
            }
            if found.len() >= max {
                break;
            }
            if !found.is_empty() {
                until = end.min(tokio::time::Instant::now() + FIND_GRACE);
            }
        }
        found.truncate(max);
        found
    }

    /// Which node fetches `digest` from its registry when no node has it: of this node
    /// and those connected now, the one whose identity hashed with the digest ranks
    /// highest (rendezvous hashing), so nodes that know the same peers agree without
    /// asking each other. `None` when it is this node.
    pub fn owner(&self, digest: &Digest) -> Option<SocketAddr> {
        let rank = |id: &str| Digest::of(format!("{id} {digest}").as_bytes());
        let mine = rank(&self.id);
        self.known()
            .into_iter()
            .filter(|p| p.connected)
            .map(|p| (rank(&p.id), p.address))
            .filter(|(r, _)| r.hex() > mine.hex())
            .max_by(|a, b| a.0.hex().cmp(&b.0.hex()))
            .and_then(|(_, a)| a.parse().ok())
    }

    /// The nodes this one knows.
    pub fn known(&self) -> Vec<PeerView> {
        self.known
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .cloned()
            .collect()
    }
}

struct Find {
    found: Vec<PeerId>,
    max: usize,
    reply: mpsc::UnboundedSender<Vec<SocketAddr>>,
}

struct Task {
    cfg: PeerConfig,
    known: Arc<Mutex<BTreeMap<PeerId, PeerView>>>,
    ips: HashMap<PeerId, IpAddr>,
    own_ips: HashSet<IpAddr>,
    connected: HashSet<PeerId>,
    finds: HashMap<kad::QueryId, Find>,
    announce: VecDeque<Digest>,
    announcing: HashSet<kad::QueryId>,
    provided: HashSet<Digest>,
    /// Every node a connection was ever open to.
    ever: HashSet<PeerId>,
}

impl Task {
    async fn run(
        mut self,
        mut swarm: libp2p::Swarm<Behaviour>,
        mut rx: mpsc::UnboundedReceiver<Command>,
    ) {
        let mut bootstrap = tokio::time::interval(BOOTSTRAP_EVERY);
        loop {
            tokio::select! {
                ev = swarm.select_next_some() => self.on_event(&mut swarm, ev),
                cmd = rx.recv() => match cmd {
                    Some(c) => self.on_command(&mut swarm, c),
                    None => return,
                },
                _ = bootstrap.tick() => self.dial_bootstrap(&mut swarm).await,
            }
            self.pump(&mut swarm);
        }
    }

    /// Starts announcements while fewer than [`ANNOUNCING`] are in flight.
    fn pump(&mut self, swarm: &mut libp2p::Swarm<Behaviour>) {
        while self.announcing.len() < ANNOUNCING {
            let Some(d) = self.announce.pop_front() else {
                return;
            };
            match swarm.behaviour_mut().kad.start_providing(key_of(&d)) {
                Ok(q) => {
                    self.announcing.insert(q);
                }
                Err(e) => tracing::warn!("providing {d} in the DHT: {e}"),
            }
        }
    }

    fn on_command(&mut self, swarm: &mut libp2p::Swarm<Behaviour>, c: Command) {
        match c {
            Command::Provide(ds) => {
                self.provided.extend(ds.iter().copied());
                self.announce.extend(ds);
            }
            Command::Withdraw(ds) => {
                let gone: HashSet<Digest> = ds.into_iter().collect();
                self.provided.retain(|d| !gone.contains(d));
                self.announce.retain(|d| !gone.contains(d));
                for d in gone {
                    swarm.behaviour_mut().kad.stop_providing(&key_of(&d));
                }
            }
            Command::Find { digest, max, reply } => {
                let q = swarm.behaviour_mut().kad.get_providers(key_of(&digest));
                self.finds.insert(
                    q,
                    Find {
                        found: vec![],
                        max,
                        reply,
                    },
                );
            }
        }
    }

    fn learn(&mut self, swarm: &mut libp2p::Swarm<Behaviour>, peer: PeerId, ip: IpAddr) {
        if self.own_ips.contains(&ip) && peer == *swarm.local_peer_id() {
            return;
        }
        let dht = tcp_addr(ip, self.cfg.listen.port());
        if self.ips.insert(peer, ip) != Some(ip) {
            swarm.behaviour_mut().kad.add_address(&peer, dht);
        }
        let mut known = self.known.lock().unwrap_or_else(|p| p.into_inner());
        known.insert(
            peer,
            PeerView {
                id: peer.to_string(),
                address: SocketAddr::new(ip, self.cfg.http_port).to_string(),
                connected: self.connected.contains(&peer),
            },
        );
    }

    fn on_event(&mut self, swarm: &mut libp2p::Swarm<Behaviour>, ev: SwarmEvent<BehaviourEvent>) {
        match ev {
            SwarmEvent::NewListenAddr { address, .. } => {
                tracing::info!("the DHT listens on {address}");
                if let Some(ip) = ip_of(&address) {
                    self.own_ips.insert(ip);
                }
            }
            SwarmEvent::ConnectionEstablished {
                peer_id, endpoint, ..
            } => {
                let first = self.connected.insert(peer_id);
                if let Some(ip) = ip_of(endpoint.get_remote_address()) {
                    self.learn(swarm, peer_id, ip);
                }
                if self.ever.insert(peer_id) {
                    // A node new to this one: what was announced before it came may not
                    // have reached the nodes closest to each key, so it is announced
                    // again.
                    if self.announce.len() < self.provided.len() {
                        self.announce = self.provided.iter().copied().collect();
                    }
                }
                if first {
                    tracing::info!("peer {peer_id} joined at {}", endpoint.get_remote_address());
                    if let Some(v) = self
                        .known
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .get_mut(&peer_id)
                    {
                        v.connected = true;
                    }
                    let _ = swarm.behaviour_mut().kad.bootstrap();
                }
            }
            SwarmEvent::ConnectionClosed {
                peer_id,
                num_established: 0,
                ..
            } => {
                self.connected.remove(&peer_id);
                if let Some(v) = self
                    .known
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .get_mut(&peer_id)
                {
                    v.connected = false;
                }
                tracing::debug!("peer {peer_id}: no connection left");
            }
            SwarmEvent::OutgoingConnectionError { peer_id, error, .. } => {
                tracing::debug!("dialling {peer_id:?}: {error}");
            }
            SwarmEvent::IncomingConnectionError {
                send_back_addr,
                error,
                ..
            } => {
                // A host without the cluster key fails here, at the handshake.
                tracing::debug!("a connection from {send_back_addr} failed: {error}");
            }
            SwarmEvent::Behaviour(BehaviourEvent::Mdns(mdns::Event::Discovered(list))) => {
                for (peer, addr) in list {
                    if let Some(ip) = ip_of(&addr) {
                        if !self.connected.contains(&peer) {
                            self.learn(swarm, peer, ip);
                            let _ = swarm.dial(
                                DialOpts::peer_id(peer)
                                    .addresses(vec![tcp_addr(ip, self.cfg.listen.port())])
                                    .build(),
                            );
                        }
                    }
                }
            }
            SwarmEvent::Behaviour(BehaviourEvent::Kad(ev)) => self.on_kad(swarm, ev),
            _ => {}
        }
    }

    fn on_kad(&mut self, swarm: &mut libp2p::Swarm<Behaviour>, ev: kad::Event) {
        match ev {
            kad::Event::RoutingUpdated {
                peer, addresses, ..
            } => {
                if let Some(ip) = ip_of(addresses.first()) {
                    self.learn(swarm, peer, ip);
                }
            }
            kad::Event::OutboundQueryProgressed {
                id, result, step, ..
            } => match result {
                kad::QueryResult::StartProviding(_) | kad::QueryResult::RepublishProvider(_) => {
                    self.announcing.remove(&id);
                }
                kad::QueryResult::GetProviders(res) => {
                    let me = *swarm.local_peer_id();
                    let Some(f) = self.finds.get_mut(&id) else {
                        return;
                    };
                    if let Ok(kad::GetProvidersOk::FoundProviders { providers, .. }) = res {
                        let new: Vec<PeerId> = providers
                            .into_iter()
                            .filter(|p| *p != me && !f.found.contains(p))
                            .collect();
                        f.found.extend(new.iter().copied());
                        let _ = f.reply.send(addresses(&self.ips, self.cfg.http_port, &new));
                    }
                    let known = addresses(&self.ips, self.cfg.http_port, &f.found).len();
                    // Done when enough are known, the lookup ended, or no one waits.
                    if known >= f.max || step.last || f.reply.is_closed() {
                        let f = self.finds.remove(&id).expect("looked up above");
                        if let Some(mut q) = swarm.behaviour_mut().kad.query_mut(&id) {
                            q.finish();
                        }
                        // Providers whose address is unknown yet are dialled, for next
                        // time.
                        for p in f.found.iter().filter(|p| !self.ips.contains_key(p)) {
                            let _ = swarm.dial(*p);
                        }
                    }
                }
                _ => {}
            },
            _ => {}
        }
    }

    /// Dials the addresses the bootstrap names give, where no node is connected yet.
    async fn dial_bootstrap(&mut self, swarm: &mut libp2p::Swarm<Behaviour>) {
        let connected_ips: HashSet<IpAddr> = self
            .connected
            .iter()
            .filter_map(|p| self.ips.get(p))
            .copied()
            .collect();
        for entry in &self.cfg.bootstrap {
            // Checked when the configuration was read.
            let Ok((host, port)) = crate::config::check_host_port(entry) else {
                continue;
            };
            let port = port.unwrap_or(self.cfg.http_port);
            let dht_port = port.wrapping_add(1);
            let found = match tokio::time::timeout(
                Duration::from_secs(5),
                tokio::net::lookup_host((host.as_str(), dht_port)),
            )
            .await
            {
                Ok(Ok(addrs)) => addrs.collect::<Vec<_>>(),
                Ok(Err(e)) => {
                    tracing::debug!("looking up bootstrap {entry}: {e}");
                    continue;
                }
                Err(_) => continue,
            };
            for a in found {
                if self.own_ips.contains(&a.ip())
                    || (a.ip() == self.cfg.listen.ip() && a.port() == self.cfg.listen.port())
                    || connected_ips.contains(&a.ip())
                {
                    continue;
                }
                let addr = tcp_addr(a.ip(), a.port());
                tracing::debug!("dialling bootstrap {addr}");
                let _ = swarm.dial(DialOpts::unknown_peer_id().address(addr).build());
            }
        }
    }
}

fn addresses(ips: &HashMap<PeerId, IpAddr>, port: u16, found: &[PeerId]) -> Vec<SocketAddr> {
    found
        .iter()
        .filter_map(|p| ips.get(p))
        .map(|ip| SocketAddr::new(*ip, port))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_from_multiaddrs() {
        let a: Multiaddr = "/ip4/10.0.0.7/tcp/5052".parse().unwrap();
        assert_eq!(ip_of(&a), Some("10.0.0.7".parse().unwrap()));
        assert_eq!(tcp_addr("10.0.0.7".parse().unwrap(), 5052), a);
    }
}
