//! Ingest: turns a producer's request into an event and its deliveries (one per target
//! endpoint), commits them, and only then answers.
//!
//! Why here and not in the HTTP handler: the rules (which endpoints, idempotency, ids) are the
//! product's, not the transport's; the API layer only parses and maps errors to statuses.

use std::sync::Arc;

use serde::Serialize;

use crate::app::{App, Caller};
use crate::model::{Delivery, DeliveryStatus, Event, new_id, now_ms};
use crate::scheduler::Scheduler;
use crate::store::{AppendBatch, AppendResult, IdempotencyKey, StoreError};
use crate::{observe, outcome};

/// What a producer asked for.
#[derive(Debug, Clone)]
pub struct IngestRequest {
    pub event_type: String,
    pub payload: Vec<u8>,
    pub content_type: String,
    /// Deliver to this endpoint only; `None` fans out by subscription.
    pub endpoint: Option<String>,
    /// A producer-chosen event id (becomes the `webhook-id`).
    pub id: Option<String>,
    pub idempotency_key: Option<String>,
    /// Headers every delivery of the event carries (a raw ingest's `content-encoding`, which
    /// the body needs to be read).
    pub headers: Vec<(String, String)>,
}

#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    #[error("unknown endpoint `{0}`")]
    UnknownEndpoint(String),
    /// The key's `endpoints` list does not name it (whether or not it exists: a limited key
    /// learns nothing about endpoints beyond its reach).
    #[error("this key may not send to endpoint `{0}` (its [[keys]] entry limits what it reaches)")]
    NotAllowed(String),
    #[error("an event with id `{0}` already exists")]
    IdConflict(String),
    #[error("{field}: {message}")]
    Invalid {
        field: &'static str,
        message: String,
    },
    #[error("courier is shutting down")]
    ShuttingDown,
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// The 202 body.
#[derive(Debug, Serialize, serde::Deserialize)]
pub struct IngestReply {
    pub id: String,
    pub deliveries: Vec<ReplyDelivery>,
}

#[derive(Debug, Serialize, serde::Deserialize)]
pub struct ReplyDelivery {
    pub id: String,
    pub endpoint: String,
}

/// The outcome of a successful ingest: the reply body, and whether it is a repeat of an
/// earlier request with the same idempotency key.
pub struct Accepted {
    pub body: Vec<u8>,
    pub repeated: bool,
}

fn check_token(field: &'static str, value: &str) -> Result<(), IngestError> {
    let ok = !value.is_empty() && value.len() <= 256 && value.chars().all(|c| c.is_ascii_graphic());
    if ok {
        Ok(())
    } else {
        Err(IngestError::Invalid {
            field,
            message: "must be 1-256 printable ASCII characters without spaces".into(),
        })
    }
}

