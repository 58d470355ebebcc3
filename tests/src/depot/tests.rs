//! Self-tests of the fault-injecting depot: each fault does what it says, over HTTP and HTTPS.

use super::faults::*;
use super::*;
use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;
use tokio_rustls::TlsConnector;

/// Size of the test VIB: several chunks, not a multiple of the chunk size.
const SIZE: usize = 300_001;

struct Fixture {
    depot: Depot,
    pki: TestPki,
    data: Vec<u8>,
    /// `/vibs/<sha256>` of `data`.
    path: String,
    _dir: tempfile::TempDir,
}

fn fixture() -> Fixture {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut x = 0x2545_f491_4f6c_dd1d_u64;
    let data: Vec<u8> = (0..SIZE)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    let hex = hex::encode(Sha256::digest(&data));
    let root = dir.path().join("depot");
    std::fs::create_dir_all(root.join("vibs")).expect("mkdir vibs");
    std::fs::write(root.join("vibs").join(&hex), &data).expect("write vib");
    std::fs::write(dir.path().join("secret"), b"outside the depot").expect("write secret");
    let pki = TestPki::new(dir.path());
    let depot = Depot::start(&root, &pki);
    Fixture {
        depot,
        pki,
        data,
        path: Depot::vib_path(&hex),
        _dir: dir,
    }
}

/// A response as read off the wire by a minimal HTTP/1.1 client.
#[derive(Debug)]
struct Raw {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
    /// How reading ended, if not with a clean EOF (TLS close_notify or FIN).
    error: Option<io::ErrorKind>,
}

impl Raw {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    fn content_length(&self) -> Option<u64> {
        self.header("content-length")?.parse().ok()
    }
}

impl Fixture {
    async fn get(&self, path: &str, range: Option<&str>) -> Raw {
        self.send("GET", path, range, usize::MAX).await
    }

    /// Sends one request with `Connection: close` over TLS and reads until
    /// EOF, an error, or more than `cap` bytes.
    async fn send(&self, method: &str, path: &str, range: Option<&str>, cap: usize) -> Raw {
        let range = range.map_or(String::new(), |r| format!("Range: {r}\r\n"));
        let request = format!(
            "{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n{range}\r\n"
        );
        let tcp = TcpStream::connect(self.depot.addr())
            .await
            .expect("connect");
        let name = rustls_pki_types::ServerName::try_from("localhost").expect("server name");
        let mut tls = TlsConnector::from(self.pki.client_config())
            .connect(name, tcp)
            .await
            .expect("TLS handshake with the depot");
        exchange(&mut tls, &request, cap).await
    }
}

async fn exchange<S: AsyncRead + AsyncWrite + Unpin>(s: &mut S, request: &str, cap: usize) -> Raw {
    s.write_all(request.as_bytes()).await.expect("send request");
    s.flush().await.expect("flush request");
    let mut raw = Vec::new();
    let mut buf = vec![0; 16 * 1024];
    let error = loop {
        match s.read(&mut buf).await {
            Ok(0) => break None,
            Ok(n) => raw.extend_from_slice(&buf[..n]),
            Err(e) => break Some(e.kind()),
        }
        if raw.len() > cap {
            break None;
        }
    };
    let end = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("a complete response head");
    let head = String::from_utf8_lossy(&raw[..end]).into_owned();
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|s| s.parse().ok())
        .expect("status line");
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_owned(), v.trim().to_owned()))
        .collect();
    Raw {
        status,
        headers,
        body: raw[end + 4..].to_vec(),
        error,
    }
}

#[tokio::test]
async fn get_serves_the_whole_file() {
    let f = fixture();
    let r = f.get(&f.path, None).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.content_length(), Some(SIZE as u64));
    assert_eq!(r.header("accept-ranges"), Some("bytes"));
    assert!(r.body == f.data, "body differs from the file");
    assert_eq!(r.error, None);
    let log = f.depot.requests();
    assert_eq!(log.len(), 1);
    assert_eq!(log[0].path, f.path);
    assert_eq!(log[0].status, 200);
    assert_eq!(log[0].body_bytes_sent, SIZE as u64);
    assert_eq!(f.depot.bytes_served(), SIZE as u64);
}

#[tokio::test]
async fn head_sends_length_without_body() {
    let f = fixture();
    let r = f.send("HEAD", &f.path, None, usize::MAX).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.content_length(), Some(SIZE as u64));
    assert!(r.body.is_empty());
}

#[tokio::test]
async fn range_open_ended_and_closed() {
    let f = fixture();
    let r = f.get(&f.path, Some("bytes=100000-")).await;
    assert_eq!(r.status, 206);
    let expected = format!("bytes 100000-{}/{SIZE}", SIZE - 1);
    assert_eq!(r.header("content-range"), Some(expected.as_str()));
    assert_eq!(r.content_length(), Some(SIZE as u64 - 100_000));
    assert!(r.body == f.data[100_000..]);

    let r = f.get(&f.path, Some("bytes=10-19")).await;
    assert_eq!(r.status, 206);
    let expected = format!("bytes 10-19/{SIZE}");
    assert_eq!(r.header("content-range"), Some(expected.as_str()));
    assert_eq!(r.body, f.data[10..20]);

    let r = f.get(&f.path, Some("bytes=-5")).await;
    assert_eq!(r.status, 206);
    assert_eq!(r.body, f.data[SIZE - 5..]);
    assert_eq!(f.depot.requests()[1].range.as_deref(), Some("bytes=10-19"));
}

