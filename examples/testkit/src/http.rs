//! A tiny HTTP/1.1 server and client on std sockets: the tests' stand-ins for the rate-limit
//! service and the LLM upstream, and the client that talks to Envoy. Written here so every
//! byte on the wire is under the test's control (resets, garbage, delays).

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};

use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

#[derive(Debug, Clone, Default)]
pub struct Request {
    pub method: String,
    pub path: String,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Request {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or(serde_json::Value::Null)
    }
}

#[derive(Debug, Clone, Default)]
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Response {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or(serde_json::Value::Null)
    }
}

/// What a stand-in does with one request.
pub enum Behaviour {
    Reply(Response),
    /// Wait, then behave as told.
    Delay(Duration, Box<Behaviour>),
    /// Close the connection without answering.
    Reset,
    /// Write these bytes as they are and close.
    Raw(Vec<u8>),
    /// A response (with `content-length`) whose body is written in these pieces, each flushed
    /// on its own after `gap`: Envoy hands them to the plugin apart, split where the test says.
    Trickle {
        status: u16,
        headers: Vec<(String, String)>,
        pieces: Vec<Vec<u8>>,
        gap: Duration,
    },
}

pub fn reply(status: u16, content_type: &str, body: impl Into<Vec<u8>>) -> Behaviour {
    Behaviour::Reply(Response {
        status,
        headers: vec![("content-type".into(), content_type.into())],
        body: body.into(),
    })
}

pub fn json_reply(status: u16, value: serde_json::Value) -> Behaviour {
    reply(status, "application/json", value.to_string())
}

/// An upstream that uses exactly the `max_tokens` it is given (as completion tokens), so a
/// reservation of `max_tokens` is settled at its own size.
pub fn uses_max_tokens() -> Server {
    Server::start(|req| {
        let used = req.json()["max_tokens"].as_u64().unwrap_or(0);
        json_reply(
            200,
            serde_json::json!({"id": "chatcmpl-1", "choices": [], "usage": {"prompt_tokens": 0, "completion_tokens": used, "total_tokens": used}}),
        )
    })
}

/// Relays `req` to the JSON server on `port` and answers what it answered: a stand-in that
/// sits in front of the real service to delay or refuse some of its traffic.
pub fn forward(port: u16, req: &Request) -> Behaviour {
    let r = send(
        port,
        &req.method,
        &req.path,
        &[("content-type", "application/json")],
        &req.body,
    );
    reply(r.status, "application/json", r.body)
}

type Handler = Arc<dyn Fn(&Request) -> Behaviour + Send + Sync>;

/// A server on an ephemeral loopback port, stopped when dropped.
pub struct Server {
    pub port: u16,
    requests: Arc<Mutex<Vec<Request>>>,
    stop: Arc<AtomicBool>,
}

impl Server {
    pub fn start(handler: impl Fn(&Request) -> Behaviour + Send + Sync + 'static) -> Server {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let requests = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let handler: Handler = Arc::new(handler);
        let (reqs, stopping) = (requests.clone(), stop.clone());
        thread::spawn(move || {
            for conn in listener.incoming() {
                if stopping.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(conn) = conn else { continue };
                let (handler, reqs, stopping) = (handler.clone(), reqs.clone(), stopping.clone());
                thread::spawn(move || serve(conn, handler, reqs, stopping));
            }
        });
        Server {
            port,
            requests,
            stop,
        }
    }

    /// Every request received so far.
    pub fn requests(&self) -> Vec<Request> {
        self.requests.lock().unwrap().clone()
    }

    /// Requests other than usage reports: the checks, when this stands in for the service.
    pub fn checks(&self) -> Vec<Request> {
        let mut all = self.requests();
        all.retain(|r| !is_report(&r.path));
        all
    }

    /// The usage reports received (`/v1/report`, `/update_ratelimit_record`).
    pub fn reports(&self) -> Vec<Request> {
        let mut all = self.requests();
        all.retain(|r| is_report(&r.path));
        all
    }
}

fn is_report(path: &str) -> bool {
    path == "/v1/report" || path == "/update_ratelimit_record"
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(("127.0.0.1", self.port));
    }
}

