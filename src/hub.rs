//! The WebSocket hub: fans each channel's messages out to its live subscribers.
//!
//! Why a broadcast channel per workflow channel: every subscriber gets every message, and a
//! slow or closed socket only ever lags its own receiver; the publisher never waits. The
//! durable history lives in the store, so a late or lagging subscriber catches up from there.

use std::collections::HashMap;
use std::sync::Mutex;

use tokio::sync::broadcast;

/// One published message: its index in the channel's history, the JSON text, and whether it
/// is the channel's final message.
#[derive(Debug, Clone)]
pub struct Published {
    pub seq: usize,
    /// Shared by every subscriber's send (a copy each would multiply a large AI answer by
    /// the subscribers waiting for it).
    pub text: axum::extract::ws::Utf8Bytes,
    pub last: bool,
}

#[derive(Default)]
pub struct Hub {
    channels: Mutex<HashMap<String, broadcast::Sender<Published>>>,
    /// Open subscriptions (each taken by [`Hub::subscribe`], given back by
    /// [`Hub::release`]); a finished channel leaves the map while its last subscribers
    /// still send out its final message.
    open: std::sync::atomic::AtomicUsize,
}

impl Hub {
    /// Subscribes to a channel's future messages unless it has `max` subscribers already.
    pub fn subscribe_within(
        &self,
        channel: &str,
        max: usize,
    ) -> Option<broadcast::Receiver<Published>> {
        let mut map = self.channels.lock().expect("hub lock");
        let tx = map
            .entry(channel.to_string())
            .or_insert_with(|| broadcast::channel(64).0);
        if tx.receiver_count() >= max {
            return None;
        }
        self.open.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Some(tx.subscribe())
    }

    /// Publishes a message to whoever is subscribed now.
    pub fn publish(&self, channel: &str, msg: Published) {
        let mut map = self.channels.lock().expect("hub lock");
        let last = msg.last;
        if let Some(tx) = map.get(channel) {
            let _ = tx.send(msg);
        }
        if last {
            map.remove(channel);
        }
    }

    /// Gives back a subscription (its receiver already dropped), forgetting the channel if
    /// nobody listens to it any more.
    pub fn release(&self, channel: &str) {
        self.open.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
        let mut map = self.channels.lock().expect("hub lock");
        if map.get(channel).is_some_and(|tx| tx.receiver_count() == 0) {
            map.remove(channel);
        }
    }

    /// Open subscriptions, over every channel (for metrics).
    pub fn subscribers(&self) -> usize {
        self.open.load(std::sync::atomic::Ordering::Relaxed)
    }
}
