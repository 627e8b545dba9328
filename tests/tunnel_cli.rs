//! The real binaries end to end: `fcdev server` (process backend, the hub with its TUN) in a `host` network
//! namespace, `fcdev login` + `fcdev tunnel` in a `laptop` namespace, a stand-in VM (busybox httpd) on the
//! namespace's first VM address. Needs root and /dev/net/tun (fails, never skips, without them).

mod netns;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use netns::*;

const FCDEV: &str = env!("CARGO_BIN_EXE_fcdev");

struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn sigterm_and_wait(p: &mut Proc) -> std::process::ExitStatus {
    let pid = p.0.id().to_string();
    let _ = Command::new("kill").args(["-TERM", &pid]).status();
    for _ in 0..100 {
        if let Ok(Some(s)) = p.0.try_wait() {
            return s;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("fcdev tunnel did not stop on SIGTERM");
}

#[test]
fn fcdev_tunnel_against_fcdev_server() {
    require_root_and_tun();
    let tmp = tempfile::tempdir().unwrap();
    let cfg_dir = tmp.path().join("cfg");
    let data_dir = tmp.path().join("data");
    let nss = Namespaces::new(&["shost", "slaptop"]);
    let (host, laptop) = (nss.name("shost"), nss.name("slaptop"));
    must(&format!(
        "ip -n {host} link add lap0 type veth peer name up0 netns {laptop} && \
         ip -n {host} addr add 192.168.79.1/24 dev lap0 && ip -n {host} link set lap0 up && \
         ip -n {laptop} addr add 192.168.79.2/24 dev up0 && ip -n {laptop} link set up0 up"
    ));

    // The server: its API and hub on the host side of the veth, the hub's TUN in the host namespace.
    let mut server = Proc(
        Command::new("ip")
            .args([
                "netns",
                "exec",
                &host,
                FCDEV,
                "server",
                "--dev",
                "--backend",
                "process",
            ])
            .args([
                "--netns",
                "none",
                "--hub-tun",
                "fcdevhub",
                "--user",
                "alice",
            ])
            .args([
                "--listen",
                "192.168.79.1:7070",
                "--hub-listen",
                "192.168.79.1:51820",
            ])
            .arg("--data-dir")
            .arg(&data_dir)
            .arg("--images")
            .arg(tmp.path().join("images"))
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn fcdev server"),
    );
    let mut lines = BufReader::new(server.0.stdout.take().unwrap()).lines();
    let token = loop {
        let line = lines.next().expect("server output").expect("read");
        if let Some(t) = line.split_whitespace().find(|w| w.starts_with("fcd_")) {
            break t.to_string();
        }
    };
    std::thread::spawn(move || for _ in lines {});

    let fcdev = |args: &[&str]| {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &laptop, FCDEV])
            .args(args)
            .env("FCDEV_CONFIG_DIR", &cfg_dir);
        c
    };
    let mut login = fcdev(&[
        "login",
        "--server",
        "http://192.168.79.1:7070",
        "--token-stdin",
    ])
    .stdin(Stdio::piped())
    .stdout(Stdio::null())
    .spawn()
    .unwrap();
    use std::io::Write;
    login
        .stdin
        .take()
        .unwrap()
        .write_all(token.as_bytes())
        .unwrap();
    assert!(login.wait().unwrap().success(), "fcdev login");

    // Rootless first: no TUN, a SOCKS5 proxy.
    let mut tunnel = Proc(
        fcdev(&["tunnel", "--mode", "proxy", "--socks", "127.0.0.1:1080"])
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap(),
    );
    let mut out = BufReader::new(tunnel.0.stdout.take().unwrap());
    let mut first = String::new();
    out.read_line(&mut first).unwrap();
    std::thread::spawn(move || for _ in out.lines() {});
    // "Tunnel up (proxy mode): this machine is 10.240.N.2/32 in namespace alice ..."
    let address = first
        .split_whitespace()
        .find(|w| w.starts_with("10."))
        .unwrap_or_else(|| panic!("no address in `{first}`"))
        .trim_end_matches("/32")
        .to_string();
    let prefix = address.rsplit_once('.').unwrap().0.to_string();
    let vm = format!("{prefix}.10");
    // The stand-in VM on the namespace bridge address.
    let www = tmp.path().join("www");
    std::fs::create_dir_all(&www).unwrap();
    std::fs::write(www.join("index.html"), "hello from the vm").unwrap();
    must(&format!(
        "ip -n {host} link add vms type bridge && ip -n {host} addr add {vm}/24 dev vms && ip -n {host} link set vms up"
    ));
    let mut nss = nss;
    nss.spawn_bg(
        "shost",
        &format!("busybox httpd -f -p {vm}:80 -h {}", www.display()),
    );
    let socks = format!("--socks5 127.0.0.1:1080 http://{vm}/");
    let page = eventually(Duration::from_secs(10), || {
        let o = nss.sh("slaptop", &format!("curl -s --fail --max-time 3 {socks}"));
        o.status
            .success()
            .then(|| String::from_utf8_lossy(&o.stdout).into_owned())
    });
    assert_eq!(
        page.as_deref(),
        Some("hello from the vm"),
        "fcdev tunnel --mode proxy"
    );
    // The ProxyCommand `fcdev ssh` uses in rootless mode carries a byte stream through the tunnel.
    let relayed = nss.must(
        "slaptop",
        &format!(
            "printf 'GET / HTTP/1.0\\r\\n\\r\\n' | {FCDEV} __socks-connect 127.0.0.1:1080 {vm} 80"
        ),
    );
    assert!(
        relayed.contains("hello from the vm"),
        "__socks-connect: {relayed}"
    );
    assert!(
        sigterm_and_wait(&mut tunnel).success(),
        "clean exit on SIGTERM"
    );

    // TUN mode: plain curl to the VM address, and the device disappears on SIGTERM.
    let mut tunnel = Proc(
        fcdev(&["tunnel", "--mode", "tun", "--tun-name", "fcdevcli"])
            .stdout(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let page = eventually(Duration::from_secs(10), || {
        let o = nss.sh(
            "slaptop",
            &format!("curl -s --fail --max-time 3 http://{vm}/"),
        );
        o.status
            .success()
            .then(|| String::from_utf8_lossy(&o.stdout).into_owned())
    });
    assert_eq!(
        page.as_deref(),
        Some("hello from the vm"),
        "fcdev tunnel --mode tun"
    );
    // The API is reachable from the laptop namespace only.
    let status = nss.must(
        "slaptop",
        &format!(
            "FCDEV_CONFIG_DIR={} {FCDEV} status --json",
            tmp.path().join("cfg").display()
        ),
    );
    assert!(
        sigterm_and_wait(&mut tunnel).success(),
        "clean exit on SIGTERM"
    );
    assert!(
        !nss.sh("slaptop", "ip link show fcdevcli").status.success(),
        "the TUN device outlived fcdev tunnel"
    );

    // The private key stays on the laptop (0600); the server only ever saw the public key.
    let key_file = tmp.path().join("cfg/keys/default.key");
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&key_file).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "key file mode");
    let private = std::fs::read_to_string(&key_file)
        .unwrap()
        .trim()
        .to_string();
    let public = fcdev::tunnel::keys::public_key_of_file(&key_file).unwrap();
    assert!(status.contains(&public), "status lists this peer: {status}");
    assert!(
        !status.contains(&private),
        "the private key reached the server"
    );
    let db = run(&format!(
        "grep -rc -F '{private}' {} || true",
        data_dir.display()
    ));
    let hits: u32 = String::from_utf8_lossy(&db.stdout)
        .lines()
        .filter_map(|l| l.rsplit(':').next()?.parse::<u32>().ok())
        .sum();
    assert_eq!(hits, 0, "the private key is in the server's data dir");
    let v: serde_json::Value = serde_json::from_str(&status).unwrap();
    let peer = &v["peers"][0];
    assert!(
        peer["rx_bytes"].as_u64().unwrap_or(0) > 0,
        "hub counters reach the API: {peer}"
    );
    drop(tunnel);
    drop(server);
}
