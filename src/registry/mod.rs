//! The registry: the single source of truth for which instances exist.
//!
//! Owns the model, validation, and the one mutation path,
//! [`Registry::apply`], which turns a [`Change`] into a new immutable
//! [`Snapshot`] published atomically through `arc-swap`. Readers never
//! lock: they load the current snapshot. This module must never do I/O on
//! behalf of a reader, and nothing outside it mutates registry state.

mod model;
mod snapshot;
pub mod validate;

use std::sync::{Arc, Mutex, PoisonError};

use arc_swap::ArcSwap;
use tokio::sync::watch;

pub use model::{Health, HealthStatus, Instance, NamedPort, Protocol};
pub use snapshot::{Endpoint, PortSelector, Service, Snapshot};
pub use validate::{InstanceSpec, ValidationError};

/// A write to the registry, already validated.
#[derive(Debug, Clone)]
pub enum Change {
    /// Add or replace an instance.
    Register(Instance),
    /// Remove an instance.
    Deregister { service: String, id: String },
}

/// What a change did: the instance as stored (or as it was when removed)
/// and the registry version that includes the change.
#[derive(Debug, Clone)]
pub struct Applied {
    pub instance: Arc<Instance>,
    pub version: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("instance {id:?} of service {service:?} is not registered")]
    InstanceNotFound { service: String, id: String },
}

/// The live registry.
pub struct Registry {
    /// Serialises writers; readers never take it.
    writer: Mutex<()>,
    current: ArcSwap<Snapshot>,
    /// Carries the latest version to anyone waiting for a change.
    versions: watch::Sender<u64>,
}

impl Default for Registry {
    fn default() -> Self {
        Self::new()
    }
}

impl Registry {
    pub fn new() -> Self {
        Self {
            writer: Mutex::new(()),
            current: ArcSwap::from_pointee(Snapshot::default()),
            versions: watch::Sender::new(0),
        }
    }

    /// The current snapshot, kept alive as long as the caller holds it.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.current.load_full()
    }

    /// A cheap borrow of the current snapshot for short, non-async reads.
    pub fn load(&self) -> arc_swap::Guard<Arc<Snapshot>> {
        self.current.load()
    }

    /// A receiver that sees the version of every published snapshot.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.versions.subscribe()
    }

    /// The only way registry state changes.
    pub fn apply(&self, change: Change) -> Result<Applied, RegistryError> {
        let _writer = self.writer.lock().unwrap_or_else(PoisonError::into_inner);
        let current = self.current.load_full();
        match change {
            Change::Register(instance) => Ok(self.register(&current, instance)),
            Change::Deregister { service, id } => {
                let (next, removed) = current
                    .without_instance(&service, &id)
                    .ok_or(RegistryError::InstanceNotFound { service, id })?;
                Ok(self.publish(next, removed))
            }
        }
    }

    fn register(&self, current: &Snapshot, instance: Instance) -> Applied {
        let existing = current
            .service(&instance.service)
            .and_then(|s| s.instance(&instance.id));
        if let Some(existing) = existing.filter(|e| same_registration(e, &instance)) {
            return Applied {
                instance: existing.clone(),
                version: current.version(),
            };
        }
        let instance = Arc::new(instance);
        self.publish(current.with_instance(instance.clone()), instance)
    }

    fn publish(&self, next: Snapshot, instance: Arc<Instance>) -> Applied {
        let version = next.version();
        self.current.store(Arc::new(next));
        self.versions.send_replace(version);
        Applied { instance, version }
    }
}

/// Whether re-registering `new` over `old` would change nothing but the
/// time stamp, so an idempotent PUT does not wake watchers.
fn same_registration(old: &Instance, new: &Instance) -> bool {
    let mut new_with_old_health = new.clone();
    new_with_old_health.health = old.health.clone();
    *old == new_with_old_health
}

#[cfg(test)]
mod tests {
    use super::*;

