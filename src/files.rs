//! Files crier writes: always whole (a temporary file beside the target, synced, then renamed
//! over it, so a reader or a crash sees the old file or the new one, never half of one), and
//! with the permissions their contents call for: public output (the status page) readable by
//! any web server, private data (emails with addresses in them) by crier's user only.

use std::io::Write;
use std::path::Path;

#[cfg(unix)]
const PUBLIC_FILE: u32 = 0o644;
#[cfg(unix)]
const PRIVATE_FILE: u32 = 0o600;

/// Writes `contents` to `path` whole, readable by everyone (the status page).
pub fn write_public(path: &Path, contents: &[u8]) -> std::io::Result<()> {
    #[cfg(unix)]
    return write_whole(path, contents, PUBLIC_FILE);
    #[cfg(not(unix))]
    return write_whole(path, contents);
}

/// Writes `contents` to `path` whole, readable by its owner only (an email in the outbox).
pub fn write_private(path: &Path, contents: &[u8]) -> std::io::Result<()> {
    #[cfg(unix)]
    return write_whole(path, contents, PRIVATE_FILE);
    #[cfg(not(unix))]
    return write_whole(path, contents);
}

fn write_whole(path: &Path, contents: &[u8], #[cfg(unix)] mode: u32) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let mut file = tempfile::NamedTempFile::new_in(dir)?;
    // The temporary file is created 0600, and its mode survives the rename: set the final
    // one first.
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        file.as_file()
            .set_permissions(std::fs::Permissions::from_mode(mode))?;
    }
    file.write_all(contents)?;
    file.as_file().sync_all()?;
    file.persist(path).map_err(|e| e.error)?;
    Ok(())
}

/// Creates a folder for private data, readable by its owner only.
pub fn create_private_dir(dir: &Path) -> crate::Result<()> {
    create_dir(dir)?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
            .map_err(|e| dir_error(dir, e))?;
    }
    Ok(())
}

/// Creates a folder for public output.
pub fn create_public_dir(dir: &Path) -> crate::Result<()> {
    create_dir(dir)
}

fn create_dir(dir: &Path) -> crate::Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| dir_error(dir, e))
}

fn dir_error(dir: &Path, error: std::io::Error) -> crate::Error {
    crate::Error::user(format!(
        "cannot create the folder {}: {error}",
        dir.display()
    ))
}

/// Whether `dir` exists as a writable folder, or could be created: its nearest existing
/// ancestor is a folder this process may write in. Leaves nothing behind; `check-config`
/// uses it.
pub fn can_create_dir(dir: &Path) -> Result<(), String> {
    let mut candidate = Some(dir);
    while let Some(path) = candidate {
        match std::fs::metadata(path) {
            Ok(meta) if meta.is_dir() => {
                // An unnamed temporary file: the one honest test of "may write here".
                return tempfile::tempfile_in(path)
                    .map(drop)
                    .map_err(|e| format!("cannot write in {}: {e}", path.display()));
            }
            Ok(_) => return Err(format!("{} is not a folder", path.display())),
            Err(_) => candidate = path.parent().filter(|p| !p.as_os_str().is_empty()),
        }
    }
    Ok(())
}
