//! Bytes in, bytes out: request checks shared by every transport, and the
//! response encoder that enforces UDP size limits. An answer that does
//! not fit is never sent in part: the client gets TC and retries over TCP.
//! A zone transfer over TCP too large for one message goes out as several
//! (RFC 5936 §2.2), its records in order.

use std::net::SocketAddr;

use hickory_proto::ProtoError;
use hickory_proto::op::{
    Edns, EmitAndCount, Header, MessageType, Metadata, OpCode, ResponseCode, emit_message_parts,
};
use hickory_proto::rr::{Record, RecordType};
use hickory_proto::serialize::binary::{BinDecodable, BinDecoder, BinEncodable, BinEncoder};
use hickory_server::net::xfer::Protocol;
use hickory_server::server::Request;
use hickory_server::zone_handler::MessageRequest;

use super::answer::{Answer, Authority};
use super::rrl::{Decision, Rrl};

/// Largest UDP response muster sends and the payload size it advertises
/// (the DNS Flag Day 2020 value, safe from IP fragmentation).
pub const MAX_UDP_PAYLOAD: u16 = 1232;
/// The classic limit for clients that send no EDNS.
pub const CLASSIC_UDP_PAYLOAD: u16 = 512;

/// What a reply said, for metrics.
#[derive(Debug, Clone, Copy)]
pub struct Outcome {
    pub qtype: Option<RecordType>,
    pub rcode: ResponseCode,
    pub truncated: bool,
    /// What response rate limiting decided, when it looked.
    pub rrl: Option<Decision>,
}

/// A reply ready to send.
#[derive(Debug)]
pub struct Reply {
    pub bytes: Vec<u8>,
    /// The messages that follow `bytes`: only a zone transfer too large
    /// for one message has any.
    pub more: Vec<Vec<u8>>,
    pub outcome: Outcome,
}

/// Answers one raw query received over `protocol` from `src`. `None` when
/// nothing should be sent back (not a DNS header, or not a query); a
/// reply with no bytes when response rate limiting dropped it.
pub fn respond(
    authority: &Authority,
    query: &[u8],
    src: SocketAddr,
    protocol: Protocol,
    rrl: Option<&Rrl>,
) -> Option<Reply> {
    let header = Header::read(&mut BinDecoder::new(query)).ok()?;
    if header.metadata.message_type != MessageType::Query {
        return None;
    }
    let Ok(request) = Request::from_bytes(query.to_vec(), src, protocol) else {
        return Some(Reply {
            bytes: encode_header_only(&header.metadata, ResponseCode::FormErr),
            more: Vec::new(),
            outcome: Outcome {
                qtype: None,
                rcode: ResponseCode::FormErr,
                truncated: false,
                rrl: None,
            },
        });
    };
    let question = request.queries.queries().first();
    // A zone transfer: only a query over TCP.
    let transfer = question.filter(|q| {
        matches!(q.query_type(), RecordType::AXFR | RecordType::IXFR)
            && protocol == Protocol::Tcp
            && request.metadata.op_code == OpCode::Query
    });
    let answer = match transfer {
        Some(q) => authority.transfer(q.name(), src.ip()),
        None => answer_request(authority, &request),
    };
    let decision = match (rrl, protocol, question) {
        (Some(rrl), Protocol::Udp, Some(q)) => {
            let name = q.name().to_bytes().unwrap_or_default();
            Some(rrl.decide(src.ip(), &name, q.query_type(), answer.rcode))
        }
        _ => None,
    };
    let limit = size_limit(&request, protocol);
    let (bytes, more, truncated) = match decision {
        Some(Decision::Drop) => (Vec::new(), Vec::new(), false),
        Some(Decision::Slip) => (encode_truncated(&request, &answer, limit), Vec::new(), true),
        None if transfer.is_some() => {
            let (first, more) = encode_transfer(&request, &answer);
            (first, more, false)
        }
        _ => {
            let (bytes, truncated) = encode(&request, &answer, limit);
            (bytes, Vec::new(), truncated)
        }
    };
    Some(Reply {
        bytes,
        more,
        outcome: Outcome {
            qtype: question.map(|q| q.query_type()),
            rcode: answer.rcode,
            truncated,
            rrl: decision,
        },
    })
}

