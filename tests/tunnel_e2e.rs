//! End to end across network namespaces: a hub with its TUN in `host`, engineers' clients in `laptop` and
//! `bob`, VMs stood in for by busybox httpd on namespace addresses inside `host`. Needs root and
//! /dev/net/tun (fails, never skips, without them).

mod netns;

use std::time::{Duration, Instant};

use fcdev::api::{HostEntry, PeerConfig};
use fcdev::tunnel::PrivateKey;
use netns::*;

struct Keys {
    dir: tempfile::TempDir,
}

impl Keys {
    fn new() -> Keys {
        Keys {
            dir: tempfile::tempdir().expect("tempdir"),
        }
    }
    fn key(&self, name: &str) -> (String, String) {
        let path = self.dir.path().join(format!("{name}.key"));
        let k = PrivateKey::load_or_generate(&path).expect("key");
        (path.display().to_string(), k.public_key().to_base64())
    }
    fn config(&self, name: &str, cfg: &PeerConfig) -> String {
        let path = self.dir.path().join(format!("{name}.json"));
        std::fs::write(&path, serde_json::to_string(cfg).expect("json")).expect("write");
        path.display().to_string()
    }
    fn www(&self, name: &str, body: &str) -> String {
        let dir = self.dir.path().join(format!("www-{name}"));
        std::fs::create_dir_all(&dir).expect("mkdir");
        std::fs::write(dir.join("index.html"), body).expect("write");
        dir.display().to_string()
    }
}

fn peer_config(ns: &str, n: u8, hub_ip: &str, hub_pub: &str) -> PeerConfig {
    PeerConfig {
        id: i64::from(n),
        name: "laptop".into(),
        address: format!("10.240.{n}.2/32"),
        server_public_key: hub_pub.into(),
        endpoint: format!("{hub_ip}:51820"),
        allowed_ips: vec![format!("10.240.{n}.0/24")],
        keepalive: 25,
        namespace: ns.into(),
        dns_suffix: "fcdev".into(),
        hosts: vec![HostEntry {
            name: "n1".into(),
            address: format!("10.240.{n}.10"),
        }],
    }
}

