//! A v5 test client whose event loop runs in its own task, so a test can publish, subscribe
//! and read what arrives without driving the loop itself.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::mqttbytes::v5::{
    ConnAck, Filter, Packet, PubAckReason, Publish, PublishProperties, SubscribeProperties, SubscribeReasonCode,
};
use rumqttc::v5::{AsyncClient, Event, MqttOptions};
use tokio::sync::mpsc;

/// A v5 client whose event loop runs in its own task; every incoming packet is forwarded.
/// The task stops at the first error (no automatic reconnect), which it forwards as `None`.
pub struct Peer {
    pub client: AsyncClient,
    rx: mpsc::UnboundedReceiver<Result<Packet, String>>,
    task: tokio::task::JoinHandle<()>,
    early: std::collections::VecDeque<Publish>,
    /// How the connection ended, once it has.
    pub error: Option<String>,
}

pub fn opts(addr: SocketAddr, id: &str, creds: Option<(&str, &str)>) -> MqttOptions {
    let mut o = MqttOptions::new(id, addr.ip().to_string(), addr.port());
    o.set_keep_alive(Duration::from_secs(30));
    o.set_max_packet_size(Some(1024 * 1024));
    if let Some((u, p)) = creds {
        o.set_credentials(u, p);
    }
    o
}

impl Peer {
    pub async fn connect(o: MqttOptions) -> (Peer, ConnAck) {
        let (client, mut events) = AsyncClient::new(o, 64);
        let ack = loop {
            match tokio::time::timeout(Duration::from_secs(10), events.poll()).await.expect("connack in time") {
                Ok(Event::Incoming(Packet::ConnAck(a))) => break a,
                Ok(_) => continue,
                Err(e) => panic!("connect failed: {e}"),
            }
        };
        let (tx, rx) = mpsc::unbounded_channel();
        let task = tokio::spawn(async move {
            loop {
                match events.poll().await {
                    Ok(Event::Incoming(p)) => {
                        if tx.send(Ok(p)).is_err() {
                            return;
                        }
                    }
                    Ok(Event::Outgoing(_)) => {}
                    Err(e) => {
                        let _ = tx.send(Err(format!("{e:?}")));
                        return;
                    }
                }
            }
        });
        (Peer { client, rx, task, early: Default::default(), error: None }, ack)
    }

    pub async fn dev(addr: SocketAddr, id: &str) -> Peer {
        Peer::connect(opts(addr, id, None)).await.0
    }

    /// The next packet, or `None` when the connection ended or nothing came within `secs`.
    pub async fn next(&mut self, secs: f64) -> Option<Packet> {
        match tokio::time::timeout(Duration::from_secs_f64(secs), self.rx.recv()).await.ok().flatten()? {
            Ok(p) => Some(p),
            Err(e) => {
                self.error = Some(e);
                None
            }
        }
    }

    pub async fn next_publish(&mut self, secs: f64) -> Option<Publish> {
        if let Some(p) = self.early.pop_front() {
            return Some(p);
        }
        let deadline = Instant::now() + Duration::from_secs_f64(secs);
        loop {
            let left = deadline.saturating_duration_since(Instant::now()).as_secs_f64();
            match self.next(left).await? {
                Packet::Publish(p) => return Some(p),
                _ => continue,
            }
        }
    }

    /// Subscribes and returns the SUBACK's codes (publishes arriving first are kept).
    pub async fn subscribe(&mut self, filters: Vec<Filter>, id: Option<usize>) -> Vec<SubscribeReasonCode> {
        let props = SubscribeProperties { id, user_properties: vec![] };
        self.client.subscribe_many_with_properties(filters, props).await.unwrap();
        loop {
            match self.next(10.0).await.expect("suback") {
                Packet::SubAck(a) => return a.return_codes,
                Packet::Publish(p) => self.early.push_back(p),
                _ => continue,
            }
        }
    }

    pub async fn sub(&mut self, filter: &str) {
        let codes = self.subscribe(vec![Filter::new(filter, QoS::AtLeastOnce)], None).await;
        assert_eq!(codes, vec![SubscribeReasonCode::Success(QoS::AtLeastOnce)], "{filter}");
    }

    /// Publishes at QoS 1 and returns the PUBACK reason.
    pub async fn publish_props(
        &mut self,
        topic: &str,
        payload: &[u8],
        retain: bool,
        props: PublishProperties,
    ) -> PubAckReason {
        self.client.publish_with_properties(topic, QoS::AtLeastOnce, retain, payload.to_vec(), props).await.unwrap();
        loop {
            match self.next(10.0).await.expect("puback") {
                Packet::PubAck(a) => return a.reason,
                Packet::Publish(p) => self.early.push_back(p),
                _ => continue,
            }
        }
    }

    /// Publishes at QoS 2 and waits for the PUBCOMP (publishes arriving first are kept).
    pub async fn publish_qos2(&mut self, topic: &str, payload: &[u8]) {
        self.client.publish(topic, QoS::ExactlyOnce, false, payload.to_vec()).await.unwrap();
        loop {
            match self.next(10.0).await.expect("pubcomp") {
                Packet::PubComp(_) => return,
                Packet::Publish(p) => self.early.push_back(p),
                _ => continue,
            }
        }
    }

    pub async fn publish(&mut self, topic: &str, payload: &[u8]) -> PubAckReason {
        self.publish_props(topic, payload, false, PublishProperties::default()).await
    }

    pub async fn retain(&mut self, topic: &str, payload: &[u8]) {
        assert_eq!(self.publish_props(topic, payload, true, PublishProperties::default()).await, PubAckReason::Success);
    }

    /// Nothing arrives within `secs`.
    pub async fn silent(&mut self, secs: f64, what: &str) {
        if let Some(p) = self.next_publish(secs).await {
            panic!("{what}: unexpected {:?} {:?}", p.topic, p.payload);
        }
    }

    pub async fn disconnect(mut self) {
        let _ = self.client.disconnect().await;
        while self.next(2.0).await.is_some() {}
        self.task.abort();
    }

    /// Ends the TCP connection without DISCONNECT (a device losing power).
    pub async fn vanish(self) {
        self.task.abort();
        let _ = self.task.await;
    }
}
