//! Writing SVIDs into a folder (`trustline-agent api fetch x509 --write DIR`) so that nobody else can redirect,
//! read or swap them.
//!
//! The folder must be a real directory (not a symbolic link), owned by the user running the command (or root),
//! that group and others cannot write: anyone else who can create entries in it could plant a link where the key
//! goes, or later replace `bundle.N.pem` with a trust anchor of their own. A missing folder is created with mode
//! 0700.
//!
//! Each file is written to a fresh temporary file in that folder, opened with `O_CREAT | O_EXCL | O_NOFOLLOW`
//! (so nothing that already exists, link or file, is ever opened), given its mode (0600 for private keys, 0644
//! for certificates and bundles) before any byte is written, synced, then renamed over the target. `rename`
//! replaces whatever is at the target (a link is replaced, not followed; an existing file with a looser mode is
//! replaced by the new inode), and a reader sees either the old file or the whole new one.

use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// Mode of private key files.
pub const KEY_MODE: u32 = 0o600;
/// Mode of certificate and bundle files.
pub const PUBLIC_MODE: u32 = 0o644;

/// Why a file could not be written.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum WriteError {
    /// The folder is a symbolic link.
    #[error("--write {}: is a symbolic link; name the folder itself", dir.display())]
    FolderIsSymlink {
        /// The folder.
        dir: PathBuf,
    },
    /// Something other than a folder is there.
    #[error("--write {}: not a directory", dir.display())]
    NotAFolder {
        /// The path.
        dir: PathBuf,
    },
    /// Group or others may create files in the folder.
    #[error("--write {}: mode {mode:04o} lets group or others write into it; use a folder only you can write (chmod go-w)", dir.display())]
    FolderWritable {
        /// The folder.
        dir: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// The folder belongs to another user.
    #[error("--write {}: owned by uid {owner}, not by you (uid {me}) or root", dir.display())]
    FolderNotOwned {
        /// The folder.
        dir: PathBuf,
        /// Its owner.
        owner: u32,
        /// The effective uid of this process.
        me: u32,
    },
    /// An I/O operation on `path` failed.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file or folder.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> WriteError + '_ {
    move |source| WriteError::Io {
        path: path.to_owned(),
        source,
    }
}

/// A folder checked to be safe to write SVIDs into.
#[derive(Debug)]
pub struct SvidFolder {
    dir: PathBuf,
}

