//! The depot client: fetches VIB bytes over HTTPS into the store's ingest area.
//!
//! One pass over the bytes: each chunk is hashed and written as it arrives, and the download
//! never reads past the descriptor's `size` (a longer body is an error, not a truncation).
//! A dropped connection, a stall or a 5xx is retried with backoff, resuming with an HTTP Range
//! request from what is already on disk — also after an agent restart, since the partial file
//! survives and is re-hashed when reopened. A 206 is accepted only if its Content-Range is exactly
//! the range asked for; a server that ignores Range (200) makes the download start over.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use reqwest::header::{CONTENT_LENGTH, CONTENT_RANGE, RANGE};
use reqwest::{StatusCode, Url};
use vibstage_protocol::Digest;
use vibstage_protocol::error::error_chain;

use crate::rate::RateLimiter;
use crate::store::{Committed, Ingest, Store, StoreError};
use crate::vib::{Limits, PrefixCheck, VibIdentity, ar::HEADER_LEN, ar::MAGIC};

/// Slowest transfer tolerated, averaged over each `timeout` window (a slow drip is a stall).
const MIN_BYTES_PER_SEC: u64 = 1024;

/// Errors of the depot client.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    /// The depot URL or configuration is unusable.
    #[error("invalid depot {url:?}: {reason}")]
    BadDepot {
        /// The URL given.
        url: String,
        /// What is wrong, in words for the operator (the message ends with it).
        reason: String,
    },
    /// The depot could not be reached or answered wrongly.
    #[error("depot unreachable: {url}: {detail}")]
    Unreachable {
        /// The URL fetched.
        url: Url,
        /// What happened.
        detail: String,
        /// Whether trying again may help.
        retriable: bool,
    },
    /// The store refused the bytes (mismatch, no space, I/O).
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Every depot of a request failed for one blob; the detail names each with its failure.
    #[error("every depot failed: {}", .failures.iter().map(|(url, e)| format!("[{url}] {e}")).collect::<Vec<_>>().join("; "))]
    EveryDepot {
        /// Each depot tried (without userinfo), and its last failure.
        failures: Vec<(String, FetchError)>,
    },
    /// The blob is a real VIB whose own `descriptor.xml` does not name the VIB its signed
    /// descriptor names (issue 14): `checksum_mismatch`, since the bytes do not match their
    /// descriptor.
    #[error("blob sha256:{digest} does not match its descriptor: {detail}")]
    NotTheVib {
        /// The blob.
        digest: Digest,
        /// What the VIB says and what was expected.
        detail: String,
    },
}

impl FetchError {
    fn retriable(&self) -> bool {
        match self {
            FetchError::Unreachable { retriable, .. } => *retriable,
            FetchError::Store(StoreError::Checksum { .. }) | FetchError::NotTheVib { .. } => true,
            _ => false,
        }
    }
}

/// Depot client settings (SPEC §4 `[depot]`).
#[derive(Clone, Debug)]
pub struct FetchConfig {
    /// Allow plain http.
    pub allow_http: bool,
    /// Extra CA certificates (PEM) for the depot.
    pub ca_pem: Option<Vec<u8>>,
    /// Connect and stall timeout.
    pub timeout: Duration,
    /// Retries after the first attempt.
    pub retries: u32,
    /// Download rate limit for the whole agent, bytes per second; 0 = unlimited.
    pub max_bytes_per_sec: u64,
}

/// What one depot of a request served (see [`Fetcher::fetch_blob`]).
#[derive(Debug, Default)]
pub struct DepotCounter {
    /// The depot, as it may be shown (without userinfo).
    pub url: String,
    /// Blobs whose download it completed.
    pub blobs: AtomicU64,
    /// Body bytes received from it.
    pub bytes: AtomicU64,
    /// Attempts on it that failed.
    pub failures: AtomicU64,
}

/// Counters for `/metrics`.
#[derive(Debug, Default)]
pub struct FetchStats {
    /// Blobs downloaded and committed.
    pub downloads: AtomicU64,
    /// Attempts after a failure.
    pub retries: AtomicU64,
    /// Body bytes received from depots.
    pub bytes: AtomicU64,
}

