//! Pre-encoded answers: the UDP fast path.
//!
//! Each UDP worker owns an [`AnswerCache`] of answers per question (name,
//! type, class), encoded once into wire bytes. A query of the common shape
//! (one question, no records but an optional OPT) is answered by copying
//! its own ID, flags and question (so the client's letter case survives)
//! and then the cached records in this turn's rotation; no `Message` is
//! decoded or built. Every hit is checked against the current snapshot and
//! static zones: a change to one service invalidates that service's
//! answers only. Queries of any other shape, and answers the cache cannot
//! hold, go the general way (`wire::respond`), which the cache must match
//! record for record.

use std::collections::HashMap;
use std::net::SocketAddr;

use hickory_proto::op::{LowerQuery, Query, ResponseCode};
use hickory_proto::rr::RecordType;
use hickory_proto::serialize::binary::{BinDecodable, BinDecoder, BinEncodable, BinEncoder};
use hickory_server::net::xfer::Protocol;

use super::answer::{Answer, Authority, Rotation, Scope, Validity};
use super::movable;
use super::rrl::{Decision, Rrl};
use super::wire::{CLASSIC_UDP_PAYLOAD, MAX_UDP_PAYLOAD, Outcome, respond};
use crate::registry::{Snapshot, journal_key};

/// Answers all UDP workers together keep, so a flood of distinct names
/// cannot grow memory without bound however many cores there are; each
/// worker keeps its share, and starts over when that is full.
pub const TOTAL_ENTRIES: usize = 1 << 19;
/// The least a worker keeps, whatever the share.
const MIN_ENTRIES: usize = 1 << 14;
/// Length of the DNS header.
pub(super) const HEADER: usize = 12;
/// The OPT record of every EDNS response: root owner, type 41, muster's
/// payload size, extended rcode 0, version 0, no flags, no options.
const OPT_RECORD: [u8; 11] = {
    let size = MAX_UDP_PAYLOAD.to_be_bytes();
    [0, 0, 41, size[0], size[1], 0, 0, 0, 0, 0, 0]
};
/// EDNS options hickory decodes by content (NSID, client subnet): a query
/// carrying one goes the general way, which may reject it.
const DECODED_OPTIONS: [u16; 2] = [3, 8];

/// One worker's cache of encoded answers.
pub struct AnswerCache {
    /// foldhash, seeded per process so names cannot be chosen to collide.
    /// With it, and one lookup per hit instead of two, the cached path
    /// went from 1,983 to 1,228 instructions per query under callgrind
    /// (`benches/dns_instructions.sh`, both changes together).
    entries: HashMap<Box<[u8]>, Entry, foldhash::fast::RandomState>,
    /// The lowercased question of the query being answered.
    key: Vec<u8>,
    /// Answers kept before the cache starts over.
    limit: usize,
    /// Answers encoded so far: first ones and refreshes of stale ones.
    encoded: u64,
    /// The messages that follow the last answer (a zone transfer too
    /// large for one), for the stream loop to send after it.
    more: Vec<Vec<u8>>,
}

/// A query of the common shape, read in place.
struct SimpleQuery<'a> {
    bytes: &'a [u8],
    /// Where the question section (name, type, class) ends.
    question_end: usize,
    qtype: u16,
    /// The client's UDP payload size, when it sent OPT.
    edns_payload: Option<u16>,
}

/// A cached answer: its records as wire bytes, laid out so that only the
/// question precedes them when they were encoded.
struct Entry {
    records: Records,
    rcode: ResponseCode,
    authoritative: bool,
    validity: Validity,
    /// The snapshot version this entry was last found valid at.
    checked: u64,
    /// The journal key of the service it answers from, if one.
    service_key: Option<u64>,
}

enum Records {
    /// Answers and authorities in one block, then additionals (dropped
    /// first when the response would be too big). Names inside may point
    /// at each other: the blocks never move.
    Fixed {
        main: Box<[u8]>,
        additionals: Box<[u8]>,
        counts: [u16; 3],
    },
    /// Answers that rotate, each encoded on its own after the question so
    /// it can go anywhere (A, AAAA and SRV carry no name that could point
    /// into another record), followed by their paired additionals.
    Rotating {
        bytes: Box<[u8]>,
        /// Where each record ends in `bytes`: answers, then additionals.
        ends: Box<[u32]>,
        answers: usize,
        rotation: Rotation,
    },
}

