//! The ingest journal: append-only files that make a batch of new events durable with one
//! sequential synchronous write (`O_DIRECT | O_DSYNC`, or a buffered write and `fdatasync`
//! where the file system refuses direct I/O), so that the database commits holding them do
//! not have to be flushed (the journal thread, [`super::journaler`], writes it).
//!
//! Why: a durable redb commit costs two flushes (with `quick_repair`) and a `pwrite` for each
//! of the ~20–40 copy-on-write pages it touches, whatever the number of events in it; at 64
//! concurrent producers that fixed price was most of the writer's time (BENCHMARKS.md). The
//! writer commits journaled events without flushing (`Durability::None`: visible to readers,
//! kept in redb's write buffer); every other kind of write is a durable commit — a checkpoint
//! that covers every journaled record applied before it.
//!
//! Two files take turns, a lap each: when the current one has taken [`LAP_BYTES`] the writer
//! is asked for a checkpoint and the next batch goes to the start of the other file, whose
//! older records must be covered by a checkpoint before they are written over (that one was
//! asked for a lap earlier, so ingest rarely waits). One file would have to wait for each
//! checkpoint before starting over.
//!
//! After a crash, redb comes back at its last durable commit, which stores the sequence number
//! of the last journal record it covers; [`Journal::open`] returns the records of both files
//! after that one, in order, and the store re-applies them before anything else runs. Records
//! are only ever read back in that one place.
//!
//! Format: records back to back from offset 0, each `len: u32 LE | crc32: u32 LE | seq: u64 LE |
//! payload (len bytes)`, the checksum covering the database's journal id (a random number
//! kept in the database), seq and payload — so that a journal left over from another database
//! file reads as empty instead of being applied to this one. A file is written over from
//! offset 0 (never truncated, so later flushes have no block allocation to write), which
//! leaves older records behind the new ones; a reader stops at the first record that is torn,
//! fails its checksum or does not continue the sequence. Direct writes are whole 4 KiB blocks,
//! so the rest of the block after a batch's last record is zeros until the next batch fills
//! it.

use std::fs::{File, OpenOptions};
use std::io::Read;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use super::StoreError;

/// Bytes of journal written to one file before the other takes over and a checkpoint is asked
/// for. It bounds the replay after a crash (~6,000–12,000 events of 1 KiB), the files' size,
/// and how long a checkpoint takes (it writes the pages of every commit since the last one:
/// ~23 ms at 8 MiB, ~85 ms at 32 MiB; BENCHMARKS.md).
pub(crate) const LAP_BYTES: u64 = 8 << 20;

const HEADER: usize = 16;

/// The unit of a direct write: offsets, lengths and buffer addresses are multiples of it
/// (4 KiB covers every logical block size Linux file systems use).
const BLOCK: usize = 4096;

/// A record read back: its sequence number and payload.
pub(crate) type Record = (u64, Vec<u8>);

pub(crate) struct Journal {
    /// The two files the journal alternates between, one lap each (see the module docs).
    sides: [Side; 2],
    /// The side the next batch is written to.
    cur: usize,
    /// The sequence number of the next record.
    next_seq: u64,
    /// The database's journal id, part of every record's checksum.
    id: u64,
    /// Records pushed and not yet written, and the sequence number of the first of them.
    buf: Vec<u8>,
    buf_first_seq: u64,
    /// The bytes of the last write (the tail and the records), kept to reuse its allocation.
    job: Vec<u8>,
}

/// One of the journal's two files.
struct Side {
    path: PathBuf,
    /// Buffered writes and `fdatasync`, where the file system refuses direct I/O.
    file: File,
    direct: Option<Direct>,
    /// Where the next record goes.
    offset: u64,
    /// With direct I/O, the bytes of the block the last written record ends in, up to its
    /// end: a batch rarely ends on a block boundary, so the next one writes that block again,
    /// these bytes first (see [`Direct`]). Empty with buffered writes.
    tail: Vec<u8>,
    /// The last record written to this file in its current lap (0 if none): the database
    /// must cover it before the file is written over.
    last_seq: u64,
    /// Where the bytes of a failed write may end (0 if none since the last write that
    /// succeeded). A write can fail after its records reached the disk (its flush failed);
    /// they were never acknowledged, and their numbers go to the next batch, so if that
    /// batch were shorter a reader would take what is left of them behind it for the
    /// journal's continuation. The failed write is followed by one of zeros over them, and
    /// should that fail too, the next batch first writes zeros over them on their own (and
    /// is refused if that fails).
    stale_to: u64,
    /// Makes this many of the next writes report a failure after their bytes are on disk,
    /// as when the flush that follows a write fails.
    #[cfg(test)]
    fail_after_write: u32,
    /// Then makes this many fail without writing anything.
    #[cfg(test)]
    refuse: u32,
    /// Makes every direct write fail as a file system refusing its alignment would.
    #[cfg(test)]
    refuse_direct: bool,
}

impl Side {
    /// Writes `bytes` at `at` and returns once they are on disk.
    fn put(&mut self, bytes: &[u8], at: u64) -> std::io::Result<()> {
        #[cfg(test)]
        if self.fail_after_write == 0 && self.refuse > 0 {
            self.refuse -= 1;
            return Err(std::io::Error::other("injected: the write was refused"));
        }
        #[cfg(test)]
        if self.direct.is_some() && self.refuse_direct {
            return Err(std::io::Error::from_raw_os_error(libc::EINVAL));
        }
        let r = match &mut self.direct {
            Some(d) => d.write(at, bytes),
            None => self
                .file
                .write_all_at(bytes, at)
                .and_then(|_| self.file.sync_data()),
        };
        #[cfg(test)]
        if self.fail_after_write > 0 {
            self.fail_after_write -= 1;
            return r.and(Err(std::io::Error::other("injected: the flush failed")));
        }
        r
    }

    /// How many bytes a write of `len` bytes may have changed on disk.
    fn written(&self, len: usize) -> u64 {
        match self.direct {
            Some(_) => (len.div_ceil(BLOCK) * BLOCK) as u64,
            None => len as u64,
        }
    }

