//! Static zones: every `*.zone` file (RFC 1035 master format) in the zones
//! folder, parsed once at start-up into immutable lookup tables. A zone
//! file that does not parse stops start-up with the file and line.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};

use hickory_proto::rr::{LowerName, Name, RData, Record, RecordType, rdata::NS, rdata::SOA};
use hickory_proto::serialize::txt::Parser;

/// Why the zones could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ZoneError {
    #[error("{file}: cannot read: {source}")]
    Read {
        file: PathBuf,
        source: std::io::Error,
    },
    #[error("{file}{line}: {message}", file = file.display(), line = line.map(|l| format!(":{l}")).unwrap_or_default())]
    Parse {
        file: PathBuf,
        line: Option<usize>,
        message: String,
    },
    #[error("{file}: {message}", file = file.display())]
    Invalid { file: PathBuf, message: String },
}

/// One authoritative zone of static records.
#[derive(Debug, Clone)]
pub struct StaticZone {
    origin: LowerName,
    soa: Record,
    /// Records by owner name.
    records: HashMap<LowerName, Vec<Record>>,
    /// Every owner name and every name between it and the origin, so empty
    /// non-terminals answer NODATA rather than NXDOMAIN.
    names: HashSet<LowerName>,
}

/// What a static zone holds for a name and type.
#[derive(Debug, PartialEq)]
pub enum Lookup<'a> {
    Records(Vec<&'a Record>),
    /// The name exists, but not with that type.
    NoData,
    NxDomain,
}

impl StaticZone {
    /// Builds a zone from records; exactly one SOA, at the origin, and every
    /// record inside the zone.
    pub fn new(origin: Name, records: Vec<Record>) -> Result<Self, String> {
        let origin = LowerName::new(&origin);
        let mut soa = None;
        let mut by_name: HashMap<LowerName, Vec<Record>> = HashMap::new();
        for record in records {
            let owner = LowerName::new(&record.name);
            if !origin.zone_of(&owner) {
                return Err(format!("{} is outside the zone {origin}", record.name));
            }
            if record.record_type() == RecordType::SOA {
                if owner != origin || soa.is_some() {
                    return Err("a zone has exactly one SOA record, at its origin".into());
                }
                soa = Some(record.clone());
            }
            by_name.entry(owner).or_default().push(record);
        }
        let soa = soa.ok_or_else(|| format!("no SOA record for {origin}"))?;
        let names = with_ancestors(&origin, by_name.keys());
        Ok(Self {
            origin,
            soa,
            records: by_name,
            names,
        })
    }

    /// The zone a muster with no zone file serves for the registry zone:
    /// an SOA and one NS, `ns.<zone>`.
    pub fn synthesized(origin: &Name, negative_ttl: u32) -> Self {
        let ns = Name::from_ascii("ns").and_then(|ns| ns.append_domain(origin));
        let mbox = Name::from_ascii("hostmaster").and_then(|m| m.append_domain(origin));
        let (ns, mbox) = match (ns, mbox) {
            (Ok(ns), Ok(mbox)) => (ns, mbox),
            _ => (origin.clone(), origin.clone()),
        };
        let soa = SOA::new(ns.clone(), mbox, 1, 3600, 600, 86400, negative_ttl);
        let records = vec![
            Record::from_rdata(origin.clone(), 3600, RData::SOA(soa)),
            Record::from_rdata(origin.clone(), 3600, RData::NS(NS(ns))),
        ];
        Self::new(origin.clone(), records).expect("a synthesized zone is valid")
    }

    pub fn origin(&self) -> &LowerName {
        &self.origin
    }

    pub fn soa(&self) -> &Record {
        &self.soa
    }

    /// Replaces the SOA MINIMUM (the negative-caching TTL, RFC 2308).
    pub fn set_negative_ttl(&mut self, negative_ttl: u32) {
        if let RData::SOA(soa) = &mut self.soa.data {
            soa.minimum = negative_ttl;
        }
        let soa = self.soa.clone();
        if let Some(apex) = self.records.get_mut(&self.origin) {
            for record in apex
                .iter_mut()
                .filter(|r| r.record_type() == RecordType::SOA)
            {
                *record = soa.clone();
            }
        }
    }

