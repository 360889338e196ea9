//! The PROXY protocol header (HAProxy's v1 text and v2 binary forms) that a load balancer puts
//! before a connection's own bytes to name the client, and the `proxy_from` CIDR blocks that say
//! which peers may send one.
//!
//! Owns: deciding, from the bytes peeked so far, whether they hold a whole header, may still
//! become one, or never can; and what a header says about the client.
//!
//! Never does: I/O or waiting (the worker peeks, reads and enforces the timeout); trusting a peer
//! (the worker checks [`Cidr::contains`] before it calls [`parse`]); allocating in proportion to
//! its input (everything is read in place; the largest scratch buffer is 52 bytes on the stack).
//!
//! Spec: <https://www.haproxy.org/download/2.9/doc/proxy-protocol.txt>. Where the spec leaves a
//! choice this module refuses: a header that names the client is a security boundary, so
//! anything a real proxy would not send is an error, decided as soon as the bytes seen so far
//! cannot start a valid header (a plaintext or TLS client on a PROXY listener fails at its
//! first byte instead of waiting for the timeout).

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::str::FromStr;

/// Which header a listener expects (config `proxy_protocol = "v1" | "v2" | "any"`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Version {
    V1,
    V2,
    /// Either, told apart by the first byte (`P` or `\r`).
    Any,
}

impl FromStr for Version {
    type Err = String;

    fn from_str(s: &str) -> Result<Version, String> {
        match s {
            "v1" => Ok(Version::V1),
            "v2" => Ok(Version::V2),
            "any" => Ok(Version::Any),
            _ => Err(format!("unknown PROXY protocol version {s:?}: expected \"v1\", \"v2\" or \"any\"")),
        }
    }
}

impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Version::V1 => "v1",
            Version::V2 => "v2",
            Version::Any => "any",
        })
    }
}

/// The longest header accepted: 16 fixed bytes of v2 plus at most 2048 bytes of addresses and
/// TLVs (a v1 header is at most 107 bytes). Everything HAProxy 2.9 can send fits
/// with room to spare: the largest address block (AF_UNIX, 216 bytes) plus ALPN, authority
/// (SNI) and netns (each at most 255 bytes), unique-id (at most 128), CRC32C and the SSL block
/// (version, client-cert CN, cipher, signature and key algorithms) come to about 1.4 KiB. The
/// bound is what one not-yet-identified connection can make a worker hold, and the most the
/// worker peeks.
pub const MAX_HEADER: usize = V2_FIXED + 2048;

/// The longest v1 header, CRLF included: "PROXY UNKNOWN" with two full-length IPv6 addresses
/// and two 5-digit ports (the spec's own figure).
const V1_MAX: usize = 107;

/// The v2 signature, chosen by the spec to be invalid in every text protocol.
const V2_SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";

/// Signature, version/command, family/transport and the 2-byte length.
const V2_FIXED: usize = 16;

/// The longest address text std parses: "ffff:ffff:ffff:ffff:ffff:ffff:255.255.255.255".
const MAX_ADDRESS_TEXT: usize = 45;

/// A header, parsed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    /// The client the proxy names; `None` for v1 `UNKNOWN` and v2 `LOCAL` (a health check from
    /// the proxy itself) or an address family we do not map (AF_UNIX, UNSPEC): the connection's
    /// own peer address stands.
    pub source: Option<SocketAddr>,
    /// Bytes the header takes at the start of the stream: never more than the buffer parsed,
    /// nor than [`MAX_HEADER`].
    pub len: usize,
}

/// What the bytes seen so far are.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Parsed {
    /// A valid start of a header: peek again once more bytes have arrived.
    Incomplete,
    /// A whole header, `len` bytes long; what follows belongs to the app (or to TLS).
    Done(Header),
}

/// Why the bytes are not a header the listener accepts: close the connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Error(&'static str);

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.0)
    }
}

impl std::error::Error for Error {}

const NOT_PROXY: Error = Error("not a PROXY protocol header");
const V1_ON_V2: Error = Error("PROXY protocol v1 header on a listener that expects v2");
const V2_ON_V1: Error = Error("PROXY protocol v2 header on a listener that expects v1");
const V1_TOO_LONG: Error = Error("v1 header longer than 107 bytes");
const V1_PROTOCOL: Error = Error("bad v1 protocol (expected TCP4, TCP6 or UNKNOWN)");
const V1_UNKNOWN_BYTE: Error = Error("bad byte in v1 UNKNOWN header");
const V1_FIELDS: Error = Error("wrong number of fields in v1 header");
const BAD_SOURCE_ADDRESS: Error = Error("bad source address");
const BAD_DESTINATION_ADDRESS: Error = Error("bad destination address");
const BAD_SOURCE_PORT: Error = Error("bad source port");
const BAD_DESTINATION_PORT: Error = Error("bad destination port");
const V2_VERSION: Error = Error("unsupported v2 version");
const V2_COMMAND: Error = Error("unsupported v2 command");
const V2_FAMILY: Error = Error("unsupported v2 address family or transport");
const V2_TOO_LONG: Error = Error("v2 header too long");
const V2_ADDRESSES_SHORT: Error = Error("v2 address block too short for its family");

/// Reads the header at the start of `buf`, the bytes peeked from a new connection so far.
///
/// `Incomplete` only while `buf` is a valid start of a header, and never once
/// `buf.len() >= MAX_HEADER`; `Err` as soon as it cannot be one.
pub fn parse(buf: &[u8], version: Version) -> Result<Parsed, Error> {
    let Some(&first) = buf.first() else {
        return Ok(Parsed::Incomplete);
    };
    match (first, version) {
        (b'P', Version::V1 | Version::Any) => parse_v1(buf),
        (b'\r', Version::V2 | Version::Any) => parse_v2(buf),
        // Name the mix-up only when it is certain, so that "POST" is not called a v1 header.
        _ if buf.starts_with(b"PROXY ") => Err(V1_ON_V2),
        _ if buf.starts_with(&V2_SIGNATURE) => Err(V2_ON_V1),
        _ => Err(NOT_PROXY),
    }
}

// ---- v1: "PROXY TCP4 <src> <dst> <sport> <dport>\r\n" -----------------------------------------

/// Whether a v1 line is known to be whole (its CRLF seen) or may still grow.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Seen {
    Whole,
    Prefix,
}

fn parse_v1(buf: &[u8]) -> Result<Parsed, Error> {
    // The CRLF must come within the first 107 bytes; nothing past them can matter.
    let window = &buf[..buf.len().min(V1_MAX)];
    if let Some(end) = window.windows(2).position(|pair| pair == b"\r\n") {
        let source = v1_line(&window[..end], Seen::Whole)?;
        return Ok(Parsed::Done(Header { source, len: end + 2 }));
    }
    match window.split_last() {
        // Only the LF may come next, so the line before it must already be whole.
        Some((b'\r', line)) => v1_line(line, Seen::Whole)?,
        _ => v1_line(window, Seen::Prefix)?,
    };
    if buf.len() >= V1_MAX {
        return Err(V1_TOO_LONG);
    }
    Ok(Parsed::Incomplete)
}