    fn open(path: PathBuf, try_direct: bool) -> Result<(Side, Vec<u8>), StoreError> {
        let io = |what: &str, e: std::io::Error| {
            StoreError::Db(format!("journal {}: {what}: {e}", path.display()))
        };
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            // Payloads and idempotency replies: for courier's user only.
            .mode(0o600)
            .open(&path)
            .map_err(|e| io("open", e))?;
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes).map_err(|e| io("read", e))?;
        let direct = match try_direct.then(|| Direct::open(&path)) {
            None => None,
            Some(Ok(d)) => Some(d),
            Some(Err(e)) => {
                tracing::info!(path = %path.display(), error = %e, "the ingest journal cannot use direct I/O here; using buffered writes and fdatasync");
                None
            }
        };
        let side = Side {
            path,
            file,
            direct,
            offset: 0,
            tail: Vec::new(),
            last_seq: 0,
            stale_to: 0,
            #[cfg(test)]
            fail_after_write: 0,
            #[cfg(test)]
            refuse: 0,
            #[cfg(test)]
            refuse_direct: false,
        };
        Ok((side, bytes))
    }
}

/// Makes the names of the files in `file`'s directory durable (the journal's two files and
/// the database's, which is created first).
///
/// Why: a file's own flushes make its contents durable, but on a power cut a file system may
/// lose the directory entry of a file created just before. Losing a journal file would lose
/// acknowledged events without a trace (a journal that starts empty looks like one with
/// nothing to replay). Once per start; where a file system does not sync directories the
/// journal goes on, with a warning.
fn sync_dir(file: &Path) {
    let dir = match file.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    if let Err(e) = File::open(dir).and_then(|d| d.sync_all()) {
        tracing::warn!(dir = %dir.display(), error = %e, "cannot sync the data directory; the journal's files may not survive a power cut if just created");
    }
}

/// Says what damage in the journal cost (`missing`: ranges of record numbers lost, `kept`:
/// records still re-applied) and copies both files aside (`<file>.damaged-<unix ms>`) before
/// the journal's next lap writes over the evidence.
fn report_damage(path: &Path, damage: &[(&Path, usize)], missing: &[(u64, u64)], kept: usize) {
    let lost: u64 = missing.iter().map(|(lo, hi)| hi - lo + 1).sum();
    let stamp = crate::model::now_ms();
    let mut copies = Vec::new();
    for file in [path.to_path_buf(), second_path(path)] {
        let mut to = file.as_os_str().to_owned();
        to.push(format!(".damaged-{stamp}"));
        let to = PathBuf::from(to);
        match std::fs::copy(&file, &to) {
            Ok(_) => copies.push(to.display().to_string()),
            Err(e) => {
                tracing::warn!(from = %file.display(), to = %to.display(), error = %e, "cannot keep a copy of the damaged journal file")
            }
        }
    }
    for (file, at) in damage {
        tracing::error!(
            file = %file.display(),
            offset = at,
            lost_records = lost,
            missing = ?missing,
            recovered_records = kept,
            copies = ?copies,
            "the ingest journal is damaged: the records found intact after the damage are re-applied; the damaged ones are lost (if courier stopped while writing them, they were never acknowledged)"
        );
    }
}

/// The path of the journal's second file, next to the first: `courier.journal2`.
pub(crate) fn second_path(path: &Path) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push("2");
    PathBuf::from(name)
}

impl Drop for Journal {
    fn drop(&mut self) {
        self.clear_stale();
    }
}

impl Journal {
    /// Opens (or creates) the journal of the database whose journal id is `id` and reads the
    /// records after `checkpoint_seq`, the last sequence number the database's durable state
    /// covers.
    pub(crate) fn open(
        path: &Path,
        id: u64,
        checkpoint_seq: u64,
    ) -> Result<(Journal, Vec<Record>), StoreError> {
        Self::open_with(path, id, checkpoint_seq, true)
    }

    /// [`Journal::open`], with direct I/O tried only if `try_direct` (tests cover both ways).
    fn open_with(
        path: &Path,
        id: u64,
        checkpoint_seq: u64,
        try_direct: bool,
    ) -> Result<(Journal, Vec<Record>), StoreError> {
        let (mut a, a_bytes) = Side::open(path.to_path_buf(), try_direct)?;
        let (mut b, b_bytes) = Side::open(second_path(path), try_direct)?;
        sync_dir(path);
        let (a_read, b_read) = (
            read_file(&a_bytes, id, checkpoint_seq),
            read_file(&b_bytes, id, checkpoint_seq),
        );
        let last_of = |r: &FileRecords| r.records.iter().map(|(seq, _)| *seq).max().unwrap_or(0);
        a.last_seq = last_of(&a_read);
        b.last_seq = last_of(&b_read);
        let last = a.last_seq.max(b.last_seq);
        // A file whose first record is damaged lost at most what lies between the other
        // file's records and its own first intact one: not everything back to the
        // checkpoint, which would excuse a gap that is no damage (a database restored from
        // an older copy).
        let narrowed = |this: &FileRecords, other: &FileRecords| -> Vec<(u64, u64)> {
            let mut lost = this.lost.clone();
            if this.starts_damaged
                && let Some((lo, hi)) = lost.first_mut()
            {
                let before = other
                    .records
                    .iter()
                    .map(|(seq, _)| *seq)
                    .filter(|seq| *seq <= *hi)
                    .max()
                    .unwrap_or(0);
                *lo = (*lo).max(before + 1);
            }
            lost
        };
        let lost: Vec<(u64, u64)> = narrowed(&a_read, &b_read)
            .into_iter()
            .chain(narrowed(&b_read, &a_read))
            .collect();
        // Each file holds a run of consecutive records; the two runs together continue the
        // database's durable state without a gap, but where damage was found.
        let mut pending: Vec<Record> = a_read
            .records
            .iter()
            .chain(&b_read.records)
            .filter(|(seq, _)| *seq > checkpoint_seq)
            .map(|(seq, p)| (*seq, p.to_vec()))
            .collect();
        pending.sort_by_key(|(seq, _)| *seq);
        pending.dedup_by_key(|(seq, _)| *seq);
        let mut missing: Vec<(u64, u64)> = Vec::new();
        let mut expect = checkpoint_seq + 1;
        for (seq, _) in &pending {
            if *seq != expect {
                let gap = (expect, seq - 1);
                if !lost.iter().any(|(lo, hi)| *lo <= gap.0 && gap.1 <= *hi) {
                    return Err(StoreError::Corrupt(format!(
                        "journal {}: the database holds records up to {checkpoint_seq} and the \
                         journal continues to {last}, but record {expect} is missing (if the \
                         database file was replaced or removed on purpose, move the journal \
                         files away too)",
                        path.display()
                    )));
                }
                missing.push(gap);
            }
            expect = seq + 1;
        }
        let damage: Vec<(&Path, usize)> = [(&a, &a_read), (&b, &b_read)]
            .into_iter()
            .filter_map(|(side, read)| read.damaged_at.map(|at| (side.path.as_path(), at)))
            .collect();
        if !damage.is_empty() {
            report_damage(path, &damage, &missing, pending.len());
        }
        if a.direct.is_none() || b.direct.is_none() {
            a.direct = None;
            b.direct = None;
        }
        let journal = Journal {
            sides: [a, b],
            cur: 0,
            next_seq: checkpoint_seq.max(last) + 1,
            id,
            buf: Vec::new(),
            buf_first_seq: 0,
            job: Vec::new(),
        };
        Ok((journal, pending))
    }

