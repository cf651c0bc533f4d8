//! `GET /api/events?sweep=ID&kinds=state,epochs`: the core's change notices as server-sent
//! events, filtered to one sweep (or all) and to some kinds. An epoch a worker reports reaches an
//! open page as soon as it is committed; pages never poll. A page that falls behind gets a
//! `lagged` event and reloads what it shows.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{RawQuery, State};
use axum::http::HeaderMap;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use tokio::sync::broadcast::error::RecvError;

use super::{query, ApiError, Console};
use crate::events::{Change, ChangeKind};

/// How often an idle stream sends a comment, so that proxies keep it open.
const KEEP_ALIVE: Duration = Duration::from_secs(15);

fn kind_name(kind: ChangeKind) -> &'static str {
    match kind {
        ChangeKind::Submitted => "submitted",
        ChangeKind::State => "state",
        ChangeKind::Epochs => "epochs",
        ChangeKind::Logs => "logs",
        ChangeKind::Files => "files",
    }
}

/// Which changes a subscriber asked for.
#[derive(Debug, Clone)]
struct Filter {
    sweep: Option<String>,
    kinds: Option<Vec<String>>,
}

impl Filter {
    fn admits(&self, change: &Change) -> bool {
        let sweep = self.sweep.as_deref().is_none_or(|sweep| sweep == change.sweep_id);
        let kind = self.kinds.as_ref().is_none_or(|kinds| kinds.iter().any(|k| k == kind_name(change.kind)));
        sweep && kind
    }
}

/// The event stream.
pub async fn events(State(console): State<Arc<Console>>, headers: HeaderMap, RawQuery(raw): RawQuery) -> Result<Response, ApiError> {
    console.auth.reader(&headers)?;
    let params = query::parse(raw.as_deref());
    let filter = Filter {
        sweep: query::text(&params, "sweep").map(str::to_string),
        kinds: query::text(&params, "kinds").map(|kinds| kinds.split(',').map(str::to_string).collect()),
    };
    let receiver = console.core.changes().subscribe();
    let stream = futures_util::stream::unfold((receiver, filter), |(mut receiver, filter)| async move {
        loop {
            match receiver.recv().await {
                Ok(change) if filter.admits(&change) => {
                    let data = serde_json::to_string(&change).unwrap_or_default();
                    let event = Event::default().event(kind_name(change.kind)).data(data);
                    return Some((Ok::<_, Infallible>(event), (receiver, filter)));
                }
                Ok(_) => continue,
                Err(RecvError::Lagged(missed)) => {
                    let event = Event::default().event("lagged").data(missed.to_string());
                    return Some((Ok(event), (receiver, filter)));
                }
                Err(RecvError::Closed) => return None,
            }
        }
    });
    Ok(Sse::new(stream).keep_alive(KeepAlive::new().interval(KEEP_ALIVE)).into_response())
}
