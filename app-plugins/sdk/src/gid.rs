//! Global transaction ids: `fdt1:<node_id>:<gtrid>:<app>`.
//!
//! A gid is built only from things that survive any restart — the node's stable name, the
//! coordinator's gtrid and the app's name — so a coordinator can always find its branch again.
//! Gids of transactions that a worker coordinates itself across several databases use gtrids
//! `lc.<n>.<coordinator>.<database>` (`lc` = local coordination; `n` from a sequence in the
//! coordinator database, where the decision is recorded), which outside coordinators may not
//! use.
//!
//! While a worker coordinates local transaction `n`, its session in the coordinator database
//! holds a session-level advisory lock whose key is derived from the decision key alone
//! ([`Gid::coordinator_lock`]), so recovery can tell from any branch's gid whether the
//! coordinator still lives: whoever can take that lock knows it is gone.

use std::fmt;

/// Gid format version prefix.
pub const PREFIX: &str = "fdt1";
/// Gtrids that start with this are reserved for local coordination.
pub const LOCAL_MARKER: &str = "lc.";
/// Longest gtrid an outside coordinator may choose.
pub const MAX_GTRID: usize = 64;

/// A parsed gid.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Gid {
    pub node_id: String,
    pub gtrid: String,
    pub app: String,
}

impl fmt::Display for Gid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{PREFIX}:{}:{}:{}", self.node_id, self.gtrid, self.app)
    }
}

impl Gid {
    pub fn new(node_id: &str, gtrid: &str, app: &str) -> Gid {
        Gid { node_id: node_id.into(), gtrid: gtrid.into(), app: app.into() }
    }

    /// Parses a gid of ours; `None` for anything else (another product's prepared xact).
    pub fn parse(text: &str) -> Option<Gid> {
        let mut parts = text.splitn(4, ':');
        if parts.next()? != PREFIX {
            return None;
        }
        let (node_id, gtrid, app) = (parts.next()?, parts.next()?, parts.next()?);
        if node_id.is_empty() || gtrid.is_empty() || app.is_empty() || !safe(text) {
            return None;
        }
        Some(Gid::new(node_id, gtrid, app))
    }

    /// True for a branch of a transaction a worker coordinated itself.
    pub fn is_local(&self) -> bool {
        self.gtrid.starts_with(LOCAL_MARKER)
    }

    /// For a local branch `lc.<n>.<coordinator>.<db>`: (n, coordinator database, branch
    /// database).
    pub fn local_parts(&self) -> Option<(u64, &str, &str)> {
        let rest = self.gtrid.strip_prefix(LOCAL_MARKER)?;
        let mut parts = rest.split('.');
        let (n, coordinator, db) = (parts.next()?.parse().ok()?, parts.next()?, parts.next()?);
        (parts.next().is_none() && !coordinator.is_empty() && !db.is_empty()).then_some((n, coordinator, db))
    }

    /// The key under which the decision to commit a local transaction is recorded (in its
    /// coordinator database): the gid with the branch's database left out. It names node, app
    /// and coordinator, so transactions of different apps never share a decision.
    pub fn decision_key(&self) -> Option<String> {
        let (n, coordinator, _) = self.local_parts()?;
        Some(Gid::new(&self.node_id, &local_transaction(n, coordinator), &self.app).to_string())
    }

    /// For a local branch: the key of the advisory lock (`pg_advisory_lock(bigint)`, in the
    /// coordinator database) that the coordinating session holds from before the first
    /// `PREPARE` until every branch is settled.
    pub fn coordinator_lock(&self) -> Option<i64> {
        self.decision_key().map(|key| coordinator_lock_key(&key))
    }
}

/// The advisory lock key of the local transaction whose decision key is `decision_key`:
/// FNV-1a (64 bits) of it. Keys are unique per transaction (the key names node, app,
/// coordinator database and sequence number); a collision with an unrelated advisory lock would
/// only make recovery wait for a later round.
pub fn coordinator_lock_key(decision_key: &str) -> i64 {
    let hash =
        decision_key.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3));
    hash as i64
}

