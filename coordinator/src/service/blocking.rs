//! Core calls off the async runtime. The core keeps the scheduler and the store behind one std
//! mutex and commits to SQLite before it answers, so a call may wait for a commit's fsync, or
//! for another call's. Handlers make every such call through [`blocking`] (or [`off_runtime`]),
//! on tokio's blocking pool: a slow disk then holds up the callers that need the core, never the
//! runtime's worker threads, and with them every other connection, stream and timer.

use std::sync::Arc;

use tonic::Status;

use super::status;
use crate::core::{Core, CoreError};

/// Runs `call` on the core on the blocking pool; a core error becomes its gRPC status
/// ([`status`]).
pub async fn blocking<T: Send + 'static>(
    core: &Arc<Core>,
    call: impl FnOnce(&Core) -> Result<T, CoreError> + Send + 'static,
) -> Result<T, Status> {
    off_runtime(core, call).await?.map_err(status)
}

/// Runs `call` on the core on the blocking pool and hands back what it returns (for a handler
/// that answers some core errors itself). A call that panicked is INTERNAL: the one place a
/// failed blocking task is mapped.
pub async fn off_runtime<R: Send + 'static>(core: &Arc<Core>, call: impl FnOnce(&Core) -> R + Send + 'static) -> Result<R, Status> {
    let core = core.clone();
    tokio::task::spawn_blocking(move || call(&core)).await.map_err(|error| {
        tracing::error!(%error, "a core call failed");
        Status::internal(format!("the coordinator failed to run the call: {error}"))
    })
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::time::Duration;

    use cohort_proto::v1 as pb;
    use cohort_proto::v1::client_service_server::ClientService;
    use tonic::Request;

    use super::*;
    use crate::core::tests::open_with_dataset;
    use crate::service::client::ClientApi;

    /// The helper runs the call on another thread than the runtime's.
    #[test]
    fn calls_run_off_the_runtime_thread() {
        let dir = tempfile::tempdir().unwrap();
        let core = Arc::new(open_with_dataset(dir.path()).0);
        let runtime = tokio::runtime::Builder::new_current_thread().build().unwrap();
        let runtime_thread = std::thread::current().id();
        let call_thread = runtime.block_on(off_runtime(&core, |_| std::thread::current().id())).unwrap();
        assert_ne!(call_thread, runtime_thread);
    }

    /// While a slow commit holds the core (here a read that sleeps under the lock), a handler
    /// that needs the core waits for it off the runtime: on a runtime with a single thread,
    /// another task still runs meanwhile. (Were the handler to wait on the runtime's thread, the
    /// other task could only run once the lock was free.)
    #[test]
    fn a_handler_waiting_for_the_core_leaves_the_runtime_free() {
        let dir = tempfile::tempdir().unwrap();
        let core = Arc::new(open_with_dataset(dir.path()).0);
        let progressed = Arc::new(AtomicBool::new(false));
        let (locked, is_locked) = std::sync::mpsc::channel();
        let holder = std::thread::spawn({
            let (core, progressed) = (core.clone(), progressed.clone());
            move || {
                core.read(move |_| {
                    locked.send(()).unwrap();
                    std::thread::sleep(Duration::from_millis(600));
                    Ok(progressed.load(Ordering::SeqCst))
                })
                .unwrap()
            }
        });
        is_locked.recv().unwrap();
        let runtime = tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap();
        runtime.block_on(async {
            let api = ClientApi::new(core.clone());
            let listing = tokio::spawn(async move { api.list_sweeps(Request::new(pb::ListSweepsRequest {})).await });
            tokio::time::sleep(Duration::from_millis(50)).await;
            progressed.store(true, Ordering::SeqCst);
            let listed = listing.await.unwrap().unwrap().into_inner();
            assert!(listed.sweeps.is_empty());
        });
        assert!(holder.join().unwrap(), "the runtime ran another task while the handler waited for the core");
    }
}
