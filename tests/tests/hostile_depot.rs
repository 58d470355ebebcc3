//! A hostile depot (issue 8; SPEC §2 "exactly `size` bytes … sha256 matches", §7, R11): the
//! fault kinds that `depot_faults.rs` (issue 3) does not already cover, and combinations of
//! faults.
//!
//! `depot_faults.rs` covers truncation, corruption (once and always), a reset, 5xx (once and
//! always), a stall, Range ignored, a misaligned `Content-Range`, extra bytes, `Content-Length`
//! lies in both directions, an endless body, a missing VIB and a redirect from https to http.
//! This file adds: a slow drip below the minimum speed (always, and once then resumed), a drip
//! above it (no false alarm), a redirect loop, a benign https redirect, an unsolicited 206, 429,
//! a non-retriable 403, a connection reset before the first byte, a stall on every attempt
//! (failed task, then resumed by the next request), truncation on every attempt (progress each
//! time until complete) and a corruption inside a resumed range.
//!
//! Each test asserts success (and how: resume, restart) or the precise error code, and always
//! that no file under `blobs/` holds wrong bytes and that a partial download is a prefix of the
//! VIB.

use std::time::Duration;

use vibstage_e2e::Fault;
use vibstage_e2e::fault_case::{FaultCase, SIZE, range_start};

#[test]
fn slow_drip_below_the_minimum_speed_is_depot_unreachable_and_keeps_a_resumable_prefix() {
    let case = FaultCase::new(1, 1);
    case.fault(Fault::SlowDrip { bytes_per_sec: 200 }, usize::MAX);
    let task = case.stage();
    case.assert_failed(&task, "depot_unreachable");
    let message = task["error"]["message"].as_str().unwrap_or_default();
    assert!(message.contains("slower than"), "{task}");
    let log = case.vib_requests();
    assert_eq!(log.len(), 2, "1 + 1 retry: {log:?}");
    // The second attempt resumed what the first dripped.
    assert!(range_start(&log[1].range).is_some_and(|s| s > 0), "{log:?}");
}

#[test]
fn slow_drip_once_is_abandoned_and_resumed_from_what_arrived() {
    let case = FaultCase::new(1, 3);
    case.fault(Fault::SlowDrip { bytes_per_sec: 300 }, 1);
    let task = case.stage();
    case.assert_staged(&task);
    let log = case.vib_requests();
    assert_eq!(log.len(), 2, "{log:?}");
    let start = range_start(&log[1].range).unwrap_or_else(|| panic!("no resume: {log:?}"));
    assert!(start > 0 && start <= log[0].body_bytes_sent, "{log:?}");
    assert_eq!(log[1].status, 206, "{log:?}");
}

#[test]
fn slow_drip_above_the_minimum_speed_is_not_a_stall() {
    let case = FaultCase::new(3, 0);
    case.fault(
        Fault::SlowDrip {
            bytes_per_sec: 400_000,
        },
        usize::MAX,
    );
    let task = case.stage();
    case.assert_staged(&task);
    assert_eq!(case.vib_requests().len(), 1, "no retry needed");
}

#[test]
fn redirect_loop_is_depot_unreachable_after_a_bounded_number_of_hops() {
    let case = FaultCase::new(2, 3);
    case.fault(Fault::RedirectLoop, usize::MAX);
    let task = case.stage();
    case.assert_failed(&task, "depot_unreachable");
    let log = case.vib_requests();
    assert!(log.iter().all(|r| r.status == 302), "{log:?}");
    // Redirects are bounded per attempt and a redirect error is not retried.
    assert!(!log.is_empty() && log.len() <= 11, "{} requests", log.len());
    let partial = case.partial_len().unwrap_or(0);
    assert_eq!(partial, 0, "bytes stored from a redirect loop");
}

#[test]
fn https_redirect_to_a_mirror_path_is_followed() {
    let case = FaultCase::new(2, 3);
    let mirror = case.world.depot_dir.join("mirror");
    std::fs::create_dir_all(&mirror).expect("mirror dir");
    std::fs::write(mirror.join(&case.hex), case.depot_bytes()).expect("mirror copy");
    let target = format!("{}mirror/{}", case.world.depot.url(), case.hex);
    case.fault(Fault::RedirectTo(target), 1);
    let task = case.stage();
    case.assert_staged(&task);
    let mirrored = case.world.depot.count(&format!("/mirror/{}", case.hex));
    assert_eq!(mirrored, 1, "{:?}", case.world.depot.requests());
}

