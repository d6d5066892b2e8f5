//! A real S3-compatible server for the remote-store tests: the s3s-fs crate's S3
//! implementation over a directory, served by tools/s3-server (`./dev test` builds it
//! into .tools/), started on a free port of 127.0.0.1 with its own data directory and
//! stopped when dropped.

use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub const BUCKET: &str = "cachemoney";
pub const ACCESS_KEY: &str = "cachemoney-test";
pub const SECRET_KEY: &str = "cachemoney-test-secret";
/// Credentials the server lets read and list, not write.
pub const READER_KEY: &str = "cachemoney-reader";
pub const READER_SECRET: &str = "cachemoney-reader-secret";

pub struct S3Server {
    child: Option<Child>,
    pub port: u16,
    /// The server's data directory: one subdirectory per bucket, one file per object.
    pub data: tempfile::TempDir,
}

/// The server binary: `$CACHEMONEY_S3_SERVER` (set by `./dev test`), else where
/// `./dev setup` puts it.
pub fn server_binary() -> PathBuf {
    let path = std::env::var_os("CACHEMONEY_S3_SERVER")
        .map(PathBuf::from)
        .unwrap_or_else(|| super::repo_root().join(".tools/bin/cachemoney-s3-server"));
    assert!(
        path.is_file(),
        "{}: the S3 test server is not installed; `./dev setup` (or `./dev test`) builds it",
        path.display()
    );
    path
}

impl S3Server {
    /// A fresh server with one empty bucket, `BUCKET`.
    pub fn start() -> S3Server {
        let data = tempfile::tempdir().unwrap();
        std::fs::create_dir(data.path().join(BUCKET)).unwrap();
        let mut server = S3Server {
            child: None,
            port: 0,
            data,
        };
        server.restart();
        server
    }

    /// Starts the server (again) on a free port, over the same data.
    pub fn restart(&mut self) {
        self.stop();
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = Command::new(server_binary())
            .args(["--host", "127.0.0.1", "--port", &port.to_string()])
            .args(["--access-key", ACCESS_KEY, "--secret-key", SECRET_KEY])
            .args(["--read-only-key", &format!("{READER_KEY}:{READER_SECRET}")])
            .arg(self.data.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        self.child = Some(child);
        self.port = port;
        let started = Instant::now();
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                started.elapsed() < Duration::from_secs(20),
                "the S3 server did not start listening on port {port}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Kills the server (the remote "goes away").
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill().ok();
            child.wait().ok();
        }
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// The environment a client needs: endpoint and credentials, as a user sets them.
    pub fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("AWS_ENDPOINT", self.endpoint()),
            ("AWS_ACCESS_KEY_ID", ACCESS_KEY.to_string()),
            ("AWS_SECRET_ACCESS_KEY", SECRET_KEY.to_string()),
            ("AWS_REGION", "us-east-1".to_string()),
        ]
    }

    /// [`S3Server::env`] with credentials that may read and list but not write.
    pub fn read_only_env(&self) -> Vec<(&'static str, String)> {
        let mut env = self.env();
        for (name, value) in &mut env {
            match *name {
                "AWS_ACCESS_KEY_ID" => *value = READER_KEY.to_string(),
                "AWS_SECRET_ACCESS_KEY" => *value = READER_SECRET.to_string(),
                _ => {}
            }
        }
        env
    }

    pub fn url(&self, prefix: &str) -> String {
        format!("s3://{BUCKET}/{prefix}")
    }

    /// Where the server keeps an object (`prefix/cas/<hash>` and so on).
    pub fn object_file(&self, key: &str) -> PathBuf {
        self.data.path().join(BUCKET).join(key)
    }

    /// Every object under `prefix/` as (key below the prefix, size), sorted.
    pub fn objects(&self, prefix: &str) -> Vec<(String, u64)> {
        let root = self.data.path().join(BUCKET).join(prefix);
        let mut found = Vec::new();
        walk(&root, &root, &mut found);
        found.sort();
        found
    }
}

fn walk(root: &Path, dir: &Path, found: &mut Vec<(String, u64)>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let name = entry.file_name().to_string_lossy().into_owned();
        // The server's own bookkeeping (temporary parts, object metadata).
        if name.starts_with('.') {
            continue;
        }
        if path.is_dir() {
            walk(root, &path, found);
        } else {
            let key = path
                .strip_prefix(root)
                .unwrap()
                .to_string_lossy()
                .into_owned();
            found.push((key, entry.metadata().unwrap().len()));
        }
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A slow link in front of the server: a TCP proxy on 127.0.0.1 that forwards what the
/// client sends at about `bytes_per_second` (and the answers at full speed), so that a
/// test can kill a client in the middle of an upload.
pub struct SlowLink {
    pub port: u16,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl SlowLink {
    pub fn start(target_port: u16, bytes_per_second: usize) -> SlowLink {
        use std::io::{Read, Write};
        use std::sync::atomic::{AtomicBool, Ordering};
        use std::sync::Arc;
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let stop = Arc::new(AtomicBool::new(false));
        let stopping = stop.clone();
        std::thread::spawn(move || {
            for client in listener.incoming() {
                if stopping.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(client) = client else { continue };
                let Ok(server) = TcpStream::connect(("127.0.0.1", target_port)) else {
                    continue;
                };
                let (mut client_in, mut server_out) =
                    (client.try_clone().unwrap(), server.try_clone().unwrap());
                let (mut server_in, mut client_out) = (server, client);
                // Client → server, throttled: 16 KiB at a time.
                std::thread::spawn(move || {
                    let mut buffer = [0u8; 16 << 10];
                    let pause =
                        Duration::from_secs_f64(buffer.len() as f64 / bytes_per_second as f64);
                    while let Ok(n) = client_in.read(&mut buffer) {
                        if n == 0 || server_out.write_all(&buffer[..n]).is_err() {
                            break;
                        }
                        std::thread::sleep(pause);
                    }
                    server_out.shutdown(std::net::Shutdown::Write).ok();
                });
                std::thread::spawn(move || {
                    std::io::copy(&mut server_in, &mut client_out).ok();
                    client_out.shutdown(std::net::Shutdown::Write).ok();
                });
            }
        });
        SlowLink { port, stop }
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }
}

impl Drop for SlowLink {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        TcpStream::connect(("127.0.0.1", self.port)).ok();
    }
}
