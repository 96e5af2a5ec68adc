//! The ingest journal: an append-only file that makes a batch of new events durable with one
//! sequential synchronous write (`O_DIRECT | O_DSYNC`, or a buffered write and `fdatasync`
//! where the file system refuses direct I/O), so that the database commit holding them does
//! not have to be flushed before the producers get their 202.
//!
//! Why: a durable redb commit costs two flushes (with `quick_repair`) and a `pwrite` for each
//! of the ~20–40 copy-on-write pages it touches, whatever the number of events in it; at 64
//! concurrent producers that fixed price was most of the writer's time (BENCHMARKS.md). The
//! writer now commits batches made only of appends without flushing (`Durability::None`:
//! visible to readers, kept in redb's write buffer) *after* their journal records are on
//! disk; every other kind of write, and a full journal, is a durable commit — a checkpoint
//! that covers every journaled record before it, after which the journal starts over.
//!
//! After a crash, redb comes back at its last durable commit, which stores the sequence number
//! of the last journal record it covers; [`Journal::open`] returns the records after that one,
//! and the store re-applies them before anything else runs. Records are only ever read back
//! in that one place.
//!
//! Format: records back to back from offset 0, each `len: u32 LE | crc32: u32 LE | seq: u64 LE |
//! payload (len bytes)`, the checksum covering the database's journal id (a random number
//! kept in the database), seq and payload — so that a journal left over from another database
//! file reads as empty instead of being applied to this one. After a checkpoint the file is
//! overwritten from offset 0 (never truncated, so later flushes have no block allocation to
//! write), which leaves older records behind the new ones; a reader stops at the first
//! record that is torn, fails its checksum or does not continue the sequence. Direct writes
//! are whole 4 KiB blocks, so the rest of the block after a batch's last record is zeros until
//! the next batch fills it.

use std::fs::{File, OpenOptions};
use std::io::Read;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use super::StoreError;

/// Bytes of journal written before a checkpoint is forced. It bounds the replay after a crash
/// (~6,000 events of 1 KiB), the file's size, and how long a checkpoint holds up ingest:
/// the checkpoint writes the pages of every commit since the last one (measured: ~23 ms at
/// 8 MiB, ~85 ms at 32 MiB, with the same throughput; BENCHMARKS.md).
pub(crate) const LAP_BYTES: u64 = 8 << 20;

const HEADER: usize = 16;

/// The unit of a direct write: offsets, lengths and buffer addresses are multiples of it
/// (4 KiB covers every logical block size Linux file systems use).
const BLOCK: usize = 4096;

/// A record read back: its sequence number and payload.
pub(crate) type Record = (u64, Vec<u8>);

