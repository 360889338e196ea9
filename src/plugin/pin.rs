//! Pinned copies of plugin files: each generation loads its own immutable, content-addressed
//! copy, so that `cp new.so old.so` over a running plugin never crashes a worker, and a worker
//! respawned later in a generation loads the same code as its siblings.
//!
//! Runs in the master: it reads and copies files, and never loads them.

use std::collections::HashMap;
use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// First bytes of an ELF file.
const ELF_MAGIC: &[u8] = b"\x7fELF";

/// What identifies one version of a file without reading it: replacing or rewriting the file
/// (`cp`, a build, a rename over it) changes at least one of these.
#[derive(Clone, Copy, PartialEq, Eq)]
struct FileVersion {
    dev: u64,
    ino: u64,
    len: u64,
    mtime_ns: i128,
    ctime_ns: i128,
}

impl FileVersion {
    fn of(meta: &fs::Metadata) -> FileVersion {
        FileVersion {
            dev: meta.dev(),
            ino: meta.ino(),
            len: meta.len(),
            mtime_ns: i128::from(meta.mtime()) * 1_000_000_000 + i128::from(meta.mtime_nsec()),
            ctime_ns: i128::from(meta.ctime()) * 1_000_000_000 + i128::from(meta.ctime_nsec()),
        }
    }
}

/// Plugin path → (the version last pinned, its copy). Plugins are tens of MB with debug info:
/// reading and hashing them at every reload would dominate the reload's cost.
static PINNED: Mutex<Option<HashMap<PathBuf, (FileVersion, PathBuf)>>> = Mutex::new(None);

/// Copies `plugin` into `dir` under a name derived from its content, unless that copy exists.
/// Returns the copy's path. A file unchanged since it was last pinned is not read again.
pub fn pin(plugin: &Path, dir: &Path) -> io::Result<PathBuf> {
    let version = FileVersion::of(&fs::metadata(plugin)?);
    let mut cache = PINNED.lock().unwrap_or_else(|e| e.into_inner());
    let cache = cache.get_or_insert_with(HashMap::new);
    if let Some((known, pinned)) = cache.get(plugin)
        && *known == version
        && pinned.starts_with(dir)
        && pinned.exists()
    {
        return Ok(pinned.clone());
    }
    let pinned = pin_content(plugin, dir)?;
    cache.insert(plugin.to_path_buf(), (version, pinned.clone()));
    Ok(pinned)
}

fn pin_content(plugin: &Path, dir: &Path) -> io::Result<PathBuf> {
    let bytes = fs::read(plugin)?;
    if !bytes.starts_with(ELF_MAGIC) {
        return Err(io::Error::new(io::ErrorKind::InvalidData, "not a shared library (no ELF header)"));
    }
    let name = plugin.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "plugin.so".into());
    let pinned = dir.join(format!("{:016x}-{}-{name}", fnv1a(&bytes), bytes.len()));
    if fs::metadata(&pinned).is_ok_and(|m| m.len() == bytes.len() as u64) {
        return Ok(pinned);
    }
    // Write a temporary file and rename it, so a worker never sees a half-written copy.
    let tmp = dir.join(format!(".{}.tmp-{}", name, std::process::id()));
    let mut file = fs::File::create(&tmp)?;
    file.write_all(&bytes)?;
    file.sync_all()?;
    drop(file);
    fs::rename(&tmp, &pinned)?;
    Ok(pinned)
}

/// Removes pinned copies in `dir` that are not in `keep`.
pub fn prune(dir: &Path, keep: &[&Path]) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if !keep.contains(&path.as_path()) {
            let _ = fs::remove_file(&path);
        }
    }
}

/// 64-bit FNV-1a: enough to tell builds of a plugin apart (the length is part of the name too).
fn fnv1a(bytes: &[u8]) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        hash ^= u64::from(b);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    hash
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_content_same_copy_and_new_content_new_copy() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("libapp.so");
        let pins = dir.path().join("pins");
        fs::create_dir(&pins).unwrap();
        fs::write(&src, b"\x7fELF one").unwrap();
        let a = pin(&src, &pins).unwrap();
        assert_eq!(pin(&src, &pins).unwrap(), a);
        fs::write(&src, b"\x7fELF two").unwrap();
        let b = pin(&src, &pins).unwrap();
        assert_ne!(a, b);
        assert_eq!(fs::read(&a).unwrap(), b"\x7fELF one");
        prune(&pins, &[b.as_path()]);
        assert!(!a.exists() && b.exists());
    }

    #[test]
    fn a_file_that_is_not_elf_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("notes.txt");
        fs::write(&src, b"hello").unwrap();
        assert!(pin(&src, dir.path()).unwrap_err().to_string().contains("not a shared library"));
    }
}
