//! Immutable views of the registry. A [`Snapshot`] is what every reader
//! (DNS, the API, later the gateway) works from; it is never mutated, only
//! replaced. Services sit in a persistent hash map so publishing a change
//! to one service copies that service, not the registry.

use std::net::IpAddr;
use std::sync::Arc;

use super::model::{Instance, Protocol};

/// Which port of an instance an endpoint uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PortSelector<'a> {
    /// The instance's default `port` (answers for `<service>.Z` SRV).
    Default,
    /// A named port with its protocol (`_<name>._<proto>.<service>.Z`).
    Named(&'a str, Protocol),
}

/// An instance with the port a client should use for it.
#[derive(Debug, Clone, Copy)]
pub struct Endpoint<'a> {
    pub instance: &'a Instance,
    pub port: u16,
}

/// One service and its instances, sorted by id.
#[derive(Debug, Clone)]
pub struct Service {
    name: Arc<str>,
    /// Registry version at which this service last changed.
    index: u64,
    instances: Vec<Arc<Instance>>,
    /// Whether only passing instances serve (`dns.only_passing`); warning
    /// ones serve too when false.
    only_passing: bool,
}

impl Service {
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The name, shared rather than copied.
    pub fn shared_name(&self) -> Arc<str> {
        self.name.clone()
    }

    pub fn index(&self) -> u64 {
        self.index
    }

    pub fn instances(&self) -> &[Arc<Instance>] {
        &self.instances
    }

    pub fn instance(&self, id: &str) -> Option<&Arc<Instance>> {
        self.position(id).ok().map(|i| &self.instances[i])
    }

    /// Whether DNS and the gateway hand out `instance` (healthy enough and
    /// not in maintenance).
    pub fn serves(&self, instance: &Instance) -> bool {
        instance.is_serving(self.only_passing)
    }

    pub fn serving_count(&self) -> usize {
        self.instances.iter().filter(|i| self.serves(i)).count()
    }

    /// The serving instances carrying all of `tags`, with the port chosen by
    /// `port`. This is the one function behind SRV answers, A/AAAA answers
    /// and the gateway's backends, so they can never disagree.
    pub fn endpoints<'a>(
        &'a self,
        port: PortSelector<'a>,
        tags: &'a [&'a str],
    ) -> impl Iterator<Item = Endpoint<'a>> + 'a {
        self.instances
            .iter()
            .filter(move |i| self.serves(i) && i.has_tags(tags))
            .filter_map(move |i| {
                let port = match port {
                    PortSelector::Default => Some(i.port),
                    PortSelector::Named(name, protocol) => i.named_port(name, protocol),
                };
                port.map(|port| Endpoint { instance: i, port })
            })
    }

    /// Whether any instance has a named port over `protocol`, so that
    /// `_<protocol>.<service>.Z` exists as an empty non-terminal.
    pub fn has_protocol(&self, protocol: Protocol) -> bool {
        self.instances
            .iter()
            .any(|i| i.ports.values().any(|p| p.protocol == protocol))
    }

    /// Whether any instance has a named port `name` over `protocol`, so that
    /// `_<name>._<protocol>.<service>.Z` exists (even with no serving instance).
    pub fn has_named_port(&self, name: &str, protocol: Protocol) -> bool {
        self.instances
            .iter()
            .any(|i| i.named_port(name, protocol).is_some())
    }

    /// Whether any instance carries all of `tags` (empty: any tag at all),
    /// so that the tag names exist.
    pub fn has_tagged(&self, tags: &[&str]) -> bool {
        self.instances
            .iter()
            .any(|i| !i.tags.is_empty() && i.has_tags(tags))
    }

    fn position(&self, id: &str) -> Result<usize, usize> {
        self.instances.binary_search_by(|i| i.id.as_str().cmp(id))
    }

    fn with(&self, instance: Arc<Instance>, index: u64) -> Self {
        let mut instances = self.instances.clone();
        match self.position(&instance.id) {
            Ok(at) => instances[at] = instance,
            Err(at) => instances.insert(at, instance),
        }
        Self {
            name: self.name.clone(),
            index,
            instances,
            only_passing: self.only_passing,
        }
    }

    fn without(&self, at: usize, index: u64) -> Self {
        let mut instances = self.instances.clone();
        instances.remove(at);
        Self {
            name: self.name.clone(),
            index,
            instances,
            only_passing: self.only_passing,
        }
    }
}

/// Versions the change journal reaches back.
const JOURNAL_VERSIONS: usize = 512;

/// A service name's journal key. Two names may share one (that only makes
/// a cached answer check the snapshot itself).
pub fn journal_key(service: &str) -> u64 {
    use std::hash::BuildHasher;
    foldhash::fast::FixedState::with_seed(0x6d75_7374_6572).hash_one(service)
}

