//! A guard under ntex-mqtt: it follows the MQTT packet boundaries of everything a client sends
//! and ends the connection on what ntex-mqtt 8 would otherwise pass over in silence: a second
//! CONNECT [MQTT-3.1.0-2]. Bytes pass through unchanged (the buffer is handed over, not copied,
//! when the decoder has nothing pending), with one exception, QoS 2 from MQTT 5 clients.
//!
//! ntex-mqtt 8 (8.2.1, the newest 8.x; the same code is in 9.x) never frees the packet id of a
//! QoS 2 PUBLISH from a v5 client after its PUBREL: the id counts against the receive maximum
//! for the rest of the connection, so after `receive_maximum` QoS 2 publishes every PUBLISH is
//! refused with DISCONNECT 0x93, and a reused id gets PUBACK 0x91 instead of PUBREC. The guard
//! therefore runs the receiver side of QoS 2 for v5 connections itself: it hands a QoS 2
//! PUBLISH to ntex-mqtt as QoS 1 (whose id ntex-mqtt frees with the PUBACK) and records its
//! packet id ([`Qos2::was_qos2`] tells the connection it is QoS 2), turns that PUBACK into the
//! PUBREC (same layout), and answers the PUBREL: ntex-mqtt, not knowing the id, writes PUBCOMP
//! "packet identifier not found", which the guard turns into a success when the session holds
//! the id awaiting release. MQTT 3.1.1 connections are not touched (ntex-mqtt's v3 path frees
//! the id).

use std::any::{Any, TypeId};
use std::cell::{Cell, RefCell};
use std::collections::HashSet;
use std::fmt;
use std::io;
use std::rc::Rc;
use std::sync::Arc;

use ntex::io::{FilterBuf, FilterLayer};

use crate::broker::Session;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
enum Scan {
    /// Expecting the first byte of a packet.
    #[default]
    Header,
    /// Reading the remaining length (variable-byte integer) of a packet whose first byte is
    /// `first` (as handed on).
    Length { first: u8, q2: bool, value: u32, shift: u32 },
    /// Inside a packet body: this many bytes left.
    Body(u32),
    /// The first packet (CONNECT): `pos` bytes read, `left` to go. Its protocol level (byte 6
    /// after the "MQTT" name) says whether it is MQTT 5.
    Connect { pos: u32, left: u32 },
    /// A QoS 2 PUBLISH handed on as QoS 1: reading up to its packet id.
    Publish { left: u32, step: Step },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Step {
    TopicHi,
    TopicLo(u8),
    Topic(u16),
    IdHi,
    IdLo(u8),
}

/// The write side (v5 only): where acknowledgements start.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
enum WScan {
    #[default]
    Header,
    Length {
        first: u8,
        at: Option<usize>,
        value: u32,
        shift: u32,
    },
    Body(u32),
    /// A PUBACK or PUBCOMP: `pos` body bytes read; `at` is where its first byte is in the
    /// chunk being written (`None` if an earlier chunk).
    Ack {
        first: u8,
        at: Option<usize>,
        left: u32,
        pos: u8,
        id: u16,
    },
}

/// QoS 2 publishes of a v5 connection in flight through the guard; the connection finds it
/// with `io.query::<Rc<Qos2>>()`.
#[derive(Default)]
pub struct Qos2 {
    /// Packet ids of QoS 2 publishes handed on as QoS 1, until their PUBACK is turned into
    /// the PUBREC.
    converted: RefCell<HashSet<u16>>,
    /// The connection's broker session, which holds the ids awaiting PUBREL.
    session: RefCell<Option<Arc<Session>>>,
}

impl fmt::Debug for Qos2 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Qos2").field("converted", &self.converted.borrow().len()).finish()
    }
}

impl Qos2 {
    /// The connection's session (after CONNECT).
    pub fn attach(&self, session: Arc<Session>) {
        *self.session.borrow_mut() = Some(session);
    }

    /// Whether the PUBLISH with this packet id, handed over as QoS 1, was sent at QoS 2.
    pub fn was_qos2(&self, id: u16) -> bool {
        self.converted.borrow().contains(&id)
    }
}