fn serve(conn: TcpStream, handler: Handler, reqs: Arc<Mutex<Vec<Request>>>, stop: Arc<AtomicBool>) {
    let _ = conn.set_read_timeout(Some(Duration::from_secs(30)));
    let mut writer = match conn.try_clone() {
        Ok(w) => w,
        Err(_) => return,
    };
    let mut reader = BufReader::new(conn);
    while !stop.load(Ordering::SeqCst) {
        let Some(req) = read_request(&mut reader) else {
            return;
        };
        reqs.lock().unwrap().push(req.clone());
        let mut behaviour = handler(&req);
        loop {
            match behaviour {
                Behaviour::Delay(d, next) => {
                    thread::sleep(d);
                    behaviour = *next;
                }
                Behaviour::Reset => {
                    let _ = writer.shutdown(Shutdown::Both);
                    return;
                }
                Behaviour::Raw(bytes) => {
                    let _ = writer.write_all(&bytes);
                    let _ = writer.shutdown(Shutdown::Both);
                    return;
                }
                Behaviour::Trickle {
                    status,
                    headers,
                    pieces,
                    gap,
                } => {
                    let _ = writer.set_nodelay(true);
                    let length: usize = pieces.iter().map(Vec::len).sum();
                    let mut head = format!("HTTP/1.1 {status} X\r\ncontent-length: {length}\r\n");
                    for (k, v) in &headers {
                        head.push_str(&format!("{k}: {v}\r\n"));
                    }
                    head.push_str("\r\n");
                    if writer.write_all(head.as_bytes()).is_err() {
                        return;
                    }
                    for piece in pieces {
                        thread::sleep(gap);
                        if writer
                            .write_all(&piece)
                            .and_then(|_| writer.flush())
                            .is_err()
                        {
                            return;
                        }
                    }
                    break;
                }
                Behaviour::Reply(resp) => {
                    let mut head = format!(
                        "HTTP/1.1 {} X\r\ncontent-length: {}\r\n",
                        resp.status,
                        resp.body.len()
                    );
                    for (k, v) in &resp.headers {
                        head.push_str(&format!("{k}: {v}\r\n"));
                    }
                    head.push_str("\r\n");
                    if writer
                        .write_all(head.as_bytes())
                        .and_then(|_| writer.write_all(&resp.body))
                        .is_err()
                    {
                        return;
                    }
                    break;
                }
            }
        }
    }
}

fn read_head(reader: &mut impl BufRead) -> Option<(String, Vec<(String, String)>)> {
    // Lines as bytes: a header value need not be UTF-8 (it is read lossily here).
    let line = |reader: &mut dyn BufRead| {
        let mut bytes = Vec::new();
        match reader.read_until(b'\n', &mut bytes) {
            Ok(0) | Err(_) => None,
            Ok(_) => Some(String::from_utf8_lossy(&bytes).into_owned()),
        }
    };
    let first = line(reader)?;
    let mut headers = Vec::new();
    loop {
        let line = line(reader)?;
        let line = line.trim_end();
        if line.is_empty() {
            break;
        }
        let (k, v) = line.split_once(':')?;
        headers.push((k.trim().to_ascii_lowercase(), v.trim().to_string()));
    }
    Some((first.trim_end().to_string(), headers))
}

fn read_body(
    reader: &mut impl BufRead,
    headers: &[(String, String)],
    until_eof: bool,
) -> Option<Vec<u8>> {
    let get = |name: &str| {
        headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    };
    let mut body = Vec::new();
    if get("transfer-encoding").is_some_and(|v| v.eq_ignore_ascii_case("chunked")) {
        loop {
            let mut size = String::new();
            reader.read_line(&mut size).ok()?;
            let size = usize::from_str_radix(size.trim().split(';').next()?, 16).ok()?;
            let mut chunk = vec![0; size + 2];
            reader.read_exact(&mut chunk).ok()?;
            if size == 0 {
                break;
            }
            body.extend_from_slice(&chunk[..size]);
        }
    } else if let Some(len) = get("content-length") {
        let mut buf = vec![0; len.parse().ok()?];
        reader.read_exact(&mut buf).ok()?;
        body = buf;
    } else if until_eof {
        reader.read_to_end(&mut body).ok()?;
    }
    Some(body)
}

