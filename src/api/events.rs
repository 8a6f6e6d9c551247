//! The tenant event log, paged and streamed.

use std::sync::Arc;

use crate::error::ApiError;
use crate::model::event::{Event, check_types, parse_event_id};

use super::{Access, Api, Principal, invalid};

/// Most events one page returns.
pub const EVENT_PAGE_MAX: usize = 1_000;
/// Events a page looks at, at most, to fill itself with the wanted types.
const EVENT_SCAN_MAX: usize = 10 * EVENT_PAGE_MAX;
/// Events buffered between a stream's reader and its transport.
const STREAM_BUFFER: usize = 64;

/// A page of events and the id to continue after (the same `after` when nothing is new;
/// `None` only while the log is empty).
pub struct EventPage {
    pub events: Vec<Event>,
    pub next_after: Option<String>,
}

fn parse_after(after: Option<&str>) -> Result<Option<u64>, ApiError> {
    after.filter(|s| !s.is_empty()).map(parse_event_id).transpose().map_err(invalid)
}

impl Api {
    /// Events of a tenant after `after` (from the oldest kept when absent), oldest first.
    pub fn list_events(
        &self,
        p: &Principal,
        tenant_id: Option<&str>,
        after: Option<&str>,
        types: &[String],
        page_size: usize,
    ) -> Result<EventPage, ApiError> {
        let tenant = self.tenant_for(p, tenant_id, Access::Read)?;
        check_types(types).map_err(invalid)?;
        let limit = if page_size == 0 { 100 } else { page_size.min(EVENT_PAGE_MAX) };
        let log = &self.fleet().ctx().events;
        let mut cursor = parse_after(after)?;
        let (mut events, mut scanned) = (Vec::new(), 0);
        loop {
            let chunk = log.list(&tenant, cursor, limit)?;
            let Some(last) = chunk.last().map(|e| e.seq) else {
                return Ok(EventPage { events, next_after: cursor.map(|c| c.to_string()) });
            };
            scanned += chunk.len();
            for e in chunk {
                let seq = e.seq;
                cursor = Some(seq);
                if types.is_empty() || types.contains(&e.event_type) {
                    events.push(e);
                    if events.len() == limit {
                        return Ok(EventPage { events, next_after: Some(seq.to_string()) });
                    }
                }
            }
            if scanned >= EVENT_SCAN_MAX {
                return Ok(EventPage { events, next_after: Some(last.to_string()) });
            }
        }
    }

    /// A live stream of a tenant's events after `after` (from now when absent). Each item is an
    /// event; an error ends the stream (the client resumes from the last id it saw).
    pub fn stream_events(
        self: &Arc<Self>,
        p: &Principal,
        tenant_id: Option<&str>,
        after: Option<&str>,
        types: Vec<String>,
    ) -> Result<tokio::sync::mpsc::Receiver<Result<Event, ApiError>>, ApiError> {
        let tenant = self.tenant_for(p, tenant_id, Access::Read)?;
        check_types(&types).map_err(invalid)?;
        let mut sub = self.fleet().ctx().events.subscribe(&tenant, parse_after(after)?, types)?;
        let (tx, rx) = tokio::sync::mpsc::channel(STREAM_BUFFER);
        let mut closing = self.closing.clone();
        tokio::spawn(async move {
            loop {
                let item = tokio::select! {
                    item = sub.next() => item,
                    _ = tx.closed() => break,
                    _ = closing.wait_for(|c| *c) => break,
                };
                let end = item.is_err();
                if tx.send(item).await.is_err() || end {
                    break;
                }
            }
        });
        Ok(rx)
    }
}
