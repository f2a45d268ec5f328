//! Turns one question into an answer: registry names from the current
//! snapshot, everything else from the static zones. Pure and lock-free:
//! it reads an immutable snapshot and never does I/O, so the UDP and TCP
//! paths (and the benchmarks) share it.

use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use arc_swap::ArcSwap;

use hickory_proto::op::{LowerQuery, ResponseCode};
use hickory_proto::rr::rdata::{A, AAAA, HINFO, PTR, SRV, TXT};
use hickory_proto::rr::{DNSClass, LowerName, Name, RData, Record, RecordType};

use super::names::{RegistryName, classify};
use super::zones::{Lookup, StaticZone, ZoneSet};
use crate::config::{fqdn, ttl_seconds};
use crate::registry::{Endpoint, Instance, PortSelector, Registry, Service, Snapshot};

/// The sections of a response, before encoding.
#[derive(Debug, Clone, PartialEq)]
pub struct Answer {
    pub rcode: ResponseCode,
    pub authoritative: bool,
    pub answers: Vec<Record>,
    pub authorities: Vec<Record>,
    pub additionals: Vec<Record>,
    /// How the answers may be reordered and capped per query.
    pub rotation: Rotation,
}

impl Answer {
    /// An answer with no records.
    pub fn error(rcode: ResponseCode) -> Self {
        Self {
            rcode,
            authoritative: false,
            answers: Vec::new(),
            authorities: Vec::new(),
            additionals: Vec::new(),
            rotation: Rotation::default(),
        }
    }

    /// This answer as turn `turn` of its rotation hands it out, keeping at
    /// most `cap` rotating answers (0: all).
    pub fn arranged(mut self, turn: usize, cap: usize) -> Self {
        if self.rotation.levels.is_empty() {
            return self;
        }
        let order: Vec<usize> = self.rotation.order(turn, cap).collect();
        self.answers = order.iter().map(|&i| self.answers[i].clone()).collect();
        if self.rotation.paired {
            self.additionals = order.iter().map(|&i| self.additionals[i].clone()).collect();
        }
        self.rotation = Rotation::default();
        self
    }
}

/// Which answers rotate: runs of answers (levels) that each rotate on
/// their own. An address answer is one level; SRV answers have one per
/// priority, in ascending order, so rotation never promotes a backup and
/// a cap keeps the preferred level. Both the per-query path and the
/// pre-encoded answers of the UDP cache arrange records with [`order`].
///
/// [`order`]: Rotation::order
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Rotation {
    /// Lengths of consecutive runs of answers; empty: a fixed order.
    pub levels: Vec<usize>,
    /// Additional record `i` belongs to answer `i` (an SRV target's
    /// address) and follows it when answers move or are capped.
    pub paired: bool,
}

impl Rotation {
    /// The answers' indices in turn `turn`, at most `cap` of them (0: all).
    pub fn order(&self, turn: usize, cap: usize) -> impl Iterator<Item = usize> + '_ {
        let limit = if cap == 0 { usize::MAX } else { cap };
        self.levels
            .iter()
            .scan(0, |start, &length| {
                let first = *start;
                *start += length;
                Some((first, length))
            })
            .flat_map(move |(first, length)| {
                let shift = if length == 0 { 0 } else { turn % length };
                (0..length).map(move |i| first + (i + shift) % length)
            })
            .take(limit)
    }
}

/// What a prepared answer was computed from, so a cached copy can tell
/// whether it still holds.
#[derive(Debug, Clone, PartialEq)]
pub struct Validity {
    /// The static zones' generation (bumped on every reload).
    pub zones: u64,
    pub scope: Scope,
}

/// The part of the registry an answer depends on.
#[derive(Debug, Clone, PartialEq)]
pub enum Scope {
    /// Static zone data only.
    Zones,
    /// One service's name and the version it last changed at (`None`:
    /// it did not exist).
    Service(Arc<str>, Option<u64>),
    /// The whole registry at this version (reverse names).
    Registry(u64),
}

/// An answer in its canonical order, with what it depends on.
#[derive(Debug)]
pub struct Prepared {
    pub answer: Answer,
    pub validity: Validity,
    /// The registry version it was computed at.
    pub version: u64,
}

/// The static zones being served, and which reload they came from.
#[derive(Default)]
struct ServedZones {
    set: ZoneSet,
    generation: u64,
}

