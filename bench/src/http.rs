//! A minimal blocking HTTP/1.1 client for the agent's Unix socket: one request per connection
//! (`Connection: close`), the answer read to the end. The benchmark uses it to drive agents
//! (stage, follow a task, read status) outside the measured paths' hot loops.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use serde_json::Value;

use crate::{BenchError, Result};

/// An HTTP answer.
#[derive(Debug, Clone)]
pub struct Reply {
    /// Status code.
    pub status: u16,
    /// The body parsed as JSON (`Null` if it is not JSON).
    pub json: Value,
    /// The raw body.
    pub body: Vec<u8>,
}

/// Sends `method path` with an optional JSON body on the Unix socket `socket`.
pub fn request(socket: &Path, method: &str, path: &str, body: Option<&Value>) -> Result<Reply> {
    let what = || format!("{method} {path} on {}", socket.display());
    let mut stream = UnixStream::connect(socket).map_err(BenchError::io(what()))?;
    stream
        .set_read_timeout(Some(Duration::from_secs(120)))
        .map_err(BenchError::io(what()))?;
    let body = body.map(Value::to_string).unwrap_or_default();
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: agent\r\nConnection: close\r\n");
    if method != "GET" {
        req.push_str(&format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n",
            body.len()
        ));
    }
    req.push_str("\r\n");
    req.push_str(&body);
    stream
        .write_all(req.as_bytes())
        .map_err(BenchError::io(what()))?;
    let mut raw = Vec::new();
    stream
        .read_to_end(&mut raw)
        .map_err(BenchError::io(what()))?;
    parse(&raw).ok_or_else(|| BenchError::Run(format!("{}: malformed HTTP answer", what())))
}

/// Parses a whole HTTP/1.1 answer (Content-Length or chunked body).
pub fn parse(raw: &[u8]) -> Option<Reply> {
    let split = raw.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = String::from_utf8_lossy(&raw[..split]).to_ascii_lowercase();
    let status: u16 = head.split_whitespace().nth(1)?.parse().ok()?;
    let mut body = raw[split + 4..].to_vec();
    if head.contains("transfer-encoding: chunked") {
        body = dechunk(&body)?;
    }
    Some(Reply {
        status,
        json: serde_json::from_slice(&body).unwrap_or(Value::Null),
        body,
    })
}

fn dechunk(mut data: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let pos = data.windows(2).position(|w| w == b"\r\n")?;
        let size = String::from_utf8_lossy(&data[..pos]);
        let len = usize::from_str_radix(size.split(';').next()?.trim(), 16).ok()?;
        if len == 0 {
            return Some(out);
        }
        let start = pos + 2;
        out.extend_from_slice(data.get(start..start + len)?);
        data = data.get(start + len + 2..)?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_length_and_chunked_bodies() {
        let r = parse(b"HTTP/1.1 200 OK\r\ncontent-length: 7\r\n\r\n{\"a\":1}").expect("reply");
        assert_eq!(r.status, 200);
        assert_eq!(r.json["a"], 1);
        let r = parse(b"HTTP/1.1 202 Accepted\r\nTransfer-Encoding: chunked\r\n\r\n3\r\n{\"a\r\n4\r\n\":2}\r\n0\r\n\r\n")
            .expect("reply");
        assert_eq!(r.status, 202);
        assert_eq!(r.json["a"], 2);
        assert!(parse(b"HTTP/1.1 200").is_none());
    }
}
