//! The API's Unix sockets (`listen = "unix:/path"`): bound mode 0660, given `listen_group`,
//! a stale file from a daemon that died replaced, one that another process still serves
//! refused, and the file removed at exit only while it is still the one bound here.

use std::io::ErrorKind;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

/// A bound socket of the API and its file.
pub struct UnixApi {
    pub listener: UnixListener,
    pub file: SocketFile,
}

/// A socket file this process bound: removed at exit, unless something else took its path
/// since (another daemon after a restart).
#[derive(Clone, Debug)]
pub struct SocketFile {
    pub path: PathBuf,
    dev: u64,
    ino: u64,
}

impl SocketFile {
    /// Removes the file if it is still the socket bound here.
    pub fn remove(&self) {
        match std::fs::symlink_metadata(&self.path) {
            Ok(m) if m.dev() == self.dev && m.ino() == self.ino => {
                if let Err(e) = std::fs::remove_file(&self.path) {
                    tracing::warn!(path = %self.path.display(), error = %e, "failed to remove the API's socket");
                }
            }
            _ => {}
        }
    }
}

/// Why a socket could not be bound: a path taken or not ours (exit 1, as a taken TCP
/// address), or a setting that cannot work (exit 78).
#[derive(Debug)]
pub enum BindError {
    Taken(String),
    Config(String),
}

/// Binds the API's socket at `path`, mode 0660, group `group` when given. A socket file
/// left by a daemon that died (nothing accepts on it) is replaced; a socket some process
/// still serves, and any other kind of file, is left alone and refused.
pub fn bind(path: &Path, group: Option<&str>) -> Result<UnixApi, BindError> {
    let shown = path.display();
    match std::fs::symlink_metadata(path) {
        Err(e) if e.kind() == ErrorKind::NotFound => {}
        Err(e) => return Err(BindError::Taken(format!("cannot look at {shown}: {e}"))),
        Ok(m) if !m.file_type().is_socket() => {
            return Err(BindError::Taken(format!(
                "{shown} exists and is not a socket; remove it or choose another path"
            )))
        }
        Ok(_) => match UnixStream::connect(path) {
            Ok(_) => {
                return Err(BindError::Taken(format!(
                    "another process is serving the socket {shown} (another taskd daemon?); stop it or choose another path"
                )))
            }
            Err(e) if e.kind() == ErrorKind::ConnectionRefused => {
                // Nothing accepts on it: a daemon that died left it behind.
                tracing::info!(path = %shown, "replacing a stale API socket");
                std::fs::remove_file(path).map_err(|e| {
                    BindError::Taken(format!("cannot remove the stale socket {shown}: {e}"))
                })?;
            }
            Err(e) => {
                return Err(BindError::Taken(format!(
                    "cannot tell whether the socket {shown} is in use: {e}"
                )))
            }
        },
    }
    let listener = UnixListener::bind(path)
        .map_err(|e| BindError::Taken(format!("failed to bind {shown}: {e}")))?;
    let file = {
        let m = std::fs::symlink_metadata(path)
            .map_err(|e| BindError::Taken(format!("cannot look at {shown}: {e}")))?;
        SocketFile {
            path: path.to_path_buf(),
            dev: m.dev(),
            ino: m.ino(),
        }
    };
    let finish = || -> Result<(), BindError> {
        if let Some(name) = group {
            let gid = match nix::unistd::Group::from_name(name) {
                Ok(Some(g)) => g.gid,
                Ok(None) => {
                    return Err(BindError::Config(format!(
                        "listen_group: group `{name}` does not exist on this system"
                    )))
                }
                Err(e) => {
                    return Err(BindError::Config(format!(
                        "listen_group: failed to look up group `{name}`: {e}"
                    )))
                }
            };
            nix::unistd::chown(path, None, Some(gid)).map_err(|e| {
                BindError::Config(format!(
                    "listen_group: cannot give {shown} to group `{name}`: {e} (the daemon's user must be root or a member of `{name}`)"
                ))
            })?;
        }
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660))
            .map_err(|e| BindError::Taken(format!("cannot set the mode of {shown}: {e}")))
    };
    if let Err(e) = finish() {
        file.remove();
        return Err(e);
    }
    Ok(UnixApi { listener, file })
}
