//! The writer under an ingest: appends a blob's bytes to its partial file with `O_DIRECT`
//! from an aligned buffer, so that staging neither copies every byte into the page cache nor
//! leaves the image's size in dirty pages for the host's workloads to wait behind (issue 16).
//!
//! Invariant: the file holds exactly the bytes before [`BlobWriter::in_file`], the buffer the
//! ones after it; [`BlobWriter::flush`] puts everything in the file. Direct writes are whole
//! [`ALIGN`]-sized blocks at aligned offsets from aligned memory; what is not (the head after a
//! resume from an unaligned length, the tail at a flush) is written through the page cache, as
//! is everything on a filesystem that refuses `O_DIRECT`. Durability is the caller's business
//! (fdatasync/fsync), exactly as with buffered writes: `O_DIRECT` alone promises nothing across
//! a power cut.

use std::fs::File;
use std::io;
use std::ops::Range;
use std::os::unix::fs::FileExt;

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

/// Sequential writer of one partial file (see the module's documentation).
#[derive(Debug)]
pub(super) struct BlobWriter {
    file: File,
    /// [`CAPACITY`] + [`ALIGN`] bytes, of which `buf[base..base + CAPACITY]` is aligned memory.
    buf: Vec<u8>,
    base: usize,
    /// File offset (aligned) of `buf[base]`.
    block: u64,
    /// Bytes not yet in the file: `buf[base + start..base + end]`; those before `start` in the
    /// block are already in the file.
    start: usize,
    end: usize,
    /// Whether the file is open with `O_DIRECT` (false where the filesystem refused it).
    direct: bool,
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
        let buf = vec![0u8; CAPACITY + ALIGN];
        let base = (ALIGN - buf.as_ptr() as usize % ALIGN) % ALIGN;
        let start = (len % ALIGN as u64) as usize;
        let mut writer = BlobWriter {
            file,
            buf,
            base,
            block: len - start as u64,
            start,
            end: start,
            direct: false,
            writeback_from: len,
        };
        writer.direct = try_direct && writer.set_direct(true).is_ok();
        writer
    }

    /// Bytes in the file (the offset of the first buffered byte).
    pub(super) fn in_file(&self) -> u64 {
        self.block + self.start as u64
    }

    /// The file, for fsync and chmod. Buffered bytes are not in it.
    pub(super) fn file(&self) -> &File {
        &self.file
    }

    /// Appends bytes; full buffers go to the file.
    pub(super) fn write(&mut self, mut bytes: &[u8]) -> io::Result<()> {
        while !bytes.is_empty() {
            let n = (CAPACITY - self.end).min(bytes.len());
            let at = self.base + self.end;
            self.buf[at..at + n].copy_from_slice(&bytes[..n]);
            self.end += n;
            bytes = &bytes[n..];
            if self.end == CAPACITY {
                self.write_out(false)?;
            }
        }
        Ok(())
    }

    /// Puts every buffered byte in the file.
    pub(super) fn flush(&mut self) -> io::Result<()> {
        self.write_out(true)
    }

    /// Empties the file and the buffer (a download that starts over).
    pub(super) fn reset(&mut self) -> io::Result<()> {
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
        Ok(self.file)
    }

    /// Writes what the buffer holds: an unaligned head through the page cache, the whole blocks
    /// directly, and the unaligned tail only if `all` (else it stays, moved to the front).
    fn write_out(&mut self, all: bool) -> io::Result<()> {
        let mut at = self.start;
        let head_end = at.next_multiple_of(ALIGN).min(self.end);
        if head_end > at && (head_end % ALIGN == 0 || all) {
            self.put(at..head_end, false)?;
            at = head_end;
        }
        let blocks_end = self.end / ALIGN * ALIGN;
        if at % ALIGN == 0 && blocks_end > at {
            self.put(at..blocks_end, true)?;
            at = blocks_end;
        }
        if all && self.end > at {
            self.put(at..self.end, false)?;
            at = self.end;
        }
        let pos = self.block + at as u64;
        let skew = (pos % ALIGN as u64) as usize;
        let left = self.end - at;
        self.buf
            .copy_within(self.base + at..self.base + self.end, self.base + skew);
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

    /// Writes `buf[base + range]` at its place in the file: directly if `aligned` and the file
    /// is open with `O_DIRECT`, else through the page cache.
    fn put(&mut self, range: Range<usize>, aligned: bool) -> io::Result<()> {
        let offset = self.block + range.start as u64;
        let bytes = &self.buf[self.base + range.start..self.base + range.end];
        if self.direct && aligned {
            match self.file.write_all_at(bytes, offset) {
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
