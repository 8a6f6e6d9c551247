//! A minimal MQTT 3.1.1 / 5 client for load generation: CONNECT, PUBLISH (QoS 0/1),
//! PINGREQ, DISCONNECT, and the server packets they provoke. Small on purpose: one
//! connection costs a socket and two buffers, so one process can drive thousands of orbs.

use std::io;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};

/// A packet from the server.
#[derive(Debug, PartialEq, Eq)]
pub enum Incoming {
    ConnAck {
        code: u8,
    },
    PubAck {
        pkid: u16,
        reason: u8,
    },
    PingResp,
    Disconnect {
        reason: u8,
    },
    /// A PUBLISH from the server (properties skipped).
    Publish {
        qos: u8,
        pkid: u16,
        topic: String,
        payload: Vec<u8>,
    },
    /// Anything else (SUBACK, PUBLISH, ...): type nibble.
    Other(u8),
}

/// Appends `n` as an MQTT variable-byte integer.
pub fn put_varint(out: &mut Vec<u8>, mut n: usize) {
    loop {
        let mut b = (n % 128) as u8;
        n /= 128;
        if n > 0 {
            b |= 0x80;
        }
        out.push(b);
        if n == 0 {
            break;
        }
    }
}

fn put_str(out: &mut Vec<u8>, s: &[u8]) {
    out.extend_from_slice(&(s.len() as u16).to_be_bytes());
    out.extend_from_slice(s);
}

/// Encodes CONNECT with a clean session.
pub fn connect_packet(
    protocol: u8,
    client_id: &str,
    username: Option<&str>,
    password: Option<&[u8]>,
    keepalive: u16,
) -> Vec<u8> {
    let mut body = Vec::with_capacity(64);
    put_str(&mut body, b"MQTT");
    body.push(protocol);
    let mut flags = 0x02;
    if username.is_some() {
        flags |= 0x80;
    }
    if password.is_some() {
        flags |= 0x40;
    }
    body.push(flags);
    body.extend_from_slice(&keepalive.to_be_bytes());
    if protocol == 5 {
        body.push(0); // no properties
    }
    put_str(&mut body, client_id.as_bytes());
    if let Some(u) = username {
        put_str(&mut body, u.as_bytes());
    }
    if let Some(p) = password {
        put_str(&mut body, p);
    }
    let mut out = vec![0x10];
    put_varint(&mut out, body.len());
    out.extend_from_slice(&body);
    out
}

/// Appends a PUBLISH to `out`.
pub fn publish_packet(out: &mut Vec<u8>, protocol: u8, topic: &str, payload: &[u8], qos: u8, pkid: u16) {
    let mut len = 2 + topic.len() + payload.len();
    if qos > 0 {
        len += 2;
    }
    if protocol == 5 {
        len += 1;
    }
    out.push(0x30 | (qos << 1));
    put_varint(out, len);
    put_str(out, topic.as_bytes());
    if qos > 0 {
        out.extend_from_slice(&pkid.to_be_bytes());
    }
    if protocol == 5 {
        out.push(0);
    }
    out.extend_from_slice(payload);
}

/// SUBSCRIBE to one filter.
pub fn subscribe_packet(protocol: u8, pkid: u16, filter: &str, qos: u8) -> Vec<u8> {
    let mut body = pkid.to_be_bytes().to_vec();
    if protocol == 5 {
        body.push(0);
    }
    put_str(&mut body, filter.as_bytes());
    body.push(qos);
    let mut out = vec![0x82];
    put_varint(&mut out, body.len());
    out.extend_from_slice(&body);
    out
}

/// PUBACK (success).
pub fn puback_packet(pkid: u16) -> [u8; 4] {
    let [a, b] = pkid.to_be_bytes();
    [0x40, 0x02, a, b]
}

pub const PINGREQ: [u8; 2] = [0xC0, 0x00];
pub const DISCONNECT: [u8; 2] = [0xE0, 0x00];

/// Reads one packet.
pub async fn read_packet(r: &mut OwnedReadHalf, protocol: u8, buf: &mut Vec<u8>) -> io::Result<Incoming> {
    let first = r.read_u8().await?;
    let mut len = 0usize;
    let mut shift = 0;
    loop {
        let b = r.read_u8().await?;
        len |= usize::from(b & 0x7f) << shift;
        if b & 0x80 == 0 {
            break;
        }
        shift += 7;
        if shift > 21 {
            return Err(io::Error::new(io::ErrorKind::InvalidData, "remaining length too long"));
        }
    }
    buf.resize(len, 0);
    r.read_exact(buf).await?;
    Ok(match first >> 4 {
        2 if len >= 2 => Incoming::ConnAck { code: buf[1] },
        4 if len >= 2 => Incoming::PubAck {
            pkid: u16::from_be_bytes([buf[0], buf[1]]),
            reason: if protocol == 5 && len >= 3 { buf[2] } else { 0 },
        },
        13 => Incoming::PingResp,
        3 => parse_publish(first, protocol, buf)
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "malformed PUBLISH"))?,
        14 => Incoming::Disconnect { reason: buf.first().copied().unwrap_or(0) },
        t => Incoming::Other(t),
    })
}

