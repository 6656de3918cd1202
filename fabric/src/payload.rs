//! Payloads of the link-level frames (HELLO and ACK), checked and I/O-free.
//!
//! ```text
//! HELLO: role u8 | newest key epoch u16 | name length u8 | name (UTF-8, 1..=64 bytes)
//! ACK:   block count u8 (≤ 16) | count × (start u32, end u32)   selective-ack blocks [start, end)
//! ```

use thiserror::Error;

use crate::channel::MAX_SACK_BLOCKS;

/// Errors of this module.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum PayloadError {
    /// Shorter than its fields say.
    #[error("truncated payload")]
    Truncated,
    /// Bytes after the last field.
    #[error("trailing bytes in payload")]
    Trailing,
    /// Unknown role.
    #[error("unknown role {0}")]
    Role(u8),
    /// Name empty, too long or not UTF-8.
    #[error("bad name")]
    Name,
    /// Too many selective-ack blocks.
    #[error("{0} ack blocks (at most {MAX_SACK_BLOCKS})")]
    Blocks(usize),
}

/// Longest host name in a HELLO.
pub const MAX_NAME: usize = 64;

/// What a node does on the segment.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// `fabricd` on a host: answers control requests.
    Host,
    /// A controller (the CLI).
    Controller,
    /// A monitoring aggregator.
    Aggregator,
}

impl Role {
    fn from_u8(v: u8) -> Result<Role, PayloadError> {
        match v {
            1 => Ok(Role::Host),
            2 => Ok(Role::Controller),
            3 => Ok(Role::Aggregator),
            _ => Err(PayloadError::Role(v)),
        }
    }

    fn to_u8(self) -> u8 {
        match self {
            Role::Host => 1,
            Role::Controller => 2,
            Role::Aggregator => 3,
        }
    }
}

/// A HELLO payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hello {
    /// The sender's role.
    pub role: Role,
    /// The newest key epoch the sender holds (peers seal to it with the newest common epoch).
    pub newest_epoch: u16,
    /// The sender's name.
    pub name: String,
}

/// Whether `name` is acceptable as a node name.
pub fn valid_name(name: &str) -> bool {
    !name.is_empty() && name.len() <= MAX_NAME
}

impl Hello {
    /// Parses a HELLO payload.
    pub fn parse(b: &[u8]) -> Result<Hello, PayloadError> {
        if b.len() < 4 {
            return Err(PayloadError::Truncated);
        }
        let role = Role::from_u8(b[0])?;
        let newest_epoch = u16::from_be_bytes([b[1], b[2]]);
        let n = usize::from(b[3]);
        let name = b.get(4..4 + n).ok_or(PayloadError::Truncated)?;
        if b.len() > 4 + n {
            return Err(PayloadError::Trailing);
        }
        let name = std::str::from_utf8(name).map_err(|_| PayloadError::Name)?;
        if !valid_name(name) {
            return Err(PayloadError::Name);
        }
        Ok(Hello {
            role,
            newest_epoch,
            name: name.to_string(),
        })
    }

    /// The wire form; `None` if the name is not valid.
    pub fn to_bytes(&self) -> Option<Vec<u8>> {
        if !valid_name(&self.name) {
            return None;
        }
        let mut b = vec![self.role.to_u8()];
        b.extend_from_slice(&self.newest_epoch.to_be_bytes());
        b.push(u8::try_from(self.name.len()).ok()?);
        b.extend_from_slice(self.name.as_bytes());
        Some(b)
    }
}

/// Parses ACK blocks.
pub fn parse_sacks(b: &[u8]) -> Result<Vec<(u32, u32)>, PayloadError> {
    let (&n, rest) = b.split_first().ok_or(PayloadError::Truncated)?;
    let n = usize::from(n);
    if n > MAX_SACK_BLOCKS {
        return Err(PayloadError::Blocks(n));
    }
    if rest.len() < n * 8 {
        return Err(PayloadError::Truncated);
    }
    if rest.len() > n * 8 {
        return Err(PayloadError::Trailing);
    }
    Ok(rest
        .chunks_exact(8)
        .map(|c| {
            (
                u32::from_be_bytes([c[0], c[1], c[2], c[3]]),
                u32::from_be_bytes([c[4], c[5], c[6], c[7]]),
            )
        })
        .collect())
}

/// Encodes ACK blocks (at most [`MAX_SACK_BLOCKS`]; extra ones are left out).
pub fn sacks_to_bytes(blocks: &[(u32, u32)]) -> Vec<u8> {
    let blocks = &blocks[..blocks.len().min(MAX_SACK_BLOCKS)];
    let mut b = Vec::with_capacity(1 + 8 * blocks.len());
    b.push(blocks.len() as u8);
    for (s, e) in blocks {
        b.extend_from_slice(&s.to_be_bytes());
        b.extend_from_slice(&e.to_be_bytes());
    }
    b
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn hello_round_trip_and_errors() {
        let h = Hello {
            role: Role::Host,
            newest_epoch: 3,
            name: "node-a".into(),
        };
        let b = h.to_bytes().unwrap();
        assert_eq!(Hello::parse(&b).unwrap(), h);
        assert_eq!(Hello::parse(&b[..5]), Err(PayloadError::Truncated));
        let mut t = b.clone();
        t.push(0);
        assert_eq!(Hello::parse(&t), Err(PayloadError::Trailing));
        let mut r = b.clone();
        r[0] = 9;
        assert_eq!(Hello::parse(&r), Err(PayloadError::Role(9)));
        assert_eq!(Hello::parse(&[1, 0, 1, 0]), Err(PayloadError::Name));
        assert_eq!(Hello::parse(&[1, 0, 1, 1, 0xff]), Err(PayloadError::Name));
        let long = Hello {
            name: "x".repeat(65),
            ..h
        };
        assert_eq!(long.to_bytes(), None);
    }

    #[test]
    fn sacks_round_trip_and_errors() {
        let v = vec![(1, 2), (7, 9)];
        assert_eq!(parse_sacks(&sacks_to_bytes(&v)).unwrap(), v);
        assert_eq!(parse_sacks(&[]), Err(PayloadError::Truncated));
        assert_eq!(parse_sacks(&[17]), Err(PayloadError::Blocks(17)));
        assert_eq!(parse_sacks(&[1, 0, 0]), Err(PayloadError::Truncated));
        assert_eq!(parse_sacks(&[0, 0]), Err(PayloadError::Trailing));
    }

    proptest! {
        #[test]
        fn parsers_never_panic(b in proptest::collection::vec(any::<u8>(), 0..100)) {
            let _ = Hello::parse(&b);
            let _ = parse_sacks(&b);
        }
    }
}
