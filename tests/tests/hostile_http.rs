//! Hostile clients (issue 8; SPEC §2, §5, §7). Malformed HTTP and request bodies, with a slowloris connection trickling its headers in the background the whole time.
//! The harness and what every case asserts: `vibstage_e2e::hostile`.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use serde_json::json;
use vibstage_e2e::AgentOptions;

use vibstage_e2e::hostile::*;

/// Trickles header bytes on the socket and never ends the head; returns what it saw once the
/// agent closed the connection (`Err` if it never did within a minute).
fn slowloris(
    socket: PathBuf,
    open: Arc<AtomicBool>,
) -> std::thread::JoinHandle<Result<Vec<u8>, String>> {
    trickle(
        socket,
        open,
        b"GET /v1/status HTTP/1.1\r\nHost: agent\r\nX-Slow: ".to_vec(),
    )
}

/// Sends `start`, then one more byte every 250 ms until the agent answers and closes (what it
/// sent is returned) or a minute passes (`Err`).
fn trickle(
    socket: PathBuf,
    open: Arc<AtomicBool>,
    start: Vec<u8>,
) -> std::thread::JoinHandle<Result<Vec<u8>, String>> {
    std::thread::spawn(move || {
        let result = (|| {
            let mut s = UnixStream::connect(&socket).map_err(|e| e.to_string())?;
            s.set_read_timeout(Some(Duration::from_millis(250)))
                .map_err(|e| e.to_string())?;
            s.write_all(&start).map_err(|e| e.to_string())?;
            let deadline = Instant::now() + Duration::from_secs(60);
            let mut answer = Vec::new();
            loop {
                if s.write_all(b"a").is_err() {
                    return Ok(answer);
                }
                let mut buf = [0u8; 1024];
                match s.read(&mut buf) {
                    Ok(0) => return Ok(answer),
                    Ok(n) => answer.extend_from_slice(&buf[..n]),
                    Err(e)
                        if matches!(
                            e.kind(),
                            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                        ) => {}
                    Err(_) => return Ok(answer),
                }
                if Instant::now() > deadline {
                    return Err("the agent kept a trickling connection open for a minute".into());
                }
            }
        })();
        open.store(false, Ordering::SeqCst);
        result
    })
}

