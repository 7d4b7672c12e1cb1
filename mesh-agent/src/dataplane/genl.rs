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
    pub fn errno(&self) -> Option<i32> {
        match self {
            GenlError::Refused { source, .. } => source.raw_os_error(),
            _ => None,
        }
    }
}

/// A generic netlink socket bound to one family.
pub struct Genl {
    socket: Socket,
    family: &'static str,
    family_id: u16,
    sequence: u32,
}

impl Genl {
    /// Opens a socket in this thread's namespace and resolves `family`.
    pub fn open(family: &'static str) -> Result<Genl, GenlError> {
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
    pub fn request<F>(&mut self, payload: F) -> Result<Vec<F>, GenlError>
    where
        F: GenlFamily + Debug + Clone,
        GenlMessage<F>: NetlinkSerializable + NetlinkDeserializable,
    {
        self.exchange(payload, NLM_F_REQUEST | NLM_F_ACK)
    }

    /// Sends a dump request and collects every message of the dump.
    pub fn dump<F>(&mut self, payload: F) -> Result<Vec<F>, GenlError>
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
        loop {
            buffer.clear();
            let n = self.socket.recv(&mut buffer, 0).map_err(GenlError::Socket)?;
            let mut offset = 0;
            while offset < n {
                let reply = NetlinkMessage::<GenlMessage<F>>::deserialize(&buffer[offset..n]).map_err(|e| {
                    GenlError::Decode {
                        family: self.family,
                        message: e.to_string(),
                    }
                })?;
                let length = reply.header.length as usize;
                if length == 0 {
                    break;
                }
                offset += length.next_multiple_of(4);
                if reply.header.sequence_number != self.sequence {
                    continue;
                }
                match reply.payload {
                    NetlinkPayload::InnerMessage(m) => out.push(m.payload),
                    NetlinkPayload::Done(_) => return Ok(out),
                    NetlinkPayload::Error(e) => match e.code {
                        None => {
                            // A dump ends with DONE; an ACK before it only
                            // confirms the request.
                            if flags & NLM_F_DUMP != NLM_F_DUMP {
                                return Ok(out);
                            }
                        }
                        Some(code) => {
                            return Err(GenlError::Refused {
                                family: self.family,
                                source: io::Error::from_raw_os_error(-code.get()),
                            })
                        }
                    },
                    _ => {}
                }
            }
        }
    }
}