/// Checks what the question itself cannot carry, then answers it.
/// Dynamic updates and notifies are refused (the registry changes only
/// through its API), zone transfers too; other opcodes are not
/// implemented.
pub fn answer_request(authority: &Authority, request: &MessageRequest) -> Answer {
    match request.metadata.op_code {
        OpCode::Query => {}
        OpCode::Update | OpCode::Notify => return Answer::error(ResponseCode::Refused),
        _ => return Answer::error(ResponseCode::NotImp),
    }
    if request.edns.as_ref().is_some_and(|e| e.version() > 0) {
        return Answer::error(ResponseCode::BADVERS);
    }
    match request.queries.queries() {
        [query] if matches!(query.query_type(), RecordType::AXFR | RecordType::IXFR) => {
            Answer::error(ResponseCode::Refused)
        }
        [query] => authority.answer(query),
        _ => Answer::error(ResponseCode::FormErr),
    }
}

/// The header of the response to `request` carrying `answer`.
pub fn response_metadata(request: &Metadata, answer: &Answer) -> Metadata {
    let mut metadata = Metadata::response_from_request(request);
    metadata.authoritative = answer.authoritative;
    metadata.response_code = answer.rcode;
    metadata
}

/// The OPT record of the response: present exactly when the query had one.
pub fn response_edns(request: &MessageRequest) -> Option<Edns> {
    request.edns.as_ref().map(|_| {
        let mut edns = Edns::new();
        edns.set_max_payload(MAX_UDP_PAYLOAD);
        edns
    })
}

/// The largest response `request` may get over `protocol`.
pub fn size_limit(request: &MessageRequest, protocol: Protocol) -> u16 {
    match protocol {
        Protocol::Udp => request.edns.as_ref().map_or(CLASSIC_UDP_PAYLOAD, |edns| {
            edns.max_payload()
                .clamp(CLASSIC_UDP_PAYLOAD, MAX_UDP_PAYLOAD)
        }),
        _ => u16::MAX,
    }
}

/// Encodes `answer` within `limit` bytes: whole, or without the
/// additional section, or (when the answer itself does not fit) empty
/// with TC set so the client retries over TCP. Also says whether it was
/// truncated.
pub fn encode(request: &MessageRequest, answer: &Answer, limit: u16) -> (Vec<u8>, bool) {
    let edns = response_edns(request);
    let parts = Parts::of(request, answer, edns.as_ref());
    let sections = (
        &answer.answers[..],
        &answer.authorities[..],
        &answer.additionals[..],
    );
    if let Some(bytes) = parts.try_emit(sections, limit) {
        return (bytes, false);
    }
    let sections = (&answer.answers[..], &answer.authorities[..], &[][..]);
    if let Some(bytes) = parts.try_emit(sections, limit) {
        return (bytes, false);
    }
    (parts.truncated(limit), true)
}

/// Records of a zone transfer put in one message, by their size alone
/// (names uncompressed): with the header, question and OPT the message
/// stays under the 65,535 bytes a TCP message can have.
const TRANSFER_MESSAGE: usize = 60_000;

/// A zone transfer's answer as one message if it fits, else as several,
/// each with the question and up to `TRANSFER_MESSAGE` bytes of records,
/// in order (the SOA first in the first, last in the last).
fn encode_transfer(request: &MessageRequest, answer: &Answer) -> (Vec<u8>, Vec<Vec<u8>>) {
    let edns = response_edns(request);
    let parts = Parts::of(request, answer, edns.as_ref());
    let sections = (&answer.answers[..], &answer.authorities[..], &[][..]);
    if let Some(bytes) = parts.try_emit(sections, u16::MAX) {
        return (bytes, Vec::new());
    }
    let mut messages = Vec::new();
    for records in transfer_chunks(&answer.answers) {
        if !emit_transfer_chunk(&parts, records, &mut messages) {
            // A record too large for any message: nothing can carry it.
            let failure = encode_header_only(&request.metadata, ResponseCode::ServFail);
            return (failure, Vec::new());
        }
    }
    let mut messages = messages.into_iter();
    let first = messages.next().unwrap_or_default();
    (first, messages.collect())
}