fn parse_publish(first: u8, protocol: u8, b: &[u8]) -> Option<Incoming> {
    let qos = (first >> 1) & 3;
    let topic_len = usize::from(u16::from_be_bytes([*b.first()?, *b.get(1)?]));
    let topic = String::from_utf8(b.get(2..2 + topic_len)?.to_vec()).ok()?;
    let mut at = 2 + topic_len;
    let mut pkid = 0;
    if qos > 0 {
        pkid = u16::from_be_bytes([*b.get(at)?, *b.get(at + 1)?]);
        at += 2;
    }
    if protocol == 5 {
        // Properties: a variable-byte length, then that many bytes.
        let (mut len, mut shift) = (0usize, 0);
        loop {
            let x = *b.get(at)?;
            at += 1;
            len |= usize::from(x & 0x7f) << shift;
            if x & 0x80 == 0 {
                break;
            }
            shift += 7;
            if shift > 21 {
                return None;
            }
        }
        at += len;
    }
    Some(Incoming::Publish { qos, pkid, topic, payload: b.get(at..)?.to_vec() })
}

/// Connects and completes the CONNECT handshake; returns the split stream or the CONNACK code.
pub async fn connect(
    addr: &str,
    protocol: u8,
    client_id: &str,
    username: Option<&str>,
    password: Option<&[u8]>,
    keepalive: u16,
) -> io::Result<Result<(OwnedReadHalf, OwnedWriteHalf), u8>> {
    let stream = TcpStream::connect(addr).await?;
    stream.set_nodelay(true)?;
    let (mut r, mut w) = stream.into_split();
    w.write_all(&connect_packet(protocol, client_id, username, password, keepalive)).await?;
    let mut buf = Vec::new();
    match read_packet(&mut r, protocol, &mut buf).await? {
        Incoming::ConnAck { code: 0 } => Ok(Ok((r, w))),
        Incoming::ConnAck { code } => Ok(Err(code)),
        other => Err(io::Error::new(io::ErrorKind::InvalidData, format!("expected CONNACK, got {other:?}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn varint_matches_the_spec_examples() {
        for (n, bytes) in [
            (0usize, vec![0x00]),
            (127, vec![0x7f]),
            (128, vec![0x80, 0x01]),
            (16_383, vec![0xff, 0x7f]),
            (16_384, vec![0x80, 0x80, 0x01]),
        ] {
            let mut out = Vec::new();
            put_varint(&mut out, n);
            assert_eq!(out, bytes, "{n}");
        }
    }

    #[test]
    fn v311_publish_qos1_layout() {
        let mut out = Vec::new();
        publish_packet(&mut out, 4, "a/b", b"xy", 1, 7);
        assert_eq!(out, vec![0x32, 9, 0, 3, b'a', b'/', b'b', 0, 7, b'x', b'y']);
    }

    #[test]
    fn publishes_parse_back_in_both_versions() {
        for protocol in [4, 5] {
            let mut out = Vec::new();
            publish_packet(&mut out, protocol, "commands/t/o", br#"{"x":1}"#, 1, 513);
            let parsed = parse_publish(out[0], protocol, &out[2..]).unwrap();
            let Incoming::Publish { qos, pkid, topic, payload } = parsed else { panic!("{parsed:?}") };
            assert_eq!((qos, pkid, topic.as_str(), payload.as_slice()), (1, 513, "commands/t/o", &br#"{"x":1}"#[..]));
        }
        assert!(parse_publish(0x32, 4, &[0, 9, b'a']).is_none(), "truncated");
        assert_eq!(subscribe_packet(4, 1, "a/b", 1), vec![0x82, 8, 0, 1, 0, 3, b'a', b'/', b'b', 1]);
    }

    #[test]
    fn v5_connect_has_empty_properties() {
        let p = connect_packet(5, "c", Some("t/o"), Some(b"pw"), 30);
        // header, len, "MQTT", level 5, flags (user|pass|clean), keepalive, props=0
        assert_eq!(&p[..13], &[0x10, (p.len() - 2) as u8, 0, 4, b'M', b'Q', b'T', b'T', 5, 0xC2, 0, 30, 0]);
    }
}
