//! Health checking: TTL heartbeats, HTTP and TCP probes, flap damping and
//! `deregister_after`, run by one background task.
//!
//! The checker owns all check state (counters, deadlines, timers) and
//! never sits on a read path: it learns of checks from the registry's
//! [`CheckEvent`]s, probes in tasks bounded by a semaphore, and writes
//! back only through `Registry::apply` when a status flips. A result
//! carries the registration's generation, so a late result never touches
//! an instance that was registered again since.

use std::cmp::Reverse;
use std::collections::hash_map::RandomState;
use std::collections::{BinaryHeap, HashMap};
use std::hash::BuildHasher;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpStream;
use tokio::sync::{Semaphore, mpsc, oneshot};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info};

use super::{
    Change, CheckEvent, CheckKind, CheckSpec, Health, HealthStatus, InstanceKey, Pending, Registry,
};

/// Probes in flight at once, whatever the number of checks.
const MAX_CONCURRENT_PROBES: usize = 256;
/// The first probe of a new check waits a random part of this (or of the
/// interval, if shorter), so thousands of checks registered together or
/// reloaded at start-up do not fire together.
const FIRST_PROBE_SPREAD: Duration = Duration::from_secs(1);
/// Bytes of a health endpoint's body read, so the connection can be reused.
const MAX_PROBE_BODY: usize = 4096;

/// Why a heartbeat was not accepted.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum HeartbeatError {
    #[error("instance has no ttl check")]
    NotTtlChecked,
    #[error("the health checker is not running")]
    Stopped,
}

/// The way into the checker for heartbeats.
#[derive(Clone)]
pub struct HealthHandle {
    inputs: mpsc::UnboundedSender<Input>,
}

impl HealthHandle {
    /// Records a heartbeat for a TTL-checked instance: its TTL starts
    /// again, and `status` counts as a check result. Returns the status
    /// the instance has afterwards.
    pub async fn heartbeat(
        &self,
        key: InstanceKey,
        status: HealthStatus,
        output: String,
    ) -> Result<HealthStatus, HeartbeatError> {
        let (reply, answer) = oneshot::channel();
        self.inputs
            .send(Input::Heartbeat {
                key,
                status,
                output,
                reply,
            })
            .map_err(|_| HeartbeatError::Stopped)?;
        let (status, pending) = answer.await.map_err(|_| HeartbeatError::Stopped)??;
        // A flip is answered once it is published, so DNS agrees with the reply.
        if let Some(pending) = pending {
            let _ = pending.await;
        }
        Ok(status)
    }
}

/// Starts the checker; it runs until `shutdown`.
pub fn spawn(
    registry: Arc<Registry>,
    shutdown: CancellationToken,
) -> (HealthHandle, tokio::task::JoinHandle<()>) {
    let (inputs, receiver) = mpsc::unbounded_channel();
    let checker = Checker {
        registry,
        entries: HashMap::new(),
        timers: BinaryHeap::new(),
        probes: JoinSet::new(),
        limit: Arc::new(Semaphore::new(MAX_CONCURRENT_PROBES)),
        http: reqwest::Client::builder()
            .no_proxy()
            .pool_idle_timeout(Duration::from_secs(30))
            .build()
            .unwrap_or_default(),
        inputs: inputs.clone(),
        jitter: RandomState::new(),
    };
    let task = tokio::spawn(checker.run(receiver, shutdown));
    (HealthHandle { inputs }, task)
}

/// What reaches the checker besides registry events.
enum Input {
    Heartbeat {
        key: InstanceKey,
        status: HealthStatus,
        output: String,
        reply: oneshot::Sender<HeartbeatReply>,
    },
    Probed {
        key: Arc<InstanceKey>,
        generation: u64,
        started: Instant,
        result: Observation,
    },
}

/// The status after a heartbeat, and the flip it caused, if any.
type HeartbeatReply = Result<(HealthStatus, Option<Pending>), HeartbeatError>;

/// One check result.
#[derive(Debug, Clone)]
struct Observation {
    status: HealthStatus,
    output: String,
}

/// The checker's state for one checked instance.
struct Entry {
    key: Arc<InstanceKey>,
    spec: CheckSpec,
    generation: u64,
    /// The status last published.
    status: HealthStatus,
    successes: u32,
    failures: u32,
    ttl_deadline: Option<Instant>,
    critical_since: Option<Instant>,
    probing: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum TimerKind {
    TtlExpiry,
    Probe,
    Reap,
}

/// A wake-up; stale ones (a newer generation, a moved deadline) are
/// skipped when they fire rather than searched for and removed.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct Timer {
    due: Instant,
    kind: TimerKind,
    generation: u64,
    key: Arc<InstanceKey>,
}

