//! The output contract on real files: what is written, what is refused and left as it was, and
//! what a killed process leaves behind.

use std::path::Path;
use std::process::Command;

use super::*;

fn entries(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> =
        fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    v.sort();
    v
}

#[test]
fn a_file_is_written_whole_with_the_usual_permissions_and_no_temporaries() {
    let d = tempfile::tempdir().unwrap();
    let path = d.path().join("out.kir");
    write_file(&path, b"first").unwrap();
    assert_eq!(fs::read(&path).unwrap(), b"first");
    write_file(&path, b"second").unwrap();
    assert_eq!(fs::read(&path).unwrap(), b"second");
    assert_eq!(entries(d.path()), ["out.kir"]);
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        fs::write(d.path().join("plain"), b"x").unwrap();
        let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&path), mode(&d.path().join("plain")), "the mode std::fs::write gives");
    }
}

#[test]
fn a_failed_write_leaves_the_old_file_and_no_temporaries() {
    let d = tempfile::tempdir().unwrap();
    let path = d.path().join("out.kir");
    fs::write(&path, b"old").unwrap();
    let e = write_file_with(&path, |f| {
        f.write_all(b"half")?;
        Err(io::Error::other("disk full"))
    })
    .unwrap_err();
    assert!(e.to_string().contains("disk full"), "{e}");
    assert_eq!(fs::read(&path).unwrap(), b"old");
    assert_eq!(entries(d.path()), ["out.kir"]);
}

#[test]
fn directories_links_and_special_files_are_refused_and_left_alone() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path().join("dir");
    fs::create_dir(&dir).unwrap();
    let e = write_file(&dir, b"x").unwrap_err();
    assert!(e.to_string().ends_with("is a directory, not a regular file: kiln writes its output to a new path or replaces a regular file; give a file path (inside the directory, or a new one)"), "{e}");
    assert!(dir.is_dir());

    #[cfg(unix)]
    {
        let target = d.path().join("target.kir");
        fs::write(&target, b"kept").unwrap();
        let link = d.path().join("link.kir");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        let e = write_file(&link, b"x").unwrap_err();
        let want = format!("is a symbolic link to `{}`, not a regular file", target.display());
        assert!(e.to_string().contains(&want), "{e}");
        assert!(e.to_string().contains("give the link's target"), "{e}");
        assert!(fs::symlink_metadata(&link).unwrap().file_type().is_symlink());
        assert_eq!(fs::read(&target).unwrap(), b"kept");

        let fifo = d.path().join("fifo");
        assert!(Command::new("mkfifo").arg(&fifo).status().unwrap().success());
        let e = write_file(&fifo, b"x").unwrap_err();
        assert!(e.to_string().contains("is a FIFO (named pipe), not a regular file"), "{e}");
        assert!(e.to_string().contains("print to standard output and redirect it"), "{e}");
        use std::os::unix::fs::FileTypeExt;
        assert!(fs::symlink_metadata(&fifo).unwrap().file_type().is_fifo());

        // Only checked, never written: as root a bug here would replace the device.
        let e = check_file_target(Path::new("/dev/null")).unwrap_err();
        assert!(e.to_string().starts_with("/dev/null is a character device, not a regular file"), "{e}");
    }
}

#[test]
fn an_output_is_never_an_input_nor_holds_one() {
    let d = tempfile::tempdir().unwrap();
    let input = d.path().join("x.toml");
    fs::write(&input, b"spec").unwrap();
    let e = check_not_input(&input, &[&input]).unwrap_err();
    assert_eq!(
        e.to_string(),
        format!(
            "{} is the input {}: writing the output there would destroy the input; write it to another path",
            input.display(),
            input.display()
        )
    );
    // The same file by another name.
    let hard = d.path().join("hard.toml");
    fs::hard_link(&input, &hard).unwrap();
    assert!(check_not_input(&hard, &[&input]).is_err());
    let dotted = d.path().join(".").join("x.toml");
    assert!(check_not_input(&dotted, &[&input]).is_err());
    // A directory that holds the input.
    let e = check_not_input(d.path(), &[&input]).unwrap_err();
    assert!(e.to_string().contains(" holds the input "), "{e}");
    // Anything else is fine, a new path included.
    check_not_input(&d.path().join("new.kir"), &[&input]).unwrap();
    check_not_input(&d.path().join("sub"), &[&input]).unwrap();
}