#[tokio::test]
async fn unsatisfiable_range_is_416() {
    let f = fixture();
    let r = f.get(&f.path, Some(&format!("bytes={SIZE}-"))).await;
    assert_eq!(r.status, 416);
    let expected = format!("bytes */{SIZE}");
    assert_eq!(r.header("content-range"), Some(expected.as_str()));
}

#[tokio::test]
async fn ignore_range_sends_200_and_everything() {
    let f = fixture();
    f.depot.fault(&f.path, Fault::IgnoreRange, 1);
    let r = f.get(&f.path, Some("bytes=1000-")).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-range"), None);
    assert!(r.body == f.data);
}

#[tokio::test]
async fn wrong_content_range_moves_the_start() {
    let f = fixture();
    f.depot.fault(&f.path, Fault::WrongContentRange, 1);
    let r = f.get(&f.path, Some("bytes=1000-")).await;
    assert_eq!(r.status, 206);
    let expected = format!("bytes 999-{}/{SIZE}", SIZE - 1);
    assert_eq!(r.header("content-range"), Some(expected.as_str()));
    assert!(r.body == f.data[1000..]);
}

#[tokio::test]
async fn truncate_closes_after_exactly_that_many_bytes() {
    let f = fixture();
    f.depot
        .fault(&f.path, Fault::Truncate { after: 100_000 }, 1);
    let r = f.get(&f.path, None).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.content_length(), Some(SIZE as u64));
    assert_eq!(r.body.len(), 100_000);
    assert!(r.body == f.data[..100_000]);
    assert_eq!(
        r.error,
        Some(io::ErrorKind::UnexpectedEof),
        "no close_notify"
    );
    assert_eq!(f.depot.requests()[0].body_bytes_sent, 100_000);

    // Used up: the next request is whole.
    assert!(f.get(&f.path, None).await.body == f.data);
}

#[tokio::test]
async fn reset_sends_rst_after_that_many_bytes() {
    let f = fixture();
    f.depot.fault(&f.path, Fault::Reset { after: 70_000 }, 1);
    let r = f.get(&f.path, None).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.error, Some(io::ErrorKind::ConnectionReset));
    // Linux delivers all 70 000 bytes before reporting the reset on loopback,
    // but RST may discard unread data in general.
    assert!(r.body.len() <= 70_000);
    assert!(r.body == f.data[..r.body.len()]);
}

#[tokio::test]
async fn corrupt_flips_one_byte() {
    let f = fixture();
    f.depot
        .fault(&f.path, Fault::Corrupt { offset: 123_456 }, 1);
    let r = f.get(&f.path, None).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.body.len(), SIZE);
    let differing: Vec<usize> = (0..SIZE).filter(|&i| r.body[i] != f.data[i]).collect();
    assert_eq!(differing, vec![123_456]);
}

#[tokio::test]
async fn status_fault_then_success() {
    let f = fixture();
    f.depot.fault(&f.path, Fault::Status(500), 1);
    assert_eq!(f.get(&f.path, None).await.status, 500);
    let r = f.get(&f.path, None).await;
    assert_eq!(r.status, 200);
    assert!(r.body == f.data);
    assert_eq!(f.depot.count(&f.path), 2);
    let statuses: Vec<u16> = f.depot.requests().iter().map(|l| l.status).collect();
    assert_eq!(statuses, vec![500, 200]);
    f.depot.clear_log();
    assert_eq!(f.depot.count(&f.path), 0);
    assert_eq!(f.depot.bytes_served(), 0);
}

#[tokio::test]
async fn wildcard_fault_applies_to_every_path_until_cleared() {
    let f = fixture();
    f.depot.fault(ANY_PATH, Fault::Status(503), usize::MAX);
    assert_eq!(f.get(&f.path, None).await.status, 503);
    assert_eq!(f.get("/images/x.json", None).await.status, 503);
    f.depot.clear_faults();
    assert_eq!(f.get(&f.path, None).await.status, 200);
}

#[tokio::test]
async fn missing_file_is_404() {
    let f = fixture();
    assert_eq!(f.get("/vibs/0000", None).await.status, 404);
    assert_eq!(f.get("/vibs", None).await.status, 404, "a directory");
}

#[tokio::test]
async fn traversal_is_refused() {
    let f = fixture();
    for path in [
        "/../secret",
        "/vibs/../../secret",
        "/%2e%2e/secret",
        "/vibs/%2E%2E/%2e%2e/secret",
        "//secret",
        "/vibs/..%2f..%2fsecret",
        "/%zz",
    ] {
        let r = f.get(path, None).await;
        assert!(
            r.status == 400 || r.status == 404,
            "{path} answered {}",
            r.status
        );
        assert!(!r.body.starts_with(b"outside"), "{path} leaked");
    }
}

