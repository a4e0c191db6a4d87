//! The guest's session kept for a successor (`--state-file`): the share's
//! side of [`crate::ledger`]. Open files are recorded as they are made and
//! dropped as they are released; after a restart, a handle the guest still
//! holds is opened again from its record when it first comes up, and what
//! INIT agreed is restored without an INIT.

use std::fs::File;
use std::io;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use super::{err, open_dir, Handle, Inode, OpenFile, ShareFs};
use crate::ledger::{HandleRecord, Ledger, Resumed};

/// What INIT agreed, as the ledger keeps it for a daemon that resumes the
/// session (which sees no INIT).
const AGREED_WRITEBACK: u64 = 1;
const AGREED_SUBMOUNTS: u64 = 2;
const AGREED_NO_OPENDIR: u64 = 4;
const AGREED_ACL: u64 = 8;
const AGREED_SETXATTR_EXT: u64 = 16;

impl ShareFs {
    /// Keep the guest's session in `ledger` (before `import`).
    pub fn attach_ledger(&mut self, ledger: Arc<Ledger>, resumed: Option<&Resumed>) {
        self.store
            .set_ledger(ledger.clone(), resumed.map_or(0, |r| r.next_id));
        if let Some(r) = resumed {
            self.next_handle.store(r.next_fh.max(1), Ordering::Relaxed);
        }
        self.ledger = Some(ledger);
    }

    /// Take up the session a previous daemon left (after `import`): what
    /// INIT agreed then holds now. False (and the session dropped) where the
    /// share is no longer the directory that session had.
    pub fn resume(&self, r: &Resumed) -> bool {
        if self.store.root_key() != Some(r.root) {
            if let Some(l) = &self.ledger {
                l.end();
            }
            return false;
        }
        self.writeback
            .store(r.agreed & AGREED_WRITEBACK != 0, Ordering::Relaxed);
        self.submounts
            .store(r.agreed & AGREED_SUBMOUNTS != 0, Ordering::Relaxed);
        self.no_opendir
            .store(r.agreed & AGREED_NO_OPENDIR != 0, Ordering::Relaxed);
        self.acl
            .store(r.agreed & AGREED_ACL != 0, Ordering::Relaxed);
        self.setxattr_ext
            .store(r.agreed & AGREED_SETXATTR_EXT != 0, Ordering::Relaxed);
        true
    }

    pub(super) fn agreed(&self) -> u64 {
        let mut a = 0;
        for (on, bit) in [
            (&self.writeback, AGREED_WRITEBACK),
            (&self.submounts, AGREED_SUBMOUNTS),
            (&self.no_opendir, AGREED_NO_OPENDIR),
            (&self.acl, AGREED_ACL),
            (&self.setxattr_ext, AGREED_SETXATTR_EXT),
        ] {
            if on.load(Ordering::Relaxed) {
                a |= bit;
            }
        }
        a
    }

    /// A new file handle for `file`, opened with `flags` (None: a
    /// directory, opened when first used).
    pub(super) fn add_handle(
        &self,
        inode: Inode,
        file: Option<File>,
        flags: libc::c_int,
    ) -> Handle {
        let h = self.next_handle.fetch_add(1, Ordering::Relaxed);
        let slot = match &self.ledger {
            Some(l) => {
                l.note_next_fh(h + 1);
                l.add_handle(HandleRecord {
                    fh: h,
                    node: inode,
                    flags,
                })
                .unwrap_or(u32::MAX)
            }
            None => u32::MAX,
        };
        self.handles
            .write()
            .unwrap()
            .insert(h, Arc::new(OpenFile::new(inode, file, slot)));
        h
    }

    /// The open file behind `handle`, its host descriptor opened.
    pub(super) fn handle(&self, inode: Inode, handle: Handle) -> io::Result<Arc<OpenFile>> {
        let open = self.lookup_handle(inode, handle)?;
        if open.file.get().is_none() {
            // Two threads may race here; the loser's descriptor is closed.
            let _ = open.file.set(self.open_dir_node(inode)?);
        }
        Ok(open)
    }

    /// The open file behind `handle`, as it is (a directory's descriptor
    /// may not be open yet).
    pub(super) fn lookup_handle(&self, inode: Inode, handle: Handle) -> io::Result<Arc<OpenFile>> {
        match self.handles.read().unwrap().get(&handle) {
            Some(f) if f.inode == inode => return Ok(f.clone()),
            Some(_) => return Err(err(libc::EBADF)),
            None => {}
        }
        self.restore_handle(inode, handle)
    }

    /// An open file the previous daemon left, opened again as it was (less
    /// what only applies at creation).
    pub(super) fn restore_handle(&self, inode: Inode, handle: Handle) -> io::Result<Arc<OpenFile>> {
        let ledger = self.ledger.as_ref().ok_or_else(|| err(libc::EBADF))?;
        let _one = self.restoring.lock().unwrap();
        if let Some(f) = self.handles.read().unwrap().get(&handle) {
            return if f.inode == inode {
                Ok(f.clone())
            } else {
                Err(err(libc::EBADF))
            };
        }
        let (slot, r) = ledger
            .take_left_handle(handle)
            .ok_or_else(|| err(libc::EBADF))?;
        let flags = r.flags & !(libc::O_CREAT | libc::O_EXCL | libc::O_TRUNC | libc::O_NOCTTY);
        let file = self.node_fd(r.node).and_then(|(node, fd)| {
            if node.is_dir() {
                open_dir(&fd)
            } else {
                self.reopen(&fd, flags)
            }
        });
        let file = match file {
            Ok(f) => f,
            Err(e) => {
                ledger.drop_handle(slot);
                return Err(e);
            }
        };
        let f = Arc::new(OpenFile::new(r.node, Some(file), slot));
        self.handles.write().unwrap().insert(handle, f.clone());
        if f.inode != inode {
            return Err(err(libc::EBADF));
        }
        Ok(f)
    }
}
