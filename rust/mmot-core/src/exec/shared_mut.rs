//! A raw output pointer that the tasks of a wavefront share.

/// A raw pointer that parallel tasks share. Callers keep the contract: within one wavefront
/// step each task writes only rows (or blocks) no other task of that step touches, and steps
/// are separated by joins.
#[derive(Clone, Copy)]
pub(crate) struct SharedMut<T>(pub(crate) *mut T);
// SAFETY: sound only under the contract above, which every user states at its call site.
unsafe impl<T> Send for SharedMut<T> {}
unsafe impl<T> Sync for SharedMut<T> {}

impl<T> SharedMut<T> {
    /// A method, so that closures capture the whole wrapper and not the bare pointer field.
    pub(crate) fn at(self, offset: usize) -> *mut T {
        self.0.wrapping_add(offset)
    }
}
