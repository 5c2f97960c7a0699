//! Kernel workspaces kept between calls.
//!
//! A model calls the same op with the same shapes every step. A fresh zeroed workspace per
//! call costs a `memset` (glibc's `calloc` clears reused heap memory) or page faults (fresh
//! mappings); for Multi-SK at the SSPC size that was about 3% of a call. So a finished call
//! leaves its workspace here for the next one: the [`MAX_SPARE`] latest, and only small ones (at
//! most [`MAX_BYTES`]), so that a one-off huge call does not pin its memory.
//!
//! The lock is only ever tried, never waited on: a busy list (or one that a thread held when
//! the process forked) just means a fresh workspace.

use std::any::Any;
use std::ops::{Deref, DerefMut};
use std::sync::Mutex;

const MAX_SPARE: usize = 4;
const MAX_BYTES: usize = 16 << 20;

static SPARE: Mutex<Vec<Box<dyn Any + Send>>> = Mutex::new(Vec::new());

/// The heap memory a workspace holds.
pub(crate) trait Footprint {
    fn bytes(&self) -> usize;
}

/// A workspace taken from the spares (or new), returned to them when dropped.
pub(crate) struct Spare<W: Footprint + Default + Send + 'static>(Option<W>);

impl<W: Footprint + Default + Send + 'static> Spare<W> {
    pub(crate) fn take() -> Self {
        let found = SPARE.try_lock().ok().and_then(|mut spare| {
            let at = spare.iter().position(|w| w.is::<W>())?;
            Some(spare.swap_remove(at))
        });
        let workspace = found.and_then(|w| w.downcast::<W>().ok());
        Spare(Some(workspace.map_or_else(W::default, |w| *w)))
    }
}

impl<W: Footprint + Default + Send + 'static> Drop for Spare<W> {
    fn drop(&mut self) {
        let Some(workspace) = self.0.take() else {
            return;
        };
        if workspace.bytes() > MAX_BYTES {
            return;
        }
        if let Ok(mut spare) = SPARE.try_lock() {
            if spare.len() == MAX_SPARE {
                spare.remove(0); // the oldest: the ops a model calls now come back soonest
            }
            spare.push(Box::new(workspace));
        }
    }
}

impl<W: Footprint + Default + Send + 'static> Deref for Spare<W> {
    type Target = W;
    fn deref(&self) -> &W {
        self.0.as_ref().expect("present until dropped")
    }
}

impl<W: Footprint + Default + Send + 'static> DerefMut for Spare<W> {
    fn deref_mut(&mut self) -> &mut W {
        self.0.as_mut().expect("present until dropped")
    }
}

/// The bytes a vector's allocation holds.
pub(crate) fn vec_bytes<T>(v: &Vec<T>) -> usize {
    v.capacity() * std::mem::size_of::<T>()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Default)]
    struct Small {
        data: Vec<u8>,
    }
    impl Footprint for Small {
        fn bytes(&self) -> usize {
            vec_bytes(&self.data)
        }
    }

    #[derive(Default)]
    struct Other {
        data: Vec<u16>,
    }
    impl Footprint for Other {
        fn bytes(&self) -> usize {
            vec_bytes(&self.data)
        }
    }

    #[test]
    fn returned_workspaces_are_reused_by_type_and_large_ones_are_not_kept() {
        // One test, so that no other test in this binary touches the list meanwhile.
        {
            let mut a = Spare::<Small>::take();
            a.data = vec![7; 100];
        }
        assert!(
            Spare::<Other>::take().data.is_empty(),
            "a spare of another type was handed out"
        );
        let reused = Spare::<Small>::take();
        assert_eq!(
            reused.data,
            vec![7; 100],
            "the returned workspace was not reused"
        );
        drop(reused);
        {
            let mut big = Spare::<Small>::take();
            big.data = vec![1; MAX_BYTES + 1];
        }
        assert!(
            Spare::<Small>::take().data.is_empty(),
            "a workspace over MAX_BYTES was kept"
        );
    }
}
