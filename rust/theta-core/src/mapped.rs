//! Read-only mappings of the file being added, safe against the file being cut short meanwhile.
//!
//! Hashing and encoding read the file straight from the page cache through a mapping, instead of
//! copying it into buffers with `pread`. Pages are released from the process's resident set as
//! each pass is done with them, so a large add's memory stays bounded. A read of a mapped page beyond the end of a file that was truncated after it was
//! mapped raises SIGBUS, which would kill the process. This module's SIGBUS handler replaces such
//! a page of one of its mappings with a page of zeros and notes it: the read then goes on, and the
//! caller, which checks [`Mapped::cut`] after its pass, reports the file as changed while being
//! added (nothing it computed from the zeros is kept). Any other SIGBUS goes to the handler that
//! was there before, or kills the process as it would have.
#![allow(unsafe_code)]

use std::fs::File;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Mutex;

/// Mappings that may be live at once (more fall back to `pread`).
const SLOTS: usize = 64;

struct Slot {
    busy: AtomicBool,
    start: AtomicUsize,
    end: AtomicUsize,
    cut: AtomicBool,
}

#[allow(clippy::declare_interior_mutable_const)]
const FREE: Slot = Slot {
    busy: AtomicBool::new(false),
    start: AtomicUsize::new(0),
    end: AtomicUsize::new(0),
    cut: AtomicBool::new(false),
};
static TABLE: [Slot; SLOTS] = [FREE; SLOTS];

/// The SIGBUS action found when ours was installed: handler address and flags (set once).
static PREVIOUS_HANDLER: AtomicUsize = AtomicUsize::new(libc::SIG_DFL);
static PREVIOUS_FLAGS: AtomicUsize = AtomicUsize::new(0);
static PAGE: AtomicUsize = AtomicUsize::new(4096);
static INSTALL: Mutex<()> = Mutex::new(());

/// `si_code` of a SIGBUS for an access to a page with nothing behind it (linux/asm-generic/siginfo.h).
const BUS_ADRERR: libc::c_int = 2;

extern "C" fn on_sigbus(sig: libc::c_int, info: *mut libc::siginfo_t, ctx: *mut libc::c_void) {
    // Only what is async-signal-safe: atomics, mmap, sigaction.
    unsafe {
        if !info.is_null() && (*info).si_code == BUS_ADRERR {
            let addr = (*info).si_addr() as usize;
            for s in &TABLE {
                let start = s.start.load(Ordering::Acquire);
                if start != 0 && addr >= start && addr < s.end.load(Ordering::Acquire) {
                    let page = PAGE.load(Ordering::Relaxed);
                    let at = addr & !(page - 1);
                    let r = libc::mmap(
                        at as *mut libc::c_void,
                        page,
                        libc::PROT_READ,
                        libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED,
                        -1,
                        0,
                    );
                    if r != libc::MAP_FAILED {
                        s.cut.store(true, Ordering::Release);
                        return; // the read is retried, and finds zeros
                    }
                }
            }
        }
        let previous = PREVIOUS_HANDLER.load(Ordering::Acquire);
        if previous == libc::SIG_DFL || previous == libc::SIG_IGN {
            // Back to the default action: the faulting read runs again and ends the process,
            // as it would have without us.
            let mut act: libc::sigaction = std::mem::zeroed();
            act.sa_sigaction = libc::SIG_DFL;
            libc::sigaction(sig, &act, std::ptr::null_mut());
        } else if PREVIOUS_FLAGS.load(Ordering::Acquire) & libc::SA_SIGINFO as usize != 0 {
            let f: extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut libc::c_void) =
                std::mem::transmute(previous);
            f(sig, info, ctx);
        } else {
            let f: extern "C" fn(libc::c_int) = std::mem::transmute(previous);
            f(sig);
        }
    }
}

/// Install our handler, once per process; then, whether it is still the one SIGBUS runs. If
/// another library has installed its own since, we do not install ours over it again (that one
/// may hand over to ours, and ours would hand back: a loop) and map nothing more: reads go
/// through `pread`.
fn ensure_handler() -> bool {
    static INSTALLED: AtomicBool = AtomicBool::new(false);
    let _guard = INSTALL.lock().unwrap_or_else(|e| e.into_inner());
    let ours = on_sigbus as *const () as usize;
    unsafe {
        let mut current: libc::sigaction = std::mem::zeroed();
        if libc::sigaction(libc::SIGBUS, std::ptr::null(), &mut current) != 0 {
            return false;
        }
        if INSTALLED.load(Ordering::Acquire) {
            return current.sa_sigaction == ours;
        }
        let page = libc::sysconf(libc::_SC_PAGESIZE);
        if page > 0 {
            PAGE.store(page as usize, Ordering::Relaxed);
        }
        PREVIOUS_FLAGS.store(current.sa_flags as usize, Ordering::Release);
        PREVIOUS_HANDLER.store(current.sa_sigaction, Ordering::Release);
        let mut act: libc::sigaction = std::mem::zeroed();
        act.sa_sigaction = ours;
        act.sa_flags = libc::SA_SIGINFO | libc::SA_ONSTACK | libc::SA_NODEFER;
        libc::sigemptyset(&mut act.sa_mask);
        let ok = libc::sigaction(libc::SIGBUS, &act, std::ptr::null_mut()) == 0;
        INSTALLED.store(ok, Ordering::Release);
        ok
    }
}

