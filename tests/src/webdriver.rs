//! A small W3C WebDriver client for the console tests: starts Debian's `chromedriver`, opens a
//! headless `chromium` session, and speaks the WebDriver HTTP API over a plain HTTP/1.1 client
//! (also used to call the console's API directly). No browser-automation crate needed.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

/// An HTTP answer: status, headers (names lowercased) and body.
#[derive(Debug, Clone)]
pub struct Answer {
    /// Status code.
    pub status: u16,
    /// Headers.
    pub headers: Vec<(String, String)>,
    /// Body.
    pub body: Vec<u8>,
}

impl Answer {
    /// A header's value.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(key, _)| key == name).map(|(_, value)| value.as_str())
    }

    /// The body as text.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// The body as JSON (null when it is not JSON).
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or(Value::Null)
    }
}

/// Undoes `Transfer-Encoding: chunked`.
fn dechunk(mut body: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let Some(line_end) = body.windows(2).position(|w| w == b"\r\n") else { return out };
        let size =
            usize::from_str_radix(String::from_utf8_lossy(&body[..line_end]).split(';').next().unwrap_or("0").trim(), 16).unwrap_or(0);
        if size == 0 || body.len() < line_end + 2 + size {
            return out;
        }
        out.extend_from_slice(&body[line_end + 2..line_end + 2 + size]);
        body = &body[(line_end + 4 + size).min(body.len())..];
    }
}

/// Reads one HTTP answer: up to its Content-Length, its last chunk, or the end of the stream
/// (some servers keep the connection open whatever the request said).
fn read_answer(stream: &mut TcpStream) -> Vec<u8> {
    let mut raw = Vec::new();
    let mut buffer = [0u8; 64 << 10];
    loop {
        if let Some(head_end) = raw.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&raw[..head_end]).to_ascii_lowercase();
            let length = head.lines().find_map(|l| l.strip_prefix("content-length:")).and_then(|v| v.trim().parse::<usize>().ok());
            if length.is_some_and(|length| raw.len() >= head_end + 4 + length) {
                return raw;
            }
            if head.contains("transfer-encoding: chunked") && raw.ends_with(b"0\r\n\r\n") {
                return raw;
            }
        }
        match stream.read(&mut buffer) {
            Ok(0) => return raw,
            Ok(read) => raw.extend_from_slice(&buffer[..read]),
            Err(error) => panic!("reading an HTTP answer: {error}"),
        }
    }
}

/// One HTTP/1.1 request over a fresh connection (`Connection: close`).
pub fn http(address: SocketAddr, method: &str, path: &str, headers: &[(&str, &str)], body: Option<&str>) -> Answer {
    let mut stream = TcpStream::connect(address).unwrap_or_else(|e| panic!("connect {address}: {e}"));
    stream.set_read_timeout(Some(Duration::from_secs(120))).expect("read timeout");
    let mut request = format!("{method} {path} HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\n");
    for (name, value) in headers {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    let body = body.unwrap_or("");
    if !body.is_empty() || method == "POST" || method == "DELETE" {
        request.push_str(&format!("Content-Type: application/json\r\nContent-Length: {}\r\n", body.len()));
    }
    request.push_str("\r\n");
    request.push_str(body);
    stream.write_all(request.as_bytes()).expect("send request");
    let raw = read_answer(&mut stream);
    let head_end = raw.windows(4).position(|w| w == b"\r\n\r\n").expect("an HTTP head");
    let head = String::from_utf8_lossy(&raw[..head_end]).into_owned();
    let mut lines = head.lines();
    let status = lines.next().and_then(|l| l.split_whitespace().nth(1)).and_then(|s| s.parse().ok()).expect("a status line");
    let headers: Vec<(String, String)> =
        lines.filter_map(|l| l.split_once(':')).map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string())).collect();
    let mut body = raw[head_end + 4..].to_vec();
    if headers.iter().any(|(k, v)| k == "transfer-encoding" && v.contains("chunked")) {
        body = dechunk(&body);
    }
    Answer { status, headers, body }
}