pub async fn ingest(
    app: &Arc<App>,
    caller: &Caller,
    req: IngestRequest,
) -> Result<Accepted, IngestError> {
    if app.shutdown.is_cancelled() {
        return Err(IngestError::ShuttingDown);
    }
    check_token("event_type", &req.event_type)?;
    if let Some(id) = &req.id {
        check_token("id", id)?;
        // courier's own ids are unique without a lookup; a producer id in their form could
        // take one a later event is given.
        if id
            .strip_prefix("evt_")
            .is_some_and(|u| ulid::Ulid::from_string(u).is_ok())
        {
            return Err(IngestError::Invalid {
                field: "id",
                message: "ids of the form evt_<ULID> are reserved for ids courier generates".into(),
            });
        }
    }
    if let Some(k) = &req.idempotency_key {
        check_token("idempotency_key", k)?;
    }
    if let Some(name) = &req.endpoint
        && !caller.may_send_to(name)
    {
        return Err(IngestError::NotAllowed(name.clone()));
    }
    // Until the event is in the store (see `Registry::ingest_gate`).
    let pass = app.endpoints.ingest_gate.pass();
    let targets = match &req.endpoint {
        Some(name) => app
            .endpoints
            .get(name)
            .map(|e| vec![e])
            .ok_or_else(|| IngestError::UnknownEndpoint(name.clone())),
        // An event no endpoint subscribes to is still accepted (and stored, so that its
        // id and idempotency key keep their meaning), with no deliveries: a producer that
        // emits every type it has must not see errors for the ones nobody wants yet.
        // A limited key's events reach only the subscribers within its reach.
        None => {
            let mut subscribers = app.endpoints.subscribers(&req.event_type);
            if caller.reach.is_some() {
                subscribers.retain(|ep| caller.may_send_to(&ep.name));
            }
            Ok(subscribers)
        }
    };
    let targets = match targets {
        Ok(t) => t,
        Err(no_target) => {
            // A producer retrying a request that was accepted gets its first answer even
            // if the endpoint has gone since: otherwise it could not learn the event's fate.
            let key = req.idempotency_key.map(|key| IdempotencyKey {
                key_id: caller.key_id.to_string(),
                key,
            });
            if let Some(body) = key
                .map(|k| app.store.idempotent_reply(&k))
                .transpose()?
                .flatten()
            {
                return Ok(Accepted {
                    body,
                    repeated: true,
                });
            }
            return Err(no_target);
        }
    };
    let now = now_ms();
    let event_id = req.id.clone().unwrap_or_else(|| new_id("evt"));
    let deliveries: Vec<Delivery> = targets
        .iter()
        .map(|ep| Delivery {
            id: new_id("dlv"),
            event_id: event_id.clone(),
            endpoint: ep.name.clone(),
            event_type: req.event_type.clone(),
            status: DeliveryStatus::Pending,
            attempts: 0,
            round_attempts: 0,
            next_due_ms: Some(now + outcome::first_delay(&ep.schedule).as_millis() as u64),
            created_ms: now,
            updated_ms: now,
            last_error: None,
        })
        .collect();
    let reply = IngestReply {
        id: event_id.clone(),
        deliveries: deliveries
            .iter()
            .map(|d| ReplyDelivery {
                id: d.id.clone(),
                endpoint: d.endpoint.clone(),
            })
            .collect(),
    };
    let body = serde_json::to_vec(&reply).expect("reply serializes");
    let endpoints: Vec<(String, u64)> = deliveries
        .iter()
        .map(|d| (d.endpoint.clone(), d.next_due_ms.unwrap_or(0)))
        .collect();
    // Whether each endpoint was paused when it was looked up (same order as `endpoints`).
    let paused: Vec<bool> = targets.iter().map(|t| t.paused).collect();
    let has_idempotency_key = req.idempotency_key.is_some();
    let batch = AppendBatch {
        event: Event {
            id: event_id.clone(),
            event_type: req.event_type.clone(),
            content_type: req.content_type,
            payload: req.payload,
            created_ms: now,
            delivery_ids: deliveries.iter().map(|d| d.id.clone()).collect(),
            headers: req.headers,
        },
        deliveries,
        idempotency: req.idempotency_key.map(|key| IdempotencyKey {
            key_id: caller.key_id.to_string(),
            key,
        }),
        reply: if has_idempotency_key {
            body.clone()
        } else {
            Vec::new()
        },
        id_supplied: req.id.is_some(),
    };
    let mut wake = WakeIfAbandoned {
        app,
        endpoints: Some(endpoints),
    };
    let appended = app.store.append(batch).await;
    drop(pass);
    let endpoints = wake.endpoints.take().unwrap_or_default();
    match appended? {
        AppendResult::Created => {
            let names: Vec<&str> = endpoints.iter().map(|(e, _)| e.as_str()).collect();
            observe::ingested(&app.metrics, &event_id, &req.event_type, &names);
            for ((e, due), was_paused) in endpoints.iter().zip(paused) {
                // A paused endpoint's worker would only wake to find it paused: under load
                // that is a worker started (or woken), a wait for the database and a
                // retirement per commit, on the threads that answer producers. Paused at
                // lookup, it is looked up again now, after the append: a resume that this
                // misses comes after the event is journaled, and the resume wakes the worker
                // to scan from the start (once the database has caught up), so the event is
                // found. (Endpoints that were not paused are woken without a second lookup.)
                if was_paused && app.endpoints.get(e).is_some_and(|ep| ep.paused) {
                    continue;
                }
                Scheduler::wake_due(app, e, *due);
            }
            Ok(Accepted {
                body,
                repeated: false,
            })
        }
        AppendResult::Replayed(body) => Ok(Accepted {
            body,
            repeated: true,
        }),
        AppendResult::IdConflict => Err(IngestError::IdConflict(event_id)),
    }
}

/// Announces an event's deliveries to their endpoints' workers when its ingest is dropped
/// (the producer hung up) while the store has the event in hand: the event may still be
/// written, and a busy worker whose scan is past its due time would otherwise leave it until
/// nothing else is in flight. Disarmed (`endpoints` taken) once the append has answered.
struct WakeIfAbandoned<'a> {
    app: &'a Arc<App>,
    endpoints: Option<Vec<(String, u64)>>,
}

impl Drop for WakeIfAbandoned<'_> {
    fn drop(&mut self) {
        let Some(endpoints) = self.endpoints.take() else {
            return;
        };
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let app = self.app.clone();
        rt.spawn(async move {
            // Once the journal has passed it on (if it was written), the worker's own wait
            // for the database covers it.
            app.store.journal_barrier().await;
            for (e, due) in &endpoints {
                Scheduler::wake_due(&app, e, *due);
            }
        });
    }
}
