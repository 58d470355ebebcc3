//! The depot's fault replies: [`Fault`], what each one does to the status and headers of a reply
//! (`reply`, the only place that knows) and to its body bytes (`pump`, the only place that knows),
//! and the streamed body itself.

use super::*;

/// Largest body chunk read from a file and handed to the connection at once.
const CHUNK: usize = 64 * 1024;

/// Filler for [`Fault::ExtraBytes`] and [`Fault::Endless`].
static JUNK: [u8; CHUNK] = [b'#'; CHUNK];

/// One way for the depot to misbehave on a request.
///
/// Byte counts (`after`) count response *body* bytes, so they are relative to
/// the start of the requested range; `Corrupt::offset` is an absolute file offset.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Fault {
    /// Answer with this status and an empty body (e.g. 500, 503). An invalid code becomes 500.
    Status(u16),
    /// Send correct headers (full `Content-Length`), then close the connection
    /// after `after` body bytes, without a TLS close_notify. No effect if the
    /// body is not longer than `after`.
    Truncate {
        /// Body bytes delivered before the close.
        after: u64,
    },
    /// Send `after` body bytes, then reset the TCP connection (SO_LINGER 0 and
    /// close, so the kernel sends RST). No effect if the body is not longer than `after`.
    Reset {
        /// Body bytes delivered before the reset.
        after: u64,
    },
    /// Flip every bit of the byte at this absolute file offset, if it is served.
    Corrupt {
        /// Absolute offset in the file.
        offset: u64,
    },
    /// Answer 200 with the whole file even when a Range was asked.
    IgnoreRange,
    /// Answer 206 with the asked bytes but a `Content-Range` whose start is not
    /// the asked one (asked start − 1, or 1 when the asked start is 0). A request
    /// without Range is treated as asking `bytes=0-`.
    WrongContentRange,
    /// Send `after` body bytes, sleep `for_`, then send the rest.
    Stall {
        /// Body bytes sent before the pause.
        after: u64,
        /// Length of the pause.
        for_: Duration,
    },
    /// Send the body at about this many bytes per second, in tenth-of-a-second steps.
    SlowDrip {
        /// Rate; 0 is treated as 1.
        bytes_per_sec: u64,
    },
    /// Send the body followed by this many junk bytes, with a `Content-Length`
    /// that counts them.
    ExtraBytes(u64),
    /// Answer 200, chunked, without `Content-Length`, with junk that never ends.
    Endless,
    /// Declare this `Content-Length` but send the real body. If it is smaller
    /// than the body, the HTTP layer stops at it (the client sees a complete,
    /// short body); if larger, the connection is closed after the real body,
    /// like [`Fault::Truncate`].
    SizeLie {
        /// The declared `Content-Length`.
        content_length: u64,
    },
    /// Answer 302 with a `Location` pointing at the request's own path (and
    /// query). Each redirect uses up one of the rule's `times`, so set
    /// `usize::MAX` for a loop that never ends.
    RedirectLoop,
    /// Answer 302 with this `Location` (e.g. a plain `http://` URL).
    RedirectTo(String),
}

/// Status, headers and body plan of one response: everything decided up front.
pub(super) struct Reply {
    pub(super) status: StatusCode,
    pub(super) headers: Vec<(HeaderName, String)>,
    /// `None`: empty body.
    pub(super) body: Option<BodyPlan>,
}

impl Reply {
    pub(super) fn bare(status: StatusCode) -> Reply {
        Reply {
            status,
            headers: vec![(header::CONTENT_LENGTH, "0".into())],
            body: None,
        }
    }

    pub(super) fn redirect(location: String) -> Reply {
        let mut reply = Reply::bare(StatusCode::FOUND);
        reply.headers.push((header::LOCATION, location));
        reply
    }
}

