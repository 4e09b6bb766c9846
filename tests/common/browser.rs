//! Headless chromium for the dashboard's tests: started with the flags a container run as
//! root needs (`--no-sandbox`), driven over the DevTools protocol (a WebSocket), killed with
//! its whole process group when dropped.
#![allow(dead_code)]

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::{json, Value};

use super::poll;

/// Headless chromium driven over the DevTools protocol; killed (its whole process group)
/// when dropped.
pub struct Browser {
    child: std::process::Child,
    ws: tungstenite::WebSocket<tungstenite::stream::MaybeTlsStream<std::net::TcpStream>>,
    next: u64,
    _profile: tempfile::TempDir,
}

pub fn find_chromium() -> Option<std::path::PathBuf> {
    let path = std::env::var_os("PATH")?;
    for dir in std::env::split_paths(&path) {
        for name in ["chromium", "chromium-browser"] {
            let p = dir.join(name);
            if p.is_file() {
                return Some(p);
            }
        }
    }
    None
}

impl Browser {
    pub fn open(bin: &std::path::Path, url: &str) -> Browser {
        use std::os::unix::process::CommandExt;
        let profile = tempfile::tempdir().expect("profile dir");
        let child = std::process::Command::new(bin)
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--hide-scrollbars",
                "--window-size=1280,900",
                "--remote-debugging-port=0",
            ])
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .arg(url)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .process_group(0)
            .spawn()
            .expect("start chromium");
        let port_file = profile.path().join("DevToolsActivePort");
        let mut port = String::new();
        assert!(
            poll(Duration::from_secs(30), || {
                port = std::fs::read_to_string(&port_file).unwrap_or_default();
                port.contains('\n')
            }),
            "chromium did not open its DevTools port"
        );
        let port = port.lines().next().unwrap_or_default().trim().to_string();
        let mut page_ws = String::new();
        assert!(poll(Duration::from_secs(20), || {
            let Ok(r) = ureq::get(&format!("http://127.0.0.1:{port}/json/list")).call() else {
                return false;
            };
            let list: Value = r.into_json().unwrap_or_default();
            match list
                .as_array()
                .and_then(|l| l.iter().find(|t| t["type"] == "page"))
                .and_then(|t| t["webSocketDebuggerUrl"].as_str())
            {
                Some(u) => {
                    page_ws = u.to_string();
                    true
                }
                None => false,
            }
        }));
        let (ws, _) = tungstenite::connect(page_ws.as_str()).expect("DevTools websocket");
        if let tungstenite::stream::MaybeTlsStream::Plain(s) = ws.get_ref() {
            s.set_read_timeout(Some(Duration::from_secs(30)))
                .expect("timeout");
        }
        Browser {
            child,
            ws,
            next: 0,
            _profile: profile,
        }
    }

    pub fn call(&mut self, method: &str, params: Value) -> Value {
        self.next += 1;
        let id = self.next;
        let msg = json!({ "id": id, "method": method, "params": params }).to_string();
        self.ws.send(tungstenite::Message::text(msg)).expect("send");
        loop {
            let m = self.ws.read().expect("DevTools answer");
            let Ok(text) = m.to_text() else { continue };
            let v: Value = serde_json::from_str(text).unwrap_or_default();
            if v["id"] == id {
                assert!(v["error"].is_null(), "{method}: {v}");
                return v["result"].clone();
            }
        }
    }

    /// Evaluate a JavaScript expression in the page; its value as JSON.
    pub fn eval(&mut self, expr: &str) -> Value {
        let r = self.call(
            "Runtime.evaluate",
            json!({ "expression": expr, "returnByValue": true, "awaitPromise": true }),
        );
        r["result"]["value"].clone()
    }

    pub fn wait_for(&mut self, expr: &str, what: &str) {
        let mut last = Value::Null;
        let ok = poll(Duration::from_secs(20), || {
            last = self.eval(expr);
            last == true
        });
        let html = self.eval("document.body.innerText");
        assert!(
            ok,
            "the dashboard never showed {what} ({expr} = {last}); page text:\n{html}"
        );
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = nix::sys::signal::killpg(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGKILL,
        );
        let _ = self.child.wait();
    }
}

pub fn base64_decode(s: &str) -> Vec<u8> {
    let val = |c: u8| -> Option<u32> {
        Some(match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        } as u32)
    };
    let mut out = Vec::new();
    let (mut acc, mut bits) = (0u32, 0);
    for c in s.bytes().filter_map(val) {
        acc = (acc << 6) | c;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    out
}

impl Browser {
    /// Lay the page out at `width` × `height` CSS pixels, as a phone (`mobile`) or not.
    pub fn viewport(&mut self, width: u32, height: u32, mobile: bool) {
        self.call(
            "Emulation.setDeviceMetricsOverride",
            json!({ "width": width, "height": height, "deviceScaleFactor": 1, "mobile": mobile }),
        );
    }

    /// Press a key (`Tab`, `Enter`, ` `) as a keyboard does: down, then up.
    pub fn press(&mut self, key: &str, code: &str, key_code: u32) {
        for kind in ["keyDown", "keyUp"] {
            self.call(
                "Input.dispatchKeyEvent",
                json!({ "type": kind, "key": key, "code": code, "windowsVirtualKeyCode": key_code, "nativeVirtualKeyCode": key_code }),
            );
        }
    }

    /// A PNG of what the page shows now, written to `path` (printed on stderr, where
    /// `cargo test` shows it).
    pub fn screenshot(&mut self, path: &Path) {
        let shot = self.call("Page.captureScreenshot", json!({ "format": "png" }));
        let png = base64_decode(shot["data"].as_str().expect("png data"));
        assert!(png.starts_with(b"\x89PNG"), "not a PNG");
        std::fs::write(path, png).expect("write the screenshot");
        let _ = std::io::stderr().write_all(format!("screenshot: {}\n", path.display()).as_bytes());
    }
}

/// A directory for screenshots that outlives the test (its path is printed).
pub fn screenshot_dir(test: &str) -> PathBuf {
    let dir = tempfile::Builder::new()
        .prefix(&format!("taskd-{test}-"))
        .tempdir()
        .expect("screenshot dir");
    dir.keep()
}