    fn instance(service: &str, id: &str, address: &str) -> Instance {
        let spec: InstanceSpec =
            serde_json::from_value(serde_json::json!({"address": address, "port": 80})).unwrap();
        spec.into_instance(service, id).unwrap()
    }

    #[test]
    fn register_publishes_a_new_version() {
        let registry = Registry::new();
        let before = registry.snapshot();
        registry
            .apply(Change::Register(instance("web", "a", "10.0.0.1")))
            .unwrap();
        let after = registry.snapshot();
        assert_eq!(before.version() + 1, after.version());
        assert_eq!(before.instance_count(), 0, "old snapshots never change");
        assert_eq!(after.instance_count(), 1);
        assert_eq!(after.service("web").unwrap().index(), after.version());
    }

    #[test]
    fn identical_reregistration_is_a_no_op() {
        let registry = Registry::new();
        let change = Change::Register(instance("web", "a", "10.0.0.1"));
        registry.apply(change.clone()).unwrap();
        let version = registry.snapshot().version();
        registry.apply(change).unwrap();
        assert_eq!(registry.snapshot().version(), version);
        registry
            .apply(Change::Register(instance("web", "a", "10.0.0.2")))
            .unwrap();
        assert_eq!(registry.snapshot().version(), version + 1);
        assert_eq!(registry.snapshot().instance_count(), 1);
    }

    #[test]
    fn deregistering_the_last_instance_removes_the_service() {
        let registry = Registry::new();
        registry
            .apply(Change::Register(instance("web", "a", "10.0.0.1")))
            .unwrap();
        registry
            .apply(Change::Register(instance("web", "b", "10.0.0.2")))
            .unwrap();
        let deregister = |id: &str| Change::Deregister {
            service: "web".into(),
            id: id.into(),
        };
        registry.apply(deregister("a")).unwrap();
        assert_eq!(
            registry
                .snapshot()
                .service("web")
                .unwrap()
                .instances()
                .len(),
            1
        );
        registry.apply(deregister("b")).unwrap();
        assert!(registry.snapshot().service("web").is_none());
        assert!(matches!(
            registry.apply(deregister("b")),
            Err(RegistryError::InstanceNotFound { .. })
        ));
        assert_eq!(registry.snapshot().instance_count(), 0);
    }

    #[test]
    fn other_services_are_shared_between_snapshots() {
        let registry = Registry::new();
        registry
            .apply(Change::Register(instance("db", "a", "10.0.0.9")))
            .unwrap();
        let before = registry.snapshot();
        registry
            .apply(Change::Register(instance("web", "a", "10.0.0.1")))
            .unwrap();
        let after = registry.snapshot();
        assert!(Arc::ptr_eq(
            before.service("db").unwrap(),
            after.service("db").unwrap()
        ));
    }

    #[test]
    fn endpoints_filter_by_tag_and_named_port() {
        let registry = Registry::new();
        let spec: InstanceSpec = serde_json::from_value(serde_json::json!({
            "address": "10.0.0.1", "port": 80, "tags": ["v2"], "ports": {"grpc": 9090}
        }))
        .unwrap();
        registry
            .apply(Change::Register(spec.into_instance("web", "a").unwrap()))
            .unwrap();
        registry
            .apply(Change::Register(instance("web", "b", "10.0.0.2")))
            .unwrap();
        let snapshot = registry.snapshot();
        let web = snapshot.service("web").unwrap();
        assert_eq!(web.endpoints(PortSelector::Default, &[]).count(), 2);
        assert_eq!(web.endpoints(PortSelector::Default, &["v2"]).count(), 1);
        let grpc: Vec<_> = web
            .endpoints(PortSelector::Named("grpc", Protocol::Tcp), &[])
            .map(|e| (e.instance.id.clone(), e.port))
            .collect();
        assert_eq!(grpc, vec![("a".to_string(), 9090)]);
        assert!(web.has_protocol(Protocol::Tcp));
        assert!(!web.has_protocol(Protocol::Udp));
        assert!(web.has_tagged(&[]));
        assert!(!web.has_tagged(&["v3"]));
    }
}