/// A read-only mapping of a whole file, registered with the SIGBUS handler while it lives.
pub struct Mapped {
    map: memmap2::Mmap,
    slot: usize,
}

impl Mapped {
    /// Map `file`, or `None` where that cannot be done safely (an empty file, a file system
    /// without mmap, no free slot, no handler): the caller then reads with `pread`.
    pub fn new(file: &File) -> Option<Mapped> {
        if file.metadata().ok()?.len() == 0 || !ensure_handler() {
            return None;
        }
        let slot = TABLE.iter().position(|s| {
            s.busy
                .compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
        })?;
        // Safety: the mapping is only read; a concurrent truncation is handled (module docs),
        // and other changes are caught by the caller's file stamp.
        let map = match unsafe { memmap2::Mmap::map(file) } {
            Ok(m) => m,
            Err(_) => {
                TABLE[slot].busy.store(false, Ordering::Release);
                return None;
            }
        };
        let s = &TABLE[slot];
        s.cut.store(false, Ordering::Release);
        s.end
            .store(map.as_ptr() as usize + map.len(), Ordering::Release);
        s.start.store(map.as_ptr() as usize, Ordering::Release);
        Some(Mapped { map, slot })
    }

    pub fn bytes(&self) -> &[u8] {
        &self.map
    }

    /// Done with `bytes()[start..end]`: its whole pages leave this process's resident set (they
    /// stay in the page cache). Mapped pages that were read count in the peak RSS, and a pass
    /// over a 2 GB file would otherwise hold all of it.
    pub fn release(&self, start: usize, end: usize) {
        let page = PAGE.load(Ordering::Relaxed);
        let base = self.map.as_ptr() as usize;
        let from = (base + start).next_multiple_of(page);
        let to = (base + end.min(self.map.len())) & !(page - 1);
        if from < to {
            // Safety: the range is inside the mapping, which is read-only: the pages are read
            // again from the file if they are touched after this.
            unsafe {
                libc::madvise(from as *mut libc::c_void, to - from, libc::MADV_DONTNEED);
            }
        }
    }

    /// Whether a read found a page cut off the file (it read zeros instead).
    pub fn cut(&self) -> bool {
        TABLE[self.slot].cut.load(Ordering::Acquire)
    }
}

impl Drop for Mapped {
    fn drop(&mut self) {
        let s = &TABLE[self.slot];
        s.start.store(0, Ordering::Release);
        s.end.store(0, Ordering::Release);
        s.busy.store(false, Ordering::Release);
        // The mapping (with any page of zeros put in it) is unmapped after this, by memmap2.
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn a_file_cut_short_reads_zeros_and_is_reported() {
        let mut f = tempfile::tempfile().unwrap();
        let data: Vec<u8> = (0..(1u32 << 20)).map(|i| (i % 251) as u8 + 1).collect();
        f.write_all(&data).unwrap();
        let m = Mapped::new(&f).unwrap();
        assert_eq!(&m.bytes()[..4096], &data[..4096]);
        assert!(!m.cut());
        f.set_len(8192).unwrap();
        // Beyond the new end: SIGBUS without the handler.
        let tail: u64 = m.bytes()[16384..].iter().map(|&b| b as u64).sum();
        assert_eq!(tail, 0);
        assert!(m.cut());
        assert_eq!(&m.bytes()[..8192], &data[..8192]);
        // Released pages read again from the file, cut or not.
        m.release(0, 1 << 20);
        assert_eq!(&m.bytes()[..8192], &data[..8192]);
        drop(m);
        // The slot is free again, and a new mapping starts clean.
        let m = Mapped::new(&f).unwrap();
        assert!(!m.cut());
        assert_eq!(m.bytes(), &data[..8192]);
    }

    #[test]
    fn an_empty_file_is_not_mapped() {
        let f = tempfile::tempfile().unwrap();
        assert!(Mapped::new(&f).is_none());
    }
}
