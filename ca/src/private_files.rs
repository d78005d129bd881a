//! Files and folders only the CA's user may access: the SQLite database, its `-wal`, `-shm` and `-journal`
//! files, and the folders the CA creates for them. Created 0600 / 0700 with the mode set explicitly (so the umask
//! does not matter), and checked like key files: group or others having any access is refused, naming the file
//! and its mode.
//!
//! Never loosens a mode, and never changes one the CA did not create, except through [`tighten`], which only
//! `trustline up` calls, on the files of its own state folder.

use std::io;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// Mode of a private folder.
pub const DIR_MODE: u32 = 0o700;
/// Mode of a private file.
pub const FILE_MODE: u32 = 0o600;

/// The files SQLite keeps for the database `db`: itself, then `-wal`, `-shm` and `-journal`.
pub fn sqlite_files(db: &Path) -> [PathBuf; 4] {
    let with = |suffix: &str| {
        let mut s = db.as_os_str().to_owned();
        s.push(suffix);
        PathBuf::from(s)
    };
    [db.to_owned(), with("-wal"), with("-shm"), with("-journal")]
}

/// Creates `dir` and every missing parent, each with mode 0700. Folders that exist are left as they are.
pub fn create_dir_all(dir: &Path) -> io::Result<()> {
    let mut missing = Vec::new();
    let mut cur = Some(dir);
    while let Some(d) = cur.filter(|d| !d.as_os_str().is_empty()) {
        if d.exists() {
            break;
        }
        missing.push(d);
        cur = d.parent();
    }
    for d in missing.into_iter().rev() {
        match std::fs::DirBuilder::new().mode(DIR_MODE).create(d) {
            Ok(()) => std::fs::set_permissions(d, std::fs::Permissions::from_mode(DIR_MODE))?,
            // Created meanwhile by someone else (another replica on the same folder): not ours to change.
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Creates `path` empty with mode 0600 if it does not exist; whether it was created.
pub fn create_file(path: &Path) -> io::Result<bool> {
    match std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(FILE_MODE)
        .open(path)
    {
        Ok(f) => {
            f.set_permissions(std::fs::Permissions::from_mode(FILE_MODE))?;
            Ok(true)
        }
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(false),
        Err(e) => Err(e),
    }
}

/// The permission bits of `path` when group or others have any access to it; `None` when it is private or does
/// not exist.
pub fn loose_mode(path: &Path) -> io::Result<Option<u32>> {
    match std::fs::metadata(path) {
        Ok(m) => {
            let mode = m.permissions().mode() & 0o777;
            Ok((mode & 0o077 != 0).then_some(mode))
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// Takes group and other access away from `path` (a file: 0600 at most; a folder: 0700 at most) if it has any;
/// returns the mode it had, or `None` if it was private or does not exist.
pub fn tighten(path: &Path) -> io::Result<Option<u32>> {
    let Some(mode) = loose_mode(path)? else {
        return Ok(None);
    };
    let private = if path.is_dir() { DIR_MODE } else { FILE_MODE };
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode & private))?;
    Ok(Some(mode))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn mode(p: &Path) -> u32 {
        std::fs::metadata(p).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn creates_private_folders_and_files_and_finds_loose_ones() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("a/b");
        create_dir_all(&dir).unwrap();
        assert_eq!(mode(&tmp.path().join("a")), 0o700);
        assert_eq!(mode(&dir), 0o700);
        create_dir_all(&dir).unwrap();

        let db = dir.join("ca.db");
        assert!(create_file(&db).unwrap());
        assert!(!create_file(&db).unwrap(), "an existing file is left alone");
        assert_eq!(mode(&db), 0o600);
        assert_eq!(loose_mode(&db).unwrap(), None);
        assert_eq!(loose_mode(&dir.join("missing")).unwrap(), None);

        std::fs::set_permissions(&db, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert_eq!(loose_mode(&db).unwrap(), Some(0o644));
        assert_eq!(tighten(&db).unwrap(), Some(0o644));
        assert_eq!(mode(&db), 0o600);
        assert_eq!(tighten(&db).unwrap(), None);

        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        assert_eq!(tighten(&dir).unwrap(), Some(0o755));
        assert_eq!(mode(&dir), 0o700);

        let names: Vec<String> = sqlite_files(&db)
            .iter()
            .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names, ["ca.db", "ca.db-wal", "ca.db-shm", "ca.db-journal"]);
    }
}
