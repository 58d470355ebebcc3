//! Hostile clients (issue 8; SPEC §2, §5, §7). TLS: clients refused at the handshake (no certificate, another CA, expired, wrong names).
//! The harness and what every case asserts: `vibstage_e2e::hostile`.

use std::io::{Read, Write};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use time::Duration as TimeDelta;
use vibstage_e2e::agent::{tls_client, tls_request};
use vibstage_e2e::{AgentOptions, World};

use vibstage_e2e::hostile::*;

/// The error of a refused handshake, as text (rustls reports the server's alert on first read).
fn refused(config: Arc<rustls::ClientConfig>, addr: &str) -> String {
    match tls_request(config, addr, "GET", "/v1/status", None) {
        Ok(r) => panic!("request was served: {} {}", r.status, r.body),
        Err(e) => e.to_string(),
    }
}

#[test]
fn tls_clients_are_refused_at_the_handshake() {
    let mut t = Target::new(AgentOptions {
        operators: vec!["controller".into()],
        readers: vec!["auditor".into()],
        ..AgentOptions::default()
    });
    let addr = t.agent.addr();
    let ca = t.world.tls_dir.join("ca.pem");
    let pair = |dir: &Path| {
        tls_client(
            &ca,
            Some((&dir.join("client.pem"), &dir.join("client.key"))),
        )
    };
    let good = pair(&t.world.tls_dir);

    // A connection that never starts its handshake: closed after the handshake timeout, while
    // everyone else is served. Runs in the background during the other cases.
    let idle_open = Arc::new(AtomicBool::new(true));
    let idle = {
        let addr = addr.clone();
        let open = idle_open.clone();
        std::thread::spawn(move || {
            let mut s = std::net::TcpStream::connect(&addr).expect("connect");
            s.set_read_timeout(Some(Duration::from_secs(60)))
                .expect("timeout");
            let mut buf = [0u8; 64];
            let result = s.read(&mut buf);
            open.store(false, Ordering::SeqCst);
            result.map_err(|e| e.to_string())
        })
    };
    let served_meanwhile = AtomicUsize::new(0);

    let tls_case = |t: &mut Target, name: &str, config: Arc<rustls::ClientConfig>, alert: &str| {
        let before = t.disk();
        let err = refused(config, &addr);
        assert!(
            err.contains(alert),
            "case {name}: expected alert {alert}, got: {err}"
        );
        let ok = tls_request(good.clone(), &addr, "GET", "/healthz", None)
            .expect("still serving over mTLS");
        assert_eq!(ok.status, 200, "case {name}");
        if idle_open.load(Ordering::SeqCst) {
            served_meanwhile.fetch_add(1, Ordering::SeqCst);
        }
        t.still_serving(name);
        let changes = diff(&before, &t.disk());
        assert!(changes.is_empty(), "case {name} wrote to disk: {changes:?}");
        t.cases.push(name.to_owned());
    };

    tls_case(
        &mut t,
        "tls-no-client-certificate",
        tls_client(&ca, None),
        "CertificateRequired",
    );
    let other_world = World::new();
    let foreign = other_world.client_tls_dir(
        "foreign",
        "controller",
        -TimeDelta::hours(1),
        TimeDelta::days(1),
    );
    tls_case(
        &mut t,
        "tls-certificate-of-another-ca",
        pair(&foreign),
        "UnknownCA",
    );
    let expired = t.world.client_tls_dir(
        "expired",
        "controller",
        -TimeDelta::days(10),
        -TimeDelta::days(1),
    );
    tls_case(
        &mut t,
        "tls-expired-certificate",
        pair(&expired),
        "CertificateExpired",
    );
    let future = t.world.client_tls_dir(
        "future",
        "controller",
        TimeDelta::days(1),
        TimeDelta::days(10),
    );
    tls_case(
        &mut t,
        "tls-not-yet-valid-certificate",
        pair(&future),
        "CertificateExpired",
    );
    // The agent's own server certificate (same CA, EKU serverAuth only) used as a client one.
    let server_cert = tls_client(
        &ca,
        Some((
            &t.agent.home.join("agent.pem"),
            &t.agent.home.join("agent.key"),
        )),
    );
    tls_case(
        &mut t,
        "tls-server-certificate-as-client",
        server_cert,
        "UnsupportedCertificate",
    );
    // A self-signed certificate claiming the controller's name.
    let selfsigned = {
        let dir = t.world.dir.path().join("selfsigned");
        std::fs::create_dir_all(&dir).expect("dir");
        let key = rcgen::KeyPair::generate().expect("key");
        let mut params = rcgen::CertificateParams::new(vec!["controller".into()]).expect("params");
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "controller");
        params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
        let cert = params.self_signed(&key).expect("self-sign");
        std::fs::write(dir.join("client.pem"), cert.pem()).expect("cert");
        std::fs::write(dir.join("client.key"), key.serialize_pem()).expect("key");
        dir
    };
    tls_case(
        &mut t,
        "tls-self-signed-certificate",
        pair(&selfsigned),
        "UnknownCA",
    );
    // The CA's own certificate and key presented as a client certificate.
    let ca_as_client = {
        let dir = t.world.dir.path().join("ca-as-client");
        std::fs::create_dir_all(&dir).expect("dir");
        std::fs::write(dir.join("client.pem"), t.world.ca.cert_pem()).expect("cert");
        std::fs::write(dir.join("client.key"), t.world.ca.key_pem()).expect("key");
        dir
    };
    tls_case(
        &mut t,
        "tls-ca-certificate-as-client",
        pair(&ca_as_client),
        "CertificateUnknown",
    );

    // Plain HTTP on the mTLS port: no HTTP answer, the connection is closed.
    {
        let before = t.disk();
        let mut s = std::net::TcpStream::connect(&addr).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(30)))
            .expect("timeout");
        s.write_all(b"GET /v1/status HTTP/1.1\r\nHost: agent\r\n\r\n")
            .expect("write");
        let mut answer = Vec::new();
        let _ = s.read_to_end(&mut answer);
        assert!(
            !answer.starts_with(b"HTTP/"),
            "plain HTTP was answered: {}",
            String::from_utf8_lossy(&answer)
        );
        t.still_serving("tls-plain-http-on-the-tls-port");
        assert!(diff(&before, &t.disk()).is_empty());
        t.cases.push("tls-plain-http-on-the-tls-port".into());
    }

    // Valid certificates the allow-lists do not allow: 403 forbidden.
    let stranger = t.world.client_tls_dir(
        "stranger",
        "stranger",
        -TimeDelta::hours(1),
        TimeDelta::days(1),
    );
    let stranger_cfg = pair(&stranger);
    t.case("tls-unlisted-client-reads", 403, Some("forbidden"), |t| {
        tls_request(
            stranger_cfg.clone(),
            &t.agent.addr(),
            "GET",
            "/v1/status",
            None,
        )
        .expect("stranger")
    });
    let auditor = t.world.client_tls_dir(
        "auditor",
        "auditor",
        -TimeDelta::hours(1),
        TimeDelta::days(1),
    );
    let auditor_cfg = pair(&auditor);
    let image = t.world.image("esx-8.0u2", 1, &["ESXi=8.0.2-0.20"]);
    let body = t.stage_body(&image);
    t.case("tls-reader-stages", 403, Some("forbidden"), |t| {
        tls_request(
            auditor_cfg.clone(),
            &t.agent.addr(),
            "POST",
            "/v1/stage",
            Some(&body),
        )
        .expect("auditor")
    });
    t.case("tls-reader-deletes-staged", 403, Some("forbidden"), |t| {
        let path = format!("/v1/staged/sha256:{}", "0".repeat(64));
        tls_request(auditor_cfg.clone(), &t.agent.addr(), "DELETE", &path, None).expect("auditor")
    });
    // The reader may read.
    let read = tls_request(auditor_cfg, &addr, "GET", "/v1/status", None).expect("auditor read");
    assert_eq!(read.status, 200, "{}", read.body);

    let closed = idle.join().expect("idle thread");
    assert!(
        matches!(closed, Ok(0)) || closed.is_err(),
        "a connection that never sent a handshake got {closed:?}"
    );
    assert!(
        served_meanwhile.load(Ordering::SeqCst) >= 5,
        "other clients were not served while the idle connection was open"
    );
    eprintln!("{} TLS cases: {:?}", t.cases.len(), t.cases);
    assert!(t.cases.len() >= 11);
}
