//! The writer under an ingest: appends a blob's bytes to its partial file with `O_DIRECT`
//! from an aligned buffer, so that staging neither copies every byte into the page cache nor
//! leaves the image's size in dirty pages for the host's workloads to wait behind (issue 16).
//!
//! Invariant: the file holds at least the bytes before [`BlobWriter::in_file`]; the one write in
//! flight on the download's writer thread and the buffer being filled hold the ones after it, in
//! order; [`BlobWriter::flush`] waits for the first and writes the second. Direct writes are whole
//! [`ALIGN`]-sized blocks at aligned offsets from aligned memory; what is not (the head after a
//! resume from an unaligned length, the tail at a flush) is written through the page cache, as
//! is everything on a filesystem that refuses `O_DIRECT`. Durability is the caller's business
//! (fdatasync/fsync), exactly as with buffered writes: `O_DIRECT` alone promises nothing across
//! a power cut.

use std::fs::File;
use std::io;
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::thread::JoinHandle;

use nix::fcntl::{FcntlArg, OFlag, PosixFadviseAdvice, fcntl, posix_fadvise};

/// Alignment of direct writes, in memory and in the file: the page size, which covers the
/// logical block size of every disk the agent meets (512 or 4096 bytes). A filesystem that
/// wants more refuses the write (`EINVAL`) and the writer falls back to the page cache.
const ALIGN: usize = 4096;

/// Bytes gathered before a direct write (a multiple of [`ALIGN`]).
pub(super) const CAPACITY: usize = 1 << 20;

/// Without `O_DIRECT`, every this many bytes the writer asks the kernel to start writing what it
/// wrote to the disk (`posix_fadvise(DONTNEED)`, which starts asynchronous writeback and then
/// drops the pages once they are clean). Without it, a blob's bytes stay dirty in the page cache
/// until the commit's fsync, so the disk idles while downloads run and then every download waits
/// for the disk at once (issue 7). Only a hint: any write error still surfaces at the fsync.
pub(super) const WRITEBACK_CHUNK: u64 = 8 << 20;

/// [`CAPACITY`] bytes of page-aligned memory (from a slightly larger `Vec`: no unsafe code).
struct Aligned {
    mem: Vec<u8>,
    base: usize,
}

impl Aligned {
    fn new() -> Aligned {
        let mem = vec![0u8; CAPACITY + ALIGN];
        let base = (ALIGN - mem.as_ptr() as usize % ALIGN) % ALIGN;
        Aligned { mem, base }
    }

    fn bytes(&self) -> &[u8] {
        &self.mem[self.base..self.base + CAPACITY]
    }

    fn bytes_mut(&mut self) -> &mut [u8] {
        &mut self.mem[self.base..self.base + CAPACITY]
    }
}

impl std::fmt::Debug for Aligned {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Aligned")
    }
}

/// A full buffer to write directly: the buffer, which of its bytes, at which file offset.
type Job = (Aligned, Range<usize>, u64);

/// The thread that makes a download's direct writes while the download goes on receiving and
/// hashing into the other buffer: an `O_DIRECT` write waits for the disk (about 0.4 ms per MiB
/// here), which on the async worker would stall every download it runs (issue 16, measured).
/// One write in flight at a time; the buffer comes back with the result.
#[derive(Debug)]
struct Worker {
    jobs: Option<SyncSender<Job>>,
    done: Receiver<(Job, io::Result<()>)>,
    thread: Option<JoinHandle<()>>,
}

impl Worker {
    fn spawn(file: &File) -> io::Result<Worker> {
        let file = file.try_clone()?;
        let (jobs, queue) = sync_channel::<Job>(1);
        let (report, done) = sync_channel(1);
        let thread = std::thread::Builder::new()
            .name("vibstaged-write".into())
            .stack_size(64 << 10)
            .spawn(move || {
                for (buf, range, offset) in queue {
                    let result = file.write_all_at(&buf.bytes()[range.clone()], offset);
                    if report.send(((buf, range, offset), result)).is_err() {
                        break;
                    }
                }
            })?;
        Ok(Worker {
            jobs: Some(jobs),
            done,
            thread: Some(thread),
        })
    }
}

