//! Lambda deployment packages (zip files): checked before anything is stored, with
//! Lambda's limits and words, and unpacked into a process's data directory.
//!
//! A package is refused when it is not a zip, when it is larger than Lambda takes
//! (50 MB zipped in a request, 250 MB unzipped), when an entry's path would leave the
//! package's directory (`../x`, `/etc/x`), or when a symbolic link points outside it.
//! Executable bits are kept, so a `provided.*` runtime's `bootstrap` runs. Its
//! `CodeSha256` is Lambda's: the base64 of the zip's SHA-256.

use std::io::Read as _;
use std::path::{Component, Path, PathBuf};

use base64::Engine as _;
use sha2::Digest as _;

/// Lambda's limit on a zip uploaded in the request (`ZipFile`).
pub const MAX_ZIPPED_BYTES: usize = 50 * 1024 * 1024;
/// Lambda's limit on a package's unzipped size.
pub const MAX_UNZIPPED_BYTES: u64 = 262_144_000;
/// Most entries a package may hold (a bound on work, far above real packages).
const MAX_ENTRIES: usize = 100_000;

/// Why a package is refused: Lambda's error type and message.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{error_type}: {message}")]
pub struct CodeError {
    pub error_type: &'static str,
    pub message: String,
}

fn invalid(message: impl Into<String>) -> CodeError {
    CodeError {
        error_type: "InvalidParameterValueException",
        message: message.into(),
    }
}

const NOT_A_ZIP: &str =
    "Could not unzip uploaded file. Please check your file, then try to upload again.";

/// A checked package.
#[derive(Debug, Clone)]
pub struct Package {
    /// Lambda's `CodeSha256`: base64 of the zip's SHA-256.
    pub sha256: String,
    /// The same digest in hex: the package's name in the code store and on disk.
    pub key: String,
    /// The zip's size (`CodeSize`).
    pub size: u64,
}

const SYMLINK: u32 = 0o120000;
const FILE_TYPE: u32 = 0o170000;

/// The path inside the package an entry names, refusing one that would leave it.
fn inside(name: &str) -> Result<PathBuf, CodeError> {
    let path = Path::new(name);
    let mut clean = PathBuf::new();
    for component in path.components() {
        match component {
            Component::Normal(part) => clean.push(part),
            Component::CurDir => {}
            _ => {
                return Err(invalid(format!(
                    "the zip entry `{name}` leaves the package's directory: paths must be relative and must not contain `..`"
                )));
            }
        }
    }
    if clean.as_os_str().is_empty() && !name.ends_with('/') {
        return Err(invalid(format!("the zip entry `{name}` has no name")));
    }
    Ok(clean)
}

/// Whether symbolic link `link` (a path inside the package) pointing at `target`
/// stays inside the package.
fn link_stays_inside(link: &Path, target: &str) -> bool {
    if target.is_empty() || Path::new(target).is_absolute() {
        return false;
    }
    let mut depth: i64 = link.components().count() as i64 - 1;
    for component in Path::new(target).components() {
        match component {
            Component::Normal(_) => depth += 1,
            Component::CurDir => {}
            Component::ParentDir => {
                depth -= 1;
                if depth < 0 {
                    return false;
                }
            }
            _ => return false,
        }
    }
    true
}

/// Checks a package: a zip within Lambda's limits whose entries all stay inside it.
pub fn check(zip: &[u8]) -> Result<Package, CodeError> {
    if zip.len() > MAX_ZIPPED_BYTES {
        return Err(CodeError {
            error_type: "RequestEntityTooLargeException",
            message: format!("Zipped file size must be smaller than {MAX_ZIPPED_BYTES} bytes"),
        });
    }
    let mut archive =
        zip::ZipArchive::new(std::io::Cursor::new(zip)).map_err(|_| invalid(NOT_A_ZIP))?;
    if archive.len() > MAX_ENTRIES {
        return Err(invalid(format!(
            "the package has {} entries; at most {MAX_ENTRIES} are taken",
            archive.len()
        )));
    }
    let mut unzipped: u64 = 0;
    for index in 0..archive.len() {
        let mut entry = archive.by_index(index).map_err(|_| invalid(NOT_A_ZIP))?;
        let path = inside(entry.name())?;
        let mode = entry.unix_mode().unwrap_or(0);
        // Read it whole: declared sizes can lie, and a corrupt entry shows here.
        let mut limited = (&mut entry).take(MAX_UNZIPPED_BYTES - unzipped + 1);
        let mut content = Vec::new();
        limited
            .read_to_end(&mut content)
            .map_err(|_| invalid(NOT_A_ZIP))?;
        unzipped += content.len() as u64;
        if unzipped > MAX_UNZIPPED_BYTES {
            return Err(invalid(format!(
                "Unzipped size must be smaller than {MAX_UNZIPPED_BYTES} bytes"
            )));
        }
        if mode & FILE_TYPE == SYMLINK {
            let target = String::from_utf8_lossy(&content);
            if !link_stays_inside(&path, &target) {
                return Err(invalid(format!(
                    "the zip entry `{}` is a link to `{target}`, outside the package",
                    entry.name()
                )));
            }
        }
    }
    let digest = sha2::Sha256::digest(zip);
    Ok(Package {
        sha256: base64::engine::general_purpose::STANDARD.encode(digest),
        key: hex::encode(digest),
        size: zip.len() as u64,
    })
}