/// Records found for a name that exists; empty answers mean NODATA.
#[derive(Debug, Default)]
struct Found {
    answers: Vec<Record>,
    additionals: Vec<Record>,
    rotation: Rotation,
}

/// How registry records are named, timed and bounded.
#[derive(Debug, Clone)]
pub struct RegistryZone {
    /// The zone registry names live under, e.g. `svc.internal.`.
    pub origin: Name,
    /// TTL of registry records, seconds.
    pub ttl: u32,
    /// SOA minimum of the registry zone, seconds.
    pub negative_ttl: u32,
    /// Most A/AAAA/SRV records per answer, after rotation; 0: no cap.
    pub max_answers: usize,
    /// Serve PTR records for registered addresses.
    pub reverse: bool,
    /// Static zones that may be transferred, and to whom.
    pub transfers: Vec<(Name, Vec<ipnet::IpNet>)>,
}

impl RegistryZone {
    /// The registry zone `config` describes; `None` when `dns.zone` is
    /// not a domain name (config validation refuses those).
    pub fn from_config(config: &crate::Config) -> Option<Self> {
        let dns = &config.dns;
        let transfers = dns
            .transfers
            .iter()
            .filter_map(|(zone, peers)| Some((Name::from_ascii(fqdn(zone)).ok()?, peers.clone())))
            .collect();
        Some(Self {
            origin: Name::from_ascii(config.zone_fqdn()).ok()?,
            ttl: ttl_seconds(dns.ttl),
            negative_ttl: ttl_seconds(dns.negative_ttl),
            max_answers: dns.max_answers,
            reverse: dns.reverse,
            transfers,
        })
    }
}

/// The reverse zones muster answers in when `reverse` is on.
const REVERSE_ZONES: [&str; 2] = ["in-addr.arpa.", "ip6.arpa."];

/// The authoritative data muster serves: the registry overlaid on the
/// static zones.
pub struct Authority {
    registry: Arc<Registry>,
    /// Replaced whole on reload; readers never lock.
    zones: ArcSwap<ServedZones>,
    origin: Name,
    lower_origin: LowerName,
    ttl: u32,
    negative_ttl: u32,
    max_answers: usize,
    transfers: Vec<(LowerName, Vec<ipnet::IpNet>)>,
    /// The reverse zones' origins (and whether each is IPv4's), when PTR
    /// records are served.
    reverse: Vec<(LowerName, bool)>,
    /// Advances on every answer so clients see the records rotate.
    rotation: AtomicUsize,
}

impl Authority {
    /// `zones` may hold a static zone for the registry zone; if not, one
    /// with a synthesized SOA and NS is added.
    pub fn new(registry: Arc<Registry>, zones: ZoneSet, zone: RegistryZone) -> Self {
        let authority = Self {
            registry,
            zones: ArcSwap::default(),
            lower_origin: LowerName::new(&zone.origin),
            origin: zone.origin,
            ttl: zone.ttl,
            negative_ttl: zone.negative_ttl,
            max_answers: zone.max_answers,
            transfers: zone
                .transfers
                .iter()
                .map(|(name, peers)| (LowerName::new(name), peers.clone()))
                .collect(),
            reverse: if zone.reverse {
                REVERSE_ZONES
                    .iter()
                    .filter_map(|z| Name::from_ascii(z).ok())
                    .map(|z| {
                        (
                            LowerName::new(&z),
                            z.num_labels() == 2 && z.iter().next() == Some(b"in-addr"),
                        )
                    })
                    .collect()
            } else {
                Vec::new()
            },
            rotation: AtomicUsize::new(0),
        };
        authority.replace_zones(zones);
        authority
    }

    /// Serves `zones` from the next query on; queries in flight finish
    /// with the zones they started with.
    pub fn replace_zones(&self, mut zones: ZoneSet) {
        match zones.get_mut(&self.lower_origin) {
            Some(existing) => existing.set_negative_ttl(self.negative_ttl),
            None => zones.insert(StaticZone::synthesized(&self.origin, self.negative_ttl)),
        }
        for (reverse, _) in &self.reverse {
            if zones.get(reverse).is_none() {
                zones.insert(StaticZone::synthesized(
                    &Name::from(reverse),
                    self.negative_ttl,
                ));
            }
        }
        let generation = self.zones.load().generation + 1;
        self.zones.store(Arc::new(ServedZones {
            set: zones,
            generation,
        }));
    }

    /// Most rotating answers per response (0: no cap).
    pub fn max_answers(&self) -> usize {
        self.max_answers
    }

