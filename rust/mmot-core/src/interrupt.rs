//! Stopping a long call early (Ctrl-C in Python).
//!
//! A caller that may want to stop a call runs it inside [`watch`] with a flag that another
//! thread can set. The Sinkhorn kernels read the flag once per iteration, `similarity` and
//! `info_nce` once per block of rows (one relaxed atomic load each); they stop once it is set
//! and return [`MmotError::Interrupted`]; their outputs are then
//! unspecified, and nothing else is left behind (workspaces are re-sized and re-filled by every
//! call). The flag reaches the kernels through the calling thread rather than the parameters,
//! so the public signatures and parameter structs stay as they are. A kernel takes it once, at
//! its start, on the thread [`watch`] runs on; its rayon workers read the copy it holds.

use crate::error::{MmotError, Result};
use std::cell::RefCell;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

thread_local! {
    static CURRENT: RefCell<Option<Arc<AtomicBool>>> = const { RefCell::new(None) };
}

/// Runs `f` with `flag` as the interrupt of every kernel it calls on this thread.
pub fn watch<R>(flag: &Arc<AtomicBool>, f: impl FnOnce() -> R) -> R {
    /// Puts back the interrupt in force before (a rayon worker blocked in one watched call can
    /// run another caller's job meanwhile), also when `f` panics.
    struct Restore(Option<Arc<AtomicBool>>);
    impl Drop for Restore {
        fn drop(&mut self) {
            let previous = self.0.take();
            CURRENT.with(|c| *c.borrow_mut() = previous);
        }
    }
    let _restore = Restore(CURRENT.with(|c| c.replace(Some(flag.clone()))));
    f()
}

/// A kernel's view of the interrupt in force when it started (none outside [`watch`]).
#[derive(Clone, Default)]
pub(crate) struct Interrupt(Option<Arc<AtomicBool>>);

impl Interrupt {
    pub(crate) fn current() -> Self {
        Interrupt(CURRENT.with(|c| c.borrow().clone()))
    }

    /// Whether the caller asked to stop.
    #[inline(always)]
    pub(crate) fn requested(&self) -> bool {
        self.0.as_ref().is_some_and(|f| f.load(Ordering::Relaxed))
    }

    /// [`MmotError::Interrupted`] if the caller asked to stop.
    pub(crate) fn check(&self) -> Result<()> {
        if self.requested() {
            Err(MmotError::Interrupted)
        } else {
            Ok(())
        }
    }
}