/// Decodes standard base64 (the screenshots WebDriver sends).
pub fn base64_decode(text: &str) -> Vec<u8> {
    let value = |c: u8| -> Option<u32> {
        Some(match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        } as u32)
    };
    let digits: Vec<u32> = text.bytes().filter_map(value).collect();
    let mut out = Vec::with_capacity(digits.len() * 3 / 4);
    for chunk in digits.chunks(4) {
        let bits = chunk.iter().enumerate().fold(0u32, |acc, (i, d)| acc | d << (18 - 6 * i));
        let bytes = [(bits >> 16) as u8, (bits >> 8) as u8, bits as u8];
        out.extend_from_slice(&bytes[..chunk.len().saturating_sub(1)]);
    }
    out
}

/// A headless Chromium driven through chromedriver; both end when this is dropped.
#[derive(Debug)]
pub struct Browser {
    driver: Child,
    address: SocketAddr,
    session: String,
    /// The browser's home and XDG folders (chromium writes its profile, dconf database and crash
    /// folder there, not into the user's own); removed once `drop` has ended the browser.
    home: tempfile::TempDir,
}

impl Browser {
    /// Starts chromedriver and a headless Chromium session that keeps the browser's console log.
    pub fn start() -> Self {
        let driver_path = ["/usr/bin/chromedriver", "/usr/lib/chromium/chromedriver"]
            .into_iter()
            .find(|p| Path::new(p).exists())
            .expect("chromedriver is missing: `apt-get install chromium chromium-driver` (make test does)");
        let address = crate::free_address();
        let home = tempfile::Builder::new().prefix("cohort-browser-home-").tempdir().expect("a home folder for the browser");
        let driver = Command::new(driver_path)
            .arg(format!("--port={}", address.port()))
            .env("HOME", home.path())
            .env("XDG_CACHE_HOME", home.path().join(".cache"))
            .env("XDG_CONFIG_HOME", home.path().join(".config"))
            .env("XDG_DATA_HOME", home.path().join(".local/share"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start chromedriver");
        let started = Instant::now();
        while TcpStream::connect_timeout(&address, Duration::from_millis(200)).is_err() {
            assert!(started.elapsed() < Duration::from_secs(20), "chromedriver did not listen");
            std::thread::sleep(Duration::from_millis(50));
        }
        let binary =
            ["/usr/bin/chromium", "/usr/bin/chromium-browser"].into_iter().find(|p| Path::new(p).exists()).unwrap_or("/usr/bin/chromium");
        let capabilities = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {"binary": binary, "args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1280,1100", "--hide-scrollbars"]},
            "goog:loggingPrefs": {"browser": "ALL"},
        }}});
        let mut browser = Browser { driver, address, session: String::new(), home };
        let answer = browser.raw("POST", "/session", Some(capabilities));
        browser.session = answer["value"]["sessionId"].as_str().unwrap_or_else(|| panic!("no session: {answer}")).to_string();
        browser
    }

    /// The folder the browser and its driver use as home (`HOME` and the XDG folders), so a
    /// test never writes into the user's own.
    pub fn home(&self) -> &Path {
        self.home.path()
    }

    fn raw(&self, method: &str, path: &str, body: Option<Value>) -> Value {
        let body = body.map(|b| b.to_string());
        http(self.address, method, path, &[], body.as_deref()).json()
    }

    /// A session command; panics on a WebDriver error.
    pub fn command(&self, method: &str, path: &str, body: Value) -> Value {
        let value = self.try_command(method, path, body);
        match value {
            Ok(value) => value,
            Err(error) => panic!("webdriver {method} {path}: {error}"),
        }
    }

    /// A session command, or the WebDriver error it answered.
    pub fn try_command(&self, method: &str, path: &str, body: Value) -> Result<Value, String> {
        let body = if method == "GET" { None } else { Some(body) };
        let answer = self.raw(method, &format!("/session/{}{path}", self.session), body);
        let value = answer["value"].clone();
        match value.get("error").and_then(Value::as_str) {
            Some(error) => Err(format!("{error}: {}", value["message"].as_str().unwrap_or_default())),
            None => Ok(value),
        }
    }

    /// Opens `url`.
    pub fn goto(&self, url: &str) {
        self.command("POST", "/url", json!({"url": url}));
    }

    /// Runs `script` (a function body; `arguments` holds `args`) and returns its value.
    pub fn execute(&self, script: &str, args: Value) -> Value {
        self.command("POST", "/execute/sync", json!({"script": script, "args": args}))
    }

    /// Runs `script` until it returns a truthy value, failing with `what` after `limit`.
    pub fn wait_until(&self, what: &str, limit: Duration, script: &str) -> Value {
        let started = Instant::now();
        loop {
            let value = self.try_command("POST", "/execute/sync", json!({"script": script, "args": []})).unwrap_or(Value::Null);
            let truthy = !matches!(&value, Value::Null | Value::Bool(false)) && value != json!(0) && value != json!("");
            if truthy {
                return value;
            }
            assert!(started.elapsed() < limit, "waited {limit:?} for {what}; last value {value}");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The element `css` selects (its WebDriver reference).
    pub fn find(&self, css: &str) -> Value {
        self.command("POST", "/element", json!({"using": "css selector", "value": css}))
    }

    fn element_id(element: &Value) -> String {
        element.as_object().and_then(|o| o.values().next()).and_then(Value::as_str).expect("an element reference").to_string()
    }

    /// Runs `act` on the element `css` selects, finding it again if the page replaced it meanwhile
    /// (a stale element reference), a few times.
    fn on_element(&self, css: &str, act: impl Fn(&str) -> Result<(), String>) {
        let mut last = String::new();
        for _ in 0..5 {
            let found = self.try_command("POST", "/element", json!({"using": "css selector", "value": css}));
            match found.map(|element| Self::element_id(&element)).and_then(|id| act(&id)) {
                Ok(()) => return,
                Err(error) => last = error,
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        panic!("webdriver: acting on {css} failed: {last}");
    }

    /// Clicks the element `css` selects.
    pub fn click(&self, css: &str) {
        self.on_element(css, |id| self.try_command("POST", &format!("/element/{id}/click"), json!({})).map(drop));
    }

    /// Types `text` into the element `css` selects (after clearing it).
    pub fn type_into(&self, css: &str, text: &str) {
        self.on_element(css, |id| {
            self.try_command("POST", &format!("/element/{id}/clear"), json!({}))?;
            self.try_command("POST", &format!("/element/{id}/value"), json!({"text": text})).map(drop)
        });
    }

    /// The text of an open alert, if one is open.
    pub fn alert_text(&self) -> Option<String> {
        self.try_command("GET", "/alert/text", json!({})).ok().and_then(|v| v.as_str().map(str::to_string))
    }

    /// Saves a PNG screenshot of the page to `path`.
    pub fn screenshot(&self, path: &Path) {
        let encoded = self.command("GET", "/screenshot", json!({}));
        let bytes = base64_decode(encoded.as_str().expect("base64 screenshot"));
        std::fs::write(path, bytes).expect("write screenshot");
    }

    /// The browser console's entries since the last call (level, source, message).
    pub fn console_log(&self) -> Vec<Value> {
        self.try_command("POST", "/se/log", json!({"type": "browser"})).ok().and_then(|v| v.as_array().cloned()).unwrap_or_default()
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        if !self.session.is_empty() {
            let _ = http(self.address, "DELETE", &format!("/session/{}", self.session), &[], None);
        }
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_round_trips_known_values() {
        assert_eq!(base64_decode("aGVsbG8="), b"hello");
        assert_eq!(base64_decode("aGk="), b"hi");
        assert_eq!(base64_decode("YWJj"), b"abc");
        assert_eq!(dechunk(b"3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n"), b"abcde");
    }
}