struct Checker {
    registry: Arc<Registry>,
    entries: HashMap<Arc<InstanceKey>, Entry>,
    timers: BinaryHeap<Reverse<Timer>>,
    probes: JoinSet<()>,
    limit: Arc<Semaphore>,
    http: reqwest::Client,
    inputs: mpsc::UnboundedSender<Input>,
    jitter: RandomState,
}

impl Checker {
    async fn run(
        mut self,
        mut inputs: mpsc::UnboundedReceiver<Input>,
        shutdown: CancellationToken,
    ) {
        let (watched, mut events) = self.registry.attach_checker().await;
        for event in watched {
            self.on_event(event);
        }
        loop {
            let next = self.timers.peek().map(|t| t.0.due);
            tokio::select! {
                biased;
                () = shutdown.cancelled() => break,
                Some(event) = events.recv() => self.on_event(event),
                Some(input) = inputs.recv() => self.on_input(input).await,
                () = sleep_until(next) => self.fire_due(Instant::now()).await,
            }
            while self.probes.try_join_next().is_some() {}
        }
        self.probes.shutdown().await;
    }

    fn on_event(&mut self, event: CheckEvent) {
        match event {
            CheckEvent::Watch {
                key,
                spec,
                generation,
                status,
            } => self.watch(Arc::new(key), spec, generation, status),
            CheckEvent::Unwatch { key } => {
                self.entries.remove(&key);
            }
        }
    }

    fn watch(
        &mut self,
        key: Arc<InstanceKey>,
        spec: CheckSpec,
        generation: u64,
        status: HealthStatus,
    ) {
        let now = Instant::now();
        let mut entry = Entry {
            key: key.clone(),
            spec,
            generation,
            status,
            successes: 0,
            failures: 0,
            ttl_deadline: None,
            critical_since: (status == HealthStatus::Critical).then_some(now),
            probing: false,
        };
        match (&entry.spec.kind, entry.spec.interval()) {
            (CheckKind::Ttl { ttl }, _) => {
                let deadline = now + *ttl;
                entry.ttl_deadline = Some(deadline);
                self.schedule(&entry, TimerKind::TtlExpiry, deadline);
            }
            (_, Some(interval)) => {
                let spread = interval.min(FIRST_PROBE_SPREAD);
                let delay = self.jitter_within(&key, spread);
                self.schedule(&entry, TimerKind::Probe, now + delay);
            }
            (_, None) => {}
        }
        if let (Some(since), Some(after)) = (entry.critical_since, entry.spec.deregister_after) {
            self.schedule(&entry, TimerKind::Reap, since + after);
        }
        self.entries.insert(key, entry);
    }

    async fn on_input(&mut self, input: Input) {
        match input {
            Input::Heartbeat {
                key,
                status,
                output,
                reply,
            } => {
                let result = self.heartbeat(&key, Observation { status, output }).await;
                let _ = reply.send(result);
            }
            Input::Probed {
                key,
                generation,
                started,
                result,
            } => self.probed(&key, generation, started, result).await,
        }
    }

    async fn heartbeat(&mut self, key: &InstanceKey, observation: Observation) -> HeartbeatReply {
        let entry = self
            .entries
            .get_mut(key)
            .ok_or(HeartbeatError::NotTtlChecked)?;
        let CheckKind::Ttl { ttl } = entry.spec.kind else {
            return Err(HeartbeatError::NotTtlChecked);
        };
        let deadline = Instant::now() + ttl;
        entry.ttl_deadline = Some(deadline);
        let key = entry.key.clone();
        self.schedule_for(&key, TimerKind::TtlExpiry, deadline);
        Ok(self.observe(&key, observation).await)
    }

    async fn probed(
        &mut self,
        key: &Arc<InstanceKey>,
        generation: u64,
        started: Instant,
        result: Observation,
    ) {
        let Some(entry) = self.entries.get_mut(key) else {
            return;
        };
        if entry.generation != generation {
            return;
        }
        entry.probing = false;
        let next = entry
            .spec
            .interval()
            .map(|i| (started + i).max(Instant::now()));
        self.observe(key, result).await;
        if let Some(next) = next {
            self.schedule_for(key, TimerKind::Probe, next);
        }
    }