/// Unpacks a checked package into `directory` (which must not exist yet): through a
/// temporary directory beside it, renamed once complete, so a half-written package
/// is never used.
pub fn unpack(zip: &[u8], directory: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    let parent = directory
        .parent()
        .ok_or_else(|| std::io::Error::other("the code directory has no parent"))?;
    std::fs::create_dir_all(parent)?;
    let staging = parent.join(format!(
        ".{}.{}",
        directory
            .file_name()
            .map(|name| name.to_string_lossy().into_owned())
            .unwrap_or_default(),
        uuid::Uuid::new_v4().simple()
    ));
    let result = (|| {
        std::fs::create_dir(&staging)?;
        let mut archive =
            zip::ZipArchive::new(std::io::Cursor::new(zip)).map_err(std::io::Error::other)?;
        for index in 0..archive.len() {
            let mut entry = archive.by_index(index).map_err(std::io::Error::other)?;
            let relative = inside(entry.name()).map_err(std::io::Error::other)?;
            let path = staging.join(&relative);
            let mode = entry.unix_mode().unwrap_or(0);
            if entry.is_dir() {
                std::fs::create_dir_all(&path)?;
                continue;
            }
            if let Some(parent) = path.parent() {
                std::fs::create_dir_all(parent)?;
            }
            let mut content = Vec::new();
            (&mut entry)
                .take(MAX_UNZIPPED_BYTES + 1)
                .read_to_end(&mut content)?;
            if mode & FILE_TYPE == SYMLINK {
                let target = String::from_utf8_lossy(&content).into_owned();
                if !link_stays_inside(&relative, &target) {
                    return Err(std::io::Error::other(format!(
                        "`{}` links outside the package",
                        entry.name()
                    )));
                }
                std::os::unix::fs::symlink(target, &path)?;
                continue;
            }
            std::fs::write(&path, &content)?;
            // Lambda keeps the permissions the zip records; without any, files are
            // readable (and not executable).
            let permissions = if mode & 0o777 != 0 {
                mode & 0o755
            } else {
                0o644
            };
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(permissions))?;
        }
        std::fs::rename(&staging, directory)
    })();
    if result.is_err() {
        let _ = std::fs::remove_dir_all(&staging);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write as _;

    fn zip_of(entries: &[(&str, &[u8], u32)], links: &[(&str, &str)]) -> Vec<u8> {
        let mut buffer = std::io::Cursor::new(Vec::new());
        {
            let mut writer = zip::ZipWriter::new(&mut buffer);
            for (name, content, mode) in entries {
                let options = zip::write::SimpleFileOptions::default()
                    .compression_method(zip::CompressionMethod::Stored)
                    .unix_permissions(*mode);
                writer.start_file(*name, options).unwrap();
                writer.write_all(content).unwrap();
            }
            for (name, target) in links {
                writer
                    .add_symlink(*name, *target, zip::write::SimpleFileOptions::default())
                    .unwrap();
            }
            writer.finish().unwrap();
        }
        buffer.into_inner()
    }

    #[test]
    fn a_package_is_checked_hashed_and_unpacked_with_its_modes() {
        let zip = zip_of(
            &[
                ("app.py", b"def handler(e, c): return 1\n", 0o644),
                ("bootstrap", b"#!/bin/sh\n", 0o755),
                ("lib/util.py", b"x = 1\n", 0o644),
            ],
            &[("lib/link.py", "util.py")],
        );
        let package = check(&zip).unwrap();
        let digest = sha2::Sha256::digest(&zip);
        assert_eq!(
            package.sha256,
            base64::engine::general_purpose::STANDARD.encode(digest)
        );
        assert_eq!(package.size, zip.len() as u64);
        let directory = tempfile::tempdir().unwrap();
        let target = directory.path().join("code").join(&package.key);
        unpack(&zip, &target).unwrap();
        use std::os::unix::fs::PermissionsExt as _;
        let mode = |name: &str| {
            std::fs::metadata(target.join(name))
                .unwrap()
                .permissions()
                .mode()
                & 0o777
        };
        assert_eq!(mode("bootstrap"), 0o755);
        assert_eq!(mode("app.py"), 0o644);
        assert_eq!(
            std::fs::read_to_string(target.join("lib/link.py")).unwrap(),
            "x = 1\n"
        );
    }

    #[test]
    fn packages_lambda_would_refuse_are_refused_with_its_words() {
        let not_zip = check(b"this is not a zip").unwrap_err();
        assert_eq!(not_zip.error_type, "InvalidParameterValueException");
        assert!(not_zip.message.contains("Could not unzip"), "{not_zip}");
        for name in ["../escape.py", "/etc/passwd", "a/../../b.py"] {
            let zip = zip_of(&[(name, b"x", 0o644)], &[]);
            let refused = check(&zip).unwrap_err();
            assert!(
                refused.message.contains("leaves the package"),
                "{name}: {refused}"
            );
        }
        for target in ["/etc/passwd", "../../outside", "../x"] {
            let zip = zip_of(&[("app.py", b"x", 0o644)], &[("link", target)]);
            let refused = check(&zip).unwrap_err();
            assert!(
                refused.message.contains("outside the package"),
                "{target}: {refused}"
            );
        }
        let inner = zip_of(&[("ok.py", b"x", 0o644)], &[("sub/link", "../ok.py")]);
        check(&inner).unwrap();
        let huge = vec![0u8; MAX_ZIPPED_BYTES + 1];
        assert_eq!(
            check(&huge).unwrap_err().error_type,
            "RequestEntityTooLargeException"
        );
    }
}