    /// The registry snapshot answers are computed from right now.
    pub fn snapshot(&self) -> arc_swap::Guard<Arc<Snapshot>> {
        self.registry.load()
    }

    /// The generation of the static zones being served.
    pub fn zones_generation(&self) -> u64 {
        self.zones.load().generation
    }

    /// Whether an answer prepared under `validity` still holds at
    /// `snapshot` and `zones_generation`.
    pub fn still_valid(validity: &Validity, snapshot: &Snapshot, zones_generation: u64) -> bool {
        validity.zones == zones_generation
            && match &validity.scope {
                Scope::Zones => true,
                Scope::Service(name, index) => snapshot.service(name).map(|s| s.index()) == *index,
                Scope::Registry(version) => *version == snapshot.version(),
            }
    }

    /// Answers `query` as an authoritative server, rotated by this
    /// authority's own turn counter. `ANY` gets one synthesized HINFO
    /// record for a name that exists (RFC 8482), so it cannot be used to
    /// amplify.
    pub fn answer(&self, query: &LowerQuery) -> Answer {
        let answer = self.prepare(query).answer;
        if answer.rotation.levels.is_empty() {
            return answer;
        }
        answer.arranged(self.next_turn(), self.max_answers)
    }

    /// The next turn of rotation. One counter for every worker and
    /// transport, so however the kernel spreads queries over the workers,
    /// consecutive answers rotate (and every instance gets its turn under
    /// a cap).
    pub fn next_turn(&self) -> usize {
        self.rotation.fetch_add(1, Ordering::Relaxed)
    }

    /// The answer to `query` in canonical order (not yet rotated or
    /// capped), and what it was computed from.
    pub fn prepare(&self, query: &LowerQuery) -> Prepared {
        let zones = self.zones.load();
        let snapshot = self.registry.load();
        let mut validity = Validity {
            zones: zones.generation,
            scope: Scope::Zones,
        };
        let answer = self.answer_at(&zones.set, &snapshot, query, &mut validity.scope);
        Prepared {
            answer,
            validity,
            version: snapshot.version(),
        }
    }

    /// The answer from `zones` and `snapshot`, noting in `scope` what of
    /// the registry it read.
    fn answer_at(
        &self,
        zones: &ZoneSet,
        snapshot: &Snapshot,
        query: &LowerQuery,
        scope: &mut Scope,
    ) -> Answer {
        if query.query_class() != DNSClass::IN {
            return Answer::error(ResponseCode::Refused);
        }
        let name = query.name();
        let Some(zone) = zones.find(name) else {
            return Answer::error(ResponseCode::Refused);
        };
        let rtype = query.query_type();
        let found = if zone.origin() == &self.lower_origin {
            self.registry_records(snapshot, name, rtype, scope)
        } else if let Some((origin, ipv4)) = self.reverse.iter().find(|(o, _)| o == zone.origin()) {
            *scope = Scope::Registry(snapshot.version());
            self.reverse_records(snapshot, origin, *ipv4, name, rtype)
        } else {
            None
        };
        let answer = match found {
            Some(found) => positive(zone, found),
            None => static_records(zone, name, rtype),
        };
        if rtype == RecordType::ANY && answer.rcode == ResponseCode::NoError {
            return self.any_answer(name);
        }
        answer
    }

    /// A zone transfer of `name` for `peer`: allowed only for a static
    /// zone (never the registry's) listed in `dns.transfers` with a prefix
    /// holding `peer`.
    pub fn transfer(&self, name: &LowerName, peer: std::net::IpAddr) -> Answer {
        let allowed = self
            .transfers
            .iter()
            .any(|(zone, peers)| zone == name && peers.iter().any(|p| p.contains(&peer)));
        let zones = self.zones.load();
        let zone = zones
            .set
            .get(name)
            .filter(|_| allowed && *name != self.lower_origin);
        match zone {
            Some(zone) => Answer {
                rcode: ResponseCode::NoError,
                authoritative: true,
                answers: zone.transfer(),
                authorities: Vec::new(),
                additionals: Vec::new(),
                rotation: Rotation::default(),
            },
            None => Answer::error(ResponseCode::Refused),
        }
    }