impl Drop for Worker {
    /// Waits for the write in flight: nothing is written to the file after its writer is gone.
    fn drop(&mut self) {
        drop(self.jobs.take());
        while self.done.recv().is_ok() {}
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Sequential writer of one partial file (see the module's documentation).
#[derive(Debug)]
pub(super) struct BlobWriter {
    file: File,
    /// The buffer being filled.
    buf: Aligned,
    /// The other buffer, when no write is in flight with it.
    spare: Option<Aligned>,
    /// Direct writes of full buffers, once the first is made (none if the thread could not start).
    worker: Option<Worker>,
    /// The file offset where the write in flight starts, if one is.
    flight: Option<u64>,
    /// File offset (aligned) of `buf.bytes()[0]`.
    block: u64,
    /// Bytes not yet in the file: `buf.bytes()[start..end]`; those before `start` in the block
    /// are already in the file (or in flight).
    start: usize,
    end: usize,
    /// Whether the file is open with `O_DIRECT` (false where the filesystem refused it).
    direct: bool,
    /// A write failed: the file no longer holds what the writer was told, so every later call
    /// fails too, until [`BlobWriter::reset`].
    failed: bool,
    /// Buffered writes only: the file offset up to which writeback was started.
    writeback_from: u64,
}

impl BlobWriter {
    /// A writer appending to `file` from offset `len` (its current length). `O_DIRECT` is turned
    /// on if the filesystem accepts it.
    pub(super) fn new(file: File, len: u64) -> BlobWriter {
        Self::with_direct(file, len, true)
    }

    /// [`BlobWriter::new`], trying `O_DIRECT` only if `try_direct` (tests of the fallback).
    fn with_direct(file: File, len: u64, try_direct: bool) -> BlobWriter {
        let start = (len % ALIGN as u64) as usize;
        let mut writer = BlobWriter {
            file,
            buf: Aligned::new(),
            spare: None,
            worker: None,
            flight: None,
            block: len - start as u64,
            start,
            end: start,
            direct: false,
            failed: false,
            writeback_from: len,
        };
        writer.direct = try_direct && writer.set_direct(true).is_ok();
        writer
    }

    /// Bytes surely in the file: what an fdatasync now makes durable.
    pub(super) fn in_file(&self) -> u64 {
        self.flight.unwrap_or(self.block + self.start as u64)
    }

    /// The file, for fsync and chmod. Buffered bytes (and a write in flight) are not in it.
    pub(super) fn file(&self) -> &File {
        &self.file
    }

    /// Appends bytes; full buffers go to the file.
    pub(super) fn write(&mut self, mut bytes: &[u8]) -> io::Result<()> {
        self.check()?;
        while !bytes.is_empty() {
            let n = (CAPACITY - self.end).min(bytes.len());
            self.buf.bytes_mut()[self.end..self.end + n].copy_from_slice(&bytes[..n]);
            self.end += n;
            bytes = &bytes[n..];
            if self.end == CAPACITY {
                self.write_out(false)?;
            }
        }
        Ok(())
    }

    /// Puts every buffered byte in the file (and waits for the write in flight).
    pub(super) fn flush(&mut self) -> io::Result<()> {
        self.write_out(true)
    }

    /// Empties the file and the buffer (a download that starts over).
    pub(super) fn reset(&mut self) -> io::Result<()> {
        let _ = self.land();
        self.failed = false;
        self.file.set_len(0)?;
        (self.block, self.start, self.end, self.writeback_from) = (0, 0, 0, 0);
        Ok(())
    }

    /// Flushes and gives the file back (for the commit's fsync), without `O_DIRECT`.
    pub(super) fn into_file(mut self) -> io::Result<File> {
        self.flush()?;
        if self.direct {
            self.set_direct(false)?;
        }
        drop(self.worker.take());
        Ok(self.file)
    }

    fn check(&self) -> io::Result<()> {
        if self.failed {
            return Err(io::Error::other(
                "an earlier write to this file failed; the download must start over",
            ));
        }
        Ok(())
    }

    /// Writes what the buffer holds: an unaligned head through the page cache, the whole blocks
    /// directly (handed to the worker), and the unaligned tail only if `all` (else it stays,
    /// moved to the front). Every write but a hand-off first waits for the write in flight, so
    /// that the `O_DIRECT` flag is never switched under it.
    fn write_out(&mut self, all: bool) -> io::Result<()> {
        self.check()?;
        let head_end = self.start.next_multiple_of(ALIGN).min(self.end);
        if head_end > self.start && (head_end.is_multiple_of(ALIGN) || all) {
            self.land()?;
            self.put(self.start..head_end, false)?;
            self.start = head_end;
        }
        let blocks_end = self.end / ALIGN * ALIGN;
        if self.start.is_multiple_of(ALIGN) && blocks_end > self.start {
            self.hand_off(self.start..blocks_end)?;
        }
        if all {
            self.land()?;
            if self.end > self.start {
                self.put(self.start..self.end, false)?;
                self.start = self.end;
            }
        }
        let pos = self.block + self.start as u64;
        let skew = (pos % ALIGN as u64) as usize;
        let left = self.end - self.start;
        self.buf.bytes_mut().copy_within(self.start..self.end, skew);
        (self.block, self.start, self.end) = (pos - skew as u64, skew, skew + left);
        if !self.direct && pos - self.writeback_from >= WRITEBACK_CHUNK {
            let _ = posix_fadvise(
                &self.file,
                self.writeback_from as i64,
                (pos - self.writeback_from) as i64,
                PosixFadviseAdvice::POSIX_FADV_DONTNEED,
            );
            self.writeback_from = pos;
        }
        Ok(())
    }

    /// Writes the whole blocks `range` of the buffer: with `O_DIRECT`, on the worker while the
    /// download fills the other buffer (the bytes after `range` move to it); else here.
    fn hand_off(&mut self, range: Range<usize>) -> io::Result<()> {
        if self.direct && self.worker.is_none() {
            self.worker = Worker::spawn(&self.file)
                .inspect_err(|e| tracing::debug!(error = %e, "no writer thread; writing in line"))
                .ok();
        }
        let Some(worker) = self.worker.as_ref().filter(|_| self.direct) else {
            self.put(range.clone(), true)?;
            self.start = range.end;
            return Ok(());
        };
        let jobs = worker.jobs.clone();
        self.land()?;
        let mut next = self.spare.take().unwrap_or_else(Aligned::new);
        let left = self.end - range.end;
        next.bytes_mut()[..left].copy_from_slice(&self.buf.bytes()[range.end..self.end]);
        let offset = self.block + range.start as u64;
        let full = std::mem::replace(&mut self.buf, next);
        jobs.ok_or_else(|| io::Error::other("the writer thread is gone"))?
            .send((full, range.clone(), offset))
            .map_err(|_| io::Error::other("the writer thread is gone"))?;
        self.flight = Some(offset);
        (self.block, self.start, self.end) = (self.block + range.end as u64, 0, left);
        Ok(())
    }

    /// Waits for the write in flight, if any, and takes its buffer back. A filesystem that
    /// refused the direct write (`EINVAL`) gets it again through the page cache, and no more
    /// direct writes; any other failure fails the writer.
    fn land(&mut self) -> io::Result<()> {
        let Some(offset) = self.flight.take() else {
            return Ok(());
        };
        let received = self.worker.as_ref().map(|w| w.done.recv());
        let Some(Ok(((buf, range, _), result))) = received else {
            self.failed = true;
            return Err(io::Error::other("the writer thread is gone"));
        };
        let result = match result {
            Err(e) if e.raw_os_error() == Some(nix::libc::EINVAL) => {
                tracing::debug!(error = %e, "O_DIRECT write refused; writing through the page cache");
                self.direct = false;
                self.writeback_from = offset;
                self.set_direct(false)
                    .and_then(|()| self.file.write_all_at(&buf.bytes()[range], offset))
            }
            other => other,
        };
        self.spare = Some(buf);
        if result.is_err() {
            self.failed = true;
        }
        result
    }

    /// Writes `buf[range]` at its place in the file, here: directly if `aligned` and the file
    /// is open with `O_DIRECT`, else through the page cache.
    fn put(&mut self, range: Range<usize>, aligned: bool) -> io::Result<()> {
        let offset = self.block + range.start as u64;
        let result = self.put_at(range, offset, aligned);
        if result.is_err() {
            self.failed = true;
        }
        result
    }

    fn put_at(&mut self, range: Range<usize>, offset: u64, aligned: bool) -> io::Result<()> {
        if self.direct && aligned {
            match self
                .file
                .write_all_at(&self.buf.bytes()[range.clone()], offset)
            {
                Err(e) if e.raw_os_error() == Some(nix::libc::EINVAL) => {
                    // Alignment this filesystem does not take: the page cache from now on.
                    tracing::debug!(error = %e, "O_DIRECT write refused; writing through the page cache");
                    self.set_direct(false)?;
                    self.direct = false;
                    self.writeback_from = offset;
                }
                done => return done,
            }
        }
        let bytes = &self.buf.bytes()[range];
        if self.direct {
            self.set_direct(false)?;
            let done = self.file.write_all_at(bytes, offset);
            self.set_direct(true)?;
            done
        } else {
            self.file.write_all_at(bytes, offset)
        }
    }

    /// Turns `O_DIRECT` on or off for the file.
    fn set_direct(&self, on: bool) -> io::Result<()> {
        let flags = OFlag::from_bits_retain(fcntl(&self.file, FcntlArg::F_GETFL)?);
        let flags = if on {
            flags | OFlag::O_DIRECT
        } else {
            flags - OFlag::O_DIRECT
        };
        fcntl(&self.file, FcntlArg::F_SETFL(flags))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    /// Every pattern of writes, flushes and resumes leaves exactly the bytes written, with
    /// `O_DIRECT` (where the test directory's filesystem takes it) and through the page cache.
    #[test]
    fn bytes_land_in_order_across_flushes_and_resumes() {
        // The temporary directory's filesystem, and tmpfs (a `scratch.volatile_path`) if here.
        let shm = std::path::Path::new("/dev/shm");
        let mut roots = vec![tempfile::tempdir().expect("tempdir")];
        if shm.is_dir() {
            roots.extend(tempfile::tempdir_in(shm).ok());
        }
        for root in &roots {
            for direct in [true, false] {
                writes_flushes_and_resumes(root.path(), direct);
            }
        }
    }

    fn writes_flushes_and_resumes(dir: &std::path::Path, direct: bool) {
        let data: Vec<u8> = (0..(3 * CAPACITY + 12_345))
            .map(|i| (i % 251) as u8)
            .collect();
        for (case, pieces) in [
            vec![1usize, 4095, 4096, 70_000, CAPACITY, 3, CAPACITY + 5000],
            vec![CAPACITY],
            vec![4093, 17, 8191],
            vec![65_536; 60],
        ]
        .into_iter()
        .enumerate()
        {
            let path = dir.join(format!("f{case}-{direct}"));
            let open = || {
                std::fs::OpenOptions::new()
                    .read(true)
                    .write(true)
                    .create(true)
                    .truncate(false)
                    .open(&path)
                    .expect("open")
            };
            let mut w = BlobWriter::with_direct(open(), 0, direct);
            let mut at = 0;
            for (i, n) in pieces.iter().cycle().enumerate() {
                let n = (*n).min(data.len() - at);
                if n == 0 {
                    break;
                }
                w.write(&data[at..at + n]).expect("write");
                at += n;
                if i % 3 == 2 {
                    // A failed attempt: flush, then a new writer from the file's length.
                    w.flush().expect("flush");
                    assert_eq!(w.in_file(), at as u64);
                    let file = w.into_file().expect("into");
                    let len = file.metadata().expect("meta").len();
                    assert_eq!(len, at as u64);
                    w = BlobWriter::with_direct(file, len, direct);
                }
            }
            let mut file = w.into_file().expect("into");
            let mut back = Vec::new();
            file.read_to_end(&mut back).expect("read");
            assert!(back == data, "case {case}, direct {direct}");
        }
    }

    #[test]
    fn reset_starts_the_file_over() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("f");
        let file = File::create_new(&path).expect("create");
        let mut w = BlobWriter::new(file, 0);
        w.write(&[1; 10_000]).expect("write");
        w.flush().expect("flush");
        w.reset().expect("reset");
        w.write(&[2; 5000]).expect("write");
        w.into_file().expect("into");
        assert_eq!(std::fs::read(&path).expect("read"), vec![2; 5000]);
    }
}
