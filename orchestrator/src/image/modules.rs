//! Finding the guest's kernel modules among the host kernel's, and unpacking compressed ones.

use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use super::{ImageError, Result};

/// Module file names use '-' and '_' interchangeably; the kernel treats them as equal.
pub(super) fn normalize_module(name: &str) -> String {
    name.replace('-', "_")
}

const MODULE_SUFFIXES: &[&str] = &[".ko", ".ko.xz", ".ko.zst", ".ko.gz"];

/// Maps normalized module names to their files under `dir`.
pub(super) fn index_modules(dir: &Path) -> Result<HashMap<String, PathBuf>> {
    let mut found = HashMap::new();
    let mut stack = vec![dir.join("kernel")];
    while let Some(d) = stack.pop() {
        let entries = fs::read_dir(&d).map_err(|source| ImageError::ModulesDir {
            dir: d.clone(),
            source,
        })?;
        for entry in entries {
            let entry = entry.map_err(|source| ImageError::ModulesDir {
                dir: d.clone(),
                source,
            })?;
            let path = entry.path();
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                stack.push(path);
                continue;
            }
            let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
                continue;
            };
            if let Some(stem) = MODULE_SUFFIXES.iter().find_map(|s| name.strip_suffix(s)) {
                found.entry(normalize_module(stem)).or_insert(path);
            }
        }
    }
    Ok(found)
}

pub(super) fn read_module(path: &Path) -> Result<Vec<u8>> {
    let name = path.to_string_lossy();
    let tool = if name.ends_with(".xz") {
        Some(("xz", "xz-utils"))
    } else if name.ends_with(".zst") {
        Some(("zstd", "zstd"))
    } else if name.ends_with(".gz") {
        Some(("gzip", "gzip"))
    } else {
        None
    };
    let Some((tool, package)) = tool else {
        return fs::read(path).map_err(|source| ImageError::ModuleRead {
            path: path.to_owned(),
            source,
        });
    };
    // busybox insmod in the guest cannot be relied on to decompress, so unpack on the host.
    let out = Command::new(tool)
        .arg("-dc")
        .arg(path)
        .output()
        .map_err(|source| ImageError::Decompressor {
            path: path.to_owned(),
            tool,
            package,
            source,
        })?;
    if !out.status.success() {
        return Err(ImageError::DecompressFailed {
            path: path.to_owned(),
            tool,
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        });
    }
    Ok(out.stdout)
}
