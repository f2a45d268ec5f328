//! Wire encoding of the records a cached answer rotates (A, AAAA, SRV),
//! each written on its own right after the question.
//!
//! A registry change makes every worker re-encode the changed service's
//! answers; through hickory's encoder that was most of the cost (its name
//! compression copies each label it stores and searches them linearly).
//! These records need much less: an owner name compressed against the
//! question, fixed fields and rdata, and for SRV a target that is never
//! compressed (RFC 2782). The bytes are the ones hickory writes for the
//! same record in the same place, so both paths size responses alike.

use hickory_proto::rr::{Name, RData, Record};

use super::cache::HEADER;

/// Whether `record` is one [`emit`] writes.
pub fn is_movable(record: &Record) -> bool {
    matches!(record.data, RData::A(_) | RData::AAAA(_) | RData::SRV(_))
}

/// Appends `record` to `out` as it reads right after the question whose
/// name is `question` (wire form, ending in the root label); `None` for a
/// record that is not [`is_movable`] or a name too long for the wire.
pub fn emit(record: &Record, question: &[u8], out: &mut Vec<u8>) -> Option<()> {
    emit_owner(&record.name, question, out)?;
    out.extend_from_slice(&u16::from(record.record_type()).to_be_bytes());
    out.extend_from_slice(&u16::from(record.dns_class).to_be_bytes());
    out.extend_from_slice(&record.ttl.to_be_bytes());
    let length_at = out.len();
    out.extend_from_slice(&[0, 0]);
    match &record.data {
        RData::A(a) => out.extend_from_slice(&a.0.octets()),
        RData::AAAA(aaaa) => out.extend_from_slice(&aaaa.0.octets()),
        RData::SRV(srv) => {
            for field in [srv.priority, srv.weight, srv.port] {
                out.extend_from_slice(&field.to_be_bytes());
            }
            emit_labels(&srv.target, out)?;
            out.push(0);
        }
        _ => return None,
    }
    let length = u16::try_from(out.len() - length_at - 2).ok()?;
    out[length_at..length_at + 2].copy_from_slice(&length.to_be_bytes());
    Some(())
}

/// The owner: its labels up to the longest tail that is also a tail of
/// the question, then a pointer to that tail (or the root label).
fn emit_owner(owner: &Name, question: &[u8], out: &mut Vec<u8>) -> Option<()> {
    let start = out.len();
    emit_labels(owner, out)?;
    let question_labels = &question[..question.len().checked_sub(1)?];
    let mut at = start;
    while at < out.len() {
        if let Some(offset) = tail_offset(question_labels, &out[at..]) {
            out.truncate(at);
            // The question's name starts right after the header.
            let pointer = 0xC000 | (HEADER as u16 + offset);
            out.extend_from_slice(&pointer.to_be_bytes());
            return Some(());
        }
        at += 1 + usize::from(out[at]);
    }
    out.push(0);
    Some(())
}

/// Where in `labels` (a name's labels in wire form, without the root) a
/// label-aligned tail equal to `tail` starts, byte for byte.
fn tail_offset(labels: &[u8], tail: &[u8]) -> Option<u16> {
    let mut at = 0;
    while at < labels.len() {
        if &labels[at..] == tail {
            return u16::try_from(at).ok();
        }
        at += 1 + usize::from(labels[at]);
    }
    None
}

/// `name`'s labels, length-prefixed, without the root label.
fn emit_labels(name: &Name, out: &mut Vec<u8>) -> Option<()> {
    let start = out.len();
    for label in name.iter() {
        out.push(u8::try_from(label.len()).ok().filter(|len| *len <= 63)?);
        out.extend_from_slice(label);
    }
    // The whole name, root label included, fits in 255 bytes.
    (out.len() - start < 255).then_some(())
}

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, Ipv6Addr};

    use hickory_proto::op::Query;
    use hickory_proto::rr::RecordType;
    use hickory_proto::rr::rdata::{A, AAAA, SRV};
    use hickory_proto::serialize::binary::{BinEncodable, BinEncoder};

    use super::*;

    fn name(text: &str) -> Name {
        Name::from_ascii(text).unwrap()
    }

    /// The record's bytes after the question as hickory writes them.
    fn by_hickory(question: &Query, record: &Record) -> Vec<u8> {
        let mut buffer = Vec::new();
        let mut encoder = BinEncoder::new(&mut buffer);
        encoder.emit_vec(&[0; 12]).unwrap();
        question.emit(&mut encoder).unwrap();
        let end = encoder.offset();
        record.emit(&mut encoder).unwrap();
        buffer[end..].to_vec()
    }

    fn ours(question: &Query, record: &Record) -> Vec<u8> {
        let mut wire = Vec::new();
        question
            .name()
            .emit(&mut BinEncoder::new(&mut wire))
            .unwrap();
        let mut out = Vec::new();
        emit(record, &wire, &mut out).unwrap();
        out
    }

    #[test]
    fn records_come_out_as_hickory_writes_them() {
        let questions = [
            ("payment.svc.internal.", RecordType::A),
            ("_http._tcp.payment.svc.internal.", RecordType::SRV),
            ("eu.payment.svc.internal.", RecordType::AAAA),
            ("other.example.", RecordType::A),
        ];
        let records = [
            Record::from_rdata(
                name("payment.svc.internal."),
                5,
                RData::A(A(Ipv4Addr::new(10, 0, 0, 1))),
            ),
            Record::from_rdata(
                name("eu.payment.svc.internal."),
                30,
                RData::AAAA(AAAA(Ipv6Addr::LOCALHOST)),
            ),
            Record::from_rdata(
                name("_http._tcp.payment.svc.internal."),
                5,
                RData::SRV(SRV::new(10, 5, 8080, name("i-1.payment.svc.internal."))),
            ),
            Record::from_rdata(
                name("i-1.payment.svc.internal."),
                5,
                RData::A(A(Ipv4Addr::new(10, 0, 0, 2))),
            ),
            Record::from_rdata(
                name("Payment.svc.internal."),
                5,
                RData::A(A(Ipv4Addr::LOCALHOST)),
            ),
            Record::from_rdata(name("elsewhere.test."), 5, RData::A(A(Ipv4Addr::LOCALHOST))),
        ];
        for (question, qtype) in questions {
            let question = Query::query(name(question), qtype);
            for record in &records {
                assert_eq!(
                    ours(&question, record),
                    by_hickory(&question, record),
                    "{record} after {question}"
                );
            }
        }
    }

    #[test]
    fn other_records_are_refused() {
        let question = name("a.test.");
        let mut wire = Vec::new();
        question.emit(&mut BinEncoder::new(&mut wire)).unwrap();
        let txt = Record::from_rdata(
            question,
            5,
            RData::TXT(hickory_proto::rr::rdata::TXT::new(vec!["x".into()])),
        );
        assert!(!is_movable(&txt));
        assert!(emit(&txt, &wire, &mut Vec::new()).is_none());
    }
}
