//! The registry: the single source of truth for which instances exist.
//!
//! Owns the model, validation, health checking, durability, and the one
//! mutation path, [`Registry::apply`]. Every change goes to one writer
//! task, which applies a batch of queued changes to the next snapshot,
//! makes the batch durable in the [`Store`] with one commit (write-ahead,
//! group commit), and only then publishes the snapshot through `arc-swap`
//! and answers the writers. Readers never lock: they load the current
//! snapshot. Nothing outside this module mutates registry state.

pub mod health;
mod model;
mod snapshot;
pub mod store;
pub mod validate;

use std::sync::{Arc, Mutex, PoisonError};

use arc_swap::ArcSwap;
use tokio::sync::{mpsc, oneshot, watch};
use tracing::error;

pub use model::{
    CheckKind, CheckSpec, Health, HealthStatus, Instance, MAX_OUTPUT, Maintenance, NamedPort,
    Protocol,
};
pub use snapshot::{Endpoint, PortSelector, Service, Snapshot, journal_key};
pub use store::{EmbeddedStore, MemoryStore, Store, StoreError, StoreOp};
pub use validate::{CheckInput, InstanceSpec, ValidationError};

/// Changes waiting for the writer; a full queue makes writers wait.
const QUEUE: usize = 4096;
/// Most changes made durable in one commit.
const MAX_BATCH: usize = 1024;

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
    #[error("the change could not be stored; nothing was changed")]
    Storage,
    #[error("the registry is shutting down")]
    Closed,
}

/// The result a writer waits for.
pub type Pending = oneshot::Receiver<Result<Applied, RegistryError>>;
/// Where the writer sends that result.
type Reply = oneshot::Sender<Result<Applied, RegistryError>>;

/// What readers share with the writer task.
struct Shared {
    current: ArcSwap<Snapshot>,
    /// Carries the latest version to anyone waiting for a change.
    versions: watch::Sender<u64>,
}

enum Request {
    Change {
        change: Change,
        reply: Reply,
    },
    AttachChecker {
        reply: oneshot::Sender<(Vec<CheckEvent>, mpsc::UnboundedReceiver<CheckEvent>)>,
    },
}

/// The live registry.
pub struct Registry {
    shared: Arc<Shared>,
    requests: mpsc::Sender<Request>,
}

impl Default for Registry {
    fn default() -> Self {
        Self::in_memory(false)
    }
}

impl Registry {
    /// Loads everything `store` holds, then starts the writer task (so it
    /// needs a Tokio runtime). With `only_passing`, instances in warning do
    /// not serve.
    pub fn open(mut store: Box<dyn Store>, only_passing: bool) -> Result<Self, StoreError> {
        let loaded = store.load()?;
        let snapshot = Arc::new(Snapshot::from_instances(
            loaded.version,
            only_passing,
            loaded.instances,
        ));
        let shared = Arc::new(Shared {
            current: ArcSwap::new(snapshot.clone()),
            versions: watch::Sender::new(snapshot.version()),
        });
        let (requests, queue) = mpsc::channel(QUEUE);
        let writer = Writer {
            shared: shared.clone(),
            store: Arc::new(Mutex::new(store)),
            published: snapshot,
            checks: None,
        };
        tokio::spawn(writer.run(queue));
        Ok(Self { shared, requests })
    }

    /// An empty registry that keeps nothing across restarts.
    pub fn in_memory(only_passing: bool) -> Self {
        Self::open(Box::new(MemoryStore), only_passing).expect("a memory store always opens")
    }