/// The gtrid of local transaction `n` coordinated from database `coordinator`.
pub fn local_transaction(n: u64, coordinator: &str) -> String {
    format!("{LOCAL_MARKER}{n}.{coordinator}")
}

/// The gtrid of the branch in `db` of local transaction `n`.
pub fn local_branch(n: u64, coordinator: &str, db: &str) -> String {
    format!("{}.{db}", local_transaction(n, coordinator))
}

/// Checks a database's name from the config for use inside gids: `[A-Za-z0-9_-]{1,32}`.
pub fn check_database_name(name: &str) -> Result<(), String> {
    let ok =
        !name.is_empty() && name.len() <= 32 && name.bytes().all(|b| b.is_ascii_alphanumeric() || b"_-".contains(&b));
    if ok {
        Ok(())
    } else {
        Err("database names may use only A-Z a-z 0-9 _ - (at most 32), as they appear in transaction ids".into())
    }
}

/// Checks a gtrid chosen by an outside coordinator: `[A-Za-z0-9._-]{1,64}`, not reserved.
pub fn check_gtrid(gtrid: &str) -> Result<(), String> {
    if gtrid.is_empty() || gtrid.len() > MAX_GTRID {
        return Err(format!("gtrid must be 1 to {MAX_GTRID} characters"));
    }
    if !gtrid.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b)) {
        return Err("gtrid may only contain A-Z a-z 0-9 . _ -".into());
    }
    if gtrid.starts_with(LOCAL_MARKER) {
        return Err(format!("gtrids starting with {LOCAL_MARKER} are reserved"));
    }
    Ok(())
}

/// Characters that may appear in a gid we put into SQL as a literal.
pub fn safe(gid: &str) -> bool {
    !gid.is_empty() && gid.len() < 200 && gid.bytes().all(|b| b.is_ascii_alphanumeric() || b"_.:-".contains(&b))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gids_round_trip_and_local_ones_name_their_transaction() {
        let g = Gid::new("web-1", "t-42", "bank");
        assert_eq!(g.to_string(), "fdt1:web-1:t-42:bank");
        assert_eq!(Gid::parse("fdt1:web-1:t-42:bank"), Some(g.clone()));
        assert!(!g.is_local());
        let l = Gid::parse("fdt1:web-1:lc.17.a.b:bank").unwrap();
        assert!(l.is_local());
        assert_eq!(l.local_parts(), Some((17, "a", "b")));
        assert_eq!(l.decision_key().as_deref(), Some("fdt1:web-1:lc.17.a:bank"));
        // Every branch of one transaction names the same coordinator lock; others differ.
        let other_branch = Gid::parse("fdt1:web-1:lc.17.a.a:bank").unwrap();
        assert_eq!(l.coordinator_lock(), other_branch.coordinator_lock());
        assert_eq!(l.coordinator_lock(), Some(coordinator_lock_key("fdt1:web-1:lc.17.a:bank")));
        assert_ne!(l.coordinator_lock(), Gid::parse("fdt1:web-2:lc.17.a.b:bank").unwrap().coordinator_lock());
        assert_eq!(g.coordinator_lock(), None);
        assert_eq!(local_branch(17, "a", "b"), "lc.17.a.b");
        assert_eq!(Gid::parse("fdt1:web-1:lc.x.a.b:bank").unwrap().local_parts(), None);
        assert!(check_database_name("main_1").is_ok() && check_database_name("a.b").is_err());
        assert_eq!(Gid::parse("other:thing"), None);
        assert_eq!(Gid::parse("fdt1:x:y'; drop table x; --:z"), None);
    }

    #[test]
    fn outside_gtrids_are_checked() {
        assert!(check_gtrid("order-17.b_2").is_ok());
        assert!(check_gtrid("").is_err());
        assert!(check_gtrid(&"x".repeat(65)).is_err());
        assert!(check_gtrid("a b").is_err());
        assert!(check_gtrid("a'b").is_err());
        assert!(check_gtrid("lc.5").is_err());
    }
}