    /// Drops the records pushed since the last write, unwritten (their numbers are reused).
    pub(crate) fn discard(&mut self) {
        if !self.buf.is_empty() {
            self.next_seq = self.buf_first_seq;
            self.buf.clear();
        }
    }

    /// Frames `payload` as the next record (written by [`Journal::write`]); returns its
    /// sequence number.
    #[cfg(test)]
    pub(crate) fn push(&mut self, payload: &[u8]) -> u64 {
        self.push_with(|buf| buf.extend_from_slice(payload))
    }

    /// Frames the bytes `put` appends to the buffer as the next record; returns its sequence
    /// number.
    ///
    /// Why in place: the journal thread is on every producer's round trip, and encoding each
    /// append into a `Vec` of its own first cost a growing allocation and a copy per event
    /// (~18% of that thread's samples, most of them in the allocator's reallocation).
    pub(crate) fn push_with(&mut self, put: impl FnOnce(&mut Vec<u8>)) -> u64 {
        let seq = self.next_seq;
        if self.buf.is_empty() {
            self.buf_first_seq = seq;
        }
        self.next_seq += 1;
        let at = self.buf.len();
        self.buf.resize(at + HEADER, 0);
        put(&mut self.buf);
        let payload = &self.buf[at + HEADER..];
        let len = u32::try_from(payload.len())
            .expect("a record is under 4 GiB (server.max_body_bytes is at most 1 GiB)");
        let crc = checksum(self.id, seq, payload);
        let header = &mut self.buf[at..at + HEADER];
        header[..4].copy_from_slice(&len.to_le_bytes());
        header[4..8].copy_from_slice(&crc.to_le_bytes());
        header[8..].copy_from_slice(&seq.to_le_bytes());
        seq
    }

    /// Bytes pushed and not yet written.
    pub(crate) fn buffered(&self) -> usize {
        self.buf.len()
    }

    /// Writes the pushed records to the current file and returns once they are on disk.
    /// On failure the records may be partly on disk; they are not acknowledged: zeros go
    /// over them at once or, failing that, before the next batch (which reuses their
    /// sequence numbers), so a reader never takes them for acknowledged records.
    pub(crate) fn write(&mut self) -> Result<(), StoreError> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let cur = self.cur;
        let side = &mut self.sides[cur];
        let at = side.offset - side.tail.len() as u64;
        if side.stale_to > at {
            // Zeros over what a failed write left, on disk before any new record goes over
            // it: written in the batch's own write, a crash that tore that write could leave
            // the new records without the zeros behind them, and a reader looking past the
            // tear (for records after damage) would take the failed write's for acknowledged
            // ones. Should the zeros fail, the batch is refused.
            self.job.clear();
            self.job.extend_from_slice(&side.tail);
            self.job.resize((side.stale_to - at) as usize, 0);
            if let Err(e) = put_falling_back(&mut self.sides, cur, &self.job, at) {
                self.next_seq = self.buf_first_seq;
                self.buf.clear();
                return Err(StoreError::Db(format!(
                    "journal {}: write: {e}",
                    self.sides[cur].path.display()
                )));
            }
            self.sides[cur].stale_to = 0;
        }
        self.job.clear();
        self.job.extend_from_slice(&self.sides[cur].tail);
        self.job.extend_from_slice(&self.buf);
        let records_end = self.job.len();
        let r = put_falling_back(&mut self.sides, cur, &self.job, at);
        let side = &mut self.sides[cur];
        let len = self.buf.len();
        self.buf.clear();
        match r {
            Ok(()) => {
                side.offset += len as u64;
                side.last_seq = self.next_seq - 1;
                side.stale_to = 0;
                side.tail.clear();
                if side.direct.is_some() {
                    let keep = (side.offset % BLOCK as u64) as usize;
                    side.tail
                        .extend_from_slice(&self.job[records_end - keep..records_end]);
                }
                trim(&mut self.buf);
                trim(&mut self.job);
                Ok(())
            }
            Err(e) => {
                self.next_seq = self.buf_first_seq;
                side.stale_to = side.stale_to.max(at + side.written(self.job.len()));
                // Zeros over what the failed write may have left, right away: nothing else
                // may be written before the next stop.
                self.job.truncate(side.tail.len());
                self.job.resize((side.stale_to - at) as usize, 0);
                if side.put(&self.job, at).is_ok() {
                    side.stale_to = 0;
                }
                Err(StoreError::Db(format!(
                    "journal {}: write: {e}",
                    side.path.display()
                )))
            }
        }
    }

    /// Writes zeros over what failed writes may have left in either file, where the zeros
    /// written right after them failed too and no batch has covered them since. Done as the
    /// journal closes: records whose producers were told they failed must not come back at
    /// the next start. Whatever still fails stays as it was (and is logged).
    fn clear_stale(&mut self) {
        for side in &mut self.sides {
            if side.stale_to == 0 {
                continue;
            }
            let at = side.offset - side.tail.len() as u64;
            self.job.clear();
            self.job.extend_from_slice(&side.tail);
            self.job
                .resize(side.stale_to.saturating_sub(at) as usize, 0);
            match side.put(&self.job, at) {
                Ok(()) => side.stale_to = 0,
                Err(e) => tracing::error!(
                    path = %side.path.display(),
                    error = %e,
                    "cannot write over a failed journal write; events refused with 503 may come back at the next start"
                ),
            }
        }
    }

    /// Whether the current file has taken a lap's worth of records: time to ask for a
    /// checkpoint and go on in the other file.
    pub(crate) fn lap_full(&self) -> bool {
        self.sides[self.cur].offset >= LAP_BYTES
    }

    /// Goes on in the other file, from its start. Returns the last record that file holds
    /// from its previous lap: the database must cover it (a durable commit) before the next
    /// [`Journal::write`], which writes over it.
    pub(crate) fn switch(&mut self) -> u64 {
        self.cur ^= 1;
        let side = &mut self.sides[self.cur];
        side.offset = 0;
        side.tail.clear();
        // What a failed write left in this file's last lap is numbered below anything this
        // lap writes, so a reader never runs on into it.
        side.stale_to = 0;
        side.last_seq
    }

    /// Whether batches are written with direct, synchronous I/O.
    #[cfg(test)]
    pub(crate) fn is_direct(&self) -> bool {
        self.sides[0].direct.is_some()
    }

    /// The sequence number of the last record pushed (0 if none ever was).
    pub(crate) fn last_seq(&self) -> u64 {
        self.next_seq - 1
    }
}