    /// The current snapshot, kept alive as long as the caller holds it.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.shared.current.load_full()
    }

    /// A cheap borrow of the current snapshot for short, non-async reads.
    pub fn load(&self) -> arc_swap::Guard<Arc<Snapshot>> {
        self.shared.current.load()
    }

    /// A receiver that sees the version of every published snapshot.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.shared.versions.subscribe()
    }

    /// The only way registry state changes: returns once the change is
    /// durable and published, or refused.
    pub async fn apply(&self, change: Change) -> Result<Applied, RegistryError> {
        self.submit(change)
            .await?
            .await
            .unwrap_or(Err(RegistryError::Closed))
    }

    /// Queues `change` without waiting for it to be applied; the receiver
    /// says how it went.
    pub async fn submit(&self, change: Change) -> Result<Pending, RegistryError> {
        let (reply, pending) = oneshot::channel();
        self.requests
            .send(Request::Change { change, reply })
            .await
            .map_err(|_| RegistryError::Closed)?;
        Ok(pending)
    }

    /// Connects the health checker: every instance with a check as a
    /// `Watch` event, and the channel that carries later events. The
    /// writer answers between batches, so no change falls between the two.
    pub async fn attach_checker(&self) -> (Vec<CheckEvent>, mpsc::UnboundedReceiver<CheckEvent>) {
        let (reply, answer) = oneshot::channel();
        let sent = self.requests.send(Request::AttachChecker { reply }).await;
        match (sent, answer.await) {
            (Ok(()), Ok(attached)) => attached,
            _ => (Vec::new(), mpsc::unbounded_channel().1),
        }
    }
}

/// The writer task's state.
struct Writer {
    shared: Arc<Shared>,
    /// Shared with the blocking thread a commit runs on.
    store: Arc<Mutex<Box<dyn Store>>>,
    /// The last snapshot published.
    published: Arc<Snapshot>,
    /// Where check events go once a health checker has attached.
    checks: Option<mpsc::UnboundedSender<CheckEvent>>,
}

/// The effects of one batch, kept until it is durable.
#[derive(Default)]
struct Batch {
    ops: Vec<StoreOp>,
    events: Vec<CheckEvent>,
    replies: Vec<(Reply, Result<Applied, RegistryError>)>,
}

impl Writer {
    /// Takes whatever queued while the last commit ran as the next batch.
    async fn run(mut self, mut queue: mpsc::Receiver<Request>) {
        while let Some(first) = queue.recv().await {
            let mut requests = vec![first];
            while requests.len() < MAX_BATCH {
                match queue.try_recv() {
                    Ok(request) => requests.push(request),
                    Err(_) => break,
                }
            }
            self.process(requests).await;
        }
    }

    /// Runs the store's commit, off the async threads if it blocks.
    async fn commit(&self, version: u64, ops: Vec<StoreOp>) -> Result<(), StoreError> {
        let store = self.store.clone();
        let commit = move || {
            let mut store = store.lock().unwrap_or_else(PoisonError::into_inner);
            store.commit(version, &ops)
        };
        let blocks = self
            .store
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .blocks();
        if !blocks {
            return commit();
        }
        tokio::task::spawn_blocking(commit)
            .await
            .unwrap_or_else(|e| {
                Err(StoreError::Io {
                    path: "registry store".into(),
                    detail: format!("commit failed: {e}"),
                })
            })
    }

    async fn process(&mut self, requests: Vec<Request>) {
        let mut next = Snapshot::clone(&self.published);
        let mut batch = Batch::default();
        for request in requests {
            match request {
                Request::AttachChecker { reply } => self.attach(&next, reply),
                Request::Change { change, reply } => {
                    let result = apply_change(&mut next, change, &mut batch);
                    batch.replies.push((reply, result));
                }
            }
        }
        let ops = std::mem::take(&mut batch.ops);
        if !ops.is_empty()
            && let Err(e) = self.commit(next.version(), ops).await
        {
            error!(error = %e, changes = batch.replies.len(), "registry changes not stored; none applied");
            for (reply, result) in batch.replies {
                let _ = reply.send(result.and(Err(RegistryError::Storage)));
            }
            return;
        }
        if next.version() != self.published.version() {
            self.publish(next);
        }
        for event in batch.events {
            self.notify(event);
        }
        for (reply, result) in batch.replies {
            let _ = reply.send(result);
        }
    }

    /// The checker sees the state as of this point in the batch; changes
    /// later in it reach the checker as events.
    fn attach(
        &mut self,
        state: &Snapshot,
        reply: oneshot::Sender<(Vec<CheckEvent>, mpsc::UnboundedReceiver<CheckEvent>)>,
    ) {
        let (sender, receiver) = mpsc::unbounded_channel();
        self.checks = Some(sender);
        let watched = state
            .services()
            .flat_map(|s| s.instances().iter())
            .filter_map(|i| watch_event(i))
            .collect();
        let _ = reply.send((watched, receiver));
    }

