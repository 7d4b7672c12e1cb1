//! Reading task logs kept on the node: the last N lines, or what came
//! after a byte offset (for `service logs -f`), in bounded pieces.

use std::{
    fs::File,
    io::{self, Read, Seek, SeekFrom},
    path::Path,
};

/// At most this much log text goes into one reply.
pub(crate) const MAX_CHUNK: u64 = 256 * 1024;

/// Log text and where to read on from.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct Chunk {
    /// Whole lines (a partial last line waits for its newline).
    pub(crate) text: String,
    /// Byte offset after `text`.
    pub(crate) next: u64,
}

/// Reads from `from` (or, when `None`, the last `tail` lines; all lines if
/// `tail` is `None` too). A missing file reads as empty.
pub(crate) fn read(path: &Path, from: Option<u64>, tail: Option<usize>) -> io::Result<Chunk> {
    let mut file = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Chunk::default()),
        Err(e) => return Err(e),
    };
    let len = file.metadata()?.len();
    let start = match (from, tail) {
        (Some(offset), _) => offset.min(len),
        (None, Some(n)) => tail_offset(&mut file, len, n)?,
        (None, None) => 0,
    };
    let end = len.min(start + MAX_CHUNK);
    file.seek(SeekFrom::Start(start))?;
    let mut buf = vec![0; (end - start) as usize];
    file.read_exact(&mut buf)?;
    // Keep whole lines only, unless one line is longer than a whole chunk.
    let keep = match buf.iter().rposition(|b| *b == b'\n') {
        Some(i) => i + 1,
        None if buf.len() as u64 == MAX_CHUNK => buf.len(),
        None => 0,
    };
    buf.truncate(keep);
    Ok(Chunk {
        text: String::from_utf8_lossy(&buf).into_owned(),
        next: start + keep as u64,
    })
}

/// The offset where the last `n` complete lines begin.
fn tail_offset(file: &mut File, len: u64, n: usize) -> io::Result<u64> {
    if n == 0 {
        return Ok(len);
    }
    // The last newline ends the last complete line; the (n+1)th from the
    // end ends the line before the n wanted.
    let mut newlines = 0;
    let mut pos = len;
    let mut block = vec![0u8; 8192];
    while pos > 0 {
        let size = block.len().min(pos as usize);
        pos -= size as u64;
        file.seek(SeekFrom::Start(pos))?;
        file.read_exact(&mut block[..size])?;
        for i in (0..size).rev() {
            if block[i] == b'\n' {
                newlines += 1;
                if newlines == n + 1 {
                    return Ok(pos + i as u64 + 1);
                }
            }
        }
    }
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tails_and_follows() {
        let dir = std::env::temp_dir().join(format!("mesh-logs-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("log");
        std::fs::write(&path, "one\ntwo\nthree\npart").unwrap();
        assert_eq!(read(&path, None, Some(2)).unwrap().text, "two\nthree\n");
        assert_eq!(read(&path, None, Some(10)).unwrap().text, "one\ntwo\nthree\n");
        assert_eq!(read(&path, None, Some(0)).unwrap().text, "");
        let all = read(&path, None, None).unwrap();
        assert_eq!(all.text, "one\ntwo\nthree\n");
        assert_eq!(all.next, 14, "the partial line waits");
        std::fs::write(&path, "one\ntwo\nthree\npartial done\n").unwrap();
        assert_eq!(read(&path, Some(all.next), None).unwrap().text, "partial done\n");
        assert_eq!(read(&dir.join("missing"), None, None).unwrap(), Chunk::default());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