/// The whole registry at one version.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    version: u64,
    /// The journal key of the service each of the latest versions changed,
    /// oldest first, the last for `version`.
    journal: Arc<[u64]>,
    services: imbl::HashMap<Arc<str>, Arc<Service>>,
    /// Every instance by address, for reverse (PTR) lookups. Shared
    /// slices: a change copies the map's path, and with it every entry on
    /// the path's nodes, so entries must be cheap to clone.
    by_address: imbl::HashMap<IpAddr, Arc<[Arc<Instance>]>>,
    instance_count: usize,
    only_passing: bool,
}

impl Snapshot {
    /// A snapshot at `version` holding `instances` (as loaded from a
    /// store), built in one pass rather than one change at a time.
    pub(super) fn from_instances(
        version: u64,
        only_passing: bool,
        instances: Vec<Instance>,
    ) -> Self {
        let mut by_service: std::collections::HashMap<String, Vec<Arc<Instance>>> =
            std::collections::HashMap::new();
        let mut addresses: std::collections::HashMap<IpAddr, Vec<Arc<Instance>>> =
            std::collections::HashMap::new();
        let instance_count = instances.len();
        for instance in instances {
            let instance = Arc::new(instance);
            addresses
                .entry(instance.address)
                .or_default()
                .push(instance.clone());
            by_service
                .entry(instance.service.clone())
                .or_default()
                .push(instance);
        }
        let services = by_service
            .into_iter()
            .map(|(name, mut instances)| {
                instances.sort_by(|a, b| a.id.cmp(&b.id));
                let name: Arc<str> = name.into();
                let service = Service {
                    name: name.clone(),
                    index: version,
                    instances,
                    only_passing,
                };
                (name, Arc::new(service))
            })
            .collect();
        Self {
            version,
            journal: Arc::new([]),
            services,
            by_address: addresses
                .into_iter()
                .map(|(address, list)| (address, list.into()))
                .collect(),
            instance_count,
            only_passing,
        }
    }

    /// The instances registered at `address`.
    pub fn instances_at(&self, address: &IpAddr) -> &[Arc<Instance>] {
        self.by_address.get(address).map_or(&[], |list| list)
    }

    /// Whether DNS and the gateway hand out `instance`.
    pub fn serves(&self, instance: &Instance) -> bool {
        instance.is_serving(self.only_passing)
    }

    fn index_address(&mut self, instance: &Arc<Instance>) {
        let listed = self.instances_at(&instance.address);
        let list = listed.iter().chain([instance]).cloned().collect();
        self.by_address.insert(instance.address, list);
    }

    fn unindex_address(&mut self, instance: &Instance) {
        let address = instance.address;
        let others: Arc<[Arc<Instance>]> = self
            .instances_at(&address)
            .iter()
            .filter(|i| !(i.service == instance.service && i.id == instance.id))
            .cloned()
            .collect();
        if others.is_empty() {
            self.by_address.remove(&address);
        } else {
            self.by_address.insert(address, others);
        }
    }

    /// The instance `service/id`, if registered.
    pub fn instance(&self, service: &str, id: &str) -> Option<&Arc<Instance>> {
        self.service(service)?.instance(id)
    }

    /// Monotonic version, bumped by every change that was applied.
    pub fn version(&self) -> u64 {
        self.version
    }

    /// Whether the service with journal key `key` is unchanged from
    /// version `since` to this one; `None` when the journal does not reach
    /// back that far and only the service itself can tell.
    pub fn unchanged_since(&self, key: u64, since: u64) -> Option<bool> {
        let newer = usize::try_from(self.version.checked_sub(since)?).ok()?;
        let changes = self.journal.get(self.journal.len().checked_sub(newer)?..)?;
        Some(!changes.contains(&key))
    }

    /// Moves to the next version: `service` changed.
    fn advance(&mut self, service: &str) {
        self.version += 1;
        let kept = &self.journal[self.journal.len().saturating_sub(JOURNAL_VERSIONS - 1)..];
        // Collected straight into the shared slice: one allocation, one copy.
        self.journal = kept.iter().copied().chain([journal_key(service)]).collect();
    }

    pub fn service(&self, name: &str) -> Option<&Arc<Service>> {
        self.services.get(name)
    }

    pub fn services(&self) -> impl Iterator<Item = &Arc<Service>> {
        self.services.values()
    }

    pub fn service_count(&self) -> usize {
        self.services.len()
    }

    pub fn instance_count(&self) -> usize {
        self.instance_count
    }