/// The depot client.
#[derive(Clone, Debug)]
pub struct Fetcher {
    client: reqwest::Client,
    config: FetchConfig,
    stats: Arc<FetchStats>,
    /// `depot.max_bytes_per_sec`: one budget shared by every download (and every clone).
    limiter: Option<Arc<RateLimiter>>,
}

impl Fetcher {
    /// Builds a client: rustls, https only unless allowed, the extra CA, redirects limited and
    /// never from https to http unless http is allowed.
    pub fn new(config: FetchConfig, stats: Arc<FetchStats>) -> Result<Fetcher, FetchError> {
        let bad = |reason: String| FetchError::BadDepot {
            url: String::new(),
            reason,
        };
        let mut builder = reqwest::Client::builder()
            .connect_timeout(config.timeout)
            .read_timeout(config.timeout)
            .https_only(!config.allow_http)
            .redirect(reqwest::redirect::Policy::limited(5))
            .user_agent(concat!("vibstaged/", env!("CARGO_PKG_VERSION")));
        if let Some(pem) = &config.ca_pem {
            let certs = reqwest::Certificate::from_pem_bundle(pem)
                .map_err(|e| bad(format!("depot.ca is not a PEM certificate: {e}")))?;
            if certs.is_empty() {
                return Err(bad("depot.ca holds no certificate".into()));
            }
            for cert in certs {
                builder = builder.add_root_certificate(cert);
            }
        }
        let client = builder
            .build()
            .map_err(|e| bad(format!("cannot build the HTTPS client: {e}")))?;
        let limiter = (config.max_bytes_per_sec > 0)
            .then(|| Arc::new(RateLimiter::new(config.max_bytes_per_sec)));
        Ok(Fetcher {
            client,
            config,
            stats,
            limiter,
        })
    }

    /// Bytes and downloads so far, by depot, for `/metrics` and for a task's report of which
    /// depot served what.
    pub fn stats(&self) -> &Arc<FetchStats> {
        &self.stats
    }

    /// Parses a depot base URL, adding the trailing `/` if missing and refusing http unless allowed.
    pub fn depot_url(&self, depot: &str) -> Result<DepotUrl, FetchError> {
        let bad = |reason: &str| FetchError::BadDepot {
            url: redact_str(depot).chars().take(200).collect(),
            reason: reason.to_owned(),
        };
        let mut url = Url::parse(depot).map_err(|_| bad("not a URL"))?;
        match url.scheme() {
            "https" => {}
            "http" if self.config.allow_http => {}
            "http" => return Err(bad("plain http is refused unless depot.allow_http is set")),
            _ => {
                return Err(bad(
                    "only https (and http when allowed) depots are supported",
                ));
            }
        }
        if url.cannot_be_a_base() || url.query().is_some() || url.fragment().is_some() {
            return Err(bad("must be a base URL without query or fragment"));
        }
        if !url.path().ends_with('/') {
            let path = format!("{}/", url.path());
            url.set_path(&path);
        }
        Ok(DepotUrl(url))
    }

