//! SIGINT and SIGTERM end the VM cleanly: they are blocked in every thread (call
//! [`block_stop_signals`] first thing in `main`, before any thread starts) and collected by one
//! watcher thread that turns them into an [`Event::Signal`] for the run loop.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::Sender;
use std::sync::Arc;
use std::thread::JoinHandle;

use crate::vcpu::Event;

fn stop_set() -> libc::sigset_t {
    // SAFETY: sigemptyset/sigaddset initialise and fill the set we own.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGTERM);
        set
    }
}

/// Blocks SIGINT and SIGTERM in the calling thread and every thread it starts afterwards.
pub fn block_stop_signals() {
    let set = stop_set();
    // SAFETY: changes only this thread's mask; the set is initialised.
    unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
}

/// The name of a stop signal.
pub fn name(sig: i32) -> &'static str {
    match sig {
        libc::SIGINT => "SIGINT",
        libc::SIGTERM => "SIGTERM",
        _ => "a signal",
    }
}

/// The watcher thread.
#[derive(Debug)]
pub struct SignalWatch {
    done: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl SignalWatch {
    /// Starts watching; each stop signal becomes one event on `events`.
    pub fn start(events: Sender<Event>) -> Self {
        let done = Arc::new(AtomicBool::new(false));
        let flag = done.clone();
        let thread = std::thread::Builder::new()
            .name("signals".into())
            .spawn(move || {
                let set = stop_set();
                let timeout = libc::timespec {
                    tv_sec: 0,
                    tv_nsec: 100_000_000,
                };
                while !flag.load(Ordering::Acquire) {
                    // SAFETY: waits on an initialised set with a bounded timeout; no siginfo.
                    let sig = unsafe { libc::sigtimedwait(&set, std::ptr::null_mut(), &timeout) };
                    if sig > 0 && events.send(Event::Signal(sig)).is_err() {
                        break;
                    }
                }
            })
            .ok();
        Self { done, thread }
    }

    /// Stops watching (signals stay blocked, so a late one is simply dropped at exit).
    pub fn finish(mut self) {
        self.done.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
