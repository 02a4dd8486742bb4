//! Writing what kiln produces so that it appears whole or not at all, and only where writing cannot
//! destroy something else: the one implementation behind `-o FILE`, artifact directories,
//! checkpoints and the training curve, in every crate.
//!
//! - [`check_file_target`]: a path a file may be written to is a new path or a regular file (which
//!   is replaced). Anything else is refused, saying what it is and what would be right: a directory,
//!   a symbolic link (a rename would replace the link, not write through it), a FIFO, a device or a
//!   socket (writing would turn it into a regular file).
//! - [`check_not_input`]: an output is never one of the command's own inputs (the same file, by
//!   device and inode), nor a directory holding one.
//! - [`write_file`], [`write_file_with`]: the bytes go to a temporary sibling
//!   `.{name}.tmp-{pid}-{random}` (made by `tempfile`, removed on any failure), are synced, and the
//!   sibling is renamed over the target; then the directory is synced, so that the rename survives
//!   a power cut.
//! - [`replace_dir`]: the same for a directory: filled as a temporary sibling, every file in it
//!   synced, renamed into place. A directory already there is moved aside first
//!   (`.{name}.old-{pid}-{random}`), removed once the new one is in place, and moved back if that
//!   rename fails. (Linux cannot rename a directory over a non-empty one, so there is a moment when
//!   the target is absent; there is never one when it is half written.) Which existing directory
//!   may be replaced is the caller's rule.
//! - [`remove_stale`], [`remove_stale_siblings`]: temporaries carry the id of the process that made
//!   them; those of a process that no longer runs (killed with SIGKILL, or by a power cut) are
//!   removed by the next write beside them. A process is known to be gone only where `/proc` says
//!   so (Linux); elsewhere nothing is removed. (Processes in another PID namespace that share the
//!   directory look gone; kiln's temporaries are not shared that way in practice.)
//!
//! What it does not do: lock. Two processes writing the same target both succeed and the last rename
//! wins; each result is whole.

use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

/// Why an output could not be written where it was asked to go.
#[derive(Debug, thiserror::Error)]
pub enum OutputError {
    #[error("cannot write {}: {source}", path.display())]
    Io { path: PathBuf, source: io::Error },
    /// The path holds something that is not a regular file.
    #[error(
        "{} is {kind}, not a regular file: kiln writes its output to a new path or replaces a regular \
         file{hint}",
        path.display()
    )]
    NotAFile { path: PathBuf, kind: String, hint: String },
    /// The path is one of the command's inputs, or a directory holding one.
    #[error(
        "{} {relation} the input {}: writing the output there would destroy the input; write it to \
         another path",
        path.display(),
        input.display()
    )]
    IsInput { path: PathBuf, input: PathBuf, relation: &'static str },
    #[error("{} is not a path a file or directory can be written to (it has no file name)", path.display())]
    NoFileName { path: PathBuf },
}

fn io_error(path: &Path) -> impl Fn(io::Error) -> OutputError + '_ {
    move |source| OutputError::Io { path: path.to_path_buf(), source }
}

/// What a path that is not a regular file is, for messages: `a directory`, `a symbolic link to
/// x`, `a FIFO (named pipe)`, ...; `None` for a regular file.
fn kind_of(path: &Path, meta: &fs::Metadata) -> Option<String> {
    let t = meta.file_type();
    if t.is_file() {
        return None;
    }
    if t.is_dir() {
        return Some("a directory".into());
    }
    if t.is_symlink() {
        let target = fs::read_link(path).map(|t| format!(" to `{}`", t.display())).unwrap_or_default();
        return Some(format!("a symbolic link{target}"));
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::FileTypeExt;
        if t.is_fifo() {
            return Some("a FIFO (named pipe)".into());
        }
        if t.is_char_device() {
            return Some("a character device".into());
        }
        if t.is_block_device() {
            return Some("a block device".into());
        }
        if t.is_socket() {
            return Some("a socket".into());
        }
    }
    Some("not a regular file".into())
}

/// Checks that a file may be written at `path`: nothing is there yet, or a regular file is (not
/// a symbolic link to one). See the module documentation.
pub fn check_file_target(path: &Path) -> Result<(), OutputError> {
    let meta = match fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(io_error(path)(e)),
    };
    let Some(kind) = kind_of(path, &meta) else { return Ok(()) };
    let t = meta.file_type();
    let hint = if t.is_dir() {
        "; give a file path (inside the directory, or a new one)".to_string()
    } else if t.is_symlink() {
        match fs::read_link(path) {
            Ok(target) => format!(
                " by renaming a temporary file over it, which would replace the link rather than write \
                 through it; give the link's target (`{}`) or a new path",
                target.display()
            ),
            Err(_) => "; give the file the link points to, or a new path".to_string(),
        }
    } else {
        " (by renaming a temporary file over it), which would turn this one into a regular file; to \
         write into it, print to standard output and redirect it (`> path`)"
            .to_string()
    };
    Err(OutputError::NotAFile { path: path.to_path_buf(), kind, hint })
}

