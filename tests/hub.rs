//! The WireGuard hub of a real `fcdev server` (test backend, hub without TUN on loopback) against a real
//! initiator (boringtun through `fcdev::tunnel::peer::Peer`): which keys it accepts, how long a first
//! session lives, and how fast admin changes (`fcdev server user revoke/remove`) reach it.

mod common;

use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

use base64::Engine;
use common::{http, json, TestServer, TINY_TOML};
use fcdev::tunnel::peer::{Outcome, Peer};
use fcdev::tunnel::{PrivateKey, PublicKey};
use predicates::prelude::*;

fn register(server: &TestServer, public_key: &str) -> (u16, String) {
    http(
        &server.url,
        "POST",
        "/v1/peers",
        Some(&server.token),
        Some(&format!(
            r#"{{"name":"laptop","public_key":"{public_key}"}}"#
        )),
    )
}

fn peers(server: &TestServer) -> serde_json::Value {
    let (status, body) = http(&server.url, "GET", "/v1/peers", Some(&server.token), None);
    assert_eq!(status, 200, "{body}");
    json(body.as_bytes())
}

/// A laptop: a key pair registered with the server, and its hub.
struct Laptop {
    key: PrivateKey,
    address: Ipv4Addr,
    hub: SocketAddr,
    hub_key: PublicKey,
    gateway: Ipv4Addr,
}

impl Laptop {
    fn register(server: &TestServer) -> Laptop {
        Self::register_key(server, PrivateKey::generate())
    }

    /// Registering the same key again is idempotent and tells the hub's current endpoint.
    fn register_key(server: &TestServer, key: PrivateKey) -> Laptop {
        let (status, body) = register(server, &key.public_key().to_base64());
        assert_eq!(status, 201, "{body}");
        let cfg = json(body.as_bytes());
        let subnet: Ipv4Addr = cfg["allowed_ips"][0]
            .as_str()
            .unwrap()
            .trim_end_matches("/24")
            .parse()
            .unwrap();
        Laptop {
            address: cfg["address"].as_str().unwrap().parse().unwrap(),
            hub: cfg["endpoint"].as_str().unwrap().parse().unwrap(),
            hub_key: PublicKey::from_base64(cfg["server_public_key"].as_str().unwrap()).unwrap(),
            gateway: Ipv4Addr::from(u32::from(subnet) + 10),
            key,
        }
    }

    /// A fresh WireGuard initiator for this laptop, with its own socket.
    fn initiator(&self) -> Initiator {
        let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
        sock.set_read_timeout(Some(Duration::from_millis(20)))
            .unwrap();
        let mut peer = Peer::new(&self.key, self.hub_key, Some(25), rand_index(), None);
        peer.set_endpoint(self.hub);
        Initiator {
            peer,
            sock,
            hub: self.hub,
            out: vec![0u8; 65600],
            buf: vec![0u8; 65600],
        }
    }

    /// An IPv4 packet from this laptop to the first VM address of its namespace.
    fn packet(&self, len: usize) -> Vec<u8> {
        let mut p = vec![0u8; len];
        p[0] = 0x45;
        p[2..4].copy_from_slice(&(len as u16).to_be_bytes());
        p[8] = 64;
        p[9] = 17;
        p[12..16].copy_from_slice(&self.address.octets());
        p[16..20].copy_from_slice(&self.gateway.octets());
        p
    }
}

fn rand_index() -> u32 {
    rand::random::<u32>() & 0x00ff_ffff
}

struct Initiator {
    peer: Peer,
    sock: UdpSocket,
    hub: SocketAddr,
    out: Vec<u8>,
    buf: Vec<u8>,
}

impl Initiator {
    /// Sends a handshake initiation and waits up to `wait` for the hub's response (type 2). Cookie replies
    /// (type 3, the hub under load) do not count.
    fn handshake(&mut self, wait: Duration) -> bool {
        if let Outcome::Network(d) = self.peer.initiate(&mut self.out) {
            self.sock.send_to(d, self.hub).unwrap();
        }
        let deadline = Instant::now() + wait;
        while Instant::now() < deadline {
            let Ok((n, from)) = self.sock.recv_from(&mut self.buf) else {
                continue;
            };
            let response = self.buf[0] == 2;
            if let Outcome::Network(d) = self.peer.decapsulate(from, &self.buf[..n], &mut self.out)
            {
                self.sock.send_to(d, self.hub).unwrap();
            }
            if response {
                return true;
            }
        }
        false
    }

    fn send(&mut self, packet: &[u8]) {
        match self.peer.encapsulate(packet, &mut self.out) {
            Outcome::Network(d) => {
                self.sock.send_to(d, self.hub).unwrap();
            }
            other => panic!("cannot encapsulate: {other:?}"),
        }
    }

