//! Raw netlink datagrams (pure): the messages one holds and the error code
//! an NLMSG_ERROR carries, for the mechanisms that encode their own
//! messages (nf_tables, XFRM). Generic netlink goes through
//! netlink-packet-core instead.

/// A netlink message header.
pub(crate) const NLMSG_HDRLEN: usize = 16;
/// An error, or with code 0 an acknowledgement.
pub(crate) const NLMSG_ERROR: u16 = 2;
/// The end of a dump.
pub(crate) const NLMSG_DONE: u16 = 3;

/// One message of a datagram.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Message<'a> {
    /// Its type.
    pub(crate) kind: u16,
    /// The sequence number of the request it answers.
    pub(crate) seq: u32,
    /// What follows the header.
    pub(crate) body: &'a [u8],
}

/// The messages of `datagram`, in order. An item is `Err(length)` for a
/// message whose length is shorter than a header or runs past the
/// datagram; nothing after it is read.
pub(crate) fn messages(datagram: &[u8]) -> impl Iterator<Item = Result<Message<'_>, usize>> {
    let mut rest = datagram;
    std::iter::from_fn(move || {
        if rest.len() < NLMSG_HDRLEN {
            return None;
        }
        let length = u32::from_ne_bytes(rest[0..4].try_into().expect("reason: 4 bytes")) as usize;
        if length < NLMSG_HDRLEN || length > rest.len() {
            rest = &[];
            return Some(Err(length));
        }
        let message = Message {
            kind: u16::from_ne_bytes([rest[4], rest[5]]),
            seq: u32::from_ne_bytes(rest[8..12].try_into().expect("reason: 4 bytes")),
            body: &rest[NLMSG_HDRLEN..length],
        };
        rest = &rest[length.next_multiple_of(4).min(rest.len())..];
        Some(Ok(message))
    })
}

/// The errno of an NLMSG_ERROR body (0 for an acknowledgement), `None`
/// when it is too short to hold one. The kernel sends -errno; i32::MIN is
/// none, but still reads as a refusal.
pub(crate) fn error_code(body: &[u8]) -> Option<i32> {
    let code = i32::from_ne_bytes(body.get(..4)?.try_into().expect("reason: 4 bytes"));
    Some(code.wrapping_neg())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(kind: u16, seq: u32, body: &[u8]) -> Vec<u8> {
        let mut m = Vec::new();
        m.extend_from_slice(&((NLMSG_HDRLEN + body.len()) as u32).to_ne_bytes());
        m.extend_from_slice(&kind.to_ne_bytes());
        m.extend_from_slice(&0u16.to_ne_bytes());
        m.extend_from_slice(&seq.to_ne_bytes());
        m.extend_from_slice(&0u32.to_ne_bytes());
        m.extend_from_slice(body);
        m.resize(m.len().next_multiple_of(4), 0);
        m
    }

    #[test]
    fn walks_the_messages_and_stops_at_a_bad_length() {
        let datagram = [message(20, 1, &[1, 2, 3]), message(NLMSG_DONE, 1, &[0; 4])].concat();
        let found: Vec<_> = messages(&datagram).collect();
        assert_eq!(
            found,
            vec![
                Ok(Message {
                    kind: 20,
                    seq: 1,
                    body: &[1, 2, 3]
                }),
                Ok(Message {
                    kind: NLMSG_DONE,
                    seq: 1,
                    body: &[0; 4]
                }),
            ]
        );
        let mut bad = message(20, 1, &[]);
        bad[0] = 200;
        bad.extend(message(20, 2, &[]));
        assert_eq!(messages(&bad).collect::<Vec<_>>(), vec![Err(200)]);
        assert_eq!(messages(&datagram[..10]).count(), 0, "a partial header is no message");
    }

    #[test]
    fn error_codes_are_errnos_and_never_panic() {
        assert_eq!(error_code(&(-2i32).to_ne_bytes()), Some(2));
        assert_eq!(error_code(&0i32.to_ne_bytes()), Some(0));
        assert_eq!(error_code(&i32::MIN.to_ne_bytes()), Some(i32::MIN));
        assert_eq!(error_code(&[0; 3]), None);
    }
}
