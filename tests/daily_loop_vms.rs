//! The engineer's daily loop against real VMs: `fcdev server` (qemu backend, the tiny image's onboarding
//! snapshot, the hub with its TUN) in a `host` network namespace, a laptop in its own namespace on a LAN bridge.
//! `fcdev logs` shows a real console; `fcdev tunnel --wg-config` loaded by Debian's wireguard-go + `wg setconf`
//! (on the file stripped by `wg-quick strip`) reaches n1; the rootless tunnel's HTTP proxy reaches f1 and m1.
//!
//! Needs root, /dev/net/tun, qemu-system-x86, linux-image-cloud-amd64, busybox-static, wireguard-go and
//! wireguard-tools: a missing piece fails the test with a message, it never skips. Every packet stays inside
//! namespaces this test creates (deleted at the end).

mod lab;
mod netns;

use std::time::Duration;

use lab::*;
use netns::*;

fn require_wireguard_tools() {
    for (tool, package) in [
        ("wireguard-go", "wireguard-go"),
        ("wg", "wireguard-tools"),
        ("wg-quick", "wireguard-tools"),
    ] {
        assert!(
            run(&format!("command -v {tool}")).status.success(),
            "this test needs `{tool}` (Debian package {package}; scripts/install-packages.sh installs it)"
        );
    }
}

#[test]
fn logs_stock_wireguard_and_the_http_proxy_reach_real_vms() {
    require_wireguard_tools();
    let lab = TinyLab::start("dhost", "dlaptop", "192.168.85");
    let (tmp, data_dir, nss, alice) = (&lab.tmp, &lab.data_dir, &lab.nss, lab.alice());
    let up: serde_json::Value = serde_json::from_str(&alice.ok(&["up", "--json"])).unwrap();
    assert_eq!(up["state"], "ready", "{up}");
    let n1 = up["vms"][0]["address"].as_str().unwrap().to_string();

    // The console of a real VM, and the VMs there are for a name that is not one.
    let console = alice.ok(&["logs", "n1", "--lines", "200"]);
    eprintln!("--- fcdev logs n1 ---\n{console}");
    assert!(!console.trim().is_empty(), "n1's console log is empty");
    let unknown = alice.fcdev(&["logs", "n9"]).output().unwrap();
    assert_eq!(unknown.status.code(), Some(4));
    let stderr = String::from_utf8_lossy(&unknown.stderr);
    assert!(stderr.contains("n1, f1, m1"), "{stderr}");

    // A wg-quick file: twice, the same key and address; private to its owner.
    let conf = tmp.path().join("fcdev.conf");
    let conf_s = conf.display().to_string();
    alice.ok(&["tunnel", "--wg-config", &conf_s]);
    let first = std::fs::read_to_string(&conf).unwrap();
    alice.ok(&["tunnel", "--wg-config", &conf_s]);
    let second = std::fs::read_to_string(&conf).unwrap();
    assert_eq!(
        first, second,
        "a second --wg-config changed the key or address"
    );
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&conf).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "the config holds a private key");
    let field = |name: &str| {
        first
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{name} = ")))
            .unwrap_or_else(|| panic!("no {name} in\n{first}"))
            .to_string()
    };
    let private = field("PrivateKey");
    let key_file = std::fs::read_to_string(alice.cfg.join("keys/default.key")).unwrap();
    assert_eq!(private, key_file.trim(), "the key is the laptop's key file");
    let grep = run(&format!(
        "grep -rl -F '{private}' {} || true",
        data_dir.display()
    ));
    assert!(
        grep.stdout.is_empty(),
        "the private key reached the server: {}",
        String::from_utf8_lossy(&grep.stdout)
    );

    // Stock WireGuard: wireguard-go + wg setconf on the stripped file, inside the laptop namespace.
    let stripped = nss.must("dlaptop", &format!("wg-quick strip {conf_s}"));
    assert!(!stripped.contains("Address"), "{stripped}");
    let stripped_file = tmp.path().join("stripped.conf");
    std::fs::write(&stripped_file, &stripped).unwrap();
    let wireguard_go = Proc(
        std::process::Command::new("ip")
            .args(["netns", "exec", &alice.ns, "wireguard-go", "-f", "wgfc0"])
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("spawn wireguard-go"),
    );
    assert!(
        eventually(Duration::from_secs(10), || {
            nss.sh("dlaptop", "ip link show wgfc0")
                .status
                .success()
                .then_some(())
        })
        .is_some(),
        "wireguard-go made no device"
    );
    // wireguard-go's own TUN device, not the kernel's WireGuard.
    let details = nss.must("dlaptop", "ip -d link show wgfc0");
    assert!(details.contains("tun"), "{details}");
    nss.must(
        "dlaptop",
        &format!(
            "wg setconf wgfc0 {} && ip addr add {} dev wgfc0 && ip link set wgfc0 mtu {} up && ip route add {} dev wgfc0",
            stripped_file.display(),
            field("Address"),
            field("MTU"),
            field("AllowedIPs"),
        ),
    );
    let page = alice.curl(&format!("http://{n1}/"));
    assert!(
        page.as_deref().is_some_and(|p| p.contains("vm n1")),
        "n1 through wireguard-go: {page:?}\n{}\n{}",
        String::from_utf8_lossy(&nss.sh("dlaptop", "wg show wgfc0; ip addr; ip route").stdout),
        alice.ok(&["status", "--json"])
    );
    // One key is one endpoint at the hub: stock WireGuard stops before fcdev's own tunnel starts.
    drop(wireguard_go);

    // The rootless tunnel's HTTP proxy: plain requests and CONNECT, names resolved by the proxy.
    let tunnel = alice.tunnel(&["--mode", "proxy", "--http", "127.0.0.1:8888"]);
    let page = alice.curl("-x http://127.0.0.1:8888 http://f1.alice.fcdev/");
    assert!(
        page.as_deref().is_some_and(|p| p.contains("vm f1")),
        "f1 through the HTTP proxy: {page:?}"
    );
    let page = alice.curl("--proxytunnel -x http://127.0.0.1:8888 http://m1.alice.fcdev/");
    assert!(
        page.as_deref().is_some_and(|p| p.contains("vm m1")),
        "m1 through CONNECT: {page:?}"
    );
    let unknown = nss.sh(
        "dlaptop",
        "curl -s --max-time 5 -w '%{http_code}' -x http://127.0.0.1:8888 http://x9.alice.fcdev/",
    );
    let unknown = String::from_utf8_lossy(&unknown.stdout).to_string();
    assert!(
        unknown.contains("unknown host `x9.alice.fcdev`") && unknown.ends_with("502"),
        "{unknown}"
    );
    drop(tunnel);

    alice.ok(&["down", "--yes"]);
}
