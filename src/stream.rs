//! The live stream of orb changes that feeds dashboards (gRPC `StreamOrbs` and SSE).
//!
//! One bounded broadcast ring for the node (`stream_buffer` events). Orb actors publish after a
//! change is applied (telemetry is durable before that). Each subscriber reads at its own pace;
//! one that falls behind by more than the ring is told how many events it missed and is
//! resynchronised with a snapshot, so a slow dashboard never grows memory.

use std::sync::Arc;

use serde::Serialize;
use tokio::sync::broadcast;

use crate::model::orb::OrbState;
use crate::model::{OrbId, OrbKey, TenantId};

/// What changed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ChangeKind {
    Telemetry,
    Presence,
    Reported,
    Status,
    /// Operator attributes changed.
    Attributes,
    /// Part of a resynchronisation snapshot.
    Snapshot,
}

/// One change of one orb, with the fields a dashboard shows.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct OrbChange {
    pub tenant_id: TenantId,
    pub orb_id: OrbId,
    pub kind: ChangeKind,
    /// Server time of the change, unix ms.
    pub at_ms: u64,
    pub status: &'static str,
    pub online: bool,
    /// Device time of the newest point.
    pub ts: Option<u64>,
    pub battery: Option<f64>,
    pub lat: Option<f64>,
    pub lon: Option<f64>,
    pub speed: Option<f64>,
    pub mode: Option<String>,
}

impl OrbChange {
    pub fn of(state: &OrbState, kind: ChangeKind, at_ms: u64) -> OrbChange {
        let last = state.last.as_ref();
        OrbChange {
            tenant_id: state.record.tenant.clone(),
            orb_id: state.record.orb.clone(),
            kind,
            at_ms,
            status: state.record.status.as_str(),
            online: state.presence.online,
            ts: last.map(|p| p.ts),
            battery: last.and_then(|p| p.battery),
            lat: last.and_then(|p| p.position.map(|x| x.0)),
            lon: last.and_then(|p| p.position.map(|x| x.1)),
            speed: last.and_then(|p| p.speed),
            mode: last.and_then(|p| p.mode.clone()),
        }
    }

    pub fn key(&self) -> OrbKey {
        OrbKey::new(self.tenant_id.clone(), self.orb_id.clone())
    }
}

/// The node's change ring; cheap to clone.
#[derive(Clone)]
pub struct Hub {
    tx: broadcast::Sender<Arc<OrbChange>>,
}

/// What a subscriber sees.
#[derive(Clone, Debug, PartialEq)]
pub enum StreamItem {
    Change(Arc<OrbChange>),
    /// The subscriber fell behind and missed this many events; a snapshot follows.
    Lagged(u64),
}

impl Hub {
    pub fn new(capacity: usize) -> Hub {
        Hub { tx: broadcast::channel(capacity.max(1)).0 }
    }

    /// Publishes a change; never blocks (nobody listening is fine).
    pub fn publish(&self, change: OrbChange) {
        if self.tx.receiver_count() > 0 {
            let _ = self.tx.send(Arc::new(change));
        }
    }

    pub fn subscribe(&self, filter: Filter) -> Subscription {
        Subscription { rx: self.tx.subscribe(), filter }
    }
}

/// Which changes a subscriber wants.
#[derive(Clone, Debug)]
pub struct Filter {
    pub tenant: TenantId,
    /// Empty: every orb of the tenant.
    pub orbs: Vec<OrbId>,
}

impl Filter {
    fn matches(&self, c: &OrbChange) -> bool {
        c.tenant_id == self.tenant && (self.orbs.is_empty() || self.orbs.contains(&c.orb_id))
    }
}

/// One subscriber.
pub struct Subscription {
    rx: broadcast::Receiver<Arc<OrbChange>>,
    pub filter: Filter,
}

impl Subscription {
    /// The next matching item; `None` when the hub is gone.
    pub async fn next(&mut self) -> Option<StreamItem> {
        loop {
            match self.rx.recv().await {
                Ok(c) if self.filter.matches(&c) => return Some(StreamItem::Change(c)),
                Ok(_) => continue,
                Err(broadcast::error::RecvError::Lagged(n)) => return Some(StreamItem::Lagged(n)),
                Err(broadcast::error::RecvError::Closed) => return None,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn change(t: &str, o: &str) -> OrbChange {
        OrbChange {
            tenant_id: TenantId::parse(t).unwrap(),
            orb_id: OrbId::parse(o).unwrap(),
            kind: ChangeKind::Telemetry,
            at_ms: 1,
            status: "active",
            online: true,
            ts: Some(1),
            battery: None,
            lat: None,
            lon: None,
            speed: None,
            mode: None,
        }
    }

    #[tokio::test]
    async fn subscribers_see_their_tenant_only_and_are_told_when_they_lag() {
        let hub = Hub::new(4);
        let mut acme = hub.subscribe(Filter { tenant: TenantId::parse("acme").unwrap(), orbs: vec![] });
        let mut one =
            hub.subscribe(Filter { tenant: TenantId::parse("acme").unwrap(), orbs: vec![OrbId::parse("b").unwrap()] });
        hub.publish(change("globex", "a"));
        hub.publish(change("acme", "a"));
        hub.publish(change("acme", "b"));
        assert!(matches!(acme.next().await, Some(StreamItem::Change(c)) if c.orb_id.as_str() == "a"));
        assert!(matches!(one.next().await, Some(StreamItem::Change(c)) if c.orb_id.as_str() == "b"));
        for i in 0..10 {
            hub.publish(change("acme", &format!("x{i}")));
        }
        // `acme` read one event and then fell behind by more than the ring.
        assert!(matches!(acme.next().await, Some(StreamItem::Lagged(n)) if n > 0));
        assert!(matches!(acme.next().await, Some(StreamItem::Change(_))));
    }
}