/// The guard; one per connection.
#[derive(Debug, Default)]
pub struct Framing {
    scan: Cell<Scan>,
    packets: Cell<u64>,
    v5: Cell<bool>,
    write: Cell<WScan>,
    qos2: Rc<Qos2>,
}

/// Why the guard closed a connection.
fn violation(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what.to_string())
}

impl Framing {
    /// Follows `bytes` through the packet boundaries (rewriting a v5 QoS 2 PUBLISH's first
    /// byte to QoS 1).
    fn scan(&self, bytes: &mut [u8]) -> io::Result<()> {
        let mut scan = self.scan.get();
        let mut i = 0;
        while i < bytes.len() {
            match scan {
                Scan::Header => {
                    let mut first = bytes[i];
                    let kind = first >> 4;
                    let n = self.packets.get();
                    if n > 0 && kind == 1 {
                        return Err(violation("a second CONNECT on one connection"));
                    }
                    self.packets.set(n + 1);
                    let q2 = kind == 3 && self.v5.get() && (first >> 1) & 3 == 2;
                    if q2 {
                        first = (first & !0x06) | 0x02;
                        bytes[i] = first;
                    }
                    scan = Scan::Length { first, q2, value: 0, shift: 0 };
                    i += 1;
                }
                Scan::Length { first, q2, value, shift } => {
                    let b = bytes[i];
                    i += 1;
                    let value = value | (u32::from(b & 0x7f) << shift);
                    scan = if b & 0x80 != 0 {
                        if shift >= 21 {
                            return Err(violation("remaining length longer than four bytes"));
                        }
                        Scan::Length { first, q2, value, shift: shift + 7 }
                    } else if value == 0 {
                        Scan::Header
                    } else if self.packets.get() == 1 {
                        Scan::Connect { pos: 0, left: value }
                    } else if q2 {
                        Scan::Publish { left: value, step: Step::TopicHi }
                    } else {
                        Scan::Body(value)
                    };
                }
                Scan::Body(left) => {
                    let take = (left as usize).min(bytes.len() - i);
                    i += take;
                    let left = left - take as u32;
                    scan = if left == 0 { Scan::Header } else { Scan::Body(left) };
                }
                Scan::Connect { pos, left } => {
                    if pos == 6 {
                        self.v5.set(bytes[i] == 5);
                    }
                    i += 1;
                    scan = match left - 1 {
                        0 => Scan::Header,
                        rest if pos >= 6 => Scan::Body(rest),
                        rest => Scan::Connect { pos: pos + 1, left: rest },
                    };
                }
                Scan::Publish { left, step } => {
                    let b = bytes[i];
                    let (used, next) = match step {
                        Step::TopicHi => (1, Some(Step::TopicLo(b))),
                        Step::TopicLo(hi) => {
                            let len = u16::from_be_bytes([hi, b]);
                            (1, Some(if len == 0 { Step::IdHi } else { Step::Topic(len) }))
                        }
                        Step::Topic(n) => {
                            let take = (n as usize).min(bytes.len() - i).min(left as usize);
                            let rest = n - take as u16;
                            (take, Some(if rest == 0 { Step::IdHi } else { Step::Topic(rest) }))
                        }
                        Step::IdHi => (1, Some(Step::IdLo(b))),
                        Step::IdLo(hi) => {
                            self.qos2.converted.borrow_mut().insert(u16::from_be_bytes([hi, b]));
                            (1, None)
                        }
                    };
                    i += used;
                    let left = left - used as u32;
                    scan = match next {
                        _ if left == 0 => Scan::Header,
                        Some(step) => Scan::Publish { left, step },
                        None => Scan::Body(left),
                    };
                }
            }
        }
        self.scan.set(scan);
        Ok(())
    }