/// Writes `bytes` at `at` in side `cur` and returns once they are on disk. Should the file
/// system refuse the direct write's alignment (where the kernel could not say what it needs
/// up front), the same bytes go again, buffered, and from then on both files are written
/// buffered: what is on disk is unchanged by a refused write.
fn put_falling_back(
    sides: &mut [Side; 2],
    cur: usize,
    bytes: &[u8],
    at: u64,
) -> std::io::Result<()> {
    let r = sides[cur].put(bytes, at);
    match &r {
        Err(e) if sides[cur].direct.is_some() && e.raw_os_error() == Some(libc::EINVAL) => {
            tracing::warn!(path = %sides[cur].path.display(), error = %e, "the file system refused a direct write; the ingest journal goes on with buffered writes and fdatasync");
            for s in sides.iter_mut() {
                s.direct = None;
            }
            sides[cur].put(bytes, at)
        }
        _ => r,
    }
}

/// Direct, synchronous writes of whole blocks.
///
/// A write starts at the beginning of a block, with the bytes already in it (the journal's
/// `tail`) ahead of the new records, and ends with zeros up to the end of its last block
/// (where a reader stops). A torn rewrite cannot harm the records already there: every sector
/// of the block holds either its old or its new content, and the two agree on every byte up to
/// the old end.
struct Direct {
    file: File,
    /// Scratch space for one aligned write (kept to avoid an allocation per batch).
    scratch: Vec<u8>,
}

impl Direct {
    fn open(path: &Path) -> std::io::Result<Direct> {
        let file = OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_DIRECT | libc::O_DSYNC)
            .open(path)?;
        if let Some((memory, offset)) = dio_alignment(&file)
            && !fits_blocks(memory, offset)
        {
            return Err(std::io::Error::other(format!(
                "direct I/O here needs buffers aligned to {memory} bytes and offsets to \
                 {offset}, and the journal writes whole {BLOCK}-byte blocks"
            )));
        }
        Ok(Direct {
            file,
            scratch: Vec::new(),
        })
    }

    /// Writes `bytes` at `at` (a block boundary), padded with zeros to a whole number of
    /// blocks, and returns once they are on disk.
    fn write(&mut self, at: u64, bytes: &[u8]) -> std::io::Result<()> {
        debug_assert_eq!(at % BLOCK as u64, 0);
        let len = bytes.len();
        let padded = len.div_ceil(BLOCK) * BLOCK;
        if self.scratch.len() < padded + BLOCK {
            self.scratch.resize(padded + BLOCK, 0);
        }
        let skew = self.scratch.as_ptr().addr() % BLOCK;
        let start = (BLOCK - skew) % BLOCK;
        let out = &mut self.scratch[start..start + padded];
        out[..len].copy_from_slice(bytes);
        out[len..].fill(0);
        let r = self.file.write_all_at(out, at);
        if self.scratch.len() > KEEP_CAPACITY {
            self.scratch = Vec::new();
        }
        r
    }
}

/// The most a journal buffer keeps between writes. A batch holding a large event (up to
/// `server.max_body_bytes`) grows the buffers to its size; they give that memory back
/// after the write instead of holding it for the life of the process.
const KEEP_CAPACITY: usize = 4 << 20;

fn trim(buf: &mut Vec<u8>) {
    if buf.capacity() > KEEP_CAPACITY {
        buf.truncate(KEEP_CAPACITY);
        buf.shrink_to(KEEP_CAPACITY);
    }
}

/// What the file system asks of direct I/O on `file`: the alignment of buffers and of file
/// offsets and lengths, in bytes (`Some((0, 0))` if it does not support it); `None` where the
/// kernel does not say (before Linux 6.1), in which case direct I/O is tried as it is.
fn dio_alignment(file: &File) -> Option<(u32, u32)> {
    use std::os::fd::AsRawFd;
    let mut stx = std::mem::MaybeUninit::<libc::statx>::zeroed();
    // SAFETY: `statx` fills the buffer it is given, which is a whole `statx` struct; an empty
    // path with `AT_EMPTY_PATH` asks about the open file itself.
    let rc = unsafe {
        libc::statx(
            file.as_raw_fd(),
            c"".as_ptr(),
            libc::AT_EMPTY_PATH,
            libc::STATX_DIOALIGN,
            stx.as_mut_ptr(),
        )
    };
    if rc != 0 {
        return None;
    }
    // SAFETY: zero-initialised, and filled by the successful call.
    let stx = unsafe { stx.assume_init() };
    (stx.stx_mask & libc::STATX_DIOALIGN != 0)
        .then_some((stx.stx_dio_mem_align, stx.stx_dio_offset_align))
}

