//! A misbehaving depot (issue 3, "Must show"): one test per fault of the fault-injecting depot.
//!
//! Each test stages a one-VIB image from a depot that breaks in one way, and checks either that
//! staging succeeds with bytes equal to the depot's (and, where it matters, how the agent got
//! there: a Range resume or a restart from zero), or that it fails with the precise error code.
//! Whatever happens, no file under `blobs/` ever holds wrong bytes, and a VIB that failed has no
//! blob at all (SPEC §2 "exactly `size` bytes … and their sha256 matches", §7, R11).

use std::time::Duration;

use vibstage_e2e::fault_case::{FaultCase, SIZE, range_start};
use vibstage_e2e::{Depot, Fault};

#[test]
fn truncated_body_is_resumed_with_a_range_request() {
    let case = FaultCase::new(2, 3);
    case.fault(Fault::Truncate { after: 300_000 }, 1);
    let task = case.stage();
    case.assert_staged(&task);

    let log = case.vib_requests();
    assert!(log.len() >= 2, "{log:?}");
    assert_eq!(log[0].range, None, "{log:?}");
    assert_eq!(log[0].body_bytes_sent, 300_000, "{log:?}");
    let resumed = &log[1];
    let start = range_start(&resumed.range).unwrap_or_else(|| panic!("no Range resume: {log:?}"));
    assert!(start > 0 && start <= 300_000, "{log:?}");
    assert_eq!(resumed.status, 206, "{log:?}");
    assert_eq!(resumed.body_bytes_sent, SIZE - start, "{log:?}");
}

#[test]
fn byte_corrupted_once_is_refetched_and_staged() {
    let case = FaultCase::new(2, 3);
    case.fault(Fault::Corrupt { offset: 500_000 }, 1);
    let task = case.stage();
    case.assert_staged(&task);
    let log = case.vib_requests();
    assert_eq!(log.len(), 2, "{log:?}");
    // The corrupt bytes were thrown away: the second download starts from zero.
    assert_eq!(log[1].range, None, "{log:?}");
    assert_eq!(log[1].body_bytes_sent, SIZE, "{log:?}");
}

#[test]
fn byte_corrupted_every_time_is_checksum_mismatch() {
    let case = FaultCase::new(2, 2);
    case.fault(Fault::Corrupt { offset: 500_000 }, usize::MAX);
    let task = case.stage();
    case.assert_failed(&task, "checksum_mismatch");
    case.assert_no_partial();
    // Retried within the budget (1 + 2 retries), each time from zero.
    let log = case.vib_requests();
    assert_eq!(log.len(), 3, "{log:?}");
    assert!(log.iter().all(|r| r.range.is_none()), "{log:?}");
}

#[test]
fn connection_reset_mid_body_is_resumed_with_a_range_request() {
    let case = FaultCase::new(2, 3);
    case.fault(Fault::Reset { after: 400_000 }, 1);
    let task = case.stage();
    case.assert_staged(&task);

    let log = case.vib_requests();
    assert!(log.len() >= 2, "{log:?}");
    assert_eq!(log[0].range, None, "{log:?}");
    let resumed = &log[1];
    let start = range_start(&resumed.range).unwrap_or_else(|| panic!("no Range resume: {log:?}"));
    assert!(start > 0 && start <= 400_000, "{log:?}");
    assert_eq!(resumed.status, 206, "{log:?}");
    assert_eq!(resumed.body_bytes_sent, SIZE - start, "{log:?}");
}

#[test]
fn range_ignored_by_the_depot_restarts_from_zero() {
    let case = FaultCase::new(2, 3);
    case.fault(Fault::Truncate { after: 300_000 }, 1);
    case.fault(Fault::IgnoreRange, 1);
    let task = case.stage();
    case.assert_staged(&task);

    let log = case.vib_requests();
    assert_eq!(log.len(), 2, "{log:?}");
    // The resume asked for a Range and got the whole file with a 200 …
    assert!(range_start(&log[1].range).is_some_and(|s| s > 0), "{log:?}");
    assert_eq!(log[1].status, 200, "{log:?}");
    assert_eq!(log[1].body_bytes_sent, SIZE, "{log:?}");
    // … which the agent took from byte zero: nothing else was needed.
    assert_eq!(case.world.depot.bytes_served(), 300_000 + SIZE);
    let progress = &task["progress"];
    assert_eq!(progress["bytes_done"], SIZE, "{task}");
    assert_eq!(progress["bytes_total"], SIZE, "{task}");
    // The agent says so in its log.
    let text = case.agent.log_text();
    assert!(
        text.lines()
            .any(|l| l.contains("Range") && l.contains("starting over")),
        "the restart is not in the agent's log:\n{text}"
    );
}

#[test]
fn wrong_content_range_makes_the_agent_start_over() {
    let case = FaultCase::new(2, 3);
    case.fault(Fault::Truncate { after: 300_000 }, 1);
    case.fault(Fault::WrongContentRange, 1);
    let task = case.stage();
    case.assert_staged(&task);

    let log = case.vib_requests();
    assert_eq!(log.len(), 3, "{log:?}");
    let asked = range_start(&log[1].range).unwrap_or_else(|| panic!("no Range resume: {log:?}"));
    assert!(asked > 0, "{log:?}");
    assert_eq!(log[1].status, 206, "{log:?}");
    // The answer's Content-Range did not start where asked: the agent started over from zero.
    assert_eq!(log[2].range, None, "{log:?}");
    assert_eq!(log[2].status, 200, "{log:?}");
    assert_eq!(log[2].body_bytes_sent, SIZE, "{log:?}");
}