    /// Fetches blob `digest` of `size` bytes from `<depot>/vibs/<hex>` into `store` and commits
    /// it, trying `depots` in order (SPEC §5): a failure on one (refused, 5xx, stall, wrong
    /// bytes) goes on with the next, from the bytes already held; a round over every depot that
    /// is still worth trying counts as one attempt of `depot.retries`, with backoff between
    /// rounds. A depot that answers something no retry can change (404, 403) is not asked again
    /// for this blob. `progress` is told the blob's byte offset as it grows (and drops, on a
    /// restart). What each depot served is added to `served` (same order as `depots`).
    ///
    /// With `expect`, a blob that is a real VIB (an ar archive whose first member is
    /// `descriptor.xml`) must name that VIB in its `descriptor.xml`: a [`PrefixCheck`] looks at
    /// the first member while the bytes stream in, before they are written, and never hashes a
    /// payload. Other blobs pass through it untouched.
    #[allow(clippy::too_many_arguments)]
    pub async fn fetch_blob(
        &self,
        depots: &[DepotUrl],
        digest: Digest,
        size: u64,
        expect: Option<&VibIdentity>,
        store: &Store,
        progress: &(dyn Fn(u64) + Send + Sync),
        served: &[DepotCounter],
    ) -> Result<Committed, FetchError> {
        let urls = depots
            .iter()
            .map(|depot| {
                depot
                    .join(&format!("vibs/{digest}"))
                    .map_err(|e| FetchError::BadDepot {
                        url: redact(depot).to_string(),
                        reason: e.to_string(),
                    })
            })
            .collect::<Result<Vec<Url>, FetchError>>()?;
        if urls.is_empty() {
            return Err(FetchError::BadDepot {
                url: String::new(),
                reason: "no depot given".into(),
            });
        }
        // Reopening re-hashes what a partial file holds and committing fsyncs: both may take a
        // while on a slow disk, so they leave the async worker free for other work meanwhile.
        let mut ingest = blocking(|| store.ingest(digest, size))?;
        progress(ingest.offset());
        let limits = Limits::default();
        let fresh = || expect.map(|e| PrefixCheck::new(e.clone(), &limits));
        let mut check = fresh();
        // The last failure on each depot, and whether it is still worth asking.
        let mut last: Vec<Option<FetchError>> = urls.iter().map(|_| None).collect();
        let mut usable = vec![true; urls.len()];
        let mut current = 0;
        let mut round = 0;
        loop {
            // The check must have seen every byte the partial file holds: after a resume (here
            // or after a restart of the agent) it re-reads the header from the file.
            if let Some(c) = &check
                && c.fed() != ingest.offset()
            {
                check = fresh();
                if let Some(c) = check.as_mut() {
                    let _ = ingest.flush();
                    let max = (MAGIC.len() + HEADER_LEN) as u64 + limits.max_descriptor;
                    let prefix = store
                        .partial_prefix(&digest, ingest.offset().min(max))
                        .unwrap_or_default();
                    if prefix.len() as u64 == ingest.offset().min(max) {
                        if let Err(e) = c.feed(&prefix) {
                            store.discard_partial(&digest);
                            return Err(not_the_vib(digest, &e));
                        }
                        c.skip(ingest.offset() - prefix.len() as u64);
                    } else {
                        ingest.restart()?;
                        progress(0);
                    }
                }
            }
            let url = &urls[current];
            let mut received = 0;
            let result = self
                .attempt(url, &mut ingest, check.as_mut(), progress, &mut received)
                .await;
            if let Some(counter) = served.get(current) {
                counter.bytes.fetch_add(received, Ordering::Relaxed);
            }
            let err = match result {
                Ok(()) => match blocking(|| store.commit(ingest)) {
                    Ok(c) => {
                        self.stats.downloads.fetch_add(1, Ordering::Relaxed);
                        if let Some(counter) = served.get(current) {
                            counter.blobs.fetch_add(1, Ordering::Relaxed);
                        }
                        return Ok(c);
                    }
                    Err(e) => {
                        // The partial file is gone; the next attempt starts from zero.
                        ingest = blocking(|| store.ingest(digest, size))?;
                        progress(0);
                        FetchError::Store(e)
                    }
                },
                Err(e @ FetchError::NotTheVib { .. }) => {
                    // Wrong bytes: nothing of them is worth resuming from.
                    ingest.restart()?;
                    progress(0);
                    e
                }
                Err(e) => e,
            };
            let _ = ingest.flush();
            if let Some(counter) = served.get(current) {
                counter.failures.fetch_add(1, Ordering::Relaxed);
            }
            // The store's own failures (no space, I/O) are no depot's fault: no depot helps.
            let depots_may_help = !matches!(
                err,
                FetchError::Store(ref e) if !matches!(e, StoreError::Checksum { .. } | StoreError::Size { .. })
            );
            if !err.retriable() {
                usable[current] = false;
            }
            last[current] = Some(err);
            let next = (1..=urls.len())
                .map(|step| (current + step) % urls.len())
                .find(|&i| usable[i]);
            let wrapped = next.is_none_or(|i| i <= current);
            if wrapped {
                round += 1;
            }
            let Some(next) = next.filter(|_| depots_may_help && round <= self.config.retries)
            else {
                return Err(self.give_up(store, digest, depots, last, current));
            };
            self.stats.retries.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(
                url = %redact(url),
                next = %redact(&urls[next]),
                round,
                error = %last[current].as_ref().map(ToString::to_string).unwrap_or_default(),
                "download failed; trying again"
            );
            if wrapped {
                tokio::time::sleep(backoff(round)).await;
            }
            current = next;
        }
    }