    /// Follows what the server writes to a v5 client and returns the bytes to change: a
    /// PUBACK of a converted QoS 2 publish becomes its PUBREC; a PUBCOMP "packet identifier
    /// not found" for an id the session holds awaiting release becomes a success.
    fn scan_write<'a>(&self, chunks: impl Iterator<Item = &'a [u8]>) -> Vec<(usize, u8)> {
        let mut edits = Vec::new();
        let mut scan = self.write.get();
        let mut offset = 0;
        for chunk in chunks {
            let mut i = 0;
            while i < chunk.len() {
                let b = chunk[i];
                match scan {
                    WScan::Header => {
                        scan = WScan::Length { first: b, at: Some(offset + i), value: 0, shift: 0 };
                        i += 1;
                    }
                    WScan::Length { first, at, value, shift } => {
                        i += 1;
                        let value = value | (u32::from(b & 0x7f) << shift);
                        let kind = first >> 4;
                        scan = if b & 0x80 != 0 && shift < 21 {
                            WScan::Length { first, at, value, shift: shift + 7 }
                        } else if value == 0 {
                            WScan::Header
                        } else if kind == 4 || kind == 7 {
                            WScan::Ack { first, at, left: value, pos: 0, id: 0 }
                        } else {
                            WScan::Body(value)
                        };
                    }
                    WScan::Body(left) => {
                        let take = (left as usize).min(chunk.len() - i);
                        i += take;
                        let left = left - take as u32;
                        scan = if left == 0 { WScan::Header } else { WScan::Body(left) };
                    }
                    WScan::Ack { first, at, left, pos, id } => {
                        i += 1;
                        let id = if pos < 2 { (id << 8) | u16::from(b) } else { id };
                        if pos == 1 && first >> 4 == 4 && self.qos2.converted.borrow_mut().remove(&id) {
                            match at {
                                Some(at) => edits.push((at, 0x50)),
                                None => tracing::warn!(id, "a PUBACK split across writes left as it is"),
                            }
                        }
                        if pos == 2 && first >> 4 == 7 && b == 0x92 {
                            let session = self.qos2.session.borrow();
                            if let Some(s) = session.as_ref().filter(|s| s.qos2_pending(id)) {
                                s.qos2_released(id);
                                edits.push((offset + i - 1, 0x00));
                            }
                        }
                        let left = left - 1;
                        scan = if left == 0 {
                            WScan::Header
                        } else if pos >= 2 {
                            WScan::Body(left)
                        } else {
                            WScan::Ack { first, at, left, pos: pos + 1, id }
                        };
                    }
                }
            }
            offset += chunk.len();
        }
        // A packet whose first byte is written now and its rest later: its first byte is out.
        self.write.set(match scan {
            WScan::Length { first, value, shift, .. } => WScan::Length { first, at: None, value, shift },
            WScan::Ack { first, left, pos, id, .. } => WScan::Ack { first, at: None, left, pos, id },
            other => other,
        });
        edits
    }
}

impl FilterLayer for Framing {
    fn query(&self, id: TypeId) -> Option<Box<dyn Any>> {
        (id == TypeId::of::<Rc<Qos2>>()).then(|| Box::new(self.qos2.clone()) as Box<dyn Any>)
    }

    fn process_read_buf(&self, buf: &FilterBuf<'_>) -> io::Result<()> {
        buf.with_read_buffers(|src, dst| {
            let Some(src) = src else { return Ok(()) };
            self.scan(&mut src[..])?;
            if dst.is_empty() {
                std::mem::swap(src, dst);
            } else {
                dst.extend_from_slice(src);
                src.clear();
            }
            Ok(())
        })
    }

