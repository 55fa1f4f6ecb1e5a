//! A worker's code as given on the command line: a `.py` file (the user's
//! `process` function, wrapped in the SensorBucket archive as the dashboard
//! does) or a `.zip` archive (stored as it is, once it is known to hold
//! something the runtime can call). Also: whether new code is the code
//! already stored. No I/O but reading the given file.

use std::collections::BTreeSet;
use std::io::{Cursor, Read};
use std::path::Path;

use zip::ZipArchive;

use crate::archive;
use crate::cli::CliError;

/// The entrypoint with which the runtime calls `usercode.process` directly
/// when the archive has a `usercode.py` (the dockerworker's rule).
pub(super) const DEFAULT_ENTRYPOINT: &str = "main.main";

/// The members of the archive the dashboard builds around a `.py`.
const SENSORBUCKET_MEMBERS: [&str; 4] = ["usercode.py", "main.py", "requirements.txt", "build.sh"];

/// Code read from a file, ready to store.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) enum Code {
    /// From a `.py`: the user's code and the archive built around it.
    Python { usercode: String, archive: Vec<u8> },
    /// A `.zip`, stored as given.
    Zip(Vec<u8>),
}

impl Code {
    /// The bytes that go into `source`.
    pub(super) fn archive(&self) -> &[u8] {
        match self {
            Code::Python { archive, .. } | Code::Zip(archive) => archive,
        }
    }

    /// Whether storing this would change nothing the worker runs. A `.py` is
    /// compared with the stored archive's `usercode.py`, so that rebuilding
    /// the same code into a new zip is not a new revision.
    pub(super) fn same_as(&self, stored: Option<&[u8]>) -> bool {
        let Some(stored) = stored else {
            return false;
        };
        if stored == self.archive() {
            return true;
        }
        match self {
            Code::Python { usercode, .. } => {
                sensorbucket_usercode(stored).is_some_and(|stored| stored == *usercode)
            }
            Code::Zip(_) => false,
        }
    }
}

/// Reads `path` as worker code: a `.py` is wrapped in the SensorBucket
/// archive, a `.zip` must be a readable zip. See [`check_callable`] for
/// whether the runtime will find something to call in it.
pub(super) fn read(path: &Path) -> Result<Code, CliError> {
    let bytes = std::fs::read(path).map_err(|source| CliError::ReadFile {
        path: path.to_path_buf(),
        source,
    })?;
    match path.extension().and_then(|e| e.to_str()) {
        Some("py") => python(bytes),
        Some("zip") => member_names(&bytes)
            .map(|_| Code::Zip(bytes))
            .map_err(|e| format!("is not a zip archive ({e})")),
        _ => Err("give a .py file (defining process(message)) or a .zip code archive".into()),
    }
    .map_err(|problem| bad_code(path, problem))
}

/// Whether the runtime finds what to call in `code` with `entrypoint`:
/// `usercode.py` (with the default entrypoint) or the entrypoint's module
/// (for a `.py`, only `main` or `usercode` are in the archive).
pub(super) fn check_callable(code: &Code, path: &Path, entrypoint: &str) -> Result<(), CliError> {
    callable(code.archive(), entrypoint).map_err(|p| bad_code(path, p))
}

fn bad_code(path: &Path, problem: String) -> CliError {
    CliError::BadCode {
        path: path.to_path_buf(),
        problem,
    }
}

fn python(bytes: Vec<u8>) -> Result<Code, String> {
    let usercode = String::from_utf8(bytes).map_err(|_| "is not UTF-8 text".to_string())?;
    if usercode.trim().is_empty() {
        return Err("is empty: the worker needs a process(message) function".into());
    }
    let archive = archive::sensorbucket_archive(&usercode)
        .map_err(|e| format!("cannot build the code archive: {e}"))?;
    Ok(Code::Python { usercode, archive })
}

fn callable(bytes: &[u8], entrypoint: &str) -> Result<(), String> {
    let names = member_names(bytes).map_err(|e| format!("is not a zip archive ({e})"))?;
    let root = code_root(&names);
    let has = |file: &str| names.contains(&format!("{root}{file}"));
    let module = entrypoint.rsplit_once('.').map_or("", |(m, _)| m);
    let module_path = module.replace('.', "/");
    if (entrypoint == DEFAULT_ENTRYPOINT && has("usercode.py"))
        || has(&format!("{module_path}.py"))
        || has(&format!("{module_path}/__init__.py"))
    {
        return Ok(());
    }
    let listed: Vec<&str> = names.iter().map(String::as_str).take(10).collect();
    Err(format!(
        "holds neither usercode.py nor {module_path}.py (the module of entrypoint {entrypoint}); \
         members: {}",
        if listed.is_empty() {
            "none".into()
        } else {
            listed.join(", ")
        }
    ))
}

/// The member names of a zip archive (files only).
fn member_names(bytes: &[u8]) -> Result<BTreeSet<String>, zip::result::ZipError> {
    let mut zip = ZipArchive::new(Cursor::new(bytes))?;
    let mut names = BTreeSet::new();
    for i in 0..zip.len() {
        let file = zip.by_index_raw(i)?;
        if file.is_file() {
            names.insert(file.name()?.replace('\\', "/"));
        }
    }
    Ok(names)
}

