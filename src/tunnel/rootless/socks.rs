//! The SOCKS5 proxy (CONNECT only; names resolved by the plan).

use super::*;

/// One SOCKS5 client, logged (not raised) when it fails.
pub(super) async fn serve_socks(stream: TcpStream, stack: StackHandle) {
    if let Err(e) = socks_session(stream, stack).await {
        tracing::debug!("SOCKS5: {e}");
    }
}

const SOCKS_OK: u8 = 0x00;
const SOCKS_FAIL: u8 = 0x01;
const SOCKS_UNREACHABLE: u8 = 0x04;
const SOCKS_REFUSED: u8 = 0x05;
const SOCKS_BAD_COMMAND: u8 = 0x07;
const SOCKS_BAD_ADDRESS: u8 = 0x08;

async fn socks_reply(stream: &mut TcpStream, code: u8) -> std::io::Result<()> {
    stream
        .write_all(&[0x05, code, 0x00, 0x01, 0, 0, 0, 0, 0, 0])
        .await
}

/// RFC 1928, no authentication, CONNECT only; names resolve against the namespace's VMs.
async fn socks_session(mut stream: TcpStream, stack: StackHandle) -> std::io::Result<()> {
    let mut head = [0u8; 2];
    stream.read_exact(&mut head).await?;
    if head[0] != 0x05 {
        return Ok(());
    }
    let mut methods = vec![0u8; usize::from(head[1])];
    stream.read_exact(&mut methods).await?;
    if !methods.contains(&0x00) {
        stream.write_all(&[0x05, 0xff]).await?;
        return Ok(());
    }
    stream.write_all(&[0x05, 0x00]).await?;
    let mut req = [0u8; 4];
    stream.read_exact(&mut req).await?;
    if req[0] != 0x05 {
        return Ok(());
    }
    let host: Option<Ipv4Addr> = match req[3] {
        0x01 => {
            let mut a = [0u8; 4];
            stream.read_exact(&mut a).await?;
            Some(Ipv4Addr::from(a))
        }
        0x03 => {
            let mut len = [0u8; 1];
            stream.read_exact(&mut len).await?;
            let mut name = vec![0u8; usize::from(len[0])];
            stream.read_exact(&mut name).await?;
            std::str::from_utf8(&name)
                .ok()
                .and_then(|n| stack.plan.resolve(n))
        }
        0x04 => {
            let mut a = [0u8; 16];
            stream.read_exact(&mut a).await?;
            None
        }
        _ => return socks_reply(&mut stream, SOCKS_BAD_ADDRESS).await,
    };
    let mut port = [0u8; 2];
    stream.read_exact(&mut port).await?;
    if req[1] != 0x01 {
        return socks_reply(&mut stream, SOCKS_BAD_COMMAND).await;
    }
    let Some(ip) = host else {
        return socks_reply(&mut stream, SOCKS_UNREACHABLE).await;
    };
    if !stack.plan.subnet.contains(ip) {
        return socks_reply(&mut stream, SOCKS_FAIL).await;
    }
    let dst = SocketAddrV4::new(ip, u16::from_be_bytes(port));
    match stack.open(dst).await {
        Some((tx, rx)) => {
            socks_reply(&mut stream, SOCKS_OK).await?;
            stack.splice(stream, tx, rx).await;
            Ok(())
        }
        None => socks_reply(&mut stream, SOCKS_REFUSED).await,
    }
}