    /// The records of `name` with type `rtype`; a CNAME answers every type
    /// but CNAME's own.
    pub fn lookup(&self, name: &LowerName, rtype: RecordType) -> Lookup<'_> {
        let Some(records) = self.records.get(name) else {
            return if self.names.contains(name) {
                Lookup::NoData
            } else {
                Lookup::NxDomain
            };
        };
        let matching: Vec<&Record> = records
            .iter()
            .filter(|r| r.record_type() == rtype || rtype == RecordType::ANY)
            .collect();
        if !matching.is_empty() {
            return Lookup::Records(matching);
        }
        let cname: Vec<&Record> = records
            .iter()
            .filter(|r| r.record_type() == RecordType::CNAME)
            .collect();
        if cname.is_empty() {
            Lookup::NoData
        } else {
            Lookup::Records(cname)
        }
    }

    /// The whole zone as a transfer carries it: the SOA, every other
    /// record, and the SOA again (RFC 5936).
    pub fn transfer(&self) -> Vec<Record> {
        let mut records = vec![self.soa.clone()];
        let mut names: Vec<&LowerName> = self.records.keys().collect();
        names.sort();
        for name in names {
            records.extend(
                self.records[name]
                    .iter()
                    .filter(|r| r.record_type() != RecordType::SOA)
                    .cloned(),
            );
        }
        records.push(self.soa.clone());
        records
    }

    /// Whether `name` exists in this zone (with records or as a non-terminal).
    pub fn contains(&self, name: &LowerName) -> bool {
        self.names.contains(name)
    }
}

fn with_ancestors<'a>(
    origin: &LowerName,
    owners: impl Iterator<Item = &'a LowerName>,
) -> HashSet<LowerName> {
    let mut names = HashSet::new();
    for owner in owners {
        let mut name = owner.clone();
        while names.insert(name.clone()) && name != *origin && !name.is_root() {
            name = name.base_name();
        }
    }
    names.insert(origin.clone());
    names
}

/// All static zones, most specific origin first.
#[derive(Debug, Clone, Default)]
pub struct ZoneSet {
    zones: Vec<StaticZone>,
}

impl ZoneSet {
    pub fn new(mut zones: Vec<StaticZone>) -> Self {
        zones.sort_by_key(|z| std::cmp::Reverse(z.origin.num_labels()));
        Self { zones }
    }

    /// The most specific zone that `name` is in.
    pub fn find(&self, name: &LowerName) -> Option<&StaticZone> {
        self.zones.iter().find(|z| z.origin.zone_of(name))
    }

    pub fn get(&self, origin: &LowerName) -> Option<&StaticZone> {
        self.zones.iter().find(|z| z.origin == *origin)
    }

    pub fn get_mut(&mut self, origin: &LowerName) -> Option<&mut StaticZone> {
        self.zones.iter_mut().find(|z| z.origin == *origin)
    }

    pub fn insert(&mut self, zone: StaticZone) {
        self.zones.retain(|z| z.origin != zone.origin);
        self.zones.push(zone);
        self.zones
            .sort_by_key(|z| std::cmp::Reverse(z.origin.num_labels()));
    }
}

/// Loads every `*.zone` file in `dir`; the origin defaults to the file
/// name without `.zone` (`svc.internal.zone` → `svc.internal.`), and a
/// `$ORIGIN` line in the file overrides it. A missing folder is no zones.
pub fn load_dir(dir: &Path) -> Result<ZoneSet, ZoneError> {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(ZoneSet::default()),
        Err(source) => {
            return Err(ZoneError::Read {
                file: dir.to_path_buf(),
                source,
            });
        }
    };
    let mut files: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "zone"))
        .collect();
    files.sort();
    let mut zones = Vec::new();
    for file in files {
        let zone = load_file(&file)?;
        if zones.iter().any(|z: &StaticZone| z.origin == zone.origin) {
            return Err(ZoneError::Invalid {
                file,
                message: format!("a second file for zone {}", zone.origin),
            });
        }
        zones.push(zone);
    }
    Ok(ZoneSet::new(zones))
}

/// Loads one zone file.
pub fn load_file(file: &Path) -> Result<StaticZone, ZoneError> {
    let text = std::fs::read_to_string(file).map_err(|source| ZoneError::Read {
        file: file.to_path_buf(),
        source,
    })?;
    let stem = file
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    parse(&text, file, &stem)
}