/// Adds `records` to `messages` as one message, or, when they do not fit
/// (compression inside a message can save less than it did for each
/// record alone), as two halves, and so on; false if one record alone
/// does not fit.
fn emit_transfer_chunk(parts: &Parts<'_>, records: &[Record], messages: &mut Vec<Vec<u8>>) -> bool {
    if let Some(bytes) = parts.try_emit((records, &[], &[]), u16::MAX) {
        messages.push(bytes);
        return true;
    }
    if records.len() < 2 {
        return false;
    }
    let (front, back) = records.split_at(records.len() / 2);
    emit_transfer_chunk(parts, front, messages) && emit_transfer_chunk(parts, back, messages)
}

/// `records` cut into runs of at most `TRANSFER_MESSAGE` bytes each (a
/// record larger than that alone in its run).
fn transfer_chunks(records: &[Record]) -> Vec<&[Record]> {
    let mut chunks = Vec::new();
    let (mut start, mut size) = (0, 0);
    let mut scratch = Vec::new();
    for (at, record) in records.iter().enumerate() {
        scratch.clear();
        let mut encoder = BinEncoder::new(&mut scratch);
        let length = match record.emit(&mut encoder) {
            Ok(()) => scratch.len(),
            Err(_) => TRANSFER_MESSAGE,
        };
        if at > start && size + length > TRANSFER_MESSAGE {
            chunks.push(&records[start..at]);
            (start, size) = (at, 0);
        }
        size += length;
    }
    if start < records.len() {
        chunks.push(&records[start..]);
    }
    chunks
}

/// `answer` as an empty reply with TC set (an RRL "slip").
pub fn encode_truncated(request: &MessageRequest, answer: &Answer, limit: u16) -> Vec<u8> {
    let edns = response_edns(request);
    Parts::of(request, answer, edns.as_ref()).truncated(limit)
}

/// A response's answer, authority and additional records.
type Sections<'a> = (&'a [Record], &'a [Record], &'a [Record]);

/// The pieces of a response that stay the same across encoding attempts.
struct Parts<'a> {
    metadata: Metadata,
    question: &'a [u8],
    count: usize,
    edns: Option<&'a Edns>,
}

impl<'a> Parts<'a> {
    fn of(request: &'a MessageRequest, answer: &Answer, edns: Option<&'a Edns>) -> Self {
        Self {
            metadata: response_metadata(&request.metadata, answer),
            question: request.queries.as_bytes(),
            count: request.queries.len(),
            edns,
        }
    }

    /// The response with these sections, if they fit whole.
    fn try_emit(&self, sections: Sections<'_>, limit: u16) -> Option<Vec<u8>> {
        let (answers, authorities, extra) = sections;
        let mut bytes = Vec::with_capacity(512);
        let mut encoder = BinEncoder::new(&mut bytes);
        encoder.set_max_size(limit);
        let header = emit_message_parts(
            &self.metadata,
            &mut RawQuestion(self.question, self.count),
            &mut answers.iter(),
            &mut authorities.iter(),
            &mut extra.iter(),
            self.edns,
            None,
            &mut encoder,
        )
        .ok()?;
        let expected_extra = extra.len() + usize::from(self.edns.is_some());
        let whole = usize::from(header.counts.answers) == answers.len()
            && usize::from(header.counts.authorities) == authorities.len()
            && usize::from(header.counts.additionals) == expected_extra;
        whole.then_some(bytes)
    }

