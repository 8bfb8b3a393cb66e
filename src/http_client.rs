//! A minimal blocking HTTP/1.1 client with keep-alive, for `shale bench` and the tests.
//!
//! Only what a load generator needs: one request at a time per connection, Content-Length
//! bodies (the servers it talks to, shale among them, answer with Content-Length or chunked).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::time::Duration;

pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Response {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// A keep-alive connection to one server.
pub struct Client {
    reader: BufReader<TcpStream>,
    host: String,
    head: Vec<u8>,
}

impl Client {
    pub fn connect(addr: SocketAddr) -> std::io::Result<Client> {
        Self::connect_with_timeouts(addr, Duration::from_secs(5), Duration::from_secs(120))
    }

    /// [`Self::connect`] with its own bounds on connecting and on each read (health probes
    /// must not wait long for a silent peer).
    pub fn connect_with_timeouts(
        addr: SocketAddr,
        connect: Duration,
        read: Duration,
    ) -> std::io::Result<Client> {
        let stream = TcpStream::connect_timeout(&addr, connect)?;
        stream.set_read_timeout(Some(read))?;
        stream.set_write_timeout(Some(read))?;
        stream.set_nodelay(true)?;
        Ok(Client {
            reader: BufReader::with_capacity(64 * 1024, stream),
            host: addr.to_string(),
            head: Vec::with_capacity(512),
        })
    }

    /// Sends one request and reads the whole response.
    pub fn request(
        &mut self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> std::io::Result<Response> {
        self.head.clear();
        write!(
            self.head,
            "{method} {path} HTTP/1.1\r\nhost: {}\r\ncontent-length: {}\r\n",
            self.host,
            body.len()
        )?;
        for (name, value) in headers {
            write!(self.head, "{name}: {value}\r\n")?;
        }
        self.head.extend_from_slice(b"\r\n");
        let stream = self.reader.get_mut();
        stream.write_all(&self.head)?;
        stream.write_all(body)?;
        stream.flush()?;
        self.read_response(method == "HEAD")
    }

    fn read_response(&mut self, head_only: bool) -> std::io::Result<Response> {
        let mut line = String::new();
        if self.reader.read_line(&mut line)? == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "connection closed before a response",
            ));
        }
        let status: u16 = line
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| std::io::Error::other(format!("bad status line {line:?}")))?;
        let mut headers = Vec::new();
        let mut content_length = None;
        let mut chunked = false;
        loop {
            line.clear();
            self.reader.read_line(&mut line)?;
            let trimmed = line.trim_end();
            if trimmed.is_empty() {
                break;
            }
            if let Some((name, value)) = trimmed.split_once(':') {
                let (name, value) = (name.trim().to_string(), value.trim().to_string());
                if name.eq_ignore_ascii_case("content-length") {
                    content_length = value.parse::<usize>().ok();
                } else if name.eq_ignore_ascii_case("transfer-encoding")
                    && value.eq_ignore_ascii_case("chunked")
                {
                    chunked = true;
                }
                headers.push((name, value));
            }
        }
        let mut body = Vec::new();
        if head_only || status == 204 || status == 304 {
        } else if chunked {
            loop {
                line.clear();
                self.reader.read_line(&mut line)?;
                let size = usize::from_str_radix(line.trim().split(';').next().unwrap_or(""), 16)
                    .map_err(|_| std::io::Error::other("bad chunk size"))?;
                if size == 0 {
                    line.clear();
                    self.reader.read_line(&mut line)?;
                    break;
                }
                let start = body.len();
                body.resize(start + size, 0);
                self.reader.read_exact(&mut body[start..])?;
                line.clear();
                self.reader.read_line(&mut line)?;
            }
        } else if let Some(length) = content_length {
            body.resize(length, 0);
            self.reader.read_exact(&mut body)?;
        }
        Ok(Response {
            status,
            headers,
            body,
        })
    }
}

/// Resolves `http://host:port` (or `host:port`) to a socket address.
pub fn resolve(target: &str) -> std::io::Result<SocketAddr> {
    let authority = target
        .trim_start_matches("http://")
        .split('/')
        .next()
        .unwrap_or(target);
    authority.to_socket_addrs()?.next().ok_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::NotFound,
            format!("{target} resolves to no address"),
        )
    })
}

/// One request on a fresh connection.
pub fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> std::io::Result<Response> {
    Client::connect(addr)?.request(method, path, headers, body)
}