pub(crate) struct Journal {
    file: File,
    /// The same file opened `O_DIRECT | O_DSYNC`, where the file system allows it: a write
    /// through it is on disk when it returns, without passing through the page cache, so a
    /// batch costs one system call and no copy or write-back (measured: BENCHMARKS.md).
    /// `None` falls back to a buffered write and `fdatasync`.
    direct: Option<Direct>,
    path: PathBuf,
    /// Where the next record goes.
    offset: u64,
    /// The sequence number of the next record.
    next_seq: u64,
    /// The database's journal id, part of every record's checksum.
    id: u64,
    /// Records pushed and not yet written, and the sequence number of the first of them.
    buf: Vec<u8>,
    buf_first_seq: u64,
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
        let io = |what: &str, e: std::io::Error| {
            StoreError::Db(format!("journal {}: {what}: {e}", path.display()))
        };
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .map_err(|e| io("open", e))?;
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes).map_err(|e| io("read", e))?;
        let records = scan(&bytes, id);
        let last = records.last().map_or(0, |(seq, _)| *seq);
        let pending: Vec<Record> = records
            .into_iter()
            .filter(|(seq, _)| *seq > checkpoint_seq)
            .map(|(seq, p)| (seq, p.to_vec()))
            .collect();
        if let Some((first, _)) = pending.first()
            && *first != checkpoint_seq + 1
        {
            return Err(StoreError::Corrupt(format!(
                "journal {}: the database holds records up to {checkpoint_seq} but the journal \
                 continues at {first}, so records in between are missing (if the database file \
                 was replaced or removed on purpose, move this journal away too)",
                path.display()
            )));
        }
        let direct = match try_direct.then(|| Direct::open(path)) {
            None => None,
            Some(Ok(d)) => Some(d),
            Some(Err(e)) => {
                tracing::info!(path = %path.display(), error = %e, "the ingest journal cannot use direct I/O here; using buffered writes and fdatasync");
                None
            }
        };
        let journal = Journal {
            file,
            direct,
            path: path.to_path_buf(),
            offset: 0,
            next_seq: checkpoint_seq.max(last) + 1,
            id,
            buf: Vec::new(),
            buf_first_seq: 0,
        };
        Ok((journal, pending))
    }

    /// Whether `bytes` more of records fit before the lap is full. An empty journal takes any
    /// batch, however large.
    pub(crate) fn fits(&self, bytes: usize) -> bool {
        self.offset == 0 || self.offset + bytes as u64 <= LAP_BYTES
    }

    /// Frames `payload` as the next record (written by [`Journal::sync`]); returns its sequence
    /// number.
    pub(crate) fn push(&mut self, payload: &[u8]) -> u64 {
        let seq = self.next_seq;
        if self.buf.is_empty() {
            self.buf_first_seq = seq;
        }
        self.next_seq += 1;
        let len = u32::try_from(payload.len())
            .expect("a record is under 4 GiB (server.max_body_bytes is at most 1 GiB)");
        let crc = checksum(self.id, seq, payload);
        self.buf.extend_from_slice(&len.to_le_bytes());
        self.buf.extend_from_slice(&crc.to_le_bytes());
        self.buf.extend_from_slice(&seq.to_le_bytes());
        self.buf.extend_from_slice(payload);
        seq
    }

    /// Bytes pushed and not yet written.
    pub(crate) fn buffered(&self) -> usize {
        self.buf.len()
    }

    /// Writes the pushed records and waits until they are on disk.
    pub(crate) fn sync(&mut self) -> Result<(), StoreError> {
        let r = match &mut self.direct {
            Some(d) => d.write(self.offset, &self.buf),
            None => self
                .file
                .write_all_at(&self.buf, self.offset)
                .and_then(|_| self.file.sync_data()),
        };
        match r {
            Ok(()) => {
                self.offset += self.buf.len() as u64;
                self.buf.clear();
                Ok(())
            }
            Err(e) => {
                // The records may be partly on disk. They are not acknowledged; the next batch
                // overwrites them with the same sequence numbers, so the sequence stays
                // unbroken for a reader.
                self.discard();
                Err(StoreError::Db(format!(
                    "journal {}: write: {e}",
                    self.path.display()
                )))
            }
        }
    }

    /// Drops pushed records that will not be written; their sequence numbers go to the next.
    pub(crate) fn discard(&mut self) {
        if !self.buf.is_empty() {
            self.next_seq = self.buf_first_seq;
            self.buf.clear();
        }
    }

    /// Whether nothing was written since the last checkpoint (the database holds it all).
    pub(crate) fn is_empty(&self) -> bool {
        self.offset == 0
    }

    /// Called after a durable commit: every record so far is covered by the database, so the
    /// next one starts the file over.
    pub(crate) fn checkpointed(&mut self) {
        self.offset = 0;
        if let Some(d) = &mut self.direct {
            d.tail.clear();
        }
    }

    /// Whether batches are written with direct, synchronous I/O.
    #[cfg(test)]
    pub(crate) fn is_direct(&self) -> bool {
        self.direct.is_some()
    }

    /// The sequence number of the last record pushed (0 if none ever was).
    pub(crate) fn last_seq(&self) -> u64 {
        self.next_seq - 1
    }
}

/// Direct, synchronous writes of whole blocks.
///
/// A batch rarely ends on a block boundary, so the block it ends in is written again, with the
/// same leading bytes, by the next batch: `tail` keeps that block's bytes up to the end of the
/// last record, and the rest of the block is written as zeros (where a reader stops). A torn
/// rewrite cannot harm the records already there: every sector of the block holds either its
/// old or its new content, and the two agree on every byte up to the old end.
struct Direct {
    file: File,
    tail: Vec<u8>,
    /// Scratch space for one aligned write (kept to avoid an allocation per batch).
    scratch: Vec<u8>,
}

impl Direct {
    fn open(path: &Path) -> std::io::Result<Direct> {
        let file = OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_DIRECT | libc::O_DSYNC)
            .open(path)?;
        Ok(Direct {
            file,
            tail: Vec::new(),
            scratch: Vec::new(),
        })
    }

    /// Writes `records` at `offset` (the end of the records written since the last checkpoint,
    /// whose partial last block is `tail`) and returns once they are on disk.
    fn write(&mut self, offset: u64, records: &[u8]) -> std::io::Result<()> {
        let block_start = offset - self.tail.len() as u64;
        debug_assert_eq!(block_start % BLOCK as u64, 0);
        let len = self.tail.len() + records.len();
        let padded = len.div_ceil(BLOCK) * BLOCK;
        if self.scratch.len() < padded + BLOCK {
            self.scratch.resize(padded + BLOCK, 0);
        }
        let skew = self.scratch.as_ptr().addr() % BLOCK;
        let start = (BLOCK - skew) % BLOCK;
        let out = &mut self.scratch[start..start + padded];
        out[..self.tail.len()].copy_from_slice(&self.tail);
        out[self.tail.len()..len].copy_from_slice(records);
        out[len..].fill(0);
        self.file.write_all_at(out, block_start)?;
        let keep = len % BLOCK;
        let new_tail_from = len - keep;
        self.tail.clear();
        self.tail.extend_from_slice(&out[new_tail_from..len]);
        Ok(())
    }
}

