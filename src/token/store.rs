//! Where a refresh token lives between restarts: a file written atomically (a fresh temporary
//! file in the same directory, created exclusively without following symlinks, mode 0600,
//! synced, renamed over the old one, then the directory synced), so a crash mid-write leaves the
//! old token or the new one, never half of either, and nothing planted in the directory can
//! receive the token.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use secrecy::{ExposeSecret, SecretString};

/// Reads the refresh token from `path`; `Ok(None)` if the file does not exist yet.
pub fn read(path: &Path) -> std::io::Result<Option<SecretString>> {
    match std::fs::read_to_string(path) {
        Ok(text) => {
            let token = text.trim();
            Ok((!token.is_empty()).then(|| SecretString::from(token.to_owned())))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// The directory `path` is in (`.` for a bare file name).
pub fn directory(path: &Path) -> &Path {
    path.parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
}

/// A new name beside `path`, unguessable, so nothing can be planted there in advance and a temp
/// file left by a crash never blocks the next write (a container's pid is the same every start).
fn temp_name(path: &Path, what: &str) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    directory(path).join(format!(".{name}.{what}-{:016x}", fastrand::u64(..)))
}

/// Creates `path` for writing only if nothing (not even a symlink) is there: `O_CREAT | O_EXCL |
/// O_NOFOLLOW`, mode 0600.
fn create_new(path: &Path) -> std::io::Result<File> {
    let mut options = OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600).custom_flags(libc::O_NOFOLLOW);
    }
    options.open(path)
}

/// Checks at start that files can be created in `path`'s directory (rotated tokens are written
/// there), by creating and removing a probe file.
pub fn check_writable(path: &Path) -> std::io::Result<()> {
    let probe = temp_name(path, "probe");
    drop(create_new(&probe)?);
    std::fs::remove_file(&probe)
}

/// Replaces the file's content with `token`, atomically.
pub fn write(path: &Path, token: &SecretString) -> std::io::Result<()> {
    write_via(path, &temp_name(path, "tmp"), token)
}

/// [`write`] through the temporary file `temp`, which must not exist yet.
fn write_via(path: &Path, temp: &Path, token: &SecretString) -> std::io::Result<()> {
    // Refuses anything already at `temp`, a symlink included: the token goes to no file but ours.
    let mut file = create_new(temp)?;
    let result = (|| {
        file.write_all(token.expose_secret().as_bytes())?;
        file.write_all(b"\n")?;
        file.sync_all()?;
        std::fs::rename(temp, path)?;
        // The rename is durable only once the directory is synced.
        File::open(directory(path))?.sync_all()
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(temp);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("pcgate-store-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn write_then_read_round_trips_with_owner_only_mode() {
        let dir = temp_dir("round-trip");
        let path = dir.join("refresh-token");
        assert!(read(&path).unwrap().is_none());
        write(&path, &SecretString::from("first")).unwrap();
        write(&path, &SecretString::from("second")).unwrap();
        assert_eq!(read(&path).unwrap().unwrap().expose_secret(), "second");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600);
        }
        // No temporary file is left behind.
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 1);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[cfg(unix)]
    #[test]
    fn a_symlink_planted_at_the_temporary_name_never_receives_the_token() {
        let dir = temp_dir("symlink");
        let path = dir.join("refresh-token");
        let target = dir.join("attacker-readable");
        std::fs::write(&target, "untouched").unwrap();
        // The name the temporary file had before (`.NAME.PID.tmp`), and one at the exact name a
        // write is told to use.
        let old_name = dir.join(format!(".refresh-token.{}.tmp", std::process::id()));
        std::os::unix::fs::symlink(&target, &old_name).unwrap();
        let planted = dir.join(".refresh-token.tmp-planted");
        std::os::unix::fs::symlink(&target, &planted).unwrap();

        // A write picks a fresh name: it succeeds and leaves the symlink alone.
        write(&path, &SecretString::from("rotated-secret")).unwrap();
        assert_eq!(
            read(&path).unwrap().unwrap().expose_secret(),
            "rotated-secret"
        );
        // A write through the planted name fails rather than following it.
        let error = write_via(&path, &planted, &SecretString::from("second-secret")).unwrap_err();
        assert_eq!(error.kind(), std::io::ErrorKind::AlreadyExists);

        assert_eq!(std::fs::read_to_string(&target).unwrap(), "untouched");
        for link in [&old_name, &planted] {
            assert!(std::fs::symlink_metadata(link)
                .unwrap()
                .file_type()
                .is_symlink());
        }
        assert_eq!(
            read(&path).unwrap().unwrap().expose_secret(),
            "rotated-secret"
        );
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_directory_nobody_can_create_files_in_is_not_writable() {
        let dir = temp_dir("writable");
        check_writable(&dir.join("refresh-token")).unwrap();
        // The probe is gone.
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 0);
        // Even root cannot create files in procfs (these tests run as root) or under a file.
        #[cfg(target_os = "linux")]
        assert!(check_writable(Path::new("/proc/self/refresh-token")).is_err());
        std::fs::write(dir.join("a-file"), "").unwrap();
        assert!(check_writable(&dir.join("a-file").join("refresh-token")).is_err());
        std::fs::remove_dir_all(dir).unwrap();
    }
}