#[test]
fn server_error_once_is_retried() {
    let case = FaultCase::new(2, 3);
    case.fault(Fault::Status(500), 1);
    let task = case.stage();
    case.assert_staged(&task);
    let statuses: Vec<u16> = case.vib_requests().iter().map(|r| r.status).collect();
    assert_eq!(statuses, vec![500, 200]);
}

#[test]
fn server_error_every_time_is_depot_unreachable() {
    let case = FaultCase::new(2, 1);
    case.fault(Fault::Status(503), usize::MAX);
    let task = case.stage();
    case.assert_failed(&task, "depot_unreachable");
    assert_eq!(case.vib_requests().len(), 2, "1 + 1 retry");
}

#[test]
fn stall_longer_than_the_timeout_once_is_retried_and_resumed() {
    let case = FaultCase::new(1, 3);
    case.fault(
        Fault::Stall {
            after: 200_000,
            for_: Duration::from_secs(4),
        },
        1,
    );
    let task = case.stage();
    case.assert_staged(&task);

    let log = case.vib_requests();
    assert_eq!(log.len(), 2, "{log:?}");
    let start = range_start(&log[1].range).unwrap_or_else(|| panic!("no Range resume: {log:?}"));
    assert!(start > 0 && start <= 200_000, "{log:?}");
}

#[test]
fn body_longer_than_the_size_is_size_mismatch() {
    let case = FaultCase::new(2, 3);
    case.fault(Fault::ExtraBytes(10), usize::MAX);
    let task = case.stage();
    case.assert_failed(&task, "size_mismatch");
    case.assert_no_partial();
}

#[test]
fn resumed_body_longer_than_the_rest_is_size_mismatch() {
    // A 206 carries no total the agent trusts: the cap on what it writes catches the extra bytes.
    let case = FaultCase::new(2, 3);
    case.fault(Fault::Truncate { after: 300_000 }, 1);
    case.fault(Fault::ExtraBytes(10), usize::MAX);
    let task = case.stage();
    case.assert_failed(&task, "size_mismatch");
    case.assert_no_partial();
    let log = case.vib_requests();
    assert!(range_start(&log[1].range).is_some_and(|s| s > 0), "{log:?}");
}

#[test]
fn content_length_shorter_than_the_size_is_size_mismatch() {
    let case = FaultCase::new(2, 3);
    case.fault(
        Fault::SizeLie {
            content_length: SIZE - 1000,
        },
        usize::MAX,
    );
    let task = case.stage();
    case.assert_failed(&task, "size_mismatch");
    case.assert_no_partial();
}

#[test]
fn content_length_longer_than_the_size_is_size_mismatch() {
    let case = FaultCase::new(2, 3);
    case.fault(
        Fault::SizeLie {
            content_length: SIZE + 100,
        },
        usize::MAX,
    );
    let task = case.stage();
    case.assert_failed(&task, "size_mismatch");
    case.assert_no_partial();
}

#[test]
fn vib_missing_from_the_depot_is_depot_unreachable() {
    let case = FaultCase::new(2, 3);
    std::fs::remove_file(case.world.depot_dir.join("vibs").join(&case.hex)).expect("remove vib");
    let task = case.stage();
    case.assert_failed(&task, "depot_unreachable");
    let log = case.vib_requests();
    assert!(
        !log.is_empty() && log.iter().all(|r| r.status == 404),
        "{log:?}"
    );
}

#[test]
fn endless_body_is_size_mismatch() {
    let case = FaultCase::new(2, 3);
    case.fault(Fault::Endless, usize::MAX);
    let task = case.stage();
    case.assert_failed(&task, "size_mismatch");
    case.assert_no_partial();
    // The agent stopped reading soon after the size: it did not swallow the endless stream.
    let served = case.world.depot.bytes_served();
    assert!(served < 64 * SIZE, "{served} bytes served");
}

#[test]
fn redirect_from_https_to_http_is_refused() {
    let case = FaultCase::new(2, 3);
    // A real plain-http depot serving the same files: an agent that followed the redirect would
    // get the right bytes from it, so only a refusal makes this test pass.
    let plain = Depot::start_http(&case.world.depot_dir);
    let http = format!("{}{}", plain.url().trim_end_matches('/'), case.path);
    case.fault(Fault::RedirectTo(http), usize::MAX);
    let task = case.stage();
    case.assert_failed(&task, "depot_unreachable");
    assert_eq!(
        plain.requests(),
        vec![],
        "the agent followed a redirect to plain http"
    );
    // Nothing stored: at most an empty partial file kept for a later resume.
    let partial = std::fs::metadata(case.partial()).map_or(0, |m| m.len());
    assert_eq!(partial, 0, "bytes from a plain-http redirect were stored");
    let log = case.vib_requests();
    assert!(
        !log.is_empty() && log.iter().all(|r| r.status == 302),
        "{log:?}"
    );
}