impl SvidFolder {
    /// Creates `dir` (mode 0700) if it is missing, then checks it as the module documentation says.
    pub fn open(dir: &Path) -> Result<Self, WriteError> {
        // Without a trailing slash: `link/` would resolve the link before it could be seen.
        let dir: PathBuf = dir.components().collect();
        match std::fs::symlink_metadata(&dir) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(&dir)
                .map_err(io(&dir))?,
            Err(e) => return Err(io(&dir)(e)),
            Ok(_) => {}
        }
        let meta = std::fs::symlink_metadata(&dir).map_err(io(&dir))?;
        if meta.file_type().is_symlink() {
            return Err(WriteError::FolderIsSymlink { dir });
        }
        if !meta.is_dir() {
            return Err(WriteError::NotAFolder { dir });
        }
        let mode = meta.permissions().mode() & 0o7777;
        if mode & 0o022 != 0 {
            return Err(WriteError::FolderWritable { dir, mode });
        }
        let me = nix::unistd::geteuid().as_raw();
        if meta.uid() != me && meta.uid() != 0 {
            return Err(WriteError::FolderNotOwned {
                dir,
                owner: meta.uid(),
                me,
            });
        }
        Ok(Self { dir })
    }

    /// The folder.
    pub fn path(&self) -> &Path {
        &self.dir
    }

    /// Writes `body` to `name` in the folder with `mode`, through a new temporary file and a rename; returns the
    /// path written.
    pub fn write(&self, name: &str, body: &[u8], mode: u32) -> Result<PathBuf, WriteError> {
        let target = self.dir.join(name);
        let mut nonce = [0u8; 8];
        aws_lc_rs::rand::fill(&mut nonce)
            .map_err(|_| io(&target)(std::io::Error::other("no randomness for a temporary file name")))?;
        let tmp = self.dir.join(format!(
            ".{name}.{}.tmp",
            nonce.iter().map(|b| format!("{b:02x}")).collect::<String>()
        ));
        let written = (|| {
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
                .mode(mode)
                .open(&tmp)?;
            // The umask may have narrowed the mode; never widened it, so nothing was readable meanwhile.
            f.set_permissions(std::fs::Permissions::from_mode(mode))?;
            f.write_all(body)?;
            f.sync_all()
        })();
        if let Err(e) = written.and_then(|()| std::fs::rename(&tmp, &target)) {
            let _ = std::fs::remove_file(&tmp);
            return Err(io(&target)(e));
        }
        // Make the rename itself durable; a folder that cannot be synced changes nothing about the files.
        if let Ok(d) = std::fs::File::open(&self.dir) {
            let _ = d.sync_all();
        }
        Ok(target)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mode_of(p: &Path) -> u32 {
        std::fs::symlink_metadata(p).unwrap().permissions().mode() & 0o7777
    }

    /// A link planted where the key goes is replaced, not followed; an existing file with a looser mode is
    /// replaced by a new one with the right mode. Fails before issue 19: `--write` opened the target path with
    /// O_TRUNC, following links and keeping the existing file's mode.
    #[test]
    fn planted_links_are_replaced_not_followed() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("svid");
        let victim = tmp.path().join("victim");
        std::fs::write(&victim, "untouched").unwrap();
        let folder = SvidFolder::open(&dir).unwrap();
        assert_eq!(mode_of(&dir), 0o700);
        std::os::unix::fs::symlink(&victim, dir.join("svid.0.key")).unwrap();
        std::fs::write(dir.join("svid.0.pem"), "old").unwrap();
        std::fs::set_permissions(dir.join("svid.0.pem"), std::fs::Permissions::from_mode(0o666)).unwrap();
        let key = folder.write("svid.0.key", b"KEY", KEY_MODE).unwrap();
        let cert = folder.write("svid.0.pem", b"CERT", PUBLIC_MODE).unwrap();
        assert_eq!(std::fs::read_to_string(&victim).unwrap(), "untouched");
        assert!(std::fs::symlink_metadata(&key).unwrap().file_type().is_file());
        assert_eq!(std::fs::read(&key).unwrap(), b"KEY");
        assert_eq!(mode_of(&key), 0o600);
        assert_eq!(std::fs::read(&cert).unwrap(), b"CERT");
        assert_eq!(mode_of(&cert), 0o644);
        // Only the three files: no temporary file is left behind.
        let mut names: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        assert_eq!(names, ["svid.0.key", "svid.0.pem"]);
    }

    /// Fails before issue 19: any folder was accepted.
    #[test]
    fn folders_others_can_write_or_that_are_links_are_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let open = tmp.path().join("open");
        std::fs::create_dir(&open).unwrap();
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o777)).unwrap();
        let e = SvidFolder::open(&open).unwrap_err();
        assert!(matches!(e, WriteError::FolderWritable { mode: 0o777, .. }), "{e}");
        let msg = e.to_string();
        assert!(
            msg.contains(&open.display().to_string()) && msg.contains("0777"),
            "{msg}"
        );
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o775)).unwrap();
        assert!(matches!(
            SvidFolder::open(&open),
            Err(WriteError::FolderWritable { mode: 0o775, .. })
        ));
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o755)).unwrap();
        SvidFolder::open(&open).unwrap();
        let link = tmp.path().join("link");
        std::os::unix::fs::symlink(&open, &link).unwrap();
        let e = SvidFolder::open(&link).unwrap_err();
        assert!(matches!(e, WriteError::FolderIsSymlink { .. }), "{e}");
        let with_slash = PathBuf::from(format!("{}/", link.display()));
        assert!(matches!(
            SvidFolder::open(&with_slash),
            Err(WriteError::FolderIsSymlink { .. })
        ));
        let file = tmp.path().join("file");
        std::fs::write(&file, "").unwrap();
        assert!(matches!(
            SvidFolder::open(&file),
            Err(WriteError::NotAFolder { .. })
        ));
    }
}
