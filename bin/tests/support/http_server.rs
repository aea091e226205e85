//! A small HTTP/1.1 file server on 127.0.0.1 for the download tests, able to misbehave on demand: answer with
//! an error status, reset the connection mid-body, close it early (with or without a Content-Length), send
//! bytes that are not the file, or stall. Each connection gets one response and is closed.

use std::collections::{HashMap, VecDeque};
use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::io::AsRawFd;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// How the server answers one request for a file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// The file, whole (not a fault; what happens when no fault is queued).
    Serve,
    /// This status and a short body.
    Status(u16),
    /// The full Content-Length, the first `after` bytes, then a TCP reset (RST).
    Reset { after: usize },
    /// The full Content-Length, the first `after` bytes, then an orderly close.
    Truncate { after: usize },
    /// No Content-Length (the body ends at close), the first `after` bytes, then an orderly close.
    TruncateNoLength { after: usize },
    /// 200 with the right Content-Length, but the bytes are not the file (the last 16 bytes flipped).
    Garbage,
    /// The full Content-Length, the first `after` bytes, then nothing for a minute.
    Stall { after: usize },
}

#[derive(Default)]
struct State {
    files: HashMap<String, Vec<u8>>,
    queued: HashMap<String, VecDeque<Fault>>,
    always: HashMap<String, Fault>,
    gets: Vec<String>,
}

pub struct TestServer {
    pub base_url: String,
    state: Arc<Mutex<State>>,
}

impl TestServer {
    /// Serve `files` (name, bytes) under `http://127.0.0.1:PORT/data/NAME`.
    pub fn start(files: &[(String, Vec<u8>)]) -> TestServer {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let state = Arc::new(Mutex::new(State {
            files: files.iter().cloned().collect(),
            ..State::default()
        }));
        let shared = state.clone();
        // The accept loop lives until the test process ends; each connection gets its own thread so that a
        // stalled response does not hold up the others.
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(stream) = stream else { continue };
                let shared = shared.clone();
                std::thread::spawn(move || handle(stream, &shared));
            }
        });
        TestServer {
            base_url: format!("http://127.0.0.1:{port}/data"),
            state,
        }
    }

    /// The next requests for `name` get these answers, in order; later ones are served normally.
    pub fn queue(&self, name: &str, faults: &[Fault]) {
        let mut s = self.state.lock().unwrap();
        s.queued
            .entry(name.to_string())
            .or_default()
            .extend(faults.iter().copied());
    }

    /// Every request for `name` gets this answer (until `clear`).
    pub fn always(&self, name: &str, fault: Fault) {
        self.state.lock().unwrap().always.insert(name.to_string(), fault);
    }

    pub fn clear(&self, name: &str) {
        let mut s = self.state.lock().unwrap();
        s.always.remove(name);
        s.queued.remove(name);
    }

    /// The names requested so far, in arrival order.
    pub fn gets(&self) -> Vec<String> {
        self.state.lock().unwrap().gets.clone()
    }

    pub fn gets_of(&self, name: &str) -> usize {
        self.gets().iter().filter(|g| *g == name).count()
    }
}

fn handle(stream: TcpStream, state: &Mutex<State>) {
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut request_line = String::new();
    if reader.read_line(&mut request_line).is_err() {
        return;
    }
    // Skip the headers, up to the blank line.
    loop {
        let mut line = String::new();
        match reader.read_line(&mut line) {
            Ok(0) | Err(_) => return,
            Ok(_) if line == "\r\n" || line == "\n" => break,
            Ok(_) => {}
        }
    }
    let path = request_line.split_whitespace().nth(1).unwrap_or("").to_string();
    let name = path.strip_prefix("/data/").unwrap_or("").to_string();
    let (body, fault) = {
        let mut s = state.lock().unwrap();
        s.gets.push(name.clone());
        let fault = match s.queued.get_mut(&name).and_then(|q| q.pop_front()) {
            Some(f) => f,
            None => s.always.get(&name).copied().unwrap_or(Fault::Serve),
        };
        (s.files.get(&name).cloned(), fault)
    };
    let mut out = stream;
    let Some(body) = body else {
        let _ = respond_status(&mut out, 404);
        return;
    };
    let head = |len: Option<usize>| {
        let length = len.map(|l| format!("Content-Length: {l}\r\n")).unwrap_or_default();
        format!("HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n{length}Connection: close\r\n\r\n")
    };
    let _ = match fault {
        Fault::Serve => out
            .write_all(head(Some(body.len())).as_bytes())
            .and_then(|_| out.write_all(&body)),
        Fault::Status(code) => respond_status(&mut out, code),
        Fault::Reset { after } => {
            let _ = out.write_all(head(Some(body.len())).as_bytes());
            let _ = out.write_all(&body[..after]);
            let _ = out.flush();
            // SO_LINGER with a zero timeout turns close() into a reset.
            let linger = libc::linger {
                l_onoff: 1,
                l_linger: 0,
            };
            unsafe {
                libc::setsockopt(
                    out.as_raw_fd(),
                    libc::SOL_SOCKET,
                    libc::SO_LINGER,
                    &linger as *const libc::linger as *const libc::c_void,
                    std::mem::size_of::<libc::linger>() as libc::socklen_t,
                );
            }
            Ok(())
        }
        Fault::Truncate { after } => out
            .write_all(head(Some(body.len())).as_bytes())
            .and_then(|_| out.write_all(&body[..after])),
        Fault::TruncateNoLength { after } => out
            .write_all(head(None).as_bytes())
            .and_then(|_| out.write_all(&body[..after])),
        Fault::Garbage => {
            let mut bad = body.clone();
            let n = bad.len();
            for b in &mut bad[n.saturating_sub(16)..] {
                *b = !*b;
            }
            out.write_all(head(Some(n)).as_bytes())
                .and_then(|_| out.write_all(&bad))
        }
        Fault::Stall { after } => {
            let _ = out.write_all(head(Some(body.len())).as_bytes());
            let _ = out.write_all(&body[..after]);
            let _ = out.flush();
            std::thread::sleep(Duration::from_secs(60));
            Ok(())
        }
    };
    // Dropping `out` and `reader` closes the connection (a reset after SO_LINGER 0).
}

fn respond_status(out: &mut TcpStream, code: u16) -> std::io::Result<()> {
    let body = format!("status {code}\n");
    out.write_all(
        format!(
            "HTTP/1.1 {code} Test\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )
        .as_bytes(),
    )
}
