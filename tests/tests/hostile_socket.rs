//! Hostile clients (issue 8; SPEC §2, §5, §7). The Unix socket's peer check: a peer whose uid is not 0 gets 403 on every route.
//! The harness and what every case asserts: `vibstage_e2e::hostile`.

use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};

use vibstage_e2e::{AgentOptions, Reply};

use vibstage_e2e::hostile::*;

/// curl on the socket as uid/gid 65534; returns the answer.
fn as_nobody(socket: &Path, method: &str, path: &str, body: Option<&str>) -> Reply {
    let mut cmd = Command::new("setpriv");
    cmd.args([
        "--reuid=65534",
        "--regid=65534",
        "--clear-groups",
        "curl",
        "-s",
        "-i",
        "-X",
        method,
    ])
    .arg("--unix-socket")
    .arg(socket);
    if body.is_some() {
        cmd.args([
            "-H",
            "content-type: application/json",
            "--data-binary",
            "@-",
        ]);
    }
    let mut child = cmd
        .arg(format!("http://agent{path}"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("setpriv curl");
    if let Some(body) = body {
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(body.as_bytes())
            .expect("body");
    }
    drop(child.stdin.take());
    let out = child.wait_with_output().expect("curl");
    let reply = parse(&out.stdout);
    assert!(
        reply.status != 0,
        "curl got no answer: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    reply
}

#[test]
fn non_root_peers_on_the_socket_get_403() {
    let mut t = Target::new(AgentOptions::default());
    // The socket's mode (0600) already keeps others out; open it and its directories up, so that
    // only the SO_PEERCRED check stands between uid 65534 and the API.
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&t.agent.socket)
            .expect("socket")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        std::fs::set_permissions(&t.agent.socket, std::fs::Permissions::from_mode(0o666))
            .expect("chmod");
        let mut dir = t.agent.socket.parent().map(Path::to_path_buf);
        while let Some(d) = dir {
            let _ = std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o755));
            dir = d.parent().map(Path::to_path_buf);
        }
    }
    let socket = t.agent.socket.clone();
    let image = t.world.image("esx-8.0u2", 1, &["ESXi=8.0.2-0.20"]);
    let body = t.stage_body(&image).to_string();
    t.case(
        "socket-non-root-reads-status",
        403,
        Some("forbidden"),
        |_| as_nobody(&socket, "GET", "/v1/status", None),
    );
    t.case("socket-non-root-stages", 403, Some("forbidden"), |_| {
        as_nobody(&socket, "POST", "/v1/stage", Some(&body))
    });
    t.case("socket-non-root-remediates", 403, Some("forbidden"), |_| {
        as_nobody(&socket, "POST", "/v1/remediate", Some(&body))
    });
    t.case(
        "socket-non-root-deletes-staged",
        403,
        Some("forbidden"),
        |_| {
            as_nobody(
                &socket,
                "DELETE",
                &format!("/v1/staged/sha256:{}", "0".repeat(64)),
                None,
            )
        },
    );
    eprintln!("{} socket cases: {:?}", t.cases.len(), t.cases);
}
