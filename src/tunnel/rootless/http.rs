//! The HTTP proxy: CONNECT and plain `http://` requests, names resolved like the SOCKS5 proxy's.

use super::*;

/// One HTTP proxy client, logged (not raised) when it fails.
pub(super) async fn serve_http(stream: TcpStream, stack: StackHandle) {
    if let Err(e) = http_session(stream, stack).await {
        tracing::debug!("HTTP proxy: {e}");
    }
}

/// One HTTP proxy connection: read the request head, resolve the VM like SOCKS5 does, open the stream through
/// the stack, then either answer a CONNECT or send the rewritten request on, and splice.
async fn http_session(mut stream: TcpStream, stack: StackHandle) -> std::io::Result<()> {
    use crate::tunnel::http_proxy::{self, Request};
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let end = loop {
        if let Some(end) = http_proxy::head_end(&buf) {
            break end;
        }
        if buf.len() > http_proxy::MAX_HEAD {
            let answer = http_proxy::error_response(400, "request head too large");
            return stream.write_all(&answer).await;
        }
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Ok(());
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let (host, port, first) = match http_proxy::parse(&buf[..end]) {
        Ok(Request::Connect { host, port }) => (host, port, None),
        Ok(Request::Forward { host, port, head }) => (host, port, Some(head)),
        Err(r) => {
            return stream
                .write_all(&http_proxy::error_response(r.status, &r.reason))
                .await
        }
    };
    let Some(ip) = stack.plan.resolve(&host) else {
        let reason = format!(
            "unknown host `{host}`: VMs are <vm>.{}.fcdev (or their addresses)",
            stack.plan.namespace
        );
        return stream
            .write_all(&http_proxy::error_response(502, &reason))
            .await;
    };
    if !stack.plan.subnet.contains(ip) {
        let reason = format!("{ip} is outside this namespace ({})", stack.plan.subnet);
        return stream
            .write_all(&http_proxy::error_response(403, &reason))
            .await;
    }
    let Some((tx, rx)) = stack.open(SocketAddrV4::new(ip, port)).await else {
        let reason = format!("{host}:{port} refused the connection or did not answer");
        return stream
            .write_all(&http_proxy::error_response(502, &reason))
            .await;
    };
    // What goes first: the rewritten request, or for CONNECT the answer; then what the client sent after the head.
    let mut ahead = match first {
        Some(head) => head,
        None => {
            stream.write_all(http_proxy::CONNECTED).await?;
            Vec::new()
        }
    };
    ahead.extend_from_slice(&buf[end..]);
    if !ahead.is_empty() {
        if tx.send(ahead).await.is_err() {
            return Ok(());
        }
        stack.wake.notify_one();
    }
    stack.splice(stream, tx, rx).await;
    Ok(())
}
