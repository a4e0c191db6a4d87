//! A minimal writer for the "newc" cpio format, the one the Linux kernel unpacks as an initramfs.
//!
//! Only what an initramfs needs: directories, regular files, symlinks and character devices, all
//! owned by root with mtime 0 so that identical inputs give byte-identical archives.

/// Magic of the newc format (no checksums).
const MAGIC: &[u8; 6] = b"070701";
/// Fixed header length: the magic plus 13 eight-digit hex fields.
pub const HEADER_LEN: usize = 110;
/// Name of the entry that ends an archive.
pub const TRAILER: &str = "TRAILER!!!";
/// The kernel requires every concatenated archive to start 4-aligned; padding the whole archive to
/// a 512-byte block like `cpio -H newc` does keeps it so and leaves room for other tools.
const BLOCK: usize = 512;

const S_IFDIR: u32 = 0o040000;
const S_IFREG: u32 = 0o100000;
const S_IFLNK: u32 = 0o120000;
const S_IFCHR: u32 = 0o020000;

/// A member that newc cannot describe: its sizes are 8 hex digits.
#[derive(Debug, thiserror::Error)]
#[error("cpio member {name:?} is too large for the newc format ({len} bytes)")]
pub struct TooLarge {
    /// The member's path in the archive.
    pub name: String,
    /// The length that did not fit.
    pub len: usize,
}

/// Builds one newc archive in memory.
#[derive(Debug)]
pub struct CpioWriter {
    buf: Vec<u8>,
    next_ino: u32,
}

impl Default for CpioWriter {
    fn default() -> Self {
        Self::new()
    }
}

impl CpioWriter {
    /// An empty archive.
    pub fn new() -> Self {
        // Inode numbers only matter for hard links (nlink > 1), which we never write, but keep
        // them distinct so tools that list the archive do not think otherwise.
        Self {
            buf: Vec::new(),
            next_ino: 1,
        }
    }

    /// Adds a directory; `path` is relative to the root (no leading `/`).
    pub fn dir(&mut self, path: &str, perm: u32) -> Result<(), TooLarge> {
        self.entry(path, S_IFDIR | (perm & 0o7777), 2, 0, 0, &[])
    }

    /// Adds a regular file.
    pub fn file(&mut self, path: &str, perm: u32, data: &[u8]) -> Result<(), TooLarge> {
        self.entry(path, S_IFREG | (perm & 0o7777), 1, 0, 0, data)
    }

    /// Adds a symlink at `path` pointing to `target`.
    pub fn symlink(&mut self, path: &str, target: &str) -> Result<(), TooLarge> {
        self.entry(path, S_IFLNK | 0o777, 1, 0, 0, target.as_bytes())
    }

    /// Adds a character device node.
    pub fn char_dev(
        &mut self,
        path: &str,
        perm: u32,
        major: u32,
        minor: u32,
    ) -> Result<(), TooLarge> {
        self.entry(path, S_IFCHR | (perm & 0o7777), 1, major, minor, &[])
    }

    /// Writes the trailer and returns the archive, padded to a whole block.
    pub fn finish(mut self) -> Vec<u8> {
        // The trailer's name and empty body always fit.
        let _ = self.entry(TRAILER, 0, 1, 0, 0, &[]);
        let padded = self.buf.len().div_ceil(BLOCK) * BLOCK;
        self.buf.resize(padded, 0);
        self.buf
    }

    fn entry(
        &mut self,
        name: &str,
        mode: u32,
        nlink: u32,
        rmajor: u32,
        rminor: u32,
        data: &[u8],
    ) -> Result<(), TooLarge> {
        let too_large = |len| TooLarge {
            name: name.to_owned(),
            len,
        };
        let filesize = u32::try_from(data.len()).map_err(|_| too_large(data.len()))?;
        let namesize = u32::try_from(name.len() + 1).map_err(|_| too_large(name.len()))?;
        let ino = if name == TRAILER { 0 } else { self.next_ino };
        self.next_ino = self.next_ino.wrapping_add(1);
        let fields = [
            ino, mode, 0, 0, nlink, 0, filesize, 0, 0, rmajor, rminor, namesize, 0,
        ];
        self.buf.extend_from_slice(MAGIC);
        for field in fields {
            self.buf
                .extend_from_slice(format!("{field:08X}").as_bytes());
        }
        self.buf.extend_from_slice(name.as_bytes());
        self.buf.push(0);
        self.pad4();
        self.buf.extend_from_slice(data);
        self.pad4();
        Ok(())
    }