impl Default for AnswerCache {
    fn default() -> Self {
        Self::new()
    }
}

impl AnswerCache {
    /// A cache for the only worker.
    pub fn new() -> Self {
        Self::shared_by(1)
    }

    /// A cache for one of `workers` workers: its share of
    /// [`TOTAL_ENTRIES`].
    pub fn shared_by(workers: usize) -> Self {
        Self {
            entries: HashMap::default(),
            key: Vec::with_capacity(260),
            limit: (TOTAL_ENTRIES / workers.max(1)).max(MIN_ENTRIES),
            encoded: 0,
            more: Vec::new(),
        }
    }

    /// Answers any query into `out`: from the cache when it has the
    /// common shape, else the general way (`wire::respond`). `None` when
    /// nothing is to be sent (not a query). Both transports' loops call
    /// this.
    pub fn answer(
        &mut self,
        authority: &Authority,
        query: &[u8],
        peer: SocketAddr,
        transport: Transport<'_>,
        out: &mut Vec<u8>,
    ) -> Option<Outcome> {
        if let Some(outcome) = self.respond(authority, query, peer, transport, out) {
            return Some(outcome);
        }
        let reply = respond(
            authority,
            query,
            peer,
            transport.protocol(),
            transport.rrl(),
        )?;
        out.clear();
        out.extend_from_slice(&reply.bytes);
        self.more = reply.more;
        Some(reply.outcome)
    }

    /// The messages that follow the last answer written to `out` (only a
    /// zone transfer too large for one message has any).
    pub fn take_more(&mut self) -> Vec<Vec<u8>> {
        std::mem::take(&mut self.more)
    }

    /// Writes the response to `query` from `peer` into `out` from the
    /// cache, encoding and keeping the answer first if need be. `None`
    /// when the query must go the general way; an empty `out` when rate
    /// limiting dropped the answer.
    pub fn respond(
        &mut self,
        authority: &Authority,
        query: &[u8],
        peer: SocketAddr,
        transport: Transport<'_>,
        out: &mut Vec<u8>,
    ) -> Option<Outcome> {
        let parsed = SimpleQuery::parse(query, &mut self.key)?;
        let limit = match transport {
            Transport::Udp(_) => parsed.udp_limit(),
            Transport::Stream => usize::from(u16::MAX),
        };
        let rrl = transport.rrl();
        let snapshot = authority.snapshot();
        let zones = authority.zones_generation();
        let reply = Reply {
            query: &parsed,
            // The key is the question: the name, then type and class.
            name: &self.key[..self.key.len() - 4],
            limit,
            peer,
            rrl,
            cap: authority.max_answers(),
        };
        if let Some(entry) = self.entries.get_mut(self.key.as_slice()) {
            if !entry.is_fresh(&snapshot, zones) {
                // Re-encoded in place: the key is already there.
                match Entry::prepare(authority, &self.key) {
                    Some(fresh) => {
                        *entry = fresh;
                        self.encoded += 1;
                    }
                    None => {
                        self.entries.remove(self.key.as_slice());
                        return None;
                    }
                }
            }
            return Some(reply.write(entry, authority, out));
        }
        let entry = Entry::prepare(authority, &self.key)?;
        self.encoded += 1;
        if self.entries.len() >= self.limit {
            self.entries.clear();
        }
        let outcome = reply.write(&entry, authority, out);
        self.entries.insert(self.key.as_slice().into(), entry);
        Some(outcome)
    }

    /// Answers encoded so far (a hit encodes nothing).
    pub fn encoded(&self) -> u64 {
        self.encoded
    }

    /// Answers held.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

/// How the query came, which sets the response's size limit and whether
/// rate limiting applies.
#[derive(Clone, Copy)]
pub enum Transport<'r> {
    /// UDP, with the rate limiter if one is configured.
    Udp(Option<&'r Rrl>),
    /// TCP or TLS.
    Stream,
}

impl<'r> Transport<'r> {
    /// The rate limiter that applies: UDP's, if configured.
    fn rrl(self) -> Option<&'r Rrl> {
        match self {
            Self::Udp(rrl) => rrl,
            Self::Stream => None,
        }
    }