/// Parses zone `text`; `file` labels errors and `default_origin` is used
/// until a `$ORIGIN` line says otherwise.
pub fn parse(text: &str, file: &Path, default_origin: &str) -> Result<StaticZone, ZoneError> {
    let origin = Name::from_ascii(format!("{}.", default_origin.trim_end_matches('.'))).ok();
    let (origin, sets) = Parser::new(text, Some(file.to_path_buf()), origin.clone())
        .parse()
        .map_err(|e| ZoneError::Parse {
            file: file.to_path_buf(),
            line: failing_line(text, file, origin.as_ref(), &e.to_string()),
            message: e.to_string(),
        })?;
    let records = sets
        .into_values()
        .flat_map(|set| set.records_without_rrsigs().cloned().collect::<Vec<_>>())
        .collect();
    StaticZone::new(origin, records).map_err(|message| ZoneError::Invalid {
        file: file.to_path_buf(),
        message,
    })
}

/// The parser reports no positions, so find the first line at which a
/// prefix of the file fails with the same error as the whole file.
fn failing_line(text: &str, file: &Path, origin: Option<&Name>, error: &str) -> Option<usize> {
    let line_ends = text
        .match_indices('\n')
        .map(|(i, _)| i + 1)
        .chain(std::iter::once(text.len()));
    for (line, end) in line_ends.enumerate() {
        let prefix = &text[..end];
        if let Err(e) = Parser::new(prefix, Some(file.to_path_buf()), origin.cloned()).parse()
            && e.to_string() == error
        {
            return Some(line + 1);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    const ZONE: &str = "\
$TTL 300
@       IN SOA ns.example.internal. hostmaster.example.internal. 1 3600 600 86400 30
@       IN NS  ns
ns      IN A   127.0.0.1
www     IN CNAME web.deep.example.internal.
web.deep IN A  10.0.0.5
";

    fn zone() -> StaticZone {
        parse(ZONE, Path::new("example.internal.zone"), "example.internal").unwrap()
    }

    fn name(text: &str) -> LowerName {
        LowerName::new(&Name::from_ascii(text).unwrap())
    }

    #[test]
    fn records_nodata_and_nxdomain() {
        let zone = zone();
        assert!(matches!(
            zone.lookup(&name("ns.example.internal."), RecordType::A),
            Lookup::Records(r) if r.len() == 1
        ));
        assert_eq!(
            zone.lookup(&name("ns.example.internal."), RecordType::AAAA),
            Lookup::NoData
        );
        assert_eq!(
            zone.lookup(&name("deep.example.internal."), RecordType::A),
            Lookup::NoData,
            "an empty non-terminal exists"
        );
        assert_eq!(
            zone.lookup(&name("nope.example.internal."), RecordType::A),
            Lookup::NxDomain
        );
        assert!(matches!(
            zone.lookup(&name("www.example.internal."), RecordType::A),
            Lookup::Records(r) if r[0].record_type() == RecordType::CNAME
        ));
    }

    #[test]
    fn negative_ttl_replaces_the_soa_minimum() {
        let mut zone = zone();
        zone.set_negative_ttl(7);
        let RData::SOA(soa) = &zone.soa().data else {
            panic!("not an SOA")
        };
        assert_eq!(soa.minimum, 7);
    }

    #[test]
    fn a_bad_line_is_reported_with_its_number() {
        let bad = ZONE.replace("ns      IN A   127.0.0.1", "ns      IN A   not-an-ip");
        let error = parse(&bad, Path::new("bad.zone"), "example.internal").unwrap_err();
        assert!(
            matches!(error, ZoneError::Parse { line: Some(4), .. }),
            "{error}"
        );
        assert!(error.to_string().starts_with("bad.zone:4: "), "{error}");
    }

    #[test]
    fn a_zone_needs_an_soa_and_records_inside_it() {
        let no_soa = "ns 300 IN A 127.0.0.1\n";
        assert!(matches!(
            parse(no_soa, Path::new("x.zone"), "example.internal"),
            Err(ZoneError::Invalid { .. })
        ));
        let outside = format!("{ZONE}other.test. IN A 10.0.0.1\n");
        assert!(matches!(
            parse(&outside, Path::new("x.zone"), "example.internal"),
            Err(ZoneError::Invalid { .. })
        ));
    }

    #[test]
    fn the_most_specific_zone_wins() {
        let set = ZoneSet::new(vec![
            StaticZone::synthesized(&Name::from_ascii("internal.").unwrap(), 5),
            zone(),
        ]);
        assert_eq!(
            set.find(&name("a.example.internal.")).unwrap().origin(),
            &name("example.internal.")
        );
        assert_eq!(
            set.find(&name("other.internal.")).unwrap().origin(),
            &name("internal.")
        );
        assert!(set.find(&name("example.com.")).is_none());
    }
}