    fn pad4(&mut self) {
        let padded = self.buf.len().next_multiple_of(4);
        self.buf.resize(padded, 0);
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// One parsed member, as the kernel's unpacker would see it.
    #[derive(Debug, Clone, PartialEq)]
    pub(crate) struct Member {
        pub name: String,
        pub mode: u32,
        pub nlink: u32,
        pub rdev: (u32, u32),
        pub data: Vec<u8>,
        pub offset: usize,
    }

    /// Parses newc archives (possibly concatenated, with zero padding between) the way the kernel
    /// does, failing on anything it would reject: bad magic, misaligned headers, truncation.
    pub(crate) fn parse(mut buf: &[u8]) -> Result<Vec<Member>, String> {
        let total = buf.len();
        let mut out = Vec::new();
        loop {
            while let Some(0) = buf.first() {
                buf = &buf[1..];
            }
            if buf.is_empty() {
                return Ok(out);
            }
            let offset = total - buf.len();
            if offset % 4 != 0 {
                return Err(format!("header at {offset} is not 4-aligned"));
            }
            if buf.len() < HEADER_LEN || &buf[..6] != MAGIC {
                return Err(format!("bad magic at {offset}"));
            }
            let field = |i: usize| -> Result<u32, String> {
                let s =
                    std::str::from_utf8(&buf[6 + i * 8..14 + i * 8]).map_err(|e| e.to_string())?;
                u32::from_str_radix(s, 16).map_err(|e| e.to_string())
            };
            let (mode, nlink, size) = (field(1)?, field(4)?, field(6)? as usize);
            let rdev = (field(9)?, field(10)?);
            let namesize = field(11)? as usize;
            let name_end = HEADER_LEN + namesize;
            let data_start = name_end.next_multiple_of(4);
            let data_end = data_start + size;
            if buf.len() < data_end {
                return Err(format!("member at {offset} is truncated"));
            }
            if buf[name_end - 1] != 0 {
                return Err(format!("name at {offset} is not NUL-terminated"));
            }
            let name = String::from_utf8(buf[HEADER_LEN..name_end - 1].to_vec())
                .map_err(|e| e.to_string())?;
            let data = buf[data_start..data_end].to_vec();
            buf = &buf[data_end.next_multiple_of(4).min(buf.len())..];
            out.push(Member {
                name,
                mode,
                nlink,
                rdev,
                data,
                offset,
            });
        }
    }

    #[test]
    fn round_trip_every_kind() {
        let mut w = CpioWriter::new();
        w.dir("bin", 0o755).unwrap();
        w.file("bin/busybox", 0o755, b"\x7fELF-ish").unwrap();
        w.symlink("bin/sh", "busybox").unwrap();
        w.char_dev("dev/console", 0o600, 5, 1).unwrap();
        w.file("empty", 0o644, b"").unwrap();
        w.file("odd", 0o600, b"abc").unwrap();
        let archive = w.finish();

        assert_eq!(archive.len() % BLOCK, 0);
        let members = parse(&archive).unwrap();
        let names: Vec<_> = members.iter().map(|m| m.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "bin",
                "bin/busybox",
                "bin/sh",
                "dev/console",
                "empty",
                "odd",
                TRAILER
            ]
        );
        assert_eq!(members[0].mode, S_IFDIR | 0o755);
        assert_eq!(members[1].data, b"\x7fELF-ish");
        assert_eq!(members[1].mode, S_IFREG | 0o755);
        assert_eq!(members[2].mode, S_IFLNK | 0o777);
        assert_eq!(members[2].data, b"busybox");
        assert_eq!(members[3].mode, S_IFCHR | 0o600);
        assert_eq!(members[3].rdev, (5, 1));
        assert!(members[4].data.is_empty());
        assert_eq!(members[5].data, b"abc");
        assert!(members.iter().all(|m| m.offset % 4 == 0));
        assert!(members.iter().all(|m| m.nlink >= 1));
    }

    #[test]
    fn trailer_is_last_and_archive_is_deterministic() {
        let build = || {
            let mut w = CpioWriter::new();
            w.file("init", 0o755, b"#!/bin/sh\n").unwrap();
            w.finish()
        };
        let a = build();
        assert_eq!(a, build());
        let members = parse(&a).unwrap();
        assert_eq!(members.last().map(|m| m.name.as_str()), Some(TRAILER));
        assert_eq!(members.iter().filter(|m| m.name == TRAILER).count(), 1);
    }

    #[test]
    fn names_of_every_length_stay_aligned() {
        // newc pads header+name to 4; cover each residue of the name length.
        let mut w = CpioWriter::new();
        for len in 1..=8 {
            let name = "n".repeat(len);
            w.file(&name, 0o644, &vec![b'x'; len]).unwrap();
        }
        let members = parse(&w.finish()).unwrap();
        for (len, m) in (1..=8).zip(&members) {
            assert_eq!(m.name.len(), len);
            assert_eq!(m.data.len(), len);
            assert_eq!(m.offset % 4, 0);
        }
    }

    #[test]
    fn concatenated_archives_parse_as_one() {
        let mut a = CpioWriter::new();
        a.file("init", 0o755, b"base").unwrap();
        let mut b = CpioWriter::new();
        b.file("test.sh", 0o755, b"script").unwrap();
        let mut both = a.finish();
        both.extend(b.finish());
        let names: Vec<_> = parse(&both).unwrap().into_iter().map(|m| m.name).collect();
        assert_eq!(names, ["init", TRAILER, "test.sh", TRAILER]);
    }
}
