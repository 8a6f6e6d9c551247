//! A read-side guard under ntex-mqtt: it follows the MQTT packet boundaries of everything a
//! client sends and ends the connection on what ntex-mqtt 8 would otherwise pass over in
//! silence: a second CONNECT [MQTT-3.1.0-2]. Bytes pass through unchanged (the buffer is
//! handed over, not copied, when the decoder has nothing pending).

use std::cell::Cell;
use std::io;

use ntex::io::{FilterBuf, FilterLayer};

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
enum Scan {
    /// Expecting the first byte of a packet.
    #[default]
    Header,
    /// Reading the remaining length (variable-byte integer).
    Length { value: u32, shift: u32 },
    /// Inside a packet body: this many bytes left.
    Body(u32),
}

/// The guard; one per connection.
#[derive(Debug, Default)]
pub struct Framing {
    scan: Cell<Scan>,
    packets: Cell<u64>,
}

/// Why the guard closed a connection.
fn violation(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what.to_string())
}

impl Framing {
    /// Follows `bytes` through the packet boundaries.
    fn scan(&self, mut bytes: &[u8]) -> io::Result<()> {
        let mut scan = self.scan.get();
        while !bytes.is_empty() {
            match scan {
                Scan::Header => {
                    let kind = bytes[0] >> 4;
                    let n = self.packets.get();
                    if n > 0 && kind == 1 {
                        return Err(violation("a second CONNECT on one connection"));
                    }
                    self.packets.set(n + 1);
                    scan = Scan::Length { value: 0, shift: 0 };
                    bytes = &bytes[1..];
                }
                Scan::Length { value, shift } => {
                    let b = bytes[0];
                    bytes = &bytes[1..];
                    let value = value | (u32::from(b & 0x7f) << shift);
                    scan = if b & 0x80 != 0 {
                        if shift >= 21 {
                            return Err(violation("remaining length longer than four bytes"));
                        }
                        Scan::Length { value, shift: shift + 7 }
                    } else if value == 0 {
                        Scan::Header
                    } else {
                        Scan::Body(value)
                    };
                }
                Scan::Body(left) => {
                    let take = (left as usize).min(bytes.len());
                    bytes = &bytes[take..];
                    let left = left - take as u32;
                    scan = if left == 0 { Scan::Header } else { Scan::Body(left) };
                }
            }
        }
        self.scan.set(scan);
        Ok(())
    }
}

impl FilterLayer for Framing {
    fn process_read_buf(&self, buf: &FilterBuf<'_>) -> io::Result<()> {
        buf.with_read_buffers(|src, dst| {
            let Some(src) = src else { return Ok(()) };
            self.scan(src)?;
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
        buf.with_write_buffers(|src, dst| src.move_to(dst));
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
            f.scan(&stream[..cut]).unwrap();
            f.scan(&stream[cut..]).unwrap();
            assert_eq!(f.scan.get(), Scan::Header, "cut at {cut}");
            assert_eq!(f.packets.get(), 3);
        }
    }

    #[test]
    fn a_second_connect_and_overlong_lengths_are_refused() {
        let f = Framing::default();
        f.scan(CONNECT).unwrap();
        assert!(f.scan(CONNECT).is_err());
        let f = Framing::default();
        f.scan(CONNECT).unwrap();
        assert!(f.scan(&[0x30, 0xff, 0xff, 0xff, 0xff, 0x01]).is_err());
    }
}