    /// The protocol the general path answers for.
    fn protocol(self) -> Protocol {
        match self {
            Self::Udp(_) => Protocol::Udp,
            Self::Stream => Protocol::Tcp,
        }
    }
}

/// What a response is written for.
struct Reply<'q, 'r> {
    query: &'q SimpleQuery<'q>,
    /// The question's name, lowercased, in wire form.
    name: &'q [u8],
    /// The largest response the transport takes.
    limit: usize,
    peer: SocketAddr,
    rrl: Option<&'r Rrl>,
    /// Most rotating answers per response (0: all).
    cap: usize,
}

impl Reply<'_, '_> {
    /// Writes the response carrying `entry` into `out`, or nothing when
    /// rate limiting drops it. Rotating answers take the authority's next
    /// turn.
    fn write(&self, entry: &Entry, authority: &Authority, out: &mut Vec<u8>) -> Outcome {
        let parsed = self.query;
        let (peer, rrl) = (self.peer, self.rrl);
        let decision = rrl.map(|rrl| {
            let qtype = RecordType::from(parsed.qtype);
            rrl.decide(peer.ip(), self.name, qtype, entry.rcode)
        });
        out.clear();
        let truncated = match decision {
            Some(Decision::Drop) => false,
            Some(Decision::Slip) => {
                parsed.write_truncated(entry, out);
                true
            }
            _ => {
                let turn = match entry.records {
                    Records::Rotating { .. } => authority.next_turn(),
                    Records::Fixed { .. } => 0,
                };
                parsed.write(entry, turn, self.cap, self.limit, out)
            }
        };
        Outcome {
            qtype: Some(RecordType::from(parsed.qtype)),
            rcode: entry.rcode,
            truncated,
            rrl: decision,
        }
    }
}

impl<'a> SimpleQuery<'a> {
    /// Reads `bytes` if it is a standard query with one question and at
    /// most an OPT record (EDNS version 0), writing the question, name
    /// lowercased, into `key`.
    fn parse(bytes: &'a [u8], key: &mut Vec<u8>) -> Option<Self> {
        let header = bytes.get(..HEADER)?;
        // QR, opcode and TC must all be zero.
        if header[2] & 0b1111_1010 != 0 {
            return None;
        }
        let count = |at: usize| u16::from_be_bytes([header[at], header[at + 1]]);
        if count(4) != 1 || count(6) != 0 || count(8) != 0 || count(10) > 1 {
            return None;
        }
        let mut at = HEADER;
        loop {
            let length = usize::from(*bytes.get(at)?);
            at += 1;
            if length == 0 {
                break;
            }
            // Compression pointers and extended label types are not for
            // a question; the general path can say so.
            if length > 63 || at + length - HEADER > 255 {
                return None;
            }
            at += length;
        }
        let fixed = bytes.get(at..at + 4)?;
        let qtype = u16::from_be_bytes([fixed[0], fixed[1]]);
        if matches!(RecordType::from(qtype), RecordType::AXFR | RecordType::IXFR) {
            return None;
        }
        let question_end = at + 4;
        key.clear();
        key.extend_from_slice(&bytes[HEADER..question_end]);
        // Length bytes are below 64, so only the labels' letters change.
        key[..at - HEADER].make_ascii_lowercase();
        let rest = &bytes[question_end..];
        let edns_payload = match count(10) {
            0 if rest.is_empty() => None,
            1 => Some(read_opt(rest)?),
            _ => return None,
        };
        Some(Self {
            bytes,
            question_end,
            qtype,
            edns_payload,
        })
    }

    /// The largest response this client takes over UDP.
    fn udp_limit(&self) -> usize {
        usize::from(self.edns_payload.map_or(CLASSIC_UDP_PAYLOAD, |size| {
            size.clamp(CLASSIC_UDP_PAYLOAD, MAX_UDP_PAYLOAD)
        }))
    }