#[tokio::test]
async fn extra_bytes_lengthen_body_and_content_length() {
    let f = fixture();
    f.depot.fault(&f.path, Fault::ExtraBytes(10), 1);
    let r = f.get(&f.path, None).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.content_length(), Some(SIZE as u64 + 10));
    assert_eq!(r.body.len(), SIZE + 10);
    assert!(r.body[..SIZE] == f.data[..]);
    assert_eq!(r.error, None);
}

#[tokio::test]
async fn size_lie_declares_another_length() {
    let f = fixture();
    f.depot.fault(
        &f.path,
        Fault::SizeLie {
            content_length: 1000,
        },
        1,
    );
    let r = f.get(&f.path, None).await;
    assert_eq!(r.content_length(), Some(1000));
    assert_eq!(r.body, f.data[..1000]);

    let lie = SIZE as u64 + 100;
    f.depot.fault(
        &f.path,
        Fault::SizeLie {
            content_length: lie,
        },
        1,
    );
    let r = f.get(&f.path, None).await;
    assert_eq!(r.content_length(), Some(lie));
    assert!(r.body == f.data, "the real body, whole");
    assert_eq!(r.error, Some(io::ErrorKind::UnexpectedEof));
}

#[tokio::test]
async fn endless_never_ends_and_the_depot_survives() {
    let f = fixture();
    f.depot.fault(&f.path, Fault::Endless, 1);
    let r = f.send("GET", &f.path, None, 1 << 20).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.content_length(), None);
    assert_eq!(r.header("transfer-encoding"), Some("chunked"));
    assert!(r.body.len() > 1 << 19);
    // The client hung up mid-body; the depot keeps serving.
    assert!(f.get(&f.path, None).await.body == f.data);
}

#[tokio::test]
async fn redirects() {
    let f = fixture();
    f.depot.fault(&f.path, Fault::RedirectLoop, 1);
    let r = f.get(&f.path, None).await;
    assert_eq!(r.status, 302);
    assert_eq!(r.header("location"), Some(f.path.as_str()));

    let elsewhere = format!("http://{}/x", f.depot.addr());
    f.depot
        .fault(&f.path, Fault::RedirectTo(elsewhere.clone()), 1);
    let r = f.get(&f.path, None).await;
    assert_eq!(r.status, 302);
    assert_eq!(r.header("location"), Some(elsewhere.as_str()));
}

#[tokio::test]
async fn stall_and_drip_still_deliver_everything() {
    let f = fixture();
    let pause = Duration::from_millis(50);
    f.depot.fault(
        &f.path,
        Fault::Stall {
            after: 5,
            for_: pause,
        },
        1,
    );
    assert!(f.get(&f.path, None).await.body == f.data);
    f.depot.fault(
        &f.path,
        Fault::SlowDrip {
            bytes_per_sec: 1000,
        },
        1,
    );
    assert_eq!(
        f.get(&f.path, Some("bytes=0-199")).await.body,
        f.data[..200]
    );
}

#[test]
fn plain_http_from_a_sync_test() {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::create_dir_all(dir.path().join("images")).expect("mkdir");
    std::fs::write(dir.path().join("images/a.json"), b"{}").expect("write");
    let depot = Depot::start_http(dir.path());
    assert!(depot.url().starts_with("http://127.0.0.1:"));
    let mut tcp = std::net::TcpStream::connect(depot.addr()).expect("connect");
    std::io::Write::write_all(
        &mut tcp,
        b"GET /images/a.json HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .expect("send");
    let mut response = String::new();
    std::io::Read::read_to_string(&mut tcp, &mut response).expect("read");
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    assert!(response.ends_with("\r\n\r\n{}"), "{response}");
    assert_eq!(depot.count("/images/a.json"), 1);
}

#[test]
fn range_parsing() {
    use Requested::*;
    let p = |h: &str| parse_range(Some(h), 100);
    assert_eq!(parse_range(None, 100), Whole);
    assert_eq!(p("bytes=0-"), Part { start: 0, end: 99 });
    assert_eq!(p("bytes=5-500"), Part { start: 5, end: 99 });
    assert_eq!(p("bytes=-10"), Part { start: 90, end: 99 });
    assert_eq!(p("bytes=-1000"), Part { start: 0, end: 99 });
    assert_eq!(p("bytes=100-"), Unsatisfiable);
    assert_eq!(p("bytes=-0"), Unsatisfiable);
    assert_eq!(p("bytes=9-5"), Whole);
    assert_eq!(p("bytes=0-1,5-6"), Whole);
    assert_eq!(p("items=0-1"), Whole);
    assert_eq!(p("bytes=x-"), Whole);
    assert_eq!(parse_range(Some("bytes=0-"), 0), Unsatisfiable);
}