fn checksum(id: u64, seq: u64, payload: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(&id.to_le_bytes());
    h.update(&seq.to_le_bytes());
    h.update(payload);
    h.finalize()
}

/// The valid records at the start of `bytes`: each complete, with a checksum that matches for
/// the journal id `id`, and numbered one after the other.
fn scan(bytes: &[u8], id: u64) -> Vec<(u64, &[u8])> {
    let mut out: Vec<(u64, &[u8])> = Vec::new();
    let mut at = 0usize;
    while bytes.len() - at >= HEADER {
        let word = |i: usize| u32::from_le_bytes(bytes[at + i..at + i + 4].try_into().unwrap());
        let len = word(0) as usize;
        let crc = word(4);
        let seq = u64::from_le_bytes(bytes[at + 8..at + 16].try_into().unwrap());
        if bytes.len() - at - HEADER < len {
            break;
        }
        let payload = &bytes[at + HEADER..at + HEADER + len];
        if checksum(id, seq, payload) != crc {
            break;
        }
        if let Some((prev, _)) = out.last()
            && seq != prev + 1
        {
            break;
        }
        out.push((seq, payload));
        at += HEADER + len;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: u64 = 0x5eed;

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
            j.sync().unwrap();
            drop(j);
            let (j, pending) = open(dir, 2);
            let seqs: Vec<u64> = pending.iter().map(|(s, _)| *s).collect();
            assert_eq!(seqs, [3, 4, 5]);
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
                    j.sync().unwrap();
                }
            }
            drop(j);
            let (_, pending) = open(dir, 0);
            let got: Vec<Vec<u8>> = pending.into_iter().map(|(_, p)| p).collect();
            assert_eq!(got, expected);
        });
    }

    #[test]
    fn a_torn_or_corrupt_tail_ends_the_journal_without_losing_what_precedes_it() {
        both(|open, dir| {
            let (mut j, _) = open(dir, 0);
            for i in 0..4u8 {
                j.push(&[i; 64]);
            }
            j.sync().unwrap();
            drop(j);
            let path = dir.join("j");
            let full = std::fs::read(&path).unwrap();
            let end = 4 * (HEADER + 64);
            // Torn: the last record cut short.
            std::fs::write(&path, &full[..end - 10]).unwrap();
            let (_, pending) = open(dir, 0);
            assert_eq!(pending.len(), 3);
            // Corrupt: one payload byte of the third record flipped.
            let mut bad = full.clone();
            bad[2 * (HEADER + 64) + HEADER + 5] ^= 0xff;
            std::fs::write(&path, &bad).unwrap();
            let (_, pending) = open(dir, 0);
            assert_eq!(pending.len(), 2);
        });
    }

    #[test]
    fn after_a_checkpoint_the_file_starts_over_and_older_records_are_ignored() {
        both(|open, dir| {
            let (mut j, _) = open(dir, 0);
            for i in 0..6u8 {
                j.push(&[i; 50]);
            }
            j.sync().unwrap();
            // The database now covers 1..=6; two shorter records overwrite the start.
            j.checkpointed();
            j.push(b"seven");
            j.push(b"eight");
            j.sync().unwrap();
            drop(j);
            let (j, pending) = open(dir, 6);
            let got: Vec<(u64, &[u8])> = pending.iter().map(|(s, p)| (*s, p.as_slice())).collect();
            assert_eq!(got, [(7, &b"seven"[..]), (8, &b"eight"[..])]);
            assert_eq!(j.last_seq(), 8);
            // Crash right after a checkpoint, before anything new was written: nothing to
            // replay.
            let (j, pending) = open(dir, 8);
            assert!(pending.is_empty());
            assert_eq!(j.last_seq(), 8);
        });
    }

    #[test]
    fn a_gap_between_the_database_and_the_journal_is_refused() {
        both(|open, dir| {
            let (mut j, _) = open(dir, 0);
            j.push(b"a");
            j.push(b"b");
            j.sync().unwrap();
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
            j.sync().unwrap();
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
        // Whether this file system takes O_DIRECT, asked directly.
        let supported = OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_DIRECT)
            .open(&path)
            .is_ok();
        assert_eq!(j.is_direct(), supported);
        let (j, _) = Journal::open_with(&path, ID, 0, false).unwrap();
        assert!(!j.is_direct());
    }
}
