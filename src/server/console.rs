//! Reading a VM's console log for `GET /v1/clusters/{name}/vms/{vm}/console`: the last lines, then what is
//! appended (follow). Bounded: a tail reads at most [`TAIL_WINDOW`] bytes from the end of the file, a follow step
//! at most [`STEP_BYTES`]. Blocking file I/O: callers run these in `spawn_blocking`.

use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

/// The most lines a tail returns.
pub const MAX_LINES: usize = 10_000;
/// How far back from the end of the file a tail looks.
pub const TAIL_WINDOW: u64 = 1024 * 1024;
/// The most bytes one follow step reads.
pub const STEP_BYTES: u64 = 64 * 1024;

/// What was read and where the next read starts.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Chunk {
    pub bytes: Vec<u8>,
    /// The file offset after `bytes`.
    pub next: u64,
}

fn open(path: &Path) -> std::io::Result<Option<(std::fs::File, u64)>> {
    match std::fs::File::open(path) {
        Ok(f) => {
            let len = f.metadata()?.len();
            Ok(Some((f, len)))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// The last `lines` lines of the file (a missing file is empty), and the offset of its end.
pub fn tail(path: &Path, lines: usize) -> std::io::Result<Chunk> {
    let Some((mut f, len)) = open(path)? else {
        return Ok(Chunk::default());
    };
    let start = len.saturating_sub(TAIL_WINDOW);
    f.seek(SeekFrom::Start(start))?;
    let mut buf = Vec::new();
    f.take(len - start).read_to_end(&mut buf)?;
    let next = start + buf.len() as u64;
    let lines = lines.min(MAX_LINES);
    // Count line ends from the back; a last line without its newline counts as a line.
    let body = buf.strip_suffix(b"\n").unwrap_or(&buf);
    let mut seen = 0;
    let mut cut = 0;
    for (i, b) in body.iter().enumerate().rev() {
        if *b == b'\n' {
            seen += 1;
            if seen == lines {
                cut = i + 1;
                break;
            }
        }
    }
    let bytes = if lines == 0 {
        Vec::new()
    } else {
        buf[cut..].to_vec()
    };
    Ok(Chunk { bytes, next })
}

/// What was appended since `from` (at most [`STEP_BYTES`]). A file shorter than `from` was started over (the VM
/// restarted): reading starts again at 0. A missing file reads as nothing, at 0.
pub fn read_from(path: &Path, from: u64) -> std::io::Result<Chunk> {
    let Some((mut f, len)) = open(path)? else {
        return Ok(Chunk::default());
    };
    let from = if len < from { 0 } else { from };
    f.seek(SeekFrom::Start(from))?;
    let mut bytes = Vec::new();
    f.take((len - from).min(STEP_BYTES))
        .read_to_end(&mut bytes)?;
    let next = from + bytes.len() as u64;
    Ok(Chunk { bytes, next })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tail_returns_the_last_lines() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("console.log");
        std::fs::write(&p, "a\nb\nc\nd\n").unwrap();
        assert_eq!(tail(&p, 2).unwrap().bytes, b"c\nd\n");
        assert_eq!(tail(&p, 10).unwrap().bytes, b"a\nb\nc\nd\n");
        assert_eq!(tail(&p, 0).unwrap().bytes, b"");
        assert_eq!(tail(&p, 2).unwrap().next, 8);
        std::fs::write(&p, "a\nb\npartial").unwrap();
        assert_eq!(tail(&p, 2).unwrap().bytes, b"b\npartial");
    }

    #[test]
    fn missing_file_is_empty() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("none.log");
        assert_eq!(tail(&p, 5).unwrap(), Chunk::default());
        assert_eq!(read_from(&p, 7).unwrap(), Chunk::default());
    }

    #[test]
    fn follow_reads_appends_and_restarts_after_truncation() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("console.log");
        std::fs::write(&p, "boot\n").unwrap();
        let c = read_from(&p, 5).unwrap();
        assert_eq!((c.bytes.as_slice(), c.next), (&b""[..], 5));
        std::fs::write(&p, "boot\nmore\n").unwrap();
        let c = read_from(&p, 5).unwrap();
        assert_eq!((c.bytes.as_slice(), c.next), (&b"more\n"[..], 10));
        std::fs::write(&p, "new\n").unwrap();
        let c = read_from(&p, 10).unwrap();
        assert_eq!((c.bytes.as_slice(), c.next), (&b"new\n"[..], 4));
    }
}