    /// Timers and whatever the hub sent (keepalives, rekey responses), for about `d`.
    fn pump(&mut self, d: Duration) {
        let until = Instant::now() + d;
        while Instant::now() < until {
            if let Outcome::Network(p) = self.peer.tick(&mut self.out) {
                self.sock.send_to(p, self.hub).unwrap();
            }
            if let Ok((n, from)) = self.sock.recv_from(&mut self.buf) {
                if let Outcome::Network(p) =
                    self.peer.decapsulate(from, &self.buf[..n], &mut self.out)
                {
                    self.sock.send_to(p, self.hub).unwrap();
                    while let Outcome::Network(q) = self.peer.flush(&mut self.out) {
                        self.sock.send_to(q, self.hub).unwrap();
                    }
                }
            }
        }
    }
}

/// Every encoding of a Curve25519 point of small order: the blacklist of libsodium/WireGuard (0, 1, the
/// order-8 points, p-1, p, p+1, the order-8 points + p, 2p-1, 2p, 2p+1) and each with the top bit set.
fn small_order_keys() -> Vec<String> {
    let list = [
        "0000000000000000000000000000000000000000000000000000000000000000",
        "0100000000000000000000000000000000000000000000000000000000000000",
        "e0eb7a7c3b41b8ae1656e3faf19fc46ada098deb9c32b1fd866205165f49b800",
        "5f9c95bca3508c24b1d0b1559c83ef5b04445cc4581c8e86d8224eddd09f1157",
        "ecffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",
        "edffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",
        "eeffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",
        "cdeb7a7c3b41b8ae1656e3faf19fc46ada098deb9c32b1fd866205165f49b880",
        "4c9c95bca3508c24b1d0b1559c83ef5b04445cc4581c8e86d8224eddd09f11d7",
        "d9ffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff",
        "daffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff",
        "dbffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff",
    ];
    let mut keys = Vec::new();
    for h in list {
        let mut bytes = hex::decode(h).unwrap();
        keys.push(base64::engine::general_purpose::STANDARD.encode(&bytes));
        bytes[31] |= 0x80;
        keys.push(base64::engine::general_purpose::STANDARD.encode(&bytes));
    }
    keys
}

#[test]
fn small_order_public_keys_are_refused_at_registration() {
    let server = TestServer::start(&[("tiny", TINY_TOML)]);
    let keys = small_order_keys();
    assert!(keys.contains(&"AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=".to_string()));
    for key in keys {
        let (status, body) = register(&server, &key);
        assert_eq!(status, 400, "{key} was accepted: {body}");
        assert_eq!(
            json(body.as_bytes())["error"]["code"],
            "invalid_public_key",
            "{body}"
        );
    }
    assert_eq!(peers(&server), serde_json::json!([]));
    // A real key still registers and handshakes.
    let laptop = Laptop::register(&server);
    assert!(laptop.initiator().handshake(Duration::from_secs(5)));
}

#[test]
fn stored_small_order_key_is_disabled_when_the_server_starts() {
    let mut server = TestServer::start(&[("tiny", TINY_TOML)]);
    let good = Laptop::register(&server);
    let bad = PrivateKey::generate().public_key().to_base64();
    let (status, body) = register(&server, &bad);
    assert_eq!(status, 201, "{body}");
    server.kill();
    // A key stored before registration checked for small order.
    let db = rusqlite::Connection::open(server.data_dir().join("state.db")).unwrap();
    let changed = db
        .execute(
            "UPDATE peers SET public_key = ?1 WHERE public_key = ?2",
            ["AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=", bad.as_str()],
        )
        .unwrap();
    assert_eq!(changed, 1);
    drop(db);
    server.restart();
    let listed = peers(&server);
    let keys: Vec<&str> = listed
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["public_key"].as_str().unwrap())
        .collect();
    assert_eq!(
        keys,
        vec![good.key.public_key().to_base64().as_str()],
        "{listed}"
    );
    // The restarted hub listens on another port: ask again.
    let good = Laptop::register_key(&server, good.key);
    assert!(good.initiator().handshake(Duration::from_secs(5)));
}

/// boringtun advances a tunnel's clock only in `update_timers`; a peer the hub never heard from must still
/// get a session that lives: the first handshake comes 185 s after the peer was registered, then a packet a
/// second for three minutes (through a rekey at 120 s) must all arrive. Real time: about six minutes.
#[test]
fn first_session_long_after_registration_carries_traffic_for_three_minutes() {
    let server = TestServer::start(&[("tiny", TINY_TOML)]);
    let laptop = Laptop::register(&server);
    std::thread::sleep(Duration::from_secs(185));
    let mut tunnel = laptop.initiator();
    assert!(tunnel.handshake(Duration::from_secs(5)), "no handshake");
    let age = peers(&server)[0]["handshake_age_secs"].clone();
    assert!(
        age.as_u64().is_some_and(|a| a <= 2),
        "handshake_age_secs right after the first handshake: {age}"
    );
    let packet = laptop.packet(100);
    let start = Instant::now();
    let mut sent = 0u64;
    while start.elapsed() < Duration::from_secs(180) {
        tunnel.send(&packet);
        sent += packet.len() as u64;
        tunnel.pump(Duration::from_secs(1));
        if sent.is_multiple_of(3000) {
            let p = &peers(&server)[0];
            assert_eq!(
                p["rx_bytes"].as_u64(),
                Some(sent),
                "after {} s: {p}",
                start.elapsed().as_secs()
            );
        }
    }
    tunnel.pump(Duration::from_secs(1));
    let p = &peers(&server)[0];
    assert_eq!(p["rx_bytes"].as_u64(), Some(sent), "{p}");
    assert!(
        p["handshake_age_secs"].as_u64().is_some_and(|a| a <= 125),
        "the initiator rekeys after 120 s: {p}"
    );
}