/// Whether writes of whole [`BLOCK`]s from a [`BLOCK`]-aligned buffer at [`BLOCK`] offsets meet
/// these alignments (0: no direct I/O at all).
fn fits_blocks(memory: u32, offset: u32) -> bool {
    let fits = |a: u32| a != 0 && BLOCK.is_multiple_of(a as usize);
    fits(memory) && fits(offset)
}

fn checksum(id: u64, seq: u64, payload: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(&id.to_le_bytes());
    h.update(&seq.to_le_bytes());
    h.update(payload);
    h.finalize()
}

/// The valid records at the start of `bytes`: each complete, with a checksum that matches for
/// the journal id `id`, and numbered one after the other; and where they end.
fn scan(bytes: &[u8], id: u64) -> (Vec<(u64, &[u8])>, usize) {
    let mut out: Vec<(u64, &[u8])> = Vec::new();
    let mut at = 0usize;
    while let Some((seq, payload)) = record_at(bytes, at, id) {
        if let Some((prev, _)) = out.last()
            && seq != prev + 1
        {
            break;
        }
        out.push((seq, payload));
        at += HEADER + payload.len();
    }
    (out, at)
}

/// The record starting at `at`, if one is there whole with a matching checksum.
fn record_at(bytes: &[u8], at: usize, id: u64) -> Option<(u64, &[u8])> {
    if bytes.len().saturating_sub(at) < HEADER {
        return None;
    }
    let word = |i: usize| u32::from_le_bytes(bytes[at + i..at + i + 4].try_into().unwrap());
    let len = word(0) as usize;
    let crc = word(4);
    let seq = u64::from_le_bytes(bytes[at + 8..at + 16].try_into().unwrap());
    if bytes.len() - at - HEADER < len {
        return None;
    }
    let payload = &bytes[at + HEADER..at + HEADER + len];
    (checksum(id, seq, payload) == crc).then_some((seq, payload))
}

/// How far past the last good record a record found beyond damage may be numbered: more than
/// both files can hold, and few enough that random bytes are rarely even checked.
const SALVAGE_WINDOW: u64 = 1 << 22;

/// The records of one journal file: its run from offset 0 ([`scan`]), then any found past
/// damage, and the numbers lost to it.
struct FileRecords<'a> {
    records: Vec<(u64, &'a [u8])>,
    /// Ranges of record numbers (inclusive) between the last good record before a damaged
    /// stretch and the first one found after it.
    lost: Vec<(u64, u64)>,
    /// Where the first damaged stretch begins, if records were found after one.
    damaged_at: Option<usize>,
    /// Whether the file's first record was damaged (no run from offset 0): then where its
    /// lap began is not known from the file itself, and the first lost range is taken to
    /// start at the checkpoint until [`Journal::open`] narrows it with the other file.
    starts_damaged: bool,
}

