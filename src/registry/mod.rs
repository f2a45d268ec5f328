//! The registry: the single source of truth for which instances exist.
//!
//! Owns the model, validation, and the one mutation path,
//! [`Registry::apply`], which turns a [`Change`] into a new immutable
//! [`Snapshot`] published atomically through `arc-swap`. Readers never
//! lock: they load the current snapshot. This module must never do I/O on
//! behalf of a reader, and nothing outside it mutates registry state.

pub mod health;
mod model;
mod snapshot;
pub mod validate;

use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use arc_swap::ArcSwap;
use tokio::sync::{mpsc, watch};

pub use model::{
    CheckKind, CheckSpec, Health, HealthStatus, Instance, MAX_OUTPUT, Maintenance, NamedPort,
    Protocol,
};
pub use snapshot::{Endpoint, PortSelector, Service, Snapshot};
pub use validate::{CheckInput, InstanceSpec, ValidationError};

/// A write to the registry, already validated.
#[derive(Debug, Clone)]
pub enum Change {
    /// Add or replace an instance. Health, maintenance and the check's
    /// generation carry over when the check itself is unchanged.
    Register(Box<Instance>),
    /// Remove an instance.
    Deregister { service: String, id: String },
    /// Record a health transition for the registration `generation`.
    SetHealth {
        service: String,
        id: String,
        generation: u64,
        health: Health,
    },
    /// Drain the instance (`Some`) or put it back (`None`).
    SetMaintenance {
        service: String,
        id: String,
        maintenance: Option<Maintenance>,
    },
    /// Remove an instance that is still critical in registration
    /// `generation` (`deregister_after`).
    Reap {
        service: String,
        id: String,
        generation: u64,
    },
}

/// Identifies one instance.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct InstanceKey {
    pub service: String,
    pub id: String,
}

impl InstanceKey {
    fn of(instance: &Instance) -> Self {
        Self {
            service: instance.service.clone(),
            id: instance.id.clone(),
        }
    }
}

/// What the health checker must know about registry changes.
#[derive(Debug, Clone, PartialEq)]
pub enum CheckEvent {
    /// Check `key` with `spec` from now on, starting at `status`.
    Watch {
        key: InstanceKey,
        spec: CheckSpec,
        generation: u64,
        status: HealthStatus,
    },
    /// Stop checking `key`.
    Unwatch { key: InstanceKey },
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
    #[error("instance {id:?} of service {service:?} was registered again since")]
    Stale { service: String, id: String },
}

/// State only writers touch, under the writer lock.
#[derive(Default)]
struct Writer {
    /// Where check events go once a health checker has attached.
    checks: Option<mpsc::UnboundedSender<CheckEvent>>,
}

/// The live registry.
pub struct Registry {
    /// Serialises writers; readers never take it.
    writer: Mutex<Writer>,
    current: ArcSwap<Snapshot>,
    /// Carries the latest version to anyone waiting for a change.
    versions: watch::Sender<u64>,
}

impl Default for Registry {
    fn default() -> Self {
        Self::new(false)
    }
}