/// Checks a v1 line without its CRLF (or, for `Seen::Prefix`, its start) and returns the source.
fn v1_line(line: &[u8], seen: Seen) -> Result<Option<SocketAddr>, Error> {
    let prefix = seen == Seen::Prefix;
    let Some(rest) = line.strip_prefix(b"PROXY ") else {
        return if prefix && b"PROXY ".starts_with(line) { Ok(None) } else { Err(NOT_PROXY) };
    };

    // UNKNOWN: the spec says to ignore whatever follows up to the CRLF; we still want it to be
    // text, after a space, so that "UNKNOWNX" or a stray CR or NUL is not taken for a header.
    if let Some(after) = rest.strip_prefix(b"UNKNOWN") {
        return match after.split_first() {
            None => Ok(None),
            Some((b' ', text)) if text.iter().all(|b| (b' '..=b'~').contains(b)) => Ok(None),
            Some((b' ', _)) => Err(V1_UNKNOWN_BYTE),
            Some(_) => Err(V1_PROTOCOL),
        };
    }
    if prefix && b"UNKNOWN".starts_with(rest) {
        return Ok(None);
    }

    // TCP4 or TCP6: exactly five fields after "PROXY ", each followed by one space but the last.
    let mut fields: [&[u8]; 5] = [b""; 5];
    let mut count = 0;
    for field in rest.split(|&b| b == b' ') {
        let slot = fields.get_mut(count).ok_or(V1_FIELDS)?;
        *slot = field;
        count += 1;
    }
    // Only the last field seen may be cut short, and only when the line may still grow.
    let is_partial = |index: usize| prefix && index + 1 == count;

    let [protocol, src, dst, sport, dport] = fields;
    let family = match protocol {
        b"TCP4" => Family::V4,
        b"TCP6" => Family::V6,
        _ if is_partial(0) && (b"TCP4".starts_with(protocol) || b"TCP6".starts_with(protocol)) => {
            return Ok(None);
        }
        _ => return Err(V1_PROTOCOL),
    };
    if !prefix && count != 5 {
        return Err(V1_FIELDS);
    }

    let src = v1_address(src, family, count > 1, is_partial(1)).ok_or(BAD_SOURCE_ADDRESS)?;
    v1_address(dst, family, count > 2, is_partial(2)).ok_or(BAD_DESTINATION_ADDRESS)?;
    let sport = v1_port(sport, count > 3, is_partial(3)).ok_or(BAD_SOURCE_PORT)?;
    v1_port(dport, count > 4, is_partial(4)).ok_or(BAD_DESTINATION_PORT)?;

    Ok(match (src, sport) {
        (Some(ip), Some(port)) if !prefix => Some(SocketAddr::new(ip, port)),
        _ => None,
    })
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Family {
    V4,
    V6,
}

/// Checks one address field: `Some(Some(ip))` when whole and valid, `Some(None)` when not yet
/// seen or cut short but still able to become valid, `None` when it never can.
fn v1_address(text: &[u8], family: Family, present: bool, partial: bool) -> Option<Option<IpAddr>> {
    if !present {
        return Some(None);
    }
    if partial {
        return could_become_address(text, family).then_some(None);
    }
    parse_address(text, family).map(Some)
}

/// Parses address text the way std does (dotted quads without leading zeros for IPv4; no zone
/// for IPv6), in the family the protocol field named.
fn parse_address(text: &[u8], family: Family) -> Option<IpAddr> {
    let text = std::str::from_utf8(text).ok()?;
    match family {
        Family::V4 => text.parse::<Ipv4Addr>().ok().map(IpAddr::V4),
        Family::V6 => text.parse::<Ipv6Addr>().ok().map(IpAddr::V6),
    }
}

/// Whether `text` is the start of some address of `family`. Rather than a second grammar for
/// address prefixes, it asks std's parser whether one of a few endings completes it: whatever
/// an address prefix ends in (a group, a colon, "::", a dot, an octet), one of these does.
fn could_become_address(text: &[u8], family: Family) -> bool {
    const ENDINGS: [&[u8]; 12] =
        [b"", b"0", b":", b"::", b":0", b"0::", b".0", b"0.0", b".0.0", b"0.0.0", b".0.0.0", b"0.0.0.0"];
    const LONGEST_ENDING: usize = 7;
    if text.len() > MAX_ADDRESS_TEXT {
        return false;
    }
    let mut scratch = [0u8; MAX_ADDRESS_TEXT + LONGEST_ENDING];
    scratch[..text.len()].copy_from_slice(text);
    ENDINGS.iter().any(|ending| {
        let end = text.len() + ending.len();
        scratch[text.len()..end].copy_from_slice(ending);
        parse_address(&scratch[..end], family).is_some()
    })
}

/// Checks one port field like [`v1_address`]: decimal 0-65535, no sign, no leading zero.
fn v1_port(text: &[u8], present: bool, partial: bool) -> Option<Option<u16>> {
    if !present || (partial && text.is_empty()) {
        return Some(None);
    }
    let digits_only = text.iter().all(u8::is_ascii_digit);
    let leading_zero = text.len() > 1 && text.first() == Some(&b'0');
    if !digits_only || leading_zero || text.is_empty() || text.len() > 5 {
        return None;
    }
    let value = text.iter().fold(0u32, |value, digit| value * 10 + u32::from(digit - b'0'));
    let port = u16::try_from(value).ok()?;
    Some(if partial { None } else { Some(port) })
}

// ---- v2: signature, version/command, family/transport, length, addresses, TLVs ---------------

const V2_CMD_LOCAL: u8 = 0x0;
const V2_CMD_PROXY: u8 = 0x1;
const V2_UNSPEC: u8 = 0x00;
const V2_TCP4: u8 = 0x11;
const V2_TCP6: u8 = 0x21;
const V2_UNIX_STREAM: u8 = 0x31;

fn parse_v2(buf: &[u8]) -> Result<Parsed, Error> {
    let signature_seen = buf.len().min(V2_SIGNATURE.len());
    if buf.get(..signature_seen) != V2_SIGNATURE.get(..signature_seen) {
        return Err(NOT_PROXY);
    }

    let Some(&version_command) = buf.get(12) else {
        return Ok(Parsed::Incomplete);
    };
    if version_command >> 4 != 2 {
        return Err(V2_VERSION);
    }
    let command = version_command & 0x0f;
    if command != V2_CMD_LOCAL && command != V2_CMD_PROXY {
        return Err(V2_COMMAND);
    }
    // LOCAL (the proxy's own health check): the spec says to discard the block, family included.
    let local = command == V2_CMD_LOCAL;

    let Some(&family) = buf.get(13) else {
        return Ok(Parsed::Incomplete);
    };
    // Stream families only: a UDP family (or an undefined value) on a TCP server is a lie.
    let least = match family {
        _ if local => 0,
        V2_UNSPEC => 0,
        V2_TCP4 => 12,
        V2_TCP6 => 36,
        V2_UNIX_STREAM => 216,
        _ => return Err(V2_FAMILY),
    };

    let Some(&[high, low]) = buf.get(14..16) else {
        return Ok(Parsed::Incomplete);
    };
    let length = usize::from(u16::from_be_bytes([high, low]));
    if length > MAX_HEADER - V2_FIXED {
        return Err(V2_TOO_LONG);
    }
    if length < least {
        return Err(V2_ADDRESSES_SHORT);
    }

    let len = V2_FIXED + length;
    // What follows the addresses are TLVs: nothing in them is used, so they are skipped whole.
    let Some(block) = buf.get(V2_FIXED..len) else {
        return Ok(Parsed::Incomplete);
    };
    let source = match family {
        _ if local => None,
        V2_TCP4 => {
            let (&ip, rest) = block.split_first_chunk::<4>().ok_or(V2_ADDRESSES_SHORT)?;
            let (&port, _) = rest.get(4..).and_then(<[u8]>::split_first_chunk::<2>).ok_or(V2_ADDRESSES_SHORT)?;
            Some(SocketAddr::new(IpAddr::from(ip), u16::from_be_bytes(port)))
        }
        V2_TCP6 => {
            let (&ip, rest) = block.split_first_chunk::<16>().ok_or(V2_ADDRESSES_SHORT)?;
            let (&port, _) = rest.get(16..).and_then(<[u8]>::split_first_chunk::<2>).ok_or(V2_ADDRESSES_SHORT)?;
            Some(SocketAddr::new(IpAddr::from(ip), u16::from_be_bytes(port)))
        }
        // UNSPEC and AF_UNIX: nothing an IP peer address can be replaced with.
        _ => None,
    };
    Ok(Parsed::Done(Header { source, len }))
}

// ---- proxy_from ------------------------------------------------------------------------------

/// A CIDR block for `proxy_from` ("127.0.0.0/8", "::1/128", "10.0.0.5" meaning /32 or /128).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Cidr {
    /// The first address of the block: no bits set past `prefix`.
    network: IpAddr,
    prefix: u8,
}

