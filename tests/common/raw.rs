//! Raw MQTT packets, for the tests where bytes on the wire matter (malformed input, packet ids).

/// A packet: fixed header byte, remaining length (variable-length encoded), body.
pub fn packet(first: u8, body: &[u8]) -> Vec<u8> {
    let mut out = vec![first];
    orbmanager::sim::client::put_varint(&mut out, body.len());
    out.extend_from_slice(body);
    out
}

/// A length-prefixed string (raw bytes as given).
pub fn utf8(s: &[u8]) -> Vec<u8> {
    let mut out = (s.len() as u16).to_be_bytes().to_vec();
    out.extend_from_slice(s);
    out
}