/// Whether `a` and `b` are the same file: by device and inode where both exist (which also sees
/// through hard and symbolic links), else by canonical path.
fn same_file(a: &Path, b: &Path) -> bool {
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt;
        if let (Ok(ma), Ok(mb)) = (fs::metadata(a), fs::metadata(b)) {
            return ma.dev() == mb.dev() && ma.ino() == mb.ino();
        }
    }
    matches!((fs::canonicalize(a), fs::canonicalize(b)), (Ok(x), Ok(y)) if x == y)
}

/// Checks that writing `output` leaves every one of `inputs` alone: it is none of them, and no
/// input lies inside it (an output directory is replaced whole).
pub fn check_not_input(output: &Path, inputs: &[&Path]) -> Result<(), OutputError> {
    for &input in inputs {
        if same_file(output, input) {
            let relation = "is";
            return Err(OutputError::IsInput {
                path: output.to_path_buf(),
                input: input.to_path_buf(),
                relation,
            });
        }
        if let (Ok(out), Ok(inp)) = (fs::canonicalize(output), fs::canonicalize(input)) {
            if out.is_dir() && inp.starts_with(&out) {
                let relation = "holds";
                return Err(OutputError::IsInput {
                    path: output.to_path_buf(),
                    input: input.to_path_buf(),
                    relation,
                });
            }
            // A file of an input folder (an artifact's manifest, a checkpoint's config.json) is
            // that input too: replacing it changes the input.
            if inp.is_dir() && out != inp && out.starts_with(&inp) {
                let relation = "is a file of";
                return Err(OutputError::IsInput {
                    path: output.to_path_buf(),
                    input: input.to_path_buf(),
                    relation,
                });
            }
        }
    }
    Ok(())
}

/// The directory `path` is in (`.` for a bare name) and its file name.
fn split(path: &Path) -> Result<(&Path, String), OutputError> {
    let name = path
        .file_name()
        .filter(|n| *n != "." && *n != "..")
        .ok_or_else(|| OutputError::NoFileName { path: path.to_path_buf() })?;
    let parent = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    Ok((parent, name.to_string_lossy().into_owned()))
}

/// The prefix of the temporaries of `name` made by this process: `.{name}.tmp-{pid}-`.
fn temp_prefix(name: &str, what: &str) -> String {
    format!(".{name}.{what}-{}-", std::process::id())
}

/// Syncs a directory, so that the entries renamed into it are on disk. Some file systems cannot
/// sync a directory; that is not an error (there is nothing more to be done there).
fn sync_dir(dir: &Path) -> io::Result<()> {
    match fs::File::open(dir).and_then(|d| d.sync_all()) {
        Err(e) if e.kind() == io::ErrorKind::InvalidInput || e.kind() == io::ErrorKind::PermissionDenied => {
            Ok(())
        }
        other => other,
    }
}

/// Syncs every file under `dir`, then `dir` itself.
fn sync_tree(dir: &Path) -> io::Result<()> {
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        let t = entry.file_type()?;
        if t.is_dir() {
            sync_tree(&entry.path())?;
        } else if t.is_file() {
            fs::File::open(entry.path())?.sync_all()?;
        }
    }
    sync_dir(dir)
}

/// Writes `bytes` to the file `path` atomically (see the module documentation), after
/// [`check_file_target`].
pub fn write_file(path: &Path, bytes: &[u8]) -> Result<(), OutputError> {
    write_file_with(path, |f| f.write_all(bytes))
}

/// [`write_file`] with the contents written by `fill` into the temporary file.
pub fn write_file_with(
    path: &Path,
    fill: impl FnOnce(&mut fs::File) -> io::Result<()>,
) -> Result<(), OutputError> {
    check_file_target(path)?;
    let (parent, name) = split(path)?;
    remove_stale_siblings(path)?;
    let io = io_error(path);
    let prefix = temp_prefix(&name, "tmp");
    let mut builder = tempfile::Builder::new();
    builder.prefix(&prefix);
    // A new file gets the permissions `std::fs::write` would give it (0o666 less the umask), not
    // tempfile's private 0o600.
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        builder.permissions(fs::Permissions::from_mode(0o666));
    }
    let mut tmp = builder.tempfile_in(parent).map_err(&io)?;
    fill(tmp.as_file_mut()).map_err(&io)?;
    tmp.as_file().sync_all().map_err(&io)?;
    tmp.persist(path).map_err(|e| io(e.error))?;
    sync_dir(parent).map_err(io)
}