    /// The error of a blob every depot failed: with one depot its own error (as it always
    /// was); with several, every depot's last failure, named. A partial download is kept for a
    /// later resume only after an unreachable depot (its bytes were verified as they came).
    fn give_up(
        &self,
        store: &Store,
        digest: Digest,
        depots: &[DepotUrl],
        mut last: Vec<Option<FetchError>>,
        current: usize,
    ) -> FetchError {
        let keep_partial = matches!(last[current], Some(FetchError::Unreachable { .. }));
        if !keep_partial {
            store.discard_partial(&digest);
        }
        if (depots.len() == 1 || last.iter().filter(|e| e.is_some()).count() == 1)
            && let Some(e) = last[current].take()
        {
            return e;
        }
        FetchError::EveryDepot {
            failures: depots
                .iter()
                .zip(last)
                .filter_map(|(depot, e)| e.map(|e| (redact(depot).to_string(), e)))
                .collect(),
        }
    }

    async fn attempt(
        &self,
        url: &Url,
        ingest: &mut Ingest,
        mut check: Option<&mut PrefixCheck>,
        progress: &(dyn Fn(u64) + Send + Sync),
        received: &mut u64,
    ) -> Result<(), FetchError> {
        let digest = ingest.digest();
        let restart_check = |check: &mut Option<&mut PrefixCheck>| {
            if let Some(c) = check.as_deref_mut() {
                let expected = c.expected().clone();
                *c = PrefixCheck::new(expected, &Limits::default());
            }
        };
        let size = ingest.size();
        let offset = ingest.offset();
        if offset == size {
            return Ok(());
        }
        let fail = |detail: String, retriable: bool| FetchError::Unreachable {
            url: redact(url),
            detail,
            retriable,
        };
        let mut request = self.client.get(url.clone());
        if offset > 0 {
            request = request.header(RANGE, format!("bytes={offset}-"));
        }
        let send = tokio::time::timeout(self.config.timeout, request.send());
        let mut response = match send.await {
            Err(_) => return Err(fail("no answer within the timeout".into(), true)),
            Ok(Err(e)) => {
                let e = e.without_url();
                if let Some(why) = untrusted_certificate(&e) {
                    // Asking again will not make the certificate trusted: say what to set,
                    // at once (issue 17, item 6).
                    return Err(fail(
                        format!(
                            "the depot's certificate is not trusted ({why}): set depot.ca to \
                             the CA certificate (PEM) that issued it, then reload the agent"
                        ),
                        false,
                    ));
                }
                let retriable = !e.is_redirect() && !e.is_builder();
                return Err(fail(error_chain(&e), retriable));
            }
            Ok(Ok(r)) => r,
        };
        let status = response.status();
        let content_length = response
            .headers()
            .get(CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        match status {
            StatusCode::OK => {
                if offset > 0 {
                    tracing::info!(url = %redact(url), offset, "depot ignored the Range request; starting over");
                    ingest.restart()?;
                    restart_check(&mut check);
                    progress(0);
                }
                if let Some(len) = content_length
                    && len != size
                {
                    return Err(StoreError::Size {
                        digest: ingest.digest(),
                        expected: size,
                        actual: format!("depot announces {len}"),
                    }
                    .into());
                }
            }
            StatusCode::PARTIAL_CONTENT => {
                let range = response
                    .headers()
                    .get(CONTENT_RANGE)
                    .and_then(|v| v.to_str().ok())
                    .and_then(parse_content_range);
                if range != Some((offset, size - 1, size)) {
                    ingest.restart()?;
                    restart_check(&mut check);
                    progress(0);
                    return Err(fail(
                        format!(
                            "206 with Content-Range {:?} for a request from byte {offset} of {size}; starting over",
                            response.headers().get(CONTENT_RANGE)
                        ),
                        true,
                    ));
                }
            }
            StatusCode::RANGE_NOT_SATISFIABLE => {
                ingest.restart()?;
                restart_check(&mut check);
                progress(0);
                return Err(fail(
                    "416 Range Not Satisfiable; starting over".into(),
                    true,
                ));
            }
            s if s.is_server_error()
                || s == StatusCode::TOO_MANY_REQUESTS
                || s == StatusCode::REQUEST_TIMEOUT =>
            {
                return Err(fail(format!("HTTP {s}"), true));
            }
            s => return Err(fail(format!("HTTP {s}"), false)),
        }

        let mut window_start = Instant::now();
        let mut window_bytes = 0u64;
        loop {
            let chunk = match tokio::time::timeout(self.config.timeout, response.chunk()).await {
                Err(_) => {
                    return Err(fail(
                        format!(
                            "stalled for {}s after {} of {size} bytes",
                            self.config.timeout.as_secs(),
                            ingest.offset()
                        ),
                        true,
                    ));
                }
                Ok(Err(e)) => {
                    return Err(fail(
                        format!(
                            "connection lost after {} of {size} bytes: {}",
                            ingest.offset(),
                            error_chain(&e.without_url())
                        ),
                        true,
                    ));
                }
                Ok(Ok(None)) => break,
                Ok(Ok(Some(chunk))) => chunk,
            };
            if let Some(c) = check.as_deref_mut() {
                c.feed(&chunk).map_err(|e| not_the_vib(digest, &e))?;
            }
            *received += chunk.len() as u64;
            ingest.write(&chunk)?;
            self.stats
                .bytes
                .fetch_add(chunk.len() as u64, Ordering::Relaxed);
            progress(ingest.offset());
            window_bytes += chunk.len() as u64;
            if let Some(limiter) = &self.limiter {
                // Time spent waiting for the rate limit is ours, not the depot's: it does not
                // count against the depot's minimum speed.
                window_start += limiter.take(chunk.len() as u64).await;
            }
            let elapsed = window_start.elapsed();
            if elapsed >= self.config.timeout {
                if window_bytes < MIN_BYTES_PER_SEC * elapsed.as_secs() {
                    return Err(fail(
                        format!(
                            "transfer slower than {MIN_BYTES_PER_SEC} bytes/s ({window_bytes} bytes in {}s)",
                            elapsed.as_secs()
                        ),
                        true,
                    ));
                }
                window_start = Instant::now();
                window_bytes = 0;
            }
        }
        if ingest.offset() < size {
            return Err(fail(
                format!("body ended after {} of {size} bytes", ingest.offset()),
                true,
            ));
        }
        if let Some(c) = check {
            c.finish().map_err(|e| not_the_vib(digest, &e))?;
        }
        Ok(())
    }
}

fn not_the_vib(digest: Digest, e: &crate::vib::VibError) -> FetchError {
    FetchError::NotTheVib {
        digest,
        detail: e.to_string(),
    }
}

/// Runs blocking file work without stalling the other tasks of a multi-threaded runtime.
fn blocking<T>(f: impl FnOnce() -> T) -> T {
    match tokio::runtime::Handle::try_current() {
        Ok(h) if h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
            tokio::task::block_in_place(f)
        }
        _ => f(),
    }
}