fn curl(nss: &Namespaces, role: &str, args: &str) -> Option<String> {
    let out = nss.sh(role, &format!("curl -s --fail --max-time 3 {args}"));
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

#[test]
fn tunnel_end_to_end() {
    require_root_and_tun();
    let keys = Keys::new();
    let mut nss = Namespaces::new(&["host", "laptop", "bob"]);
    let (host, laptop, bob) = (nss.name("host"), nss.name("laptop"), nss.name("bob"));
    // laptop <-> host and bob <-> host links; two namespaces' "VMs" on a dummy device in host.
    must(&format!(
        "ip -n {host} link add lap0 type veth peer name up0 netns {laptop} && \
         ip -n {host} addr add 192.168.77.1/24 dev lap0 && ip -n {host} link set lap0 up && \
         ip -n {laptop} addr add 192.168.77.2/24 dev up0 && ip -n {laptop} addr add 192.168.77.3/24 dev up0 && \
         ip -n {laptop} link set up0 up && \
         ip -n {host} link add bob0 type veth peer name up0 netns {bob} && \
         ip -n {host} addr add 192.168.78.1/24 dev bob0 && ip -n {host} link set bob0 up && \
         ip -n {bob} addr add 192.168.78.2/24 dev up0 && ip -n {bob} link set up0 up && \
         ip -n {host} link add vms type bridge && ip -n {host} addr add 10.240.1.10/24 dev vms && \
         ip -n {host} addr add 10.240.2.10/24 dev vms && ip -n {host} link set vms up"
    ));
    let www_alice = keys.www("alice", "hello from n1.alice");
    let www_bob = keys.www("bob", "hello from n1.bob");
    let www_laptop = keys.www("laptop", "hello from alice's laptop");
    nss.spawn_bg(
        "host",
        &format!("busybox httpd -f -p 10.240.1.10:80 -h {www_alice}"),
    );
    nss.spawn_bg(
        "host",
        &format!("busybox httpd -f -p 10.240.2.10:80 -h {www_bob}"),
    );

    let (hub_key, hub_pub) = keys.key("hub");
    let (alice_key, alice_pub) = keys.key("alice");
    let (bob_key, bob_pub) = keys.key("bob");
    let start_hub = |nss: &Namespaces| {
        let mut hub = nss.node(
            "host",
            &[
                "hub",
                "--listen",
                "0.0.0.0:51820",
                "--key-file",
                &hub_key,
                "--tun",
                "fcdevhub",
            ],
        );
        assert!(hub.ready.contains(&hub_pub), "{}", hub.ready);
        let add = format!("add 1 {alice_pub} 10.240.1.2 10.240.1.0/24");
        assert_eq!(hub.cmd(&add), "OK");
        let add = format!("add 2 {bob_pub} 10.240.2.2 10.240.2.0/24");
        assert_eq!(hub.cmd(&add), "OK");
        hub
    };
    let mut hub = start_hub(&nss);
    // A second peer may not take an address that is already used.
    assert!(hub
        .cmd(&format!("add 3 {bob_pub} 10.240.1.2 10.240.1.0/24"))
        .starts_with("ERR"));

    // --- TUN mode: laptop -> VM, VM -> laptop.
    let alice_cfg = keys.config("alice", &peer_config("alice", 1, "192.168.77.1", &hub_pub));
    let mut alice = nss.node(
        "laptop",
        &[
            "client",
            "--key-file",
            &alice_key,
            "--config",
            &alice_cfg,
            "--mode",
            "tun",
            "--tun",
            "fcdev0",
        ],
    );
    let page = eventually(Duration::from_secs(10), || {
        curl(&nss, "laptop", "http://10.240.1.10/")
    });
    assert_eq!(
        page.as_deref(),
        Some("hello from n1.alice"),
        "TUN mode: laptop -> VM"
    );
    // 100 MB each way, byte for byte: TUN offloads split and coalesce these, and on the outer socket UDP GSO
    // sends runs of datagrams as one and GRO hands them over coalesced.
    let big = std::path::Path::new(&www_alice).join("big.bin");
    must(&format!(
        "head -c 100000000 /dev/urandom > {}",
        big.display()
    ));
    let want = nss.must("host", &format!("sha256sum < {}", big.display()));
    let got = nss.must(
        "laptop",
        "curl -s --fail --max-time 30 http://10.240.1.10/big.bin | sha256sum",
    );
    assert_eq!(got, want, "100 MB VM -> laptop in TUN mode");
    let up = keys.dir.path().join("uploaded.bin");
    nss.spawn_bg(
        "host",
        &format!(
            "socat -u TCP-LISTEN:9000,bind=10.240.1.10,reuseaddr OPEN:{},creat,trunc",
            up.display()
        ),
    );
    std::thread::sleep(Duration::from_millis(300));
    nss.must(
        "laptop",
        &format!("socat -u FILE:{} TCP:10.240.1.10:9000", big.display()),
    );
    let uploaded = eventually(Duration::from_secs(20), || {
        let got = nss.must("host", &format!("sha256sum < {}", up.display()));
        (got == want).then_some(got)
    });
    assert!(uploaded.is_some(), "100 MB laptop -> VM in TUN mode");
    nss.spawn_bg(
        "laptop",
        &format!("busybox httpd -f -p 10.240.1.2:8000 -h {www_laptop}"),
    );
    let back = eventually(Duration::from_secs(5), || {
        curl(
            &nss,
            "host",
            "--interface 10.240.1.10 http://10.240.1.2:8000/",
        )
    });
    assert_eq!(
        back.as_deref(),
        Some("hello from alice's laptop"),
        "VM -> laptop at its peer address"
    );
    let stats = alice.cmd("stats");
    assert!(!stats.contains("hs=-1"), "client saw no handshake: {stats}");

    // --- Isolation: bob's peer reaches its own namespace, never alice's.
    let bob_cfg = keys.config("bob", &peer_config("bob", 2, "192.168.78.1", &hub_pub));
    let _bob_node = nss.node(
        "bob",
        &[
            "client",
            "--key-file",
            &bob_key,
            "--config",
            &bob_cfg,
            "--mode",
            "tun",
            "--tun",
            "fcdevb",
        ],
    );
    let page = eventually(Duration::from_secs(10), || {
        curl(&nss, "bob", "http://10.240.2.10/")
    });
    assert_eq!(
        page.as_deref(),
        Some("hello from n1.bob"),
        "bob -> bob's VM"
    );
    nss.spawn_bg(
        "bob",
        &format!("busybox httpd -f -p 10.240.2.2:8000 -h {www_laptop}"),
    );
    assert!(
        eventually(Duration::from_secs(5), || curl(
            &nss,
            "host",
            "--interface 10.240.2.10 http://10.240.2.2:8000/"
        ))
        .is_some(),
        "bob's VM -> bob's laptop"
    );
    // Count, on the host, every packet the hub delivers into alice's namespace from anyone but alice.
    nss.must(
        "host",
        "nft add table inet fcdevt && \
         nft add chain inet fcdevt pre '{ type filter hook prerouting priority -300; }' && \
         nft add rule inet fcdevt pre iifname fcdevhub ip daddr 10.240.1.0/24 ip saddr != 10.240.1.2 counter",
    );
    let before = hub.cmd("stats");
    // Route alice's namespace into bob's tunnel and spoof an address of alice's namespace on it.
    nss.must(
        "bob",
        "ip route add 10.240.1.0/24 dev fcdevb && ip addr add 10.240.1.5/32 dev fcdevb",
    );
    assert_eq!(
        curl(&nss, "bob", "http://10.240.1.10/"),
        None,
        "bob reached alice's VM"
    );
    assert_eq!(
        curl(&nss, "bob", "--interface 10.240.1.5 http://10.240.1.10/"),
        None,
        "spoofed source got through"
    );
    // Alice's VM may not reach bob's laptop either.
    assert_eq!(
        curl(
            &nss,
            "host",
            "--interface 10.240.1.10 http://10.240.2.2:8000/"
        ),
        None,
        "alice's VM reached bob's laptop"
    );
    let after = hub.cmd("stats");
    let num = |s: &str, id, f| hub_field(s, id, f).parse::<u64>().expect("number");
    assert!(
        num(&after, 2, "dropped") > num(&before, 2, "dropped") + 3,
        "drops not counted: {before} / {after}"
    );
    let counter = nss.must("host", "nft list chain inet fcdevt pre");
    assert!(
        counter.contains("packets 0 bytes 0"),
        "bytes from outside alice's peer reached alice's namespace: {counter}"
    );
    eprintln!("isolation: {before}\n        -> {after}");

    // --- Roaming: alice's laptop moves to another address and port; the hub follows.
    assert_eq!(alice.cmd("rebind 192.168.77.3:0"), "OK");
    let page = eventually(Duration::from_secs(10), || {
        curl(&nss, "laptop", "http://10.240.1.10/")
    });
    assert_eq!(
        page.as_deref(),
        Some("hello from n1.alice"),
        "after roaming"
    );
    let st = hub.cmd("stats");
    assert!(
        hub_field(&st, 1, "endpoint").starts_with("192.168.77.3:"),
        "hub did not follow: {st}"
    );

    // --- Hub restart: the client recovers without restarting.
    hub.stop();
    let t = Instant::now();
    let mut hub = start_hub(&nss);
    let page = eventually(Duration::from_secs(40), || {
        curl(&nss, "laptop", "http://10.240.1.10/")
    });
    assert_eq!(
        page.as_deref(),
        Some("hello from n1.alice"),
        "after hub restart"
    );
    eprintln!("recovered {:?} after the hub restart", t.elapsed());
    alice.stop();

    // --- Rootless mode: SOCKS5 (names resolved by the proxy) and -L.
    let mut alice = nss.node(
        "laptop",
        &[
            "client",
            "--key-file",
            &alice_key,
            "--config",
            &alice_cfg,
            "--mode",
            "proxy",
            "--socks",
            "127.0.0.1:1080",
            "-L",
            "8080:n1:80",
            "-L",
            "9001:n1:9001",
        ],
    );
    assert!(alice.ready.contains("Proxy"), "{}", alice.ready);
    let page = eventually(Duration::from_secs(10), || {
        curl(
            &nss,
            "laptop",
            "--socks5-hostname 127.0.0.1:1080 http://n1.alice.fcdev/",
        )
    });
    if page.is_none() {
        eprintln!("client: {}\nhub: {}", alice.cmd("stats"), hub.cmd("stats"));
    }
    assert_eq!(
        page.as_deref(),
        Some("hello from n1.alice"),
        "rootless: SOCKS5"
    );
    let page = curl(&nss, "laptop", "http://127.0.0.1:8080/");
    assert_eq!(page.as_deref(), Some("hello from n1.alice"), "rootless: -L");
    assert_eq!(
        curl(
            &nss,
            "laptop",
            "--socks5-hostname 127.0.0.1:1080 http://n1.bob.fcdev/"
        ),
        None,
        "rootless: other namespace"
    );
    // A larger body, checked byte for byte (flow control both ways).
    let got = nss.must(
        "laptop",
        "curl -s --fail --max-time 30 http://127.0.0.1:8080/big.bin | sha256sum",
    );
    assert_eq!(got, want, "100 MB VM -> laptop through -L");
    // …and the other way, through a second forward.
    let up2 = keys.dir.path().join("uploaded2.bin");
    nss.spawn_bg(
        "host",
        &format!(
            "socat -u TCP-LISTEN:9001,bind=10.240.1.10,reuseaddr OPEN:{},creat,trunc",
            up2.display()
        ),
    );
    std::thread::sleep(Duration::from_millis(300));
    nss.must(
        "laptop",
        &format!("socat -u FILE:{} TCP:127.0.0.1:9001", big.display()),
    );
    let uploaded = eventually(Duration::from_secs(20), || {
        let got = nss.must("host", &format!("sha256sum < {}", up2.display()));
        (got == want).then_some(got)
    });
    assert!(uploaded.is_some(), "100 MB laptop -> VM through -L");
    // Both at once: the upload's data goes through the sealing thread in full batches while the download's
    // acknowledgements are sealed on the stack task in between; neither may lose or reorder a byte.
    let up3 = keys.dir.path().join("uploaded3.bin");
    nss.spawn_bg(
        "host",
        &format!(
            "socat -u TCP-LISTEN:9001,bind=10.240.1.10,reuseaddr OPEN:{},creat,trunc",
            up3.display()
        ),
    );
    std::thread::sleep(Duration::from_millis(300));
    nss.spawn_bg(
        "laptop",
        &format!("socat -u FILE:{} TCP:127.0.0.1:9001", big.display()),
    );
    let got = nss.must(
        "laptop",
        "curl -s --fail --max-time 60 http://127.0.0.1:8080/big.bin | sha256sum",
    );
    assert_eq!(got, want, "100 MB VM -> laptop during an upload");
    let uploaded = eventually(Duration::from_secs(60), || {
        let got = nss.must("host", &format!("sha256sum < {}", up3.display()));
        (got == want).then_some(got)
    });
    assert!(uploaded.is_some(), "100 MB laptop -> VM during a download");
    alice.stop();
    let _ = hub.cmd("stats");
    hub.stop();
    drop(nss);
}
