//! The extension's own rayon pool.
//!
//! A dedicated pool (not rayon's global one) so that the size follows `num_threads` from
//! Python (`MMOT_NUM_THREADS` / `torch.get_num_threads()`), and so that it can be replaced after
//! `fork`: a forked child (e.g. a DataLoader worker) inherits the pool object but none of its
//! threads, and using it would hang. The pid is stored with the pool and checked on every call.

use pyo3::exceptions::PyRuntimeError;
use pyo3::PyResult;
use rayon::{ThreadPool, ThreadPoolBuilder};
use std::sync::{Arc, Mutex};

type Slot = Option<(u32, usize, Arc<ThreadPool>)>;

static POOL: Mutex<Slot> = Mutex::new(None);

/// The pool for `num_threads` threads (`<= 0` means all available cores).
pub fn get(num_threads: i64) -> PyResult<Arc<ThreadPool>> {
    let n = if num_threads > 0 {
        num_threads as usize
    } else {
        std::thread::available_parallelism().map_or(1, |n| n.get())
    };
    let pid = std::process::id();
    let mut slot = POOL.lock().unwrap_or_else(|e| e.into_inner());
    if let Some((p, t, pool)) = slot.as_ref() {
        if *p == pid && *t == n {
            return Ok(pool.clone());
        }
    }
    if let Some((p, _, old)) = slot.take() {
        if p != pid {
            // Inherited across fork: its worker threads do not exist here, and dropping it
            // would signal them through state that a parent thread may have held locked at
            // fork time. Leak it instead.
            std::mem::forget(old);
        }
    }
    let pool = ThreadPoolBuilder::new()
        .num_threads(n)
        .thread_name(|i| format!("mmot-{i}"))
        .build()
        .map_err(|e| {
            PyRuntimeError::new_err(format!("could not start the mmot thread pool: {e}"))
        })?;
    let pool = Arc::new(pool);
    *slot = Some((pid, n, pool.clone()));
    Ok(pool)
}
