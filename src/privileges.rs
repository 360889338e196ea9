//! Dropping privileges: the master starts as root to bind any port, and each worker becomes
//! the configured `user` (and `group`) before it loads a plugin, so app code never runs as root.
//!
//! Invariants: only a freshly forked worker, still single-threaded, calls [`drop_to`] (so the
//! change covers the whole process); the order is `setgroups`, `setgid`, `setuid` (after
//! `setuid` the others are no longer permitted); a worker that cannot drop does not start.

use nix::unistd::{Gid, Group, Uid, User};

/// Who workers run as, resolved from the config by the master.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Identity {
    pub user: String,
    pub uid: Uid,
    pub group: String,
    pub gid: Gid,
}

/// Resolves `user` and `group` (default: the user's primary group). `Ok(None)` when no user
/// is configured. Errors say what is wrong in the config's terms.
pub fn resolve(user: Option<&str>, group: Option<&str>) -> Result<Option<Identity>, String> {
    let Some(name) = user else {
        return match group {
            Some(g) => Err(format!("`group = \"{g}\"` needs `user` too: workers drop to a user and its group")),
            None => Ok(None),
        };
    };
    let found = User::from_name(name).map_err(|e| format!("cannot look up user `{name}`: {e}"))?;
    let Some(found) = found else {
        return Err(format!("user `{name}` (the `user` in [server]) does not exist"));
    };
    let gid = match group {
        Some(g) => match Group::from_name(g).map_err(|e| format!("cannot look up group `{g}`: {e}"))? {
            Some(group) => group.gid,
            None => return Err(format!("group `{g}` (the `group` in [server]) does not exist")),
        },
        None => found.gid,
    };
    let group_name = match group {
        Some(g) => g.to_string(),
        None => Group::from_gid(gid).ok().flatten().map(|g| g.name).unwrap_or_else(|| gid.to_string()),
    };
    let me = Uid::effective();
    if !me.is_root() && me != found.uid {
        return Err(format!(
            "workers cannot switch to user `{name}`: fdtserver runs as uid {me}, not root (start it as root, or remove `user`)"
        ));
    }
    Ok(Some(Identity { user: name.to_string(), uid: found.uid, group: group_name, gid }))
}

/// Makes this (single-threaded, freshly forked) process `identity`, for good: supplementary
/// groups, group, then user; then checks that root cannot be regained.
pub fn drop_to(identity: &Identity) -> Result<(), String> {
    let Identity { user, uid, group, gid } = identity;
    if Uid::effective() == *uid && Uid::current() == *uid && Gid::effective() == *gid {
        return Ok(()); // already that user (fdtserver started as it)
    }
    nix::unistd::setgroups(&[*gid]).map_err(|e| format!("setgroups([{gid}]) for user `{user}` failed: {e}"))?;
    nix::unistd::setgid(*gid).map_err(|e| format!("setgid({gid}) (group `{group}`) failed: {e}"))?;
    nix::unistd::setuid(*uid).map_err(|e| format!("setuid({uid}) (user `{user}`) failed: {e}"))?;
    if !uid.is_root() && nix::unistd::setuid(Uid::from_raw(0)).is_ok() {
        return Err(format!("after switching to user `{user}` the worker could become root again"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_unknown_user_or_a_group_alone_is_refused_with_a_clear_message() {
        let e = resolve(Some("no-such-user-fdt"), None).unwrap_err();
        assert!(e.contains("user `no-such-user-fdt`") && e.contains("does not exist"), "{e}");
        let e = resolve(None, Some("nogroup")).unwrap_err();
        assert!(e.contains("needs `user`"), "{e}");
        assert_eq!(resolve(None, None).unwrap(), None);
    }
}