    /// Counts a result and flips the status when the damping thresholds
    /// say so. Returns the status afterwards and the flip, if any.
    async fn observe(
        &mut self,
        key: &InstanceKey,
        observation: Observation,
    ) -> (HealthStatus, Option<Pending>) {
        let Some(entry) = self.entries.get_mut(key) else {
            return (HealthStatus::Critical, None);
        };
        let flip = match observation.status {
            HealthStatus::Critical => {
                entry.successes = 0;
                entry.failures = entry.failures.saturating_add(1);
                entry.status != HealthStatus::Critical
                    && entry.failures >= entry.spec.failures_before_critical
            }
            good => {
                entry.failures = 0;
                entry.successes = entry.successes.saturating_add(1);
                match entry.status {
                    HealthStatus::Critical => entry.successes >= entry.spec.success_before_passing,
                    current => current != good,
                }
            }
        };
        let pending = if flip {
            self.transition(key, observation).await
        } else {
            None
        };
        let status = self
            .entries
            .get(key)
            .map_or(HealthStatus::Critical, |e| e.status);
        (status, pending)
    }

    /// Submits the new status to the registry (without waiting for it to
    /// be stored: the checker never blocks on the disk), logs it, and arms
    /// `deregister_after` when it is critical. A change the registry then
    /// refuses is for a registration that has been replaced, whose new
    /// `Watch` event resets this entry.
    async fn transition(&mut self, key: &InstanceKey, observation: Observation) -> Option<Pending> {
        let entry = self.entries.get(key)?;
        let change = Change::SetHealth {
            service: key.service.clone(),
            id: key.id.clone(),
            generation: entry.generation,
            health: Health::now(observation.status, observation.output.clone()),
        };
        let pending = match self.registry.submit(change).await {
            Ok(pending) => pending,
            Err(error) => {
                debug!(service = %key.service, instance = %key.id, error = %error, "health result dropped");
                return None;
            }
        };
        let entry = self.entries.get_mut(key)?;
        info!(
            service = %key.service,
            instance = %key.id,
            from = ?entry.status,
            to = ?observation.status,
            output = %observation.output,
            "health changed"
        );
        entry.status = observation.status;
        if observation.status == HealthStatus::Critical {
            let now = Instant::now();
            entry.critical_since = Some(now);
            if let Some(after) = entry.spec.deregister_after {
                let key = entry.key.clone();
                self.schedule_for(&key, TimerKind::Reap, now + after);
            }
        } else {
            entry.critical_since = None;
        }
        Some(pending)
    }

    async fn fire_due(&mut self, now: Instant) {
        while let Some(Reverse(timer)) = self.timers.peek() {
            if timer.due > now {
                break;
            }
            let Some(Reverse(timer)) = self.timers.pop() else {
                break;
            };
            let current = self
                .entries
                .get(&timer.key)
                .is_some_and(|e| e.generation == timer.generation);
            if current {
                self.fire(timer, now).await;
            }
        }
    }

    async fn fire(&mut self, timer: Timer, now: Instant) {
        let Some(entry) = self.entries.get_mut(&timer.key) else {
            return;
        };
        match timer.kind {
            TimerKind::TtlExpiry if entry.ttl_deadline == Some(timer.due) => {
                let ttl = match entry.spec.kind {
                    CheckKind::Ttl { ttl } => ttl,
                    _ => Duration::ZERO,
                };
                let expired = Observation {
                    status: HealthStatus::Critical,
                    output: format!(
                        "no heartbeat within the ttl of {}",
                        humantime::format_duration(ttl)
                    ),
                };
                // The contract: critical at the TTL, whatever the damping.
                if entry.status != HealthStatus::Critical {
                    self.transition(&timer.key, expired).await;
                }
            }
            TimerKind::Probe if !entry.probing => {
                entry.probing = true;
                self.start_probe(timer.key, timer.generation);
            }
            TimerKind::Reap => {
                let due = entry
                    .critical_since
                    .zip(entry.spec.deregister_after)
                    .is_some_and(|(since, after)| since + after <= now);
                if due {
                    self.reap(&timer.key, timer.generation).await;
                }
            }
            _ => {}
        }
    }

    /// Removes an instance that stayed critical; the registry re-checks
    /// that it still is, in this registration.
    async fn reap(&mut self, key: &InstanceKey, generation: u64) {
        let change = Change::Reap {
            service: key.service.clone(),
            id: key.id.clone(),
            generation,
        };
        match self.registry.submit(change).await {
            Ok(_) => {
                info!(service = %key.service, instance = %key.id, "deregistering after being critical");
                self.entries.remove(key);
            }
            Err(error) => {
                debug!(service = %key.service, instance = %key.id, error = %error, "not reaped")
            }
        }
    }