impl Cidr {
    /// Whether `ip` is in the block. An IPv4-mapped IPv6 address (`::ffff:a.b.c.d`, what a
    /// dual-stack listener reports for an IPv4 peer) is the IPv4 address it maps, both ways.
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = match (self.network, ip) {
            (IpAddr::V4(_), IpAddr::V6(v6)) => match v6.to_ipv4_mapped() {
                Some(v4) => IpAddr::V4(v4),
                None => return false,
            },
            (IpAddr::V6(_), IpAddr::V4(v4)) => IpAddr::V6(v4.to_ipv6_mapped()),
            _ => ip,
        };
        masked(ip, self.prefix) == self.network
    }
}

/// `ip` with every bit past the first `prefix` cleared.
fn masked(ip: IpAddr, prefix: u8) -> IpAddr {
    // checked_shl: a /0 block shifts by the whole width, which `<<` would reject.
    match ip {
        IpAddr::V4(ip) => {
            let mask = u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0);
            IpAddr::V4(Ipv4Addr::from(u32::from(ip) & mask))
        }
        IpAddr::V6(ip) => {
            let mask = u128::MAX.checked_shl(128 - u32::from(prefix)).unwrap_or(0);
            IpAddr::V6(Ipv6Addr::from(u128::from(ip) & mask))
        }
    }
}

impl FromStr for Cidr {
    type Err = String;

    fn from_str(s: &str) -> Result<Cidr, String> {
        let (address, prefix) = match s.split_once('/') {
            Some((address, prefix)) => (address, Some(prefix)),
            None => (s, None),
        };
        let network: IpAddr = address.parse().map_err(|_| format!("bad address {address:?} in CIDR block {s:?}"))?;
        let most = if network.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            None => most,
            // u8's parser takes a leading '+'; a prefix length is digits only.
            Some(text) if !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit()) => {
                text.parse::<u8>().ok().filter(|&prefix| prefix <= most).ok_or_else(|| {
                    format!("prefix length /{text} too long in CIDR block {s:?} (at most /{most} for {address})")
                })?
            }
            Some(text) => return Err(format!("bad prefix length {text:?} in CIDR block {s:?}")),
        };
        // "10.0.0.5/8" is a typo either way (for 10.0.0.0/8 or 10.0.0.5/32); on an allow list,
        // guessing which would widen or narrow who may name clients, so say instead.
        let first = masked(network, prefix);
        if first != network {
            return Err(format!(
                "CIDR block {s:?} has bits set past its /{prefix} prefix (did you mean {first}/{prefix}?)"
            ));
        }
        Ok(Cidr { network, prefix })
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.network, self.prefix)
    }
}