    /// RFC 8482's answer to ANY: "the name exists", and nothing to amplify.
    fn any_answer(&self, name: &LowerName) -> Answer {
        let hinfo = RData::HINFO(HINFO::new("RFC8482".into(), String::new()));
        Answer {
            rcode: ResponseCode::NoError,
            authoritative: true,
            answers: vec![Record::from_rdata(Name::from(name), self.ttl, hinfo)],
            authorities: Vec::new(),
            additionals: Vec::new(),
            rotation: Rotation::default(),
        }
    }

    /// PTR records for a registered address: `<instance>.<service>.Z.` of
    /// each serving instance there. A partial reverse name is NODATA, an
    /// address nobody registered `None` (NXDOMAIN from the zone).
    fn reverse_records(
        &self,
        snapshot: &Snapshot,
        origin: &LowerName,
        ipv4: bool,
        name: &LowerName,
        rtype: RecordType,
    ) -> Option<Found> {
        let relative = usize::from(name.num_labels() - origin.num_labels());
        let labels: Vec<&[u8]> = name.iter().take(relative).collect();
        let address = match reverse_address(ipv4, &labels) {
            ReverseName::Address(address) => address,
            ReverseName::Partial => return Some(Found::default()),
            ReverseName::Invalid => return None,
        };
        let registered = snapshot.instances_at(&address);
        if registered.is_empty() {
            return None;
        }
        if !matches!(rtype, RecordType::PTR | RecordType::ANY) {
            return Some(Found::default());
        }
        let owner = Name::from(name);
        let answers = registered
            .iter()
            .filter(|i| snapshot.serves(i))
            .filter_map(|i| self.target(i))
            .map(|target| Record::from_rdata(owner.clone(), self.ttl, RData::PTR(PTR(target))))
            .collect();
        Some(Found {
            answers,
            ..Found::default()
        })
    }

    /// `None` when the registry does not know the name. Notes in `scope`
    /// the service the name belongs to.
    fn registry_records(
        &self,
        snapshot: &Snapshot,
        name: &LowerName,
        rtype: RecordType,
        scope: &mut Scope,
    ) -> Option<Found> {
        let relative = usize::from(name.num_labels() - self.lower_origin.num_labels());
        let labels: Vec<&str> = name
            .iter()
            .take(relative)
            .map(std::str::from_utf8)
            .collect::<Result<_, _>>()
            .ok()?;
        let owner = Name::from(name);
        let classified = classify(&labels);
        // Apex and other shapes are static data only: the scope stays
        // the zones'.
        let service_name = classified.service()?;
        let found = snapshot.service(service_name);
        *scope = Scope::Service(
            found.map_or_else(|| Arc::from(service_name), |s| s.shared_name()),
            found.map(|s| s.index()),
        );
        let service = found?;
        match classified {
            // These name no service: returned above.
            RegistryName::Apex | RegistryName::Other => None,
            RegistryName::Service(_) => Some(self.service_records(service, &owner, rtype, &[])),
            RegistryName::Tagged { tags, .. } => service.has_tagged(&tags).then(|| {
                if tags.is_empty() {
                    Found::default()
                } else {
                    self.service_records(service, &owner, rtype, &tags)
                }
            }),
            RegistryName::Port { port, protocol, .. } => {
                if !service.has_named_port(port, protocol) {
                    return None;
                }
                let endpoints = service.endpoints(PortSelector::Named(port, protocol), &[]);
                Some(match rtype {
                    RecordType::SRV | RecordType::ANY => self.srv(&owner, endpoints),
                    _ => Found::default(),
                })
            }
            RegistryName::ProtocolNode { protocol, .. } => {
                service.has_protocol(protocol).then(Found::default)
            }
            RegistryName::GrpcConfig(_) => self.grpc_config_records(service, &owner, rtype),
            RegistryName::Instance { instance, .. } => {
                let instance = service.instance(instance)?;
                Some(self.instance_records(service, instance, &owner, rtype))
            }
        }
    }

    fn service_records(
        &self,
        service: &Service,
        owner: &Name,
        rtype: RecordType,
        tags: &[&str],
    ) -> Found {
        let endpoints = service.endpoints(PortSelector::Default, tags);
        match rtype {
            RecordType::SRV => self.srv(owner, endpoints),
            RecordType::A | RecordType::AAAA | RecordType::ANY => {
                self.addresses(owner, rtype, endpoints.map(|e| e.instance.address))
            }
            _ => Found::default(),
        }
    }