/// Writes the directory `dir` atomically: `fill` puts the files into an empty temporary sibling,
/// which then replaces whatever directory is at `dir` (see the module documentation). The caller
/// decides beforehand whether an existing `dir` may be replaced.
pub fn replace_dir<E: From<OutputError>>(
    dir: &Path,
    fill: impl FnOnce(&Path) -> Result<(), E>,
) -> Result<(), E> {
    let (parent, name) = split(dir)?;
    fs::create_dir_all(parent).map_err(io_error(parent))?;
    remove_stale_siblings(dir)?;
    let tmp = tempfile::Builder::new().prefix(&temp_prefix(&name, "tmp")).tempdir_in(parent);
    let tmp = tmp.map_err(io_error(dir))?;
    fill(tmp.path())?;
    sync_tree(tmp.path()).map_err(io_error(tmp.path()))?;
    let tmp = tmp.keep();
    let placed = put_in_place(&tmp, dir, parent, &name);
    if placed.is_err() {
        let _ = fs::remove_dir_all(&tmp);
    }
    placed?;
    sync_dir(parent).map_err(io_error(parent))?;
    Ok(())
}

/// Renames the complete directory `tmp` to `dir`, moving an existing `dir` aside first.
fn put_in_place(tmp: &Path, dir: &Path, parent: &Path, name: &str) -> Result<(), OutputError> {
    if fs::symlink_metadata(dir).is_err() {
        return fs::rename(tmp, dir).map_err(io_error(dir));
    }
    // An empty directory with a fresh name: Linux renames a directory over an empty one.
    let old = tempfile::Builder::new().prefix(&temp_prefix(name, "old")).tempdir_in(parent);
    let old = old.map_err(io_error(dir))?.keep();
    fs::rename(dir, &old).map_err(io_error(dir))?;
    if let Err(e) = fs::rename(tmp, dir) {
        let _ = fs::rename(&old, dir);
        return Err(io_error(dir)(e));
    }
    fs::remove_dir_all(&old).map_err(io_error(&old))
}

/// The process id in `name` when it is `{prefix}{pid}` or `{prefix}{pid}-{anything}`.
pub fn pid_after(name: &str, prefix: &str) -> Option<u32> {
    let rest = name.strip_prefix(prefix)?;
    let digits = rest.split_once('-').map_or(rest, |(d, _)| d);
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// Whether process `pid` may still be running: this process, one `/proc` lists, or any process
/// where there is no `/proc` to ask.
pub fn process_alive(pid: u32) -> bool {
    let proc = Path::new("/proc");
    pid == std::process::id() || !proc.join("self").exists() || proc.join(pid.to_string()).exists()
}

/// Removes the entries of `dir` that `owner` recognises as temporaries (it returns the id of the
/// process that made one) of processes that no longer run; returns what was removed.
pub fn remove_stale(dir: &Path, owner: impl Fn(&str) -> Option<u32>) -> Result<Vec<PathBuf>, OutputError> {
    let mut removed = Vec::new();
    let entries = match fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(removed),
        Err(e) => return Err(io_error(dir)(e)),
    };
    for entry in entries {
        let entry = entry.map_err(io_error(dir))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(pid) = owner(&name) else { continue };
        if process_alive(pid) {
            continue;
        }
        let path = entry.path();
        let gone = if entry.file_type().map_err(io_error(&path))?.is_dir() {
            fs::remove_dir_all(&path)
        } else {
            fs::remove_file(&path)
        };
        match gone {
            Ok(()) => removed.push(path),
            // Another process cleaned it up first, or it is another user's (in a shared temporary
            // directory), which is not ours to remove.
            Err(e) if matches!(e.kind(), io::ErrorKind::NotFound | io::ErrorKind::PermissionDenied) => {}
            Err(e) => return Err(io_error(&path)(e)),
        }
    }
    Ok(removed)
}

/// Removes the stale temporaries of `target` beside it ([`write_file`]'s and [`replace_dir`]'s,
/// `.{name}.tmp-{pid}…`, and the moved-aside `.{name}.old-{pid}…`), except that an old directory
/// whose target is gone (a kill between the two renames of [`replace_dir`]) is moved back.
pub fn remove_stale_siblings(target: &Path) -> Result<Vec<PathBuf>, OutputError> {
    let (parent, name) = split(target)?;
    let (tmp, old) = (format!(".{name}.tmp-"), format!(".{name}.old-"));
    if fs::symlink_metadata(target).is_err() {
        let entries = fs::read_dir(parent).into_iter().flatten().flatten();
        let orphan = entries
            .filter(|e| pid_after(&e.file_name().to_string_lossy(), &old).is_some_and(|p| !process_alive(p)))
            .map(|e| e.path())
            .next();
        if let Some(orphan) = orphan {
            fs::rename(&orphan, target).map_err(io_error(target))?;
        }
    }
    remove_stale(parent, |n| pid_after(n, &tmp).or_else(|| pid_after(n, &old)))
}

#[cfg(test)]
mod tests;