impl Registry {
    /// An empty registry; with `only_passing`, instances in warning do not
    /// serve (`dns.only_passing`).
    pub fn new(only_passing: bool) -> Self {
        Self {
            writer: Mutex::new(Writer::default()),
            current: ArcSwap::from_pointee(Snapshot::empty(only_passing)),
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

    /// Connects the health checker: every instance with a check as a
    /// `Watch` event, and the channel that carries later events. Taken
    /// under the writer lock, so no change falls between the two.
    pub fn attach_checker(&self) -> (Vec<CheckEvent>, mpsc::UnboundedReceiver<CheckEvent>) {
        let mut writer = self.lock();
        let (sender, receiver) = mpsc::unbounded_channel();
        writer.checks = Some(sender);
        let snapshot = self.current.load();
        let watched = snapshot
            .services()
            .flat_map(|s| s.instances().iter())
            .filter_map(|i| watch_event(i))
            .collect();
        (watched, receiver)
    }

    /// The only way registry state changes.
    pub fn apply(&self, change: Change) -> Result<Applied, RegistryError> {
        let mut writer = self.lock();
        let current = self.current.load_full();
        match change {
            Change::Register(instance) => Ok(self.register(&mut writer, &current, *instance)),
            Change::Deregister { service, id } => {
                let removed = self.remove(&mut writer, &current, &service, &id)?;
                Ok(removed)
            }
            Change::SetHealth {
                service,
                id,
                generation,
                health,
            } => {
                let existing = current_generation(&current, &service, &id, generation)?;
                if existing.health.status == health.status {
                    return Ok(self.unchanged(&current, existing));
                }
                let mut updated = Instance::clone(existing);
                updated.health = health;
                Ok(self.replace(&current, updated))
            }
            Change::SetMaintenance {
                service,
                id,
                maintenance,
            } => {
                let existing = found(&current, &service, &id)?;
                if existing.maintenance.is_some() == maintenance.is_some()
                    && existing.maintenance.as_ref().map(|m| &m.reason)
                        == maintenance.as_ref().map(|m| &m.reason)
                {
                    return Ok(self.unchanged(&current, existing));
                }
                let mut updated = Instance::clone(existing);
                updated.maintenance = maintenance;
                Ok(self.replace(&current, updated))
            }
            Change::Reap {
                service,
                id,
                generation,
            } => {
                let existing = current_generation(&current, &service, &id, generation)?;
                if existing.health.status != HealthStatus::Critical {
                    return Err(RegistryError::Stale { service, id });
                }
                self.remove(&mut writer, &current, &service, &id)
            }
        }
    }

    fn lock(&self) -> MutexGuard<'_, Writer> {
        self.writer.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn register(&self, writer: &mut Writer, current: &Snapshot, mut instance: Instance) -> Applied {
        let existing = current.instance(&instance.service, &instance.id);
        let same_check = existing.is_some_and(|e| e.check == instance.check);
        match existing {
            Some(existing) if same_check => {
                instance.health = existing.health.clone();
                instance.generation = existing.generation;
            }
            _ => instance.generation = current.version() + 1,
        }
        if let Some(existing) = existing {
            instance.maintenance = existing.maintenance.clone();
            if **existing == instance {
                return self.unchanged(current, existing);
            }
        }
        let event = if same_check {
            None
        } else {
            watch_event(&instance).or_else(|| {
                existing
                    .filter(|e| e.check.is_some())
                    .map(|e| CheckEvent::Unwatch {
                        key: InstanceKey::of(e),
                    })
            })
        };
        let applied = self.replace(current, instance);
        if let Some(event) = event {
            notify(writer, event);
        }
        applied
    }

    fn remove(
        &self,
        writer: &mut Writer,
        current: &Snapshot,
        service: &str,
        id: &str,
    ) -> Result<Applied, RegistryError> {
        let (next, removed) = current.without_instance(service, id).ok_or_else(|| {
            RegistryError::InstanceNotFound {
                service: service.into(),
                id: id.into(),
            }
        })?;
        if removed.check.is_some() {
            notify(
                writer,
                CheckEvent::Unwatch {
                    key: InstanceKey::of(&removed),
                },
            );
        }
        Ok(self.publish(next, removed))
    }

    fn replace(&self, current: &Snapshot, instance: Instance) -> Applied {
        let instance = Arc::new(instance);
        self.publish(current.with_instance(instance.clone()), instance)
    }

    fn unchanged(&self, current: &Snapshot, instance: &Arc<Instance>) -> Applied {
        Applied {
            instance: instance.clone(),
            version: current.version(),
        }
    }

    fn publish(&self, next: Snapshot, instance: Arc<Instance>) -> Applied {
        let version = next.version();
        self.current.store(Arc::new(next));
        self.versions.send_replace(version);
        Applied { instance, version }
    }
}

fn found<'a>(
    snapshot: &'a Snapshot,
    service: &str,
    id: &str,
) -> Result<&'a Arc<Instance>, RegistryError> {
    snapshot
        .instance(service, id)
        .ok_or_else(|| RegistryError::InstanceNotFound {
            service: service.into(),
            id: id.into(),
        })
}