/// Where the code sits in the archive: an archive made by zipping a folder
/// has everything one level down (the dockerworker's rule). Ends with `/`
/// unless empty.
fn code_root(names: &BTreeSet<String>) -> String {
    let top: BTreeSet<&str> = names
        .iter()
        .filter(|n| !n.starts_with("__MACOSX/"))
        .map(|n| n.split_once('/').map_or(n.as_str(), |(dir, _)| dir))
        .collect();
    let py_at_root = names.iter().any(|n| !n.contains('/') && n.ends_with(".py"));
    match top.into_iter().collect::<Vec<_>>().as_slice() {
        [dir] if !py_at_root && !names.contains(*dir) => format!("{dir}/"),
        _ => String::new(),
    }
}

/// The `usercode.py` of a stored archive that has the SensorBucket layout
/// and nothing else (otherwise replacing it by a `.py` drops files).
fn sensorbucket_usercode(stored: &[u8]) -> Option<String> {
    let names = member_names(stored).ok()?;
    if !names
        .iter()
        .all(|n| SENSORBUCKET_MEMBERS.contains(&n.as_str()))
    {
        return None;
    }
    let mut zip = ZipArchive::new(Cursor::new(stored)).ok()?;
    let mut usercode = String::new();
    zip.by_name("usercode.py")
        .ok()?
        .read_to_string(&mut usercode)
        .ok()?;
    Some(usercode)
}

/// The `usercode.py` of a stored archive, for `show --code`.
pub(super) fn usercode_of(stored: &[u8]) -> Option<String> {
    let mut zip = ZipArchive::new(Cursor::new(stored)).ok()?;
    let names = member_names(stored).ok()?;
    let root = code_root(&names);
    let mut usercode = String::new();
    zip.by_name(&format!("{root}usercode.py"))
        .ok()?
        .read_to_string(&mut usercode)
        .ok()?;
    Some(usercode)
}

/// Checks an entrypoint's shape: `module.function`, Python identifiers.
pub(super) fn check_entrypoint(entrypoint: &str) -> Result<(), CliError> {
    let identifier = |s: &str| {
        !s.is_empty()
            && !s.starts_with(|c: char| c.is_ascii_digit())
            && s.chars().all(|c| c.is_alphanumeric() || c == '_')
    };
    match entrypoint.rsplit_once('.') {
        Some((module, function)) if module.split('.').all(identifier) && identifier(function) => {
            Ok(())
        }
        _ => Err(CliError::BadArgument(format!(
            "entrypoint {entrypoint:?} is not of the form module.function (e.g. main.main)"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use zip::write::SimpleFileOptions;

    fn zip_of(files: &[(&str, &str)]) -> Vec<u8> {
        let mut zip = zip::ZipWriter::new(Cursor::new(Vec::new()));
        for (name, body) in files {
            zip.start_file(*name, SimpleFileOptions::default())
                .expect("start file");
            zip.write_all(body.as_bytes()).expect("write");
        }
        zip.finish().expect("finish").into_inner()
    }

    #[test]
    fn a_zip_with_usercode_is_accepted() {
        let bytes = zip_of(&[("usercode.py", "def process(m): return m")]);
        assert_eq!(callable(&bytes, "main.main"), Ok(()));
    }

    #[test]
    fn a_zip_of_a_folder_is_looked_into() {
        let bytes = zip_of(&[("code/usercode.py", "x"), ("code/lib.py", "y")]);
        assert!(callable(&bytes, "main.main").is_ok());
    }

    #[test]
    fn a_zip_holding_the_entrypoint_module_is_accepted() {
        let bytes = zip_of(&[
            ("handlers/run.py", "def go(m): return m"),
            ("requirements.txt", ""),
        ]);
        assert!(callable(&bytes, "handlers.run.go").is_ok());
        let err = callable(&bytes, "main.main").expect_err("no usercode.py, no main.py");
        assert!(err.contains("handlers/run.py"), "{err}");
    }

    #[test]
    fn garbage_is_not_a_zip() {
        let err = callable(b"PK\x03\x04garbage", "main.main").expect_err("garbage");
        assert!(err.starts_with("is not a zip archive"), "{err}");
    }

    #[test]
    fn the_same_python_code_is_the_same_even_in_another_archive() {
        let code = python(b"def process(m):\n    return m\n".to_vec()).expect("py");
        let Code::Python { usercode, .. } = &code else {
            panic!("python")
        };
        let other = zip_of(&[("usercode.py", usercode), ("main.py", "import usercode")]);
        assert!(code.same_as(Some(&other)));
        assert!(!code.same_as(None));
        let changed = python(b"def process(m):\n    return None\n".to_vec()).expect("py");
        assert!(!changed.same_as(Some(code.archive())));
    }

    #[test]
    fn python_code_is_not_the_same_as_an_archive_with_more_files() {
        let code = python(b"x = 1\n".to_vec()).expect("py");
        let richer = zip_of(&[("usercode.py", "x = 1\n"), ("helpers.py", "y = 2")]);
        assert!(!code.same_as(Some(&richer)));
    }

    #[test]
    fn entrypoints_must_be_module_dot_function() {
        assert!(check_entrypoint("main.main").is_ok());
        assert!(check_entrypoint("pkg.mod.handler").is_ok());
        for bad in ["main", ".main", "main.", "a b.c", "1a.b"] {
            assert!(check_entrypoint(bad).is_err(), "{bad}");
        }
    }
}
