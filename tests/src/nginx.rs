//! nginx from the distribution, run by a test: a generated main configuration (foreground,
//! its own prefix directory, an access log of what it sent) around the `server` blocks a test
//! gives it. `.ci/run` installs nginx; a test that needs it fails, saying so, when it is missing.

use std::net::TcpStream;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// One line of the access log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Access {
    /// HTTP status.
    pub status: u16,
    /// Body bytes sent.
    pub bytes: u64,
    /// The Range header asked for, or `-`.
    pub range: String,
    /// The request URI.
    pub uri: String,
}

/// A running nginx; stopped (SIGKILL, like a machine that dies) when dropped.
#[derive(Debug)]
pub struct Nginx {
    child: Option<Child>,
    /// Its prefix directory (configuration, logs, temporary files).
    pub dir: PathBuf,
}

impl Nginx {
    /// Starts nginx with `servers` (nginx `http`-level configuration: `server` blocks and the
    /// like) in `dir`, and waits until `ports` on 127.0.0.1 accept connections.
    pub fn start(dir: &Path, servers: &str, ports: &[u16]) -> Nginx {
        let binary = ["/usr/sbin/nginx", "/usr/bin/nginx"]
            .into_iter()
            .map(PathBuf::from)
            .find(|p| p.exists())
            .unwrap_or_else(|| {
                panic!("nginx is not installed (apt-get install nginx; .ci/run installs it)")
            });
        std::fs::create_dir_all(dir.join("tmp")).expect("nginx dir");
        let d = dir.display();
        let config = format!(
            r#"daemon off;
master_process on;
worker_processes 2;
user root root;
pid {d}/nginx.pid;
error_log {d}/error.log warn;
events {{ worker_connections 1024; }}
http {{
    log_format test '$status $body_bytes_sent "$http_range" $request_uri';
    access_log {d}/access.log test;
    client_body_temp_path {d}/tmp/body;
    proxy_temp_path {d}/tmp/proxy;
    fastcgi_temp_path {d}/tmp/fastcgi;
    uwsgi_temp_path {d}/tmp/uwsgi;
    scgi_temp_path {d}/tmp/scgi;
    default_type application/octet-stream;
    sendfile on;
    keepalive_requests 100000;
    ssl_protocols TLSv1.2 TLSv1.3;
{servers}
}}
"#
        );
        let conf = dir.join("nginx.conf");
        std::fs::write(&conf, config).expect("nginx.conf");
        let check = Command::new(&binary)
            .arg("-p")
            .arg(dir)
            .arg("-c")
            .arg(&conf)
            .arg("-e")
            .arg(dir.join("error.log"))
            .arg("-t")
            .output()
            .expect("nginx -t");
        assert!(
            check.status.success(),
            "nginx refuses the configuration:\n{}",
            String::from_utf8_lossy(&check.stderr)
        );
        let child = Command::new(&binary)
            .arg("-p")
            .arg(dir)
            .arg("-c")
            .arg(&conf)
            .arg("-e")
            .arg(dir.join("error.log"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0)
            .spawn()
            .expect("start nginx");
        let nginx = Nginx {
            child: Some(child),
            dir: dir.to_owned(),
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        for port in ports {
            while TcpStream::connect(("127.0.0.1", *port)).is_err() {
                assert!(
                    Instant::now() < deadline,
                    "nginx did not listen on {port}:\n{}",
                    std::fs::read_to_string(dir.join("error.log")).unwrap_or_default()
                );
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        nginx
    }

    /// Every request logged so far.
    pub fn accesses(&self) -> Vec<Access> {
        std::fs::read_to_string(self.dir.join("access.log"))
            .unwrap_or_default()
            .lines()
            .filter_map(|line| {
                let (status, rest) = line.split_once(' ')?;
                let (bytes, rest) = rest.split_once(' ')?;
                let rest = rest.strip_prefix('"')?;
                let (range, uri) = rest.split_once("\" ")?;
                Some(Access {
                    status: status.parse().ok()?,
                    bytes: bytes.parse().ok()?,
                    range: range.to_owned(),
                    uri: uri.to_owned(),
                })
            })
            .collect()
    }

    /// Kills nginx at once (master and workers), as a machine that dies would.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            // nginx runs in a process group of its own (see `start`): one signal takes the master,
            // its workers and its cache processes down together. Killing the workers first let
            // the master start new ones, which outlived it.
            let group = nix::unistd::Pid::from_raw(child.id() as i32);
            let _ = nix::sys::signal::killpg(group, nix::sys::signal::Signal::SIGKILL);
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        self.kill();
    }
}
