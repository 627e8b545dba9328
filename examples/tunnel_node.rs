//! Test and benchmark driver for the tunnel library until `fcdev tunnel` / `fcdev server` drive it:
//!
//! ```text
//! tunnel_node hub    --listen ADDR --key-file F [--tun NAME] [--keepalive S]
//! tunnel_node client --key-file F --config PEERCONFIG.json [--mode tun|proxy] [--tun NAME] [--socks ADDR] [-L L:VM:P]...
//! ```
//! Prints `READY ...` once started, then reads commands on stdin, one per line, answering on stdout:
//! hub: `add ID PUBKEY ADDRESS SUBNET`, `remove ID`, `stats`; client: `stats`, `rebind ADDR`.
//! Exits on EOF or `quit`.

use std::collections::HashMap;
use std::path::PathBuf;

use fcdev::api::PeerConfig;
use fcdev::tunnel::{Client, ClientOptions, Hub, HubConfig, HubPeer, PrivateKey, PublicKey};
use tokio::io::{AsyncBufReadExt, BufReader};

fn args() -> (String, HashMap<String, Vec<String>>) {
    let mut it = std::env::args().skip(1);
    let cmd = it.next().unwrap_or_default();
    let mut map: HashMap<String, Vec<String>> = HashMap::new();
    while let Some(k) = it.next() {
        let v = it.next().unwrap_or_default();
        map.entry(k).or_default().push(v);
    }
    (cmd, map)
}

fn one<'a>(m: &'a HashMap<String, Vec<String>>, k: &str) -> Option<&'a str> {
    m.get(k).and_then(|v| v.last()).map(String::as_str)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .init();
    let (cmd, a) = args();
    let key = PrivateKey::load(&PathBuf::from(
        one(&a, "--key-file").ok_or_else(|| anyhow::anyhow!("--key-file"))?,
    ))?;
    let mut lines = BufReader::new(tokio::io::stdin()).lines();
    match cmd.as_str() {
        "hub" => {
            let hub = Hub::start(HubConfig {
                listen: one(&a, "--listen").unwrap_or("127.0.0.1:51820").parse()?,
                private_key: key,
                tun_name: one(&a, "--tun").map(str::to_string),
                keepalive: one(&a, "--keepalive").unwrap_or("25").parse()?,
            })
            .await?;
            println!("READY {} {}", hub.public_key_base64(), hub.local_addr());
            while let Ok(Some(line)) = lines.next_line().await {
                let w: Vec<&str> = line.split_whitespace().collect();
                let reply = match w.as_slice() {
                    ["add", id, key, addr, subnet] => {
                        let r = hub.add_peer(HubPeer {
                            id: id.parse()?,
                            public_key: PublicKey::from_base64(key)?,
                            address: addr.parse()?,
                            subnet: subnet.parse()?,
                        });
                        match r {
                            Ok(()) => "OK".to_string(),
                            Err(e) => format!("ERR {e}"),
                        }
                    }
                    ["remove", id] => {
                        hub.remove_peer(id.parse()?);
                        "OK".into()
                    }
                    ["stats"] => {
                        let mut s = String::from("STATS");
                        for p in hub.stats() {
                            s.push_str(&format!(
                                " id={} hs={} rx={} tx={} dropped={} endpoint={}",
                                p.id,
                                p.handshake_age.map(|d| d.as_secs() as i64).unwrap_or(-1),
                                p.rx_bytes,
                                p.tx_bytes,
                                p.dropped,
                                p.endpoint.map(|e| e.to_string()).unwrap_or("-".into())
                            ));
                        }
                        s
                    }
                    ["quit"] => break,
                    _ => "ERR unknown command".into(),
                };
                println!("{reply}");
            }
            hub.shutdown();
        }
        "client" => {
            let cfg: PeerConfig = serde_json::from_str(&std::fs::read_to_string(
                one(&a, "--config").ok_or_else(|| anyhow::anyhow!("--config"))?,
            )?)?;
            let mut opts = ClientOptions::new(key, cfg);
            opts.mode = one(&a, "--mode").unwrap_or("auto").parse()?;
            if let Some(t) = one(&a, "--tun") {
                opts.tun_name = t.into();
            }
            opts.socks = one(&a, "--socks").map(str::parse).transpose()?;
            if let Some(b) = one(&a, "--bind") {
                opts.bind = b.parse()?;
            }
            for f in a.get("-L").into_iter().flatten() {
                opts.forwards.push(f.parse()?);
            }
            let client = Client::start(opts).await?;
            println!(
                "READY {:?} socks={} forwards={:?}",
                client.mode(),
                client
                    .socks_addr()
                    .map(|s| s.to_string())
                    .unwrap_or("-".into()),
                client.forward_addrs()
            );
            while let Ok(Some(line)) = lines.next_line().await {
                let w: Vec<&str> = line.split_whitespace().collect();
                let reply = match w.as_slice() {
                    ["stats"] => {
                        let s = client.stats();
                        format!(
                            "STATS hs={} rx={} tx={}",
                            s.handshake_age.map(|d| d.as_secs() as i64).unwrap_or(-1),
                            s.rx_bytes,
                            s.tx_bytes
                        )
                    }
                    ["rebind", addr] => match client.rebind(addr.parse()?).await {
                        Ok(()) => "OK".into(),
                        Err(e) => format!("ERR {e}"),
                    },
                    ["quit"] => break,
                    _ => "ERR unknown command".into(),
                };
                println!("{reply}");
            }
            client.shutdown().await;
        }
        _ => anyhow::bail!("usage: tunnel_node hub|client ..."),
    }
    Ok(())
}