/// Probes the hub with a fresh handshake every second until three in a row go unanswered; returns when the
/// last answered probe was sent. (Faster probes make the hub answer with cookie replies: after about ten
/// handshakes within a few seconds it counts itself under load.)
fn last_answered_handshake(laptop: &Laptop, within: Duration) -> Option<Instant> {
    let until = Instant::now() + within;
    let mut last = None;
    let mut unanswered = 0;
    while Instant::now() < until && unanswered < 3 {
        let sent = Instant::now();
        if laptop.initiator().handshake(Duration::from_millis(150)) {
            last = Some(sent);
            unanswered = 0;
        } else {
            unanswered += 1;
        }
        std::thread::sleep(Duration::from_millis(850));
    }
    assert!(unanswered >= 3, "the hub still answers {within:?} later");
    last
}

#[test]
fn revoke_stops_a_running_tunnel_within_a_second() {
    let server = TestServer::start(&[("tiny", TINY_TOML)]);
    let laptop = Laptop::register(&server);
    let mut tunnel = laptop.initiator();
    assert!(tunnel.handshake(Duration::from_secs(5)));
    let packet = laptop.packet(100);
    for _ in 0..5 {
        tunnel.send(&packet);
    }
    tunnel.pump(Duration::from_millis(300));
    assert_eq!(peers(&server)[0]["rx_bytes"], 500);

    server
        .fcdev()
        .args(["server", "user", "revoke", "alice"])
        .assert()
        .success();
    let revoked = Instant::now();
    if let Some(last) = last_answered_handshake(&laptop, Duration::from_secs(8)) {
        assert!(
            last.duration_since(revoked) < Duration::from_secs(1),
            "the hub answered {:?} after the revoke",
            last.duration_since(revoked)
        );
    }
    // Gone from the store too: a new token for alice shows no peer.
    let out = server
        .fcdev()
        .args(["server", "user", "token", "alice"])
        .assert()
        .success()
        .get_output()
        .stdout
        .clone();
    let token = String::from_utf8(out).unwrap().trim().to_string();
    let (status, body) = http(&server.url, "GET", "/v1/peers", Some(&token), None);
    assert_eq!((status, body.as_str()), (200, "[]"));
}

#[test]
fn user_remove_stops_clusters_and_frees_peers_and_namespace() {
    let server = TestServer::start(&[("tiny", TINY_TOML)]);
    server.login();
    server.fcdev().arg("up").assert().success();
    assert_eq!(server.vm_processes(), 3);
    let laptop = Laptop::register(&server);
    assert!(laptop.initiator().handshake(Duration::from_secs(5)));

    server
        .fcdev()
        .args(["server", "user", "remove", "alice"])
        .assert()
        .success()
        .stdout(predicate::str::contains(
            "Removed `alice`: 1 cluster(s), 1 WireGuard peer(s)",
        ));
    assert_eq!(server.vm_processes(), 0, "alice's VMs still run");
    assert!(!server.data_dir().join("vms/alice").join("dev").exists());
    let users = server
        .fcdev()
        .args(["server", "user", "list"])
        .assert()
        .success()
        .get_output()
        .stdout
        .clone();
    assert!(!String::from_utf8_lossy(&users).contains("alice"));
    last_answered_handshake(&laptop, Duration::from_secs(8));
    let (status, _) = http(&server.url, "GET", "/v1/me", Some(&server.token), None);
    assert_eq!(status, 401);
    server
        .fcdev()
        .args(["server", "user", "remove", "alice"])
        .assert()
        .failure()
        .stderr(predicate::str::contains("no engineer `alice`"));

    // Added again, alice gets a namespace again (the lowest free one: hers).
    let out = server
        .fcdev()
        .args(["server", "user", "add", "alice"])
        .assert()
        .success()
        .get_output()
        .stdout
        .clone();
    let token = String::from_utf8(out).unwrap().trim().to_string();
    let (status, body) = http(&server.url, "PUT", "/v1/namespace", Some(&token), None);
    assert_eq!(status, 200, "{body}");
    assert_eq!(json(body.as_bytes())["subnet"], "10.240.0.0/24");
}

#[test]
fn namespace_exhaustion_hints_at_user_remove() {
    let server = TestServer::start(&[("tiny", TINY_TOML)]);
    server.login();
    {
        let store = fcdev::server::store::Store::open(&server.data_dir().join("state.db")).unwrap();
        for i in 0..fcdev::server::alloc::NAMESPACE_COUNT {
            let (user, _) = store.add_user(&format!("u{i}")).unwrap();
            store.ensure_namespace(&user).unwrap();
        }
    }
    server
        .fcdev()
        .arg("up")
        .assert()
        .failure()
        .stderr(predicate::str::contains("fcdev server user remove NAME"))
        .stderr(predicate::str::contains("fcdev down`").not());
}
