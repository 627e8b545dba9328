//! The HTTP proxy of rootless mode, the protocol half: what a client asks for (`CONNECT host:port`, or a plain
//! request in absolute form `GET http://host[:port]/path`) and the request to send on for a plain one. The
//! streams themselves go through the rootless stack like SOCKS5's (`rootless.rs`).

/// The longest request head accepted (request line and headers).
pub const MAX_HEAD: usize = 16 * 1024;

/// What the client asked for.
#[derive(Debug, PartialEq, Eq)]
pub enum Request {
    /// A tunnel: answer `200` and splice.
    Connect { host: String, port: u16 },
    /// A plain request: send `head` (rewritten to origin form) to `host:port`, then splice.
    Forward {
        host: String,
        port: u16,
        head: Vec<u8>,
    },
}

/// Why a request head is refused: the status and a one-line reason for the client.
#[derive(Debug, PartialEq, Eq)]
pub struct Refusal {
    pub status: u16,
    pub reason: String,
}

fn refuse(status: u16, reason: impl Into<String>) -> Refusal {
    Refusal {
        status,
        reason: reason.into(),
    }
}

/// Where the head ends (the index after `\r\n\r\n`), once it has.
pub fn head_end(buf: &[u8]) -> Option<usize> {
    buf.windows(4).position(|w| w == b"\r\n\r\n").map(|i| i + 4)
}

/// `host[:port]` with a default port (IPv6 literals are not namespace addresses and are left to fail to resolve).
fn host_port(authority: &str, default: u16) -> Result<(String, u16), Refusal> {
    match authority.rsplit_once(':') {
        Some((h, p)) => p
            .parse()
            .map(|p| (h.to_string(), p))
            .map_err(|_| refuse(400, format!("bad port in `{authority}`"))),
        None => Ok((authority.to_string(), default)),
    }
}

/// Headers a proxy consumes and does not pass on (RFC 9110 §7.6.1, and the proxy's own).
fn hop_by_hop(name: &str) -> bool {
    [
        "connection",
        "proxy-connection",
        "keep-alive",
        "proxy-authorization",
    ]
    .iter()
    .any(|h| name.eq_ignore_ascii_case(h))
}

/// Parses a complete request head (ending with the blank line).
pub fn parse(head: &[u8]) -> Result<Request, Refusal> {
    let text = std::str::from_utf8(head).map_err(|_| refuse(400, "the request is not text"))?;
    let mut lines = text.split("\r\n");
    let first = lines.next().unwrap_or_default();
    let mut parts = first.split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(refuse(400, format!("bad request line `{first}`")));
    };
    if !version.starts_with("HTTP/1.") {
        return Err(refuse(400, format!("unsupported version `{version}`")));
    }
    if method.eq_ignore_ascii_case("CONNECT") {
        let (host, port) = host_port(target, 443)?;
        return Ok(Request::Connect { host, port });
    }
    let Some(rest) = target.strip_prefix("http://") else {
        return Err(refuse(
            400,
            format!(
                "`{target}`: a proxy request names its URL in full (http://HOST/PATH); for https use CONNECT"
            ),
        ));
    };
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    // Credentials in the URL are not the proxy's business.
    let authority = authority.rsplit('@').next().unwrap_or(authority);
    let (host, port) = host_port(authority, 80)?;
    // Origin form, the hop-by-hop headers dropped, and one request per connection: the next request of a
    // keep-alive client may be for another VM.
    let mut out = format!("{method} {path} {version}\r\n");
    for line in lines.filter(|l| !l.is_empty()) {
        let name = line.split(':').next().unwrap_or_default().trim();
        if !hop_by_hop(name) {
            out.push_str(line);
            out.push_str("\r\n");
        }
    }
    out.push_str("Connection: close\r\n\r\n");
    Ok(Request::Forward {
        host,
        port,
        head: out.into_bytes(),
    })
}

/// A short error response for the client.
pub fn error_response(status: u16, reason: &str) -> Vec<u8> {
    let text = match status {
        400 => "Bad Request",
        403 => "Forbidden",
        502 => "Bad Gateway",
        _ => "Error",
    };
    let body = format!("fcdev: {reason}\n");
    format!(
        "HTTP/1.1 {status} {text}\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// The answer to a CONNECT that reached its VM.
pub const CONNECTED: &[u8] = b"HTTP/1.1 200 Connection established\r\n\r\n";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connect_names_host_and_port() {
        let r = parse(b"CONNECT n1.alice.fcdev:443 HTTP/1.1\r\nHost: n1.alice.fcdev:443\r\n\r\n");
        assert_eq!(
            r,
            Ok(Request::Connect {
                host: "n1.alice.fcdev".into(),
                port: 443
            })
        );
    }

    #[test]
    fn plain_request_goes_on_in_origin_form() {
        let r = parse(
            b"GET http://f1.alice.fcdev:8080/a?b=1 HTTP/1.1\r\nHost: f1.alice.fcdev:8080\r\nProxy-Connection: keep-alive\r\nAccept: */*\r\n\r\n",
        )
        .unwrap();
        let Request::Forward { host, port, head } = r else {
            panic!("not forwarded")
        };
        assert_eq!((host.as_str(), port), ("f1.alice.fcdev", 8080));
        assert_eq!(
            String::from_utf8(head).unwrap(),
            "GET /a?b=1 HTTP/1.1\r\nHost: f1.alice.fcdev:8080\r\nAccept: */*\r\nConnection: close\r\n\r\n"
        );
        let Ok(Request::Forward { port, head, .. }) = parse(b"GET http://n1 HTTP/1.0\r\n\r\n")
        else {
            panic!("not forwarded")
        };
        assert_eq!(port, 80);
        assert!(head.starts_with(b"GET / HTTP/1.0\r\n"));
    }

    #[test]
    fn bad_requests_are_refused() {
        assert_eq!(parse(b"GET / HTTP/1.1\r\n\r\n").unwrap_err().status, 400);
        assert_eq!(parse(b"garbage\r\n\r\n").unwrap_err().status, 400);
        assert_eq!(
            parse(b"CONNECT n1:x HTTP/1.1\r\n\r\n").unwrap_err().status,
            400
        );
        assert_eq!(head_end(b"GET / HTTP/1.1\r\n\r\nbody"), Some(18));
        assert_eq!(head_end(b"GET / HTTP/1.1\r\n"), None);
    }
}
