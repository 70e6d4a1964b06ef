//! A real `redis-server` for the tests: started on a free loopback port with no persistence in a
//! temp directory, killed on drop, restartable empty on the same port. Synchronous (std::process
//! and a raw PING over TcpStream), so it depends on nothing but the installed binaries.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::free_port;

/// How long a start may take before the server is declared broken.
const START_TIMEOUT: Duration = Duration::from_secs(5);
/// How often the server is pinged while starting.
const PING_EVERY: Duration = Duration::from_millis(20);
/// Starts on a fresh port that fail (someone else took the port meanwhile) are retried this often.
const PORT_ATTEMPTS: usize = 3;

const MISSING: &str = "redis-server not found: install it with `apt-get install -y redis-server`";

/// A running `redis-server`; SIGKILLed and reaped on drop.
pub struct Redis {
    child: Option<Child>,
    port: u16,
    /// Data and log directory (nothing is saved there; the log helps when a start fails).
    dir: tempfile::TempDir,
}

impl Redis {
    /// Start a server on a free port of 127.0.0.1 and wait (at most 5 s) until it answers PING.
    pub fn start() -> Redis {
        let mut last = String::new();
        for _ in 0..PORT_ATTEMPTS {
            let mut redis = Redis {
                child: None,
                port: free_port(),
                dir: tempfile::tempdir().expect("temp dir for redis-server"),
            };
            match redis.spawn_and_wait() {
                Ok(()) => return redis,
                Err(e) => last = e,
            }
        }
        panic!("redis-server did not start after {PORT_ATTEMPTS} attempts: {last}");
    }

    /// `redis://127.0.0.1:PORT/0`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    /// The port it listens on (kept across [`Redis::stop`] and [`Redis::start_again`]).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// SIGKILL the server and reap it: every client sees its connection drop at once.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Start a fresh, empty server on the same port and wait until it answers PING.
    pub fn start_again(&mut self) {
        self.stop();
        if let Err(e) = self.spawn_and_wait() {
            panic!(
                "redis-server did not start again on port {}: {e}",
                self.port
            );
        }
    }

    /// `redis-cli -p PORT --raw ARGS...`; its stdout. Panics with stderr when it fails.
    pub fn cli(&self, args: &[&str]) -> String {
        let out = Command::new("redis-cli")
            .arg("-p")
            .arg(self.port.to_string())
            .arg("--raw")
            .args(args)
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot run redis-cli: {e} (install it with `apt-get install -y redis-tools`)"
                )
            });
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        let stderr = String::from_utf8_lossy(&out.stderr);
        // redis-cli exits 0 on a server error reply; in --raw mode it prints it as `ERR ...`.
        if !out.status.success() || stdout.starts_with("ERR ") || stdout.starts_with("WRONGTYPE") {
            panic!(
                "redis-cli -p {} {} failed ({}): {stderr}{stdout}",
                self.port,
                args.join(" "),
                out.status
            );
        }
        stdout
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("redis.log")
    }

    /// Run the server on `self.port`; Ok once it answers PING, Err with why (and its log) if it
    /// exits or stays silent.
    fn spawn_and_wait(&mut self) -> Result<(), String> {
        let log = self.log_path();
        let child = Command::new("redis-server")
            .args(["--port", &self.port.to_string()])
            .args(["--bind", "127.0.0.1"])
            .args(["--save", ""])
            .args(["--appendonly", "no"])
            .arg("--dir")
            .arg(self.dir.path())
            .arg("--logfile")
            .arg(&log)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn();
        let child = match child {
            Ok(c) => c,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => panic!("{MISSING}"),
            Err(e) => panic!("cannot run redis-server: {e}"),
        };
        self.child = Some(child);
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if ping(self.port) {
                return Ok(());
            }
            let child = self.child.as_mut().expect("spawned above");
            if let Some(status) = child.try_wait().expect("try_wait redis-server") {
                let mut stderr = String::new();
                if let Some(mut pipe) = child.stderr.take() {
                    let _ = pipe.read_to_string(&mut stderr);
                }
                self.child = None;
                return Err(format!(
                    "redis-server on port {} exited with {status}: {stderr}{}",
                    self.port,
                    std::fs::read_to_string(&log).unwrap_or_default()
                ));
            }
            if Instant::now() >= deadline {
                self.stop();
                return Err(format!(
                    "redis-server on port {} did not answer PING within {START_TIMEOUT:?}: {}",
                    self.port,
                    std::fs::read_to_string(&log).unwrap_or_default()
                ));
            }
            std::thread::sleep(PING_EVERY);
        }
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Does a server on `port` answer PING with PONG?
fn ping(port: u16) -> bool {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let Ok(mut stream) = TcpStream::connect_timeout(&addr, Duration::from_millis(200)) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_millis(500)));
    if stream.write_all(b"PING\r\n").is_err() {
        return false;
    }
    let mut buf = [0u8; 7];
    stream.read_exact(&mut buf).is_ok() && &buf == b"+PONG\r\n"
}