/// `bytes START-END/TOTAL` → (start, end, total).
fn parse_content_range(v: &str) -> Option<(u64, u64, u64)> {
    let rest = v.trim().strip_prefix("bytes ")?;
    let (range, total) = rest.split_once('/')?;
    let (start, end) = range.split_once('-')?;
    Some((start.parse().ok()?, end.parse().ok()?, total.parse().ok()?))
}

fn backoff(attempt: u32) -> Duration {
    Duration::from_millis(200u64.saturating_mul(1 << attempt.min(5)).min(5_000))
}

/// A depot of a request, checked once when the request arrives ([`Fetcher::depot_url`]): https
/// (plain http only with `depot.allow_http`), a base URL without query or fragment, its path
/// ending in `/`. Only the fetcher makes one, so code that holds one need not check it again.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DepotUrl(Url);

impl std::ops::Deref for DepotUrl {
    type Target = Url;

    fn deref(&self) -> &Url {
        &self.0
    }
}

/// A URL as it may be shown (tasks, logs, metrics): without `user:password@` (SPEC §5).
pub fn redact(url: &Url) -> Url {
    let mut shown = url.clone();
    if shown.password().is_some() || !shown.username().is_empty() {
        // Both only fail for URLs that cannot have userinfo, which then have none to hide.
        let _ = shown.set_username("");
        let _ = shown.set_password(None);
    }
    shown
}