    /// The response header (with `counts` for answers, authorities and
    /// additionals, OPT not included) and the question, into `out`.
    fn write_head(&self, entry: &Entry, truncated: bool, counts: [u16; 3], out: &mut Vec<u8>) {
        let query = self.bytes;
        let recursion_desired = query[2] & 0x01;
        let checking_disabled = query[3] & 0x10;
        let authoritative = if entry.authoritative { 0x04 } else { 0 };
        let truncation = if truncated { 0x02 } else { 0 };
        let additionals = counts[2] + u16::from(self.edns_payload.is_some());
        out.extend_from_slice(&query[..2]);
        out.push(0x80 | authoritative | truncation | recursion_desired);
        out.push(checking_disabled | entry.rcode.low());
        out.extend_from_slice(&1u16.to_be_bytes());
        for count in [counts[0], counts[1], additionals] {
            out.extend_from_slice(&count.to_be_bytes());
        }
        out.extend_from_slice(&query[HEADER..self.question_end]);
    }

    /// The whole response, or without additionals, or empty with TC:
    /// whichever fits first. Says whether it was truncated.
    fn write(
        &self,
        entry: &Entry,
        turn: usize,
        cap: usize,
        limit: usize,
        out: &mut Vec<u8>,
    ) -> bool {
        let opt = if self.edns_payload.is_some() {
            OPT_RECORD.len()
        } else {
            0
        };
        match &entry.records {
            Records::Fixed {
                main,
                additionals,
                counts,
            } => {
                let head = self.question_end + main.len() + opt;
                if head + additionals.len() <= limit {
                    self.write_head(entry, false, *counts, out);
                    out.extend_from_slice(main);
                    out.extend_from_slice(additionals);
                } else if head <= limit {
                    self.write_head(entry, false, [counts[0], counts[1], 0], out);
                    out.extend_from_slice(main);
                } else {
                    self.write_truncated(entry, out);
                    return true;
                }
            }
            Records::Rotating {
                bytes,
                ends,
                answers,
                rotation,
            } => {
                let record = |i: usize| {
                    let start = if i == 0 { 0 } else { ends[i - 1] as usize };
                    &bytes[start..ends[i] as usize]
                };
                // Additionals are stored only when paired with the answers.
                let paired = ends.len() > *answers;
                let mut chosen = 0u16;
                self.write_head(entry, false, [0, 0, 0], out);
                for i in rotation.order(turn, cap) {
                    out.extend_from_slice(record(i));
                    chosen += 1;
                }
                let without_additionals = out.len();
                let mut extra = 0u16;
                if paired {
                    for i in rotation.order(turn, cap) {
                        out.extend_from_slice(record(answers + i));
                        extra += 1;
                    }
                }
                if out.len() + opt > limit {
                    out.truncate(without_additionals);
                    extra = 0;
                }
                if out.len() + opt > limit {
                    out.clear();
                    self.write_truncated(entry, out);
                    return true;
                }
                out[6..8].copy_from_slice(&chosen.to_be_bytes());
                let additionals = extra + u16::from(self.edns_payload.is_some());
                out[10..12].copy_from_slice(&additionals.to_be_bytes());
            }
        }
        if self.edns_payload.is_some() {
            out.extend_from_slice(&OPT_RECORD);
        }
        false
    }

    /// Header, question and OPT only, with TC set.
    fn write_truncated(&self, entry: &Entry, out: &mut Vec<u8>) {
        self.write_head(entry, true, [0, 0, 0], out);
        if self.edns_payload.is_some() {
            out.extend_from_slice(&OPT_RECORD);
        }
    }
}

/// The payload size of an OPT record of version 0 that fills `rest`,
/// with well-formed options none of which hickory would decode by content.
fn read_opt(rest: &[u8]) -> Option<u16> {
    // Root owner, type, class (payload), extended rcode, version, flags,
    // RDATA length.
    let fixed = rest.get(..11)?;
    if fixed[0] != 0 || fixed[1..3] != [0, 41] || fixed[6] != 0 {
        return None;
    }
    let length = usize::from(u16::from_be_bytes([fixed[9], fixed[10]]));
    let mut options = rest.get(11..)?;
    if options.len() != length {
        return None;
    }
    while !options.is_empty() {
        let code = u16::from_be_bytes([*options.first()?, *options.get(1)?]);
        let size = usize::from(u16::from_be_bytes([*options.get(2)?, *options.get(3)?]));
        if DECODED_OPTIONS.contains(&code) {
            return None;
        }
        options = options.get(4 + size..)?;
    }
    Some(u16::from_be_bytes([fixed[3], fixed[4]]))
}

