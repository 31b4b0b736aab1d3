//! The PROXY protocol (HAProxy's, versions 1 and 2) at the start of a connection from a load
//! balancer: the client's real address. Read with exact reads, so nothing after the header
//! is consumed (the MQTT or TLS bytes that follow stay in the socket).
//!
//! `parse_v1`/`parse_v2` are pure and never panic on input.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use tokio::io::{AsyncRead, AsyncReadExt};

/// The v2 signature (12 bytes).
const V2_SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";
/// A v1 header is at most 107 bytes, CRLF included.
const V1_MAX: usize = 107;
/// Largest v2 address block we accept (addresses plus TLVs); the format allows 65,535.
const V2_MAX: usize = 1024;

/// Why a PROXY header was refused (the connection is closed).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ProxyError {
    /// Neither a v1 nor a v2 header.
    #[error("no PROXY protocol header")]
    Missing,
    /// A header that does not follow the format.
    #[error("malformed PROXY header: {0}")]
    Malformed(&'static str),
    /// The connection ended inside the header.
    #[error("connection closed inside the PROXY header")]
    Closed,
}

/// Reads the header: the client's address, or `None` for a header that names none (v1
/// `UNKNOWN`, v2 `LOCAL` such as a load balancer's health check, or a non-IP family).
pub async fn read_header<S: AsyncRead + Unpin>(
    stream: &mut S,
) -> Result<Option<SocketAddr>, ProxyError> {
    let mut head = [0u8; 16];
    read_exact(stream, &mut head[..8]).await?;
    if head[..8] == V2_SIGNATURE[..8] {
        read_exact(stream, &mut head[8..]).await?;
        let len = usize::from(u16::from_be_bytes([head[14], head[15]]));
        if len > V2_MAX {
            return Err(ProxyError::Malformed("v2 address block too long"));
        }
        let mut body = vec![0u8; len];
        read_exact(stream, &mut body).await?;
        return parse_v2(&head, &body);
    }
    if &head[..6] != b"PROXY " {
        return Err(ProxyError::Missing);
    }
    let mut line = Vec::with_capacity(V1_MAX);
    line.extend_from_slice(&head[..8]);
    while !line.ends_with(b"\r\n") {
        if line.len() >= V1_MAX {
            return Err(ProxyError::Malformed("v1 line longer than 107 bytes"));
        }
        let mut b = [0u8; 1];
        read_exact(stream, &mut b).await?;
        line.push(b[0]);
    }
    parse_v1(&line)
}

async fn read_exact<S: AsyncRead + Unpin>(s: &mut S, buf: &mut [u8]) -> Result<(), ProxyError> {
    s.read_exact(buf).await.map(|_| ()).map_err(|_| ProxyError::Closed)
}

/// Parses a whole v1 line (`PROXY TCP4 src dst sport dport\r\n`).
pub fn parse_v1(line: &[u8]) -> Result<Option<SocketAddr>, ProxyError> {
    let text = std::str::from_utf8(line).map_err(|_| ProxyError::Malformed("v1 not ASCII"))?;
    let text = text.strip_suffix("\r\n").ok_or(ProxyError::Malformed("v1 without CRLF"))?;
    let mut parts = text.split(' ');
    if parts.next() != Some("PROXY") {
        return Err(ProxyError::Missing);
    }
    let family = parts.next().ok_or(ProxyError::Malformed("v1 without family"))?;
    if family == "UNKNOWN" {
        return Ok(None);
    }
    let (src, _dst, sport, _dport) = match (parts.next(), parts.next(), parts.next(), parts.next())
    {
        (Some(a), Some(b), Some(c), Some(d)) if parts.next().is_none() => (a, b, c, d),
        _ => return Err(ProxyError::Malformed("v1 needs 4 address fields")),
    };
    let ip: IpAddr = match family {
        "TCP4" => src.parse::<Ipv4Addr>().map(IpAddr::V4),
        "TCP6" => src.parse::<Ipv6Addr>().map(IpAddr::V6),
        _ => return Err(ProxyError::Malformed("v1 family must be TCP4, TCP6 or UNKNOWN")),
    }
    .map_err(|_| ProxyError::Malformed("v1 source address"))?;
    let port: u16 = sport.parse().map_err(|_| ProxyError::Malformed("v1 source port"))?;
    Ok(Some(SocketAddr::new(ip, port)))
}

