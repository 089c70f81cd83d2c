//! The one thread that generates, and the bounded FIFO queue in front of it.
//!
//! Generation is synchronous CPU work that saturates the machine, so running
//! two at once would only make both slower; one dedicated OS thread runs
//! them in arrival order. The queue is a `std::sync::mpsc::sync_channel`:
//! FIFO by construction, bounded (a full queue is refused at once, which the
//! handlers turn into 429), and never blocking the async runtime. Events flow
//! back through a tokio channel per request; when the client goes away its
//! receiver is dropped, the next send fails, and the generation is cancelled
//! through the backend's callback. A request's halt flag ends its
//! generation the same way, without dropping the stream, when the server
//! knows the reply is complete (the one tool call allowed).

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::{sync_channel, SyncSender, TrySendError};
use std::sync::Arc;

use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver, UnboundedSender};

use super::backend::{Backend, BackendError, Completion, Delta, Finish, GenParams, Logprob};
use super::metrics::Metrics;

/// What the worker sends back for one request.
#[derive(Debug)]
pub enum Event {
    /// The request left the queue and generation began.
    Started,
    /// Generated text.
    Delta(String),
    /// The next token's log-probability (only when the request asked).
    Logprob(Logprob),
    /// The end, with usage and finish reason, or the backend's error.
    Done(Result<Completion, BackendError>),
}

struct Job {
    prompt: Vec<u32>,
    params: GenParams,
    events: UnboundedSender<Event>,
    halt: Arc<AtomicBool>,
}

/// Handle to the worker; cheap to clone.
#[derive(Clone)]
pub struct Worker {
    queue: SyncSender<Job>,
    /// Requests waiting (not counting the one generating).
    waiting: Arc<AtomicUsize>,
}

/// The queue is full; the client should retry later.
#[derive(Debug)]
pub struct QueueFull;

impl Worker {
    /// Starts the worker thread. `max_queue` requests may wait while one
    /// generates; more are refused.
    pub fn start(
        backend: Arc<dyn Backend>,
        max_queue: usize,
        metrics: Arc<Metrics>,
    ) -> std::io::Result<Self> {
        let (queue, jobs) = sync_channel::<Job>(max_queue);
        let waiting = Arc::new(AtomicUsize::new(0));
        let waiting_w = waiting.clone();
        std::thread::Builder::new()
            .name("mfx-generate".into())
            .spawn(move || {
                // Ends when every `Worker` handle (and so the sender) is dropped.
                for job in jobs {
                    waiting_w.fetch_sub(1, Ordering::SeqCst);
                    // On a compute worker, so the pool's threads are the only
                    // ones running (see `kernels::on_workers`).
                    crate::kernels::on_workers(|| run_job(&*backend, job, &metrics));
                }
            })?;
        Ok(Self { queue, waiting })
    }

    /// Queues a generation; events arrive on the returned receiver.
    /// Setting the returned flag stops the generation at the next token,
    /// which then ends with [`Finish::Halted`].
    pub fn submit(
        &self,
        prompt: Vec<u32>,
        params: GenParams,
    ) -> Result<(UnboundedReceiver<Event>, Arc<AtomicBool>), QueueFull> {
        let (tx, rx) = unbounded_channel();
        let halt = Arc::new(AtomicBool::new(false));
        // Count before sending so the worker's decrement never underflows.
        self.waiting.fetch_add(1, Ordering::SeqCst);
        match self.queue.try_send(Job {
            prompt,
            params,
            events: tx,
            halt: halt.clone(),
        }) {
            Ok(()) => Ok((rx, halt)),
            Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => {
                self.waiting.fetch_sub(1, Ordering::SeqCst);
                Err(QueueFull)
            }
        }
    }

    /// Requests waiting in the queue now.
    pub fn queue_depth(&self) -> usize {
        self.waiting.load(Ordering::SeqCst)
    }
}

fn run_job(backend: &dyn Backend, job: Job, metrics: &Metrics) {
    // A client that left while queued costs nothing more.
    if job.events.is_closed() {
        metrics.add_cancelled();
        return;
    }
    if job.events.send(Event::Started).is_err() {
        metrics.add_cancelled();
        return;
    }
    metrics.set_busy(true);
    let events = &job.events;
    let halt = &job.halt;
    let mut on_delta = |d: Delta<'_>| {
        let ev = match d {
            Delta::Text(t) => Event::Delta(t.to_owned()),
            Delta::Logprob(lp) => Event::Logprob(lp),
        };
        !halt.load(Ordering::Relaxed) && events.send(ev).is_ok()
    };
    // A panic in the engine must not take the server down with it: report
    // it as an internal error and keep serving.
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        backend.generate(&job.prompt, &job.params, &mut on_delta)
    }))
    .unwrap_or_else(|panic| {
        let msg = panic
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| panic.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "unknown panic".into());
        Err(BackendError::Internal(format!(
            "generation panicked: {msg}"
        )))
    });
    metrics.set_busy(false);
    let mut result = result;
    if let Ok(c) = &mut result {
        if c.finish == Finish::Cancelled && job.halt.load(Ordering::Relaxed) {
            c.finish = Finish::Halted;
        }
        metrics.record_completion(c);
    }
    // The client may be gone; nothing to do about it then.
    let _ = job.events.send(Event::Done(result));
}