    /// Header, question and OPT only, with TC set.
    fn truncated(&self, limit: u16) -> Vec<u8> {
        let mut metadata = self.metadata;
        metadata.truncation = true;
        let mut bytes = Vec::with_capacity(128);
        let mut encoder = BinEncoder::new(&mut bytes);
        encoder.set_max_size(limit);
        let none: [Record; 0] = [];
        let emitted = emit_message_parts(
            &metadata,
            &mut RawQuestion(self.question, self.count),
            &mut none.iter(),
            &mut none.iter(),
            &mut none.iter(),
            self.edns,
            None,
            &mut encoder,
        );
        match emitted {
            Ok(_) => bytes,
            Err(_) => encode_header_only(&metadata, ResponseCode::ServFail),
        }
    }
}

/// A response that is just a header (no question could be echoed).
fn encode_header_only(request: &Metadata, rcode: ResponseCode) -> Vec<u8> {
    let mut metadata = Metadata::response_from_request(request);
    metadata.response_code = rcode;
    let mut bytes = Vec::with_capacity(12);
    let none: [Record; 0] = [];
    let mut encoder = BinEncoder::new(&mut bytes);
    // Twelve bytes always fit: nothing here can fail.
    let _ = emit_message_parts(
        &metadata,
        &mut RawQuestion(&[], 0),
        &mut none.iter(),
        &mut none.iter(),
        &mut none.iter(),
        None,
        None,
        &mut encoder,
    );
    bytes
}

/// The question section exactly as the client sent it, so the echoed
/// name keeps the client's letter case (0x20 randomisation).
struct RawQuestion<'a>(&'a [u8], usize);

impl EmitAndCount for RawQuestion<'_> {
    fn emit(&mut self, encoder: &mut BinEncoder<'_>) -> Result<usize, ProtoError> {
        encoder.emit_vec(self.0)?;
        Ok(self.1)
    }
}

#[cfg(test)]
mod tests {
    use hickory_proto::op::{Message, Query};
    use hickory_proto::rr::rdata::CNAME;
    use hickory_proto::rr::{Name, RData, Record};

    use super::*;

    /// Records that each compress well alone (the target is the owner)
    /// but not in a long message, where hickory keeps no more names to
    /// point at: the first cut by size is too large and must be halved.
    #[test]
    fn a_transfer_whose_records_compress_less_together_is_cut_smaller() {
        let label = "a".repeat(58);
        let records: Vec<Record> = (0..1000)
            .map(|n| {
                let text = format!("r{n}{label}.{label}.{label}.example.internal.");
                let name = Name::from_ascii(text).unwrap();
                Record::from_rdata(name.clone(), 60, RData::CNAME(CNAME(name)))
            })
            .collect();
        let answer = Answer {
            authoritative: true,
            answers: records.clone(),
            ..Answer::error(ResponseCode::NoError)
        };
        let mut query = Message::query();
        let zone = Name::from_ascii("example.internal.").unwrap();
        query.add_query(Query::query(zone, RecordType::AXFR));
        let bytes = query.to_vec().unwrap();
        let peer = "127.0.0.1:5353".parse().unwrap();
        let request = Request::from_bytes(bytes, peer, Protocol::Tcp).unwrap();
        let (first, more) = encode_transfer(&request, &answer);
        let mut received = Vec::new();
        for message in std::iter::once(&first).chain(&more) {
            assert!(message.len() <= usize::from(u16::MAX));
            let message = Message::from_vec(message).expect("a well-formed message");
            assert_eq!(message.metadata.response_code, ResponseCode::NoError);
            received.extend(message.answers.iter().map(|r| r.name.clone()));
        }
        let sent: Vec<Name> = records.iter().map(|r| r.name.clone()).collect();
        assert_eq!(received, sent, "every record, in order");
        // The cut by size alone would have made fewer, too large messages.
        assert!(more.len() + 1 > transfer_chunks(&answer.answers).len());
    }
}
