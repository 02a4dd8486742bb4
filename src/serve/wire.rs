//! HTTP/1.1 on a TCP connection, as much as an API server needs: requests read one after another
//! (keep-alive), each with a `Content-Length` or chunked body (after `100 Continue` when the client
//! expects it), and responses written whole or as a chunked stream. Every limit (line length,
//! header count, body size) is an error the caller answers with a status, never a panic.
//!
//! Why not a crate: tiny_http's connection pool queues a new connection behind busy ones when
//! several arrive at once, so of 8 simultaneous clients some were not read until others finished,
//! which defeats batching. Here each connection has its own thread from the start.

use std::io::{self, BufRead, Read, Write};

/// The longest request line or header line.
const MAX_LINE: u64 = 16 << 10;
const MAX_HEADERS: usize = 100;
/// The largest request body.
pub const MAX_BODY: usize = 8 << 20;

/// A request read off the connection.
#[derive(Debug)]
pub struct Request {
    pub method: String,
    /// The path, without the query string.
    pub path: String,
    pub body: Vec<u8>,
    /// Whether the connection stays open after the response (HTTP/1.1 without `Connection: close`).
    pub keep_alive: bool,
}

/// Why no request could be read: the connection ended, or the client sent something that is not
/// HTTP/1.1 within the limits (answered with `status`, then the connection is closed).
#[derive(Debug)]
pub enum ReadError {
    Closed,
    Bad { status: u16, message: String },
}

fn bad(status: u16, message: impl Into<String>) -> ReadError {
    ReadError::Bad { status, message: message.into() }
}

/// One line without its CRLF; `None` at the end of the stream.
fn line(r: &mut dyn BufRead) -> Result<Option<String>, ReadError> {
    let mut buf = Vec::new();
    let n = r.take(MAX_LINE + 1).read_until(b'\n', &mut buf).map_err(|_| ReadError::Closed)?;
    if n == 0 {
        return Ok(None);
    }
    if buf.last() != Some(&b'\n') {
        return Err(bad(431, format!("a request line or header is longer than {MAX_LINE} bytes")));
    }
    while matches!(buf.last(), Some(b'\n' | b'\r')) {
        buf.pop();
    }
    String::from_utf8(buf).map(Some).map_err(|_| bad(400, "the request head is not UTF-8 text"))
}

/// Reads the next request; `out` gets `100 Continue` when the client waits for it.
pub fn read_request(r: &mut dyn BufRead, out: &mut dyn Write) -> Result<Request, ReadError> {
    let first = loop {
        match line(r)? {
            None => return Err(ReadError::Closed),
            // Blank lines before a request are allowed (RFC 9112, 2.2).
            Some(l) if l.is_empty() => continue,
            Some(l) => break l,
        }
    };
    let mut parts = first.split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(bad(400, format!("not an HTTP request line: {first:?}")));
    };
    if version != "HTTP/1.1" && version != "HTTP/1.0" {
        return Err(bad(505, format!("{version} is not supported; kiln speaks HTTP/1.1")));
    }
    let mut length = None;
    let (mut chunked, mut expect_continue) = (false, false);
    let mut keep_alive = version == "HTTP/1.1";
    for n in 0.. {
        let Some(header) = line(r)? else { return Err(ReadError::Closed) };
        if header.is_empty() {
            break;
        }
        if n == MAX_HEADERS {
            return Err(bad(431, format!("more than {MAX_HEADERS} headers")));
        }
        let Some((name, value)) = header.split_once(':') else {
            return Err(bad(400, format!("not a header: {header:?}")));
        };
        let value = value.trim();
        match name.trim().to_ascii_lowercase().as_str() {
            "content-length" => {
                length = Some(
                    value.parse::<usize>().map_err(|_| bad(400, format!("bad Content-Length {value:?}")))?,
                )
            }
            "transfer-encoding" => chunked = value.eq_ignore_ascii_case("chunked"),
            "expect" => expect_continue = value.eq_ignore_ascii_case("100-continue"),
            "connection" => {
                let v = value.to_ascii_lowercase();
                keep_alive = (keep_alive || v.contains("keep-alive")) && !v.contains("close");
            }
            _ => {}
        }
    }
    if length.is_some_and(|n| n > MAX_BODY) {
        return Err(bad(413, format!("the request body is larger than {MAX_BODY} bytes")));
    }
    if expect_continue && (chunked || length.is_some_and(|n| n > 0)) {
        out.write_all(b"HTTP/1.1 100 Continue\r\n\r\n")
            .and_then(|()| out.flush())
            .map_err(|_| ReadError::Closed)?;
    }
    let body = if chunked {
        read_chunked(r)?
    } else {
        let mut body = vec![0; length.unwrap_or(0)];
        r.read_exact(&mut body).map_err(|_| ReadError::Closed)?;
        body
    };
    let path = target.split('?').next().unwrap_or("").to_string();
    Ok(Request { method: method.to_string(), path, body, keep_alive })
}