/// The default `proxy_from`: loopback only (127.0.0.0/8 and ::1/128).
pub fn loopback() -> Vec<Cidr> {
    vec![
        Cidr { network: IpAddr::V4(Ipv4Addr::new(127, 0, 0, 0)), prefix: 8 },
        Cidr { network: IpAddr::V6(Ipv6Addr::LOCALHOST), prefix: 128 },
    ]
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn done(buf: &[u8], version: Version) -> Header {
        match parse(buf, version) {
            Ok(Parsed::Done(header)) => header,
            other => panic!("{:?}: expected Done, got {other:?}", String::from_utf8_lossy(buf)),
        }
    }

    fn refused(buf: &[u8], version: Version) -> Error {
        match parse(buf, version) {
            Err(error) => error,
            other => panic!("{:?}: expected Err, got {other:?}", String::from_utf8_lossy(buf)),
        }
    }

    fn incomplete(buf: &[u8], version: Version) -> bool {
        parse(buf, version) == Ok(Parsed::Incomplete)
    }

    fn addr(text: &str) -> Option<SocketAddr> {
        Some(text.parse().unwrap())
    }

    /// A v2 header: `family` byte, `block` of addresses and TLVs, command PROXY.
    fn v2(command: u8, family: u8, block: &[u8]) -> Vec<u8> {
        let mut header = V2_SIGNATURE.to_vec();
        header.push(0x20 | command);
        header.push(family);
        header.extend_from_slice(&u16::try_from(block.len()).unwrap().to_be_bytes());
        header.extend_from_slice(block);
        header
    }

    fn v2_tcp4_block(src: [u8; 4], dst: [u8; 4], sport: u16, dport: u16) -> Vec<u8> {
        [&src[..], &dst, &sport.to_be_bytes(), &dport.to_be_bytes()].concat()
    }

    // ---- v1 accepted ----

    #[test]
    fn v1_tcp4_gives_source_and_length() {
        let line = b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\n";
        assert_eq!(done(line, Version::V1), Header { source: addr("192.168.0.1:56324"), len: line.len() });
    }

    #[test]
    fn v1_tcp6_gives_source_and_length() {
        let line = b"PROXY TCP6 2001:db8::1 ::1 65535 0\r\n";
        assert_eq!(done(line, Version::V1), Header { source: addr("[2001:db8::1]:65535"), len: line.len() });
    }

    #[test]
    fn v1_tcp6_accepts_ipv4_mapped_text() {
        let line = b"PROXY TCP6 ::ffff:10.1.2.3 ::ffff:10.0.0.1 80 8080\r\n";
        assert_eq!(done(line, Version::V1).source, addr("[::ffff:10.1.2.3]:80"));
    }

    #[test]
    fn v1_unknown_alone_has_no_source() {
        assert_eq!(done(b"PROXY UNKNOWN\r\n", Version::V1), Header { source: None, len: 15 });
    }

    #[test]
    fn v1_unknown_ignores_text_after_a_space() {
        let line = b"PROXY UNKNOWN ffff:f::1 whatever 1 2\r\n";
        assert_eq!(done(line, Version::V1), Header { source: None, len: line.len() });
    }

    #[test]
    fn v1_bytes_after_crlf_belong_to_the_app() {
        let buf = b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r\nGET / HTTP/1.1\r\n\r\n";
        assert_eq!(done(buf, Version::V1).len, 32);
    }

    #[test]
    fn v1_header_of_exactly_107_bytes_is_accepted() {
        let full = "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff";
        let line = format!("PROXY TCP6 {full} {full} 65535 65535\r\n");
        assert_eq!(done(line.as_bytes(), Version::V1).len, 104);
        // The spec's worst case: UNKNOWN, three bytes longer than TCP6.
        let line = format!("PROXY UNKNOWN {full} {full} 65535 65535\r\n");
        assert_eq!(line.len(), 107);
        assert_eq!(done(line.as_bytes(), Version::V1).len, 107);
    }

    #[test]
    fn v1_prefixes_wait_for_more() {
        for prefix in ["P", "PROXY", "PROXY ", "PROXY TCP", "PROXY TCP4 192.168.", "PROXY TCP4 1.2.3.4 5.6.7.8 6553"] {
            assert!(incomplete(prefix.as_bytes(), Version::V1), "{prefix}");
        }
        assert!(incomplete(b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r", Version::V1));
        assert!(incomplete(b"PROXY UNKNOWN", Version::V1));
        assert!(incomplete(b"PROXY UNKNOWN 1.2.3.4", Version::V1));
    }

    #[test]
    fn v1_every_prefix_of_tricky_ipv6_forms_waits() {
        let forms = [
            "::",
            "::1",
            "1::",
            "1:2:3:4:5:6:7:8",
            "1:2:3:4:5:6:1.2.3.4",
            "::ffff:255.255.255.255",
            "::1.2.3.4",
            "ABCD:0001::ef",
            "1:2:3:4:5:6:7::",
            "ffff:ffff:ffff:ffff:ffff:ffff:255.255.255.255",
        ];
        for form in forms {
            // The 45-byte form twice would pass 107 bytes; inet_ntop never writes it.
            let line = format!("PROXY TCP6 {form} ::1 1 2\r\n");
            for end in 0..line.len() {
                assert!(incomplete(&line.as_bytes()[..end], Version::V1), "{:?}", &line[..end]);
            }
            assert_eq!(done(line.as_bytes(), Version::V1).len, line.len());
        }
    }

    // ---- v1 refused ----

    #[test]
    fn plaintext_http_is_refused_at_its_first_wrong_byte() {
        assert_eq!(refused(b"G", Version::Any), NOT_PROXY);
        assert_eq!(refused(b"PO", Version::Any), NOT_PROXY);
        assert_eq!(refused(b"GET / HTTP/1.1\r\n", Version::V1), NOT_PROXY);
    }

    #[test]
    fn tls_client_hello_is_refused_at_its_first_byte() {
        for version in [Version::V1, Version::V2, Version::Any] {
            assert_eq!(refused(&[0x16], version), NOT_PROXY);
            assert_eq!(refused(&[0x16, 0x03, 0x01, 0x02, 0x00], version), NOT_PROXY);
        }
    }

    #[test]
    fn empty_buffer_waits() {
        for version in [Version::V1, Version::V2, Version::Any] {
            assert!(incomplete(b"", version));
        }
    }

    #[test]
    fn v1_without_crlf_within_107_bytes_is_refused() {
        let long = format!("PROXY UNKNOWN {}", "a".repeat(92));
        assert_eq!(long.len(), 106);
        assert!(incomplete(long.as_bytes(), Version::V1));
        assert_eq!(refused(format!("{long}a").as_bytes(), Version::V1), V1_TOO_LONG);
        // The CRLF one byte too late: CR at 106, LF at 107.
        assert_eq!(refused(format!("{long}\r").as_bytes(), Version::V1), V1_TOO_LONG);
        assert_eq!(refused(format!("{long}\r\n").as_bytes(), Version::V1), V1_TOO_LONG);
        assert_eq!(refused(format!("{long}a\r\n").as_bytes(), Version::V1), V1_TOO_LONG);
    }

    #[test]
    fn v1_refuses_lowercase_or_unknown_protocol() {
        assert_eq!(refused(b"proxy", Version::V1), NOT_PROXY);
        assert_eq!(refused(b"PROXY tcp4", Version::V1), V1_PROTOCOL);
        assert_eq!(refused(b"PROXY UDP4", Version::V1), V1_PROTOCOL);
        assert_eq!(refused(b"PROXY TCP5", Version::V1), V1_PROTOCOL);
        assert_eq!(refused(b"PROXY\r\n", Version::V1), NOT_PROXY);
        assert_eq!(refused(b"PROXY \r\n", Version::V1), V1_PROTOCOL);
    }

    #[test]
    fn v1_refuses_double_and_trailing_spaces() {
        assert_eq!(refused(b"PROXY  TCP4", Version::V1), V1_PROTOCOL);
        assert_eq!(refused(b"PROXY TCP4  1.2.3.4", Version::V1), BAD_SOURCE_ADDRESS);
        assert_eq!(refused(b"PROXY TCP4 1.2.3.4 5.6.7.8  1", Version::V1), BAD_SOURCE_PORT);
        assert_eq!(refused(b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 ", Version::V1), V1_FIELDS);
        assert_eq!(refused(b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 \r\n", Version::V1), V1_FIELDS);
    }

    #[test]
    fn v1_refuses_missing_fields() {
        assert_eq!(refused(b"PROXY TCP4\r\n", Version::V1), V1_FIELDS);
        assert_eq!(refused(b"PROXY TCP4 1.2.3.4 5.6.7.8 1\r\n", Version::V1), V1_FIELDS);
    }

    #[test]
    fn v1_refuses_address_of_the_other_family() {
        assert_eq!(refused(b"PROXY TCP4 ::1", Version::V1), BAD_SOURCE_ADDRESS);
        assert_eq!(refused(b"PROXY TCP6 ::1 1.2.3.4 1 2\r\n", Version::V1), BAD_DESTINATION_ADDRESS);
        assert_eq!(refused(b"PROXY TCP6 1.2.3.4 ", Version::V1), BAD_SOURCE_ADDRESS);
    }

    #[test]
    fn v1_refuses_malformed_addresses_early() {
        for bad in ["01.2.3.4", "1.2.3.256", "1.2.3", "1.2.3.4.5", "1..2", "a.b.c.d", "1.2.3.4%", "1.2.3.4\r"] {
            let line = format!("PROXY TCP4 {bad} ");
            assert_eq!(refused(line.as_bytes(), Version::V1), BAD_SOURCE_ADDRESS, "{bad:?}");
        }
        for bad in [":::", "1:::2", "12345::", "g::", "1::2::3", "::1%eth0", "1:2:3:4:5:6:7:8:9"] {
            let line = format!("PROXY TCP6 {bad} ");
            assert_eq!(refused(line.as_bytes(), Version::V1), BAD_SOURCE_ADDRESS, "{bad:?}");
        }
    }

    #[test]
    fn v1_refuses_bad_ports() {
        for bad in ["65536", "+80", "-1", "080", "8a", "123456", "0x50"] {
            let line = format!("PROXY TCP4 1.2.3.4 5.6.7.8 {bad} 443\r\n");
            assert_eq!(refused(line.as_bytes(), Version::V1), BAD_SOURCE_PORT, "{bad:?}");
            let line = format!("PROXY TCP4 1.2.3.4 5.6.7.8 80 {bad}\r\n");
            assert_eq!(refused(line.as_bytes(), Version::V1), BAD_DESTINATION_PORT, "{bad:?}");
        }
        // Without waiting for the CRLF.
        assert_eq!(refused(b"PROXY TCP4 1.2.3.4 5.6.7.8 8a", Version::V1), BAD_SOURCE_PORT);
        assert_eq!(refused(b"PROXY TCP4 1.2.3.4 5.6.7.8 80 65536", Version::V1), BAD_DESTINATION_PORT);
    }

    #[test]
    fn v1_refuses_line_ends_other_than_crlf() {
        assert_eq!(refused(b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n", Version::V1), BAD_DESTINATION_PORT);
        assert_eq!(refused(b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r\r\n", Version::V1), BAD_DESTINATION_PORT);
        assert_eq!(refused(b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\rX", Version::V1), BAD_DESTINATION_PORT);
        assert_eq!(refused(b"PROXY UNKNOWN\n", Version::V1), V1_PROTOCOL);
        assert_eq!(refused(b"PROXY UNKNOWN foo\n", Version::V1), V1_UNKNOWN_BYTE);
    }

    #[test]
    fn v1_refuses_unknown_glued_to_text_or_followed_by_control_bytes() {
        assert_eq!(refused(b"PROXY UNKNOWNX\r\n", Version::V1), V1_PROTOCOL);
        assert_eq!(refused(b"PROXY UNKNOWN \0", Version::V1), V1_UNKNOWN_BYTE);
        assert_eq!(refused(b"PROXY UNKNOWN a\rb\r\n", Version::V1), V1_UNKNOWN_BYTE);
        assert_eq!(refused("PROXY UNKNOWN é\r\n".as_bytes(), Version::V1), V1_UNKNOWN_BYTE);
    }

    // ---- v2 accepted ----

    #[test]
    fn v2_tcp4_gives_source_and_length() {
        let header = v2(1, V2_TCP4, &v2_tcp4_block([10, 0, 0, 7], [10, 0, 0, 1], 40000, 443));
        assert_eq!(done(&header, Version::V2), Header { source: addr("10.0.0.7:40000"), len: 28 });
    }

    #[test]
    fn v2_tcp6_gives_source_and_length() {
        let src: Ipv6Addr = "2001:db8::7".parse().unwrap();
        let block = [&src.octets()[..], &Ipv6Addr::LOCALHOST.octets(), &[0x1f, 0x90], &[0, 80]].concat();
        let header = v2(1, V2_TCP6, &block);
        assert_eq!(done(&header, Version::V2), Header { source: addr("[2001:db8::7]:8080"), len: 52 });
    }

    #[test]
    fn v2_tlvs_count_in_length_and_app_bytes_follow() {
        let mut block = v2_tcp4_block([1, 2, 3, 4], [5, 6, 7, 8], 1, 2);
        block.extend_from_slice(&[0x05, 0x00, 0x03, b'a', b'b', b'c']); // PP2_TYPE_UNIQUE_ID "abc"
        let mut buf = v2(1, V2_TCP4, &block);
        buf.extend_from_slice(b"\x16\x03\x01 the TLS ClientHello");
        assert_eq!(done(&buf, Version::V2), Header { source: addr("1.2.3.4:1"), len: 16 + 18 });
    }

    #[test]
    fn v2_local_has_no_source_whatever_the_family() {
        assert_eq!(done(&v2(0, V2_UNSPEC, &[]), Version::V2), Header { source: None, len: 16 });
        let block = v2_tcp4_block([1, 2, 3, 4], [5, 6, 7, 8], 1, 2);
        assert_eq!(done(&v2(0, V2_TCP4, &block), Version::V2).source, None);
        assert_eq!(done(&v2(0, 0x12, &[]), Version::V2).source, None);
        assert_eq!(done(&v2(0, 0xff, &[1, 2, 3]), Version::V2), Header { source: None, len: 19 });
    }

    #[test]
    fn v2_unspec_and_unix_have_no_source() {
        assert_eq!(done(&v2(1, V2_UNSPEC, &[]), Version::V2), Header { source: None, len: 16 });
        assert_eq!(done(&v2(1, V2_UNIX_STREAM, &[0; 216]), Version::V2), Header { source: None, len: 232 });
    }

    #[test]
    fn v2_prefixes_wait_for_more() {
        let mut block = v2_tcp4_block([1, 2, 3, 4], [5, 6, 7, 8], 1, 2);
        block.extend_from_slice(&[0xe0, 0x00, 0x02, 0xaa, 0xbb]);
        let header = v2(1, V2_TCP4, &block);
        for end in 0..header.len() {
            assert!(incomplete(&header[..end], Version::V2), "{end}");
        }
    }

    #[test]
    fn v2_header_of_max_length_is_done_at_max_header_bytes() {
        let header = v2(1, V2_TCP4, &[0; MAX_HEADER - V2_FIXED]);
        assert_eq!(header.len(), MAX_HEADER);
        assert!(incomplete(&header[..MAX_HEADER - 1], Version::V2));
        assert_eq!(done(&header, Version::V2).len, MAX_HEADER);
    }

    // ---- v2 refused ----

    #[test]
    fn v2_bad_signature_is_refused_at_its_first_wrong_byte() {
        assert!(incomplete(b"\r\n\r\n\0", Version::V2));
        assert_eq!(refused(b"\r\n\r\n\x01", Version::V2), NOT_PROXY);
        assert_eq!(refused(b"\r\n\r\n\0\r\nQUIX", Version::V2), NOT_PROXY);
    }

    #[test]
    fn v2_refuses_versions_other_than_2() {
        for version_command in [0x11, 0x31, 0x01, 0xf1] {
            let buf = [&V2_SIGNATURE[..], &[version_command]].concat();
            assert_eq!(refused(&buf, Version::V2), V2_VERSION, "{version_command:#x}");
        }
    }

    #[test]
    fn v2_refuses_commands_other_than_local_and_proxy() {
        for version_command in [0x22, 0x2f] {
            let buf = [&V2_SIGNATURE[..], &[version_command]].concat();
            assert_eq!(refused(&buf, Version::V2), V2_COMMAND);
        }
    }

    #[test]
    fn v2_refuses_datagram_and_undefined_families() {
        for family in [0x12, 0x22, 0x32, 0x10, 0x01, 0x13, 0x41, 0xff] {
            let buf = [&V2_SIGNATURE[..], &[0x21, family]].concat();
            assert_eq!(refused(&buf, Version::V2), V2_FAMILY, "{family:#x}");
        }
    }

    #[test]
    fn v2_refuses_length_over_max_header() {
        let length = u16::try_from(MAX_HEADER - V2_FIXED + 1).unwrap().to_be_bytes();
        let buf = [&V2_SIGNATURE[..], &[0x21, V2_TCP4], &length].concat();
        assert_eq!(refused(&buf, Version::V2), V2_TOO_LONG);
        let buf = [&V2_SIGNATURE[..], &[0x20, V2_UNSPEC, 0xff, 0xff]].concat();
        assert_eq!(refused(&buf, Version::V2), V2_TOO_LONG);
    }

    #[test]
    fn v2_refuses_address_block_too_short_for_its_family() {
        for (family, least) in [(V2_TCP4, 12u16), (V2_TCP6, 36), (V2_UNIX_STREAM, 216)] {
            let buf = [&V2_SIGNATURE[..], &[0x21, family], &(least - 1).to_be_bytes()].concat();
            assert_eq!(refused(&buf, Version::V2), V2_ADDRESSES_SHORT, "{family:#x}");
        }
    }

    // ---- versions ----

    #[test]
    fn any_accepts_both_versions() {
        assert_eq!(done(b"PROXY UNKNOWN\r\n", Version::Any).len, 15);
        assert_eq!(done(&v2(0, V2_UNSPEC, &[]), Version::Any).len, 16);
    }

    #[test]
    fn a_listener_refuses_the_other_version_and_says_so() {
        assert_eq!(refused(b"PROXY UNKNOWN\r\n", Version::V2), V1_ON_V2);
        assert_eq!(refused(&v2(0, V2_UNSPEC, &[]), Version::V1), V2_ON_V1);
        // Too short to tell: a plain refusal.
        assert_eq!(refused(b"PROX", Version::V2), NOT_PROXY);
        assert_eq!(refused(b"\r\n", Version::V1), NOT_PROXY);
    }

    #[test]
    fn never_incomplete_at_max_header_bytes() {
        let buf = [&b"PROXY UNKNOWN "[..], &[b'a'; MAX_HEADER]].concat();
        assert_eq!(refused(&buf[..MAX_HEADER], Version::Any), V1_TOO_LONG);
        let buf = [&b"PROXY TCP4 "[..], &[b'1'; MAX_HEADER]].concat();
        assert!(parse(&buf[..MAX_HEADER], Version::Any).is_err());
    }

    #[test]
    fn version_parses_config_names_and_refuses_others() {
        assert_eq!("v1".parse(), Ok(Version::V1));
        assert_eq!("v2".parse(), Ok(Version::V2));
        assert_eq!("any".parse(), Ok(Version::Any));
        for version in [Version::V1, Version::V2, Version::Any] {
            assert_eq!(version.to_string().parse(), Ok(version));
        }
        let error = "V1".parse::<Version>().unwrap_err();
        assert!(error.contains("\"V1\"") && error.contains("\"v1\", \"v2\" or \"any\""), "{error}");
        assert!("".parse::<Version>().is_err());
    }

    // ---- Cidr ----

    fn cidr(text: &str) -> Cidr {
        text.parse().unwrap_or_else(|error| panic!("{text}: {error}"))
    }

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    #[test]
    fn cidr_parses_blocks_and_displays_them() {
        assert_eq!(cidr("127.0.0.0/8").to_string(), "127.0.0.0/8");
        assert_eq!(cidr("::1/128").to_string(), "::1/128");
        assert_eq!(cidr("2001:db8::/32").to_string(), "2001:db8::/32");
        assert_eq!(cidr("0.0.0.0/0").to_string(), "0.0.0.0/0");
    }

    #[test]
    fn cidr_bare_address_is_a_single_host() {
        assert_eq!(cidr("10.0.0.5"), cidr("10.0.0.5/32"));
        assert_eq!(cidr("fe80::1"), cidr("fe80::1/128"));
        assert!(cidr("10.0.0.5").contains(ip("10.0.0.5")));
        assert!(!cidr("10.0.0.5").contains(ip("10.0.0.4")));
    }

    #[test]
    fn cidr_refuses_bad_addresses() {
        for bad in ["", "/8", "10.0.0/8", "10.0.0.256", "localhost/8", "::g/64", " 10.0.0.1", "10.0.0.1 "] {
            let error = bad.parse::<Cidr>().unwrap_err();
            assert!(error.contains("bad address"), "{bad:?}: {error}");
        }
    }

    #[test]
    fn cidr_refuses_prefix_too_long() {
        for bad in ["10.0.0.0/33", "::/129", "10.0.0.0/256", "10.0.0.0/99999999999"] {
            let error = bad.parse::<Cidr>().unwrap_err();
            assert!(error.contains("too long"), "{bad:?}: {error}");
        }
    }

    #[test]
    fn cidr_refuses_prefix_that_is_not_digits() {
        for bad in ["10.0.0.0/", "10.0.0.0/+8", "10.0.0.0/-1", "10.0.0.0/8a", "10.0.0.0/ 8", "10.0.0.0/8/8"] {
            let error = bad.parse::<Cidr>().unwrap_err();
            assert!(error.contains("bad prefix length"), "{bad:?}: {error}");
        }
    }

    #[test]
    fn cidr_refuses_bits_past_the_prefix_and_suggests_the_block() {
        let error = "10.0.0.5/8".parse::<Cidr>().unwrap_err();
        assert!(error.contains("did you mean 10.0.0.0/8?"), "{error}");
        assert!("2001:db8::1/32".parse::<Cidr>().is_err());
    }

    #[test]
    fn cidr_matches_by_prefix() {
        let block = cidr("192.168.0.0/16");
        assert!(block.contains(ip("192.168.0.0")));
        assert!(block.contains(ip("192.168.255.255")));
        assert!(!block.contains(ip("192.169.0.0")));
        let block = cidr("2001:db8::/33");
        assert!(block.contains(ip("2001:db8:7fff::1")));
        assert!(!block.contains(ip("2001:db8:8000::1")));
    }

    #[test]
    fn cidr_zero_prefix_matches_its_whole_family_and_mapped_addresses() {
        assert!(cidr("0.0.0.0/0").contains(ip("255.255.255.255")));
        assert!(cidr("0.0.0.0/0").contains(ip("::ffff:1.2.3.4")));
        assert!(!cidr("0.0.0.0/0").contains(ip("::1")));
        assert!(cidr("::/0").contains(ip("2001:db8::1")));
    }

    #[test]
    fn cidr_matches_ipv4_mapped_ipv6_peers() {
        let block = cidr("127.0.0.0/8");
        assert!(block.contains(ip("::ffff:127.0.0.1")));
        assert!(!block.contains(ip("::ffff:128.0.0.1")));
        // Only the mapped form: the deprecated "compatible" ::a.b.c.d (::1 among them) is IPv6.
        assert!(!block.contains(ip("::127.0.0.1")));
        assert!(!cidr("0.0.0.1/32").contains(ip("::1")));
        // And a block written in the mapped form matches the IPv4 address.
        assert!(cidr("::ffff:10.0.0.0/104").contains(ip("10.1.2.3")));
        assert!(!cidr("::ffff:10.0.0.0/104").contains(ip("11.1.2.3")));
    }

    #[test]
    fn loopback_is_127_8_and_ipv6_localhost() {
        let blocks = loopback();
        assert_eq!(blocks, vec![cidr("127.0.0.0/8"), cidr("::1/128")]);
        let allowed = |text: &str| blocks.iter().any(|block| block.contains(ip(text)));
        assert!(allowed("127.0.0.1") && allowed("127.255.0.9") && allowed("::1") && allowed("::ffff:127.0.0.1"));
        assert!(!allowed("10.0.0.1") && !allowed("::2") && !allowed("0.0.0.0"));
    }

    // ---- properties ----

    /// What a whole header at the start of `buf` is, worked out the plain way: whole lines and
    /// whole blocks with std's string tools, none of the incremental logic above. `None`: no
    /// valid whole header (an invalid one, or not all of it there yet).
    fn reference(buf: &[u8], version: Version) -> Option<Header> {
        let v1 = version != Version::V2 && buf.starts_with(b"PROXY ");
        let v2 = version != Version::V1 && buf.starts_with(&V2_SIGNATURE);
        if v1 {
            reference_v1(buf)
        } else if v2 {
            reference_v2(buf)
        } else {
            None
        }
    }

    fn reference_v1(buf: &[u8]) -> Option<Header> {
        let end = buf.windows(2).position(|pair| pair == b"\r\n")?;
        if end + 2 > 107 {
            return None;
        }
        let line = std::str::from_utf8(&buf[..end]).ok()?;
        let len = end + 2;
        if line == "PROXY UNKNOWN" {
            return Some(Header { source: None, len });
        }
        if let Some(text) = line.strip_prefix("PROXY UNKNOWN ") {
            return text.bytes().all(|b| (0x20..0x7f).contains(&b)).then_some(Header { source: None, len });
        }
        let fields: Vec<&str> = line.split(' ').collect();
        let [_, protocol, src, dst, sport, dport] = fields[..] else { return None };
        // Both addresses and both ports must be valid; the source is what a header names.
        let (src, _dst): (IpAddr, IpAddr) = match protocol {
            "TCP4" => (src.parse::<Ipv4Addr>().ok()?.into(), dst.parse::<Ipv4Addr>().ok()?.into()),
            "TCP6" => (src.parse::<Ipv6Addr>().ok()?.into(), dst.parse::<Ipv6Addr>().ok()?.into()),
            _ => return None,
        };
        let port = |text: &str| text.parse::<u16>().ok().filter(|port| port.to_string() == text);
        let (sport, _dport) = (port(sport)?, port(dport)?);
        Some(Header { source: Some(SocketAddr::new(src, sport)), len })
    }

    fn reference_v2(buf: &[u8]) -> Option<Header> {
        if buf.len() < 16 || buf[12] >> 4 != 2 || buf[12] & 0xf > 1 {
            return None;
        }
        let length = usize::from(u16::from_be_bytes([buf[14], buf[15]]));
        let len = 16 + length;
        if len > MAX_HEADER || buf.len() < len {
            return None;
        }
        let block = &buf[16..len];
        if buf[12] & 0xf == 0 {
            return Some(Header { source: None, len });
        }
        let source = match buf[13] {
            0x00 => None,
            0x11 if length >= 12 => {
                let ip = Ipv4Addr::new(block[0], block[1], block[2], block[3]);
                Some(SocketAddr::new(ip.into(), u16::from_be_bytes([block[8], block[9]])))
            }
            0x21 if length >= 36 => {
                let ip = Ipv6Addr::from(<[u8; 16]>::try_from(&block[..16]).unwrap());
                Some(SocketAddr::new(ip.into(), u16::from_be_bytes([block[32], block[33]])))
            }
            0x31 if length >= 216 => None,
            _ => return None,
        };
        Some(Header { source, len })
    }

    /// A valid header and what it says.
    #[derive(Clone, Debug)]
    struct Valid {
        bytes: Vec<u8>,
        header: Header,
        version: Version,
    }

    fn ipv4() -> BoxedStrategy<Ipv4Addr> {
        any::<[u8; 4]>().prop_map(Ipv4Addr::from).boxed()
    }

    /// IPv6 addresses with runs of zero groups (so text has "::" in every place) and mapped ones.
    fn ipv6() -> BoxedStrategy<Ipv6Addr> {
        let group = prop_oneof![Just(0u16), Just(1), any::<u16>()];
        prop_oneof![
            prop::array::uniform8(group).prop_map(Ipv6Addr::from),
            ipv4().prop_map(|ip| ip.to_ipv6_mapped()),
            any::<u128>().prop_map(Ipv6Addr::from),
        ]
        .boxed()
    }

    fn addresses() -> BoxedStrategy<(IpAddr, IpAddr)> {
        prop_oneof![
            (ipv4(), ipv4()).prop_map(|(a, b)| (a.into(), b.into())),
            (ipv6(), ipv6()).prop_map(|(a, b)| (a.into(), b.into())),
        ]
        .boxed()
    }

    fn valid_v1() -> BoxedStrategy<Valid> {
        let tcp = (addresses(), any::<u16>(), any::<u16>()).prop_map(|((src, dst), sport, dport)| {
            let protocol = if src.is_ipv4() { "TCP4" } else { "TCP6" };
            let bytes = format!("PROXY {protocol} {src} {dst} {sport} {dport}\r\n").into_bytes();
            let header = Header { source: Some(SocketAddr::new(src, sport)), len: bytes.len() };
            Valid { bytes, header, version: Version::V1 }
        });
        let unknown = prop::option::of("[ -~]{0,91}").prop_map(|text| {
            let bytes = match text {
                Some(text) => format!("PROXY UNKNOWN {text}\r\n"),
                None => "PROXY UNKNOWN\r\n".to_string(),
            }
            .into_bytes();
            Valid { header: Header { source: None, len: bytes.len() }, bytes, version: Version::V1 }
        });
        prop_oneof![3 => tcp, 1 => unknown].boxed()
    }

    fn valid_v2() -> BoxedStrategy<Valid> {
        let tlvs = prop::collection::vec(any::<u8>(), 0..64);
        let proxy =
            (addresses(), any::<u16>(), any::<u16>(), tlvs.clone()).prop_map(|((src, dst), sport, dport, tlvs)| {
                let (family, mut block) = match (src, dst) {
                    (IpAddr::V4(s), IpAddr::V4(d)) => (V2_TCP4, [s.octets(), d.octets()].concat()),
                    (IpAddr::V6(s), IpAddr::V6(d)) => (V2_TCP6, [s.octets(), d.octets()].concat()),
                    _ => unreachable!("addresses() pairs one family"),
                };
                block.extend_from_slice(&sport.to_be_bytes());
                block.extend_from_slice(&dport.to_be_bytes());
                block.extend_from_slice(&tlvs);
                let bytes = v2(1, family, &block);
                let header = Header { source: Some(SocketAddr::new(src, sport)), len: bytes.len() };
                Valid { bytes, header, version: Version::V2 }
            });
        let local =
            (prop::sample::select(vec![V2_UNSPEC, V2_TCP4, V2_TCP6, 0x12]), tlvs).prop_map(|(family, block)| {
                let bytes = v2(0, family, &block);
                Valid { header: Header { source: None, len: bytes.len() }, bytes, version: Version::V2 }
            });
        prop_oneof![3 => proxy, 1 => local].boxed()
    }

    fn valid() -> BoxedStrategy<Valid> {
        prop_oneof![valid_v1(), valid_v2()].boxed()
    }

    /// Bytes that often start like a header, so that random tails reach the deep checks.
    fn header_like() -> impl Strategy<Value = Vec<u8>> {
        let starts: Vec<&[u8]> = vec![
            b"",
            b"PROXY ",
            b"PROXY TCP4 ",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 ",
            b"PROXY TCP6 ",
            b"PROXY TCP6 ::1 ::",
            b"PROXY UNKNOWN",
            &V2_SIGNATURE,
            b"\r\n\r\n\0\r\nQUIT\n\x21\x11\x00\x0c",
            b"\r\n\r\n\0\r\nQUIT\n\x20",
        ];
        (prop::sample::select(starts), prop::collection::vec(interesting_byte(), 0..120))
            .prop_map(|(start, tail)| [start, &tail[..]].concat())
    }

    /// Mostly bytes that mean something in a header: v1 digits, separators, hex, CR, LF, signs;
    /// v2 versions, commands, families and lengths around the address blocks' sizes.
    fn interesting_byte() -> BoxedStrategy<u8> {
        prop_oneof![
            4 => prop::sample::select(b"0123456789abcdefABCDEF.: \r\nx+-%".to_vec()),
            1 => prop::sample::select(vec![0x00, 0x01, 0x02, 0x0b, 0x0c, 0x11, 0x12, 0x20, 0x21, 0x22, 0x23, 0x31]),
            1 => any::<u8>(),
        ]
        .boxed()
    }

    /// Holds for every input, valid or not.
    fn check_against_reference(buf: &[u8]) -> Result<(), TestCaseError> {
        for version in [Version::V1, Version::V2, Version::Any] {
            let parsed = parse(buf, version);
            match (parsed, reference(buf, version)) {
                (Ok(Parsed::Done(header)), Some(expected)) => prop_assert_eq!(header, expected),
                (Ok(Parsed::Done(header)), None) => prop_assert!(false, "accepted malformed: {:?}", header),
                (_, Some(expected)) => prop_assert!(false, "refused valid {:?}: {:?}", expected, parsed),
                (Ok(Parsed::Incomplete), None) => {
                    prop_assert!(buf.len() < MAX_HEADER);
                    // Waiting is bounded by the form: 107 bytes of v1, or the length v2 declares.
                    if buf.starts_with(b"P") {
                        prop_assert!(buf.len() < 107);
                    }
                    if let Some(&[high, low]) = buf.get(14..16) {
                        prop_assert!(buf.len() < 16 + usize::from(u16::from_be_bytes([high, low])));
                    }
                }
                (Err(_), None) => {}
            }
        }
        Ok(())
    }

    /// Feeding `buf` a byte at a time goes Incomplete..., then stays Err or stays the same Done:
    /// no refusal of what later turns valid, no verdict that more bytes change.
    fn check_prefixes_are_monotonic(buf: &[u8]) -> Result<(), TestCaseError> {
        for version in [Version::V1, Version::V2, Version::Any] {
            let mut decided = None;
            for end in 0..=buf.len() {
                let parsed = parse(&buf[..end], version);
                match &decided {
                    None if parsed == Ok(Parsed::Incomplete) => {}
                    None => decided = Some(parsed),
                    Some(first) => {
                        prop_assert_eq!(parsed.is_ok(), first.is_ok(), "{:?} after {:?} at {}", parsed, first, end)
                    }
                }
                if let (Some(Ok(first)), Ok(parsed)) = (&decided, parsed) {
                    prop_assert_eq!(*first, parsed);
                }
            }
        }
        Ok(())
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 1024, ..ProptestConfig::default() })]

        #[test]
        fn prop_random_bytes_never_panic_and_done_means_well_formed(
            buf in prop_oneof![header_like(), prop::collection::vec(any::<u8>(), 0..200)],
        ) {
            check_against_reference(&buf)?;
            check_prefixes_are_monotonic(&buf)?;
        }

        #[test]
        fn prop_valid_headers_parse_to_their_source_and_length(
            valid in valid(),
            trailing in prop::collection::vec(any::<u8>(), 0..64),
        ) {
            let buf = [&valid.bytes[..], &trailing].concat();
            let other = if valid.version == Version::V1 { Version::V2 } else { Version::V1 };
            prop_assert_eq!(parse(&buf, valid.version), Ok(Parsed::Done(valid.header)));
            prop_assert_eq!(parse(&buf, Version::Any), Ok(Parsed::Done(valid.header)));
            prop_assert!(parse(&buf, other).is_err());
            for end in 0..valid.bytes.len() {
                prop_assert_eq!(parse(&buf[..end], valid.version), Ok(Parsed::Incomplete), "prefix of {}", end);
                prop_assert_eq!(parse(&buf[..end], Version::Any), Ok(Parsed::Incomplete), "prefix of {}", end);
            }
            check_against_reference(&buf)?;
        }

        #[test]
        fn prop_mutated_headers_are_never_accepted_malformed(
            valid in valid(),
            trailing in prop::collection::vec(any::<u8>(), 0..16),
            (kind, at, byte) in (0..3u8, any::<prop::sample::Index>(), interesting_byte()),
        ) {
            let mut buf = [&valid.bytes[..], &trailing].concat();
            let at = at.index(valid.bytes.len());
            match kind {
                0 => buf[at] = byte,
                1 => buf.insert(at, byte),
                _ => { buf.remove(at); }
            }
            check_against_reference(&buf)?;
            check_prefixes_are_monotonic(&buf)?;
        }
    }
}