    fn publish(&mut self, next: Snapshot) {
        let next = Arc::new(next);
        self.shared.current.store(next.clone());
        self.shared.versions.send_replace(next.version());
        self.published = next;
    }

    fn notify(&mut self, event: CheckEvent) {
        let delivered = self.checks.as_ref().is_some_and(|c| c.send(event).is_ok());
        if !delivered {
            // No checker (or it stopped): events would only pile up.
            self.checks = None;
        }
    }
}

/// Applies one change to `next`, recording what must be stored and told.
fn apply_change(
    next: &mut Snapshot,
    change: Change,
    batch: &mut Batch,
) -> Result<Applied, RegistryError> {
    match change {
        Change::Register(instance) => Ok(register(next, *instance, batch)),
        Change::Deregister { service, id } => remove(next, &service, &id, batch),
        Change::SetHealth {
            service,
            id,
            generation,
            health,
        } => {
            let existing = current_generation(next, &service, &id, generation)?;
            if existing.health.status == health.status {
                return Ok(unchanged(next, &existing));
            }
            let mut updated = Instance::clone(&existing);
            updated.health = health;
            Ok(replace(next, updated, batch))
        }
        Change::SetMaintenance {
            service,
            id,
            maintenance,
        } => {
            let existing = found(next, &service, &id)?;
            let same = existing.maintenance.as_ref().map(|m| &m.reason)
                == maintenance.as_ref().map(|m| &m.reason);
            if same {
                return Ok(unchanged(next, &existing));
            }
            let mut updated = Instance::clone(&existing);
            updated.maintenance = maintenance.map(Box::new);
            Ok(replace(next, updated, batch))
        }
        Change::Reap {
            service,
            id,
            generation,
        } => {
            let existing = current_generation(next, &service, &id, generation)?;
            if existing.health.status != HealthStatus::Critical {
                return Err(RegistryError::Stale { service, id });
            }
            remove(next, &service, &id, batch)
        }
    }
}

fn register(next: &mut Snapshot, mut instance: Instance, batch: &mut Batch) -> Applied {
    let existing = next.instance(&instance.service, &instance.id).cloned();
    let same_check = existing.as_ref().is_some_and(|e| e.check == instance.check);
    match &existing {
        Some(existing) if same_check => {
            instance.health = existing.health.clone();
            instance.generation = existing.generation;
        }
        _ => instance.generation = next.version() + 1,
    }
    if let Some(existing) = &existing {
        instance.maintenance = existing.maintenance.clone();
        if **existing == instance {
            return unchanged(next, existing);
        }
    }
    if !same_check {
        let event = watch_event(&instance).or_else(|| {
            existing
                .as_ref()
                .filter(|e| e.check.is_some())
                .map(|e| CheckEvent::Unwatch {
                    key: InstanceKey::of(e),
                })
        });
        batch.events.extend(event);
    }
    replace(next, instance, batch)
}

fn remove(
    next: &mut Snapshot,
    service: &str,
    id: &str,
    batch: &mut Batch,
) -> Result<Applied, RegistryError> {
    let removed =
        next.remove_instance(service, id)
            .ok_or_else(|| RegistryError::InstanceNotFound {
                service: service.into(),
                id: id.into(),
            })?;
    let key = InstanceKey::of(&removed);
    if removed.check.is_some() {
        batch.events.push(CheckEvent::Unwatch { key: key.clone() });
    }
    batch.ops.push(StoreOp::Delete(key));
    Ok(Applied {
        instance: removed,
        version: next.version(),
    })
}

fn replace(next: &mut Snapshot, instance: Instance, batch: &mut Batch) -> Applied {
    let instance = Arc::new(instance);
    next.put_instance(instance.clone());
    batch.ops.push(StoreOp::Put(instance.clone()));
    Applied {
        instance,
        version: next.version(),
    }
}

fn unchanged(next: &Snapshot, instance: &Arc<Instance>) -> Applied {
    Applied {
        instance: instance.clone(),
        version: next.version(),
    }
}

