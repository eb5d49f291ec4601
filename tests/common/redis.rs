//! A real `redis-server` on a loopback port, for the fleet tests: no persistence, killed when the
//! guard drops, and frozen (SIGSTOP), thawed (SIGCONT), killed or restarted on the same port on
//! demand.

use std::io::{Read, Write};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::{free_port, WAIT};

/// A running `redis-server`; killed when dropped.
pub struct TestRedis {
    pub port: u16,
    child: Option<Child>,
    frozen: bool,
}

/// Starts `redis-server` on a free loopback port and waits until it answers `PING`.
/// Panics when the binary is missing: the fleet tests never skip.
pub fn start_redis() -> TestRedis {
    let mut redis = TestRedis {
        port: free_port(),
        child: None,
        frozen: false,
    };
    redis.start();
    redis
}

impl TestRedis {
    /// `redis://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    fn start(&mut self) {
        let child = Command::new("redis-server")
            .args(["--port", &self.port.to_string()])
            .args(["--bind", "127.0.0.1"])
            .args(["--save", ""])
            .args(["--appendonly", "no"])
            .args(["--dir", &std::env::temp_dir().display().to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot start redis-server ({e}): the fleet tests need it; install it with `apt-get install -y redis-server`"
                )
            });
        self.child = Some(child);
        self.frozen = false;
        let started = Instant::now();
        while self.command(&["PING"]).as_deref() != Some("+PONG") {
            assert!(started.elapsed() < WAIT, "redis-server did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn signal(&self, signal: &str) {
        let pid = self.child.as_ref().expect("redis-server runs").id();
        let status = Command::new("kill")
            .args([signal, &pid.to_string()])
            .status()
            .unwrap();
        assert!(status.success(), "kill {signal} {pid}");
    }

    /// Freezes the server (SIGSTOP): connections stay open, nothing is answered.
    pub fn freeze(&mut self) {
        self.signal("-STOP");
        self.frozen = true;
    }

    /// Thaws a frozen server (SIGCONT).
    pub fn thaw(&mut self) {
        self.signal("-CONT");
        self.frozen = false;
    }

    /// Kills the server (connections are refused until [`TestRedis::restart`]).
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            if self.frozen {
                let _ = Command::new("kill")
                    .args(["-CONT", &child.id().to_string()])
                    .status();
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        self.frozen = false;
    }

    /// Starts a fresh (empty) server on the same port.
    pub fn restart(&mut self) {
        self.kill();
        self.start();
    }

    /// Sends one command (inline, space-free arguments) and returns the reply's first line,
    /// or `None` if the server does not answer within a second.
    pub fn command(&self, args: &[&str]) -> Option<String> {
        let mut stream = std::net::TcpStream::connect(("127.0.0.1", self.port)).ok()?;
        stream.set_read_timeout(Some(Duration::from_secs(1))).ok()?;
        let mut request = format!("*{}\r\n", args.len());
        for arg in args {
            request.push_str(&format!("${}\r\n{arg}\r\n", arg.len()));
        }
        stream.write_all(request.as_bytes()).ok()?;
        let mut reply = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            let n = stream.read(&mut buf).ok()?;
            if n == 0 {
                break;
            }
            reply.extend_from_slice(&buf[..n]);
            if reply.ends_with(b"\r\n") {
                break;
            }
        }
        let text = String::from_utf8_lossy(&reply);
        text.lines().next().map(str::to_owned)
    }

    /// The keys matching `pattern` (a `KEYS` reply, as lines).
    pub fn keys(&self, pattern: &str) -> Vec<String> {
        let mut stream = std::net::TcpStream::connect(("127.0.0.1", self.port)).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(1)))
            .unwrap();
        let request = format!("*2\r\n$4\r\nKEYS\r\n${}\r\n{pattern}\r\n", pattern.len());
        stream.write_all(request.as_bytes()).unwrap();
        // Read until the whole array arrived: its count, then each bulk string's two lines.
        let mut reply = String::new();
        let mut buf = [0u8; 65536];
        loop {
            let n = stream.read(&mut buf).unwrap_or(0);
            if n == 0 {
                break;
            }
            reply.push_str(&String::from_utf8_lossy(&buf[..n]));
            let mut lines = reply.split("\r\n");
            let count: usize = lines
                .next()
                .and_then(|l| l.strip_prefix('*'))
                .and_then(|n| n.parse().ok())
                .unwrap_or(0);
            if reply.split("\r\n").count() > 2 * count {
                break;
            }
        }
        reply
            .split("\r\n")
            .skip(1)
            .filter(|l| !l.starts_with('$') && !l.is_empty())
            .map(str::to_owned)
            .collect()
    }
}

impl Drop for TestRedis {
    fn drop(&mut self) {
        self.kill();
    }
}
