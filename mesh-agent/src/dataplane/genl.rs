//! Generic netlink (NETLINK_GENERIC) requests on a blocking socket in the
//! calling thread's network namespace: the family ID is resolved once per
//! socket, then requests are sent and their replies read until the ACK or
//! the end of the dump. Families (WireGuard here, IPVS later) bring their
//! own message types through `netlink-packet-generic`.

use std::{fmt::Debug, io};

use netlink_packet_core::{
    NetlinkDeserializable, NetlinkHeader, NetlinkMessage, NetlinkPayload, NetlinkSerializable, NLM_F_ACK, NLM_F_DUMP,
    NLM_F_REQUEST,
};
use netlink_packet_generic::{
    ctrl::{nlas::GenlCtrlAttrs, GenlCtrl, GenlCtrlCmd},
    GenlFamily, GenlMessage,
};
use netlink_sys::{protocols::NETLINK_GENERIC, Socket, SocketAddr};

/// Why a generic netlink request failed.
#[derive(Debug, thiserror::Error)]
pub enum GenlError {
    /// The socket could not be opened or used.
    #[error("generic netlink socket: {0}")]
    Socket(#[source] io::Error),
    /// The kernel has no such family (its module is not loaded or built).
    #[error("the kernel has no generic netlink family {0:?}")]
    NoFamily(&'static str),
    /// The kernel refused the request.
    #[error("{family} request refused: {source}")]
    Refused {
        /// The family asked.
        family: &'static str,
        /// The errno the kernel answered.
        source: io::Error,
    },
    /// A reply could not be decoded.
    #[error("undecodable {family} reply: {message}")]
    Decode {
        /// The family asked.
        family: &'static str,
        /// What the decoder said.
        message: String,
    },
}

impl GenlError {
    /// The errno the kernel answered, if it refused.
    pub(crate) fn errno(&self) -> Option<i32> {
        match self {
            GenlError::Refused { source, .. } => source.raw_os_error(),
            _ => None,
        }
    }
}

/// A generic netlink socket bound to one family.
pub(crate) struct Genl {
    socket: Socket,
    family: &'static str,
    family_id: u16,
    sequence: u32,
}

impl Genl {
    /// Opens a socket in this thread's namespace and resolves `family`.
    pub(crate) fn open(family: &'static str) -> Result<Genl, GenlError> {
        let mut socket = Socket::new(NETLINK_GENERIC).map_err(GenlError::Socket)?;
        socket.bind_auto().map_err(GenlError::Socket)?;
        socket.connect(&SocketAddr::new(0, 0)).map_err(GenlError::Socket)?;
        let mut genl = Genl {
            socket,
            family: "nlctrl",
            family_id: libc::GENL_ID_CTRL as u16,
            sequence: 0,
        };
        let query = GenlCtrl {
            cmd: GenlCtrlCmd::GetFamily,
            nlas: vec![GenlCtrlAttrs::FamilyName(family.to_string())],
        };
        let replies = match genl.exchange(query, NLM_F_REQUEST | NLM_F_ACK) {
            Ok(r) => r,
            Err(e) if e.errno() == Some(libc::ENOENT) => return Err(GenlError::NoFamily(family)),
            Err(e) => return Err(e),
        };
        genl.family_id = replies
            .iter()
            .flat_map(|r| &r.nlas)
            .find_map(|a| match a {
                GenlCtrlAttrs::FamilyId(id) => Some(*id),
                _ => None,
            })
            .ok_or(GenlError::NoFamily(family))?;
        genl.family = family;
        Ok(genl)
    }

    /// Sends `payload` and waits for the kernel's ACK (or refusal),
    /// returning any messages it sent before.
    pub(crate) fn request<F>(&mut self, payload: F) -> Result<Vec<F>, GenlError>
    where
        F: GenlFamily + Debug + Clone,
        GenlMessage<F>: NetlinkSerializable + NetlinkDeserializable,
    {
        self.exchange(payload, NLM_F_REQUEST | NLM_F_ACK)
    }

    /// Sends a dump request and collects every message of the dump.
    pub(crate) fn dump<F>(&mut self, payload: F) -> Result<Vec<F>, GenlError>
    where
        F: GenlFamily + Debug + Clone,
        GenlMessage<F>: NetlinkSerializable + NetlinkDeserializable,
    {
        self.exchange(payload, NLM_F_REQUEST | NLM_F_DUMP)
    }

    fn exchange<F>(&mut self, payload: F, flags: u16) -> Result<Vec<F>, GenlError>
    where
        F: GenlFamily + Debug + Clone,
        GenlMessage<F>: NetlinkSerializable + NetlinkDeserializable,
    {
        self.sequence = self.sequence.wrapping_add(1);
        let mut genl = GenlMessage::from_payload(payload);
        genl.set_resolved_family_id(self.family_id);
        let mut header = NetlinkHeader::default();
        header.flags = flags;
        header.sequence_number = self.sequence;
        let mut message = NetlinkMessage::new(header, NetlinkPayload::InnerMessage(genl));
        message.finalize();
        let mut bytes = vec![0; message.buffer_len()];
        message.serialize(&mut bytes);
        self.socket.send(&bytes, 0).map_err(GenlError::Socket)?;

        let mut out = Vec::new();
        let mut buffer: Vec<u8> = Vec::with_capacity(64 * 1024);
        let dump = flags & NLM_F_DUMP == NLM_F_DUMP;
        loop {
            buffer.clear();
            let n = self.socket.recv(&mut buffer, 0).map_err(GenlError::Socket)?;
            let replies = decode_replies::<F>(&buffer[..n], self.sequence, dump, self.family)?;
            out.extend(replies.payloads);
            if replies.finished {
                return Ok(out);
            }
        }
    }
}

/// What one datagram of the kernel's replies to a request says.
#[derive(Debug)]
pub struct Replies<F> {
    /// The family's messages in it, in order.
    pub payloads: Vec<F>,
    /// Whether it ends the exchange: the ACK of a request, or the DONE of
    /// a dump.
    pub(crate) finished: bool,
}

/// Decodes one datagram of replies to request `sequence` of `family`
/// (`dump`: a dump request, which only DONE ends): the kernel's refusal is
/// an error, as is a message that does not decode; messages of other
/// requests are skipped.
pub fn decode_replies<F>(
    datagram: &[u8],
    sequence: u32,
    dump: bool,
    family: &'static str,
) -> Result<Replies<F>, GenlError>
where
    F: GenlFamily + Debug + Clone,
    GenlMessage<F>: NetlinkDeserializable,
{
    let mut replies = Replies {
        payloads: Vec::new(),
        finished: false,
    };
    let mut offset = 0;
    while offset < datagram.len() {
        let reply =
            NetlinkMessage::<GenlMessage<F>>::deserialize(&datagram[offset..]).map_err(|e| GenlError::Decode {
                family,
                message: e.to_string(),
            })?;
        let length = reply.header.length as usize;
        if length == 0 {
            break;
        }
        offset += length.next_multiple_of(4);
        if reply.header.sequence_number != sequence {
            continue;
        }
        match reply.payload {
            NetlinkPayload::InnerMessage(m) => replies.payloads.push(m.payload),
            NetlinkPayload::Done(_) => {
                replies.finished = true;
                return Ok(replies);
            }
            NetlinkPayload::Error(e) => match e.code {
                // A dump ends with DONE; an ACK before it only confirms
                // the request.
                None if dump => {}
                None => {
                    replies.finished = true;
                    return Ok(replies);
                }
                Some(code) => {
                    return Err(GenlError::Refused {
                        family,
                        // The kernel sends -errno; i32::MIN is none, but still a refusal.
                        source: io::Error::from_raw_os_error(code.get().wrapping_neg()),
                    });
                }
            },
            _ => {}
        }
    }
    Ok(replies)
}

#[cfg(test)]
mod tests {
    use netlink_packet_core::{ErrorMessage, NLM_F_MULTIPART};
    use netlink_packet_generic::ctrl::{GenlCtrl, GenlCtrlCmd};

    use super::*;

    fn datagram(sequence: u32, payloads: Vec<NetlinkPayload<GenlMessage<GenlCtrl>>>) -> Vec<u8> {
        let mut out = Vec::new();
        for payload in payloads {
            let mut header = NetlinkHeader::default();
            header.flags = NLM_F_MULTIPART;
            header.sequence_number = sequence;
            let mut message = NetlinkMessage::new(header, payload);
            message.finalize();
            let mut bytes = vec![0; message.buffer_len()];
            message.serialize(&mut bytes);
            out.extend(bytes);
        }
        out
    }

    fn family(name: &str) -> NetlinkPayload<GenlMessage<GenlCtrl>> {
        NetlinkPayload::InnerMessage(GenlMessage::from_payload(GenlCtrl {
            cmd: GenlCtrlCmd::NewFamily,
            nlas: vec![GenlCtrlAttrs::FamilyName(name.into())],
        }))
    }

    #[test]
    fn a_dump_collects_its_messages_and_skips_other_requests() {
        let bytes = [
            datagram(3, vec![family("a"), family("b")]),
            datagram(2, vec![family("c")]),
        ]
        .concat();
        let replies = decode_replies::<GenlCtrl>(&bytes, 3, true, "nlctrl").unwrap();
        assert_eq!(replies.payloads.len(), 2);
        assert!(!replies.finished, "a dump ends with DONE");
    }

    /// The same negation the netlink fuzz target found in xfrm.rs and
    /// nftables.rs: i32::MIN as the error code overflowed.
    #[test]
    fn an_error_with_a_nonsense_code_is_a_refusal_not_a_panic() {
        let mut error = ErrorMessage::default();
        error.code = std::num::NonZeroI32::new(i32::MIN);
        let bytes = datagram(1, vec![NetlinkPayload::Error(error)]);
        let refused = decode_replies::<GenlCtrl>(&bytes, 1, false, "nlctrl").unwrap_err();
        assert_eq!(refused.errno(), Some(i32::MIN));
    }
}