/// [`redact`] for text that may not parse as a URL: whatever stands before the last `@` of
/// the authority is dropped.
pub fn redact_str(text: &str) -> String {
    if let Ok(url) = Url::parse(text) {
        return redact(&url).to_string();
    }
    let Some(start) = text.find("://").map(|i| i + 3) else {
        return text.to_owned();
    };
    let end = text[start..]
        .find(['/', '?', '#'])
        .map_or(text.len(), |i| start + i);
    match text[start..end].rfind('@') {
        Some(at) => format!("{}{}", &text[..start], &text[start + at + 1..]),
        None => text.to_owned(),
    }
}

/// Whether `e` is a TLS certificate the client does not trust (unknown issuer, expired, wrong
/// name, …) rather than a network failure; returns rustls's reason.
fn untrusted_certificate(e: &(dyn std::error::Error + 'static)) -> Option<String> {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        let tls = err.downcast_ref::<rustls::Error>().or_else(|| {
            err.downcast_ref::<std::io::Error>()
                .and_then(|io| io.get_ref())
                .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        });
        if let Some(rustls::Error::InvalidCertificate(why)) = tls {
            return Some(format!("{why:?}"));
        }
        // hyper-util boxes the connector's error, which hides the type: fall back on rustls's
        // wording of the same variant.
        if let Some(why) = err.to_string().strip_prefix("invalid peer certificate: ") {
            return Some(why.to_owned());
        }
        cur = err.source();
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_range_parsing() {
        assert_eq!(parse_content_range("bytes 10-99/100"), Some((10, 99, 100)));
        assert_eq!(parse_content_range("bytes */100"), None);
        assert_eq!(parse_content_range("items 1-2/3"), None);
    }

    #[test]
    fn depot_passwords_are_never_shown() {
        // Issue 11, item 8.
        let url = Url::parse("https://ops:s3cret@depot.example:8443/base/").expect("url");
        assert_eq!(redact(&url).as_str(), "https://depot.example:8443/base/");
        assert_eq!(
            redact_str("https://ops:s3cret@depot.example/x"),
            "https://depot.example/x"
        );
        assert_eq!(
            redact_str("https://ops:s3cret@[not a url/x"),
            "https://[not a url/x"
        );
        assert_eq!(redact_str("no scheme at all"), "no scheme at all");
        let fetcher = Fetcher::new(
            FetchConfig {
                allow_http: false,
                ca_pem: None,
                timeout: Duration::from_secs(1),
                retries: 0,
                max_bytes_per_sec: 0,
            },
            Arc::default(),
        )
        .expect("fetcher");
        let err = fetcher
            .depot_url("http://ops:s3cret@depot.example/")
            .expect_err("http refused");
        assert!(!err.to_string().contains("s3cret"), "{err}");
    }

    #[test]
    fn backoff_grows_and_caps() {
        assert_eq!(backoff(1), Duration::from_millis(400));
        assert!(backoff(10) <= Duration::from_secs(5));
    }
}
