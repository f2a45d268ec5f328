//! Choosing an instance: the lowest SRV priority level with an usable
//! instance, then smooth weighted round robin by SRV weight (or power of
//! two choices on requests in flight), and passive outlier ejection.
//!
//! The state here is the gateway's own (turns, counters); which instances
//! exist and are healthy comes only from the registry snapshot.

use std::collections::HashMap;
use std::hash::BuildHasher;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::time::Instant;

use crate::config::Balance;

/// An instance as the gateway sees it.
#[derive(Debug, Clone)]
pub struct Backend {
    /// `service/id` (or the SRV target): what turns are kept under.
    pub key: Arc<str>,
    /// The address as a URI authority, built once.
    pub authority: hyper::http::uri::Authority,
    pub priority: u16,
    pub weight: u16,
    /// Outlier state and requests in flight, shared with other routes.
    pub stats: Arc<BackendStats>,
}

impl Backend {
    pub fn new(
        key: Arc<str>,
        addr: SocketAddr,
        priority: u16,
        weight: u16,
        outliers: &Outliers,
    ) -> Self {
        let authority = addr
            .to_string()
            .parse()
            .unwrap_or_else(|_| hyper::http::uri::Authority::from_static("invalid"));
        Self {
            stats: outliers.stats(&key),
            key,
            authority,
            priority,
            weight,
        }
    }
}

/// Per-instance counters shared by every route.
#[derive(Debug, Default)]
pub struct BackendStats {
    pub in_flight: AtomicU32,
    failures: AtomicU32,
    ejections: AtomicU32,
    /// Nanoseconds after `Outliers::epoch` until which it is ejected.
    ejected_until: AtomicU64,
}

/// One request in flight to a backend, counted for as long as it lives:
/// a request the client abandons while it waits on the upstream is
/// dropped, not finished, and must stop counting all the same.
pub struct InFlight<'a>(&'a BackendStats);