fn found(snapshot: &Snapshot, service: &str, id: &str) -> Result<Arc<Instance>, RegistryError> {
    snapshot
        .instance(service, id)
        .cloned()
        .ok_or_else(|| RegistryError::InstanceNotFound {
            service: service.into(),
            id: id.into(),
        })
}

fn current_generation(
    snapshot: &Snapshot,
    service: &str,
    id: &str,
    generation: u64,
) -> Result<Arc<Instance>, RegistryError> {
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
        spec: CheckSpec::clone(spec),
        generation: instance.generation,
        status: instance.health.status,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn instance(service: &str, id: &str, address: &str) -> Instance {
        let spec: InstanceSpec =
            serde_json::from_value(serde_json::json!({"address": address, "port": 80})).unwrap();
        spec.into_instance(service, id).unwrap()
    }

    #[tokio::test]
    async fn register_publishes_a_new_version() {
        let registry = Registry::default();
        let before = registry.snapshot();
        registry
            .apply(Change::Register(Box::new(instance("web", "a", "10.0.0.1"))))
            .await
            .unwrap();
        let after = registry.snapshot();
        assert_eq!(before.version() + 1, after.version());
        assert_eq!(before.instance_count(), 0, "old snapshots never change");
        assert_eq!(after.instance_count(), 1);
        assert_eq!(after.service("web").unwrap().index(), after.version());
    }

    #[tokio::test]
    async fn identical_reregistration_is_a_no_op() {
        let registry = Registry::default();
        let change = Change::Register(Box::new(instance("web", "a", "10.0.0.1")));
        registry.apply(change.clone()).await.unwrap();
        let version = registry.snapshot().version();
        registry.apply(change).await.unwrap();
        assert_eq!(registry.snapshot().version(), version);
        registry
            .apply(Change::Register(Box::new(instance("web", "a", "10.0.0.2"))))
            .await
            .unwrap();
        assert_eq!(registry.snapshot().version(), version + 1);
        assert_eq!(registry.snapshot().instance_count(), 1);
    }

    #[tokio::test]
    async fn deregistering_the_last_instance_removes_the_service() {
        let registry = Registry::default();
        registry
            .apply(Change::Register(Box::new(instance("web", "a", "10.0.0.1"))))
            .await
            .unwrap();
        registry
            .apply(Change::Register(Box::new(instance("web", "b", "10.0.0.2"))))
            .await
            .unwrap();
        let deregister = |id: &str| Change::Deregister {
            service: "web".into(),
            id: id.into(),
        };
        registry.apply(deregister("a")).await.unwrap();
        assert_eq!(
            registry
                .snapshot()
                .service("web")
                .unwrap()
                .instances()
                .len(),
            1
        );
        registry.apply(deregister("b")).await.unwrap();
        assert!(registry.snapshot().service("web").is_none());
        assert!(matches!(
            registry.apply(deregister("b")).await,
            Err(RegistryError::InstanceNotFound { .. })
        ));
        assert_eq!(registry.snapshot().instance_count(), 0);
    }

    #[tokio::test]
    async fn other_services_are_shared_between_snapshots() {
        let registry = Registry::default();
        registry
            .apply(Change::Register(Box::new(instance("db", "a", "10.0.0.9"))))
            .await
            .unwrap();
        let before = registry.snapshot();
        registry
            .apply(Change::Register(Box::new(instance("web", "a", "10.0.0.1"))))
            .await
            .unwrap();
        let after = registry.snapshot();
        assert!(Arc::ptr_eq(
            before.service("db").unwrap(),
            after.service("db").unwrap()
        ));
    }

    #[tokio::test]
    async fn endpoints_filter_by_tag_and_named_port() {
        let registry = Registry::default();
        let spec: InstanceSpec = serde_json::from_value(serde_json::json!({
            "address": "10.0.0.1", "port": 80, "tags": ["v2"], "ports": {"grpc": 9090}
        }))
        .unwrap();
        let tagged = spec.into_instance("web", "a").unwrap();
        registry
            .apply(Change::Register(Box::new(tagged)))
            .await
            .unwrap();
        registry
            .apply(Change::Register(Box::new(instance("web", "b", "10.0.0.2"))))
            .await
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
