//! What coordination tells the operator: each event writes its log line and moves its
//! metric in one place, so the two never drift.

use metrics::{Counter, Gauge};

/// The metrics of the pair (no labels but `op`).
pub mod metric {
    /// Gauge: 1 while this consumer's beacons are stored in the pair's bucket, else 0
    /// (the pair falls back to local behaviour; alert `pair_coordination_lost`).
    pub const COORDINATED: &str = "tandem_pair_coordinated";
    /// Counter: failed bucket operations (label `op`: beacon, watch, lease,
    /// connect_token).
    pub const ERRORS: &str = "tandem_pair_errors_total";
    /// The label of [`ERRORS`].
    pub const OP: &str = "op";
}

/// A kind of bucket operation, the `op` label of [`metric::ERRORS`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Op {
    Beacon,
    Watch,
    Lease,
    ConnectToken,
}

impl Op {
    const ALL: [Op; 4] = [Op::Beacon, Op::Watch, Op::Lease, Op::ConnectToken];

    fn label(self) -> &'static str {
        match self {
            Op::Beacon => "beacon",
            Op::Watch => "watch",
            Op::Lease => "lease",
            Op::ConnectToken => "connect_token",
        }
    }
}

/// The metric handles, registered at start (every series exists at zero from then on).
#[derive(Debug, Clone)]
pub(crate) struct Meters {
    coordinated: Gauge,
    errors: [Counter; 4],
}

impl Meters {
    pub(crate) fn register() -> Meters {
        let coordinated = metrics::gauge!(metric::COORDINATED);
        coordinated.set(0.0);
        let errors = Op::ALL.map(|op| {
            let c = metrics::counter!(metric::ERRORS, metric::OP => op.label());
            c.increment(0);
            c
        });
        Meters {
            coordinated,
            errors,
        }
    }
}

/// A bucket operation failed.
pub(crate) struct OpFailed<'a> {
    pub(crate) op: Op,
    pub(crate) error: &'a str,
}

impl OpFailed<'_> {
    pub(crate) fn emit(&self, meters: &Meters) {
        // Debug only: while the bucket is away this repeats every beacon; the state
        // change is what is logged at warn.
        tracing::debug!(
            op = self.op.label(),
            error = self.error,
            "pair bucket operation failed"
        );
        meters.errors[self.op as usize].increment(1);
    }
}

/// This consumer's beacons are stored again (or for the first time).
pub(crate) struct CoordinationUp;

impl CoordinationUp {
    pub(crate) fn emit(&self, meters: &Meters) {
        tracing::info!(
            "pair coordination up: progress, coverage, job leases and the connect budget are shared with the peer"
        );
        meters.coordinated.set(1.0);
    }
}

/// This consumer's beacons cannot be stored: the pair falls back to local behaviour.
pub(crate) struct CoordinationLost<'a> {
    pub(crate) error: &'a str,
}

impl CoordinationLost<'_> {
    pub(crate) fn emit(&self, meters: &Meters) {
        tracing::warn!(
            error = self.error,
            "pair coordination lost: falling back to local behaviour (own job share, static connect budget)"
        );
        meters.coordinated.set(0.0);
    }
}

/// Coordination stopped at shutdown.
pub(crate) struct CoordinationStopped;

impl CoordinationStopped {
    pub(crate) fn emit(&self, meters: &Meters) {
        tracing::info!("pair coordination stopped");
        meters.coordinated.set(0.0);
    }
}

/// A held recovery-job lease was taken over: its renewal found another revision (it
/// expired while renewals failed, and the peer created it).
pub(crate) struct LeaseLost<'a> {
    pub(crate) account: &'a str,
    pub(crate) slot: usize,
}

impl LeaseLost<'_> {
    pub(crate) fn emit(&self, meters: &Meters) {
        tracing::warn!(
            account = %tandem_core::redact_url(self.account),
            slot = self.slot,
            "recovery job lease lost: it expired before a renewal got through; the peer may run a job in this slot too"
        );
        meters.errors[Op::Lease as usize].increment(1);
    }
}
