//! Response rate limiting (RRL), so a flood of spoofed UDP queries cannot
//! turn muster into an amplifier: each client prefix (/24, or /56 for
//! IPv6) gets `responses_per_second` of the same answer. Past that,
//! every `slip`-th answer goes out empty with TC set (a real client
//! retries over TCP and gets it; a victim of spoofing gets a tiny packet)
//! and the rest are dropped. NXDOMAIN answers share one budget per
//! prefix, so random names do not make fresh budgets. TCP is never
//! limited. Off unless configured, like Knot's and BIND's.

use std::collections::hash_map::RandomState;
use std::hash::BuildHasher;
use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU64, Ordering};

use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use hickory_proto::op::ResponseCode;
use hickory_proto::rr::RecordType;
use ipnet::IpNet;

use crate::config::RrlConfig;

/// Budgets tracked before the idle ones are swept out.
const SWEEP_ABOVE: usize = 100_000;
/// How often (in checks) the size is looked at.
const SWEEP_EVERY: u64 = 4096;

/// What to do with an answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    Send,
    /// Send it empty, with TC set.
    Slip,
    Drop,
}

pub struct Rrl {
    limiter: DefaultKeyedRateLimiter<u64>,
    slip: u64,
    exempt: Vec<IpNet>,
    hasher: RandomState,
    limited: AtomicU64,
    checks: AtomicU64,
}

impl Rrl {
    /// `None` when `responses_per_second` is 0 (RRL off).
    pub fn new(config: &RrlConfig) -> Option<Self> {
        let rate = NonZeroU32::new(config.responses_per_second)?;
        Some(Self {
            limiter: RateLimiter::dashmap(Quota::per_second(rate)),
            slip: u64::from(config.slip),
            exempt: config.exempt.clone(),
            hasher: RandomState::new(),
            limited: AtomicU64::new(0),
            checks: AtomicU64::new(0),
        })
    }

    /// Whether the answer (`qname`, `qtype`, `rcode`) may go to `client`.
    /// `qname` is the lowercased name in wire form, as both the UDP
    /// cache and the general path have it at hand.
    pub fn decide(
        &self,
        client: IpAddr,
        qname: &[u8],
        qtype: RecordType,
        rcode: ResponseCode,
    ) -> Decision {
        if self.exempt.iter().any(|net| net.contains(&client)) {
            return Decision::Send;
        }
        self.sweep();
        let key = self.key(client, qname, qtype, rcode);
        if self.limiter.check_key(&key).is_ok() {
            return Decision::Send;
        }
        let limited = self.limited.fetch_add(1, Ordering::Relaxed) + 1;
        match self.slip {
            0 => Decision::Drop,
            slip if limited.is_multiple_of(slip) => Decision::Slip,
            _ => Decision::Drop,
        }
    }

    fn key(&self, client: IpAddr, qname: &[u8], qtype: RecordType, rcode: ResponseCode) -> u64 {
        let prefix: u128 = match client {
            IpAddr::V4(v4) => u128::from(u32::from(v4) & 0xffff_ff00),
            IpAddr::V6(v6) => u128::from(v6) & !((1u128 << 72) - 1),
        };
        if rcode == ResponseCode::NXDomain {
            return self.hasher.hash_one((prefix, "nxdomain"));
        }
        self.hasher
            .hash_one((prefix, qname, u16::from(qtype), u16::from(rcode)))
    }

    /// Keeps the budgets bounded: idle ones are dropped now and then.
    fn sweep(&self) {
        let checks = self.checks.fetch_add(1, Ordering::Relaxed);
        if checks.is_multiple_of(SWEEP_EVERY) && self.limiter.len() > SWEEP_ABOVE {
            self.limiter.retain_recent();
            self.limiter.shrink_to_fit();
        }
    }
}