fn read_request(reader: &mut impl BufRead) -> Option<Request> {
    let (first, headers) = read_head(reader)?;
    let mut parts = first.split(' ');
    let method = parts.next()?.to_string();
    let path = parts.next()?.to_string();
    let body = read_body(reader, &headers, false)?;
    Some(Request {
        method,
        path,
        headers,
        body,
    })
}

/// Percent-encodes everything but ASCII letters and digits (for query parameters).
pub fn percent_encode(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

/// Sends one request (`Connection: close`) and reads the whole response.
pub fn send(
    port: u16,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Response {
    send_to(&format!("127.0.0.1:{port}"), method, path, headers, body)
}

/// As [`send`], to any address (`[::1]:8080`).
pub fn send_to(
    addr: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Response {
    try_send_to(addr, method, path, headers, body)
        .unwrap_or_else(|e| panic!("{method} {path} to {addr}: {e}"))
}

/// As [`send_to`], with failures as values (for polling a server that may not be up).
pub fn try_send_to(
    addr: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Result<Response, String> {
    let err = |e: std::io::Error| e.to_string();
    let mut conn = TcpStream::connect(addr).map_err(err)?;
    conn.set_read_timeout(Some(Duration::from_secs(20)))
        .map_err(err)?;
    let mut head = format!(
        "{method} {path} HTTP/1.1\r\nconnection: close\r\ncontent-length: {}\r\n",
        body.len()
    );
    if !headers.iter().any(|(k, _)| k.eq_ignore_ascii_case("host")) {
        head.push_str("host: llm.test\r\n");
    }
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    conn.write_all(head.as_bytes()).map_err(err)?;
    conn.write_all(body).map_err(err)?;
    let mut reader = BufReader::new(conn);
    let (first, headers) = read_head(&mut reader).ok_or("no response head (timeout or reset)")?;
    let status = first
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or("bad status line")?;
    let body = read_body(&mut reader, &headers, true).unwrap_or_default();
    Ok(Response {
        status,
        headers,
        body,
    })
}

/// Sends `request` (a whole HTTP/1.1 request, as bytes: for header values that are not UTF-8)
/// and reads the whole response.
pub fn send_raw(port: u16, request: &[u8]) -> Response {
    let mut conn = TcpStream::connect(("127.0.0.1", port)).unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    conn.write_all(request).unwrap();
    let mut reader = BufReader::new(conn);
    let (first, headers) = read_head(&mut reader).expect("no response head");
    let status = first
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap();
    let body = read_body(&mut reader, &headers, true).unwrap_or_default();
    Response {
        status,
        headers,
        body,
    }
}

/// A `POST path` with a JSON body and `headers` whose values are any bytes, as
/// [`send_raw`] sends it.
pub fn raw_post(path: &[u8], headers: &[(&str, &[u8])], body: &serde_json::Value) -> Vec<u8> {
    let body = body.to_string();
    let mut req = [b"POST ", path, b" HTTP/1.1\r\n"].concat();
    req.extend_from_slice(
        format!(
            "host: llm.test\r\nconnection: close\r\ncontent-type: application/json\r\ncontent-length: {}\r\n",
            body.len()
        )
        .as_bytes(),
    );
    for (k, v) in headers {
        req.extend_from_slice(k.as_bytes());
        req.extend_from_slice(b": ");
        req.extend_from_slice(v);
        req.extend_from_slice(b"\r\n");
    }
    req.extend_from_slice(b"\r\n");
    req.extend_from_slice(body.as_bytes());
    req
}

pub fn post_json(
    port: u16,
    path: &str,
    headers: &[(&str, &str)],
    body: &serde_json::Value,
) -> Response {
    let mut h = vec![("content-type", "application/json")];
    h.extend_from_slice(headers);
    send(port, "POST", path, &h, body.to_string().as_bytes())
}

/// `name → value` of the numeric lines in Envoy's `/stats` text.
pub fn stats(admin_port: u16, filter: &str) -> HashMap<String, u64> {
    let r = send(
        admin_port,
        "GET",
        &format!("/stats?filter={filter}"),
        &[],
        b"",
    );
    r.text()
        .lines()
        .filter_map(|l| {
            let (k, v) = l.split_once(": ")?;
            Some((k.to_string(), v.trim().parse().ok()?))
        })
        .collect()
}