/// What the body pump sends: a file range, then junk, cut or slowed as the fault says.
#[derive(Default)]
pub(super) struct BodyPlan {
    /// The file and the absolute range `[start, start + len)` to send from it.
    pub(super) file: Option<(PathBuf, u64, u64)>,
    /// Absolute file offset whose byte is flipped.
    pub(super) corrupt: Option<u64>,
    /// Junk bytes after the file bytes; u64::MAX for endless.
    pub(super) junk: u64,
    /// Body byte count at which the connection is cut, and how.
    pub(super) cut: Option<(u64, Cut)>,
    /// Body byte count at which to pause, and for how long.
    pub(super) stall: Option<(u64, Duration)>,
    /// Bytes per second.
    pub(super) drip: Option<u64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Cut {
    Close,
    Reset,
}

/// The one place where faults decide status and headers.
pub(super) async fn reply(
    root: &Path,
    req: &Request<Incoming>,
    range: Option<&str>,
    fault: Option<Fault>,
) -> Reply {
    match &fault {
        Some(Fault::Status(code)) => {
            return Reply::bare(
                StatusCode::from_u16(*code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
            );
        }
        Some(Fault::RedirectLoop) => {
            let own = req
                .uri()
                .path_and_query()
                .map_or_else(|| req.uri().path().to_owned(), |pq| pq.as_str().to_owned());
            return Reply::redirect(own);
        }
        Some(Fault::RedirectTo(url)) => return Reply::redirect(url.clone()),
        Some(Fault::Endless) => {
            return Reply {
                status: StatusCode::OK,
                headers: vec![],
                body: Some(BodyPlan {
                    junk: u64::MAX,
                    ..BodyPlan::default()
                }),
            };
        }
        _ => {}
    }

    if req.method() != Method::GET && req.method() != Method::HEAD {
        let mut reply = Reply::bare(StatusCode::METHOD_NOT_ALLOWED);
        reply.headers.push((header::ALLOW, "GET, HEAD".into()));
        return reply;
    }
    let Some(file) = resolve(root, req.uri().path()) else {
        return Reply::bare(StatusCode::BAD_REQUEST);
    };
    let total = match tokio::fs::metadata(&file).await {
        Ok(meta) if meta.is_file() => meta.len(),
        _ => return Reply::bare(StatusCode::NOT_FOUND),
    };

    let range = match &fault {
        Some(Fault::IgnoreRange) => None,
        Some(Fault::WrongContentRange) => Some(range.unwrap_or("bytes=0-")),
        _ => range,
    };
    let (status, start, len, mut headers) = match parse_range(range, total) {
        Requested::Whole => (StatusCode::OK, 0, total, vec![]),
        Requested::Unsatisfiable => {
            let mut reply = Reply::bare(StatusCode::RANGE_NOT_SATISFIABLE);
            let unsatisfied = format!("bytes */{total}");
            reply.headers.push((header::CONTENT_RANGE, unsatisfied));
            return reply;
        }
        Requested::Part { start, end } => {
            let shown = match fault {
                Some(Fault::WrongContentRange) if start == 0 => 1,
                Some(Fault::WrongContentRange) => start - 1,
                _ => start,
            };
            let content_range = format!("bytes {shown}-{end}/{total}");
            let headers = vec![(header::CONTENT_RANGE, content_range)];
            (StatusCode::PARTIAL_CONTENT, start, end - start + 1, headers)
        }
    };

    headers.push((header::ACCEPT_RANGES, "bytes".into()));
    headers.push((header::CONTENT_TYPE, content_type(&file).into()));
    let mut plan = BodyPlan {
        file: Some((file, start, len)),
        ..BodyPlan::default()
    };
    let mut content_length = len;
    match fault {
        Some(Fault::Truncate { after }) if after < len => plan.cut = Some((after, Cut::Close)),
        Some(Fault::Reset { after }) if after < len => plan.cut = Some((after, Cut::Reset)),
        Some(Fault::Corrupt { offset }) => plan.corrupt = Some(offset),
        Some(Fault::Stall { after, for_ }) => plan.stall = Some((after, for_)),
        Some(Fault::SlowDrip { bytes_per_sec }) => plan.drip = Some(bytes_per_sec.max(1)),
        Some(Fault::ExtraBytes(extra)) => {
            plan.junk = extra;
            content_length = len.saturating_add(extra);
        }
        Some(Fault::SizeLie {
            content_length: lie,
        }) => {
            content_length = lie;
            if lie > len {
                // Close once the real body is flushed, rather than lose its tail.
                plan.cut = Some((len, Cut::Close));
            }
        }
        _ => {}
    }

    headers.push((header::CONTENT_LENGTH, content_length.to_string()));
    Reply {
        status,
        headers,
        body: Some(plan),
    }
}

pub(super) fn content_type(file: &Path) -> &'static str {
    match file.extension() {
        Some(ext) if ext == "json" => "application/json",
        _ => "application/octet-stream",
    }
}

/// Maps a request path to a file under `root`, or `None` if it must be refused:
/// bad percent-encoding, empty, `.` or `..` segments (also percent-encoded),
/// backslashes or NULs.
pub(super) fn resolve(root: &Path, request_path: &str) -> Option<PathBuf> {
    let decoded = percent_decode(request_path)?;
    let relative = decoded.strip_prefix('/')?;
    let mut path = root.to_path_buf();
    for segment in relative.split('/') {
        if segment.is_empty() || segment == "." || segment == ".." || segment.contains(['\\', '\0'])
        {
            return None;
        }
        path.push(segment);
    }
    Some(path)
}

pub(super) fn percent_decode(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = std::str::from_utf8(bytes.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// What a `Range` header asks of a file of a given size.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Requested {
    /// No Range, or one we ignore as RFC 9110 allows (other unit, several
    /// ranges, bad syntax).
    Whole,
    /// Bytes `start..=end`, `end` already clamped to the file.
    Part {
        start: u64,
        end: u64,
    },
    Unsatisfiable,
}

pub(super) fn parse_range(header: Option<&str>, total: u64) -> Requested {
    let Some(spec) = header.and_then(|h| h.trim().strip_prefix("bytes=")) else {
        return Requested::Whole;
    };
    if spec.contains(',') {
        return Requested::Whole;
    }
    let Some((first, last)) = spec.split_once('-') else {
        return Requested::Whole;
    };
    let (first, last) = (first.trim(), last.trim());
    let number = |s: &str| -> Option<u64> {
        if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        s.parse().ok()
    };
    if first.is_empty() {
        // bytes=-N: the last N bytes.
        return match number(last) {
            None => Requested::Whole,
            Some(0) => Requested::Unsatisfiable,
            Some(_) if total == 0 => Requested::Unsatisfiable,
            Some(suffix) => Requested::Part {
                start: total - suffix.min(total),
                end: total - 1,
            },
        };
    }
    let Some(start) = number(first) else {
        return Requested::Whole;
    };
    let end = if last.is_empty() {
        u64::MAX
    } else {
        match number(last) {
            Some(end) if end >= start => end,
            _ => return Requested::Whole,
        }
    };
    if start >= total {
        return Requested::Unsatisfiable;
    }
    Requested::Part {
        start,
        end: end.min(total - 1),
    }
}

// ---------------------------------------------------------------------------
// Bodies

/// What the pump hands to the response body.
pub(super) enum Piece {
    Data(Bytes),
    /// Cut the connection once everything before it has reached the socket.
    Cut(Cut),
}

/// The one place where faults shape the body bytes: reads the planned file
/// range, appends junk, and pauses, drips or cuts as planned. Stops quietly
/// when the client goes away (the receiver is dropped) or the file cannot be read.
pub(super) async fn pump(plan: BodyPlan, tx: mpsc::Sender<Piece>) {
    let Some(mut source) = Source::open(&plan).await else {
        return;
    };
    let mut stall = plan.stall;
    let mut sent = 0u64;
    loop {
        if let Some((at, pause)) = stall
            && sent >= at
        {
            tokio::time::sleep(pause).await;
            stall = None;
        }
        if let Some((at, cut)) = plan.cut
            && sent >= at
        {
            let _ = tx.send(Piece::Cut(cut)).await;
            return;
        }
        let mut want = CHUNK as u64;
        // Stop each chunk at the next stall or cut point.
        for at in [stall.map(|s| s.0), plan.cut.map(|c| c.0)]
            .into_iter()
            .flatten()
        {
            want = want.min(at - sent);
        }
        if let Some(rate) = plan.drip {
            want = want.min((rate / 10).max(1));
        }
        let Some(chunk) = source.next(want).await else {
            return;
        };
        let n = chunk.len() as u64;
        if tx.send(Piece::Data(chunk)).await.is_err() {
            return;
        }
        sent += n;
        if let Some(rate) = plan.drip {
            tokio::time::sleep(Duration::from_secs_f64(n as f64 / rate as f64)).await;
        }
    }
}

/// The unshaped body bytes: a file range (with its corrupt byte flipped), then junk.
pub(super) struct Source {
    pub(super) file: Option<tokio::fs::File>,
    /// Absolute file offset of the next file byte.
    pub(super) pos: u64,
    pub(super) file_left: u64,
    pub(super) junk_left: u64,
    pub(super) corrupt: Option<u64>,
}

impl Source {
    pub(super) async fn open(plan: &BodyPlan) -> Option<Source> {
        let (file, pos, file_left) = match &plan.file {
            Some((path, start, len)) => {
                let mut file = tokio::fs::File::open(path).await.ok()?;
                file.seek(io::SeekFrom::Start(*start)).await.ok()?;
                (Some(file), *start, *len)
            }
            None => (None, 0, 0),
        };
        Some(Source {
            file,
            pos,
            file_left,
            junk_left: plan.junk,
            corrupt: plan.corrupt,
        })
    }

    /// Up to `want` (≥ 1) next bytes, or `None` at the end (or on a read error).
    pub(super) async fn next(&mut self, want: u64) -> Option<Bytes> {
        if let Some(file) = &mut self.file
            && self.file_left > 0
        {
            let n = want.min(self.file_left).min(CHUNK as u64) as usize;
            let mut buf = vec![0; n];
            let read = file.read(&mut buf).await.ok()?;
            if read == 0 {
                return None; // the file shrank under us
            }
            buf.truncate(read);
            if let Some(offset) = self.corrupt
                && (self.pos..self.pos + read as u64).contains(&offset)
            {
                buf[(offset - self.pos) as usize] ^= 0xff;
            }
            self.pos += read as u64;
            self.file_left -= read as u64;
            return Some(Bytes::from(buf));
        }
        if self.junk_left > 0 {
            let n = want.min(self.junk_left).min(CHUNK as u64) as usize;
            self.junk_left -= n as u64;
            return Some(Bytes::from_static(&JUNK[..n]));
        }
        None
    }
}

/// A response body: empty, or the pieces of a [`pump`], counted into the request log.
pub(super) struct DepotBody {
    /// `None`: empty body, or already ended.
    pub(super) pieces: Option<mpsc::Receiver<Piece>>,
    /// The request log's byte counter.
    pub(super) sent: Arc<AtomicU64>,
    pub(super) conn: Option<Arc<ConnState>>,
    /// A cut waiting for a flush: its kind and the flush count when it arrived.
    pub(super) cut: Option<(Cut, u64)>,
}

impl DepotBody {
    pub(super) fn empty() -> DepotBody {
        DepotBody {
            pieces: None,
            sent: Arc::new(AtomicU64::new(0)),
            conn: None,
            cut: None,
        }
    }

    pub(super) fn streaming(
        pieces: mpsc::Receiver<Piece>,
        sent: Arc<AtomicU64>,
        conn: Arc<ConnState>,
    ) -> DepotBody {
        DepotBody {
            pieces: Some(pieces),
            sent,
            conn: Some(conn),
            cut: None,
        }
    }
}

impl Body for DepotBody {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        let this = self.get_mut();
        loop {
            if let Some((cut, flushes)) = this.cut {
                let Some(conn) = &this.conn else {
                    return Poll::Ready(None);
                };
                if !conn.flushed_since(flushes, cx.waker()) {
                    return Poll::Pending;
                }
                if cut == Cut::Reset {
                    conn.arm_reset();
                }
                this.pieces = None;
                this.cut = None;
                let error = io::Error::other(format!("depot fault: {cut:?} the connection"));
                return Poll::Ready(Some(Err(error)));
            }
            let Some(pieces) = &mut this.pieces else {
                return Poll::Ready(None);
            };
            match pieces.poll_recv(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(None) => {
                    this.pieces = None;
                    return Poll::Ready(None);
                }
                Poll::Ready(Some(Piece::Data(bytes))) => {
                    this.sent.fetch_add(bytes.len() as u64, Ordering::Relaxed);
                    return Poll::Ready(Some(Ok(Frame::data(bytes))));
                }
                Poll::Ready(Some(Piece::Cut(cut))) => {
                    // hyper may still buffer earlier chunks: wait for the next flush.
                    let flushes = this.conn.as_ref().map_or(0, |c| c.flush_count());
                    this.cut = Some((cut, flushes));
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.pieces.is_none() && self.cut.is_none()
    }
}