fn read_chunked(r: &mut dyn BufRead) -> Result<Vec<u8>, ReadError> {
    let mut body = Vec::new();
    loop {
        let Some(size) = line(r)? else { return Err(ReadError::Closed) };
        let hex = size.split(';').next().unwrap_or("").trim();
        let n = usize::from_str_radix(hex, 16).map_err(|_| bad(400, format!("bad chunk size {size:?}")))?;
        if n == 0 {
            // Trailers, up to the blank line.
            while line(r)?.is_some_and(|l| !l.is_empty()) {}
            return Ok(body);
        }
        if body.len() + n > MAX_BODY {
            return Err(bad(413, format!("the request body is larger than {MAX_BODY} bytes")));
        }
        let start = body.len();
        body.resize(start + n, 0);
        r.read_exact(&mut body[start..]).map_err(|_| ReadError::Closed)?;
        line(r)?;
    }
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        413 => "Content Too Large",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        503 => "Service Unavailable",
        505 => "HTTP Version Not Supported",
        _ => "",
    }
}

/// Writes a whole response with a JSON body.
pub fn respond(
    w: &mut dyn Write,
    status: u16,
    headers: &[(&str, String)],
    body: &[u8],
    keep_alive: bool,
) -> io::Result<()> {
    let mut head = format!("HTTP/1.1 {status} {}\r\nContent-Type: application/json\r\n", reason(status));
    for (name, value) in headers {
        head += &format!("{name}: {value}\r\n");
    }
    head += &format!(
        "Content-Length: {}\r\nConnection: {}\r\n\r\n",
        body.len(),
        if keep_alive { "keep-alive" } else { "close" }
    );
    w.write_all(head.as_bytes())?;
    w.write_all(body)?;
    w.flush()
}

/// A response streamed as server-sent events, each one HTTP chunk, sent at once.
pub struct EventStream<'w> {
    w: &'w mut dyn Write,
}

impl<'w> EventStream<'w> {
    /// Writes the head; the connection closes after the stream.
    pub fn start(w: &'w mut dyn Write, headers: &[(&str, String)]) -> io::Result<EventStream<'w>> {
        let mut head = String::from(
            "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\n\
             Transfer-Encoding: chunked\r\nConnection: close\r\n",
        );
        for (name, value) in headers {
            head += &format!("{name}: {value}\r\n");
        }
        head += "\r\n";
        w.write_all(head.as_bytes())?;
        w.flush()?;
        Ok(EventStream { w })
    }

    /// `data: {data}` as one event.
    pub fn event(&mut self, data: &str) -> io::Result<()> {
        let payload = format!("data: {data}\n\n");
        write!(self.w, "{:x}\r\n{payload}\r\n", payload.len())?;
        self.w.flush()
    }

    pub fn end(self) -> io::Result<()> {
        self.w.write_all(b"0\r\n\r\n")?;
        self.w.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(input: &str) -> (Result<Request, ReadError>, String) {
        let mut out = Vec::new();
        let r = read_request(&mut input.as_bytes(), &mut out);
        (r, String::from_utf8(out).unwrap())
    }

    #[test]
    fn requests_are_framed_by_length_or_chunks() {
        let (r, out) = read("POST /v1/completions?x=1 HTTP/1.1\r\nContent-Length: 4\r\n\r\nbodyNEXT");
        let r = r.unwrap();
        assert_eq!(
            (r.method.as_str(), r.path.as_str(), &r.body[..], r.keep_alive),
            ("POST", "/v1/completions", &b"body"[..], true)
        );
        assert_eq!(out, "");
        let (r, out) = read(
            "POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nExpect: 100-continue\r\nConnection: close\r\n\r\n\
             3\r\nabc\r\n2;x=y\r\nde\r\n0\r\n\r\n",
        );
        let r = r.unwrap();
        assert_eq!((&r.body[..], r.keep_alive), (&b"abcde"[..], false));
        assert_eq!(out, "HTTP/1.1 100 Continue\r\n\r\n");
        assert!(!read("GET / HTTP/1.0\r\n\r\n").0.unwrap().keep_alive);
    }

    #[test]
    fn bad_requests_are_errors_with_a_status() {
        let status = |input: &str| match read(input).0 {
            Err(ReadError::Bad { status, .. }) => status,
            other => panic!("{other:?}"),
        };
        assert_eq!(status("hello\r\n\r\n"), 400);
        assert_eq!(status("GET / HTTP/2\r\n\r\n"), 505);
        assert_eq!(status("GET / HTTP/1.1\r\nno colon\r\n\r\n"), 400);
        assert_eq!(status("POST / HTTP/1.1\r\nContent-Length: x\r\n\r\n"), 400);
        assert_eq!(status(&format!("POST / HTTP/1.1\r\nContent-Length: {}\r\n\r\n", MAX_BODY + 1)), 413);
        assert_eq!(status(&format!("GET /{} HTTP/1.1\r\n\r\n", "a".repeat(MAX_LINE as usize))), 431);
        assert!(matches!(read("").0, Err(ReadError::Closed)));
        assert!(matches!(
            read("POST / HTTP/1.1\r\nContent-Length: 9\r\n\r\nshort").0,
            Err(ReadError::Closed)
        ));
    }
}