#[test]
fn malformed_http_and_bodies_get_precise_errors() {
    let mut t = Target::new(AgentOptions::default());
    let socket = t.agent.socket.clone();
    let loris_open = Arc::new(AtomicBool::new(true));
    let loris = slowloris(socket.clone(), loris_open.clone());
    let image = t.world.image("esx-8.0u2", 1, &["ESXi=8.0.2-0.20"]);
    let url = t.world.depot.url();
    let valid = json!(image).to_string();
    let json_ct = "application/json";

    // Protocol level: answered by the HTTP parser before any route, without an error body.
    let huge_header = format!(
        "GET /v1/status HTTP/1.1\r\nHost: agent\r\nX-Big: {}\r\n\r\n",
        "a".repeat(1 << 20)
    );
    t.case("http-huge-header", 431, None, |_| {
        raw(&socket, huge_header.as_bytes(), false)
    });
    let many_headers: String = (0..200).map(|i| format!("X-H{i}: v\r\n")).collect();
    let many = format!("GET /v1/status HTTP/1.1\r\nHost: agent\r\n{many_headers}\r\n");
    t.case("http-too-many-headers", 431, None, |_| {
        raw(&socket, many.as_bytes(), false)
    });
    t.case("http-garbage-request-line", 400, None, |_| {
        raw(&socket, b"\x16\x03\x01garbage\r\n\r\n", false)
    });
    t.case("http-content-length-and-chunked", 400, Some("bad_request"), |_| {
        raw(
            &socket,
            b"POST /v1/stage HTTP/1.1\r\nHost: a\r\nContent-Type: application/json\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n",
            false,
        )
    });
    t.case("http-two-content-lengths", 400, None, |_| {
        raw(
            &socket,
            b"POST /v1/stage HTTP/1.1\r\nHost: a\r\nContent-Type: application/json\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\n{} ",
            false,
        )
    });

    // Bodies.
    let huge = format!("{{\"depot\": \"{}\"}}", "x".repeat(5 << 20));
    t.case("http-huge-body", 413, Some("bad_request"), |t| {
        t.send("POST", "/v1/stage", &huge, json_ct)
    });
    // A gigabyte announced, and more than the limit actually sent.
    let announced = format!(
        "POST /v1/stage HTTP/1.1\r\nHost: a\r\nContent-Type: application/json\r\nContent-Length: 1000000000\r\n\r\n{{\"depot\": \"{}",
        "x".repeat(5 << 20)
    );
    t.case(
        "http-huge-content-length-announced",
        413,
        Some("bad_request"),
        |_| raw_clean(&socket, announced.as_bytes(), true),
    );
    let chunked_huge = {
        let chunk = format!("{:x}\r\n{}\r\n", 1 << 20, "x".repeat(1 << 20));
        format!(
            "POST /v1/stage HTTP/1.1\r\nHost: a\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n{}0\r\n\r\n",
            chunk.repeat(5)
        )
    };
    t.case("http-huge-chunked-body", 413, Some("bad_request"), |_| {
        raw_clean(&socket, chunked_huge.as_bytes(), false)
    });
    let truncated_body = format!(
        "POST /v1/stage HTTP/1.1\r\nHost: a\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{}",
        valid.len() + 100,
        &valid[..valid.len() / 2]
    );
    t.case(
        "http-body-shorter-than-content-length",
        400,
        Some("bad_request"),
        |_| raw(&socket, truncated_body.as_bytes(), true),
    );
    t.case("json-truncated", 400, Some("bad_request"), |t| {
        t.send("POST", "/v1/stage", &valid[..valid.len() / 2], json_ct)
    });
    t.case("json-malformed", 400, Some("bad_request"), |t| {
        t.send("POST", "/v1/stage", "{\"image\": ", json_ct)
    });
    t.case("json-empty-body", 400, Some("bad_request"), |t| {
        t.send("POST", "/v1/stage", "", json_ct)
    });
    t.case("json-null", 400, Some("bad_request"), |t| {
        t.send("POST", "/v1/stage", "null", json_ct)
    });
    t.case("json-array", 400, Some("bad_request"), |t| {
        t.send("POST", "/v1/stage", "[1,2]", json_ct)
    });
    t.case("json-invalid-utf8", 400, Some("bad_request"), |_| {
        let body = b"{\"image\": \"\xff\xfe\"}";
        let mut bytes = format!(
            "POST /v1/compliance/check HTTP/1.1\r\nHost: a\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            body.len()
        )
        .into_bytes();
        bytes.extend_from_slice(body);
        raw(&socket, &bytes, false)
    });
    let deep = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
    t.case("json-nested-100000-deep", 400, Some("bad_request"), |t| {
        t.send("POST", "/v1/stage", &deep, json_ct)
    });
    t.case("json-trailing-garbage", 400, Some("bad_request"), |t| {
        t.send(
            "POST",
            "/v1/stage",
            &format!("{{\"image\": {valid}, \"depot\": \"{url}\"}} {{}}"),
            json_ct,
        )
    });

    // Types and fields.
    t.case("json-depot-wrong-type", 400, Some("bad_request"), |t| {
        t.post("/v1/stage", &json!({"image": image, "depot": 7}))
    });
    t.case("json-image-wrong-type", 400, Some("bad_request"), |t| {
        t.post("/v1/stage", &json!({"image": "esx-8.0u2", "depot": url}))
    });
    t.case(
        "json-signatures-wrong-type",
        400,
        Some("bad_request"),
        |t| {
            let mut env = json!(image);
            env["signatures"] = json!({"keyid": "x"});
            t.post("/v1/stage", &json!({"image": env, "depot": url}))
        },
    );
    t.case("json-payload-not-base64", 400, Some("bad_request"), |t| {
        let mut env = json!(image);
        env["payload"] = json!("not base64!");
        t.post("/v1/compliance/check", &json!({"image": env}))
    });
    t.case("json-keyid-not-hex", 400, Some("bad_request"), |t| {
        let mut env = json!(image);
        env["signatures"][0]["keyid"] = json!("../../etc/passwd");
        t.post("/v1/compliance/check", &json!({"image": env}))
    });
    t.case("json-missing-depot", 400, Some("bad_request"), |t| {
        t.post("/v1/stage", &json!({"image": image}))
    });
    t.case("json-unknown-field", 400, Some("bad_request"), |t| {
        t.post(
            "/v1/stage",
            &json!({"image": image, "depot": url, "force": true}),
        )
    });
    t.case(
        "json-unknown-field-in-envelope",
        400,
        Some("bad_request"),
        |t| {
            let mut env = json!(image);
            env["comment"] = json!("hi");
            t.post("/v1/remediate", &json!({"image": env, "depot": url}))
        },
    );
    t.case("json-duplicate-key", 400, Some("bad_request"), |t| {
        t.send(
            "POST",
            "/v1/stage",
            &format!("{{\"depot\": \"{url}\", \"depot\": \"{url}\", \"image\": {valid}}}"),
            json_ct,
        )
    });
    t.case(
        "json-duplicate-key-in-envelope",
        400,
        Some("bad_request"),
        |t| {
            let env = valid.replacen(
                "\"payloadType\"",
                "\"payloadType\":\"x\",\"payloadType\"",
                1,
            );
            t.send(
                "POST",
                "/v1/compliance/check",
                &format!("{{\"image\": {env}}}"),
                json_ct,
            )
        },
    );

    // Content types.
    let good = json!({"image": image, "depot": url}).to_string();
    t.case("content-type-text-plain", 415, Some("bad_request"), |t| {
        t.send("POST", "/v1/stage", &good, "text/plain")
    });
    t.case("content-type-form", 415, Some("bad_request"), |t| {
        t.send(
            "POST",
            "/v1/remediate",
            &good,
            "application/x-www-form-urlencoded",
        )
    });
    t.case("content-type-missing", 415, Some("bad_request"), |_| {
        let req = format!(
            "POST /v1/stage HTTP/1.1\r\nHost: a\r\nConnection: close\r\nContent-Length: {}\r\n\r\n{good}",
            good.len()
        );
        raw(&socket, req.as_bytes(), false)
    });
    t.case(
        "content-type-json-lookalike",
        415,
        Some("bad_request"),
        |t| t.send("POST", "/v1/stage", &good, "application/jsonx"),
    );

    // Routes, methods, paths and queries.
    t.case("route-unknown", 404, Some("not_found"), |t| {
        t.agent.request("GET", "/v1/nope", None)
    });
    t.case("route-wrong-method", 405, Some("bad_request"), |t| {
        t.agent.request("DELETE", "/v1/status", None)
    });
    t.case("route-task-id-10k", 404, Some("not_found"), |t| {
        t.agent
            .request("GET", &format!("/v1/tasks/{}", "a".repeat(10_000)), None)
    });
    t.case("route-wait-not-a-number", 400, Some("bad_request"), |t| {
        t.agent.request("GET", "/v1/tasks/x?wait=soon", None)
    });
    t.case("route-wait-overflow", 400, Some("bad_request"), |t| {
        t.agent
            .request("GET", "/v1/tasks/x?wait=99999999999999999999999", None)
    });
    t.case("route-unknown-query", 400, Some("bad_request"), |t| {
        t.agent.request("GET", "/v1/tasks/x?wait=1&all=1", None)
    });
    t.case("route-staged-traversal", 400, Some("bad_request"), |t| {
        t.agent
            .request("DELETE", "/v1/staged/..%2F..%2Fstate%2Fstate.json", None)
    });
    t.case("route-staged-bad-digest", 400, Some("bad_request"), |t| {
        t.agent.request("DELETE", "/v1/staged/sha256:ZZ", None)
    });
    t.case("route-staged-unknown-digest", 404, Some("not_found"), |t| {
        t.agent.request(
            "DELETE",
            &format!("/v1/staged/sha256:{}", "0".repeat(64)),
            None,
        )
    });

    // Depot URLs.
    for (name, depot) in [
        ("depot-file-url", "file:///etc/"),
        ("depot-plain-http", "http://127.0.0.1:1/"),
        ("depot-ftp", "ftp://depot/"),
        ("depot-not-a-url", "depot"),
        ("depot-with-query", "https://depot.example/?x=1"),
    ] {
        t.case(name, 400, Some("bad_request"), |t| {
            t.post("/v1/stage", &json!({"image": image, "depot": depot}))
        });
    }

    // Meanwhile the slowloris connection was open and the agent served everyone else; then it
    // closed that connection (after its header timeout).
    let served_while_open = if loris_open.load(Ordering::SeqCst) {
        t.cases.len()
    } else {
        0
    };
    let seen = loris.join().expect("slowloris thread");
    let seen = seen.unwrap_or_else(|e| panic!("slowloris: {e}"));
    let answer = parse(&seen);
    assert!(
        seen.is_empty() || answer.status == 408,
        "slowloris got: {}",
        String::from_utf8_lossy(&seen)
    );
    assert!(
        served_while_open >= 10,
        "the cases did not run while the slowloris connection was open"
    );
    t.still_serving("after slowloris");
    t.cases.push("http-slowloris-headers".into());
    eprintln!("{} HTTP cases: {:?}", t.cases.len(), t.cases);
}

/// Found by this suite: the HTTP layer bounds the time for a request's head, but nothing bounded
/// its body, so a client announcing a body and trickling it (slow POST) held its connection, and
/// one of the listener's connection slots, for ever.
#[test]
fn a_request_body_trickled_slower_than_the_body_timeout_gets_408() {
    let mut t = Target::new(AgentOptions::default());
    let socket = t.agent.socket.clone();
    let open = Arc::new(AtomicBool::new(true));
    let slow = trickle(
        socket,
        open.clone(),
        b"POST /v1/stage HTTP/1.1\r\nHost: agent\r\nContent-Type: application/json\r\nContent-Length: 100000\r\n\r\n{\"depot\": \"".to_vec(),
    );
    // Others are served meanwhile.
    let mut served = 0;
    while open.load(Ordering::SeqCst) && served < 20 {
        t.still_serving("during a slow body");
        served += 1;
        std::thread::sleep(Duration::from_millis(100));
    }
    t.case("http-slow-body", 408, Some("bad_request"), |_| {
        parse(
            &slow
                .join()
                .expect("thread")
                .unwrap_or_else(|e| panic!("slow body: {e}")),
        )
    });
    assert_eq!(
        served, 20,
        "other clients were not served during the slow body"
    );
}