impl<'a> InFlight<'a> {
    pub fn start(stats: &'a BackendStats) -> Self {
        stats.in_flight.fetch_add(1, Ordering::Relaxed);
        Self(stats)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Passive health: instances that keep failing are left out for a while.
/// Clones share the same state.
#[derive(Clone)]
pub struct Outliers {
    stats: Arc<Mutex<HashMap<Arc<str>, Arc<BackendStats>>>>,
    epoch: Instant,
    eject_after: u32,
    eject_for: Duration,
    eject_max: Duration,
}

impl Outliers {
    pub fn new(eject_after: u32, eject_for: Duration, eject_max: Duration) -> Self {
        Self {
            stats: Arc::new(Mutex::new(HashMap::new())),
            epoch: Instant::now(),
            eject_after,
            eject_for,
            eject_max,
        }
    }

    pub fn stats(&self, key: &Arc<str>) -> Arc<BackendStats> {
        let mut stats = self.stats.lock().unwrap_or_else(PoisonError::into_inner);
        stats.entry(key.clone()).or_default().clone()
    }

    fn is_ejected(&self, stats: &BackendStats, now: Instant) -> bool {
        let until = stats.ejected_until.load(Ordering::Relaxed);
        until > 0 && self.since_epoch(now) < until
    }

    /// Counts an attempt: a connect error or 5xx is a failure; enough in
    /// a row eject the instance, each ejection twice as long as the last.
    /// Returns whether this attempt ejected it.
    pub fn record(&self, stats: &BackendStats, success: bool, now: Instant) -> bool {
        if success {
            stats.failures.store(0, Ordering::Relaxed);
            if !self.is_ejected(stats, now) {
                stats.ejections.store(0, Ordering::Relaxed);
            }
            return false;
        }
        let failures = stats.failures.fetch_add(1, Ordering::Relaxed) + 1;
        if failures < self.eject_after {
            return false;
        }
        stats.failures.store(0, Ordering::Relaxed);
        let ejections = stats.ejections.fetch_add(1, Ordering::Relaxed);
        let length = self
            .eject_for
            .saturating_mul(1u32 << ejections.min(16))
            .min(self.eject_max);
        let until = self.since_epoch(now + length);
        stats.ejected_until.store(until, Ordering::Relaxed);
        true
    }

    fn since_epoch(&self, at: Instant) -> u64 {
        at.saturating_duration_since(self.epoch).as_nanos() as u64
    }
}

/// A route's balancing state.
pub struct Picker {
    balance: Balance,
    /// Smooth weighted round robin: each instance's current weight.
    current: Mutex<HashMap<Arc<str>, i64>>,
    random: AtomicU64,
    seed: std::collections::hash_map::RandomState,
}

impl Picker {
    pub fn new(balance: Balance) -> Self {
        Self {
            balance,
            current: Mutex::new(HashMap::new()),
            random: AtomicU64::new(1),
            seed: std::collections::hash_map::RandomState::new(),
        }
    }

    /// The index in `backends` to send to, skipping `tried` and, while any
    /// other is usable, ejected instances; `None` when none is left.
    pub fn pick(
        &self,
        backends: &[Backend],
        tried: &[Arc<str>],
        outliers: &Outliers,
        now: Instant,
    ) -> Option<usize> {
        let untried = |i: usize| !tried.contains(&backends[i].key);
        let healthy = |i: usize| !outliers.is_ejected(&backends[i].stats, now);
        // Never eject the last instance(s): if all are ejected, use them all.
        let any_healthy = (0..backends.len()).any(|i| untried(i) && healthy(i));
        let usable = |i: &usize| untried(*i) && (!any_healthy || healthy(*i));
        let priority = (0..backends.len())
            .filter(usable)
            .map(|i| backends[i].priority)
            .min()?;
        let level: Vec<usize> = (0..backends.len())
            .filter(|i| usable(i) && backends[*i].priority == priority)
            .collect();
        match self.balance {
            Balance::RoundRobin => Some(self.weighted_round_robin(backends, &level)),
            Balance::LeastRequest => Some(self.two_choices(backends, &level)),
        }
    }

    /// nginx's smooth weighted round robin: every pick adds each weight to
    /// its instance's current value, takes the largest, and subtracts the
    /// total from it, so a 5:1:1 split comes out interleaved.
    fn weighted_round_robin(&self, backends: &[Backend], level: &[usize]) -> usize {
        // One candidate: its current weight would come back to where it was.
        if let [only] = level {
            return *only;
        }
        let mut current = self.current.lock().unwrap_or_else(PoisonError::into_inner);
        if current.len() > 4 * backends.len().max(16) {
            current.retain(|key, _| backends.iter().any(|b| &b.key == key));
        }
        let mut total = 0i64;
        let mut best: Option<(usize, i64)> = None;
        for &i in level {
            let weight = i64::from(backends[i].weight.max(1));
            total += weight;
            let value = current.entry(backends[i].key.clone()).or_insert(0);
            *value += weight;
            if best.is_none_or(|(_, v)| *value > v) {
                best = Some((i, *value));
            }
        }
        let (chosen, _) = best.unwrap_or((level[0], 0));
        if let Some(value) = current.get_mut(&backends[chosen].key) {
            *value -= total;
        }
        chosen
    }

    /// Two instances at random; the one with fewer requests in flight.
    fn two_choices(&self, backends: &[Backend], level: &[usize]) -> usize {
        if level.len() == 1 {
            return level[0];
        }
        let a = level[self.next_random() % level.len()];
        let mut b = level[self.next_random() % level.len()];
        if a == b {
            b = level[(level.iter().position(|&i| i == a).unwrap_or(0) + 1) % level.len()];
        }
        let load = |i: usize| backends[i].stats.in_flight.load(Ordering::Relaxed);
        if load(b) < load(a) { b } else { a }
    }

    fn next_random(&self) -> usize {
        let n = self.random.fetch_add(1, Ordering::Relaxed);
        self.seed.hash_one(n) as usize
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_abandoned_request_stops_counting_as_in_flight() {
        let stats = BackendStats::default();
        let waiting = async {
            let _counted = InFlight::start(&stats);
            std::future::pending::<()>().await;
        };
        let mut waiting = Box::pin(waiting);
        let waker = std::task::Waker::noop();
        let polled = waiting
            .as_mut()
            .poll(&mut std::task::Context::from_waker(waker));
        assert!(polled.is_pending());
        assert_eq!(
            stats.in_flight.load(Ordering::Relaxed),
            1,
            "counted while waiting"
        );
        // The client went away: hyper drops the handler mid-await.
        drop(waiting);
        assert_eq!(stats.in_flight.load(Ordering::Relaxed), 0);
    }

    fn backend(key: &str, priority: u16, weight: u16, outliers: &Outliers) -> Backend {
        Backend::new(
            key.into(),
            "127.0.0.1:1".parse().unwrap(),
            priority,
            weight,
            outliers,
        )
    }

    fn outliers() -> Outliers {
        Outliers::new(2, Duration::from_secs(10), Duration::from_secs(40))
    }

    fn picks(picker: &Picker, backends: &[Backend], outliers: &Outliers, n: usize) -> Vec<String> {
        (0..n)
            .map(|_| {
                let i = picker
                    .pick(backends, &[], outliers, Instant::now())
                    .unwrap();
                backends[i].key.to_string()
            })
            .collect()
    }

    #[test]
    fn smooth_weighted_round_robin_interleaves_by_weight() {
        let outliers = outliers();
        let backends = [
            backend("a", 0, 5, &outliers),
            backend("b", 0, 1, &outliers),
            backend("c", 0, 1, &outliers),
        ];
        let picker = Picker::new(Balance::RoundRobin);
        let order = picks(&picker, &backends, &outliers, 7);
        assert_eq!(order, ["a", "a", "b", "a", "c", "a", "a"]);
    }

    #[test]
    fn the_lowest_priority_level_is_used_while_it_has_instances() {
        let outliers = outliers();
        let backends = [
            backend("backup", 1, 1, &outliers),
            backend("primary", 0, 1, &outliers),
        ];
        let picker = Picker::new(Balance::RoundRobin);
        assert!(
            picks(&picker, &backends, &outliers, 4)
                .iter()
                .all(|k| k == "primary")
        );
        let tried: Vec<Arc<str>> = vec!["primary".into()];
        let i = picker
            .pick(&backends, &tried, &outliers, Instant::now())
            .unwrap();
        assert_eq!(&*backends[i].key, "backup", "a retry fails over");
    }

    #[test]
    fn failing_instances_are_ejected_with_doubling_back_off_but_never_the_last() {
        let outliers = outliers();
        let backends = [backend("a", 0, 1, &outliers), backend("b", 0, 1, &outliers)];
        let picker = Picker::new(Balance::RoundRobin);
        let now = Instant::now();
        let a = outliers.stats(&backends[0].key);
        assert!(!outliers.record(&a, false, now));
        assert!(outliers.record(&a, false, now), "second failure ejects");
        assert!(
            picks(&picker, &backends, &outliers, 4)
                .iter()
                .all(|k| k == "b")
        );
        assert!(outliers.is_ejected(&a, now + Duration::from_secs(9)));
        assert!(!outliers.is_ejected(&a, now + Duration::from_secs(10)));
        let later = now + Duration::from_secs(11);
        outliers.record(&a, false, later);
        outliers.record(&a, false, later);
        assert!(
            outliers.is_ejected(&a, later + Duration::from_secs(19)),
            "twice as long"
        );
        let b = outliers.stats(&backends[1].key);
        outliers.record(&b, false, now);
        outliers.record(&b, false, now);
        let i = picker.pick(&backends, &[], &outliers, now).unwrap();
        assert!(i < 2, "with everything ejected, instances are still used");
    }

    #[test]
    fn least_request_prefers_the_less_busy() {
        let outliers = outliers();
        let backends = [backend("a", 0, 1, &outliers), backend("b", 0, 1, &outliers)];
        backends[0].stats.in_flight.store(10, Ordering::Relaxed);
        let picker = Picker::new(Balance::LeastRequest);
        assert!(
            picks(&picker, &backends, &outliers, 20)
                .iter()
                .all(|k| k == "b")
        );
    }
}