#[test]
fn unsolicited_206_for_a_request_without_range_is_refused_then_retried() {
    let case = FaultCase::new(2, 3);
    case.fault(Fault::WrongContentRange, 1);
    let task = case.stage();
    case.assert_staged(&task);
    let log = case.vib_requests();
    assert_eq!(log.len(), 2, "{log:?}");
    assert_eq!(log[0].range, None, "{log:?}");
    assert_eq!(log[0].status, 206, "{log:?}");
    // The misplaced bytes were not kept: the next request starts from zero.
    assert_eq!(log[1].range, None, "{log:?}");
    assert_eq!(log[1].status, 200, "{log:?}");
}

#[test]
fn too_many_requests_is_retried() {
    let case = FaultCase::new(2, 3);
    case.fault(Fault::Status(429), 2);
    let task = case.stage();
    case.assert_staged(&task);
    let statuses: Vec<u16> = case.vib_requests().iter().map(|r| r.status).collect();
    assert_eq!(statuses, vec![429, 429, 200]);
}

#[test]
fn forbidden_is_depot_unreachable_without_retries() {
    let case = FaultCase::new(2, 3);
    case.fault(Fault::Status(403), usize::MAX);
    let task = case.stage();
    case.assert_failed(&task, "depot_unreachable");
    assert_eq!(case.vib_requests().len(), 1, "a 403 is not retried");
}

#[test]
fn reset_before_the_first_byte_every_time_is_depot_unreachable() {
    let case = FaultCase::new(2, 2);
    case.fault(Fault::Reset { after: 0 }, usize::MAX);
    let task = case.stage();
    case.assert_failed(&task, "depot_unreachable");
    assert_eq!(case.vib_requests().len(), 3, "1 + 2 retries");
    assert_eq!(case.partial_len().unwrap_or(0), 0);
}

#[test]
fn stall_on_every_attempt_fails_and_the_next_request_resumes_the_prefix() {
    let case = FaultCase::new(1, 1);
    case.fault(
        Fault::Stall {
            after: 250_000,
            for_: Duration::from_secs(5),
        },
        usize::MAX,
    );
    let task = case.stage();
    case.assert_failed(&task, "depot_unreachable");
    let held = case
        .partial_len()
        .expect("the partial download is kept for a later resume");
    assert!(held > 0, "nothing kept");

    case.world.depot.clear_faults();
    case.world.depot.clear_log();
    let task = case.stage();
    case.assert_staged(&task);
    let log = case.vib_requests();
    assert_eq!(log.len(), 1, "{log:?}");
    assert_eq!(log[0].range, Some(format!("bytes={held}-")), "{log:?}");
    assert_eq!(case.world.depot.bytes_served(), SIZE - held);
}

#[test]
fn truncation_on_every_attempt_still_completes_by_resuming() {
    let case = FaultCase::new(2, 5);
    case.fault(Fault::Truncate { after: 300_000 }, usize::MAX);
    let task = case.stage();
    case.assert_staged(&task);
    let log = case.vib_requests();
    assert_eq!(log.len(), 4, "{log:?}");
    let starts: Vec<Option<u64>> = log.iter().map(|r| range_start(&r.range)).collect();
    assert_eq!(starts[0], None, "{log:?}");
    for pair in starts.windows(2).skip(1) {
        assert!(pair[1] > pair[0], "each resume starts further on: {log:?}");
    }
    // No byte came twice.
    assert_eq!(case.world.depot.bytes_served(), SIZE);
}

#[test]
fn corruption_inside_a_resumed_range_is_caught_and_the_download_restarts() {
    let case = FaultCase::new(2, 3);
    case.fault(Fault::Truncate { after: 300_000 }, 1);
    case.fault(Fault::Corrupt { offset: 700_000 }, 1);
    let task = case.stage();
    case.assert_staged(&task);
    let log = case.vib_requests();
    assert_eq!(log.len(), 3, "{log:?}");
    assert!(range_start(&log[1].range).is_some_and(|s| s > 0), "{log:?}");
    // The whole-file hash failed after the resume: the third request starts from zero.
    assert_eq!(log[2].range, None, "{log:?}");
    assert_eq!(log[2].body_bytes_sent, SIZE, "{log:?}");
}
