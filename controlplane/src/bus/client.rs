//! A minimal HTTP/1.1 client for the local API (the CLI and tests): one request per connection,
//! `Connection: close`, body read to the end. Why not a crate: the API is on localhost, plain HTTP,
//! and this is all the CLI needs.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use thiserror::Error;

/// Largest response read.
const MAX_RESPONSE: u64 = 16 << 20;

/// A request that failed before an HTTP status came back.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum ClientError {
    /// Connecting, sending or receiving failed.
    #[error("cannot talk to the API at {addr}: {source}")]
    Io {
        /// The API address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// The answer is not HTTP.
    #[error("the API at {0} sent a malformed response")]
    Malformed(SocketAddr),
}

/// Status and body of a response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    /// HTTP status code.
    pub status: u16,
    /// Body.
    pub body: Vec<u8>,
}

/// Sends `method path` with an optional JSON body; waits up to `timeout` for the answer.
pub fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: Option<&[u8]>,
    timeout: Duration,
) -> Result<Response, ClientError> {
    let io = |source| ClientError::Io { addr, source };
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).map_err(io)?;
    s.set_read_timeout(Some(timeout)).map_err(io)?;
    let body = body.unwrap_or(&[]);
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).map_err(io)?;
    s.write_all(body).map_err(io)?;
    let mut raw = Vec::new();
    // A 1 MiB message is ~1.4 MiB of base64; anything far beyond that is not our API.
    s.take(MAX_RESPONSE).read_to_end(&mut raw).map_err(io)?;
    parse_response(&raw).ok_or(ClientError::Malformed(addr))
}

fn parse_response(raw: &[u8]) -> Option<Response> {
    let split = raw.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = std::str::from_utf8(raw.get(..split)?).ok()?;
    let status = head.split_whitespace().nth(1)?.parse().ok()?;
    let mut body = raw.get(split + 4..)?.to_vec();
    let chunked = head.lines().any(|l| {
        let l = l.to_ascii_lowercase();
        l.starts_with("transfer-encoding:") && l.contains("chunked")
    });
    if chunked {
        body = dechunk(&body)?;
    }
    Some(Response { status, body })
}

fn dechunk(mut b: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let eol = b.windows(2).position(|w| w == b"\r\n")?;
        let size_text = std::str::from_utf8(b.get(..eol)?).ok()?;
        let size = usize::from_str_radix(size_text.split(';').next()?.trim(), 16).ok()?;
        b = b.get(eol + 2..)?;
        if size == 0 {
            return Some(out);
        }
        out.extend_from_slice(b.get(..size)?);
        b = b.get(size + 2..)?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_plain_and_chunked() {
        let r = parse_response(b"HTTP/1.1 201 Created\r\nA: b\r\n\r\n{\"id\":1}").expect("ok");
        assert_eq!((r.status, r.body.as_slice()), (201, &b"{\"id\":1}"[..]));
        let r = parse_response(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n",
        )
        .expect("ok");
        assert_eq!(r.body, b"abcde");
        assert!(parse_response(b"garbage").is_none());
        assert!(
            parse_response(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n")
                .is_none()
        );
    }
}