    /// `grpc_config=<json>` as one TXT record, from the serving instance
    /// with the lowest id that carries a config; `None` when none does.
    fn grpc_config_records(
        &self,
        service: &Service,
        owner: &Name,
        rtype: RecordType,
    ) -> Option<Found> {
        let carried = service
            .instances()
            .iter()
            .filter(|i| i.grpc_config.is_some());
        let mut serving = carried.clone().filter(|i| service.serves(i)).peekable();
        if serving.peek().is_none() {
            return carried.clone().next().map(|_| Found::default());
        }
        let config = serving.next()?.grpc_config.as_ref()?;
        if !matches!(rtype, RecordType::TXT | RecordType::ANY) {
            return Some(Found::default());
        }
        let value = format!("grpc_config={config}");
        // A TXT string holds at most 255 bytes; gRPC joins the strings.
        let strings: Vec<String> = value
            .as_bytes()
            .chunks(255)
            .map(|c| String::from_utf8_lossy(c).into_owned())
            .collect();
        Some(Found {
            answers: vec![Record::from_rdata(
                owner.clone(),
                self.ttl,
                RData::TXT(TXT::new(strings)),
            )],
            ..Found::default()
        })
    }

    fn instance_records(
        &self,
        service: &Service,
        instance: &Instance,
        owner: &Name,
        rtype: RecordType,
    ) -> Found {
        let addresses = service.serves(instance).then_some(instance.address);
        self.addresses(owner, rtype, addresses.into_iter())
    }

    /// A and/or AAAA records (as `rtype` asks) for distinct addresses, in
    /// address order, all in one rotating level.
    fn addresses(
        &self,
        owner: &Name,
        rtype: RecordType,
        addresses: impl Iterator<Item = IpAddr>,
    ) -> Found {
        let mut wanted: Vec<IpAddr> = addresses
            .filter(|ip| match rtype {
                RecordType::A => ip.is_ipv4(),
                RecordType::AAAA => ip.is_ipv6(),
                RecordType::ANY => true,
                _ => false,
            })
            .collect();
        wanted.sort_unstable();
        wanted.dedup();
        Found {
            rotation: Rotation {
                levels: vec![wanted.len()],
                paired: false,
            },
            answers: wanted
                .into_iter()
                .map(|ip| address_record(owner.clone(), ip, self.ttl))
                .collect(),
            additionals: Vec::new(),
        }
    }

    /// SRV records for `endpoints` in ascending priority (one rotating
    /// level per priority), each with its target's address as the
    /// additional record paired with it.
    fn srv<'a>(&self, owner: &Name, endpoints: impl Iterator<Item = Endpoint<'a>>) -> Found {
        let mut endpoints: Vec<Endpoint<'a>> = endpoints.collect();
        endpoints.sort_by_key(|e| e.instance.priority);
        let mut found = Found::default();
        let mut priorities = Vec::with_capacity(endpoints.len());
        for endpoint in endpoints {
            let Some(target) = self.target(endpoint.instance) else {
                continue;
            };
            let instance = endpoint.instance;
            let srv = SRV::new(
                instance.priority,
                instance.weight,
                endpoint.port,
                target.clone(),
            );
            priorities.push(instance.priority);
            found
                .answers
                .push(Record::from_rdata(owner.clone(), self.ttl, RData::SRV(srv)));
            found
                .additionals
                .push(address_record(target, instance.address, self.ttl));
        }
        found.rotation = Rotation {
            levels: priorities
                .chunk_by(|a, b| a == b)
                .map(<[u16]>::len)
                .collect(),
            paired: true,
        };
        found
    }

    /// `<instance>.<service>.<zone>`, the SRV target of an instance.
    fn target(&self, instance: &Instance) -> Option<Name> {
        Name::from_labels([instance.id.as_bytes(), instance.service.as_bytes()])
            .and_then(|n| n.append_domain(&self.origin))
            .ok()
    }
}

enum ReverseName {
    Address(IpAddr),
    /// Fewer labels than an address: a node above registered addresses.
    Partial,
    Invalid,
}

/// The address a reverse name stands for (`4.3.2.1.in-addr.arpa.` is
/// 1.2.3.4; `ip6.arpa.` names have 32 nibbles, lowest first).
/// Reads one label of a reverse name.
type LabelParser = fn(&[u8]) -> Option<u8>;