/// Reads one journal file: the run of records from its start and, past where that run ends,
/// any intact records numbered after both it and `covered` (the database's checkpoint).
///
/// Why look past the end of the run: a run ends at a torn write (a crash while writing the
/// last batch), at records left from an older lap (numbered at or below the checkpoint, since
/// a file is written over only once the database covers it), or at damage (a flipped bit, a
/// lost write). Records numbered after the run and after the checkpoint that lie beyond the
/// end were written after it: acknowledged events, or the intact part of a torn last batch
/// whose write reached the disk (its producers were not answered; they come back as an event
/// written just before a crash does). Stopping at the damage would drop them all, and the
/// journal's next lap would write over them.
fn read_file(bytes: &[u8], id: u64, covered: u64) -> FileRecords<'_> {
    let (mut records, mut end) = scan(bytes, id);
    let starts_damaged = records.is_empty();
    let mut lost = Vec::new();
    let mut damaged_at = None;
    loop {
        let after = records.last().map_or(0, |(seq, _)| *seq).max(covered);
        let limit = after.saturating_add(SALVAGE_WINDOW);
        let found = (end + 1..bytes.len().saturating_sub(HEADER - 1)).find(|&at| {
            let seq = u64::from_le_bytes(bytes[at + 8..at + 16].try_into().unwrap());
            seq > after && seq <= limit && record_at(bytes, at, id).is_some()
        });
        let Some(at) = found else { break };
        let (run, len) = scan(&bytes[at..], id);
        let first = run[0].0;
        if first > after + 1 {
            lost.push((after + 1, first - 1));
        }
        damaged_at.get_or_insert(end);
        records.extend(run);
        end = at + len;
    }
    FileRecords {
        records,
        lost,
        damaged_at,
        starts_damaged: starts_damaged && damaged_at.is_some(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: u64 = 0x5eed;

    /// The sequence numbers of records read back, in order.
    fn seqs(pending: &[Record]) -> Vec<u64> {
        pending.iter().map(|(s, _)| *s).collect()
    }

    /// Every test runs against both ways of writing: direct I/O (where the file system of the
    /// temporary directory allows it) and buffered writes with `fdatasync`.
    fn both(test: impl Fn(&dyn Fn(&Path, u64) -> (Journal, Vec<Record>), &Path)) {
        for direct in [true, false] {
            let dir = tempfile::tempdir().unwrap();
            let open = move |dir: &Path, checkpoint: u64| {
                Journal::open_with(&dir.join("j"), ID, checkpoint, direct).unwrap()
            };
            test(&open, dir.path());
        }
    }

    #[test]
    fn records_after_the_checkpoint_come_back_in_order() {
        both(|open, dir| {
            let (mut j, pending) = open(dir, 0);
            assert!(pending.is_empty());
            for i in 0..5u8 {
                j.push(&[i; 100]);
            }
            j.write().unwrap();
            drop(j);
            let (j, pending) = open(dir, 2);
            assert_eq!(seqs(&pending), [3, 4, 5]);
            assert_eq!(pending[0].1, vec![2u8; 100]);
            assert_eq!(j.last_seq(), 5, "numbering continues after the last record");
        });
    }

    #[test]
    fn batches_that_end_inside_a_block_are_all_read_back() {
        both(|open, dir| {
            let (mut j, _) = open(dir, 0);
            let mut expected = Vec::new();
            // Batches that end inside the first block, exactly on a block boundary (the first
            // three records fill 4096 bytes), then inside and across later blocks.
            let sizes = [
                10usize,
                3000,
                4096 - 3 * HEADER - 3010,
                1,
                9000,
                5000,
                70,
                20_000,
            ];
            for (n, size) in sizes.iter().enumerate() {
                let payload = vec![n as u8 + 1; *size];
                j.push(&payload);
                expected.push(payload);
                if [1, 2, 4, 5, 7].contains(&n) {
                    j.write().unwrap();
                }
            }
            drop(j);
            let (_, pending) = open(dir, 0);
            let got: Vec<Vec<u8>> = pending.into_iter().map(|(_, p)| p).collect();
            assert_eq!(got, expected);
        });
    }

    #[test]
    fn buffers_give_back_what_a_large_event_took() {
        both(|open, dir| {
            let (mut j, _) = open(dir, 0);
            j.push(&vec![7u8; 16 << 20]);
            j.write().unwrap();
            j.push(b"small");
            j.write().unwrap();
            assert!(j.buf.capacity() <= KEEP_CAPACITY, "{}", j.buf.capacity());
            assert!(j.job.capacity() <= KEEP_CAPACITY, "{}", j.job.capacity());
            for side in &j.sides {
                if let Some(d) = &side.direct {
                    assert!(d.scratch.capacity() <= KEEP_CAPACITY + BLOCK);
                }
            }
            drop(j);
            let (_, pending) = open(dir, 0);
            assert_eq!(pending.len(), 2);
            assert_eq!(pending[0].1.len(), 16 << 20);
        });
    }

    #[test]
    fn a_failed_write_gives_its_place_and_numbers_to_the_next() {
        both(|open, dir| {
            let (mut j, _) = open(dir, 0);
            j.push(b"one");
            j.write().unwrap();
            // A write that cannot succeed: the second file is made read-only under the
            // journal (a full or failing disk looks the same to it).
            let second = second_path(&dir.join("j"));
            j.switch();
            let ro = OpenOptions::new().read(true).open(&second).unwrap();
            let good = std::mem::replace(&mut j.sides[1].file, ro);
            let direct = j.sides[1].direct.take();
            j.push(b"two, never acknowledged");
            assert!(j.write().is_err());
            j.sides[1].file = good;
            j.sides[1].direct = direct;
            assert_eq!(j.push(b"two"), 2, "the failed record's number is reused");
            j.write().unwrap();
            drop(j);
            let (_, pending) = open(dir, 0);
            let got: Vec<&[u8]> = pending.iter().map(|(_, p)| p.as_slice()).collect();
            assert_eq!(got, [&b"one"[..], &b"two"[..]]);
        });
    }

    #[test]
    fn records_of_a_write_that_failed_after_reaching_the_disk_never_come_back() {
        both(|open, dir| {
            let (mut j, _) = open(dir, 0);
            j.push(&[1; 100]);
            j.write().unwrap();
            // Three records that reach the file, but whose write reports a failure (as when
            // its flush fails): their producers are told it failed.
            for _ in 0..3 {
                j.push(&[0xee; 100]);
            }
            j.sides[0].fail_after_write = 1;
            assert!(j.write().is_err());
            // Nothing else is written before the next start: they do not come back.
            drop(j);
            let (j, pending) = open(dir, 0);
            let got: Vec<(u64, u8)> = pending.iter().map(|(s, p)| (*s, p[0])).collect();
            assert_eq!(got, [(1, 1)]);
            drop(j);
            let (mut j, _) = open(dir, 1);
            // Started again once the database holds record 1 (as the store does after
            // re-applying it): the same, but the zeros after the failed write fail too (a
            // failing disk). The next batch is shorter, with records of the same size: without
            // zeros behind it, the failed batch's last two records would continue its
            // numbering.
            for _ in 0..3 {
                j.push(&[0xee; 100]);
            }
            j.sides[0].fail_after_write = 1;
            j.sides[0].refuse = 1;
            assert!(j.write().is_err());
            assert_eq!(j.push(&[2; 100]), 2);
            j.write().unwrap();
            drop(j);
            let (_, pending) = open(dir, 1);
            let got: Vec<(u64, u8)> = pending.iter().map(|(s, p)| (*s, p[0])).collect();
            assert_eq!(got, [(2, 2)]);
        });
    }

    #[test]
    fn records_whose_zeros_failed_too_are_written_over_when_the_journal_closes() {
        both(|open, dir| {
            let (mut j, _) = open(dir, 0);
            j.push(&[1; 100]);
            j.write().unwrap();
            for _ in 0..3 {
                j.push(&[0xee; 100]);
            }
            // The write reaches the disk but reports a failure, and the zeros after it are
            // refused; courier then stops before another batch is written.
            j.sides[0].fail_after_write = 1;
            j.sides[0].refuse = 1;
            assert!(j.write().is_err());
            assert_ne!(j.sides[0].stale_to, 0);
            drop(j);
            let (_, pending) = open(dir, 0);
            let got: Vec<(u64, u8)> = pending.iter().map(|(s, p)| (*s, p[0])).collect();
            assert_eq!(got, [(1, 1)]);
        });
    }

    /// The zeros over a failed write's leftovers go down before the next batch, on their own;
    /// a file system that refuses their direct write has them written buffered, as a batch
    /// would, rather than refusing every later batch.
    #[test]
    fn leftovers_of_a_failed_write_are_zeroed_before_the_next_batch_even_buffered() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("j");
        let (mut j, _) = Journal::open(&path, ID, 0).unwrap();
        assert!(
            j.is_direct(),
            "this test needs direct I/O in its temporary directory"
        );
        j.push(&[1; 100]);
        j.write().unwrap();
        for _ in 0..20 {
            j.push(&[0xee; 100]);
        }
        j.sides[0].fail_after_write = 1;
        j.sides[0].refuse = 1;
        assert!(j.write().is_err());
        assert_ne!(j.sides[0].stale_to, 0);
        // Direct writes refused from now on; the next batch, shorter than the failed one.
        j.sides[0].refuse_direct = true;
        j.push(&[2; 100]);
        j.write().unwrap();
        assert_eq!(j.sides[0].stale_to, 0);
        assert!(!j.is_direct());
        drop(j);
        // Nothing of the failed write is left for any reader: past the new record, zeros.
        let bytes = std::fs::read(&path).unwrap();
        let end = 2 * (HEADER + 100);
        assert!(
            bytes[end..]
                .iter()
                .take(20 * (HEADER + 100))
                .all(|b| *b == 0)
        );
        let (_, pending) = Journal::open(&path, ID, 0).unwrap();
        let got: Vec<(u64, u8)> = pending.iter().map(|(s, p)| (*s, p[0])).collect();
        assert_eq!(got, [(1, 1), (2, 2)]);
    }

    #[test]
    fn a_torn_or_corrupt_tail_ends_the_journal_without_losing_what_precedes_it() {
        both(|open, dir| {
            let (mut j, _) = open(dir, 0);
            for i in 0..4u8 {
                j.push(&[i; 64]);
            }
            j.write().unwrap();
            drop(j);
            let path = dir.join("j");
            let full = std::fs::read(&path).unwrap();
            let end = 4 * (HEADER + 64);
            // Torn: the last record cut short.
            std::fs::write(&path, &full[..end - 10]).unwrap();
            let (_, pending) = open(dir, 0);
            assert_eq!(pending.len(), 3);
            // Corrupt: one payload byte of the third record flipped. That record is lost;
            // the one after it is intact and comes back.
            let mut bad = full.clone();
            bad[2 * (HEADER + 64) + HEADER + 5] ^= 0xff;
            std::fs::write(&path, &bad).unwrap();
            let (_, pending) = open(dir, 0);
            assert_eq!(seqs(&pending), [1, 2, 4]);
            assert_eq!(pending[2].1, vec![3u8; 64]);
        });
    }

    /// Names of the copies of damaged journal files kept in `dir`.
    fn damaged_copies(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.contains(".damaged-"))
            .collect();
        names.sort();
        names
    }

    /// Damage in the middle of the file being written (a flipped bit, a lost write) loses
    /// the damaged record only: every acknowledged record after it comes back, whether the
    /// damage left its length readable or not, and both files are copied aside before the
    /// next lap writes over them. A torn tail is no damage: no copies.
    #[test]
    fn damage_in_the_middle_of_the_journal_loses_only_the_damaged_records() {
        both(|open, dir| {
            let (mut j, _) = open(dir, 0);
            for batch in 0..10u8 {
                for i in 0..10u8 {
                    j.push(&[batch * 10 + i; 100]);
                }
                j.write().unwrap();
            }
            drop(j);
            let path = dir.join("j");
            let full = std::fs::read(&path).unwrap();
            let rec = HEADER + 100;
            std::fs::write(&path, &full[..100 * rec - 7]).unwrap();
            assert_eq!(open(dir, 0).1.len(), 99, "torn tail");
            assert!(damaged_copies(dir).is_empty(), "a torn tail is no damage");
            for field in [HEADER + 50, 0] {
                // Record 31's payload, then its length.
                let mut bad = full.clone();
                bad[30 * rec + field] ^= 0x5a;
                std::fs::write(&path, &bad).unwrap();
                let (j, pending) = open(dir, 0);
                let want: Vec<u64> = (1..=100).filter(|s| *s != 31).collect();
                assert_eq!(seqs(&pending), want, "damage at byte {field} of a record");
                assert_eq!(pending[30].1, vec![31u8; 100]);
                assert_eq!(j.last_seq(), 100, "numbering goes on after the last record");
                let copies = damaged_copies(dir);
                assert_eq!(copies.len(), 2, "{copies:?}");
                for c in copies {
                    std::fs::remove_file(dir.join(c)).unwrap();
                }
            }
        });
    }

    /// Damage at the very start of the newer file excuses only the records between the older
    /// file's and its own first intact one: a gap below them (a database restored from an
    /// older copy) still stops the start.
    #[test]
    fn damage_at_the_start_of_a_file_does_not_excuse_a_restored_database() {
        both(|open, dir| {
            let (mut j, _) = open(dir, 0);
            for i in 0..6u8 {
                j.push(&[i; 50]);
            }
            j.write().unwrap();
            j.switch();
            j.push(b"seven");
            j.push(b"eight");
            j.write().unwrap();
            j.switch();
            for i in 9..12u8 {
                j.push(&[i; 50]);
            }
            j.write().unwrap();
            drop(j);
            let path = dir.join("j");
            let mut bad = std::fs::read(&path).unwrap();
            bad[HEADER + 3] ^= 1; // record 9, the first of the first file's new lap
            std::fs::write(&path, &bad).unwrap();
            // As it should be: the database covers the first file's old lap (up to 6).
            let (_, pending) = open(dir, 6);
            assert_eq!(seqs(&pending), [7, 8, 10, 11]);
            // A database from an older copy (up to 2): records 3 to 6 are missing, and that
            // is no damage.
            let err = Journal::open(&path, ID, 2).err().unwrap();
            assert!(err.to_string().contains("missing"), "{err}");
        });
    }

    /// Damage in the older file's lap no longer stops the start: its records after the damage
    /// and the newer file's come back.
    #[test]
    fn damage_in_the_older_file_loses_only_the_damaged_records() {
        both(|open, dir| {
            let (mut j, _) = open(dir, 0);
            for i in 0..6u8 {
                j.push(&[i; 50]);
            }
            j.write().unwrap();
            j.switch();
            j.push(b"seven");
            j.write().unwrap();
            drop(j);
            let path = dir.join("j");
            let mut bad = std::fs::read(&path).unwrap();
            bad[2 * (HEADER + 50) + HEADER] ^= 1; // record 3
            std::fs::write(&path, &bad).unwrap();
            let (_, pending) = open(dir, 1);
            assert_eq!(seqs(&pending), [2, 4, 5, 6, 7]);
        });
    }

    #[test]
    fn the_two_files_take_turns_and_older_laps_are_ignored() {
        both(|open, dir| {
            let (mut j, _) = open(dir, 0);
            for i in 0..6u8 {
                j.push(&[i; 50]);
            }
            j.write().unwrap();
            // The first file's lap ends: the second takes records 7 and 8.
            assert_eq!(j.switch(), 0, "the second file held nothing yet");
            j.push(b"seven");
            j.push(b"eight");
            j.write().unwrap();
            // A crash now: the records of both files after the checkpoint, in order.
            let (_, pending) = open(dir, 4);
            assert_eq!(seqs(&pending), [5, 6, 7, 8]);
            // Back to the first file, which must be covered up to 6 before it is written over;
            // a shorter record leaves the older ones behind it, which are not read.
            assert_eq!(j.switch(), 6);
            j.push(b"nine");
            j.write().unwrap();
            drop(j);
            let (j, pending) = open(dir, 6);
            let got: Vec<(u64, &[u8])> = pending.iter().map(|(s, p)| (*s, p.as_slice())).collect();
            assert_eq!(
                got,
                [(7, &b"seven"[..]), (8, &b"eight"[..]), (9, &b"nine"[..])]
            );
            assert_eq!(j.last_seq(), 9);
            // Everything covered: nothing to replay, and numbering goes on.
            let (j, pending) = open(dir, 9);
            assert!(pending.is_empty());
            assert_eq!(j.last_seq(), 9);
        });
    }

    #[test]
    fn a_lap_is_full_once_it_has_taken_its_bytes() {
        both(|open, dir| {
            let (mut j, _) = open(dir, 0);
            assert!(!j.lap_full());
            j.push(&vec![7u8; LAP_BYTES as usize]);
            j.write().unwrap();
            assert!(j.lap_full());
            j.switch();
            assert!(!j.lap_full());
        });
    }

    #[test]
    fn a_gap_between_the_database_and_the_journal_is_refused() {
        both(|open, dir| {
            let (mut j, _) = open(dir, 0);
            j.push(b"a");
            j.push(b"b");
            j.write().unwrap();
            drop(j);
            // The database claims to cover nothing, but the journal's records start at 1:
            // fine.
            assert_eq!(open(dir, 0).1.len(), 2);
            // A journal whose first record after the checkpoint is not the next one lost data.
            let bytes = std::fs::read(dir.join("j")).unwrap();
            std::fs::write(dir.join("j"), &bytes[HEADER + 1..]).unwrap();
            let err = Journal::open(&dir.join("j"), ID, 0).err().unwrap();
            assert!(err.to_string().contains("missing"), "{err}");
        });
    }

    #[test]
    fn a_journal_left_over_from_another_database_reads_as_empty() {
        both(|open, dir| {
            let (mut j, _) = open(dir, 0);
            j.push(b"someone else's event");
            j.write().unwrap();
            drop(j);
            let (mut j, pending) = Journal::open(&dir.join("j"), ID + 1, 0).unwrap();
            assert!(pending.is_empty());
            // And this database's records then start at 1, over the foreign ones.
            assert_eq!(j.push(b"mine"), 1);
        });
    }

    #[test]
    fn direct_io_is_used_wherever_the_file_system_takes_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("j");
        let (j, _) = Journal::open(&path, ID, 0).unwrap();
        // Whether this file system takes O_DIRECT with whole blocks, asked directly.
        let supported = OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_DIRECT)
            .open(&path)
            .is_ok_and(|f| dio_alignment(&f).is_none_or(|(m, o)| fits_blocks(m, o)));
        assert_eq!(j.is_direct(), supported);
        let (j, _) = Journal::open_with(&path, ID, 0, false).unwrap();
        assert!(!j.is_direct());
    }

    #[test]
    fn whole_aligned_blocks_fit_any_alignment_that_divides_them() {
        assert!(fits_blocks(512, 512));
        assert!(fits_blocks(4, 4096));
        assert!(fits_blocks(4096, 4096));
        // No direct I/O on this file, or alignments larger than the journal's blocks.
        assert!(!fits_blocks(0, 0));
        assert!(!fits_blocks(512, 0));
        assert!(!fits_blocks(512, 16_384));
        assert!(!fits_blocks(8192, 512));
        assert!(!fits_blocks(512, 3000));
    }

    #[test]
    fn a_refused_direct_write_goes_on_buffered_and_loses_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("j");
        let (mut j, _) = Journal::open(&path, ID, 0).unwrap();
        assert!(
            j.is_direct(),
            "this test needs a file system with direct I/O for its temporary directory"
        );
        let mut expected = Vec::new();
        // A record that ends inside a block, written directly: its block's bytes are kept
        // for the next direct write.
        expected.push(vec![1u8; 1000]);
        j.push(&expected[0]);
        j.write().unwrap();
        // Now the file system refuses direct writes: the batch goes out buffered.
        j.sides[j.cur].refuse_direct = true;
        for n in 2..5u8 {
            expected.push(vec![n; 3000]);
            j.push(expected.last().unwrap());
        }
        j.write().unwrap();
        assert!(!j.is_direct(), "both files go on buffered");
        // And later batches, in this file and after a switch to the other.
        expected.push(vec![9u8; 10]);
        j.push(expected.last().unwrap());
        j.write().unwrap();
        j.switch();
        expected.push(vec![10u8; 5000]);
        j.push(expected.last().unwrap());
        j.write().unwrap();
        drop(j);
        let (_, pending) = Journal::open(&path, ID, 0).unwrap();
        let got: Vec<Vec<u8>> = pending.into_iter().map(|(_, p)| p).collect();
        assert_eq!(got, expected);
    }
}
