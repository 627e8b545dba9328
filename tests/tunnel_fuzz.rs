//! Malformed UDP datagrams and malformed inner packets never panic the hub or the client. Randomized (seeded,
//! printed) loops over loopback; no root needed (the hub runs without a TUN device).

use std::net::{SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

use fcdev::api::PeerConfig;
use fcdev::tunnel::peer::{Outcome, Peer};
use fcdev::tunnel::plan::Plan;
use fcdev::tunnel::rootless::RootlessClient;
use fcdev::tunnel::{Hub, HubConfig, HubPeer, PrivateKey};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

fn seed() -> u64 {
    let s = std::env::var("FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random);
    eprintln!("FUZZ_SEED={s}");
    s
}

/// A datagram that often looks like WireGuard: right type byte, right length, random body.
fn garbage_datagram(rng: &mut impl Rng) -> Vec<u8> {
    let len = match rng.gen_range(0..6) {
        0 => 148,
        1 => 92,
        2 => 64,
        3 => rng.gen_range(32..1500),
        4 => rng.gen_range(0..8),
        _ => rng.gen_range(0..3000),
    };
    let mut d = vec![0u8; len];
    rng.fill(&mut d[..]);
    if len >= 4 && rng.gen_bool(0.7) {
        d[0] = rng.gen_range(1..=4);
        d[1..4].fill(0);
    }
    d
}

/// An inner packet: random bytes, or an IPv4 header with chosen/random addresses and random rest.
fn garbage_inner(rng: &mut impl Rng, src: [u8; 4], dst: [u8; 4]) -> Vec<u8> {
    let len = rng.gen_range(0..1400);
    let mut p = vec![0u8; len];
    rng.fill(&mut p[..]);
    if len >= 20 && rng.gen_bool(0.8) {
        p[0] = if rng.gen_bool(0.9) { 0x45 } else { rng.gen() };
        if rng.gen_bool(0.5) {
            p[2..4].copy_from_slice(&(len as u16).to_be_bytes());
        }
        p[9] = [6u8, 17, 1, rng.gen()][rng.gen_range(0..4)];
        if rng.gen_bool(0.6) {
            p[12..16].copy_from_slice(&src);
            p[16..20].copy_from_slice(&dst);
        }
    }
    p
}

/// Drives a handshake between `peer` and the other end on `sock` until data can flow.
fn handshake(peer: &mut Peer, sock: &UdpSocket, to: SocketAddr) {
    let mut out = vec![0u8; 65600];
    let mut buf = vec![0u8; 65600];
    if let Outcome::Network(d) = peer.initiate(&mut out) {
        sock.send_to(d, to).unwrap();
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while peer.stats().handshake_age.is_none() {
        assert!(Instant::now() < deadline, "no handshake");
        let Ok((n, from)) = sock.recv_from(&mut buf) else {
            continue;
        };
        if let Outcome::Network(d) = peer.decapsulate(from, &buf[..n], &mut out) {
            sock.send_to(d, to).unwrap();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hub_survives_garbage() {
    let mut rng = StdRng::seed_from_u64(seed());
    let hub_key = PrivateKey::generate();
    let peer_key = PrivateKey::generate();
    let hub = Hub::start(HubConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        private_key: hub_key.clone(),
        tun_name: None,
        keepalive: 25,
    })
    .await
    .unwrap();
    hub.add_peer(HubPeer {
        id: 1,
        public_key: peer_key.public_key(),
        address: "10.240.1.2".parse().unwrap(),
        subnet: "10.240.1.0/24".parse().unwrap(),
    })
    .unwrap();
    let to = hub.local_addr();
    let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();

    // 1. Unauthenticated garbage.
    for _ in 0..20_000 {
        sock.send_to(&garbage_datagram(&mut rng), to).unwrap();
    }
    // 2. Authenticated garbage: a real peer sends malformed inner packets.
    let mut peer = Peer::new(&peer_key, hub_key.public_key(), None, 7, None);
    peer.set_endpoint(to);
    handshake(&mut peer, &sock, to);
    let mut out = vec![0u8; 65600];
    let sources = [
        [10, 240, 1, 2],
        [10, 240, 2, 2],
        [0, 0, 0, 0],
        [255, 255, 255, 255],
    ];
    let dests = [
        [10, 240, 1, 10],
        [10, 240, 2, 10],
        [127, 0, 0, 1],
        [224, 0, 0, 1],
    ];
    for i in 0..20_000 {
        let src = sources[rng.gen_range(0..sources.len())];
        let dst = dests[rng.gen_range(0..dests.len())];
        let inner = garbage_inner(&mut rng, src, dst);
        if let Outcome::Network(d) = peer.encapsulate(&inner, &mut out) {
            let mut d = d.to_vec();
            // Sometimes corrupt the ciphertext or truncate it.
            if i % 7 == 0 && d.len() > 20 {
                let at = rng.gen_range(16..d.len());
                d[at] ^= 0x55;
            }
            if i % 11 == 0 {
                d.truncate(rng.gen_range(0..d.len()));
            }
            sock.send_to(&d, to).unwrap();
        }
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let stats = hub.stats();
    eprintln!(
        "hub after fuzz: {stats:?}, unknown datagrams {}",
        hub.unknown_datagrams()
    );
    assert!(
        stats[0].dropped > 1000,
        "malformed inner packets must be dropped and counted"
    );
    assert!(hub.unknown_datagrams() > 1000);
    // 3. A flood of well-formed initiations from an unknown key puts the hub under load: it answers with
    //    cookie replies (type 3, 64 bytes) instead of doing Diffie-Hellman for each.
    let stranger = PrivateKey::generate();
    let mut cookies = 0;
    for i in 0..50 {
        let mut p = Peer::new(&stranger, hub_key.public_key(), None, 100 + i, None);
        if let Outcome::Network(d) = p.initiate(&mut out) {
            sock.send_to(d, to).unwrap();
        }
    }
    let mut buf = vec![0u8; 2048];
    let deadline = Instant::now() + Duration::from_secs(1);
    while Instant::now() < deadline {
        if let Ok((n, _)) = sock.recv_from(&mut buf) {
            if n == 64 && buf[0] == 3 {
                cookies += 1;
            }
        }
    }
    assert!(cookies > 0, "no cookie replies under load");
    std::thread::sleep(Duration::from_millis(1100));
    // 4. Still serving: a fresh peer handshakes.
    let mut again = Peer::new(&peer_key, hub_key.public_key(), None, 8, None);
    again.set_endpoint(to);
    handshake(&mut again, &sock, to);
    hub.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rootless_client_survives_garbage() {
    let mut rng = StdRng::seed_from_u64(seed());
    let hub_key = PrivateKey::generate();
    let client_key = PrivateKey::generate();
    // A fake hub: a bare peer on a loopback socket.
    let fake = UdpSocket::bind("127.0.0.1:0").unwrap();
    fake.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let cfg = PeerConfig {
        id: 1,
        name: "fuzz".into(),
        address: "10.240.1.2/32".into(),
        server_public_key: hub_key.public_key().to_base64(),
        endpoint: fake.local_addr().unwrap().to_string(),
        allowed_ips: vec!["10.240.1.0/24".into()],
        keepalive: 25,
        namespace: "fuzz".into(),
        dns_suffix: "fuzz.fcdev".into(),
        hosts: vec![],
    };
    let plan = Plan::from_config(&cfg).unwrap();
    let client = RootlessClient::start(
        &client_key,
        plan,
        "127.0.0.1:0".parse().unwrap(),
        Some("127.0.0.1:0".parse().unwrap()),
        None,
        &[],
    )
    .await
    .unwrap();
    // Answer the client's handshake initiation.
    let mut hub_peer = Peer::new(&hub_key, client_key.public_key(), None, 3, None);
    let mut buf = vec![0u8; 65600];
    let mut out = vec![0u8; 65600];
    let deadline = Instant::now() + Duration::from_secs(5);
    let client_addr = loop {
        assert!(Instant::now() < deadline, "no handshake from the client");
        let Ok((n, from)) = fake.recv_from(&mut buf) else {
            continue;
        };
        if let Outcome::Network(d) = hub_peer.decapsulate(from, &buf[..n], &mut out) {
            fake.send_to(d, from).unwrap();
            break from;
        }
    };
    for i in 0..20_000 {
        if i % 3 == 0 {
            fake.send_to(&garbage_datagram(&mut rng), client_addr)
                .unwrap();
            continue;
        }
        let src = [[10, 240, 1, 10], [10, 240, 9, 9]][rng.gen_range(0..2)];
        let inner = garbage_inner(&mut rng, src, [10, 240, 1, 2]);
        if let Outcome::Network(d) = hub_peer.encapsulate(&inner, &mut out) {
            fake.send_to(d, client_addr).unwrap();
        }
        if i % 500 == 0 {
            tokio::task::yield_now().await;
        }
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(client.is_running(), "the client's stack stopped");
    assert!(client.stats().handshake_age.is_some());
    client.shutdown().await;
}