fn reverse_address(ipv4: bool, labels: &[&[u8]]) -> ReverseName {
    let (full, parse): (usize, LabelParser) = if ipv4 {
        (4, |l| std::str::from_utf8(l).ok()?.parse().ok())
    } else {
        (32, |l| match l {
            [c] => (*c as char).to_digit(16).map(|d| d as u8),
            _ => None,
        })
    };
    let Some(parts) = labels
        .iter()
        .rev()
        .map(|l| parse(l))
        .collect::<Option<Vec<u8>>>()
    else {
        return ReverseName::Invalid;
    };
    match parts.len() {
        n if n < full => ReverseName::Partial,
        n if n > full => ReverseName::Invalid,
        _ if ipv4 => ReverseName::Address(IpAddr::from([parts[0], parts[1], parts[2], parts[3]])),
        _ => {
            let mut octets = [0u8; 16];
            for (i, pair) in parts.chunks(2).enumerate() {
                octets[i] = (pair[0] << 4) | pair[1];
            }
            ReverseName::Address(IpAddr::from(octets))
        }
    }
}

fn address_record(owner: Name, ip: IpAddr, ttl: u32) -> Record {
    let data = match ip {
        IpAddr::V4(v4) => RData::A(A(v4)),
        IpAddr::V6(v6) => RData::AAAA(AAAA(v6)),
    };
    Record::from_rdata(owner, ttl, data)
}

fn positive(zone: &StaticZone, found: Found) -> Answer {
    if found.answers.is_empty() {
        return negative(zone, ResponseCode::NoError);
    }
    Answer {
        rcode: ResponseCode::NoError,
        authoritative: true,
        answers: found.answers,
        authorities: Vec::new(),
        additionals: found.additionals,
        rotation: found.rotation,
    }
}

fn static_records(zone: &StaticZone, name: &LowerName, rtype: RecordType) -> Answer {
    match zone.lookup(name, rtype) {
        Lookup::Records(records) => Answer {
            rcode: ResponseCode::NoError,
            authoritative: true,
            additionals: glue(zone, &records),
            answers: records.into_iter().cloned().collect(),
            authorities: Vec::new(),
            rotation: Rotation::default(),
        },
        Lookup::NoData => negative(zone, ResponseCode::NoError),
        Lookup::NxDomain => negative(zone, ResponseCode::NXDomain),
    }
}

/// Addresses of in-zone NS targets, so a resolver need not ask again.
fn glue(zone: &StaticZone, records: &[&Record]) -> Vec<Record> {
    records
        .iter()
        .filter_map(|r| match &r.data {
            RData::NS(ns) => Some(LowerName::new(&ns.0)),
            _ => None,
        })
        .flat_map(|target| {
            [RecordType::A, RecordType::AAAA]
                .into_iter()
                .flat_map(move |t| match zone.lookup(&target, t) {
                    Lookup::Records(found) => found.into_iter().cloned().collect(),
                    _ => Vec::new(),
                })
        })
        .collect()
}

/// NXDOMAIN or NODATA, with the SOA in authority for negative caching:
/// its TTL is the lesser of its own and its MINIMUM (RFC 2308 §5).
fn negative(zone: &StaticZone, rcode: ResponseCode) -> Answer {
    let mut soa = zone.soa().clone();
    if let RData::SOA(data) = &soa.data {
        soa.ttl = soa.ttl.min(data.minimum);
    }
    Answer {
        rcode,
        authoritative: true,
        answers: Vec::new(),
        authorities: vec![soa],
        additionals: Vec::new(),
        rotation: Rotation::default(),
    }
}

#[cfg(test)]
mod tests {
    use super::Rotation;

    fn order(levels: &[usize], turn: usize, cap: usize) -> Vec<usize> {
        let rotation = Rotation {
            levels: levels.to_vec(),
            paired: false,
        };
        rotation.order(turn, cap).collect()
    }

    #[test]
    fn each_level_rotates_on_its_own_and_the_cap_keeps_the_first() {
        assert_eq!(order(&[2, 3], 0, 0), [0, 1, 2, 3, 4]);
        assert_eq!(order(&[2, 3], 1, 0), [1, 0, 3, 4, 2]);
        assert_eq!(order(&[2, 3], 2, 0), [0, 1, 4, 2, 3]);
        assert_eq!(order(&[2, 3], 1, 3), [1, 0, 3]);
        assert_eq!(order(&[], 5, 0), Vec::<usize>::new());
    }

    #[test]
    fn any_turn_is_a_valid_turn() {
        assert_eq!(order(&[3], usize::MAX, 0), [0, 1, 2]);
        assert_eq!(order(&[0, 2], usize::MAX, 0), [1, 0]);
    }
}