impl Entry {
    /// Computes and encodes the answer to `question` (the cache key: the
    /// lowercased question in wire form); `None` when it cannot be cached
    /// (the general path answers instead).
    fn prepare(authority: &Authority, question: &[u8]) -> Option<Self> {
        // Already lowercased, so owner names compress to it.
        let lowered = LowerQuery::query(Query::read(&mut BinDecoder::new(question)).ok()?);
        let prepared = authority.prepare(&lowered);
        let answer = prepared.answer;
        if answer.rcode.high() != 0 {
            return None;
        }
        Some(Self {
            records: encode_records(lowered.original(), &question[..question.len() - 4], &answer)?,
            rcode: answer.rcode,
            authoritative: answer.authoritative,
            checked: prepared.version,
            service_key: match &prepared.validity.scope {
                Scope::Service(name, _) => Some(journal_key(name)),
                Scope::Zones | Scope::Registry(_) => None,
            },
            validity: prepared.validity,
        })
    }

    /// Whether this answer still holds for `snapshot` and the static
    /// zones' generation `zones`; remembers a positive check per version.
    fn is_fresh(&mut self, snapshot: &Snapshot, zones: u64) -> bool {
        if self.validity.zones != zones {
            return false;
        }
        if self.checked == snapshot.version() {
            return true;
        }
        // The journal answers most checks without looking the service up.
        let unchanged = self
            .service_key
            .and_then(|key| snapshot.unchanged_since(key, self.checked));
        let valid =
            unchanged == Some(true) || Authority::still_valid(&self.validity, snapshot, zones);
        if valid {
            self.checked = snapshot.version();
        }
        valid
    }
}

/// `answer`'s records as the cache lays them out; `name` is the
/// question's name in wire form.
fn encode_records(question: &Query, name: &[u8], answer: &Answer) -> Option<Records> {
    if answer.rotation.levels.is_empty() {
        return encode_fixed(question, answer);
    }
    let paired = answer.rotation.paired && answer.additionals.len() == answer.answers.len();
    let cacheable = answer.authorities.is_empty()
        && (paired || answer.additionals.is_empty())
        && answer
            .answers
            .iter()
            .chain(&answer.additionals)
            .all(movable::is_movable);
    if !cacheable {
        return None;
    }
    let mut bytes = Vec::with_capacity(64 * (answer.answers.len() + answer.additionals.len()));
    let mut ends = Vec::with_capacity(answer.answers.len() + answer.additionals.len());
    for record in answer.answers.iter().chain(&answer.additionals) {
        movable::emit(record, name, &mut bytes)?;
        ends.push(u32::try_from(bytes.len()).ok()?);
    }
    Some(Records::Rotating {
        bytes: bytes.into(),
        ends: ends.into(),
        answers: answer.answers.len(),
        rotation: answer.rotation.clone(),
    })
}

/// Answers that do not rotate, encoded by hickory after `question`.
fn encode_fixed(question: &Query, answer: &Answer) -> Option<Records> {
    let mut buffer = Vec::with_capacity(512);
    let mut encoder = BinEncoder::new(&mut buffer);
    encoder.emit_vec(&[0; HEADER]).ok()?;
    question.emit(&mut encoder).ok()?;
    let question_end = encoder.offset();
    encoder
        .emit_all(answer.answers.iter().chain(&answer.authorities))
        .ok()?;
    let main_end = encoder.offset();
    encoder.emit_all(answer.additionals.iter()).ok()?;
    Some(Records::Fixed {
        main: buffer[question_end..main_end].into(),
        additionals: buffer[main_end..].into(),
        counts: [
            u16::try_from(answer.answers.len()).ok()?,
            u16::try_from(answer.authorities.len()).ok()?,
            u16::try_from(answer.additionals.len()).ok()?,
        ],
    })
}
