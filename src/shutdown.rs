//! One shutdown signal shared by every task that must stop together (the gateway's two listeners,
//! the demo's sandbox and gateway): one future in, any number of clones out, each resolving once
//! the original does (mini-redis' `Shutdown`).

use std::future::Future;

use tokio::sync::watch;

/// A clonable "stop now" signal; see the module docs.
#[derive(Clone, Debug)]
pub struct Shutdown {
    stopped: watch::Receiver<bool>,
}

impl Shutdown {
    /// Fires when `signal` resolves (Ctrl-C, SIGTERM, a test's oneshot). The signal is awaited
    /// in a task of its own, so it fires even when no clone is being awaited yet.
    pub fn on(signal: impl Future<Output = ()> + Send + 'static) -> Shutdown {
        let (stop, stopped) = watch::channel(false);
        tokio::spawn(async move {
            signal.await;
            let _ = stop.send(true);
        });
        Shutdown { stopped }
    }

    /// Resolves once the signal has fired (at once if it already has).
    pub fn wait(&self) -> impl Future<Output = ()> + Send + 'static {
        let mut stopped = self.stopped.clone();
        async move {
            // An error means the sender is gone without firing: the signal can never come.
            if stopped.wait_for(|stop| *stop).await.is_err() {
                std::future::pending::<()>().await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn every_clone_fires_once_the_signal_does() {
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let shutdown = Shutdown::on(async move {
            let _ = rx.await;
        });
        let early = shutdown.wait();
        let other = shutdown.clone();
        let before = tokio::time::timeout(std::time::Duration::from_millis(20), other.wait()).await;
        assert!(before.is_err(), "fired before the signal");
        tx.send(()).unwrap();
        tokio::time::timeout(std::time::Duration::from_secs(5), early)
            .await
            .expect("the first waiter is released");
        tokio::time::timeout(std::time::Duration::from_secs(5), other.wait())
            .await
            .expect("a waiter that starts after the signal is released at once");
    }
}
