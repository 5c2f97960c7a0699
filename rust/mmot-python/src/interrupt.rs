//! Ctrl-C during a kernel.
//!
//! Python runs signal handlers only on its main thread, and only when that thread runs Python
//! code. So the calling thread does not block in the pool: it hands the kernel to the pool and
//! waits for it in slices of [`POLL`], asking Python between slices to run pending handlers
//! (which does nothing off the main thread). If a handler raises (KeyboardInterrupt for
//! SIGINT), the kernel is asked to stop through `mmot_core::interrupt`, which it does within
//! an iteration; once it has returned, the handler's exception is raised. The pool is left as
//! it was: the kernel finished normally, only early.

use mmot_core::interrupt::watch;
use pyo3::prelude::*;
use rayon::ThreadPool;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

/// How often a waiting call checks for signals: well under the half second a user notices.
const POLL: Duration = Duration::from_millis(50);

/// Runs `kernel` on `pool` with the GIL released, stopping it early if a signal handler raises.
pub fn run<R: Send>(
    py: Python<'_>,
    pool: &ThreadPool,
    kernel: impl FnOnce() -> mmot_core::Result<R> + Send,
) -> PyResult<mmot_core::Result<R>> {
    let stop = Arc::new(AtomicBool::new(false));
    let done = (Mutex::new(None), Condvar::new());
    let (result, raised) = py.detach(|| {
        pool.in_place_scope(|scope| {
            scope.spawn(|_| {
                let result = watch(&stop, kernel);
                *lock(&done.0) = Some(result);
                done.1.notify_one();
            });
            let mut raised = None;
            let mut slot = lock(&done.0);
            loop {
                if let Some(result) = slot.take() {
                    return (result, raised);
                }
                slot = done
                    .1
                    .wait_timeout(slot, POLL)
                    .map_or_else(|e| e.into_inner().0, |r| r.0);
                if slot.is_none() && raised.is_none() {
                    drop(slot);
                    if let Err(e) = Python::attach(|py| py.check_signals()) {
                        stop.store(true, Ordering::Relaxed);
                        raised = Some(e);
                    }
                    slot = lock(&done.0);
                }
            }
        })
    });
    match raised {
        Some(e) => Err(e),
        None => Ok(result),
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}