    fn process_write_buf(&self, buf: &FilterBuf<'_>) -> io::Result<()> {
        buf.with_write_buffers(|src, dst| {
            if !self.v5.get() || src.is_empty() {
                src.move_to(dst);
                return;
            }
            let edits = self.scan_write(src.iter());
            if edits.is_empty() {
                src.move_to(dst);
                return;
            }
            let mut bytes = Vec::with_capacity(src.len());
            for chunk in src.iter() {
                bytes.extend_from_slice(chunk);
            }
            src.clear();
            for (at, value) in edits {
                bytes[at] = value;
            }
            dst.append(bytes);
        });
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CONNECT: &[u8] = &[0x10, 0x0e, 0, 4, b'M', b'Q', b'T', b'T', 4, 2, 0, 30, 0, 2, b'm', b'1'];

    #[test]
    fn packets_split_anywhere_are_followed() {
        let mut stream = CONNECT.to_vec();
        stream.extend_from_slice(&[0x30, 0x85, 0x01]); // PUBLISH, remaining length 133
        stream.extend(std::iter::repeat_n(0x10, 133)); // a body full of CONNECT-looking bytes
        stream.extend_from_slice(&[0xc0, 0x00]); // PINGREQ
        for cut in 0..stream.len() {
            let f = Framing::default();
            let (a, b) = stream.split_at_mut(cut);
            f.scan(a).unwrap();
            f.scan(b).unwrap();
            assert_eq!(f.scan.get(), Scan::Header, "cut at {cut}");
            assert_eq!(f.packets.get(), 3);
        }
    }

    const CONNECT_V5: &[u8] = &[0x10, 0x0f, 0, 4, b'M', b'Q', b'T', b'T', 5, 2, 0, 30, 0, 0, 2, b'm', b'1'];

    /// PUBLISH with `flags`, topic `a/b`, packet id `id`, no properties, payload `xy`.
    fn publish(flags: u8, id: u16) -> Vec<u8> {
        let mut p = vec![0x30 | flags, 10, 0, 3, b'a', b'/', b'b'];
        p.extend_from_slice(&id.to_be_bytes());
        p.extend_from_slice(&[0, b'x', b'y']);
        p
    }

    #[test]
    fn v5_qos2_publishes_are_handed_on_as_qos1_wherever_the_reads_split() {
        let mut stream = CONNECT_V5.to_vec();
        stream.extend(publish(0x04, 0x0102)); // QoS 2
        stream.extend(publish(0x02, 5)); // QoS 1
        stream.extend(publish(0x0c, 0x0304)); // QoS 2, DUP
        for cut in 0..stream.len() {
            let f = Framing::default();
            let mut bytes = stream.clone();
            let (a, b) = bytes.split_at_mut(cut);
            f.scan(a).unwrap();
            f.scan(b).unwrap();
            assert!(f.v5.get());
            let at = CONNECT_V5.len();
            assert_eq!((bytes[at], bytes[at + 12], bytes[at + 24]), (0x32, 0x32, 0x3a), "cut at {cut}");
            let mut ids: Vec<u16> = f.qos2.converted.borrow().iter().copied().collect();
            ids.sort();
            assert_eq!(ids, [0x0102, 0x0304], "cut at {cut}");
        }
        // MQTT 3.1.1: untouched (ntex-mqtt's v3 path frees the id).
        let f = Framing::default();
        let mut v3 = CONNECT.to_vec();
        v3.extend(publish(0x04, 9));
        let before = v3.clone();
        f.scan(&mut v3).unwrap();
        assert_eq!(v3, before);
        assert!(f.qos2.converted.borrow().is_empty());
    }

    #[test]
    fn the_puback_of_a_converted_publish_becomes_its_pubrec() {
        let f = Framing::default();
        f.v5.set(true);
        f.qos2.converted.borrow_mut().insert(0x0102);
        // PUBACK 0x0102 (converted), PUBACK 5 (a QoS 1 publish), a PINGRESP, split in two writes.
        let first: &[u8] = &[0x40, 0x02, 0x01, 0x02, 0x40, 0x03];
        let second: &[u8] = &[0x00, 0x05, 0x00, 0xd0, 0x00];
        assert_eq!(f.scan_write([first].into_iter()), vec![(0, 0x50)]);
        assert!(f.scan_write([second].into_iter()).is_empty());
        assert!(f.qos2.converted.borrow().is_empty());
        assert_eq!(f.write.get(), WScan::Header);
    }

    #[test]
    fn a_second_connect_and_overlong_lengths_are_refused() {
        let f = Framing::default();
        f.scan(&mut CONNECT.to_vec()).unwrap();
        assert!(f.scan(&mut CONNECT.to_vec()).is_err());
        let f = Framing::default();
        f.scan(&mut CONNECT.to_vec()).unwrap();
        assert!(f.scan(&mut [0x30, 0xff, 0xff, 0xff, 0xff, 0x01]).is_err());
    }
}
