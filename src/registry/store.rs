//! Durability: the [`Store`] seam the registry writes through before it
//! publishes anything, and its implementations.
//!
//! [`EmbeddedStore`] keeps the registry in one file, `registry.redb`,
//! under the data dir. It is built on redb, an embedded ACID key-value
//! store (copy-on-write B-trees, checksummed pages, fsync on commit, an
//! exclusive file lock): crash safety and locking come from a
//! well-tested engine instead of a home-made log format. One redb
//! transaction holds a whole batch of changes, so concurrent writers share
//! one fsync (group commit, driven by the registry's writer).
//!
//! Values are the instance JSON the API speaks plus its check generation;
//! loading re-validates every record with the same rules as a
//! registration, so a damaged record is reported, never served.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use serde_json::Value;

use super::validate::{ValidationError, instance_from_json};
use super::{Instance, InstanceKey};

/// Version of the stored layout; a file from a newer muster is refused.
pub const FORMAT_VERSION: u64 = 1;
/// The store's file name inside the data dir.
pub const FILE_NAME: &str = "registry.redb";

const INSTANCES: TableDefinition<&str, &[u8]> = TableDefinition::new("instances");
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
const META_FORMAT: &str = "format";
const META_VERSION: &str = "version";

/// One write of a batch.
#[derive(Debug, Clone)]
pub enum StoreOp {
    Put(Arc<Instance>),
    Delete(InstanceKey),
}

/// What a store holds at start-up.
#[derive(Debug, Default)]
pub struct Loaded {
    /// The registry version of the last commit.
    pub version: u64,
    pub instances: Vec<Instance>,
}

/// Why the store cannot be used. None of these is ever "fixed" by
/// starting empty: the operator decides.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{path}: locked by another muster (only one may use a data dir)", path = path.display())]
    Locked { path: PathBuf },
    #[error("{path}: the data file is damaged: {detail}", path = path.display())]
    Corrupt { path: PathBuf, detail: String },
    #[error("{path}: written by a newer muster (format {found}, this one reads up to {supported})", path = path.display())]
    NewerFormat {
        path: PathBuf,
        found: u64,
        supported: u64,
    },
    #[error("{path}: record {key:?} is invalid: {error}", path = path.display())]
    InvalidRecord {
        path: PathBuf,
        key: String,
        error: ValidationError,
    },
    #[error("{path}: {detail}", path = path.display())]
    Io { path: PathBuf, detail: String },
}

/// Where registry changes are made durable.
pub trait Store: Send + 'static {
    /// Everything stored, read once at start-up.
    fn load(&mut self) -> Result<Loaded, StoreError>;
    /// Makes `ops` durable (all or none) before returning; `version` is
    /// the registry version that includes them.
    fn commit(&mut self, version: u64, ops: &[StoreOp]) -> Result<(), StoreError>;
    /// Whether `commit` waits on the disk, so it must run off the async
    /// threads.
    fn blocks(&self) -> bool {
        true
    }
}

/// Keeps nothing: a restart forgets every instance. For tests and for
/// measuring what durability costs.
#[derive(Debug, Default)]
pub struct MemoryStore;

impl Store for MemoryStore {
    fn load(&mut self) -> Result<Loaded, StoreError> {
        Ok(Loaded::default())
    }

    fn commit(&mut self, _version: u64, _ops: &[StoreOp]) -> Result<(), StoreError> {
        Ok(())
    }

    fn blocks(&self) -> bool {
        false
    }
}

/// The registry in `<data_dir>/registry.redb`.
pub struct EmbeddedStore {
    db: Database,
    path: PathBuf,
}

impl EmbeddedStore {
    /// Opens (or creates) the store in `data_dir`, taking its lock.
    pub fn open(data_dir: &Path) -> Result<Self, StoreError> {
        let path = data_dir.join(FILE_NAME);
        std::fs::create_dir_all(data_dir).map_err(|e| StoreError::Io {
            path: data_dir.to_path_buf(),
            detail: format!("cannot create the data dir: {e}"),
        })?;
        let db = Database::create(&path).map_err(|e| open_error(&path, e))?;
        let store = Self { db, path };
        store.check_format()?;
        Ok(store)
    }

    /// Stamps a new file with the format; refuses one from a newer muster.
    fn check_format(&self) -> Result<(), StoreError> {
        let write = self.db.begin_write().map_err(|e| self.error(e))?;
        {
            let mut meta = write.open_table(META).map_err(|e| self.error(e))?;
            let found = meta
                .get(META_FORMAT)
                .map_err(|e| self.error(e))?
                .map(|v| v.value());
            match found {
                Some(found) if found > FORMAT_VERSION => {
                    return Err(StoreError::NewerFormat {
                        path: self.path.clone(),
                        found,
                        supported: FORMAT_VERSION,
                    });
                }
                Some(_) => {}
                None => {
                    meta.insert(META_FORMAT, FORMAT_VERSION)
                        .map_err(|e| self.error(e))?;
                }
            }
            write.open_table(INSTANCES).map_err(|e| self.error(e))?;
        }
        write.commit().map_err(|e| self.error(e))
    }

    fn error(&self, error: impl Into<redb::Error>) -> StoreError {
        classify(&self.path, error.into())
    }
}