/// Parses a v2 header: `head` is its 16 fixed bytes, `body` the address block.
pub fn parse_v2(head: &[u8; 16], body: &[u8]) -> Result<Option<SocketAddr>, ProxyError> {
    if head[..12] != V2_SIGNATURE {
        return Err(ProxyError::Missing);
    }
    let (version, command) = (head[12] >> 4, head[12] & 0x0f);
    if version != 2 {
        return Err(ProxyError::Malformed("v2 version must be 2"));
    }
    match command {
        0 => return Ok(None), // LOCAL: the balancer itself (health checks)
        1 => {}
        _ => return Err(ProxyError::Malformed("v2 command must be LOCAL or PROXY")),
    }
    let family = head[13] >> 4;
    let port_at = |i: usize| body.get(i..i + 2).map(|p| u16::from_be_bytes([p[0], p[1]]));
    match family {
        1 => {
            // IPv4: src(4) dst(4) sport(2) dport(2)
            let (Some(src), Some(port)) = (body.get(..4), port_at(8)) else {
                return Err(ProxyError::Malformed("v2 IPv4 block too short"));
            };
            let ip = Ipv4Addr::new(src[0], src[1], src[2], src[3]);
            Ok(Some(SocketAddr::new(IpAddr::V4(ip), port)))
        }
        2 => {
            // IPv6: src(16) dst(16) sport(2) dport(2)
            let (Some(src), Some(port)) = (body.get(..16), port_at(32)) else {
                return Err(ProxyError::Malformed("v2 IPv6 block too short"));
            };
            let mut octets = [0u8; 16];
            octets.copy_from_slice(src);
            Ok(Some(SocketAddr::new(IpAddr::V6(Ipv6Addr::from(octets)), port)))
        }
        // AF_UNSPEC and AF_UNIX: no IP address to report.
        0 | 3 => Ok(None),
        _ => Err(ProxyError::Malformed("v2 unknown address family")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn v1_lines() {
        let a = parse_v1(b"PROXY TCP4 192.0.2.7 198.51.100.1 56324 1883\r\n").unwrap();
        assert_eq!(a, Some("192.0.2.7:56324".parse().unwrap()));
        let a = parse_v1(b"PROXY TCP6 2001:db8::1 2001:db8::2 4000 8883\r\n").unwrap();
        assert_eq!(a, Some("[2001:db8::1]:4000".parse().unwrap()));
        assert_eq!(parse_v1(b"PROXY UNKNOWN\r\n"), Ok(None));
        assert!(parse_v1(b"PROXY TCP4 1.2.3.4 5.6.7.8 70000 1\r\n").is_err());
        assert!(parse_v1(b"PROXY TCP4 1.2.3.4\r\n").is_err());
        assert!(parse_v1(b"PROXY TCP5 1.2.3.4 1.2.3.4 1 2\r\n").is_err());
        assert!(parse_v1(b"PROXY TCP4 1.2.3.4 1.2.3.4 1 2").is_err());
    }

    fn v2(cmd: u8, fam: u8, body: &[u8]) -> [u8; 16] {
        let mut h = [0u8; 16];
        h[..12].copy_from_slice(&V2_SIGNATURE);
        h[12] = 0x20 | cmd;
        h[13] = fam;
        h[14..].copy_from_slice(&(body.len() as u16).to_be_bytes());
        h
    }

    #[test]
    fn v2_headers() {
        let body = [10, 0, 0, 9, 10, 0, 0, 1, 0x1f, 0x90, 0x07, 0x5b];
        assert_eq!(
            parse_v2(&v2(1, 0x11, &body), &body),
            Ok(Some("10.0.0.9:8080".parse().unwrap()))
        );
        assert_eq!(parse_v2(&v2(0, 0x11, &body), &body), Ok(None));
        assert!(parse_v2(&v2(1, 0x11, &body[..5]), &body[..5]).is_err());
        let mut body6 = [0u8; 36];
        body6[15] = 1;
        body6[32..34].copy_from_slice(&4000u16.to_be_bytes());
        assert_eq!(parse_v2(&v2(1, 0x21, &body6), &body6), Ok(Some("[::1]:4000".parse().unwrap())));
        assert!(parse_v2(&v2(7, 0x11, &body), &body).is_err());
    }

    #[tokio::test]
    async fn read_header_leaves_what_follows_in_the_stream() {
        let mut data: &[u8] = b"PROXY TCP4 192.0.2.7 198.51.100.1 56324 1883\r\n\x10\x0c";
        let a = read_header(&mut data).await.unwrap();
        assert_eq!(a, Some("192.0.2.7:56324".parse().unwrap()));
        assert_eq!(data, b"\x10\x0c");
        let body = [10, 0, 0, 9, 10, 0, 0, 1, 0x1f, 0x90, 0x07, 0x5b];
        let mut bytes = v2(1, 0x11, &body).to_vec();
        bytes.extend_from_slice(&body);
        bytes.extend_from_slice(b"rest");
        let mut data = &bytes[..];
        assert_eq!(read_header(&mut data).await.unwrap(), Some("10.0.0.9:8080".parse().unwrap()));
        assert_eq!(data, b"rest");
        let mut data: &[u8] = b"\x10\x0c\x00\x04MQTT\x04\x02\x00\x3c";
        assert_eq!(read_header(&mut data).await, Err(ProxyError::Missing));
    }
}