    /// Adds or replaces `instance`, as the next version. In place: the
    /// persistent maps copy only the nodes this snapshot shares with
    /// another (the published one), so a writer batch copies each path
    /// once rather than once per change.
    pub(super) fn put_instance(&mut self, instance: Arc<Instance>) {
        self.advance(&instance.service);
        let version = self.version;
        if let Some(old) = self.instance(&instance.service, &instance.id).cloned() {
            self.unindex_address(&old);
        }
        self.index_address(&instance);
        let service = match self.services.get(instance.service.as_str()) {
            Some(existing) => {
                if existing.instance(&instance.id).is_none() {
                    self.instance_count += 1;
                }
                existing.with(instance, version)
            }
            None => {
                self.instance_count += 1;
                Service {
                    name: instance.service.as_str().into(),
                    index: version,
                    instances: vec![instance],
                    only_passing: self.only_passing,
                }
            }
        };
        self.services
            .insert(service.name.clone(), Arc::new(service));
    }

    /// Removes `service/id`, as the next version, in place like
    /// [`Self::put_instance`]; the removed instance, or `None` (and no new
    /// version) if it is not there.
    pub(super) fn remove_instance(&mut self, service: &str, id: &str) -> Option<Arc<Instance>> {
        let existing = self.services.get(service)?;
        let at = existing.position(id).ok()?;
        let removed = existing.instances[at].clone();
        let remaining =
            (existing.instances.len() > 1).then(|| existing.without(at, self.version + 1));
        self.advance(service);
        self.instance_count -= 1;
        self.unindex_address(&removed);
        match remaining {
            Some(remaining) => {
                self.services
                    .insert(remaining.name.clone(), Arc::new(remaining));
            }
            None => {
                self.services.remove(service);
            }
        }
        Some(removed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::InstanceSpec;

    fn instance(service: &str, id: &str) -> Arc<Instance> {
        let spec: InstanceSpec =
            serde_json::from_value(serde_json::json!({"address": "10.0.0.1", "port": 80})).unwrap();
        Arc::new(spec.into_instance(service, id).unwrap())
    }

    #[test]
    fn the_journal_tells_which_services_changed_since_a_version() {
        let mut snapshot = Snapshot::default();
        snapshot.put_instance(instance("a", "1"));
        let v1 = snapshot.version();
        snapshot.put_instance(instance("b", "1"));
        snapshot.put_instance(instance("b", "2"));
        let v3 = snapshot.version();
        let (a, b) = (journal_key("a"), journal_key("b"));
        assert_eq!(snapshot.unchanged_since(a, v1), Some(true));
        assert_eq!(snapshot.unchanged_since(b, v1), Some(false));
        assert_eq!(snapshot.unchanged_since(b, v3), Some(true));
        assert!(snapshot.remove_instance("a", "1").is_some());
        assert_eq!(snapshot.unchanged_since(a, v1), Some(false));
        assert_eq!(snapshot.unchanged_since(b, v3), Some(true));
        assert_eq!(snapshot.unchanged_since(a, snapshot.version() + 1), None);
        assert!(snapshot.remove_instance("a", "1").is_none());
        assert_eq!(
            snapshot.version(),
            v3 + 1,
            "no version for a missing instance"
        );
    }

    #[test]
    fn changes_in_place_leave_a_shared_copy_as_it_was() {
        let mut published = Snapshot::default();
        published.put_instance(instance("a", "1"));
        let mut next = published.clone();
        next.put_instance(instance("a", "2"));
        next.put_instance(instance("b", "1"));
        assert!(next.remove_instance("a", "1").is_some());
        assert_eq!(published.instance_count(), 1);
        assert!(published.instance("a", "1").is_some());
        assert!(published.service("b").is_none());
        assert_eq!(next.instance_count(), 2);
        assert!(next.instance("a", "1").is_none());
        assert_eq!(next.instances_at(&"10.0.0.1".parse().unwrap()).len(), 2);
        assert_eq!(
            published.instances_at(&"10.0.0.1".parse().unwrap()).len(),
            1
        );
    }

    #[test]
    fn the_journal_reaches_back_a_bounded_number_of_versions() {
        let mut snapshot = Snapshot::default();
        snapshot.put_instance(instance("a", "1"));
        let first = snapshot.version();
        for n in 0..JOURNAL_VERSIONS {
            snapshot.put_instance(instance("b", &n.to_string()));
        }
        assert_eq!(
            snapshot.unchanged_since(journal_key("a"), first),
            Some(true)
        );
        assert_eq!(snapshot.unchanged_since(journal_key("a"), first - 1), None);
        let recent = snapshot.version() - 10;
        assert_eq!(
            snapshot.unchanged_since(journal_key("a"), recent),
            Some(true)
        );
        assert_eq!(snapshot.journal.len(), JOURNAL_VERSIONS);
    }
}