impl Store for EmbeddedStore {
    fn load(&mut self) -> Result<Loaded, StoreError> {
        let read = self.db.begin_read().map_err(|e| self.error(e))?;
        let meta = read.open_table(META).map_err(|e| self.error(e))?;
        let version = meta
            .get(META_VERSION)
            .map_err(|e| self.error(e))?
            .map_or(0, |v| v.value());
        let table = read.open_table(INSTANCES).map_err(|e| self.error(e))?;
        let mut instances = Vec::new();
        for entry in table.iter().map_err(|e| self.error(e))? {
            let (key, value) = entry.map_err(|e| self.error(e))?;
            let instance = decode(value.value()).map_err(|error| StoreError::InvalidRecord {
                path: self.path.clone(),
                key: key.value().to_string(),
                error,
            })?;
            instances.push(instance);
        }
        Ok(Loaded { version, instances })
    }

    fn commit(&mut self, version: u64, ops: &[StoreOp]) -> Result<(), StoreError> {
        let write = self.db.begin_write().map_err(|e| self.error(e))?;
        {
            let mut table = write.open_table(INSTANCES).map_err(|e| self.error(e))?;
            for op in ops {
                match op {
                    StoreOp::Put(instance) => {
                        let key = record_key(&instance.service, &instance.id);
                        table
                            .insert(key.as_str(), encode(instance).as_slice())
                            .map_err(|e| self.error(e))?;
                    }
                    StoreOp::Delete(key) => {
                        table
                            .remove(record_key(&key.service, &key.id).as_str())
                            .map_err(|e| self.error(e))?;
                    }
                }
            }
            let mut meta = write.open_table(META).map_err(|e| self.error(e))?;
            meta.insert(META_VERSION, version)
                .map_err(|e| self.error(e))?;
        }
        write.commit().map_err(|e| self.error(e))
    }
}

fn record_key(service: &str, id: &str) -> String {
    format!("{service}/{id}")
}

fn open_error(path: &Path, error: redb::DatabaseError) -> StoreError {
    classify(path, error.into())
}

fn classify(path: &Path, error: redb::Error) -> StoreError {
    let path = path.to_path_buf();
    match error {
        redb::Error::DatabaseAlreadyOpen => StoreError::Locked { path },
        redb::Error::Corrupted(detail) => StoreError::Corrupt { path, detail },
        redb::Error::UpgradeRequired(found) => StoreError::NewerFormat {
            path,
            found: u64::from(found),
            supported: FORMAT_VERSION,
        },
        redb::Error::Io(io) if io.kind() == std::io::ErrorKind::InvalidData => {
            StoreError::Corrupt {
                path,
                detail: io.to_string(),
            }
        }
        other => StoreError::Io {
            path,
            detail: other.to_string(),
        },
    }
}

/// The stored form: the API's instance JSON and the check generation.
pub fn encode(instance: &Instance) -> Vec<u8> {
    let record = serde_json::json!({
        "generation": instance.generation,
        "instance": instance,
    });
    serde_json::to_vec(&record).unwrap_or_default()
}

/// Reads a stored record back, validating it like a registration.
pub fn decode(bytes: &[u8]) -> Result<Instance, ValidationError> {
    let mut record: Value = serde_json::from_slice(bytes)
        .map_err(|e| ValidationError::new("", format!("not JSON: {e}")))?;
    let generation = record
        .get("generation")
        .and_then(Value::as_u64)
        .ok_or_else(|| ValidationError::new("generation", "missing"))?;
    let instance = record
        .get_mut("instance")
        .map(Value::take)
        .ok_or_else(|| ValidationError::new("instance", "missing"))?;
    let mut instance = instance_from_json(instance)?;
    instance.generation = generation;
    Ok(instance)
}

/// Why an export file cannot be imported; nothing is imported then.
#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    #[error("not a JSON array of instances: {0}")]
    Json(#[from] serde_json::Error),
    #[error("instance [{index}]: {error}")]
    Invalid {
        index: usize,
        error: ValidationError,
    },
    #[error("instance [{index}]: {service}/{id} appears twice")]
    Duplicate {
        index: usize,
        service: String,
        id: String,
    },
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Everything in `store` as the JSON array `muster export` writes: the
/// instances as the API returns them, sorted by service and id.
pub fn export(store: &mut dyn Store) -> Result<Value, StoreError> {
    let mut instances = store.load()?.instances;
    instances.sort_by(|a, b| (&a.service, &a.id).cmp(&(&b.service, &b.id)));
    Ok(serde_json::json!(instances))
}

/// Validates every instance of an export before anything is written.
pub fn parse_export(text: &str) -> Result<Vec<Instance>, ImportError> {
    let values: Vec<Value> = serde_json::from_str(text)?;
    let mut seen = std::collections::HashSet::new();
    let mut instances = Vec::with_capacity(values.len());
    for (index, value) in values.into_iter().enumerate() {
        let instance =
            instance_from_json(value).map_err(|error| ImportError::Invalid { index, error })?;
        if !seen.insert((instance.service.clone(), instance.id.clone())) {
            return Err(ImportError::Duplicate {
                index,
                service: instance.service,
                id: instance.id,
            });
        }
        instances.push(instance);
    }
    Ok(instances)
}

/// Adds (or replaces) `instances` in `store` in one commit, keeping their
/// health and maintenance. Returns how many were written.
pub fn import(store: &mut dyn Store, instances: Vec<Instance>) -> Result<usize, StoreError> {
    let version = store.load()?.version + 1;
    let count = instances.len();
    let ops: Vec<StoreOp> = instances
        .into_iter()
        .map(|mut instance| {
            instance.generation = version;
            StoreOp::Put(Arc::new(instance))
        })
        .collect();
    store.commit(version, &ops)?;
    Ok(count)
}