    fn start_probe(&mut self, key: Arc<InstanceKey>, generation: u64) {
        let Some(entry) = self.entries.get(&key) else {
            return;
        };
        let kind = entry.spec.kind.clone();
        let limit = self.limit.clone();
        let http = self.http.clone();
        let inputs = self.inputs.clone();
        self.probes.spawn(async move {
            let Ok(_permit) = limit.acquire_owned().await else {
                return;
            };
            let started = Instant::now();
            let result = probe(&http, &kind).await;
            let _ = inputs.send(Input::Probed {
                key,
                generation,
                started,
                result,
            });
        });
    }

    fn schedule(&mut self, entry: &Entry, kind: TimerKind, due: Instant) {
        self.timers.push(Reverse(Timer {
            due,
            kind,
            generation: entry.generation,
            key: entry.key.clone(),
        }));
    }

    fn schedule_for(&mut self, key: &InstanceKey, kind: TimerKind, due: Instant) {
        if let Some(entry) = self.entries.get(key) {
            let timer = Timer {
                due,
                kind,
                generation: entry.generation,
                key: entry.key.clone(),
            };
            self.timers.push(Reverse(timer));
        }
    }

    /// A duration in `[0, within)` that differs from check to check.
    fn jitter_within(&self, key: &InstanceKey, within: Duration) -> Duration {
        let nanos = within.as_nanos().max(1) as u64;
        Duration::from_nanos(self.jitter.hash_one(key) % nanos)
    }
}

async fn sleep_until(due: Option<Instant>) {
    match due {
        Some(due) => tokio::time::sleep_until(due).await,
        None => std::future::pending().await,
    }
}

/// Runs one active check.
async fn probe(http: &reqwest::Client, kind: &CheckKind) -> Observation {
    match kind {
        CheckKind::Http {
            http: url,
            method,
            headers,
            timeout,
            ..
        } => probe_http(http, url, method, headers, *timeout).await,
        CheckKind::Tcp { tcp, timeout, .. } => probe_tcp(tcp, *timeout).await,
        CheckKind::Ttl { .. } => Observation {
            status: HealthStatus::Critical,
            output: "ttl checks are not probed".into(),
        },
    }
}

async fn probe_http(
    http: &reqwest::Client,
    url: &str,
    method: &str,
    headers: &std::collections::BTreeMap<String, String>,
    timeout: Duration,
) -> Observation {
    let method = reqwest::Method::from_bytes(method.as_bytes()).unwrap_or(reqwest::Method::GET);
    let mut request = http.request(method, url).timeout(timeout);
    for (name, value) in headers {
        request = request.header(name, value);
    }
    let outcome = tokio::time::timeout(timeout, async {
        let mut response = request.send().await?;
        let status = response.status();
        let mut read = 0;
        while read < MAX_PROBE_BODY {
            match response.chunk().await? {
                Some(chunk) => read += chunk.len(),
                None => break,
            }
        }
        Ok::<_, reqwest::Error>(status)
    })
    .await;
    match outcome {
        Ok(Ok(status)) => Observation {
            status: match status.as_u16() {
                200..=299 => HealthStatus::Passing,
                429 => HealthStatus::Warning,
                _ => HealthStatus::Critical,
            },
            output: format!("HTTP {status}"),
        },
        Ok(Err(error)) => Observation {
            status: HealthStatus::Critical,
            output: format!("HTTP request failed: {error}"),
        },
        Err(_) => Observation {
            status: HealthStatus::Critical,
            output: format!("no answer within {}", humantime::format_duration(timeout)),
        },
    }
}

async fn probe_tcp(address: &str, timeout: Duration) -> Observation {
    match tokio::time::timeout(timeout, TcpStream::connect(address)).await {
        Ok(Ok(_)) => Observation {
            status: HealthStatus::Passing,
            output: format!("TCP connect to {address}: success"),
        },
        Ok(Err(error)) => Observation {
            status: HealthStatus::Critical,
            output: format!("TCP connect to {address}: {error}"),
        },
        Err(_) => Observation {
            status: HealthStatus::Critical,
            output: format!(
                "TCP connect to {address}: no answer within {}",
                humantime::format_duration(timeout)
            ),
        },
    }
}