fn current_generation<'a>(
    snapshot: &'a Snapshot,
    service: &str,
    id: &str,
    generation: u64,
) -> Result<&'a Arc<Instance>, RegistryError> {
    let existing = found(snapshot, service, id)?;
    if existing.generation != generation {
        return Err(RegistryError::Stale {
            service: service.into(),
            id: id.into(),
        });
    }
    Ok(existing)
}

fn watch_event(instance: &Instance) -> Option<CheckEvent> {
    instance.check.as_ref().map(|spec| CheckEvent::Watch {
        key: InstanceKey::of(instance),
        spec: spec.clone(),
        generation: instance.generation,
        status: instance.health.status,
    })
}

fn notify(writer: &mut Writer, event: CheckEvent) {
    let delivered = writer
        .checks
        .as_ref()
        .is_some_and(|c| c.send(event).is_ok());
    if !delivered {
        // No checker (or it stopped): events would only pile up.
        writer.checks = None;
    }
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
        let registry = Registry::default();
        let before = registry.snapshot();
        registry
            .apply(Change::Register(Box::new(instance("web", "a", "10.0.0.1"))))
            .unwrap();
        let after = registry.snapshot();
        assert_eq!(before.version() + 1, after.version());
        assert_eq!(before.instance_count(), 0, "old snapshots never change");
        assert_eq!(after.instance_count(), 1);
        assert_eq!(after.service("web").unwrap().index(), after.version());
    }

    #[test]
    fn identical_reregistration_is_a_no_op() {
        let registry = Registry::default();
        let change = Change::Register(Box::new(instance("web", "a", "10.0.0.1")));
        registry.apply(change.clone()).unwrap();
        let version = registry.snapshot().version();
        registry.apply(change).unwrap();
        assert_eq!(registry.snapshot().version(), version);
        registry
            .apply(Change::Register(Box::new(instance("web", "a", "10.0.0.2"))))
            .unwrap();
        assert_eq!(registry.snapshot().version(), version + 1);
        assert_eq!(registry.snapshot().instance_count(), 1);
    }

    #[test]
    fn deregistering_the_last_instance_removes_the_service() {
        let registry = Registry::default();
        registry
            .apply(Change::Register(Box::new(instance("web", "a", "10.0.0.1"))))
            .unwrap();
        registry
            .apply(Change::Register(Box::new(instance("web", "b", "10.0.0.2"))))
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
        let registry = Registry::default();
        registry
            .apply(Change::Register(Box::new(instance("db", "a", "10.0.0.9"))))
            .unwrap();
        let before = registry.snapshot();
        registry
            .apply(Change::Register(Box::new(instance("web", "a", "10.0.0.1"))))
            .unwrap();
        let after = registry.snapshot();
        assert!(Arc::ptr_eq(
            before.service("db").unwrap(),
            after.service("db").unwrap()
        ));
    }

    #[test]
    fn endpoints_filter_by_tag_and_named_port() {
        let registry = Registry::default();
        let spec: InstanceSpec = serde_json::from_value(serde_json::json!({
            "address": "10.0.0.1", "port": 80, "tags": ["v2"], "ports": {"grpc": 9090}
        }))
        .unwrap();
        registry
            .apply(Change::Register(Box::new(
                spec.into_instance("web", "a").unwrap(),
            )))
            .unwrap();
        registry
            .apply(Change::Register(Box::new(instance("web", "b", "10.0.0.2"))))
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