#[test]
fn a_directory_is_replaced_whole_or_not_at_all() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path().join("art");
    let fill = |text: &'static str| {
        move |tmp: &Path| -> Result<(), OutputError> {
            fs::write(tmp.join("a"), text).map_err(io_error(tmp))?;
            fs::create_dir(tmp.join("sub")).map_err(io_error(tmp))?;
            fs::write(tmp.join("sub").join("b"), text).map_err(io_error(tmp))
        }
    };
    replace_dir(&dir, fill("one")).unwrap();
    replace_dir(&dir, fill("two")).unwrap();
    assert_eq!(fs::read_to_string(dir.join("a")).unwrap(), "two");
    assert_eq!(fs::read_to_string(dir.join("sub/b")).unwrap(), "two");
    assert_eq!(entries(d.path()), ["art"]);
    let e = replace_dir(&dir, |tmp: &Path| -> Result<(), OutputError> {
        fs::write(tmp.join("a"), "three").map_err(io_error(tmp))?;
        Err(OutputError::NoFileName { path: tmp.to_path_buf() })
    });
    assert!(e.is_err());
    assert_eq!(fs::read_to_string(dir.join("a")).unwrap(), "two", "a failed fill changes nothing");
    assert_eq!(entries(d.path()), ["art"], "and leaves no temporaries");
}

#[test]
fn the_temporaries_of_a_killed_process_are_removed_by_the_next_write() {
    let d = tempfile::tempdir().unwrap();
    let dead = 4_294_967_295u32;
    let me = std::process::id();
    for name in [
        format!(".art.tmp-{dead}"),
        format!(".art.tmp-{dead}-Ab3xYz"),
        format!(".art.tmp-{me}-live"),
        format!(".other.tmp-{dead}"),
        format!("art.tmp-{dead}"),
    ] {
        fs::create_dir(d.path().join(name)).unwrap();
    }
    fs::write(d.path().join(format!(".art.old-{dead}-q")), "x").unwrap();
    let art = d.path().join("art");
    fs::create_dir(&art).unwrap();
    let removed = remove_stale_siblings(&art).unwrap();
    assert_eq!(removed.len(), 3, "{removed:?}");
    assert_eq!(
        entries(d.path()),
        [
            format!(".art.tmp-{me}-live"),
            format!(".other.tmp-{dead}"),
            "art".into(),
            format!("art.tmp-{dead}")
        ]
    );

    // Killed between the two renames: the target is gone and its old copy is put back.
    let old = d.path().join(format!(".gone.old-{dead}-Zz9"));
    fs::create_dir(&old).unwrap();
    fs::write(old.join("manifest.json"), "{}").unwrap();
    remove_stale_siblings(&d.path().join("gone")).unwrap();
    assert_eq!(fs::read_to_string(d.path().join("gone/manifest.json")).unwrap(), "{}");
}

#[test]
fn process_ids_are_read_from_temporary_names() {
    assert_eq!(pid_after("kiln-pack-123-4", "kiln-pack-"), Some(123));
    assert_eq!(pid_after(".x.tmp-77", ".x.tmp-"), Some(77));
    assert_eq!(pid_after(".x.tmp-77-aB9", ".x.tmp-"), Some(77));
    assert_eq!(pid_after(".x.tmp-", ".x.tmp-"), None);
    assert_eq!(pid_after(".x.tmp-7a", ".x.tmp-"), None);
    assert_eq!(pid_after(".x.tmp-99999999999", ".x.tmp-"), None);
    assert_eq!(pid_after(".y.tmp-1", ".x.tmp-"), None);
}
