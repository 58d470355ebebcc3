//! A site cache in front of the origin depot (issue 15, part 2): the shipped
//! `packaging/depot-cache.conf`, filled in and run by a real nginx, between a real nginx origin
//! and many real agents that name the cache first and the origin after it. The origin must send
//! about one copy of the image however many agents stage it (the cache lock makes concurrent
//! misses one origin request per slice), and when the cache dies mid-run the agents finish from
//! the origin.
//!
//! `VIBSTAGE_CACHE_AGENTS=100` runs the bench-sized version (default 20, the CI budget).

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::{Value, json};
use vibstage_e2e::nginx::Nginx;
use vibstage_e2e::{AgentOptions, AgentProc, VibFile, World};

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

fn repo_file(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(path)
}

/// Every agent asks to stage `image` at once; returns each finished task.
fn stage_all(
    agents: &[AgentProc],
    image: &vibstage_protocol::Envelope,
    depots: &Value,
) -> Vec<Value> {
    let ids: Vec<String> = agents
        .iter()
        .map(|a| {
            let r = a.request(
                "POST",
                "/v1/stage",
                Some(&json!({"image": image, "depot": depots})),
            );
            assert_eq!(r.status, 202, "{}: {}", a.name, r.body);
            r.json["task"]["id"].as_str().expect("id").to_owned()
        })
        .collect();
    agents
        .iter()
        .zip(&ids)
        .map(|(a, id)| a.wait_task(id, 300))
        .collect()
}

fn vib_bytes_sent(nginx: &Nginx) -> u64 {
    nginx
        .accesses()
        .iter()
        .filter(|a| a.uri.starts_with("/vibs/"))
        .map(|a| a.bytes)
        .sum()
}

#[test]
fn a_site_cache_sends_one_copy_to_the_origin_and_agents_finish_when_it_dies() {
    let agents_wanted: usize = std::env::var("VIBSTAGE_CACHE_AGENTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20);
    let world = World::new();
    let first = [
        VibFile::software("esx-base", 3 << 20),
        VibFile::software("esx-ui", (2 << 20) + 12_345),
    ];
    world.add_vibs(&first);
    let image = world.image("esx-8.0u2", 1, &["ESXi=8.0.2-0.20"]);
    let image_bytes: u64 = first.iter().map(|v| v.size as u64).sum();

    let dir = world.dir.path();
    let (cert, key) = world.depot_pki.write_server_pem(dir);
    let (origin_port, cache_port) = (free_port(), free_port());
    // The origin: any static server; this one slow enough (4 MB/s a connection) that the cache
    // is still busy with it when it is killed in the second half.
    let origin = Nginx::start(
        &dir.join("origin"),
        &format!(
            r#"server {{
    listen 127.0.0.1:{origin_port} ssl;
    ssl_certificate {cert};
    ssl_certificate_key {key};
    root {root};
    limit_rate 4m;
    location /vibs/ {{ add_header Cache-Control "public, max-age=31536000, immutable"; }}
}}"#,
            cert = cert.display(),
            key = key.display(),
            root = world.depot_dir.display(),
        ),
        &[origin_port],
    );
    let cache_conf = std::fs::read_to_string(repo_file("packaging/depot-cache.conf"))
        .expect("packaging/depot-cache.conf")
        .replace("@LISTEN@", &format!("127.0.0.1:{cache_port}"))
        .replace("@CERT@", &cert.display().to_string())
        .replace("@KEY@", &key.display().to_string())
        .replace(
            "@CACHE_DIR@",
            &dir.join("cache-files").display().to_string(),
        )
        .replace("@ORIGIN_NAME@", "localhost")
        .replace(
            "@ORIGIN_CA@",
            &world.depot_pki.ca_pem_path().display().to_string(),
        )
        .replace("@ORIGIN@", &format!("https://127.0.0.1:{origin_port}"));
    assert!(
        !cache_conf
            .lines()
            .any(|l| !l.trim_start().starts_with('#') && l.contains('@')),
        "a placeholder is left:\n{cache_conf}"
    );
    let mut cache = Nginx::start(&dir.join("cache"), &cache_conf, &[cache_port]);
    let depots = json!([
        format!("https://127.0.0.1:{cache_port}/"),
        format!("https://127.0.0.1:{origin_port}/"),
    ]);

    let agents: Vec<AgentProc> = (0..agents_wanted)
        .map(|i| {
            let mut a = world.agent(&format!("esx-{i:03}"), AgentOptions::default());
            a.start();
            a
        })
        .collect();

    // Every agent at once, through the cache.
    for task in stage_all(&agents, &image, &depots) {
        assert_eq!(task["state"], "succeeded", "{task}");
        assert_eq!(task["depots"][0]["blobs"], 2, "all from the cache: {task}");
    }
    let from_origin = vib_bytes_sent(&origin);
    let from_cache = vib_bytes_sent(&cache);
    eprintln!(
        "{agents_wanted} agents, image {image_bytes} bytes: origin sent {from_origin} ({:.3}×), the cache {from_cache} ({:.2}×)",
        from_origin as f64 / image_bytes as f64,
        from_cache as f64 / image_bytes as f64
    );
    assert!(
        from_origin as f64 <= 1.05 * image_bytes as f64,
        "the origin sent {from_origin} bytes for an image of {image_bytes}"
    );
    assert_eq!(from_cache, image_bytes * agents_wanted as u64);

    // A second image; the cache dies while it fetches it from the (slow) origin.
    let second = [
        VibFile::software("esx-base-2", 4 << 20),
        VibFile::software("esx-ui-2", 4 << 20),
    ];
    for v in &second {
        world.add_vibs(&[VibFile {
            version: "8.0.3-0.1".into(),
            ..v.clone()
        }]);
    }
    let image2 = world.image("esx-8.0u3", 1, &["ESXi=8.0.3-0.1"]);
    let killer = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(400));
        cache.kill();
        cache
    });
    let tasks = stage_all(&agents, &image2, &depots);
    let cache = killer.join().expect("killer");
    drop(cache);
    let mut failed_over = 0;
    for task in &tasks {
        assert_eq!(task["state"], "succeeded", "{task}");
        if task["depots"][0]["failures"].as_u64() > Some(0) {
            failed_over += 1;
        }
    }
    assert!(failed_over > 0, "no agent saw the cache die: {tasks:?}");
    for a in &agents {
        for (name, ok) in a.blobs() {
            assert!(ok, "{}: blob {name} holds wrong bytes", a.name);
        }
    }
}
